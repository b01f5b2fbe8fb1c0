"""Registered weight parameterizations. Adding one: a module here plus its import below."""

from lowrank_train.parameterizations import dense, lowrank  # noqa: F401  (each registers itself)
from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)

__all__ = ["PARAMETERIZATIONS", "Parameterization", "ParameterizedLinear"]
