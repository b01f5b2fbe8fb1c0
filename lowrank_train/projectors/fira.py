"""Fira (Chen et al. 2024, arXiv 2410.01623), as its official code does it (research section 4).

GaLore's low-rank Adam (SVD basis B on the smaller side, refresh every T, moments kept), plus
the full-rank residual scaled channel by channel. Right side when m >= n (B is n x r, N and R
are m x r, the m channels are their rows); left otherwise (B is m x r, N and R are r x n, the n
channels are their columns). Per step t, with R = down(G) and N = M / (sqrt(V) + eps):
    phi_i = ||N_i|| / (||R_i|| + 1e-8)            over the D channels
    E = G - a_r back(R)                           residual (back(X) = X B^T or B X)
    S = diag(phi) E                               (columns scaled in the left case)
    S <- S / (max(||S|| / ||S_prev||, gamma) / gamma),  ||S_prev|| <- ||S||   (the limiter)
    W <- W - lr c_t (alpha back(N) + a_s S);      then W <- W - lr wd W
`alpha_placement: code` (the default) is the official code: a_r = alpha (its project-back
carries alpha, so a (1 - alpha) share of the in-subspace gradient stays in the residual) and
a_s = 1. `paper` is Algorithm 1 (Eqs. 9-12): a_r = 1 (E = (I - B B^T) G for an orthonormal B)
and G~ = alpha (back(N) + S), i.e. a_s = alpha. The two differ whenever alpha != 1.

The limiter's previous norm is `state["limiter_norm"]` (0-d fp32; the first step only records
it, as the code); neither it nor the moments are touched at a refresh. N is the moment ratio
before bias correction (the code's); phi is a ratio, so c_t scales S and the projected part
alike. The residual is an m x n temporary of each tensor of a batched run (bounded by the
run's budget, `runs`), at the gradient's precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError
from lowrank_train.projectors.base import PROJECTORS, State, SVDOptions, limiter_factors
from lowrank_train.projectors.galore import SVDProjector

RATIO_EPS = 1e-8  # the codes' guard of ||R_i|| in the channel scales


def channel_norms(low: Tensor, side: str, dtype: torch.dtype) -> Tensor:
    """||X_i|| over the D channels of a low-rank (or m x n) tensor, shaped to broadcast over
    the m x n gradient: rows of an m x r tensor (m, 1) on the right, columns of an r x n one
    (1, n) on the left; a stack of them (b, ...) gives (b, m, 1) or (b, 1, n)."""
    dim = -1 if side == "right" else -2
    return torch.linalg.vector_norm(low, dim=dim, keepdim=True, dtype=dtype)  # no upcast copy


def scale_dtype(grad: Tensor) -> torch.dtype:
    """The scales' precision: fp32 at least (bf16 norms are coarse), float64 for float64."""
    return torch.promote_types(grad.dtype, torch.float32)


def check_gamma(gamma: float) -> None:
    if not (math.isfinite(gamma) and gamma >= 1):
        raise ConfigError(
            f"optim.projector.gamma: {gamma} must be a finite number >= 1 (the limiter's "
            "allowed growth of the update norm per step; the papers use 1.01)"
        )


@PROJECTORS.register
class Fira(SVDProjector):
    """GaLore plus the full-rank residual, scaled per channel by Adam's norm ratio, limited."""

    name = "fira"

    @dataclass
    class Config(SVDOptions):
        # official C4 scripts: r 128/256/256/512/64 (60M/130M/350M/1B/7B), T 200 (7B 500),
        # alpha 0.25 below 1B and 0.0625 at 1B and 7B, gamma 1.01 everywhere
        rank: int = knob(128, "rank r of the projected gradient")
        update_gap: int = knob(200, "T: steps between SVD refreshes")
        scale: float = knob(0.25, "alpha: W <- W - lr * (alpha * N B^T + S) (code placement)")
        gamma: float = knob(1.01, "limiter: ||S_t|| at most gamma * ||S_(t-1)||")
        alpha_placement: Literal["code", "paper"] = knob(
            "code",
            "code: residual G - alpha R B^T, S unscaled; paper: residual G - R B^T and "
            "alpha (N B^T + S)",
        )

    def check(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().check(shapes)
        check_gamma(self.options.gamma)

    def placement(self) -> tuple[float, float]:
        """(a_r, a_s): alpha in the residual and on S (the module docstring)."""
        alpha = self.options.scale
        return (1.0, alpha) if self.options.alpha_placement == "paper" else (alpha, 1.0)

    def limited_residuals(
        self, low_update: Tensor, low_grad: Tensor, grads: list[Tensor], states: list[State]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(E_i, k_i) with S_i = k_i E_i the limited residual of each tensor of a run (N, R
        stacked (b, ...)): E_i = G_i - a_r back(R_i) by one GEMM onto G_i, in G's dtype, and
        k_i = phi_i / factor_i its channel scales (fp32 math, in G's dtype). The limiter reads
        ||diag(phi) E||_F = sqrt(sum_c phi_c^2 ||E_c||^2) from E's channel norms, so E is never
        scaled in place: the caller applies k with its own pass (W += a k E by one addcmul_)."""
        side, dtype = states[0]["side"], scale_dtype(grads[0])
        phi = channel_norms(low_update, side, dtype) / (
            channel_norms(low_grad, side, dtype) + RATIO_EPS
        )
        a_r, _ = self.placement()
        residuals = [
            self.add_back(g, r, s, -a_r)
            for g, r, s in zip(grads, low_grad.unbind(0), states, strict=True)
        ]
        residual_norms = torch.stack([channel_norms(e, side, dtype) for e in residuals])
        norms = torch.linalg.vector_norm(phi * residual_norms, dim=(-2, -1))
        factors = limiter_factors(norms, states, self.options.gamma)
        scales = (phi / factors[:, None, None]).to(grads[0].dtype).unbind(0)
        return residuals, list(scales)

    def up(self, low_update: Tensor, low_grad: Tensor, grad: Tensor, state: State) -> Tensor:
        """a_s S + alpha back(N) (the paper: alpha (back(N) + S)), onto S by one GEMM."""
        _, a_s = self.placement()
        [e], [k] = self.limited_residuals(low_update[None], low_grad[None], [grad], [state])
        limited = e.mul_(k * a_s)
        return self.add_back(limited, low_update, state, self.options.scale, inplace=True)

    def add_up_many_(self, params, low_update, low_grad, grads, states, alpha) -> None:
        """W_i += alpha (a_s k_i E_i + scale back(N_i)): S added by one addcmul_ a tensor
        (multi-tensor), back(N_i) by one GEMM into W_i."""
        _, a_s = self.placement()
        residuals, scales = self.limited_residuals(low_update, low_grad, grads, states)
        torch._foreach_addcmul_(params, residuals, scales, value=alpha * a_s)
        del residuals
        for param, n, state in zip(params, low_update.unbind(0), states, strict=True):
            self.add_back(param, n, state, alpha * self.options.scale, inplace=True)

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """GaLore's 2 moments of D x r and the d x r basis, plus the limiter's fp32 norm."""
        return super().state_bytes(shape, state_dtype, param_bytes) + 4
