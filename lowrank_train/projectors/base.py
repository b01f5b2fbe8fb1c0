"""The gradient plug point: how a 2-D gradient is compressed for the optimizer's state.

A projector is stateless code; everything it remembers (bases, seeds, counters) lives in the
optimizer's per-parameter `state` dict as tensors and plain values, so `state_dict()` is the
checkpoint and loads with `weights_only=True`. No projector object is ever stored in state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor
from torch.nn import Parameter

from lowrank_train import gemm
from lowrank_train.config import knob
from lowrank_train.errors import ConfigError
from lowrank_train.kernels import ops as kernels
from lowrank_train.projectors.subspace import side_of
from lowrank_train.registry import Registry

# what a failing basis finder raises (a singular factorization, a non-finite basis, cuSOLVER)
FINDER_ERRORS = (torch.linalg.LinAlgError, FloatingPointError, RuntimeError)

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
        "keep",
        "moments at a refresh: keep (the official codes), reset, or rotate into the new basis",
    )


@dataclass
class SVDOptions(LowRankOptions):
    """Keys of the projectors whose basis comes from the gradient's singular vectors."""

    svd: Literal["fast", "exact"] = knob(
        "fast", "basis finder: fast (warm subspace iteration) or exact (torch.linalg.svd)"
    )


BASIS_EVENTS = ("refresh", "resample")


class Projector:
    """Base of the registered projectors. Subclasses set `name` and `Config` (keys under
    optim.projector).

    The projected optimizer calls, per tensor and step t (1-based): `init_state` once;
    `refresh` when `needs_refresh(state, t)`; then `direction`, whose result W moves against:
    `W <- W - lr * direction` (decay as `decay_after_update` says)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    # GaLore's code decays the updated weight (W <- W - lr*wd*W after the step); Adafactor before.
    decay_after_update: ClassVar[bool] = True
    # State keys computed from the gradient at a refresh: under DDP rank 0's are broadcast, so
    # every rank holds the same basis even if two SVDs of one matrix ever disagreed in sign.
    shared_keys: ClassVar[tuple[str, ...]] = ()
    # Whether the update reads the gradient only through down(G) (GaLore, Q-GaLore): then
    # micro-batches can be summed in the projected space, down(sum G_k) = sum down(G_k)
    # (per-layer accumulation, `optim.per_layer_accumulation: projected`).
    accumulates_projected: ClassVar[bool] = False
    # Whether `direction` reads the weight (Flora's RMS scale, GradNormLoRP's normalisation):
    # only then is a quantized weight dequantized for it (an fp32 m x n copy per tensor and step)
    reads_weight: ClassVar[bool] = False
    # Runs whose temporaries are full-size stacks (GradNormLoRP's W and G, Flora's u) get 4x
    # the budget: at 256 MiB a 1B MLP tensor ran alone, and a run's ~45 small ops, not its
    # bytes, were the step's cost (the host-bound 1B step, 2026-12-02)
    run_budget_scale: ClassVar[int] = 1
    # The event a new basis logs: "refresh" (found from the gradient) or "resample" (a fresh
    # random draw: Flora, APOLLO); BASIS_EVENTS names both for the readers of metrics.jsonl.
    basis_event: ClassVar[str] = "refresh"

    def __init__(self, options: object | None = None, seed: int = 0):
        self.options = options if options is not None else self.Config()
        self.seed = seed  # run seed, for projections drawn from (seed, tensor name, index)
        # matrices whose fast finder fell back to Householder QR since the optimizer last read
        # it (it reports them in the refresh event and resets the count)
        self.finder_fallbacks: list[int] = []

    def init_state(self, param: Parameter, name: str) -> State:
        raise NotImplementedError

    def needs_refresh(self, state: State, step: int) -> bool:
        raise NotImplementedError

    def refresh(self, grad: Tensor, state: State) -> None:
        """A new basis from the gradient (or a seed); keeps, resets or rotates the moments."""
        raise NotImplementedError

    def refresh_many(self, items: list[tuple[Tensor, State]]) -> dict[int, str]:
        """Refresh several (gradient, state) pairs, each installed as soon as it is found (so a
        refresh holds one new basis, or one batched call's); returns, by position, why each
        that kept its old basis did (a finder error or a non-finite basis)."""
        failed = {}
        for i, (grad, state) in enumerate(items):
            try:
                self.refresh(grad, state)
            except FINDER_ERRORS as e:
                failed[i] = str(e).splitlines()[0]
        return failed

    def refresh_input(self, param: Tensor, grad: Tensor) -> Tensor:
        """The matrix `refresh` reads: the gradient (GradNormLoRP: its direction's gradient)."""
        return grad

    def direction(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        """The full-shape update direction before lr; `param` is the (dequantized) weight, or
        None for a quantized weight when the projector does not read it (`reads_weight`)."""
        raise NotImplementedError

    def update_(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> None:
        """W <- W - lr * direction, with the decoupled decay around it."""
        self.decay_(param, hp, before_update=True)
        param.add_(self.direction(param, grad, state, step, hp).to(param.dtype), alpha=-hp["lr"])
        self.decay_(param, hp, before_update=False)

    def update_many_(self, items: list[tuple[Tensor, Tensor, State, int]], hp: dict) -> None:
        """`update_` of each (param, grad, state, step) of one parameter group. A projector
        whose step is a chain of small per-tensor ops batches them across the group here (the
        whole-model step's cost is then op dispatch, not arithmetic)."""
        for param, grad, state, step in items:
            self.update_(param, grad, state, step, hp)

    def directions(self, items: list[tuple], hp: dict) -> Iterator[Tensor]:
        """`direction` of each (weight, grad, state, step) of one group, yielded one at a time
        (a caller writes each before the next is formed: at most one full-size update lives);
        `weight` may be a callable giving it (a writer's dequantized weight, formed only when
        this projector reads it and dropped before the update is yielded)."""
        for weight, grad, state, step in items:
            w = weight() if callable(weight) else weight
            update = self.direction(w, grad, state, step, hp)
            del w  # the fp32 copy of W goes before the caller's write allocates its own
            yield update
            del update  # on resume, before the next is formed

    def runs(self, items: list[tuple]) -> Iterator[list[tuple]]:
        """The items ((weight, grad, state, step) tuples) in runs a batched step can stack: one
        gradient shape, dtype and side, one step, moment step (so one c_t) and resample index,
        in order of first appearance, each within `run_budget()` bytes of temporaries
        (`run_item_bytes` an item)."""
        groups: dict[tuple, list[tuple]] = {}
        for item in items:
            grad, state, step = item[1], item[2], item[3]
            counters = (step, state.get("moment_step", 0), state.get("index", 0))
            key = (grad.shape, grad.dtype, state["side"], *counters)
            groups.setdefault(key, []).append(item)
        for (shape, dtype, *_), group in groups.items():
            size = max(1, self.run_budget() // self.run_item_bytes(tuple(shape), dtype))
            for start in range(0, len(group), size):
                yield group[start : start + size]

    def run_item_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """A tensor's share of its batched run's temporaries (each batching projector's own)."""
        raise NotImplementedError

    def run_budget(self) -> int:
        """Bytes of temporaries a batched run may hold: BATCH_RUN_BYTES x `run_budget_scale`."""
        return BATCH_RUN_BYTES * self.run_budget_scale

    def run_temporary_bytes(self, shapes: list[tuple[int, int]], dtype: torch.dtype) -> int:
        """The most one batched run of tensors of these shapes holds at once (the planner's
        step phase): `runs`' sizing, the items of a shape up to `run_budget()` (at least one)
        x `run_item_bytes`; 0 for a projector that steps one tensor at a time."""
        if type(self).run_item_bytes is Projector.run_item_bytes:
            return 0
        out = 0
        for shape in set(shapes):
            item = self.run_item_bytes(shape, dtype)
            per_run = max(1, self.run_budget() // item)
            out = max(out, min(shapes.count(shape), per_run) * item)
        return out

    def decay_many_(self, params: list[Tensor], hp: dict, before_update: bool) -> None:
        """`decay_` of several parameters in one multi-tensor kernel."""
        if hp["weight_decay"] and before_update != self.decay_after_update:
            torch._foreach_mul_(params, 1 - hp["lr"] * hp["weight_decay"])

    def decay_(self, param: Tensor, hp: dict, before_update: bool) -> None:
        """W <- W - lr * wd * W, after the update (GaLore's code: on the updated weight) or
        before it (Adafactor's), as `decay_after_update` says."""
        if hp["weight_decay"] and before_update != self.decay_after_update:
            param.mul_(1 - hp["lr"] * hp["weight_decay"])

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """Bytes of this projector's optimizer state for one (m, n) tensor (documented formula)."""
        raise NotImplementedError

    def validate(self, cfg: RunConfig) -> None:
        """`check` on the shapes of every tensor the run would project (a meta build)."""
        self.check(projectable_shapes(cfg))

    def check(self, shapes: dict[str, tuple[int, int]]) -> None:
        """One-line ConfigErrors: the shared keys' ranges, and a rank above the smaller dimension
        of a projected tensor (`shapes`: name -> (out, in); named, with its shape). Subclasses
        add their own checks. `projected_optimizer` calls it with the tensors it was given."""
        o = self.options
        if not isinstance(o, LowRankOptions):
            return
        if o.rank < 1:
            raise ConfigError(f"optim.projector.rank: {o.rank} must be >= 1")
        if o.update_gap < 1:
            raise ConfigError(f"optim.projector.update_gap: {o.update_gap} must be >= 1")
        if not o.scale > 0:
            raise ConfigError(f"optim.projector.scale: {o.scale} must be > 0")
        for name, shape in shapes.items():
            if o.rank > min(shape):
                raise ConfigError(
                    f"optim.projector.rank: {o.rank} is above the smaller dimension of {name} "
                    f"{shape} (at most {min(shape)})"
                )


def projectable_shapes(cfg: RunConfig) -> dict[str, tuple[int, int]]:
    """name -> (out, in) shape of every tensor the run would project (projectable parameters and
    the writers' quantized weights), from a structural (meta) build."""
    from lowrank_train.models import build_model  # lazily: models imports the registries
    from lowrank_train.optim import projectable_tensors, writer_tensors

    model = build_model(cfg, 256, torch.device("meta"))  # the vocabulary is never projected
    shapes = {name: tuple(p.shape) for name, p in projectable_tensors(model).items()}
    return shapes | {name: tuple(w.grad.shape) for name, w in writer_tensors(model).items()}


MOMENT_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}
QUANT_BLOCK = 256  # block of the 8-bit moments (bitsandbytes' optimizer block)
BATCH_RUN_BYTES = 256 * 2**20  # temporaries of one batched run (`Projector.runs`)


def moment_bytes(numel: int, state_dtype: str) -> int:
    """Bytes of one moment of `numel` elements: 4 or 2 a value, or 1 plus an fp32 absmax a block."""
    if state_dtype == "int8":
        return numel + 4 * -(-numel // QUANT_BLOCK)
    return numel * MOMENT_DTYPES[state_dtype].itemsize


def read_moment(state: State, key: str) -> Tensor:
    """A moment as fp32, whatever `optim.state_dtype` stores it as (8-bit: the dynamic map,
    signed for the first moment `exp_avg`, unsigned for the others)."""
    if key + "_absmax" in state:
        return kernels.dequantize_dynamic(
            state[key], state[key + "_absmax"], signed=key == "exp_avg", block_size=QUANT_BLOCK
        )
    return state[key].float()


def store_in_place(state: State, key: str, value: Tensor) -> None:
    """`state[key] = value`, copied into the tensor already there when it has value's shape,
    dtype and device. Long-lived state keeps the block it was first given: a refresh's new
    basis is allocated among the finder's transients, where the caching allocator hands out
    cached blocks with up to 1 MiB unsplit, and it is freed with them."""
    old = state.get(key)
    if isinstance(old, Tensor) and (old.shape, old.dtype, old.device) == (
        value.shape,
        value.dtype,
        value.device,
    ):
        old.copy_(value)
    else:
        state[key] = value


def write_moment(state: State, key: str, value: Tensor, state_dtype: str | None = None) -> None:
    """Store an fp32 moment: in place into an existing slot (its own format), or as a new one in
    `state_dtype` (int8: codes plus a block absmax, `<key>_absmax`)."""
    quantized = key + "_absmax" in state if key in state else state_dtype == "int8"
    if quantized:
        codes, absmax = kernels.quantize_dynamic(
            value, signed=key == "exp_avg", block_size=QUANT_BLOCK
        )
        store_in_place(state, key, codes)
        store_in_place(state, key + "_absmax", absmax)
    elif key in state:
        state[key].copy_(value)  # into its own dtype
    else:
        state[key] = value.to(MOMENT_DTYPES[state_dtype])


def limiter_factor(norm: Tensor, state: State, gamma: float) -> Tensor:
    """The limiter's divisor for an update of norm ||S_t||: max(||S_t|| / ||S_{t-1}||, gamma) / gamma
    (1 on the first step, which only records the norm).

    `state["limiter_norm"]` is the previous limited norm (a 0-d fp32 tensor), updated here.
    Stays on the device: no host sync."""
    previous = state.get("limiter_norm")
    if previous is None:
        factor = torch.ones((), device=norm.device)
    else:
        factor = torch.clamp(norm / (previous + 1e-8), min=gamma) / gamma
    state["limiter_norm"] = norm / factor
    return factor


def limiter_factors(norms: Tensor, states: list[State], gamma: float) -> Tensor:
    """`limiter_factor` of several updates at once: norms (b,) fp32, one state each; each
    state's `limiter_norm` is updated in place (one multi-tensor copy) or created."""
    previous = [s.get("limiter_norm") for s in states]
    if all(p is None for p in previous):
        factors = torch.ones_like(norms)
    elif all(p is not None for p in previous):
        factors = torch.clamp(norms / (torch.stack(previous) + 1e-8), min=gamma) / gamma
    else:  # some tensors are new to the limiter: each as it would be alone
        factors = torch.stack(
            [limiter_factor(n, s, gamma) for n, s in zip(norms, states, strict=True)]
        )
        return factors
    limited = list((norms / factors).unbind())
    if previous[0] is None:
        for state, value in zip(states, limited, strict=True):
            state["limiter_norm"] = value.clone()
    else:
        torch._foreach_copy_(previous, limited)
    return factors


def stacked_adam(grad: Tensor, states: list[State], keys: tuple[str, str], hp: dict) -> Tensor:
    """N = M / (sqrt(V) + eps) of a run's stacked gradient (b, ...), the states' moments under
    `keys` (fp32 or bf16, one tensor each) stacked, stepped by one Adam kernel and copied back
    by one multi-tensor copy each: elementwise, so each slice is what the tensor gets alone."""
    stacked = [torch.stack([s[k] for s in states]) for k in keys]
    beta1, beta2 = hp["betas"]
    update = kernels.adam_update(grad, *stacked, beta1=beta1, beta2=beta2, eps=hp["eps"])
    for key, moment in zip(keys, stacked, strict=True):
        torch._foreach_copy_([s[key] for s in states], list(moment.unbind(0)))
    return update


class LowRankAdam(Projector):
    """The Adam family on a projected gradient, written once (DESIGN.md, "Projector").

    With R = down(G) (the low-rank gradient), per step t:
        M <- b1 M + (1-b1) R,   V <- b2 V + (1-b2) R*R,   N = M / (sqrt(V) + eps)
        direction = c_t * up(N, R, G),   c_t = sqrt(1 - b2^t) / (1 - b1^t)
    (the official codes' HF-style Adam: bias correction folded into the step size). Subclasses
    write `new_basis` and, where their update differs from GaLore's `scale * back(N)`, `up`.
    The moments live in `optim.state_dtype` (fp32, bf16, or 8-bit dynamic-map codes with
    block absmax); the basis in the parameter's dtype, as the official codes keep it, so the
    projections run at the gradient's precision (fp32 on CPU runs, bf16 on GPU ones).
    """

    shared_keys = ("basis",)

    def init_state(self, param: Parameter, name: str) -> State:
        return {"side": side_of(tuple(param.shape)), "name": name, "refreshes": 0}

    def needs_refresh(self, state: State, step: int) -> bool:
        """Refreshes on steps 1, T+1, 2T+1, ... (the counter before its increment, as the codes)."""
        return (step - 1) % self.options.update_gap == 0

    def new_basis(self, grad: Tensor, state: State) -> Tensor:
        """The (d, r) basis for this gradient."""
        raise NotImplementedError

    def refresh(self, grad: Tensor, state: State) -> None:
        basis = self.new_basis(grad, state)
        if not torch.isfinite(basis).all():  # one host sync, at refreshes only
            raise FloatingPointError("the basis finder returned non-finite values")
        self.install(basis, state, grad.dtype)

    def held(self, basis: Tensor, dtype: torch.dtype) -> Tensor:
        """A found basis as it waits for `install` (a batched finder call's bases are installed
        once all of them are known finite): in the stored dtype, its own copy, so neither fp32
        nor the batched output outlives the finder call. `install` then converts nothing."""
        return basis.to(dtype, copy=True)

    def held_basis_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """The bytes `held` keeps for one (d, r) basis of a `shape` tensor (the planner's)."""
        return min(shape) * self.options.rank * dtype.itemsize

    def install(self, basis: Tensor, state: State, dtype: torch.dtype) -> None:
        """Store a new (finite) basis in the parameter's dtype, carrying the moments as
        `moments_at_refresh` says."""
        basis = basis.to(dtype)
        old = state.get("basis")
        if old is not None and "exp_avg" in state:
            self.carry_moments(state, old, basis)
        store_in_place(state, "basis", basis)  # after carry_moments has read the old one
        state["refreshes"] += 1

    def carry_moments(self, state: State, old: Tensor, new: Tensor) -> None:
        """`optim.projector.moments_at_refresh`: keep (the official codes), reset (zero, and
        restart the bias correction), or rotate: M re-expressed in the new basis,
        M T with T = B_old^T B_new (right side; T^T M on the left), and V by the elementwise
        square of T, which keeps it non-negative (V is not a linear quantity: an approximation)."""
        policy = self.options.moments_at_refresh
        if policy == "keep":
            return
        if policy == "reset":
            for key in ("exp_avg", "exp_avg_sq"):
                state[key].zero_()
            for key in ("exp_avg_absmax", "exp_avg_sq_absmax"):
                if key in state:
                    state[key].zero_()
            state["moment_step"] = 0
            return
        transfer = old.float().T @ new.float()  # (r, r)
        for key, t in (("exp_avg", transfer), ("exp_avg_sq", transfer.square())):
            value = read_moment(state, key)
            value = value @ t if state["side"] == "right" else t.T @ value
            if key == "exp_avg_sq":
                value = value.clamp_(min=0)
            write_moment(state, key, value)

    # -- moments in optim.state_dtype --------------------------------------------------------

    def init_moments(self, state: State, shape: torch.Size, device, state_dtype: str) -> None:
        state["moment_step"] = 0
        for key in ("exp_avg", "exp_avg_sq"):
            write_moment(state, key, torch.zeros(shape, device=device), state_dtype)

    # -- the step ----------------------------------------------------------------------------

    def down(self, grad: Tensor, state: State) -> Tensor:
        """R = G B (right) or B^T G (left), at the gradient's precision (padded on CUDA where G's
        rows are misaligned: `gemm.mm`)."""
        basis = self.basis_of(state, grad.dtype)
        return gemm.mm(grad, basis) if state["side"] == "right" else gemm.mm(basis.T, grad)

    def back(self, low: Tensor, state: State) -> Tensor:
        """The full-shape image of a low-rank tensor: X B^T (right) or B X (left)."""
        basis = self.basis_of(state, low.dtype)
        low = low.to(basis.dtype)
        return low @ basis.T if state["side"] == "right" else basis @ low

    def basis_of(self, state: State, dtype: torch.dtype) -> Tensor:
        """The (d, r) basis a step multiplies by, for a full-size operand of `dtype`: the stored
        one, already in the parameter's dtype (Q-GaLore dequantizes its INT4 codes in `dtype`)."""
        return state["basis"]

    def add_back(
        self, base: Tensor, low: Tensor, state: State, alpha: float, inplace: bool = False
    ) -> Tensor:
        """base + alpha * back(low) by one GEMM accumulating onto base (addmm; in place when
        asked): no full-size image of low is formed, scaled or read again (on CUDA, a
        misaligned base takes a padded product and one add: `gemm.addmm`). The basis is taken
        in base's dtype (`basis_of`)."""
        basis = self.basis_of(state, base.dtype)
        low = low.to(basis.dtype)
        a, b = (low, basis.T) if state["side"] == "right" else (basis, low)
        return gemm.addmm(base, a, b, alpha, inplace)

    def up(self, low_update: Tensor, low_grad: Tensor, grad: Tensor, state: State) -> Tensor:
        """GaLore: alpha * N B^T, at the gradient's precision (N is fp32: a full-size product
        in fp32 would be an fp32 GEMM and an fp32 m x n temporary)."""
        return self.back(low_update.to(grad.dtype), state) * self.options.scale

    def direction(self, param: Tensor, grad: Tensor, state: State, step: int, hp: dict) -> Tensor:
        low_update, low_grad, correction = self.moments_step(grad, state, hp)
        return self.up(low_update, low_grad, grad, state) * correction

    def update_(
        self,
        param: Tensor,
        grad: Tensor,
        state: State,
        step: int,
        hp: dict,
        low_grad: Tensor | None = None,
    ) -> None:
        """`low_grad`: R when it was summed over micro-batches in the projected space (then G is
        the last micro-batch's, read only by projectors that do not accumulate projected). The
        same arithmetic as `update_many_` gives the tensor in a run."""
        low_update, low_grad, correction = self.moments_step(grad, state, hp, low_grad)
        self.decay_(param, hp, before_update=True)
        self.add_up_many_(
            [param], low_update[None], low_grad[None], [grad], [state], -hp["lr"] * correction
        )
        self.decay_(param, hp, before_update=False)

    def update_many_(self, items: list[tuple[Tensor, Tensor, State, int]], hp: dict) -> None:
        """`update_` of a group's tensors, run by run (`runs`): the Adam step of a run
        is one kernel on its stacked R (`moments_step_many`), the decay multi-tensor, and the
        projector's `add_up_many_` sees the whole run; each tensor gets what `update_` gives it
        alone, bit for bit (tests/test_batched_steps.py). A whole-model step at 1B is op
        dispatch, not arithmetic: this is what keeps the host ahead of the GPU."""
        for run in self.runs(items):
            params = [p for p, _, _, _ in run]
            grads = [g for _, g, _, _ in run]
            states = [s for _, _, s, _ in run]
            low_update, low_grad, correction = self.moments_step_many(grads, states, hp)
            self.decay_many_(params, hp, before_update=True)
            self.add_up_many_(params, low_update, low_grad, grads, states, -hp["lr"] * correction)
            self.decay_many_(params, hp, before_update=False)

    def add_up_many_(
        self,
        params: list[Tensor],
        low_update: Tensor,
        low_grad: Tensor,
        grads: list[Tensor],
        states: list[State],
        alpha: float,
    ) -> None:
        """W_i += alpha * up(N_i, R_i, G_i) for a run (N, R stacked (b, ...)); GaLore overrides
        it with one accumulating GEMM a tensor, Fira batches its residual's scales."""
        for param, n, r, grad, state in zip(
            params, low_update.unbind(0), low_grad.unbind(0), grads, states, strict=True
        ):
            param.add_(self.up(n, r, grad, state).to(param.dtype), alpha=alpha)

    def run_item_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """A tensor's share of a batched run's temporaries: R, N and the moments stacked, fp32."""
        return 16 * max(shape) * self.options.rank

    def moments_step(
        self, grad: Tensor, state: State, hp: dict, low_grad: Tensor | None = None
    ) -> tuple[Tensor, Tensor, float]:
        """(N, R, c_t): the Adam step on R = down(G) (or the given R), moments updated in place."""
        if low_grad is None:
            low_grad = self.down(grad, state)
        self.ensure_moments(state, low_grad, hp)
        return self.adam(low_grad, state, hp), low_grad, self.advance(state, hp)

    def moments_step_many(
        self, grads: list[Tensor], states: list[State], hp: dict
    ) -> tuple[Tensor, Tensor, float]:
        """`moments_step` of one run (`runs`): N and R stacked (b, ...), and the run's
        c_t. The Adam kernel is elementwise, so each N_i is what `moments_step` gives the
        tensor alone, bit for bit: one launch on the stacked moments (and a stack and a
        multi-tensor copy back) instead of b launches."""
        low_grad = torch.stack([self.down(g, s) for g, s in zip(grads, states, strict=True)])
        for state, low in zip(states, low_grad.unbind(0), strict=True):
            self.ensure_moments(state, low, hp)
        if "exp_avg_absmax" in states[0]:  # 8-bit blocks would straddle two tensors stacked
            parts = [self.adam(r, s, hp) for r, s in zip(low_grad.unbind(0), states, strict=True)]
            low_update = torch.stack(parts)
        else:
            low_update = stacked_adam(low_grad, states, ("exp_avg", "exp_avg_sq"), hp)
        corrections = {self.advance(s, hp) for s in states}  # one value: the runs' key
        return low_update, low_grad, corrections.pop()

    def ensure_moments(self, state: State, low_grad: Tensor, hp: dict) -> None:
        if "exp_avg" not in state:
            self.init_moments(state, low_grad.shape, low_grad.device, hp["state_dtype"])

    def adam(self, low_grad: Tensor, moments: State, hp: dict) -> Tensor:
        """N = M / (sqrt(V) + eps) after the moments' update in place (`moments` holds exp_avg,
        exp_avg_sq and, 8-bit, their absmax)."""
        beta1, beta2 = hp["betas"]
        return kernels.adam_update(
            low_grad,
            moments["exp_avg"],
            moments["exp_avg_sq"],
            beta1=beta1,
            beta2=beta2,
            eps=hp["eps"],
            exp_avg_absmax=moments.get("exp_avg_absmax"),
            exp_avg_sq_absmax=moments.get("exp_avg_sq_absmax"),
            block_size=QUANT_BLOCK,
        )

    def advance(self, state: State, hp: dict) -> float:
        """Count the moments' step; its bias correction c_t = sqrt(1 - b2^t) / (1 - b1^t)."""
        state["moment_step"] += 1
        t = state["moment_step"]
        beta1, beta2 = hp["betas"]
        return (1 - beta2**t) ** 0.5 / (1 - beta1**t)

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """2 moments of D x r in state_dtype + the d x r basis in the parameter's dtype."""
        r = self.options.rank
        d, big = sorted(shape)
        return 2 * moment_bytes(big * r, state_dtype) + d * r * param_bytes


class FullAdam(LowRankAdam):
    """LowRankAdam with the identity map, down(G) = G and up(N) = N: full Adam through the same
    moments code (and `optim.state_dtype`). `build_optimizer` gives it the quantized tensors
    when no projector is set; not a registered name (no projector is `optim.projector.name:
    none`, and for dense tensors `optim.name` picks torch's or bitsandbytes' Adam)."""

    name = "full_adam"
    shared_keys = ()  # no basis: nothing to refresh or broadcast

    @dataclass
    class Config:
        pass

    def init_state(self, param: Parameter, name: str) -> State:
        return {"name": name}

    def needs_refresh(self, state: State, step: int) -> bool:
        return False

    def down(self, grad: Tensor, state: State) -> Tensor:
        return grad

    def up(self, low_update: Tensor, low_grad: Tensor, grad: Tensor, state: State) -> Tensor:
        return low_update

    run_item_bytes = Projector.run_item_bytes  # no runs (`run_temporary_bytes` 0)

    def held_basis_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return 0  # never refreshes

    def update_many_(self, items: list[tuple[Tensor, Tensor, State, int]], hp: dict) -> None:
        """One tensor at a time: R is G itself, and stacking would copy full-size gradients."""
        for param, grad, state, step in items:
            self.update_(param, grad, state, step, hp)

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """2 moments of m x n in state_dtype."""
        return 2 * moment_bytes(shape[0] * shape[1], state_dtype)


PROJECTORS: Registry[Projector] = Registry("projector")
