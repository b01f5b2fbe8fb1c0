"""`dense`: the plain weight W (out, in), trained as it is. The baseline every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)


class DenseLinear(ParameterizedLinear):
    """y = x W^T + b. Keeps the attribute names of nn.Linear, so state-dict keys stay HF's."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach())
        self.bias = nn.Parameter(linear.bias.detach()) if linear.bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> Tensor:
        return self.weight

    def projectable(self) -> dict[str, nn.Parameter]:
        return {"weight": self.weight}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@PARAMETERIZATIONS.register
class Dense(Parameterization):
    """Keeps the dense init draw exactly (cast to the run's dtype)."""

    name = "dense"

    @dataclass
    class Config:
        pass

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> DenseLinear:
        return DenseLinear(linear.to(dtype))

    def transfer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return dtype  # convert only casts: cast on the CPU (see the base)
