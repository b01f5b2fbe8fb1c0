"""APOLLO and APOLLO-Mini (Zhu et al. 2024, arXiv 2412.05270), as the official code does them
(research section 6).

The projection only estimates how much Adam would rescale each channel; the update is the
rescaled full raw gradient. Right side when m >= n (B = P^T is n x r, R and N are m x r, the m
channels are their rows); left otherwise (B is m x r, R and N are r x n, the n channels are
their columns). Per step t:
    if (t-1) mod T == 0: B ~ N(0, 1/r), drawn from (run seed, tensor name, resample index)
    R = down(G);  Adam moments on R (kept across a resample);  N = M / (sqrt(V) + eps)
    apollo:       s_i = ||N_i|| / (||R_i|| + 1e-8) per channel,  U = diag(s) G
    apollo_mini:  s = ||N||_F / (||R||_F + 1e-8) (rank 1, one scale),  U = s G
    U <- U / (max(||U|| / ||U_prev||, gamma) / gamma),  ||U_prev|| <- ||U||   (the limiter)
    W <- W - lr c_t alpha U;  then W <- W - lr wd W
`scale` is alpha, the multiplier of the update as research writes it. The official code
multiplies by sqrt(its --scale): APOLLO's --scale 1 is alpha 1, APOLLO-Mini's --scale 128 is
alpha = sqrt(128) = 11.3137 (130M: --scale 192, alpha 13.8564).

Where the code and the paper differ:
- The code stores P in the optimizer state (so does this module: `state["basis"]`, in the
  parameter's dtype, so the shared machinery rotates or checks it like any basis); the paper
  means P to be regenerated from its seed and not stored. Not offered: a resample here is
  reproducible from (seed, name, index) anyway, bit for bit.
- The code decays the updated weight (W <- W - lr wd W after the step); the paper's Algorithm 1
  decays the pre-update one (W_t = W_(t-1) - lr alpha U - lr wd W_(t-1)): `decay_on`.
- The code keeps the moments at a resample although the new P is independent of the old
  (the paper is silent): `moments_at_refresh` keep is the default; reset is the clean choice.
- Seeds: the code seeds each matrix by its index among the parameters and advances the seed per
  resample; here the seed is derived from (run seed, tensor name, resample index), drawn on the
  CPU, so it does not depend on the parameter order or the device.
`scale_front` (sqrt(scale) applied before the limiter) is not a key: the limiter compares norms
of successive updates, so both orders give the same update (up to the 1e-8 guards).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError
from lowrank_train.projectors.base import (
    PROJECTORS,
    LowRankAdam,
    LowRankOptions,
    State,
    limiter_factors,
)
from lowrank_train.projectors.fira import RATIO_EPS, channel_norms, check_gamma, scale_dtype
from lowrank_train.projectors.subspace import gaussian_basis


@PROJECTORS.register
class Apollo(LowRankAdam):
    """The raw gradient rescaled per channel by Adam's norm ratio on a random rank-r projection."""

    name = "apollo"
    tensor_wise = False  # one scale per channel (APOLLO-Mini: one per tensor)
    basis_event = "resample"  # the projection is a seeded Gaussian draw

    @dataclass
    class Config(LowRankOptions):
        # official C4 scripts: r 128/192/256/256/256 (60M/130M/350M/1B/7B), T 200,
        # --scale 1 (alpha 1), gamma 1.01, random projection, channel-wise scaling
        rank: int = knob(256, "rank r of the random projection")
        update_gap: int = knob(200, "T: steps between resamples of the projection")
        scale: float = knob(1.0, "alpha: W <- W - lr * alpha * U (the code's sqrt(--scale))")
        gamma: float = knob(1.01, "limiter: ||U_t|| at most gamma * ||U_(t-1)||")
        decay_on: Literal["updated", "previous"] = knob(
            "updated",
            "weight decay of the updated weight (the code) or of the previous one (the paper)",
        )

    @property
    def decay_after_update(self) -> bool:  # type: ignore[override]
        return self.options.decay_on == "updated"

    def check(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().check(shapes)
        check_gamma(self.options.gamma)

    def new_basis(self, grad: Tensor, state: State) -> Tensor:
        """B = P^T, (d, r) with entries N(0, 1/r), from (seed, name, resample index)."""
        d = min(grad.shape)
        rank = self.options.rank
        return gaussian_basis(d, rank, self.seed, state["name"], state["refreshes"], grad.device)

    def scales(self, low_update: Tensor, low_grad: Tensor, side: str, dtype) -> Tensor:
        """s_i = ||N_i|| / (||R_i|| + 1e-8) of a run's stacked N and R: (b, m, 1) on the right,
        (b, 1, n) on the left."""
        return channel_norms(low_update, side, dtype) / (
            channel_norms(low_grad, side, dtype) + RATIO_EPS
        )

    def update_(self, param, grad, state, step, hp, low_grad=None) -> None:
        """One tensor through `update_many_`: the same arithmetic whether a tensor steps alone
        (per-layer mode) or with its group (the whole-model step), bit for bit on the CPU."""
        if low_grad is not None:  # resolve refuses projected accumulation: APOLLO reads all of G
            raise ValueError("APOLLO's update reads the full gradient, not a projected sum")
        self.update_many_([(param, grad, state, step)], hp)

    def update_many_(self, items: list[tuple[Tensor, Tensor, State, int]], hp: dict) -> None:
        """W <- W - lr k G for a group's tensors (`coefficients`), one addcmul_ each."""
        for run in self.runs(items):
            params = [p for p, _, _, _ in run]
            grads = [g.to(p.dtype) for (p, g, _, _) in run]
            ks = self.coefficients(run, hp, [p.dtype for p in params])
            self.decay_many_(params, hp, before_update=True)
            torch._foreach_addcmul_(params, grads, ks, value=-hp["lr"])
            self.decay_many_(params, hp, before_update=False)

    def directions(self, items, hp: dict) -> Iterator[Tensor]:
        """k G for each writer's tensor in the items' order, one at a time (every run's small
        `coefficients` first: the runs group the items by shape)."""
        ks: dict[int, Tensor] = {}
        for run in self.runs(items):
            dtypes = [g.dtype for _, g, _, _ in run]
            for (_, _, state, _), k in zip(run, self.coefficients(run, hp, dtypes), strict=True):
                ks[id(state)] = k
        for _, grad, state, _ in items:
            yield grad * ks.pop(id(state))

    def coefficients(self, items, hp: dict, dtypes: list[torch.dtype]) -> list[Tensor]:
        """k_i with c_t alpha U_i = k_i G_i, for each (weight, grad, state, step) of a run
        (`runs`), the step's small ops batched across it: the Adam step on the stacked
        R (`moments_step_many`), the scales on the stacked N and R, and the limiter, which reads
        ||s G||_F from G's channel norms and the scales (s ||G||_F for APOLLO-Mini, sqrt(sum_i
        s_i^2 ||G_i||^2) per channel), once on the run's norms. Per tensor remain R = down(G)
        and G's norms. The same update as the per-tensor form up to rounding (the norm is of G
        in fp32, not of the rounded s G). `dtypes`: each k's dtype (the tensor it multiplies)."""
        grads = [g for _, g, _, _ in items]
        states = [s for _, _, s, _ in items]
        low_update, low_grad, correction = self.moments_step_many(grads, states, hp)
        side, dtype = states[0]["side"], scale_dtype(grads[0])
        scales = self.scales(low_update, low_grad, side, dtype)  # (b, m, 1), (b, 1, n), (b, 1, 1)
        if self.tensor_wise:
            g_norms = torch.stack(torch._foreach_norm(grads, 2, dtype=dtype))[:, None, None]
        else:
            dim = 1 if side == "right" else 0
            g_norms = torch.stack(
                [torch.linalg.vector_norm(g, dim=dim, keepdim=True, dtype=dtype) for g in grads]
            )
        norms = torch.linalg.vector_norm(scales * g_norms, dim=(-2, -1))
        factors = limiter_factors(norms, states, self.options.gamma)
        coef = (scales * (self.options.scale * correction / factors)[:, None, None]).unbind(0)
        return [c.to(d) for c, d in zip(coef, dtypes, strict=True)]

    def direction(self, param, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """k G, through `directions` (one tensor's group)."""
        return next(self.directions([(param, grad, state, step)], hp))

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """2 moments of D x r, the stored d x r projection (the code's choice; the paper would
        store only the seed) and the limiter's fp32 norm."""
        return super().state_bytes(shape, state_dtype, param_bytes) + 4


@PROJECTORS.register
class ApolloMini(Apollo):
    """APOLLO at rank 1 with one scale per tensor (the norm ratio of Adam on a random vector)."""

    name = "apollo_mini"
    tensor_wise = True

    @dataclass
    class Config(Apollo.Config):
        # official C4 scripts: r 1, T 200, --scale 128 (alpha sqrt(128) = 11.3137; 60M and
        # 130M with --scale_front, 130M --scale 192: alpha 13.8564), tensor-wise scaling
        rank: int = knob(1, "rank of the random projection: 1 (tensor-wise scaling)")
        scale: float = knob(11.3137, "alpha: W <- W - lr * alpha * U (the code's sqrt(--scale))")

    def check(self, shapes: dict[str, tuple[int, int]]) -> None:
        if self.options.rank != 1:
            raise ConfigError(
                f"optim.projector.rank: {self.options.rank} is not allowed: apollo_mini is "
                "rank 1 (tensor-wise scaling; apollo is the channel-wise method at rank r)"
            )
        super().check(shapes)

    def scales(self, low_update: Tensor, low_grad: Tensor, side: str, dtype) -> Tensor:
        """s = ||N||_F / (||R||_F + 1e-8), one scale a matrix of the run: (b, 1, 1)."""
        n = torch.linalg.vector_norm(low_update, dim=(-2, -1), keepdim=True, dtype=dtype)
        r = torch.linalg.vector_norm(low_grad, dim=(-2, -1), keepdim=True, dtype=dtype)
        return n / (r + RATIO_EPS)
