"""The gradient plug point: how a 2-D gradient is compressed for the optimizer's state.

A projector is stateless code; everything it remembers (bases, seeds, counters) lives in the
optimizer's per-parameter `state` dict as tensors and plain values, so `state_dict()` is the
checkpoint and loads with `weights_only=True`. No projector object is ever stored in state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import Tensor
from torch.nn import Parameter

from lowrank_train.config import knob
from lowrank_train.registry import Registry

if TYPE_CHECKING:
    from lowrank_train.config import RunConfig

State = dict[str, Any]  # tensors and plain values only


@dataclass
class LowRankOptions:
    """Keys every low-rank projector has. Each projector's `Config` subclasses this and sets its
    own official defaults, so an unset key means "the method's default" (one place per method)."""

    rank: int = knob(128, "rank r of the projected gradient")
    update_gap: int = knob(200, "T: steps between basis refreshes (or resamples)")
    scale: float = knob(0.25, "alpha of the method's update, as its digest writes it")
    moments_at_refresh: Literal["keep", "reset", "rotate"] = knob(
        "keep", "moments at a refresh: keep (the official codes), reset, or rotate into the new basis"
    )


@dataclass
class SVDOptions(LowRankOptions):
    """Keys of the projectors whose basis comes from the gradient's singular vectors."""

    svd: Literal["fast", "exact"] = knob(
        "fast", "basis finder: fast (warm subspace iteration) or exact (torch.linalg.svd)"
    )


class Projector:
    """Base of the registered projectors. Subclasses set `name` and `Config` (keys under optim.projector)."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, options: object | None = None):
        self.options = options if options is not None else self.Config()

    def init_state(self, param: Parameter, name: str) -> State:
        raise NotImplementedError

    def needs_refresh(self, state: State, step: int) -> bool:
        raise NotImplementedError

    def refresh(self, grad: Tensor, state: State) -> None:
        """A new basis from the gradient (or a seed); keeps, resets or rotates the moments."""
        raise NotImplementedError

    def direction(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """The full-shape update direction before lr; `param` is the (dequantized) weight."""
        raise NotImplementedError

    def state_bytes(self, shape: tuple[int, int], cfg: RunConfig) -> int:
        """Bytes of this projector's optimizer state for one (m, n) tensor (documented formula)."""
        raise NotImplementedError

    def validate(self, cfg: RunConfig) -> None:
        """Raise a one-line ConfigError for combinations this projector cannot run."""


PROJECTORS: Registry[Projector] = Registry("projector")
