"""`lost`: a low-rank path from the top of the dense init's spectrum plus a channel-wise sparse
block from the rest, mixed by gamma (Li et al. 2025, arXiv 2508.02668).

    y = gamma B phi(A x) + (1 - gamma) W_s x_I (+ b)      B (out, r), A (r, in), W_s (out, k)

The paper's exact form is not public (its repository could not be retrieved): this is the
reconstruction of research/parameterizations.md 3, built from the paper's text, its reviews
and the first author's development code. At init, with W0 = U S V^T the SVD of the dense draw
(in its fp32, on the device it arrives on):
  * W_r = U_r S_r V_r^T (top r) gives B = U_r S_r^(1/2) / sqrt(gamma), A = S_r^(1/2) V_r^T / sqrt(gamma);
  * the complement W_c = sum of the next k_s triplets (`complement_rank`; 0 = all the rest, as the
    paper says; the development code takes 256) scores each input channel j by ||W_c[:, j]||_2;
    I = the k = max(1, int(rho in)) best channels (ties to the lower index), sorted, stored int32;
  * W_s = W_c[:, I] / (1 - gamma) (`sparse_values: complement`, the issue's "the complement's
    channel-wise sparse part"), or W0[:, I] / (1 - gamma) (`dense`, the development code).
Dividing each path by its weight is ours (as lowrank's svd init divides by s): the layer starts
at W_r + W_c[:, I] whatever gamma is, so with phi off, k_s = all and rho = 1 it is the dense init
exactly; the development code starts at gamma W_r + (1 - gamma) W0[:, I]. phi: `activation`
none (the development code's LOST branch) or silu (the paper's "nonlinearity placement"
ablation, CoLA-style); `sparse_ratio: 0` drops the sparse path, so each part can be isolated.
A, B and W_s train; I and gamma are fixed. Only A and B are offered to a projector: W_s is
(out, k) with k = rho in (25 columns at 60M), below the projectors' ranks, so projecting it
would compress nothing.

Stored: p_w (r (m + n) + m k) + 4 k bytes. dense_weight (phi = none): gamma B A, then
W[:, I] += (1 - gamma) W_s; with silu there is none, and export refuses in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError, UserError
from lowrank_train.parameterizations.base import PARAMETERIZATIONS, Parameterization
from lowrank_train.parameterizations.lowrank import LowRankLinear, min_target_dim
from lowrank_train.parameterizations.sparse import INDEX_DTYPE, index_buffer


class LOSTLinear(LowRankLinear):
    """y = gamma B act(A x) + (1 - gamma) W_s x[..., channels] + b; without W_s, the low-rank path alone."""

    def __init__(
        self,
        A: Tensor,
        B: Tensor,
        W_s: Tensor | None,
        channels: Tensor | None,
        bias: Tensor | None,
        gamma: float,
        activation: str,
    ):
        super().__init__(A, B, bias, gamma, activation)  # the low-rank path: scale = gamma
        self.W_s = nn.Parameter(W_s) if W_s is not None else None
        self.register_buffer("channels", channels)  # persistent: checkpoints hold I as it is
        self.gamma = gamma

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.W_s is None:
            return y
        return y + F.linear(x.index_select(-1, self.channels), self.W_s) * (1 - self.gamma)

    def dense_weight(self) -> Tensor:
        if self.activation != "none":
            raise UserError(
                "a lost layer with weights.activation=silu has no dense weight (the SiLU sits "
                "inside the low-rank path): it cannot be exported as a dense model"
            )
        # in fp32 at least, cast at the end: the two paths summed in bf16 would round twice
        wide = torch.promote_types(self.A.dtype, torch.float32)
        W = (self.B.to(wide) @ self.A.to(wide)) * self.gamma
        if self.W_s is not None:
            W.index_add_(1, self.channels, self.W_s.to(wide) * (1 - self.gamma))
        return W.to(self.A.dtype)

    def extra_repr(self) -> str:
        k = self.channels.numel() if self.channels is not None else 0
        return f"{super().extra_repr()}, gamma={self.gamma}, channels={k}"


def channel_count(n: int, ratio: float) -> int:
    """k = max(1, int(rho n)) input channels (the development code's rule); 0 when rho = 0."""
    return max(1, int(ratio * n)) if ratio > 0 else 0


@PARAMETERIZATIONS.register
class LOST(Parameterization):
    """Top-r SVD low-rank path plus a channel-sparse block of the complement, mixed by gamma (LOST)."""

    name = "lost"

    @dataclass
    class Config:
        rank: int = knob(128, "rank r of the low-rank path (the top-r SVD of the dense init)")
        sparse_ratio: float = knob(
            0.05, "rho: the sparse block holds max(1, int(rho * in)) input channels; 0 = no block"
        )
        sparse_values: Literal["complement", "dense"] = knob(
            "complement", "the block's columns from the SVD complement or from the dense init"
        )
        complement_rank: int = knob(
            0, "k_s: singular triplets after the top r forming the complement; 0 = all of them"
        )
        gamma: float = knob(0.5, "gamma in y = gamma B phi(A x) + (1 - gamma) W_s x_I, in (0, 1)")
        activation: Literal["none", "silu"] = knob(
            "none", "phi inside the low-rank path: none or silu (silu: no dense W, no export)"
        )

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> LOSTLinear:
        o = self.options
        m, n, r = linear.out_features, linear.in_features, o.rank
        k = channel_count(n, o.sparse_ratio)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        if linear.weight.device.type == "meta":  # a structural build: shapes only
            A, B = torch.empty(r, n, device="meta"), torch.empty(m, r, device="meta")
            W_s = torch.empty(m, k, device="meta") if k else None
            channels = torch.empty(k, dtype=INDEX_DTYPE, device="meta") if k else None
        else:
            A, B, W_s, channels = self._split(linear.weight.detach(), k)
        cast = (t.to(dtype) if t is not None else None for t in (A, B, W_s))
        return LOSTLinear(*cast, channels, bias, o.gamma, o.activation)

    def _split(self, W0: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(A, B, W_s, I) of the module docstring from the dense init W0 (out, in)."""
        o = self.options
        r, g = o.rank, o.gamma
        U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
        root = (S[:r] / g).sqrt()
        B, A = U[:, :r] * root, root[:, None] * Vh[:r]
        if not k:
            return A, B, None, None
        end = r + o.complement_rank if o.complement_rank else S.numel()
        Uc, Sc, Vc = U[:, r:end], S[r:end], Vh[r:end]
        scores = (Sc[:, None] * Vc).norm(dim=0)  # ||W_c[:, j]||: U_c has orthonormal columns
        chosen = torch.argsort(scores, descending=True, stable=True)[:k].sort().values
        source = (Uc * Sc) @ Vc[:, chosen] if o.sparse_values == "complement" else W0[:, chosen]
        return A, B, source / (1 - g), index_buffer(chosen, W0.shape[1])

    def validate(self, cfg) -> None:
        o = self.options
        if o.rank < 1:
            raise ConfigError(f"weights.rank: {o.rank} must be >= 1")
        if not 0 <= o.sparse_ratio <= 1:
            raise ConfigError(f"weights.sparse_ratio: {o.sparse_ratio} must be in [0, 1]")
        if not 0 < o.gamma < 1:
            raise ConfigError(f"weights.gamma: {o.gamma} must be in (0, 1)")
        if o.complement_rank < 0:
            raise ConfigError(f"weights.complement_rank: {o.complement_rank} must be >= 0")
        smallest = min_target_dim(cfg)
        if o.rank > smallest:
            raise ConfigError(
                f"weights.rank: {o.rank} is above the smallest dimension of the targeted layers "
                f"({smallest}): the SVD has only {smallest} triplets there"
            )
