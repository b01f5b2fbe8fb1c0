"""Registered weight parameterizations. Adding one: a module in this package; every module
here is imported below, and each registers its class."""

import importlib
import pkgutil

from lowrank_train.parameterizations.base import (
    PARAMETERIZATIONS,
    Parameterization,
    ParameterizedLinear,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PARAMETERIZATIONS", "Parameterization", "ParameterizedLinear"]
