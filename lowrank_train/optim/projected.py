"""ProjectedOptimizer: lowrank-train's own optimizer of projected tensors, through a Projector.

Per tensor W with gradient G at step t (1-based, counted per tensor):
    refresh the projector's state when it asks (a non-finite gradient or a failing basis
    finder keeps the old basis and logs an event);
    projector.update_(W, G, state, t, group): W <- W - lr * direction(W, G, state, t, group),
    with decoupled decay W <- W - lr * wd * W after the update (GaLore's code) or before it
    (Adafactor's), as the projector says; a low-rank update may be fused (GaLore: one addmm_).
Everything a projector remembers is in `self.state[p]` as tensors and plain values, so
`state_dict()` is the checkpoint; loading keeps every state tensor's saved dtype.

A quantized tensor (a layer's `Writer`; its stored tensor sits in the groups and keys the
state) is stepped through its writer: the side buffer `writer.grad` is G, the dequantized
`writer.weight()` is W, and `writer.write(direction(W, G, ...), lr, wd, t)` applies
W <- SR(W - lr * (direction + wd * W)). `zero_grad` zeroes the side buffers and `gradients()`
returns them with the ordinary `.grad`s, so clipping covers them.

`projected_optimizer(...)` builds one for code outside lowrank-train's loop (a hand-written
loop, or HF `Trainer(optimizers=(opt, sched))`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from lowrank_train.errors import ConfigError
from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.optim.rank_agreement import agree_on_refresh
from lowrank_train.optim.state import restore_saved_dtypes
from lowrank_train.parameterizations.base import Writer, storage_allocated
from lowrank_train.projectors.base import Projector

log = logging.getLogger(__name__)

STATE_DTYPES = ("auto", "float32", "bfloat16", "int8")


class ProjectedOptimizer(torch.optim.Optimizer):
    """Steps 2-D tensors by a projector's direction. Groups may carry `param_names` (the tensors'
    names in the model: seeded projections and events use them). `writers` are the quantized
    tensors among the groups' params (each `writer.tensor` must be in a group)."""

    def __init__(
        self,
        params: Iterable,
        projector: Projector,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_dtype: str = "auto",
        writers: Iterable[Writer] = (),
        keep_side_buffers: bool = True,
    ):
        """`keep_side_buffers`: acquire every writer's side buffer now and keep it, as a
        gradient lives until the step (False: a per-layer wrapper manages them)."""
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype {state_dtype!r} is not one of {', '.join(STATE_DTYPES)}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_dtype=state_dtype
        )
        super().__init__(params, defaults)
        self.projector = projector
        self.events: list[dict] = []
        self.writers: dict[Tensor, Writer] = {w.tensor: w for w in writers}
        owned = {p for g in self.param_groups for p in g["params"]}
        if any(t not in owned for t in self.writers):
            raise ValueError("every writer's tensor must be in one of the groups")
        if keep_side_buffers:
            for w in self.writers.values():
                w.acquire_grad()
        for g_index, group in enumerate(self.param_groups):
            names = group.setdefault(
                "param_names", [f"group{g_index}.{i}" for i in range(len(group["params"]))]
            )
            for p, name in zip(group["params"], names, strict=True):
                if p.ndim != 2:
                    raise ValueError(
                        f"{name}: a projector needs a 2-D tensor, not shape {tuple(p.shape)}"
                    )

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        if closure is not None:
            raise ValueError("ProjectedOptimizer.step takes no closure")
        self.step_tensors(p for g in self.param_groups for p in g["params"])

    @torch.no_grad()
    def step_tensors(self, tensors: Iterable[Tensor]) -> None:
        """One step of just `tensors` (some of this optimizer's, e.g. one decoder layer's from
        a per-layer hook); the others keep their state and counters. An ordinary tensor without
        `.grad` is skipped; a writer's tensor always steps (its side buffer is its gradient).
        Refreshes due among them are batched, as in `step`."""
        wanted = {id(t) for t in tensors}
        live, due = [], []
        for group in self.param_groups:
            for p, name in zip(group["params"], group["param_names"], strict=True):
                writer = self.writers.get(p)
                grad = writer.grad if writer is not None else p.grad
                if id(p) not in wanted or grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(self.projector.init_state(self._weight(p), name))
                    state["step"] = 0
                state["step"] += 1
                live.append((p, grad, state, group))
                refreshed = state.pop("refreshed_at", None) == state["step"]  # by accumulate_
                if not refreshed and self.projector.needs_refresh(state, state["step"]):
                    due.append((self.projector.refresh_input(self._weight(p), grad), name, state))
        if due:
            self._refresh(due, live[0][2]["step"], live[0][0].device)
        plain: dict[int, tuple[dict, list]] = {}  # per group: the tensors update_many_ steps
        written: dict[int, tuple[dict, list]] = {}  # per group: (writer, its direction's item)
        for p, grad, state, group in live:
            if any(key not in state for key in self.projector.shared_keys):
                continue  # no basis yet (the first refresh failed): nothing to step with
            writer = self.writers.get(p)
            if writer is None and "low_accum" in state:  # earlier micro-batches, projected
                low = state.pop("low_accum") + self.projector.down(grad, state).float()
                self.projector.update_(
                    p, grad, state, state["step"], group, low_grad=low.to(grad.dtype)
                )
            elif writer is None:
                plain.setdefault(id(group), (group, []))[1].append((p, grad, state, state["step"]))
            else:  # written back with one stochastic rounding; W dequantized only if read
                weight = writer.weight if self.projector.reads_weight else None
                item = (weight, grad, state, state["step"])
                written.setdefault(id(group), (group, []))[1].append((writer, item))
        for group, items in plain.values():
            self.projector.update_many_(items, group)
        for group, pairs in written.values():
            updates = self.projector.directions([item for _, item in pairs], group)
            for writer, (_, _, _, t) in pairs:
                update = next(updates)
                writer.write(update, group["lr"], group["weight_decay"], t)
                del update  # before the next is formed: one full-size update at a time

    def _weight(self, p: Tensor) -> Tensor:
        """W as a projector reads it: the parameter, or a writer's dequantized weight."""
        writer = self.writers.get(p)
        return writer.weight() if writer is not None else p

    def gradients(self) -> list[Tensor]:
        """The gradients the next step consumes: the ordinary tensors' `.grad` and the writers'
        side buffers (so clipping includes them)."""
        grads = [
            p.grad
            for g in self.param_groups
            for p in g["params"]
            if p not in self.writers and p.grad is not None
        ]
        return grads + [w.grad for w in self.writers.values()]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad, and every allocated side buffer zeroed (it stays allocated: the
        layers' backward adds into it, inside compiled graphs too)."""
        super().zero_grad(set_to_none=set_to_none)
        for w in self.writers.values():
            if storage_allocated(w.grad):  # a released buffer has no memory to zero
                w.grad.zero_()

    @torch.no_grad()
    def accumulate_(self, p: Tensor, name: str, grad: Tensor) -> None:
        """Fold one micro-batch's gradient of p into its projected sum, state["low_accum"] +=
        down(G_k) (fp32), so G_k can be freed; the step that follows adds the last micro-batch's
        and updates from R = sum_k down(G_k) = down(sum_k G_k). When that step refreshes, the
        new basis comes from the first micro-batch's G_1 (a named deviation: the whole-model
        step reads the sum; per-layer mode never holds it)."""
        state = self.state[p]
        if not state:
            state.update(self.projector.init_state(p, name))
            state["step"] = 0
        coming = state["step"] + 1
        if "low_accum" not in state:
            if self.projector.needs_refresh(state, coming):
                self._refresh(
                    [(self.projector.refresh_input(p, grad), name, state)], coming, p.device
                )
                state["refreshed_at"] = coming
            if any(key not in state for key in self.projector.shared_keys):
                raise RuntimeError(f"{name}: no basis to accumulate in (its first refresh failed)")
            state["low_accum"] = self.projector.down(grad, state).float()
        else:
            state["low_accum"].add_(self.projector.down(grad, state))

    def _refresh(self, due: list[tuple[torch.Tensor, str, dict]], step: int, device) -> None:
        """Refresh every due tensor, batched where the projector can. A non-finite gradient or
        a failing basis finder keeps that tensor's old basis and logs a kept-old-basis event."""
        started = _now(device)
        finite = torch.stack([torch.isfinite(g).all() for g, _, _ in due]).tolist()  # one sync
        good = [item for item, ok in zip(due, finite, strict=True) if ok]
        for (_, name, _), ok in zip(due, finite, strict=True):
            if not ok:
                self._kept(step, name, "non-finite gradient")
        failed = self.projector.refresh_many([(g, s) for g, _, s in good])
        for i, reason in failed.items():
            self._kept(step, good[i][1], f"basis finder failed: {reason}")
        done = [item for i, item in enumerate(good) if i not in failed]
        # under DDP: every rank takes rank 0's outcome (and the same collectives on each)
        agree_on_refresh([s for _, _, s in good], set(failed), self.projector.shared_keys, device)
        fallbacks = sum(self.projector.finder_fallbacks)
        self.projector.finder_fallbacks.clear()
        if done:
            seconds = round(_now(device) - started, 4)
            kind = self.projector.basis_event
            event = {"event": kind, "step": step, "tensors": len(done), "seconds": seconds}
            if fallbacks:  # correct and slow: a user reading a long refresh should see why
                event["fallbacks"] = fallbacks
                log.warning(
                    "step %d: %d of %d matrices' fast refresh fell back to Householder QR",
                    step,
                    fallbacks,
                    len(done),
                )
            self.events.append(event)

    def _kept(self, step: int, name: str, reason: str) -> None:
        self.events.append(
            {"event": "kept_old_basis", "step": step, "tensor": name, "reason": reason}
        )
        log.warning("step %d: %s kept its old basis (%s)", step, name, reason)

    def pop_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, with every state tensor in its saved dtype (fp32 moments of bf16 weights
        would otherwise come back bf16)."""
        super().load_state_dict(state_dict)
        restore_saved_dtypes(self, state_dict)


def _now(device: torch.device) -> float:
    """Wall time after the device's queued work (refresh timing only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


DEFAULT_TARGET = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def projected_optimizer(
    params: nn.Module | Iterable,
    projector: str = "galore",
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    state_dtype: str = "auto",
    target: Iterable[str] = DEFAULT_TARGET,
    seed: int = 0,
    **options,
) -> torch.optim.Optimizer:
    """A `torch.optim.Optimizer` for any training loop: projected tensors by `projector` (with
    `options`, e.g. rank=128; unset options take the method's official defaults), all others by
    torch AdamW with the same lr, betas, eps and weight decay.

    `params` is a model (the 2-D weights of Linear layers whose attribute name is in `target`
    are projected) or ordinary torch parameter groups, where a group with `"project": True` is
    projected; groups may set their own lr and weight_decay, as in torch.
    """
    # lazily: resolve imports the registries, whose methods import this module
    from lowrank_train.projectors import PROJECTORS
    from lowrank_train.resolve import projector_options

    origin = "projected_optimizer"
    config = projector_options(projector, options, origin)  # an unknown name: one line, too
    built = PROJECTORS.get(projector)(config, seed=seed)
    if isinstance(params, nn.Module):
        groups = _groups_of_model(params, set(target))
    else:
        groups = [g if isinstance(g, dict) else {"params": [g]} for g in params]
        if groups and not isinstance(groups[0].get("params"), list | tuple):
            groups = [{"params": list(params)}]
    projected = [dict(g) for g in groups if g.get("project")]
    plain = [dict(g) for g in groups if not g.get("project")]
    if not projected:
        raise ConfigError(
            f"{origin}: no tensor to project: pass a model (its {', '.join(sorted(target))} "
            'Linears are projected) or mark parameter groups with "project": True'
        )
    for g in projected + plain:
        g.pop("project", None)
        g["params"] = list(g["params"])
    if any(p.ndim != 2 for g in projected for p in g["params"]):
        raise ConfigError(f'{origin}: a "project": True group holds a tensor that is not 2-D')
    try:  # the YAML path's checks, on the tensors given (the rank against each one's shape)
        built.check(_named_shapes(projected))
    except ConfigError as e:
        raise ConfigError(f"{origin}: {e}") from None
    common = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    inner: dict[str, torch.optim.Optimizer] = {
        projector: ProjectedOptimizer(projected, built, state_dtype=state_dtype, **common)
    }
    if plain:
        inner["adamw"] = torch.optim.AdamW(plain, **common)
    return MultiOptimizer(inner)


def _named_shapes(groups: list[dict]) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor of `groups`: the group's `param_names`, else its position."""
    shapes = {}
    for i, g in enumerate(groups):
        names = g.get("param_names") or [f"group {i} tensor {j}" for j in range(len(g["params"]))]
        shapes |= {name: tuple(p.shape) for name, p in zip(names, g["params"], strict=True)}
    return shapes


def _groups_of_model(model: nn.Module, target: set[str]) -> list[dict]:
    projected, names, plain = [], [], []
    targeted = {
        f"{mod_name}.weight" if mod_name else "weight"
        for mod_name, module in model.named_modules()
        if isinstance(module, nn.Linear) and mod_name.rsplit(".", 1)[-1] in target
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in targeted and p.ndim == 2:
            projected.append(p)
            names.append(name)
        else:
            plain.append(p)
    if not projected:
        raise ConfigError(
            f"projected_optimizer: no Linear layer named one of {sorted(target)} in the model"
        )
    return [{"params": projected, "param_names": names, "project": True}, {"params": plain}]
