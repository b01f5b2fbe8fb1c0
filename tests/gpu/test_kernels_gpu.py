"""The compiled Triton kernels on a GPU against reference.py (run on the CPU copies of the same
inputs), at sizes the interpreter cannot afford. Skipped without CUDA.

GPU tolerance table (why):

| op | tolerance | reason |
|---|---|---|
| quantize_*, dequantize_* | exact | only correctly rounded ops (div_rn, one product, cvt.rn to bf16): nothing for the compiler to contract |
| adam_update N, moments | 4 fp32 ulps of the terms' magnitude (+ one bf16 ulp for bf16 moments) | the compiler may fuse b1*M + (1-b1)*g into an FMA (one rounding fewer), which can move a bf16 store by one ulp |
| adam_update 8-bit codes | <= 1 code, on < 0.1% of elements | an FMA-moved value that sits on a code boundary |
| int8_sr_update scales | 2 fp32 ulps | the block max of FMA-computed values |
| dequant-matmul | SQNR >= 45 dB vs float64 dequantize-then-matmul | bf16 operands and output (8 significant bits, ~55 dB each); fp32 accumulation |
| stochastic rounding | mean within 4 standard errors of 1e6 draws | unbiasedness, as on the CPU |
"""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the compiled kernels)", allow_module_level=True)

from lowrank_train.kernels import fused_adam, matmul, ops, quant, rounding  # noqa: E402
from lowrank_train.kernels import reference as R  # noqa: E402

DEV = "cuda"


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _cpu(t):
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t


def sqnr_db(x, ref):
    ref = ref.double().cpu()
    noise = (x.double().cpu() - ref).pow(2).sum()
    return float("inf") if noise == 0 else (10 * torch.log10(ref.pow(2).sum() / noise)).item()


@pytest.mark.parametrize("block", [64, 128, 256])
@pytest.mark.parametrize("shape", [(1000, 1003), (998, 1001)])  # 4-bit: int32 words, bytes
def test_quantize_dequantize_exact(block, shape):
    x = _randn(*shape, seed=block)  # ~1M elements, a partial last block
    xg = x.to(DEV, copy=True)
    for fmt in ("int8", "int4", "nf4"):
        got = getattr(quant, f"quantize_{fmt}")(xg, block)
        want = getattr(R, f"quantize_{fmt}")(x, block)
        assert torch.equal(_cpu(got[0]), want[0]) and torch.equal(_cpu(got[1]), want[1]), fmt
        args = (got[0], got[1]) if fmt == "int8" else (got[0], got[1], x.shape)
        deq = getattr(quant, f"dequantize_{fmt}")(*args, block, torch.bfloat16)
        rargs = (want[0], want[1]) if fmt == "int8" else (want[0], want[1], x.shape)
        assert torch.equal(
            _cpu(deq), getattr(R, f"dequantize_{fmt}")(*rargs, block, torch.bfloat16)
        ), fmt
    for signed, data in ((True, x), (False, x.abs())):
        got = quant.quantize_dynamic(data.to(DEV, copy=True), signed=signed, block_size=block)
        want = R.quantize_dynamic(data, signed=signed, block_size=block)
        assert torch.equal(_cpu(got[0]), want[0]) and torch.equal(_cpu(got[1]), want[1])


@pytest.mark.parametrize("state", ["float32", "bfloat16", "int8"])
def test_adam_update(state):
    shape = (777, 1029)
    g = _randn(*shape, seed=1, dtype=torch.bfloat16 if state == "bfloat16" else torch.float32)
    m = _randn(*shape, seed=2, scale=0.1)
    v = _randn(*shape, seed=3, scale=0.1) ** 2
    hp = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    if state == "int8":
        (mc, ma), (vc, va) = R.quantize_dynamic(m, signed=True), R.quantize_dynamic(v, signed=False)
        m_in, v_in = (
            R.dequantize_dynamic(mc, ma, signed=True),
            R.dequantize_dynamic(vc, va, signed=False),
        )
        ref = [mc.clone(), vc.clone(), ma.clone(), va.clone()]
        gpu = [t.to(DEV, copy=True) for t in ref]
        n_ref = R.adam_update(
            g, ref[0], ref[1], **hp, exp_avg_absmax=ref[2], exp_avg_sq_absmax=ref[3]
        )
        n = fused_adam.adam_update(
            g.to(DEV, copy=True),
            gpu[0],
            gpu[1],
            **hp,
            exp_avg_absmax=gpu[2],
            exp_avg_sq_absmax=gpu[3],
        )
        for a, b in ((gpu[0], ref[0]), (gpu[1], ref[1])):
            diff = (_cpu(a).int() - b.int()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
        torch.testing.assert_close(_cpu(gpu[2]), ref[2], rtol=4 * 2**-24, atol=0)
        torch.testing.assert_close(_cpu(gpu[3]), ref[3], rtol=4 * 2**-24, atol=0)
    else:
        dt = getattr(torch, state)
        ref = [m.to(dt), v.to(dt)]
        m_in, v_in = ref[0].float(), ref[1].float()
        gpu = [t.to(DEV, copy=True) for t in ref]
        n_ref = R.adam_update(g, ref[0], ref[1], **hp)
        n = fused_adam.adam_update(g.to(DEV, copy=True), gpu[0], gpu[1], **hp)
        # fp32 moments: 4 fp32 ulps of the terms (an FMA rounds once fewer). bf16 moments: that
        # fp32 difference can carry a value across a bf16 rounding midpoint, so the store may
        # land one bf16 ulp away (at most 2^-7 of the value). The first GPU run (H200,
        # 2026-12-01) failed the earlier bound of 2^-8 of the terms; this one has not run there.
        mag = 0.9 * m_in.abs() + 0.1 * g.float().abs()
        bf16_ulp = 2**-7 * ref[0].float().abs() if state == "bfloat16" else 0.0
        assert torch.all(
            (_cpu(gpu[0]).float() - ref[0].float()).abs() <= 4 * 2**-24 * mag + bf16_ulp
        )
    mag_m = 0.9 * m_in.abs() + 0.1 * g.float().abs()
    v_new = 0.999 * v_in + 0.001 * g.float() ** 2
    mag_n = mag_m / (v_new.sqrt() + 1e-8) + n_ref.abs()
    assert torch.all((_cpu(n) - n_ref).abs() <= 8 * 2**-24 * mag_n)


def test_stochastic_rounding_unbiased_on_gpu():
    n_draws = 1_000_000
    x0 = 1.0 + 0.3 * 2**-7
    x = torch.full((n_draws,), x0, device=DEV)
    y = rounding.stochastic_round_bf16(x, seed=123).double()
    se = y.std().item() / math.sqrt(n_draws)
    assert abs(y.mean().item() - x0) < 4 * se
    assert torch.equal(rounding.stochastic_round_bf16(x, seed=123).double(), y)
    xi = torch.full((n_draws // 256, 256), 3.37, device=DEV)
    xi[:, 0] = 127.0
    codes, scales = rounding.stochastic_round_int8(xi.reshape(-1), seed=5)
    assert torch.all(scales == 1.0)
    vals = codes.reshape(xi.shape)[:, 1:].double()
    assert abs(vals.mean().item() - 3.37) < 4 * vals.std().item() / math.sqrt(vals.numel())


def test_int8_sr_update_on_gpu():
    w = _randn(512, 1024, seed=4)
    codes, scales = R.quantize_int8(w)
    update = _randn(512, 1024, seed=5)
    c, s = rounding.int8_sr_update(
        codes.to(DEV, copy=True),
        scales.to(DEV, copy=True),
        update.to(DEV, copy=True),
        lr=0.01,
        wd=0.1,
        seed=7,
    )
    c_r, s_r = R.int8_sr_update(codes.clone(), scales.clone(), update, lr=0.01, wd=0.1, seed=7)
    torch.testing.assert_close(_cpu(s), s_r, rtol=2 * 2**-24, atol=0)
    assert (_cpu(c).int() - c_r.int()).abs().max() <= 1
    deq0 = R.dequantize_int8(codes, scales)
    exact = deq0 - 0.01 * (update + 0.1 * deq0)
    err = (R.dequantize_int8(_cpu(c), _cpu(s)) - exact).double().mean().item()
    assert abs(err) < 4 * s_r.max().item() / math.sqrt(exact.numel())


MATMUL_SHAPES = [
    (1, 4096, 4096, 256),
    (16, 11008, 4096, 256),
    (300, 2048, 5461, 256),
    (2048, 4096, 1024, 128),
]


@pytest.mark.parametrize("shape", MATMUL_SHAPES)
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_dequant_matmul_sqnr_on_gpu(shape, fmt):
    m, n, k, group = shape
    w = _randn(n, k, seed=1)
    x = _randn(m, k, seed=2, dtype=torch.bfloat16)
    g = _randn(m, n, seed=3, dtype=torch.bfloat16)
    if fmt == "int8":
        wargs = R.quantize_int8(w, group)
        deq = R.dequantize_int8(*wargs, group)
    else:
        packed, scales = getattr(R, f"quantize_{fmt}")(w, group)
        wargs = (packed, scales, (n, k))
        deq = getattr(R, f"dequantize_{fmt}")(packed, scales, (n, k), group)
    wg = tuple(t.to(DEV, copy=True) if isinstance(t, torch.Tensor) else t for t in wargs)
    y = getattr(matmul, f"{fmt}_matmul")(x.to(DEV, copy=True), *wg, group)
    gx = getattr(matmul, f"{fmt}_matmul_grad_x")(g.to(DEV, copy=True), *wg, group)
    y_db = sqnr_db(y, x.double() @ deq.double().T)
    gx_db = sqnr_db(gx, g.double() @ deq.double())
    print(f"{fmt} {shape}: forward {y_db:.1f} dB, grad_x {gx_db:.1f} dB")
    assert y_db >= 45 and gx_db >= 45


def test_ops_dispatch_triton_on_cuda(monkeypatch):
    from lowrank_train.kernels import quant as q

    calls = []
    real = q.quantize_int8
    monkeypatch.setattr(q, "quantize_int8", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("LOWRANK_KERNELS", raising=False)
    ops.quantize_int8(torch.randn(64, 64, device=DEV), 64)
    assert calls == [1]


def test_opcheck_on_cuda():
    from torch.library import opcheck

    x = torch.randn(33, 64, device=DEV)
    w = torch.randn(96, 64, device=DEV)
    codes, scales = R.quantize_int8(w.cpu(), 64)
    opcheck(
        ops._int8_matmul,
        (x.bfloat16().requires_grad_(), codes.to(DEV, copy=True), scales.to(DEV, copy=True), 64),
    )
    opcheck(ops._adam_update, (x, x * 0.1, x * x, None, None, 0.9, 0.999, 1e-8, 256))
    opcheck(
        ops._int8_sr_update,
        (codes.to(DEV, copy=True), scales.to(DEV, copy=True), w, 0.1, 0.0, 3, 64),
    )
