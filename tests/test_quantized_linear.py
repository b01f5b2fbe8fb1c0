"""The shared quantized-linear mechanism: y = x deq(W)^T with grad_x = g deq(W) and the weight
gradient g^T x added into a side buffer by a mutating custom op, against float64 autograd of
x @ deq(W)^T; micro-batches accumulate; the ops pass opcheck; forward and backward compile
without a graph break."""

from __future__ import annotations

import pytest
import torch

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
    torch.library.opcheck(_quantized_linear, (*args, torch.zeros(SHAPE), matmul))
    torch.library.opcheck(_quantized_linear, (*args, None, matmul))
    g = torch.randn(2, 3, SHAPE[0])
    torch.library.opcheck(_accumulate_weight_grad, (torch.zeros(SHAPE), g, x.detach()))


@pytest.mark.parametrize(
    "backend, matmul",
    [("aot_eager", "fused"), ("inductor", "fused"), ("aot_eager", "dequantize")],
)
def test_forward_and_backward_compile_without_a_graph_break(backend, matmul):
    """fullgraph=True raises at the first graph break; the compiled step gives the eager
    gradients (inductor: the one inductor test of the quantized layers)."""
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
    assert made == expected and layer.transient_bytes() == max(expected, default=0)
