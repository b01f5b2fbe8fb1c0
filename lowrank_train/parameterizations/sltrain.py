"""`sltrain`: W = (alpha / r) B A + S, S sparse on a fixed random support (Han et al. 2024,
arXiv 2406.02214; research/parameterizations.md 2).

    B (out, r), A (r, in), S = scatter(I, v): values v (nnz,) at the sorted row-major flat
    positions I (nnz,) of the (out, in) matrix, nnz = int(delta * out * in)

Init as the official code (splora/splora_linear.py): B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)),
v ~ U(-1/sqrt(in), 1/sqrt(in)), I the first nnz of a random permutation of the m n positions,
sorted; so at step 0 the layer is S alone (entry std sqrt(delta / (3 in)), below the dense
0.02: nothing in SLTrain matches the dense variance). The support is drawn first from the
layer's generator (seeded by run seed and layer name), then A, then v; I is a persistent int32
buffer, so a checkpoint holds it as it is and a resume keeps it.

Stored: p_w (r (m + n) + nnz) + 4 nnz bytes (values, factors; int32 indices). Forward and
backward form this layer's W and never keep it (sparse.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError
from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)
from lowrank_train.parameterizations.lowrank import min_target_dim
from lowrank_train.parameterizations.sparse import (
    INDEX_DTYPE,
    index_buffer,
    sparse_lowrank_linear,
    sparse_plus_lowrank,
)


class SLTrainLinear(ParameterizedLinear):
    """y = x (s B A + S)^T + b, S = scatter(index, values)."""

    def __init__(
        self, A: Tensor, B: Tensor, values: Tensor, index: Tensor, bias: Tensor | None, scale: float
    ):
        super().__init__()
        self.out_features, self.in_features = B.shape[0], A.shape[1]
        self.A, self.B, self.values = nn.Parameter(A), nn.Parameter(B), nn.Parameter(values)
        self.register_buffer("index", index)  # persistent: the support travels in checkpoints
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        y = sparse_lowrank_linear(x, self.A, self.B, self.values, self.index, self.scale)
        return (
            y + self.bias.to(y.dtype) if self.bias is not None else y
        )  # as F.linear under autocast

    def dense_weight(self) -> Tensor:
        # in fp32 at least, cast at the end: a bf16 sum of s B A and S would round twice
        wide = torch.promote_types(self.A.dtype, torch.float32)
        A, B, values = (t.to(wide) for t in (self.A, self.B, self.values))
        return sparse_plus_lowrank(A, B, values, self.index, self.scale).to(self.A.dtype)

    def projectable(self) -> dict[str, nn.Parameter]:
        # the values are a vector on a fixed support, not a matrix a projector can act on
        return {"A": self.A, "B": self.B}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.A.shape[0]}, scale={self.scale}, nnz={self.index.numel()}"
        )


def support_size(m: int, n: int, density: float) -> int:
    """nnz = int(delta m n), the official code's rule (Python int: rounds toward zero)."""
    return int(density * m * n)


@PARAMETERIZATIONS.register
class SLTrain(Parameterization):
    """W = (alpha/r) B A + S on a fixed random sparse support (SLTrain)."""

    name = "sltrain"

    @dataclass
    class Config:
        # the official scripts: rank 128 / 256 / 256 / 512 / 1024 and alpha 32 / 16 / 16 / 8 / 8
        # (60M..7B), delta 0.03 (0.05 at 7B)
        rank: int = knob(128, "rank r of the low-rank part B (out, r) A (r, in)")
        alpha: float = knob(32.0, "alpha in W = (alpha / r) B A + S")
        density: float = knob(0.03, "delta: S holds int(delta * out * in) entries, in (0, 1)")

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> SLTrainLinear:
        o = self.options
        m, n, r = linear.out_features, linear.in_features, o.rank
        nnz = support_size(m, n, o.density)
        bias = linear.bias.detach().to(dtype) if linear.bias is not None else None
        if linear.weight.device.type == "meta":  # a structural build: shapes only
            index = torch.empty(nnz, dtype=INDEX_DTYPE, device="meta")
            A, B, values = (
                torch.empty(s, dtype=dtype, device="meta") for s in ((r, n), (m, r), nnz)
            )
            return SLTrainLinear(A, B, values, index, bias, o.alpha / r)
        index = index_buffer(torch.randperm(m * n, generator=gen)[:nnz].sort().values, m * n)
        bound = n**-0.5  # kaiming_uniform_(a=sqrt(5)) on (r, n) is U(-1/sqrt(n), 1/sqrt(n))
        A = torch.empty(r, n).uniform_(-bound, bound, generator=gen)
        values = torch.empty(nnz).uniform_(-bound, bound, generator=gen)
        B = torch.zeros(m, r)
        return SLTrainLinear(A.to(dtype), B.to(dtype), values.to(dtype), index, bias, o.alpha / r)

    def validate(self, cfg) -> None:
        o = self.options
        if o.rank < 1:
            raise ConfigError(f"weights.rank: {o.rank} must be >= 1")
        if not o.alpha > 0:
            raise ConfigError(f"weights.alpha: {o.alpha} must be > 0")
        if not 0 < o.density < 1:
            raise ConfigError(f"weights.density: {o.density} must be in (0, 1)")
        smallest = min_target_dim(cfg)
        if o.rank > smallest:
            raise ConfigError(
                f"weights.rank: {o.rank} is above the smallest dimension of the targeted layers "
                f"({smallest}): B A would hold more than the dense W"
            )
        projector = cfg.optim.projector.name
        if projector in LIMITED_FROM_THE_FIRST_STEP:
            raise ConfigError(
                f"optim.projector.name: {projector} cannot train sltrain's A: B = 0 at init gives "
                "A a zero first gradient, and APOLLO's norm-growth limiter then holds every later "
                "update of A to gamma^t times that zero norm"
            )


# Projectors whose limiter bounds every update of a tensor by its first one (research
# projectors.md 6): with B = 0, A's first gradient is exactly zero, so A would never move.
LIMITED_FROM_THE_FIRST_STEP = ("apollo", "apollo_mini")
