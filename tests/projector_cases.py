"""Shared drivers of the projector tests: a ProjectedOptimizer stepping one small matrix through
given gradients, in float64, so each test compares with its own float64 re-implementation of
the paper's equations (written inside the test)."""

from __future__ import annotations

import json
import math

import safetensors.torch
import torch

from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.base import BASIS_EVENTS


def gradients(shape: tuple[int, int], steps: int, seed: int = 0) -> list[torch.Tensor]:
    """Random float64 gradients with a decaying spectrum (a dominant subspace, like real ones)."""
    gen = torch.Generator().manual_seed(seed)
    m, n = shape
    d = min(m, n)
    base_u = torch.linalg.qr(torch.randn(m, d, generator=gen, dtype=torch.float64))[0]
    base_v = torch.linalg.qr(torch.randn(n, d, generator=gen, dtype=torch.float64))[0]
    spectrum = torch.logspace(0, -2, d, dtype=torch.float64)
    out = []
    for _ in range(steps):
        core = base_u @ torch.diag(spectrum) @ base_v.T
        out.append(core + 0.05 * torch.randn(m, n, generator=gen, dtype=torch.float64))
    return out


def initial_weight(shape, std: float = 0.1, seed: int = 3) -> torch.Tensor:
    """A random float64 weight of entry std `std` (Flora's tests take 0.02: above the 1e-3
    floor of its relative step, at an LLM weight's scale)."""
    gen = torch.Generator().manual_seed(seed)
    return std * torch.randn(shape, generator=gen, dtype=torch.float64)


def run_projector(
    name: str,
    grads: list[torch.Tensor],
    *,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    state_dtype: str = "auto",
    w0: torch.Tensor | None = None,
    seed: int = 0,
    **options,
) -> tuple[list[torch.Tensor], ProjectedOptimizer]:
    """Weights after each step (float64) and the optimizer, for gradients fed in order."""
    cls = PROJECTORS.get(name)
    shape = grads[0].shape
    w = torch.nn.Parameter(
        w0.clone() if w0 is not None else torch.zeros(shape, dtype=grads[0].dtype)
    )
    opt = ProjectedOptimizer(
        [{"params": [w], "param_names": ["layer.weight"]}],
        cls(cls.Config(**options), seed=seed),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        state_dtype=state_dtype,
    )
    history = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        history.append(w.detach().clone())
    return history, opt


# -- the tiny model through the CLI ---------------------------------------------------------------


def cli(path, *args: str) -> int:
    from lowrank_train.cli import main

    return main(["train", str(path), "--samples", "0", *args])


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir) if "loss" in m}


def refresh_steps(run_dir) -> list[int]:
    return sorted({e["step"] for e in metrics(run_dir) if e.get("event") in BASIS_EVENTS})


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    from lowrank_train.checkpoint import MODEL_FILE, find_latest

    path, _ = find_latest(run_dir / "checkpoints")
    return safetensors.torch.load_file(str(path / MODEL_FILE))


def assert_resume_is_bitwise(tiny_run, extra: dict, stop_at: int, refreshes=None):
    """A run straight through and one stopped at `stop_at` then resumed (`--resume latest`)
    log the same losses (and refreshes, where given) and end with the same weights, bitwise.
    `extra` must save a checkpoint at `stop_at`. Returns the two run directories."""
    straight, split = tiny_run("straight", extra), tiny_run("split", extra)
    assert cli(straight) == 0
    assert cli(split, f"train.stop_at={stop_at}") == 0
    assert cli(split, "--resume", "latest") == 0
    runs = straight.parent / "runs"
    a_dir, b_dir = runs / "straight", runs / "split"
    assert train_losses(b_dir) == train_losses(a_dir)
    if refreshes is not None:
        assert refresh_steps(a_dir) == refresh_steps(b_dir) == refreshes
    a, b = final_weights(a_dir), final_weights(b_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a_dir, b_dir


def assert_short_run_learns(tiny_run, name: str, extra: dict, steps: int = 30) -> dict:
    """`steps` of batch 8 at lr 1e-2 on real text end with a validation loss more than one nat
    below ln(vocab) = ln(512), where an untrained model sits; returns the run's summary."""
    run = {"train": {"steps": steps, "batch_size": 8, "warmup_steps": 5, "lr": 1e-2}}
    path = tiny_run(name, {**run, "logging": {"every": 10}, **extra})
    assert cli(path) == 0
    summary = json.loads((path.parent / "runs" / name / "summary.json").read_text())
    assert summary["final_val_loss"] < math.log(512) - 1.0, summary
    return summary
