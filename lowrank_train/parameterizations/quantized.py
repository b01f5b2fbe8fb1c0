"""The quantized-linear mechanism shared by every quantized weight (`int8`, LoQT's NF4/INT4).

    y = x deq(W)^T,   grad_x = g deq(W),   grad_buffer += g^T x   (g = dL/dy)

W (out, in) is stored as codes and group scales in one of the kernels' formats (`fmt`: int8,
int4, nf4; kernels/reference.py documents each). No full-precision copy of W is held between
forward and backward: the backward saves x, the codes and the scales. Two ways to multiply
(`weights.matmul`):
  * fused: the kernels' dequant-matmuls, which dequantize one tile at a time (no copy of W);
  * dequantize: deq(W) in the activations' dtype by the kernels' dequantize op, then the
    framework's GEMM (cuBLAS on CUDA); the copy lives only inside the op, once in the forward
    and once in grad_x, so at most one layer's m x n transient exists at a time.

An integer tensor cannot carry `.grad`, and a Python callback inside a compiled backward runs
only when it is traced (DESIGN.md, "Gradients of quantized weights"). So the weight gradient is
added into a side buffer by a custom op that declares the buffer in `mutates_args`:
`torch.compile` traces forward and backward without a graph break, micro-batches accumulate
into the buffer, and its consumer (the optimizer's step) runs outside the compiled graph.
A frozen weight (LoQT between merges) passes `grad_buffer=None`: no weight gradient at all.

The backward runs only when something upstream needs a gradient; in the models here the input
of every targeted Linear comes from a trainable norm or projection, so x requires grad.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from lowrank_train import gemm
from lowrank_train.config import knob
from lowrank_train.kernels import ops as kernels
from lowrank_train.parameterizations.base import storage_allocated

FORMATS = ("int8", "int4", "nf4")
MATMULS = ("fused", "dequantize")


def matmul_knob(default: str = "fused"):
    """The `weights.matmul` key of every quantized parameterization (one definition; each
    method picks its default)."""
    return knob(
        default,
        "fused: the dequant-matmul kernels (no copy of W); dequantize: deq(W) then the GEMM of "
        "torch (an m x n transient of one layer, inside the op)",
    )


def _dequantized(codes: Tensor, scales: Tensor, fmt: str, shape, group_size: int, dtype) -> Tensor:
    """deq(W) (out, in) in `dtype` through the kernels' dispatching op of `fmt`."""
    if fmt == "int8":
        return kernels.dequantize_int8(codes, scales, group_size, dtype)
    if fmt == "int4":
        return kernels.dequantize_int4(codes, scales, shape, group_size, dtype)
    return kernels.dequantize_nf4(codes, scales, shape, group_size, dtype)


def _padded_dequantized(
    codes: Tensor, scales: Tensor, fmt: str, shape, group_size: int, dtype, padded: bool
) -> Tensor:
    """deq(W), with zero rows and columns up to gemm's alignment when the operands are padded
    (`quantized_linear`): then every GEMM of the op is aligned."""
    w = _dequantized(codes, scales, fmt, shape, group_size, dtype)
    if not padded:
        return w
    return F.pad(w, (0, gemm.padding(shape[1]), 0, gemm.padding(shape[0])))


def _product(
    a: Tensor,
    codes: Tensor,
    scales: Tensor,
    fmt: str,
    shape,
    group_size: int,
    matmul: str,
    padded: bool,
    grad_x: bool,
) -> Tensor:
    """x deq(W)^T (a = x) or, for `grad_x`, g deq(W) (a = g): the kernels' dequant-matmul of
    `fmt`, or deq(W) then torch's GEMM."""
    if matmul == "dequantize":
        w = _padded_dequantized(codes, scales, fmt, shape, group_size, a.dtype, padded)
        return gemm.matmul(a, w) if grad_x else gemm.linear(a, w)
    if fmt == "int8":
        op = kernels.int8_matmul_grad_x if grad_x else kernels.int8_matmul
        return op(a, codes, scales, group_size)
    four_bit = {
        ("int4", False): kernels.int4_matmul,
        ("int4", True): kernels.int4_matmul_grad_x,
        ("nf4", False): kernels.nf4_matmul,
        ("nf4", True): kernels.nf4_matmul_grad_x,
    }
    if (fmt, grad_x) not in four_bit:
        raise ValueError(f"quantized format {fmt!r} is not one of {', '.join(FORMATS)}")
    return four_bit[fmt, grad_x](a, codes, scales, shape, group_size)


@torch.library.custom_op("lowrank_train::quantized_linear", mutates_args=())
def _quantized_linear(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    fmt: str,
    shape: Sequence[int],
    group_size: int,
    grad_buffer: Tensor | None,
    matmul: str,
    padded: bool,
) -> Tensor:
    # grad_buffer is an input only so that the backward can reach it; the forward reads nothing
    return _product(x, codes, scales, fmt, list(shape), group_size, matmul, padded, False)


@_quantized_linear.register_fake
def _(x, codes, scales, fmt, shape, group_size, grad_buffer, matmul, padded):
    out = shape[0] + (gemm.padding(shape[0]) if padded else 0)
    return x.new_empty((*x.shape[:-1], out))


@torch.library.custom_op("lowrank_train::accumulate_weight_grad", mutates_args=("grad_buffer",))
def _accumulate_weight_grad(grad_buffer: Tensor, g: Tensor, x: Tensor) -> None:
    """grad_buffer (out, in) += g^T x over all leading dimensions of g (..., out), x (..., in)."""
    if not storage_allocated(grad_buffer):  # checked here, not traced: no graph break
        raise RuntimeError(
            f"the {tuple(grad_buffer.shape)} weight-gradient side buffer of a quantized layer is "
            "released (no memory): its writer's acquire_grad must run before its backward"
        )
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    out, inp = grad_buffer.shape
    aligned = all(d % gemm.ROW_ALIGN == 0 for d in grad_buffer.shape)
    unpadded = (g2.shape[1], x2.shape[1]) == (out, inp)
    same_dtype = g2.dtype == x2.dtype == grad_buffer.dtype
    if unpadded and same_dtype and (aligned or not gemm.pads(g2)):
        grad_buffer.addmm_(g2.T, x2)  # accumulates in place: no (out, in) temporary
    else:  # bf16 activations into an fp32 buffer, or padded operands: GEMM, then add
        # (padded: g and x carry zero columns past out and in, so the product's are zero)
        grad_buffer.add_(gemm.mm(g2.T, x2.to(g2.dtype))[:out, :inp])


@_accumulate_weight_grad.register_fake
def _(grad_buffer, g, x):
    return None


def _setup(ctx, inputs, output) -> None:
    x, codes, scales, fmt, shape, group_size, grad_buffer, matmul, padded = inputs
    ctx.fmt, ctx.shape, ctx.group_size, ctx.matmul = fmt, list(shape), group_size, matmul
    ctx.padded = padded
    ctx.has_buffer = grad_buffer is not None
    ctx.save_for_backward(x, codes, scales, grad_buffer)


def _backward(ctx, g: Tensor):
    x, codes, scales, grad_buffer = ctx.saved_tensors
    g = g.contiguous()
    if ctx.has_buffer:
        _accumulate_weight_grad(grad_buffer, g, x)
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = _product(
            g, codes, scales, ctx.fmt, ctx.shape, ctx.group_size, ctx.matmul, ctx.padded, True
        )
    return grad_x, None, None, None, None, None, None, None, None


_quantized_linear.register_autograd(_backward, setup_context=_setup)


def quantized_linear(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    fmt: str,
    shape: Sequence[int],
    group_size: int,
    grad_buffer: Tensor | None,
    matmul: str = "fused",
) -> Tensor:
    """y = x deq(W)^T for a quantized W of `shape` (out, in); differentiable in x.

    `codes`, `scales`: the kernels' storage of `fmt` (int8: codes (out, in); int4, nf4: packed
    uint8 of numel/2), groups of `group_size` over the row-major flattened W. The backward gives
    grad_x = g deq(W) and, when `grad_buffer` ((out, in), fp32 or bf16) is given, adds g^T x
    into it (micro-batches accumulate; whoever consumes it zeroes it). `matmul`: fused or
    dequantize (the module docstring).
    """
    if fmt not in FORMATS:
        raise ValueError(f"quantized format {fmt!r} is not one of {', '.join(FORMATS)}")
    if matmul not in MATMULS:
        raise ValueError(f"quantized matmul {matmul!r} is not one of {', '.join(MATMULS)}")
    out_features, in_features = shape
    # dequantize on a padding device with a misaligned out or in (llama_1b's 5461): x gets
    # zero columns and y is sliced here, outside the op, where inductor fuses both into their
    # neighbours; inside, deq(W) is padded alike, so no GEMM copies an activation (as in
    # sparse.py; the fused kernels take any shape)
    pad_in, pad_out = gemm.padding(in_features), gemm.padding(out_features)
    padded = matmul == "dequantize" and gemm.pads(x) and (pad_in or pad_out) > 0
    if padded and pad_in:
        x = F.pad(x, (0, pad_in))
    y = _quantized_linear(
        x, codes, scales, fmt, list(shape), group_size, grad_buffer, matmul, padded
    )
    return y[..., :out_features] if padded and pad_out else y


def dequantized_bytes(layer_shape, dtype: torch.dtype, matmul: str, padded: bool) -> int:
    """Bytes the op allocates beyond its output: the dequantized W under `dequantize` and,
    where the device pads (`padded`) and out or in is misaligned, its padded copy beside it."""
    out, inp = layer_shape
    if matmul != "dequantize":
        return 0
    pad_out, pad_in = gemm.padding(out), gemm.padding(inp)
    copy = (out + pad_out) * (inp + pad_in) if padded and (pad_out or pad_in) else 0
    return (out * inp + copy) * dtype.itemsize
