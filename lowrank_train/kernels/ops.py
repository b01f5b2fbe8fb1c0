"""The public ops: ``torch.library.custom_op`` around each kernel, with fake impls (so
``torch.compile`` traces them without a graph break), autograd for the dequant-matmuls, and
dispatch between the Triton kernels and the references.

Dispatch (``LOWRANK_KERNELS``, read at each call):

- ``auto`` (default): Triton for CUDA tensors, the reference elsewhere. A CUDA call the kernels
  cannot take (a block size that is not a power of two in [16, 8192]) falls back to the
  reference and logs it once.
- ``triton``: always the kernels; CPU tensors need ``TRITON_INTERPRET=1`` (the tests), else a
  one-line ValueError.
- ``reference``: always the references.

``custom_op`` is used rather than ``triton_op``: ``triton_op`` fails ``opcheck`` under the
Triton interpreter, which reads FakeTensor data pointers (environment.md section 3).

Autograd: ``int8_matmul`` / ``int4_matmul`` / ``nf4_matmul`` give ``grad_x = g deq(W)`` (the
``*_matmul_grad_x`` ops, whose own backward is the forward op, so double backward works). Codes
and scales get no gradient: the weight gradient ``g^T x`` of a quantized layer is a bf16 GEMM
into its side buffer, which the layer's own backward op (parameterizations) declares in
``mutates_args``; it is not part of these ops.

Importing this module registers the ops under ``torch.ops.lowrank_train``; it must be imported
once, as ``lowrank_train.kernels.ops`` (see ``__init__.py``).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from . import reference as R
from ._checks import interpreting

log = logging.getLogger(__name__)
_BACKENDS = ("auto", "triton", "reference")
_logged: set[str] = set()


def backend(t: Tensor, block_size: int | None = None, op: str = "") -> str:
    """'triton' or 'reference' for an op on tensor t (see the module docstring)."""
    choice = os.environ.get("LOWRANK_KERNELS", "auto")
    if choice not in _BACKENDS:
        raise ValueError(f"LOWRANK_KERNELS={choice!r}: expected one of {', '.join(_BACKENDS)}")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"LOWRANK_KERNELS=triton: {op} got a tensor on {t.device}; the kernels need CUDA "
                "tensors (or TRITON_INTERPRET=1)"
            )
        return "triton"
    if t.device.type != "cuda":
        return "reference"
    if block_size is not None and (
        block_size < 16 or block_size > 8192 or block_size & (block_size - 1)
    ):
        key = f"{op}:{block_size}"
        if key not in _logged:
            _logged.add(key)
            log.info(
                "%s: block size %d is not a power of two in [16, 8192]; using the reference",
                op,
                block_size,
            )
        return "reference"
    return "triton"


def _nb(numel, block_size: int):
    return -(-numel // block_size)


def _op(name: str, mutates_args=()):
    """``torch.library.custom_op(name, mutates_args=...)`` over the decorated implementation,
    which stays reachable for `_call`'s eager shortcut (with the positions of the arguments it
    mutates)."""

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        params = list(inspect.signature(fn).parameters)
        op.direct, op.mutated = fn, tuple(params.index(a) for a in mutates_args)
        return op

    return wrap


def _call(op, *args):
    """``op(*args)``, or its implementation called directly where the two are the same: not
    while torch.compile traces (the graph needs the op), under no dispatch mode (FakeTensorMode,
    opcheck) and not where autograd would record it (grad mode on and an argument that needs
    grad: autograd needs the op's registration). Grad mode is off inside another custom op's
    implementation (the quantized layers call the dequant-matmuls there, on activations that
    need grad) and in the optimizer's step. The dispatcher's Python hops (autograd,
    ADInplaceOrView, the backend wrapper) cost about 40 us a call on the H200 (2026-12-01),
    hundreds of calls in a 7B per-layer step. Mutated arguments get the version bump the op
    gives them, so autograd still sees the in-place change."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or (
            torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
        )
    ):
        return op(*args)
    out = op.direct(*args)
    for i in op.mutated:
        if args[i] is not None:
            torch.autograd.graph.increment_version(args[i])
    return out


# ------------------------------------------------------------------ quantize / dequantize


@_op("lowrank_train::quantize_int8", mutates_args=())
def _quantize_int8(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    if backend(x, group_size, "quantize_int8") == "triton":
        from . import quant

        return quant.quantize_int8(x, group_size)
    return R.quantize_int8(x, group_size)


@_quantize_int8.register_fake
def _(x, group_size):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(
        _nb(x.numel(), group_size), dtype=torch.float32
    )


@_op("lowrank_train::dequantize_int8", mutates_args=())
def _dequantize_int8(codes: Tensor, scales: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    if backend(codes, group_size, "dequantize_int8") == "triton":
        from . import quant

        return quant.dequantize_int8(codes, scales, group_size, dtype)
    return R.dequantize_int8(codes, scales, group_size, dtype)


@_dequantize_int8.register_fake
def _(codes, scales, group_size, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


def _fake_packed(x, group_size):
    return x.new_empty(x.numel() // 2, dtype=torch.uint8), x.new_empty(
        _nb(x.numel(), group_size), dtype=torch.float32
    )


@_op("lowrank_train::quantize_int4", mutates_args=())
def _quantize_int4(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    if backend(x, group_size, "quantize_int4") == "triton":
        from . import quant

        return quant.quantize_int4(x, group_size)
    return R.quantize_int4(x, group_size)


_quantize_int4.register_fake(_fake_packed)


@_op("lowrank_train::dequantize_int4", mutates_args=())
def _dequantize_int4(
    packed: Tensor, scales: Tensor, shape: Sequence[int], group_size: int, dtype: torch.dtype
) -> Tensor:
    if backend(packed, group_size, "dequantize_int4") == "triton":
        from . import quant

        return quant.dequantize_int4(packed, scales, shape, group_size, dtype)
    return R.dequantize_int4(packed, scales, shape, group_size, dtype)


def _fake_unpacked(packed, scales, shape, group_size, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


_dequantize_int4.register_fake(_fake_unpacked)


@_op("lowrank_train::quantize_nf4", mutates_args=())
def _quantize_nf4(x: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    if backend(x, group_size, "quantize_nf4") == "triton":
        from . import quant

        return quant.quantize_nf4(x, group_size)
    return R.quantize_nf4(x, group_size)


_quantize_nf4.register_fake(_fake_packed)


@_op("lowrank_train::dequantize_nf4", mutates_args=())
def _dequantize_nf4(
    packed: Tensor, scales: Tensor, shape: Sequence[int], group_size: int, dtype: torch.dtype
) -> Tensor:
    if backend(packed, group_size, "dequantize_nf4") == "triton":
        from . import quant

        return quant.dequantize_nf4(packed, scales, shape, group_size, dtype)
    return R.dequantize_nf4(packed, scales, shape, group_size, dtype)


_dequantize_nf4.register_fake(_fake_unpacked)


@_op("lowrank_train::quantize_dynamic", mutates_args=())
def _quantize_dynamic(x: Tensor, signed: bool, block_size: int) -> tuple[Tensor, Tensor]:
    if backend(x, block_size, "quantize_dynamic") == "triton":
        from . import quant

        return quant.quantize_dynamic(x, signed=signed, block_size=block_size)
    return R.quantize_dynamic(x, signed=signed, block_size=block_size)


@_quantize_dynamic.register_fake
def _(x, signed, block_size):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(
        _nb(x.numel(), block_size), dtype=torch.float32
    )


@_op("lowrank_train::dequantize_dynamic", mutates_args=())
def _dequantize_dynamic(
    codes: Tensor, absmax: Tensor, signed: bool, block_size: int, dtype: torch.dtype
) -> Tensor:
    if backend(codes, block_size, "dequantize_dynamic") == "triton":
        from . import quant

        return quant.dequantize_dynamic(
            codes, absmax, signed=signed, block_size=block_size, dtype=dtype
        )
    return R.dequantize_dynamic(codes, absmax, signed=signed, block_size=block_size, dtype=dtype)


@_dequantize_dynamic.register_fake
def _(codes, absmax, signed, block_size, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


# ------------------------------------------------------------------------------ fused Adam


@_op(
    "lowrank_train::adam_update",
    mutates_args=("exp_avg", "exp_avg_sq", "exp_avg_absmax", "exp_avg_sq_absmax"),
)
def _adam_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_absmax: Tensor | None,
    exp_avg_sq_absmax: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    block_size: int,
) -> Tensor:
    kw = dict(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        exp_avg_absmax=exp_avg_absmax,
        exp_avg_sq_absmax=exp_avg_sq_absmax,
        block_size=block_size,
    )
    quant_block = block_size if exp_avg_absmax is not None else None
    if backend(grad, quant_block, "adam_update") == "triton":
        from . import fused_adam

        return fused_adam.adam_update(grad, exp_avg, exp_avg_sq, **kw)
    return R.adam_update(grad, exp_avg, exp_avg_sq, **kw)


@_adam_update.register_fake
def _(grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, beta1, beta2, eps, block_size):
    return grad.new_empty(grad.shape, dtype=torch.float32)


# --------------------------------------------------------------------- stochastic rounding


@_op("lowrank_train::stochastic_round_bf16", mutates_args=())
def _sr_bf16(x: Tensor, seed: int, offset: int) -> Tensor:
    if backend(x, None, "stochastic_round_bf16") == "triton":
        from . import rounding

        return rounding.stochastic_round_bf16(x, seed, offset)
    return R.stochastic_round_bf16(x, seed, offset)


@_sr_bf16.register_fake
def _(x, seed, offset):
    return x.new_empty(x.shape, dtype=torch.bfloat16)


@_op("lowrank_train::stochastic_round_int8", mutates_args=())
def _sr_int8(x: Tensor, seed: int, offset: int, group_size: int) -> tuple[Tensor, Tensor]:
    if backend(x, group_size, "stochastic_round_int8") == "triton":
        from . import rounding

        return rounding.stochastic_round_int8(x, seed, offset, group_size)
    return R.stochastic_round_int8(x, seed, offset, group_size)


@_sr_int8.register_fake
def _(x, seed, offset, group_size):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(
        _nb(x.numel(), group_size), dtype=torch.float32
    )


@_op("lowrank_train::int8_sr_update", mutates_args=("codes", "scales"))
def _int8_sr_update(
    codes: Tensor, scales: Tensor, update: Tensor, lr: float, wd: float, seed: int, group_size: int
) -> None:
    if backend(codes, group_size, "int8_sr_update") == "triton":
        from . import rounding

        rounding.int8_sr_update(
            codes, scales, update, lr=lr, wd=wd, seed=seed, group_size=group_size
        )
    else:
        R.int8_sr_update(codes, scales, update, lr=lr, wd=wd, seed=seed, group_size=group_size)


@_int8_sr_update.register_fake
def _(codes, scales, update, lr, wd, seed, group_size):
    return None


# ----------------------------------------------------------------------- dequant-matmuls


def _mm_impl(name: str, a: Tensor, q: Tensor, s: Tensor, shape, group_size: int) -> Tensor:
    if backend(a, group_size, name) == "triton":
        from . import matmul

        fn = getattr(matmul, name)
    else:
        fn = getattr(R, name)
    if name.startswith("int8"):
        return fn(a, q, s, group_size)
    return fn(a, q, s, shape, group_size)


@_op("lowrank_train::int8_matmul", mutates_args=())
def _int8_matmul(x: Tensor, codes: Tensor, scales: Tensor, group_size: int) -> Tensor:
    return _mm_impl("int8_matmul", x, codes, scales, None, group_size)


@_int8_matmul.register_fake
def _(x, codes, scales, group_size):
    return x.new_empty((*x.shape[:-1], codes.shape[0]))


@_op("lowrank_train::int8_matmul_grad_x", mutates_args=())
def _int8_matmul_grad_x(g: Tensor, codes: Tensor, scales: Tensor, group_size: int) -> Tensor:
    return _mm_impl("int8_matmul_grad_x", g, codes, scales, None, group_size)


@_int8_matmul_grad_x.register_fake
def _(g, codes, scales, group_size):
    return g.new_empty((*g.shape[:-1], codes.shape[1]))


def _setup_int8(ctx, inputs, output):
    _, codes, scales, group_size = inputs
    ctx.save_for_backward(codes, scales)
    ctx.group_size = group_size


def _int8_matmul_backward(ctx, grad):
    codes, scales = ctx.saved_tensors
    return _int8_matmul_grad_x(grad.contiguous(), codes, scales, ctx.group_size), None, None, None


def _int8_matmul_grad_x_backward(ctx, grad):
    codes, scales = ctx.saved_tensors
    return _int8_matmul(grad.contiguous(), codes, scales, ctx.group_size), None, None, None


_int8_matmul.register_autograd(_int8_matmul_backward, setup_context=_setup_int8)
_int8_matmul_grad_x.register_autograd(_int8_matmul_grad_x_backward, setup_context=_setup_int8)


def _define_4bit(fmt: str):
    @_op(f"lowrank_train::{fmt}_matmul", mutates_args=())
    def fwd(
        x: Tensor, packed: Tensor, scales: Tensor, shape: Sequence[int], group_size: int
    ) -> Tensor:
        return _mm_impl(f"{fmt}_matmul", x, packed, scales, shape, group_size)

    @fwd.register_fake
    def _(x, packed, scales, shape, group_size):
        return x.new_empty((*x.shape[:-1], shape[0]))

    @_op(f"lowrank_train::{fmt}_matmul_grad_x", mutates_args=())
    def bwd(
        g: Tensor, packed: Tensor, scales: Tensor, shape: Sequence[int], group_size: int
    ) -> Tensor:
        return _mm_impl(f"{fmt}_matmul_grad_x", g, packed, scales, shape, group_size)

    @bwd.register_fake
    def _(g, packed, scales, shape, group_size):
        return g.new_empty((*g.shape[:-1], shape[1]))

    def setup(ctx, inputs, output):
        _, packed, scales, shape, group_size = inputs
        ctx.save_for_backward(packed, scales)
        ctx.shape, ctx.group_size = list(shape), group_size

    def fwd_backward(ctx, grad):
        packed, scales = ctx.saved_tensors
        return (
            bwd(grad.contiguous(), packed, scales, ctx.shape, ctx.group_size),
            None,
            None,
            None,
            None,
        )

    def bwd_backward(ctx, grad):
        packed, scales = ctx.saved_tensors
        return (
            fwd(grad.contiguous(), packed, scales, ctx.shape, ctx.group_size),
            None,
            None,
            None,
            None,
        )

    fwd.register_autograd(fwd_backward, setup_context=setup)
    bwd.register_autograd(bwd_backward, setup_context=setup)
    return fwd, bwd


_int4_matmul, _int4_matmul_grad_x = _define_4bit("int4")
_nf4_matmul, _nf4_matmul_grad_x = _define_4bit("nf4")


# --------------------------------------------------------------- public, reference's signatures


def quantize_int8(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    return _call(_quantize_int8, x, group_size)


def dequantize_int8(
    codes: Tensor, scales: Tensor, group_size: int = 256, dtype=torch.float32
) -> Tensor:
    return _call(_dequantize_int8, codes, scales, group_size, dtype)


def quantize_int4(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    return _call(_quantize_int4, x, group_size)


def dequantize_int4(
    packed: Tensor, scales: Tensor, shape, group_size: int = 256, dtype=torch.float32
) -> Tensor:
    return _call(_dequantize_int4, packed, scales, list(shape), group_size, dtype)


def quantize_nf4(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    return _call(_quantize_nf4, x, group_size)


def dequantize_nf4(
    packed: Tensor, scales: Tensor, shape, group_size: int = 256, dtype=torch.float32
) -> Tensor:
    return _call(_dequantize_nf4, packed, scales, list(shape), group_size, dtype)


def quantize_dynamic(x: Tensor, *, signed: bool, block_size: int = 256) -> tuple[Tensor, Tensor]:
    return _call(_quantize_dynamic, x, signed, block_size)


def dequantize_dynamic(
    codes: Tensor, absmax: Tensor, *, signed: bool, block_size: int = 256, dtype=torch.float32
) -> Tensor:
    return _call(_dequantize_dynamic, codes, absmax, signed, block_size, dtype)


def adam_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    beta1: float,
    beta2: float,
    eps: float,
    exp_avg_absmax: Tensor | None = None,
    exp_avg_sq_absmax: Tensor | None = None,
    block_size: int = 256,
) -> Tensor:
    """reference.adam_update through the dispatching op (moments updated in place)."""
    return _call(
        _adam_update,
        grad,
        exp_avg,
        exp_avg_sq,
        exp_avg_absmax,
        exp_avg_sq_absmax,
        beta1,
        beta2,
        eps,
        block_size,
    )


def stochastic_round_bf16(x: Tensor, seed: int, offset: int = 0) -> Tensor:
    return _call(_sr_bf16, x, seed, offset)


def stochastic_round_int8(
    x: Tensor, seed: int, offset: int = 0, group_size: int = 256
) -> tuple[Tensor, Tensor]:
    return _call(_sr_int8, x, seed, offset, group_size)


def int8_sr_update(
    codes: Tensor,
    scales: Tensor,
    update: Tensor,
    *,
    lr: float,
    wd: float,
    seed: int,
    group_size: int = 256,
) -> tuple[Tensor, Tensor]:
    """reference.int8_sr_update through the dispatching op: (codes, scales), rewritten in place."""
    _call(_int8_sr_update, codes, scales, update, lr, wd, seed, group_size)
    return codes, scales


def int8_matmul(x: Tensor, codes: Tensor, scales: Tensor, group_size: int = 256) -> Tensor:
    """y = x deq(W)^T, differentiable in x."""
    return _call(_int8_matmul, x, codes, scales, group_size)


def int8_matmul_grad_x(g: Tensor, codes: Tensor, scales: Tensor, group_size: int = 256) -> Tensor:
    return _call(_int8_matmul_grad_x, g, codes, scales, group_size)


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256) -> Tensor:
    """y = x deq(W)^T for INT4 W of ``shape`` (N, K), differentiable in x."""
    return _call(_int4_matmul, x, packed, scales, list(shape), group_size)


def int4_matmul_grad_x(
    g: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256
) -> Tensor:
    return _call(_int4_matmul_grad_x, g, packed, scales, list(shape), group_size)


def nf4_matmul(x: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256) -> Tensor:
    """y = x deq(W)^T for NF4 W of ``shape`` (N, K), differentiable in x."""
    return _call(_nf4_matmul, x, packed, scales, list(shape), group_size)


def nf4_matmul_grad_x(
    g: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256
) -> Tensor:
    return _call(_nf4_matmul_grad_x, g, packed, scales, list(shape), group_size)
