"""Q-GaLore (Zhang et al. 2024, arXiv 2407.08296): GaLore with an INT4 basis and a lazy,
layer-adaptive refresh (research/projectors.md section 2).

Projection side, Adam on the projected gradient and alpha are GaLore's (projectors/galore.py).
On top of it:

- The basis is stored INT4: the (d, r) basis flattened row-major into groups of 256, symmetric
  absmax (s = absmax/7, q = clamp(round(x/s), -7, 7)), two codes a byte
  (`kernels.reference.quantize_int4`), in `basis_codes` (uint8) and `basis_scales` (fp32); every
  use dequantizes it, at the gradient's dtype. The official code's quantizer is asymmetric with a
  zero point, stores one code a byte, and clips groups whose values all have one sign (its zero
  point clamps at 0; research 2.4): symmetric absmax keeps them.
- The lazy refresh (research 2.1 step 2): at each scheduled refresh the new basis is computed
  and used; the cosine between the previous and the new leading singular vector (the basis's
  first column, before quantization) is pushed into a queue of `queue_size`; when the queue is
  full and its mean is >= `cos_threshold`, the tensor's gap is multiplied by `gap_growth`. The
  gap never shrinks and the queue is not cleared, so a layer that stays aligned grows its gap at
  every later refresh; the next refresh is at the next multiple of the gap ((t-1) % gap == 0).
  The official code compares signed vectors, and an SVD's sign is arbitrary: an unchanged
  subspace can read as cos -1. The default is |cos|; `signed_cosine: true` is the code's.

The official recipe's inner Adam is 8-bit with betas (0.9, 0.95): the run files set
`optim.state_dtype: int8` and `optim.betas`. Q-GaLore's other half, INT8 weights with stochastic
rounding, is the parameterizations issue's `int8` (`weights.name: int8` with this projector).

State per tensor: the moments (LowRankAdam), `basis_codes`, `basis_scales`, `basis_rows` (d),
`leading` (the previous leading vector, fp32 (d,)), `queue` (fp32 (queue_size,)),
`queue_count` (entries pushed, at most queue_size) and `gap` (the tensor's current gap).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import Parameter

from lowrank_train.config import knob
from lowrank_train.errors import ConfigError
from lowrank_train.kernels import ops as kernels
from lowrank_train.kernels.reference import num_blocks
from lowrank_train.projectors.base import (
    PROJECTORS,
    State,
    SVDOptions,
    moment_bytes,
    store_in_place,
)
from lowrank_train.projectors.galore import SVDProjector

GROUP = 256  # the official --proj_quant group size


def quantize_basis(basis: Tensor) -> tuple[Tensor, Tensor]:
    """(packed INT4 codes, fp32 group scales) of a basis, flattened row-major; an odd number of
    values is padded with one zero (two codes a byte)."""
    flat = basis.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return kernels.quantize_int4(flat, group_size=GROUP)


def dequantize_basis(codes: Tensor, scales: Tensor, shape: tuple[int, int], dtype) -> Tensor:
    """The (d, r) basis the codes stand for, in `dtype` (the pad of an odd count dropped)."""
    flat = kernels.dequantize_int4(codes, scales, (codes.numel() * 2,), GROUP, dtype)
    return flat[: shape[0] * shape[1]].view(shape)


@PROJECTORS.register
class QGaLore(SVDProjector):
    """GaLore with an INT4 basis and a refresh gap that grows while the top direction holds."""

    name = "qgalore"
    accumulates_projected = True  # GaLore's update on the dequantized basis
    shared_keys = ("basis_codes", "basis_scales", "leading", "queue")

    @dataclass
    class Config(SVDOptions):
        # official scripts: GaLore's ranks, T 200, alpha 0.25; cos 0.4, queue 5, gamma 2
        rank: int = knob(128, "rank r of the projected gradient")
        update_gap: int = knob(200, "T: initial steps between SVD refreshes (grows lazily)")
        scale: float = knob(0.25, "alpha: W <- W - lr * alpha * N B^T")
        cos_threshold: float = knob(
            0.4, "the gap grows when the mean cosine of the queue is at least this"
        )
        queue_size: int = knob(5, "refreshes whose leading-vector cosines are averaged")
        gap_growth: int = knob(2, "gamma: the gap's factor when the queue stays aligned")
        signed_cosine: bool = knob(
            False, "compare signed leading vectors as the official code (default |cos|)"
        )

    def check(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().check(shapes)
        o = self.options
        if o.queue_size < 1:
            raise ConfigError(f"optim.projector.queue_size: {o.queue_size} must be >= 1")
        if o.gap_growth < 1:
            raise ConfigError(f"optim.projector.gap_growth: {o.gap_growth} must be >= 1")

    def init_state(self, param: Parameter, name: str) -> State:
        state = super().init_state(param, name)
        state["gap"] = self.options.update_gap
        state["queue"] = torch.zeros(self.options.queue_size, device=param.device)
        state["queue_count"] = 0
        return state

    def needs_refresh(self, state: State, step: int) -> bool:
        """At every multiple of the tensor's current gap: steps 1, gap+1, ... (1-based)."""
        return (step - 1) % state["gap"] == 0

    def basis_of(self, state: State, dtype: torch.dtype) -> Tensor:
        """The dequantized (d, r) basis, in `dtype` (every projection and update reads it).
        Inside a step it is dequantized once: `down` and `add_back` read the same copy, held
        until its run is stepped (`_once`; keyed by the codes tensor, which a refresh
        replaces)."""
        held = self._once.get(id(state)) if self._once is not None else None
        if held is not None and held[0] is state["basis_codes"] and held[1] == dtype:
            return held[2]
        shape = (state["basis_rows"], self.options.rank)
        basis = dequantize_basis(state["basis_codes"], state["basis_scales"], shape, dtype)
        if self._once is not None:
            self._once[id(state)] = (state["basis_codes"], dtype, basis)
        return basis

    _once: dict | None = None  # id(state) -> (codes, dtype, basis) while a step runs

    @contextmanager
    def _dequantized_once(self):
        if self._once is not None:  # already inside a step
            yield
            return
        self._once = {}
        try:
            yield
        finally:
            self._once = None

    def update_(self, param, grad, state, step, hp, low_grad=None) -> None:
        with self._dequantized_once():
            super().update_(param, grad, state, step, hp, low_grad)

    def update_many_(self, items, hp) -> None:
        with self._dequantized_once():
            super().update_many_(items, hp)

    def direction(self, param, grad, state, step, hp) -> Tensor:
        """The writers' path (int8 + qgalore): `down` and `up` share one dequantized basis."""
        with self._dequantized_once():
            return super().direction(param, grad, state, step, hp)

    def add_up_many_(self, params, low_update, low_grad, grads, states, alpha) -> None:
        super().add_up_many_(params, low_update, low_grad, grads, states, alpha)
        if self._once is not None:  # the run is stepped: its bases are not read again
            for state in states:
                self._once.pop(id(state), None)

    def run_item_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """GaLore's share of a run plus the (d, r) basis dequantized in the gradient's dtype,
        held from the run's `down` to its `add_back`."""
        return (
            super().run_item_bytes(shape, dtype) + min(shape) * self.options.rank * dtype.itemsize
        )

    def previous_basis(self, state: State) -> Tensor | None:
        return self.basis_of(state, torch.float32) if "basis_codes" in state else None

    def held(self, basis: Tensor, dtype: torch.dtype) -> Tensor:
        """fp32: `install` quantizes the finder's basis, not a bf16 rounding of it."""
        return basis.to(torch.float32, copy=True)

    def held_basis_bytes(self, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return super().held_basis_bytes(shape, torch.float32)

    def install(self, new: Tensor, state: State, dtype: torch.dtype) -> None:
        """Quantize the (finite) new basis to INT4 and update the lazy gap from its leading
        vector; the moments carried against the dequantized bases."""
        old = self.previous_basis(state)
        # a copy: a view of column 0 would keep the whole fp32 basis alive in state
        leading = new[:, 0].to(torch.float32, copy=True)
        if "leading" in state:
            self.update_gap(
                state, torch.nn.functional.cosine_similarity(state["leading"], leading, dim=0)
            )
        store_in_place(state, "leading", leading)
        codes, scales = quantize_basis(new)
        store_in_place(state, "basis_codes", codes)
        store_in_place(state, "basis_scales", scales)
        state["basis_rows"] = new.shape[0]
        if old is not None and "exp_avg" in state:
            self.carry_moments(state, old, self.basis_of(state, torch.float32))
        state["refreshes"] += 1

    def update_gap(self, state: State, cos: Tensor) -> None:
        """Push the cosine (|cos| unless signed_cosine); grow the gap when the full queue's mean
        reaches the threshold."""
        o = self.options
        value = cos if o.signed_cosine else cos.abs()
        queue = torch.cat([state["queue"][1:], value.reshape(1).to(state["queue"])])
        store_in_place(state, "queue", queue)
        state["queue_count"] = min(state["queue_count"] + 1, o.queue_size)
        if state["queue_count"] == o.queue_size and state["queue"].mean().item() >= o.cos_threshold:
            state["gap"] *= o.gap_growth

    def state_bytes(self, shape: tuple[int, int], state_dtype: str, param_bytes: int) -> int:
        """2 moments of D x r in state_dtype + INT4 codes (d r / 2 bytes, rounded up) + an fp32
        scale per 256 values + the fp32 leading vector (d) + the fp32 queue."""
        r = self.options.rank
        d, big = sorted(shape)
        padded = d * r + (d * r) % 2
        basis = padded // 2 + 4 * num_blocks(padded, GROUP)
        return 2 * moment_bytes(big * r, state_dtype) + basis + 4 * d + 4 * self.options.queue_size
