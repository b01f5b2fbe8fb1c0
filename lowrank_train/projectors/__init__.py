"""Registered gradient projectors. Adding one: a module here plus its import below."""

from lowrank_train.projectors import none  # noqa: F401  (registers "none")
from lowrank_train.projectors.base import PROJECTORS, Projector

__all__ = ["PROJECTORS", "Projector"]
