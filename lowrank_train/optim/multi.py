"""Several optimizers stepped as one torch.optim.Optimizer."""

from __future__ import annotations

import torch


class MultiOptimizer(torch.optim.Optimizer):
    """Steps each inner optimizer; `param_groups` are the inner optimizers' own group dicts.

    torch.optim.Optimizer.__init__ would copy the groups into new dicts, and then LambdaLR
    would set an lr that no inner optimizer reads; so the base init runs for its bookkeeping
    (hooks, profiler names) and the group list is replaced by the inner dicts themselves.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers
        params = [p for opt in optimizers.values() for g in opt.param_groups for p in g["params"]]
        super().__init__(params, {})
        self.param_groups = [g for opt in optimizers.values() for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102  (closure unsupported, as in bitsandbytes)
        if closure is not None:
            raise ValueError("MultiOptimizer.step takes no closure")
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"optimizer state holds {sorted(state_dict)}, this run builds {sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])
        # torch's load_state_dict puts new group dicts in place; without this the scheduler would
        # keep setting the lr of the old ones, and after a resume the lr would silently freeze.
        self.param_groups = [g for opt in self.optimizers.values() for g in opt.param_groups]
