"""Registered weight parameterizations. Adding one: a module here plus its import below."""

from lowrank_train.parameterizations import dense  # noqa: F401  (registers "dense")
from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)

__all__ = ["PARAMETERIZATIONS", "Parameterization", "ParameterizedLinear"]
