"""The loop on a tiny model: it trains, resumes bitwise, stops cleanly, and every tensor moves."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lowrank_train import trainer as trainer_module
from lowrank_train.checkpoint import MODEL_FILE, find_latest
from lowrank_train.cli import main


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    path, _ = find_latest(run_dir / "checkpoints")
    return safetensors.torch.load_file(str(path / MODEL_FILE))


def run(path: Path, *args: str) -> int:
    return main(["train", str(path), "--samples", "0", *args])


def test_loss_falls_on_real_text(tiny_run):
    path = tiny_run(
        "falls",
        {"train": {"steps": 300, "batch_size": 8, "warmup_steps": 20}, "logging": {"every": 10}},
    )
    assert run(path) == 0
    run_dir = path.parent / "runs" / "falls"
    losses = train_losses(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert losses[10] > math.log(512) - 1.0  # starts near ln(vocab)
    assert summary["final_val_loss"] < math.log(512) - 1.5, summary  # and falls well below it
    assert losses[300] < losses[10] - 1.5


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_is_bitwise(tiny_run, optimizer):
    extra = {"optim": {"name": optimizer}, "checkpoint": {"every": 4}}
    straight = tiny_run("straight", extra)
    assert run(straight) == 0
    split = tiny_run("split", extra)
    assert run(split, "train.stop_at=6") == 0  # stops at 6 without changing the schedule
    assert run(split, "--resume", "latest") == 0
    runs = straight.parent / "runs"
    assert train_losses(runs / "split") == train_losses(runs / "straight")
    a, b = final_weights(runs / "straight"), final_weights(runs / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def send_signal_at(monkeypatch, call: int, signum: int) -> None:
    """Deliver `signum` to this process during the `call`-th forward pass of the model."""
    build = trainer_module.build_model

    def build_and_hook(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs):
            calls["n"] += 1
            if calls["n"] == call:
                os.kill(os.getpid(), signum)

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(trainer_module, "build_model", build_and_hook)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_and_resume_gives_the_same_curve(tiny_run, monkeypatch, signum):
    straight = tiny_run("straight")
    assert run(straight) == 0
    interrupted = tiny_run("interrupted")
    with monkeypatch.context() as patch:
        send_signal_at(patch, 5, signum)  # forward 5 = step 5 (grad_accum 1)
        assert run(interrupted) == 0  # saved and exited 0
    runs = interrupted.parent / "runs"
    events = [m for m in metrics(runs / "interrupted") if m.get("event") == "stop"]
    assert events and events[0]["step"] == 5
    assert find_latest(runs / "interrupted" / "checkpoints")[0].name == "step-00000005"
    assert run(interrupted, "--resume", "latest") == 0
    assert train_losses(runs / "interrupted") == train_losses(runs / "straight")
    a, b = final_weights(runs / "straight"), final_weights(runs / "interrupted")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tiny_run, monkeypatch):
    build = trainer_module.build_model

    def poisoned(*args, **kwargs):
        model = build(*args, **kwargs)
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += 1
            if calls["n"] >= 7:  # from step 7 on, the logits are NaN
                output.logits = output.logits * float("nan")
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer_module, "build_model", poisoned)
    path = tiny_run("nan", {"checkpoint": {"every": 3}})
    assert run(path) == 3
    ckpts = path.parent / "runs" / "nan" / "checkpoints"
    latest, skipped = find_latest(ckpts)
    assert latest.name == "step-00000006" and not skipped
    weights = safetensors.torch.load_file(str(latest / MODEL_FILE))
    assert all(torch.isfinite(t).all() for t in weights.values())
    stops = [m for m in metrics(path.parent / "runs" / "nan") if m.get("event") == "stop"]
    assert stops and stops[0]["reason"] == "non-finite loss" and stops[0]["step"] == 7


def test_damaged_checkpoint_refused_and_latest_falls_back(tiny_run, capsys):
    path = tiny_run("damaged", {"checkpoint": {"every": 4, "keep_last": 3}})
    assert run(path, "train.stop_at=8") == 0
    ckpts = path.parent / "runs" / "damaged" / "checkpoints"
    newest = ckpts / "step-00000008"
    model_file = newest / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated, as by a full disk
    capsys.readouterr()
    assert run(path, "--resume", str(newest)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(newest) in err and "model.safetensors" in err, err
    assert run(path, "--resume", "latest") == 0
    resumed = [m for m in metrics(path.parent / "runs" / "damaged") if m.get("event") == "resume"]
    assert resumed[-1]["step"] == 4  # fell back past the damaged step 8


def test_resume_refuses_a_config_that_changes_the_math(tiny_run, capsys):
    path = tiny_run("changed", {"checkpoint": {"every": 4}})
    assert run(path, "train.stop_at=4") == 0
    capsys.readouterr()
    assert run(path, "--resume", "latest", "train.lr=1e-2") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr" in err, err
    # what does not change the math may change: the run length and the logging cadence
    assert run(path, "--resume", "latest", "train.steps=16", "logging.every=2") == 0
    assert max(train_losses(path.parent / "runs" / "changed")) == 16


def test_fresh_run_refuses_to_overwrite_checkpoints(tiny_run, capsys):
    path = tiny_run("twice")
    assert run(path) == 0
    capsys.readouterr()
    assert run(path) == 2
    assert "--resume latest" in capsys.readouterr().err


def losses_of_two_runs(tiny_run, first: dict, second: dict) -> tuple[dict, dict]:
    """Train two tiny runs that differ only by `first` vs `second`; their loss curves."""
    paths = [tiny_run(name, extra) for name, extra in (("first", first), ("second", second))]
    assert all(run(path) == 0 for path in paths)
    a, b = (
        train_losses(path.parent / "runs" / name)
        for path, name in zip(paths, ("first", "second"), strict=True)
    )
    assert a.keys() == b.keys()
    return a, b


def test_grad_accum_matches_the_larger_batch(tiny_run):
    """Peers' per-layer mode ignores accumulation; here 2 x 4 sequences equal 1 x 8 up to rounding."""
    a, b = losses_of_two_runs(
        tiny_run,
        {"train": {"batch_size": 8, "steps": 6}},
        {"train": {"batch_size": 4, "grad_accum": 2, "steps": 6}},
    )
    # Summation order differs (one mean of 8 vs two means of 4); fp32 rounding, amplified a
    # little by Adam over 6 steps, stays far below 1e-4.
    assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)


def test_schedule_runs_at_the_configured_pace(tiny_run):
    """warmup then cosine, once per optimizer step, whatever grad_accum is (peers' halved pace)."""
    from lowrank_train.optim.schedule import lr_factor

    path = tiny_run(
        "pace",
        {
            "train": {
                "steps": 10,
                "warmup_steps": 3,
                "grad_accum": 2,
                "lr": 1e-2,
                "min_lr_ratio": 0.1,
            }
        },
    )
    assert run(path) == 0
    lrs = {m["step"]: m["lr"] for m in metrics(path.parent / "runs" / "pace") if "lr" in m}
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-2 * lr_factor(step - 1, 10, 3, 0.1)), step
    assert lrs[1] == pytest.approx(1e-2 / 3) and lrs[3] == pytest.approx(1e-2)
    assert lrs[10] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 6 / 7))))


def test_metrics_lines_have_the_documented_fields(tiny_run):
    path = tiny_run("fields", {"eval": {"every": 6}})
    assert run(path) == 0
    lines = metrics(path.parent / "runs" / "fields")
    train = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "val_loss" in m]
    fields = {
        "step",
        "tokens",
        "loss",
        "lr",
        "grad_norm",
        "step_s",
        "tok_s",
        "peak_gib",
        "peak_alloc_gib",
        "peak_reserved_gib",
        "time",
    }
    assert train and all(fields <= m.keys() for m in train)
    assert [m["step"] for m in evals] == [6, 12]
    assert all(m["val_ppl"] == pytest.approx(math.exp(m["val_loss"])) for m in evals)
    assert train[-1]["tokens"] == 12 * 4 * 32
    summary = json.loads((path.parent / "runs" / "fields" / "summary.json").read_text())
    assert summary["final_val_loss"] == evals[-1]["val_loss"] and summary["peak_gib"] > 0


def test_wandb_offline_logs_when_enabled(tiny_run, tmp_path):
    path = tiny_run("wb", {"logging": {"wandb": True}, "train": {"steps": 3}})
    assert run(path) == 0
    offline = list((path.parent / "runs" / "wb" / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("*.wandb"))


def test_compile_trains_on_cpu(tiny_run):
    a, b = losses_of_two_runs(
        tiny_run, {"train": {"steps": 4}}, {"train": {"steps": 4, "compile": True}}
    )
    # inductor fuses the loss differently: equal up to fp32 rounding, not bitwise
    assert all(abs(a[k] - b[k]) < 1e-3 for k in a), (a, b)


def test_gradient_checkpointing_gives_the_same_steps(tiny_run):
    """Recomputing each decoder layer in backward changes memory, not the math."""
    a, b = losses_of_two_runs(
        tiny_run,
        {"train": {"steps": 4}},
        {"train": {"steps": 4}, "model": {"gradient_checkpointing": True}},
    )
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)


def test_resume_latest_without_a_checkpoint_starts_from_step_0(tiny_run):
    path = tiny_run("first", {"train": {"steps": 3}})
    assert run(path, "--resume", "latest") == 0  # a preemptible job's first start
    assert max(train_losses(path.parent / "runs" / "first")) == 3


def test_export_of_a_directory_without_checkpoints_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err, err


def test_checkpoint_at_end_false_saves_nothing_at_the_end(tiny_run):
    path = tiny_run("throwaway", {"train": {"steps": 4}, "checkpoint": {"every": 3}})
    assert run(path, "checkpoint.at_end=false") == 0
    saved = sorted(p.name for p in (path.parent / "runs" / "throwaway" / "checkpoints").iterdir())
    assert saved == ["step-00000003"], saved  # the cadence's save, not the end's
