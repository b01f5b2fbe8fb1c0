"""Shared drivers of the projector tests: a ProjectedOptimizer stepping one small matrix through
given gradients, in float64, so each test compares with its own float64 re-implementation of
the paper's equations (written inside the test)."""

from __future__ import annotations

import torch

from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.projectors import PROJECTORS


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
