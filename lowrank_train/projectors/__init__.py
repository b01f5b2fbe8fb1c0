"""Registered gradient projectors. Adding one: a module here plus its import below."""

from lowrank_train.projectors import apollo, fira, flora, galore, gradnormlorp, none, qgalore  # noqa: F401  (each registers itself)
from lowrank_train.projectors.base import PROJECTORS, Projector

__all__ = ["PROJECTORS", "Projector"]
