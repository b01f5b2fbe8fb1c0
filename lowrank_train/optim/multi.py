"""Several optimizers stepped as one torch.optim.Optimizer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from lowrank_train.optim.state import load_state_dict_keeping_dtypes


class MultiOptimizer(torch.optim.Optimizer):
    """Steps each inner optimizer; `param_groups` are the inner optimizers' own group dicts.

    torch.optim.Optimizer.__init__ would copy the groups into new dicts, and then LambdaLR
    would set an lr that no inner optimizer reads; so the base init runs for its bookkeeping
    (hooks, profiler names) and the group list is replaced by the inner dicts themselves.

    Per-parameter state: `param_state(p)` is the owning inner optimizer's own `state[p]` dict
    (a method may write into it, e.g. LoQT's merge); `state` is a read-only merged view of the
    inner optimizers' states, for reading and for tools that iterate `optimizer.state`.
    """

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        param_names: dict[torch.Tensor, str] | None = None,
    ):
        """`param_names` (tensor -> its name in the model) only makes error messages name tensors."""
        self.optimizers = optimizers
        self.param_names = param_names or {}
        params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
        super().__init__(params, {})
        self._link()

    def _link(self) -> None:
        """Point `param_groups` and `state` at the inner optimizers' current objects."""
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
        self.state = MergedState(self.optimizers, self._name)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102  (closure unsupported, as in bitsandbytes)
        if closure is not None:
            raise ValueError("MultiOptimizer.step takes no closure")
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def gradients(self) -> list[torch.Tensor]:
        """Every gradient this step will consume: the owned tensors' `.grad`, plus what an inner
        optimizer holds elsewhere (quantized weights' side buffers, via its `gradients()`)."""
        grads: list[torch.Tensor] = []
        for opt in self.optimizers.values():
            if hasattr(opt, "gradients"):
                grads.extend(opt.gradients())
            else:
                grads.extend(
                    p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None
                )
        return grads

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of `gradients()`, all scaled by min(1, max_norm / (norm + 1e-6))
        (torch's clip_grad_norm_, over side buffers too); max_norm inf measures only."""
        grads = self.gradients()
        norm = torch.nn.utils.get_total_norm(grads)
        if grads and math.isfinite(max_norm):
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].device))
        return norm

    def _name(self, param: torch.Tensor) -> str:
        shape = f"tensor of shape {tuple(param.shape)} ({param.dtype}, {param.device})"
        name = self.param_names.get(param)
        return f"{name} ({shape})" if name else f"the {shape}"

    def owner(self, param: torch.Tensor) -> torch.optim.Optimizer:
        """The inner optimizer whose groups hold `param`; KeyError naming the tensor otherwise."""
        for opt in self.optimizers.values():
            if any(p is param for g in opt.param_groups for p in g["params"]):
                return opt
        raise KeyError(f"no inner optimizer owns {self._name(param)}")

    def param_state(self, param: torch.Tensor) -> dict:
        """The owning inner optimizer's `state[param]` (the live dict: writes reach its step and
        its state_dict). Empty before the first step of an optimizer that creates state lazily."""
        return self.owner(param).state[param]

    def pop_events(self) -> list[dict]:
        """Events (refresh, kept-old-basis, resample, ...) the inner optimizers collected since
        the last call, in the order of `optimizers`; those without `pop_events` have none."""
        events: list[dict] = []
        for opt in self.optimizers.values():
            if hasattr(opt, "pop_events"):
                events.extend(opt.pop_events())
        return events

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Each inner optimizer's state, every state tensor in its saved dtype (torch would cast
        floating state to the parameter's dtype: fp32 moments of bf16 weights would come back
        bf16)."""
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state_dict)}, this run builds {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            load_state_dict_keeping_dtypes(opt, state_dict[name])
        # torch's load_state_dict puts new group dicts (and a new state dict) in place; without
        # this the scheduler would keep setting the lr of the old groups, and after a resume the
        # lr would silently freeze.
        self._link()


class MergedState(Mapping):
    """Read-only `param -> state dict` over several optimizers (a tensor is owned by one).

    Looking up a tensor without state raises KeyError instead of creating an entry, as
    torch's defaultdict would; write through `MultiOptimizer.param_state`.
    """

    def __init__(
        self,
        optimizers: dict[str, torch.optim.Optimizer],
        describe: Callable[[torch.Tensor], str],
    ):
        self._optimizers = optimizers
        self._describe = describe

    def __getitem__(self, param: torch.Tensor) -> dict:
        for opt in self._optimizers.values():
            if param in opt.state:
                return opt.state[param]
        raise KeyError(f"no optimizer state for {self._describe(param)}")

    def __iter__(self) -> Iterator[torch.Tensor]:
        for opt in self._optimizers.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers.values())

    def __contains__(self, param: object) -> bool:
        return any(param in opt.state for opt in self._optimizers.values())
