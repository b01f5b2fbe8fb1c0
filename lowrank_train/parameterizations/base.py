"""The weight plug point: how a targeted Linear's weight is stored and trained.

A `Parameterization` turns one materialised fp32 `nn.Linear` into a `ParameterizedLinear`
(`convert`), once per targeted layer, while the rest of the model still sits on the meta
device, so no dense copy of the whole model ever exists. The trainer only calls the methods of
`ParameterizedLinear`; it never asks which method it holds.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor, nn

from lowrank_train.registry import Registry
from lowrank_train.seeding import generator

if TYPE_CHECKING:
    from lowrank_train.config import RunConfig


class Writer(Protocol):
    """A quantized tensor as the optimizer sees it (DESIGN.md, "Gradients of quantized weights").

    `tensor` is the stored tensor the optimizer keys its state by (e.g. INT8 codes), `name` its
    name in the model, `grad` the (out, in) side buffer the layer's backward adds g^T x into
    (no parameter: never saved or counted), `weight()` the dequantized W in fp32, and `write`
    applies an update in one pass: W <- SR(deq(W) - lr * (update + wd * deq(W))).
    `release_grad` frees `grad`'s memory and `acquire_grad` gives it back zeroed, keeping the
    same tensor object (the layer's op and compiled graphs hold it): per-layer mode keeps a
    layer's buffer only around that layer's backward.
    """

    name: str
    tensor: Tensor
    grad: Tensor

    def weight(self) -> Tensor: ...

    def write(self, update: Tensor, lr: float, wd: float, step: int) -> None: ...

    def release_grad(self) -> None: ...

    def acquire_grad(self) -> None: ...


def release_storage(t: Tensor) -> None:
    """Free t's memory, keeping the tensor object (the FSDP2 technique): its storage shrinks
    to 0 bytes, so t must not be read or written until `acquire_storage`."""
    t.untyped_storage().resize_(0)


def acquire_storage(t: Tensor) -> None:
    """Give a released t its memory back, zeroed (an allocated t is left as it is)."""
    if not storage_allocated(t):
        t.untyped_storage().resize_(t.numel() * t.element_size())
        # autograd saved t in the forward (its backward adds into it): zeroing fresh memory
        # is not a change it must detect
        with torch.autograd._unsafe_preserve_version_counter(t):
            t.zero_()


def released_tensor(shape, dtype: torch.dtype, device) -> Tensor:
    """A tensor of `shape` without memory: allocated, then released at once (a transient of
    its own size only); on the meta device there is nothing to release."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type != "meta":
        release_storage(t)
    return t


def storage_allocated(t: Tensor) -> bool:
    """Whether t has its memory (False after `release_storage`: touching it would crash)."""
    return t.untyped_storage().nbytes() >= t.numel() * t.element_size()


DRAWS_AHEAD = max(1, min(16, os.cpu_count() or 1))  # fp32 inits drawn at once (one per core)


class ParameterizedLinear(nn.Module):
    """A Linear layer y = x W^T (+ b), W of shape (out_features, in_features), stored its own way."""

    in_features: int
    out_features: int

    def dense_weight(self) -> Tensor:
        """W as one (out, in) tensor, for export and tests; one layer at a time."""
        raise NotImplementedError

    def projectable(self) -> dict[str, nn.Parameter]:
        """2-D parameters a gradient projector may act on (by attribute name)."""
        return {}

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of every tensor this layer stores, by name: parameters and persistent buffers
        (a non-persistent buffer, e.g. a side-buffer gradient, is a gradient, not storage)."""
        buffers = {
            name: b
            for name, b in self.named_buffers(recurse=False)
            if name not in self._non_persistent_buffers_set
        }
        tensors = dict(self.named_parameters(recurse=False)) | buffers
        return {name: t.numel() * t.element_size() for name, t in tensors.items()}

    def transient_bytes(self, padded: bool) -> int:
        """Bytes one forward or grad_x of this layer allocates beyond its output and saved set,
        freed before it returns (e.g. a dequantized W); the planner adds the largest. `padded`:
        whether the target device pads misaligned GEMM operands (`gemm.pads`: CUDA)."""
        return 0

    def step_buffer_bytes(self) -> int:
        """Bytes this layer holds beside its storage through the whole of some steps and the
        work after them (LoQT's captured G, fp32 out x in, on a merge step): the planner adds
        every layer's to a capture step's forward and backward and to the merges after it."""
        return 0

    def merge_workspace_bytes(self) -> int:
        """Bytes one layer's `after_step` work allocates at its peak (LoQT's merged fp32 W, its
        re-quantization and the basis finder's workspace); merges run one layer at a time."""
        return 0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> list[dict]:
        """Periodic work after optimizer step `step` (e.g. LoQT's merge); returns its events.

        Each event is a JSON-ready dict, `{"event": "merge", "step": step, ...}`; the loop
        writes them to metrics.jsonl at the next logging step. A method touches optimizer state
        only through `optimizer.param_state(p)`. The loop calls only layers whose class
        overrides this; the default does nothing and returns [].
        """
        return []

    def steps_uncompiled(self) -> bool:
        """True when the coming step should run uncompiled, its forward differing from the
        usual one (LoQT's capture step, where the user asks): under `train.compile` the loop
        then runs it eagerly, so torch.compile keeps one graph instead of compiling a second
        variant for a rare step. The loop asks before every step, and the planner at build
        time (before step 0), only layers whose class overrides this."""
        return False

    def writers(self) -> dict[str, Writer]:
        """Quantized tensors and how to write updates into them, by attribute name; none by
        default. Having writers is what makes a layer train through lowrank-train's own Adam."""
        return {}


class Parameterization:
    """Base of the registered weight parameterizations. Subclasses set `name` and `Config`."""

    name: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, options: object | None = None):
        self.options = options if options is not None else self.Config()

    def convert(
        self, linear: nn.Linear, name: str, gen: torch.Generator, dtype: torch.dtype
    ) -> ParameterizedLinear:
        """The parameterized layer replacing `linear` (dense init already drawn, in
        `transfer_dtype`), on linear's device; `dtype` is the run's storage dtype, applied where
        the method means it (trained factors and weights in dtype; quantization scales fp32)."""
        raise NotImplementedError

    def transfer_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the fp32 init travels to the device in before `convert`: fp32 here, as
        quantizers and SVDs read the full-precision draw. A method whose `convert` only casts
        returns `dtype`, so the cast runs on the CPU: the device then never holds an fp32 copy
        whose freed blocks the caching allocator would hand, oversized, to later tensors
        (8 MB of the 350M GaLore peak, optim-25a)."""
        return torch.float32

    def validate(self, cfg: RunConfig) -> None:
        """Raise a one-line ConfigError for combinations this method cannot run, worded
        "dotted.key: value and what is allowed"; the resolve step puts the file that set the
        key in front. `self.options` is this run's Config (the user's values)."""


PARAMETERIZATIONS: Registry[Parameterization] = Registry("parameterization")


def init_linear_(linear: nn.Linear, gen: torch.Generator, std: float) -> None:
    """The dense init: W ~ N(0, std^2) (LLaMA's initializer_range), bias 0."""
    with torch.no_grad():
        linear.weight.normal_(0.0, std, generator=gen)
        if linear.bias is not None:
            linear.bias.zero_()


def targeted_linears(
    model: nn.Module, target: list[str]
) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(full name, parent module, attribute, Linear) for every Linear whose attribute is in `target`."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if attr in target and isinstance(child, nn.Linear):
                full = f"{parent_name}.{attr}" if parent_name else attr
                yield full, parent, attr, child


def fp32_linear(meta_linear: nn.Linear) -> nn.Linear:
    """A meta fp32 Linear of `meta_linear`'s shape (no default init to overwrite)."""
    return nn.Linear(
        meta_linear.in_features,
        meta_linear.out_features,
        bias=meta_linear.bias is not None,
        dtype=torch.float32,
        device="meta",
    )


def drawn_linear(meta_linear: nn.Linear, name: str, seed: int, std: float) -> nn.Linear:
    """The fp32 CPU Linear of `meta_linear`'s shape with the dense init drawn from the
    generator of (seed, name): the same values on every device, rank and method."""
    linear = fp32_linear(meta_linear).to_empty(device="cpu")
    init_linear_(linear, generator(seed, name), std)
    return linear


def drawn_ahead(targets, seed: int, std: float) -> Iterator[nn.Linear]:
    """`drawn_linear` of each target in order, DRAWS_AHEAD of them at a time on a thread pool:
    a CPU generator draws on one core, and each target has its own generator, so the values do
    not depend on the pool."""
    with ThreadPoolExecutor(max_workers=DRAWS_AHEAD) as pool:
        pending: deque[Future] = deque()
        for full, _, _, meta_linear in targets:
            pending.append(pool.submit(drawn_linear, meta_linear, full, seed, std))
            if len(pending) == DRAWS_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def swap_linears(
    model: nn.Module,
    parameterization: Parameterization,
    target: list[str],
    seed: int,
    std: float,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Replace each targeted meta-device Linear by `parameterization.convert` of a materialised
    copy.

    Layer by layer: each init is drawn in fp32 on the CPU from its own generator (`drawn_ahead`:
    at most DRAWS_AHEAD + 1 such Linears exist at once), then moved to `device` in the
    method's `transfer_dtype`, where `convert` runs (a quantizer or an SVD of the init runs on
    the GPU; the method's own draws still come from its CPU generator). `convert` applies the
    run's `dtype` as its method means it; this helper only moves the result to `device` (a
    blanket cast would turn fp32 scales bf16). With `device` meta nothing is drawn (a
    structural build, for checks and planning): `convert` then receives a meta Linear and must
    not read its values. Returns the count.
    """
    targets = list(targeted_linears(model, target))
    if not targets:
        raise ValueError(f"no Linear named {target} in the model")
    if device.type == "meta":
        linears: Iterator[nn.Linear] = (fp32_linear(t[3]) for t in targets)
    else:
        linears = drawn_ahead(targets, seed, std)
    for (full, parent, attr, _), linear in zip(targets, linears, strict=True):
        moved = linear.to(device=device, dtype=parameterization.transfer_dtype(dtype))
        layer = parameterization.convert(moved, full, generator(seed, full, "method"), dtype)
        setattr(parent, attr, layer.to(device=device))
    return len(targets)
