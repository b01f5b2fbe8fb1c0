"""`lowrank`: W = s B A, B (out, r), A (r, in), trained as two factors; no dense W in forward.

    y = s * B (A x)            (activation: none; GaLore's "Low-Rank" baseline)
    y = s * B silu(A x)        (activation: silu; CoLA, arXiv 2502.10940)

Inits (research/parameterizations.md 1.1, 1.3), all drawn in fp32 from the layer's generator:
  * variance: each factor N(0, sigma_f^2) with sigma_f = (sigma^2 / (r s^2))^(1/4), so s B A has
    the dense init's entry variance sigma^2 = 0.02^2 (LORO's "auto");
  * svd: the top-r SVD of the dense draw, B = U_r S_r^(1/2) / sqrt(s), A = S_r^(1/2) V_r^T / sqrt(s)
    (keeps the leading spectrum, part of the energy; at full rank it is the dense layer exactly);
  * cola: both factors N(0, sigma_c^2), sigma_c = r^(-1/4) (m + n)^(-1/4) (CoLA's code).
With the SiLU between the factors there is no dense W: export refuses such a layer in one line.
Stored: p_w r (m + n) bytes (+ p_w m for a bias), against p_w m n dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError, UserError
from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)

DENSE_STD = 0.02  # LLaMA's initializer_range: the variance the "variance" init matches


class LowRankLinear(ParameterizedLinear):
    """y = s B act(A x) + b with A (r, in) and B (out, r)."""

    def __init__(self, A: Tensor, B: Tensor, bias: Tensor | None, scale: float, activation: str):
        super().__init__()
        self.out_features, self.in_features = B.shape[0], A.shape[1]
        self.A, self.B = nn.Parameter(A), nn.Parameter(B)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.scale, self.activation = scale, activation

    def forward(self, x: Tensor) -> Tensor:
        h = F.linear(x, self.A)
        if self.activation == "silu":
            h = F.silu(h)
        y = F.linear(h, self.B) * self.scale
        return y + self.bias if self.bias is not None else y

    def dense_weight(self) -> Tensor:
        if self.activation != "none":
            raise UserError(
                "a lowrank layer with weights.activation=silu has no dense weight (the SiLU sits "
                "between the factors): it cannot be exported as a dense model"
            )
        return (self.B @ self.A) * self.scale

    def projectable(self) -> dict[str, nn.Parameter]:
        return {"A": self.A, "B": self.B}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.A.shape[0]}, scale={self.scale}, activation={self.activation}"
        )


@PARAMETERIZATIONS.register
class LowRank(Parameterization):
    """W = s B A as two trained factors (GaLore's low-rank baseline; CoLA with activation silu)."""

    name = "lowrank"

    @dataclass
    class Config:
        # the GaLore paper's ranks: 128 / 256 / 256 / 512 (60M..1B), 1024 at 7B
        rank: int = knob(128, "rank r of W = s B A")
        scale: float = knob(1.0, "s in W = s B A")
        init: Literal["variance", "svd", "cola"] = knob(
            "variance", "variance-matched factors, the top-r SVD of the dense draw, or CoLA's"
        )
        activation: Literal["none", "silu"] = knob(
            "none", "between the factors: none (W = s B A) or silu (CoLA: y = s B silu(A x))"
        )

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> LowRankLinear:
        o = self.options
        m, n = linear.out_features, linear.in_features
        r = o.rank
        bias = linear.bias.detach() if linear.bias is not None else None
        if linear.weight.device.type == "meta":  # a structural build: shapes only
            A, B = torch.empty(r, n, device="meta"), torch.empty(m, r, device="meta")
        elif o.init == "svd":
            u, s, vh = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
            root = (s[:r] / o.scale).sqrt()
            B, A = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
        else:
            std = (
                (DENSE_STD**2 / (r * o.scale**2)) ** 0.25
                if o.init == "variance"
                else (r * (m + n)) ** -0.25
            )
            A = torch.randn(r, n, generator=gen) * std
            B = torch.randn(m, r, generator=gen) * std
        return LowRankLinear(A, B, bias, o.scale, o.activation).to(dtype)  # drawn in fp32

    def validate(self, cfg) -> None:
        o = self.options
        if o.rank < 1:
            raise ConfigError(f"weights.rank: {o.rank} must be >= 1")
        if not o.scale > 0:
            raise ConfigError(f"weights.scale: {o.scale} must be > 0")
        smallest = min_target_dim(cfg)
        if o.rank > smallest:
            raise ConfigError(
                f"weights.rank: {o.rank} is above the smallest dimension of the targeted layers "
                f"({smallest}): the factors would hold more than the dense W"
            )
        if o.init == "svd" and o.activation != "none":
            raise ConfigError(
                "weights.init: svd factors a dense W, which weights.activation=silu does not "
                "have; use init variance or cola"
            )


def min_target_dim(cfg) -> int:
    """The smallest side of the targeted Linears (q/k/v/o: hidden; the MLP: hidden, intermediate)."""
    from lowrank_train.models import PRESETS  # lazily: models imports this package's registry

    shape = PRESETS[cfg.model.preset]
    hidden = cfg.model.hidden_size or shape.hidden
    intermediate = cfg.model.intermediate_size or shape.intermediate
    mlp = {"gate_proj", "up_proj", "down_proj"}
    return min(min(hidden, intermediate) if t in mlp else hidden for t in cfg.weights.target)
