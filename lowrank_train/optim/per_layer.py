"""PerLayerOptimizer: every tensor steps inside backward, from its post-accumulate-grad hook.

The whole-model step holds every gradient until backward ends. Here a tensor is stepped by the
inner optimizer that owns it as soon as its gradient is complete, and the gradient is freed at
once, so the gradients of the whole model never exist together (with grad_accum = 1).

Accumulation (grad_accum = k): a tensor keeps accumulating its full gradient in `.grad` over
its first k - 1 backward passes (the whole-model step's gradient memory, held until the last
micro-batch) and steps from the hook of its k-th, so the update is the whole-model step's,
bitwise. A tensor whose gradient is still pending when `step()` runs (one that got no gradient
in the last micro-batch) is stepped there.

`accumulation="projected"` (`optim.per_layer_accumulation`), for tensors whose projector reads
the gradient only through R = down(G) (GaLore, Q-GaLore): each of the first k - 1 micro-batches'
G_i is folded into an fp32 projected sum (`ProjectedOptimizer.accumulate_`) and freed in its
hook, so a tensor holds its r-column sum instead of its m x n gradient between micro-batches;
the last one's hook steps from sum_i down(G_i) = down(sum_i G_i) (equal to the whole-model step
up to rounding). A step that refreshes takes its new basis from the first micro-batch's G_1,
not from the sum (the named deviation: per-layer mode never holds the sum). The global grad
norm then is not known (the summed gradients are never formed): it is reported as nan.

Quantized weights (writers) have no post-accumulate hook: their side buffers are complete when
the input norm weight of their decoder layer completes (its gradient needs every Linear of the
layer), so a layer's writers step from that norm's hook; a writer outside the decoder layers
steps in `step()`.

Side buffers with grad_accum = 1 hold memory only around their layer's backward: a writer's
buffer is released (`release_grad`: storage freed, the tensor object kept for the op and the
compiled graphs) right after it steps, and decoder layer i's buffers are re-acquired, zeroed,
from the hook of layer i+1's post-attention norm weight, which fires mid-way through layer
i+1's backward (after its MLP, before its attention), so before layer i's backward can start
(the same or the next layer's input norm would not be safe: the engine does not order an
AccumulateGrad hook against the next layer's first op). The top layer's buffers, and writers
outside the decoder layers, stay allocated. So about three layers' buffers are resident at
once (the top layer's, the layer in backward and the one below it) instead of all: at 7B in
bf16, 3 x 0.4 GB instead of 13 GB (2 bytes per INT8 weight). With grad_accum > 1 the buffers
accumulate across micro-batches, so all stay allocated, as in whole-model mode: 2 bytes per
INT8 weight in bf16 runs. `zero_grad` zeroes the allocated buffers.

Grad norm: ||g|| = sqrt(sum_i ||g_i||^2) over the per-tensor norms ||g_i|| recorded as the
hooks fire, in the order of the whole-model step's gradients: the true norm, logged as such.
Clipping by it is refused (config validation): the first tensors step before the last
gradients exist.

An exception in a hook (an out-of-memory error midway through backward) leaves some tensors
stepped and others not; the wrapper then refuses `state_dict()` and `step()`, so that state is
never checkpointed: the last good checkpoint is the one to resume.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_train.distributed import launched_world_size
from lowrank_train.errors import ConfigError
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.parameterizations import ParameterizedLinear
from lowrank_train.parameterizations.base import Writer, storage_allocated
from lowrank_train.projectors.base import BASIS_EVENTS

# Per-tensor lists a group may carry beside `params` (ours name each tensor; zip(strict=True)).
PER_TENSOR_KEYS = ("params", "param_names")


def step_subset(optimizer: torch.optim.Optimizer, picked: dict[int, list[int]]) -> None:
    """`optimizer.step()` over the tensors at `picked` (group index -> positions) alone.

    Every group's per-tensor lists are narrowed for the call and restored after it; the group
    dicts stay the same objects, so the scheduler's lr reaches the step and `state_dict()`
    sees the groups unchanged. Works for any optimizer that steps what its groups list
    (torch, bitsandbytes, ours)."""
    saved = [{k: g[k] for k in PER_TENSOR_KEYS if k in g} for g in optimizer.param_groups]
    for index, (group, lists) in enumerate(zip(optimizer.param_groups, saved, strict=True)):
        keep = picked.get(index, ())
        for key, values in lists.items():
            group[key] = [values[i] for i in keep]
    try:
        optimizer.step()
    finally:
        for group, lists in zip(optimizer.param_groups, saved, strict=True):
            group.update(lists)


class PerLayerOptimizer(torch.optim.Optimizer):
    """Steps each tensor of a MultiOptimizer from its post-accumulate-grad hook.

    `param_groups` are the inner optimizers' own group dicts (as MultiOptimizer's), so a
    LambdaLR over this wrapper sets the lr every hook's step reads; `state_dict()` is the inner
    optimizer's, unchanged (the wrapper holds nothing between steps)."""

    def __init__(
        self,
        optimizer: MultiOptimizer,
        model: nn.Module,
        grad_accum: int = 1,
        accumulation: str = "full",
    ):
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        # (owner, group index, position) of each tensor, in the order of MultiOptimizer's
        # gradients() (each owner's ordinary tensors, then its writers' side buffers): the grad
        # norm stacks the per-tensor norms in that order.
        self.where: list[tuple[torch.optim.Optimizer, int, int]] = []
        self.params: list[torch.Tensor] = []
        self.writers: dict[int, Writer] = {}  # index -> writer, for its tensor's side buffer
        for opt in optimizer.optimizers.values():
            writers = opt.writers if isinstance(opt, ProjectedOptimizer) else {}
            at = {
                id(p): (opt, g_index, position)
                for g_index, group in enumerate(opt.param_groups)
                for position, p in enumerate(group["params"])
            }
            ordinary = [p for g in opt.param_groups for p in g["params"] if p not in writers]
            for p in ordinary + list(writers):
                if p in writers:
                    self.writers[len(self.params)] = writers[p]
                self.where.append(at[id(p)])
                self.params.append(p)
        super().__init__(self.params, {})
        self._link()
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.seen = [0] * len(self.params)  # backward passes that reached each tensor this step
        self.done = [False] * len(self.params)  # stepped this step
        self.norms: list[torch.Tensor | None] = [None] * len(self.params)
        self.failed: str | None = None
        layer_writers = self._layer_writers(model)
        self.triggers = {  # input norm weight of a layer -> its writers, stepped in that hook
            norm: tensors
            for layer, tensors in zip(model.model.layers, layer_writers, strict=True)
            if tensors and (norm := self.index.get(id(layer.input_layernorm.weight))) is not None
        }
        # grad_accum 1: post-attention norm weight of layer i+1 -> layer i's writers, acquired
        # in its hook and released once stepped (only layers whose writers have both hooks)
        self.acquire_at: dict[int, list[int]] = {}
        if grad_accum == 1:
            layers = list(model.model.layers)
            for k in range(len(layers) - 1):
                at = self.index.get(id(layers[k + 1].post_attention_layernorm.weight))
                if at is not None and layer_writers[k] in self.triggers.values():
                    self.acquire_at[at] = layer_writers[k]
        self.releasing = {i for tensors in self.acquire_at.values() for i in tensors}
        for i, writer in self.writers.items():  # from the first step on, as in any step
            if i in self.releasing:
                writer.release_grad()
            else:
                writer.acquire_grad()
        self.projected = self._projected_accumulation(accumulation)
        self.names = {id(p): n for n, p in model.named_parameters()}
        for i, p in enumerate(self.params):
            if i not in self.writers:
                p.register_post_accumulate_grad_hook(self._hook)

    def _projected_accumulation(self, accumulation: str) -> set[int]:
        """Indices of the tensors summed in the projected space between micro-batches."""
        if accumulation == "full" or self.grad_accum == 1:
            return set()
        owners = {
            opt.projector.name: opt
            for opt in self.optimizer.optimizers.values()
            if isinstance(opt, ProjectedOptimizer)
        }
        # resolve refuses a projector that cannot (one line, before anything is built)
        if not owners or not all(o.projector.accumulates_projected for o in owners.values()):
            raise ValueError("projected accumulation needs GaLore or Q-GaLore tensors")
        return {
            i
            for i, (opt, _, _) in enumerate(self.where)
            if isinstance(opt, ProjectedOptimizer) and i not in self.writers
        }

    def _layer_writers(self, model: nn.Module) -> list[list[int]]:
        """Indices of each decoder layer's writer tensors."""
        return [
            [
                self.index[id(w.tensor)]
                for m in layer.modules()
                if isinstance(m, ParameterizedLinear)
                for w in m.writers().values()
            ]
            for layer in model.model.layers
        ]

    def _link(self) -> None:
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state  # type: ignore[assignment]

    def _hook(self, param: torch.Tensor) -> None:
        i = self.index[id(param)]
        for j in self.acquire_at.get(i, ()):  # the layer below runs its backward next
            self.writers[j].acquire_grad()
        self.seen[i] += 1
        if self.seen[i] >= self.grad_accum:
            self._consume([i, *self.triggers.get(i, ())])
        elif i in self.projected:  # fold this micro-batch into the projected sum, free G
            opt = self.where[i][0]
            opt.accumulate_(param, self.names.get(id(param), f"tensor{i}"), param.grad)
            param.grad = None

    def _grad(self, i: int) -> torch.Tensor | None:
        """Tensor i's gradient: `.grad`, or its writer's side buffer."""
        writer = self.writers.get(i)
        return writer.grad if writer is not None else self.params[i].grad

    @torch.no_grad()
    def _consume(self, indices: list[int]) -> None:
        """Record each gradient's norm, step the tensors through their owners, free the
        gradients (`.grad` set to None; a side buffer released where `releasing` says)."""
        try:
            by_owner: dict[int, tuple[torch.optim.Optimizer, dict[int, list[int]]]] = {}
            for i in indices:
                writer = self.writers.get(i)
                if writer is not None and not storage_allocated(writer.grad):
                    raise RuntimeError(
                        f"the side buffer of {writer.name} is released (no memory) when its "
                        "layer steps: its acquire_grad did not run before the layer's backward"
                    )
                opt, g_index, position = self.where[i]
                # one tensor through get_total_norm: the kernel the whole-model norm uses; a
                # projected sum's full gradient is never formed, so its norm is unknown
                self.norms[i] = (
                    torch.full((), math.nan, device=self.params[i].device)
                    if i in self.projected
                    else torch.nn.utils.get_total_norm([self._grad(i)])
                )
                picked = by_owner.setdefault(id(opt), (opt, {}))[1]
                picked.setdefault(g_index, []).append(position)
            for opt, picked in by_owner.values():
                step_subset(opt, picked)
            for i in indices:
                self.done[i] = True
                if i in self.releasing:
                    self.writers[i].release_grad()
                elif i not in self.writers:
                    self.params[i].grad = None
        except BaseException as e:
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise

    def _check(self) -> None:
        if self.failed is not None:
            raise RuntimeError(
                f"a per-layer step failed midway ({self.failed}): some tensors were stepped and "
                "others not, so this state must not be saved; resume from the last checkpoint"
            )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102  (the hooks did the work; this ends the step)
        if closure is not None:
            raise ValueError("PerLayerOptimizer.step takes no closure")
        self._check()
        pending = [i for i in range(len(self.params)) if self._pending(i)]
        if pending:
            self._consume(pending)
        self.seen = [0] * len(self.params)
        self.done = [False] * len(self.params)
        self.norms = [None] * len(self.params)

    def _pending(self, i: int) -> bool:
        """Not stepped yet this step, with a gradient to step (a writer always has one)."""
        return not self.done[i] and self._grad(i) is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The inner optimizers' zero_grad (theirs zero only the allocated side buffers;
        acquire_grad zeroes a released one when it gets its memory back)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """The global L2 norm of this step's gradients (recorded by the hooks, or read from a
        gradient still pending); max_norm must be inf: clipping is not possible per layer."""
        if math.isfinite(max_norm):
            raise ValueError(
                "per-layer stepping cannot clip by the global norm (tensors step before it is "
                "known); set train.clip_grad_norm=0"
            )
        norms = [
            self.norms[i] if self.done[i] else torch.nn.utils.get_total_norm([self._grad(i)])
            for i in range(len(self.params))
            if self.done[i] or self._pending(i)
        ]
        return torch.nn.utils.get_total_norm(norms)

    def side_buffer_bytes(self) -> int:
        """Bytes of the side buffers allocated at once at the peak of a backward (the planner's
        term): those never released, plus the released ones of two adjacent decoder layers (the
        layer in backward, the one below it): 3 layers' worth for equal layers, with the top."""
        size = lambda i: self.writers[i].grad.numel() * self.writers[i].grad.element_size()  # noqa: E731
        kept = sum(size(i) for i in self.writers if i not in self.releasing)
        layers = [sum(size(i) for i in tensors) for tensors in self.acquire_at.values()]
        pairs = [a + b for a, b in zip(layers, layers[1:], strict=False)] or layers
        return kept + max(pairs, default=0)

    def param_state(self, param: torch.Tensor) -> dict:
        """The owning inner optimizer's live `state[param]` (MultiOptimizer.param_state)."""
        return self.optimizer.param_state(param)

    def pop_events(self) -> list[dict]:
        """The inner events; the refreshes of one step (one per tensor here, each tensor
        refreshing in its own hook) merge into one, tensors, seconds and fallbacks summed, as the
        whole-model step logs them."""
        events: list[dict] = []
        refresh_of_step: dict[int, dict] = {}
        for event in self.optimizer.pop_events():
            if event["event"] in BASIS_EVENTS and event["step"] in refresh_of_step:
                merged = refresh_of_step[event["step"]]
                merged["tensors"] += event["tensors"]
                merged["seconds"] = round(merged["seconds"] + event["seconds"], 4)
                if "fallbacks" in event:
                    merged["fallbacks"] = merged.get("fallbacks", 0) + event["fallbacks"]
                continue
            event = dict(event)
            if event["event"] in BASIS_EVENTS:
                refresh_of_step[event["step"]] = event
            events.append(event)
        return events

    def state_dict(self) -> dict:
        self._check()
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)
        self._link()  # the inner load put new group dicts in place


def check_per_layer() -> None:
    """A one-line ConfigError where per-layer stepping would be wrong: world size > 1."""
    world = launched_world_size()
    if world > 1:
        raise ConfigError(
            f"optim.per_layer: true with world size {world}: the hooks fire before DDP's "
            "all-reduce, so each rank would step on its own gradient; run one process or set "
            "optim.per_layer=false"
        )


def compile_layers(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each decoder layer on its own (as torchtitan does), in place (state-dict
    keys unchanged). A whole-model graph is one autograd node, so every post-accumulate hook
    would fire at the end of backward and per-layer stepping would save nothing."""
    for layer in model.model.layers:
        layer.compile(backend=backend)
