"""Precision resolution: `model.autocast: auto` picks bf16 on a CPU only where bf16 matmul is native.

The capability answer is monkeypatched both ways, so these tests hold on either kind of CPU and
never run a bf16 matmul on one that emulates it (90x slower there).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from lowrank_train import precision
from lowrank_train.cli import main
from lowrank_train.config import ModelConfig, load_config
from lowrank_train.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[1]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def native_bf16(monkeypatch):
    def set_answer(answer: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: answer)

    return set_answer


def test_auto_on_a_cpu_with_native_bf16_autocasts(native_bf16):
    native_bf16(True)
    p = resolve_precision(ModelConfig(autocast="auto"), CPU)
    assert (p.dtype, p.autocast) == (torch.float32, torch.bfloat16)
    assert "native bf16" in p.reason


def test_auto_on_a_cpu_without_native_bf16_trains_fp32(native_bf16):
    native_bf16(False)
    p = resolve_precision(ModelConfig(autocast="auto"), CPU)
    assert (p.dtype, p.autocast) == (torch.float32, None)
    assert "no native bf16" in p.reason
    assert p.record() == {"dtype": "float32", "autocast": "off"}


def test_explicit_choices_and_cuda_ignore_the_cpu(native_bf16):
    native_bf16(False)
    assert resolve_precision(ModelConfig(autocast="bfloat16"), CPU).autocast == torch.bfloat16
    native_bf16(True)
    assert resolve_precision(ModelConfig(autocast="off"), CPU).autocast is None
    cuda = resolve_precision(ModelConfig(autocast="auto"), CUDA)
    assert (cuda.dtype, cuda.autocast) == (torch.bfloat16, None)  # weights already bf16
    fp32 = resolve_precision(ModelConfig(dtype="float32", autocast="auto"), CUDA)
    assert fp32.autocast == torch.bfloat16


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_the_slowdown(
    native_bf16, monkeypatch, caplog
):
    native_bf16(False)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda: 63.0)
    p = resolve_precision(ModelConfig(autocast="bfloat16"), CPU)
    with caplog.at_level(logging.WARNING, logger="lowrank_train.precision"):
        precision.warn_if_emulated(p, CPU)
    (record,) = caplog.records
    assert "emulated" in record.message and "63x slower" in record.message
    native_bf16(True)
    caplog.clear()
    precision.warn_if_emulated(p, CPU)
    assert not caplog.records


def test_the_probe_measures_a_ratio():
    ratio = precision.bf16_slowdown()
    assert ratio > 0 and ratio == precision.bf16_slowdown()  # measured once per process


def test_quickstart_resolves_autocast_auto():
    cfg, _ = load_config(ROOT / "configs" / "runs" / "quickstart.yaml")
    assert cfg.model.autocast == "auto"


def test_resume_where_auto_resolves_differently_is_refused_and_names_the_override(
    tiny_run, native_bf16, capsys
):
    native_bf16(False)  # trained in fp32, as auto resolves on a CPU without native bf16
    path = tiny_run("moved", {"checkpoint": {"every": 4}, "model": {"autocast": "auto"}})
    assert main(["train", str(path), "--samples", "0", "train.stop_at=4"]) == 0
    capsys.readouterr()
    native_bf16(True)  # "another machine", where auto would pick bf16
    assert main(["train", str(path), "--samples", "0", "--resume", "latest"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.autocast=off" in err, err
    # the named override continues the same math
    assert (
        main(["train", str(path), "--samples", "0", "--resume", "latest", "model.autocast=off"])
        == 0
    )


def test_first_step_says_when_the_first_progress_line_comes(tiny_run, capfd):
    path = tiny_run("first", {"train": {"steps": 4}, "logging": {"every": 3}})
    assert main(["train", str(path), "--samples", "0"]) == 0
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "first progress line at step 3" in line]
    assert len(lines) == 1 and " step 1 took " in lines[0], err
