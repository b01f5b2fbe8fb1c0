"""`none`: no projection; every tensor is trained by the inner optimizer (optim.name)."""

from dataclasses import dataclass

from lowrank_train.projectors.base import PROJECTORS, Projector


@PROJECTORS.register
class NoProjector(Projector):
    """Selecting it routes nothing to a projector; `build_optimizer` checks for this name only."""

    name = "none"

    @dataclass
    class Config:
        pass
