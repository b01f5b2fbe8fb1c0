"""The shared quantized-linear mechanism: y = x deq(W)^T with grad_x = g deq(W) and the weight
gradient g^T x added into a side buffer by a mutating custom op, against float64 autograd of
x @ deq(W)^T; micro-batches accumulate; the ops pass opcheck; forward and backward compile
without a graph break."""

from __future__ import annotations

import math

import pytest
import torch

from lowrank_train import gemm
from lowrank_train.kernels import ops as kernels
from lowrank_train.parameterizations.quantized import (
    _accumulate_weight_grad,
    _quantized_linear,
    quantized_linear,
)

SHAPE = (6, 160)  # odd groups: 960 elements in groups of 64 -> 15 groups spanning rows
GROUP = 64


def quantized(fmt: str, seed: int = 0):
    """(codes, scales, deq(W) in float64) of a random W of SHAPE in `fmt`."""
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)) * 0.02
    codes, scales = getattr(kernels, f"quantize_{fmt}")(w, GROUP)
    if fmt == "int8":  # the documented format, written here: value = code * scale of its group
        deq = (codes.double().reshape(-1, GROUP) * scales.double()[:, None]).reshape(SHAPE)
    else:  # 4-bit formats are checked against their formulas in test_kernels_reference.py
        deq = getattr(kernels, f"dequantize_{fmt}")(codes, scales, SHAPE, GROUP).double()
    return codes, scales, deq


def float64_reference(x: torch.Tensor, deq: torch.Tensor, upstream: torch.Tensor):
    """(y, grad_x, grad_W) of y = x deq^T by float64 autograd, for the loss sum(y * upstream)."""
    xd = x.detach().double().requires_grad_()
    wd = deq.clone().requires_grad_()
    y = xd @ wd.T
    (y * upstream.double()).sum().backward()
    return y, xd.grad, wd.grad


@pytest.mark.parametrize("matmul", ["fused", "dequantize"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_forward_grad_x_and_weight_gradient_match_float64(fmt, matmul):
    codes, scales, deq = quantized(fmt)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, SHAPE[1], generator=gen).requires_grad_()
    upstream = torch.randn(3, 5, SHAPE[0], generator=gen)
    buffer = torch.zeros(SHAPE)
    y = quantized_linear(x, codes, scales, fmt, SHAPE, GROUP, buffer, matmul)
    (y * upstream).sum().backward()
    y64, gx64, gw64 = float64_reference(x, deq, upstream)
    # fp32 products over K=160 (forward, grad W) and N=6 (grad x) terms of O(1) size: a few ulp
    # of the result's scale, far below 1e-5 relative
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), gx64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffer.double(), gw64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(6, 160), (24, 84), (6, 84)])
@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_padded_dequantize_matches_float64_and_its_gemms_copy_nothing(monkeypatch, fmt, shape):
    """Padding forced (the CUDA path) at misaligned out or in: x gets zero columns and y is
    sliced outside the op, deq(W) is padded inside, and y, grad_x and the side buffer's
    gradient are those of float64; every GEMM inside the op is aligned (gemm would raise)."""
    monkeypatch.setattr(gemm, "pads", lambda t: True)

    def no_copy(a, b):
        raise AssertionError(f"a padded copy inside the op: {a.shape} {a.stride()} {b.shape}")

    monkeypatch.setattr(gemm, "aligned_operands", no_copy)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.02
    codes, scales = getattr(kernels, f"quantize_{fmt}")(w, 12)
    deq = kernels.dequantize_int8(codes, scales, 12) if fmt == "int8" else None
    if deq is None:
        deq = kernels.dequantize_nf4(codes, scales, shape, 12)
    deq = deq.double()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, shape[1], generator=gen).requires_grad_()  # 16 tokens: aligned
    upstream = torch.randn(2, 8, shape[0], generator=gen)
    buffer = torch.zeros(shape)
    y = quantized_linear(x, codes, scales, fmt, shape, 12, buffer, "dequantize")
    assert y.shape == (2, 8, shape[0])
    (y * upstream).sum().backward()
    y64, gx64, gw64 = float64_reference(x, deq, upstream)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), gx64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffer.double(), gw64, rtol=1e-5, atol=1e-5)


def test_micro_batches_accumulate_and_none_gives_no_weight_gradient():
    codes, scales, deq = quantized("int8")
    buffer = torch.zeros(SHAPE)
    total = torch.zeros(SHAPE, dtype=torch.float64)
    for seed in (2, 3):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, SHAPE[1], generator=gen).requires_grad_()
        upstream = torch.randn(4, SHAPE[0], generator=gen)
        (
            quantized_linear(x, codes, scales, "int8", SHAPE, GROUP, buffer) * upstream
        ).sum().backward()
        total += float64_reference(x, deq, upstream)[2]
    torch.testing.assert_close(buffer.double(), total, rtol=1e-5, atol=1e-5)
    # a frozen weight: grad_x only, and the buffer it was not given stays as it was
    kept = buffer.clone()
    x = torch.randn(4, SHAPE[1]).requires_grad_()
    quantized_linear(x, codes, scales, "int8", SHAPE, GROUP, None).sum().backward()
    assert x.grad is not None and torch.equal(buffer, kept)


def test_bf16_activations_accumulate_into_an_fp32_buffer():
    codes, scales, deq = quantized("int8")
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, SHAPE[1], generator=gen).bfloat16().requires_grad_()
    upstream = torch.randn(8, SHAPE[0], generator=gen).bfloat16()
    buffer = torch.zeros(SHAPE)
    y = quantized_linear(x, codes, scales, "int8", SHAPE, GROUP, buffer)
    assert y.dtype == torch.bfloat16
    (y * upstream).sum().backward()
    # the g^T x GEMM of 8 terms is rounded once to bf16 (8 mantissa bits: 2^-8 relative)
    reference = float64_reference(x, deq, upstream)[2]
    torch.testing.assert_close(buffer.double(), reference, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("matmul", ["fused", "dequantize"])
def test_ops_pass_opcheck(matmul):
    codes, scales, _ = quantized("int8")
    x = torch.randn(2, 3, SHAPE[1], requires_grad=True)
    args = (x, codes, scales, "int8", list(SHAPE), GROUP)
    torch.library.opcheck(_quantized_linear, (*args, torch.zeros(SHAPE), matmul, False))
    torch.library.opcheck(_quantized_linear, (*args, None, matmul, False))
    if matmul == "dequantize":  # the padded operands (out 6 -> 8; in 160 is aligned)
        torch.library.opcheck(_quantized_linear, (*args, torch.zeros(SHAPE), matmul, True))
    g = torch.randn(2, 3, SHAPE[0])
    torch.library.opcheck(_accumulate_weight_grad, (torch.zeros(SHAPE), g, x.detach()))


@pytest.mark.parametrize(
    "backend, matmul, padded",
    [
        ("aot_eager", "fused", False),
        ("inductor", "fused", False),
        ("aot_eager", "dequantize", False),
        ("inductor", "dequantize", True),  # CUDA's path: x padded and y sliced outside the op
    ],
)
def test_forward_and_backward_compile_without_a_graph_break(monkeypatch, backend, matmul, padded):
    """fullgraph=True raises at the first graph break; the compiled step gives the eager
    gradients (inductor: the inductor tests of the quantized layers)."""
    if padded:
        monkeypatch.setattr(gemm, "pads", lambda t: True)
    torch._dynamo.reset()
    codes, scales, _ = quantized("int8")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, SHAPE[1], generator=gen)

    def loss(inp, buffer):
        y = quantized_linear(inp, codes, scales, "int8", SHAPE, GROUP, buffer, matmul)
        return y.square().sum()

    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    grads = []
    for fn in (loss, compiled):
        buffer = torch.zeros(SHAPE)
        inp = x.clone().requires_grad_()
        fn(inp, buffer).backward()
        fn(inp, buffer).backward()  # a second micro-batch through the same compiled graph
        grads.append((inp.grad, buffer))
    (gx, gw), (cgx, cgw) = grads
    torch.testing.assert_close(cgx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cgw, gw, rtol=1e-5, atol=1e-6)
    assert gw.abs().sum() > 0


def test_unknown_format_or_matmul_is_refused():
    codes, scales, _ = quantized("int8")
    with pytest.raises(ValueError, match="int5"):
        quantized_linear(torch.randn(2, SHAPE[1]), codes, scales, "int5", SHAPE, GROUP, None)
    with pytest.raises(ValueError, match="tiled"):
        quantized_linear(
            torch.randn(2, SHAPE[1]), codes, scales, "int8", SHAPE, GROUP, None, "tiled"
        )


@pytest.mark.parametrize("matmul", ["fused", "dequantize"])
def test_the_dequantized_copy_is_what_the_layer_declares_and_only_under_dequantize(
    monkeypatch, matmul
):
    """transient_bytes (the planner's figure) against the copies the op really makes: one
    (out, in) deq(W) in the activations' dtype in the forward and one in grad_x, none fused."""
    from lowrank_train.parameterizations import int8
    from lowrank_train.parameterizations import quantized as mechanism

    made = []
    real = mechanism._dequantized

    def recording(*args):
        w = real(*args)
        made.append(w.numel() * w.element_size())
        return w

    monkeypatch.setattr(mechanism, "_dequantized", recording)
    linear = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    layer = int8.Int8(int8.Int8.Config(group_size=GROUP, matmul=matmul)).convert(
        linear, "layer", torch.Generator().manual_seed(0), torch.bfloat16
    )
    layer.writers()["weight"].acquire_grad()
    x = torch.randn(3, SHAPE[1], dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    expected = [SHAPE[0] * SHAPE[1] * 2] * 2 if matmul == "dequantize" else []
    assert made == expected and layer.transient_bytes(padded=False) == max(expected, default=0)


def test_the_padded_copy_is_declared_where_the_device_pads(monkeypatch):
    """Padding forced (CUDA's path): the op holds deq(W) and its padded copy at once, and the
    layer declares both (SHAPE's out, 6, pads to 8)."""
    from lowrank_train.parameterizations import int8
    from lowrank_train.parameterizations import quantized as mechanism

    monkeypatch.setattr(gemm, "pads", lambda t: True)
    made = []
    real = mechanism._padded_dequantized

    def recording(codes, scales, fmt, shape, group_size, dtype, padded):
        w = real(codes, scales, fmt, shape, group_size, dtype, padded)
        made.append((w.numel() + (math.prod(shape) if padded else 0)) * w.element_size())
        return w

    monkeypatch.setattr(mechanism, "_padded_dequantized", recording)
    linear = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False)
    layer = int8.Int8(int8.Int8.Config(group_size=GROUP, matmul="dequantize")).convert(
        linear, "layer", torch.Generator().manual_seed(0), torch.bfloat16
    )
    layer.writers()["weight"].acquire_grad()
    x = torch.randn(2, 8, SHAPE[1], dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()
    both = (6 * 160 + 8 * 160) * 2
    assert made == [both, both] and layer.transient_bytes(padded=True) == both


def test_the_fused_matmuls_skip_the_dispatcher_inside_the_op(monkeypatch):
    """The layer's op calls the dequant-matmul implementations directly (grad mode is off
    inside an op's implementation and in its backward): one direct call each way, no second
    trip through the dispatcher's Python hops (about 40 us a call on the H200)."""
    calls = []
    for op in (kernels._int8_matmul, kernels._int8_matmul_grad_x):
        real = op.direct
        monkeypatch.setattr(op, "direct", lambda *a, _r=real, _n=op: calls.append(_n) or _r(*a))
    codes, scales, _ = quantized("int8")
    x = torch.randn(2, 3, SHAPE[1], requires_grad=True)
    quantized_linear(x, codes, scales, "int8", SHAPE, GROUP, None, "fused").sum().backward()
    assert calls == [kernels._int8_matmul, kernels._int8_matmul_grad_x]
    assert x.grad is not None
