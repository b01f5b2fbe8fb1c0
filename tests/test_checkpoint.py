"""Checkpoints: round trip, weights_only loading, retention, damage detection, crash safety, RNG."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_train import checkpoint as ckpt
from lowrank_train.errors import CheckpointError

CONFIG = "name: tiny\nmodel:\n  preset: llama_20m\n"
TOKENIZER = '{"version": "1.0", "model": {"type": "BPE"}}'


def _model_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(16, 8, generator=gen)
    return {
        "embed.weight": embed,
        "lm_head.weight": embed,  # tied: shares storage with embed.weight
        "layer.codes": torch.randint(-128, 127, (8, 4), dtype=torch.int8, generator=gen),
        "layer.scale": torch.randn(8, generator=gen).to(torch.bfloat16),
        "layer.transposed": torch.randn(4, 6, generator=gen).t(),  # not contiguous
        "layer.indices": torch.tensor([0, 3, 5], dtype=torch.int64),
        "layer.rows": embed[2:5],  # a view into another tensor's storage
    }


def _optimizer_state() -> dict:
    return {
        "state": {
            0: {
                "step": torch.tensor(7.0),
                "exp_avg": torch.randn(3, 2),
                "projector": {
                    "rank": 4,
                    "ortho": torch.randn(2, 4).to(torch.bfloat16),
                    "refreshes": [1, 2],
                },
            },
            1: {"step": torch.tensor(7.0), "exp_avg_sq": torch.rand(5)},
        },
        "param_groups": [
            {"lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "params": [0, 1], "name": None}
        ],
    }


def _save(root: Path, step: int, keep_last: int = 10, **overrides) -> Path:
    kwargs = dict(
        model_state=_model_state(),
        optimizer_state=_optimizer_state(),
        trainer_state={"step": step, "tokens": step * 1024, "rng": ckpt.capture_rng()},
        config_yaml=CONFIG,
        tokenizer_json=TOKENIZER,
        keep_last=keep_last,
    )
    kwargs.update(overrides)
    return ckpt.save_checkpoint(root, step, **kwargs)


def _assert_same(a, b) -> None:
    """Deep equality: tensors with torch.equal and the same dtype, containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_round_trip_keeps_every_part_and_dtype(tmp_path: Path) -> None:
    model, optimizer = _model_state(), _optimizer_state()
    trainer = {
        "step": 5,
        "tokens": 5120,
        "scheduler": {"last_epoch": 5, "base_lrs": [1e-3]},
        "loader": {"epoch": 0, "position": 4096},
        "rng": ckpt.capture_rng(),
    }
    path = ckpt.save_checkpoint(
        tmp_path,
        5,
        model_state=model,
        optimizer_state=optimizer,
        trainer_state=trainer,
        config_yaml=CONFIG,
        tokenizer_json=TOKENIZER,
        keep_last=2,
    )
    assert path == tmp_path / "step-00000005"
    loaded = ckpt.load_checkpoint(path)
    assert loaded.path == path and loaded.step == 5 and loaded.config_yaml == CONFIG
    _assert_same({k: v.contiguous() for k, v in model.items()}, loaded.model)
    assert loaded.model["layer.scale"].dtype == torch.bfloat16
    assert loaded.model["layer.codes"].dtype == torch.int8
    _assert_same(optimizer, loaded.optimizer)
    _assert_same(trainer, loaded.trainer)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 5
    assert set(manifest["files"]) == {
        "model.safetensors",
        "optimizer.pt",
        "trainer.pt",
        "config.yaml",
        "tokenizer.json",
    }
    assert {"torch", "transformers", "lowrank_train"} <= set(manifest["versions"])
    assert not list(tmp_path.glob(".tmp-*"))


def test_saved_files_load_with_weights_only(tmp_path: Path) -> None:
    path = _save(tmp_path, 1)
    for name in ("optimizer.pt", "trainer.pt"):
        torch.load(path / name, weights_only=True)  # raises UnpicklingError on numpy objects
    trainer = torch.load(path / "trainer.pt", weights_only=True)
    assert trainer["step"] == 1 and trainer["tokens"] == 1024


def test_saving_the_same_step_again_replaces_it(tmp_path: Path) -> None:
    _save(tmp_path, 3)
    path = _save(tmp_path, 3, config_yaml="name: second\n")
    assert ckpt.load_checkpoint(path).config_yaml == "name: second\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000003"]


def test_keep_last_keeps_the_newest(tmp_path: Path) -> None:
    for step in (10, 20, 30, 40):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000030", "step-00000040"]


def test_keep_last_counts_only_valid_checkpoints(tmp_path: Path) -> None:
    _save(tmp_path, 1, keep_last=5)
    _save(tmp_path, 2, keep_last=5)
    (tmp_path / "step-00000002" / "optimizer.pt").unlink()
    _save(tmp_path, 3, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001", "step-00000003"]


def test_keep_last_never_deletes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    newer = _save(tmp_path, 50)
    path = _save(tmp_path, 20, keep_last=1)  # e.g. resumed from an older checkpoint
    assert path.is_dir() and ckpt.verify_checkpoint(path) is None
    assert newer.is_dir()  # left alone (with a warning), not counted against keep_last


@pytest.mark.parametrize(
    "damage, reason_part",
    [
        ("truncate_model", "model.safetensors"),
        ("flip_byte_model", "model.safetensors: sha256 mismatch"),
        ("drop_manifest", "no manifest.json"),
        ("garble_manifest", "manifest.json unreadable"),
        ("drop_optimizer", "optimizer.pt missing"),
    ],
)
def test_damage_is_detected_and_refused_in_one_line(
    tmp_path: Path, damage: str, reason_part: str
) -> None:
    path = _save(tmp_path, 1)
    assert ckpt.verify_checkpoint(path) is None
    model = path / "model.safetensors"
    if damage == "truncate_model":
        with open(model, "r+b") as f:
            f.truncate(model.stat().st_size // 2)
    elif damage == "flip_byte_model":
        data = bytearray(model.read_bytes())
        data[-1] ^= 0xFF
        model.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (path / "manifest.json").unlink()
    elif damage == "garble_manifest":
        (path / "manifest.json").write_text('{"files": ')
    elif damage == "drop_optimizer":
        (path / "optimizer.pt").unlink()
    reason = ckpt.verify_checkpoint(path)
    assert reason is not None and reason_part in reason
    with pytest.raises(CheckpointError) as info:
        ckpt.load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and reason in message


def test_find_latest_skips_a_damaged_newer_checkpoint(tmp_path: Path) -> None:
    assert ckpt.find_latest(tmp_path / "absent") == (None, [])
    _save(tmp_path, 1)
    good = _save(tmp_path, 2)
    bad = _save(tmp_path, 3)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(10)
    (tmp_path / ".tmp-step-00000004-abc").mkdir()  # a save that never finished
    latest, skipped = ckpt.find_latest(tmp_path)
    assert latest == good
    assert len(skipped) == 1 and skipped[0][0] == bad and "model.safetensors" in skipped[0][1]


def test_interrupted_save_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _save(tmp_path, 2)

    def crash(*args, **kwargs):
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 3)
    monkeypatch.undo()
    assert not (tmp_path / "step-00000003").exists()
    assert not list(tmp_path.glob(".tmp-*"))  # a failed save cleans up after itself
    assert ckpt.verify_checkpoint(good) is None
    assert ckpt.find_latest(tmp_path) == (good, [])


def test_interrupted_replace_of_the_same_step_keeps_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _save(tmp_path, 2)
    real_rename, calls = os.rename, []

    def second_rename_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old dir was moved away; moving the new one in fails
            raise OSError("simulated crash during rename")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="simulated crash"):
        _save(tmp_path, 2, config_yaml="name: replacement\n")
    monkeypatch.undo()
    assert ckpt.load_checkpoint(good).config_yaml == CONFIG


def test_stale_temporary_directories_are_removed_by_the_next_save(tmp_path: Path) -> None:
    stale = tmp_path / ".tmp-step-00000009-xyz"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    _save(tmp_path, 1)
    assert not stale.exists()


def _draw() -> tuple:
    return (
        random.random(),
        random.gauss(0, 1),
        np.random.rand(3).tolist(),
        np.random.standard_normal(),
        torch.rand(4),
        torch.randn(2),
    )


def test_rng_capture_restore_reproduces_draws(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leave a cached gaussian in python's and numpy's state
    np.random.standard_normal()
    state = ckpt.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    first = _draw()
    _draw()  # move every generator on
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = _draw()
    _assert_same(first[:4], second[:4])
    assert torch.equal(first[4], second[4]) and torch.equal(first[5], second[5])
