"""Triton kernels against reference.py on random inputs at odd shapes (Triton's interpreter
without CUDA; the compiled kernels on a GPU), and their one-line errors on bad input.

Tolerance table (why each entry is what it is):

| op | CPU (interpreter) | reason |
|---|---|---|
| quantize_* codes, scales | exact | the kernel runs reference.py's fp32 ops in the same order, with correctly rounded division (div_rn) |
| dequantize_* | exact | one fp32 product, then round-to-nearest-even to bf16 done on the bits |
| adam_update N, M, V, codes, absmax | exact | same op order; sqrt_rn vs the reference's sqrt through float64, both correctly rounded |
| stochastic rounding | statistical | different random bits by design: mean within 4 standard errors; scales exact |
| dequant-matmul | SQNR >= 45 dB vs float64 dequantize-then-matmul | the bf16 output's rounding alone gives ~55 dB; fp32 dot under the interpreter adds nothing visible; a wrong scale or nibble lands < 30 dB |

tests/gpu/ holds the GPU rows (fused multiply-adds move boundary values by one code; bf16 dots).
"""

import math  # noqa: E402
import os

import pytest  # noqa: E402
import torch

from lowrank_train.kernels import fused_adam, matmul, quant, rounding  # noqa: E402
from lowrank_train.kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)",
)


def _randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEV)


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    noise = (x.double() - ref).pow(2).sum()
    return float("inf") if noise == 0 else (10 * torch.log10(ref.pow(2).sum() / noise)).item()


SHAPES = [
    (1,),
    (431,),
    (6, 42, 123),
    (1, 431),
    (3, 130),
]  # a dimension of 1, non-multiples of any block
EVEN_SHAPES = [(2,), (6, 42, 123), (2, 431), (3, 130)]
# numel a multiple of 8 (4-bit codes as int32 words, quant._as_words), yet not of any block
WORD_SHAPES = [(8,), (24, 41), (3, 8, 43)]


# ------------------------------------------------------------------ quantize / dequantize


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_codes_at_every_midpoint_and_its_neighbours(signed):
    """The dynamic map's bucket lookup (one gather and one comparison, _tl.nearest_dynamic)
    equals bucketize at its hardest inputs: each midpoint, the floats either side of it, both
    signs, the bucket floor 2^-24 and its neighbours, subnormals, +-0 and +-1. Blocks of 256
    whose absmax is 1, so v = x exactly."""
    mids = R.dynamic_midpoints(signed)
    tiny = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 2.0**-24, 2.0**-25, 1.0, -1.0, 0.5, -0.5])
    around = [mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, -mids - 1)]
    floor = torch.tensor([2.0**-24, -(2.0**-24)])
    around += [torch.nextafter(floor, torch.tensor(1.0)), torch.nextafter(floor, torch.zeros(2))]
    values = torch.cat([tiny, *around])
    values = torch.cat([values, -values])
    pad = (-values.numel()) % 255
    values = torch.cat([values, torch.full((pad,), 0.25)]).reshape(-1, 255)
    x = torch.cat([values, torch.ones(values.shape[0], 1)], dim=1).flatten().to(DEV)
    got, scales = quant.quantize_dynamic(x, signed=signed, block_size=256)
    want, want_scales = R.quantize_dynamic(x, signed=signed, block_size=256)
    assert torch.equal(scales, want_scales) and bool((scales == 1).all())
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [16, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_and_dynamic_exact(shape, block, dtype):
    x = _randn(*shape, seed=block, dtype=dtype)
    for got, want in [
        (quant.quantize_int8(x, block), R.quantize_int8(x, block)),
        (
            quant.quantize_dynamic(x, signed=True, block_size=block),
            R.quantize_dynamic(x, signed=True, block_size=block),
        ),
        (
            quant.quantize_dynamic(x.abs(), signed=False, block_size=block),
            R.quantize_dynamic(x.abs(), signed=False, block_size=block),
        ),
    ]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    codes, scales = R.quantize_int8(x, block)
    for out in (torch.float32, torch.bfloat16):
        assert torch.equal(
            quant.dequantize_int8(codes, scales, block, out),
            R.dequantize_int8(codes, scales, block, out),
        )
    for signed in (True, False):
        c, a = R.quantize_dynamic(x if signed else x.abs(), signed=signed, block_size=block)
        got = quant.dequantize_dynamic(c, a, signed=signed, block_size=block, dtype=torch.bfloat16)
        assert torch.equal(
            got, R.dequantize_dynamic(c, a, signed=signed, block_size=block, dtype=torch.bfloat16)
        )


@pytest.mark.parametrize("shape", EVEN_SHAPES + WORD_SHAPES)
@pytest.mark.parametrize("block", [16, 128])
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_4bit_exact(shape, block, fmt):
    x = _randn(*shape, seed=3, dtype=torch.bfloat16)
    q, dq = getattr(quant, f"quantize_{fmt}"), getattr(quant, f"dequantize_{fmt}")
    rq, rdq = getattr(R, f"quantize_{fmt}"), getattr(R, f"dequantize_{fmt}")
    got, want = q(x, block), rq(x, block)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for out in (torch.float32, torch.bfloat16):
        assert torch.equal(dq(*want, shape, block, out), rdq(*want, shape, block, out))


def test_4bit_codes_take_the_word_path_only_when_whole_and_aligned():
    """Where every int32 word of the packed codes is whole and aligned the kernels read and
    write words; a byte offset or a ragged tail keeps the byte path, with the same result."""
    x = _randn(4, 64, seed=5)
    codes, scales = quant.quantize_int4(x, 64)
    assert quant._as_words(codes, x.numel()) is not None
    assert quant._as_words(codes[:-4], x.numel() - 8) is not None
    assert quant._as_words(codes[1:], x.numel() - 2) is None  # one byte in: misaligned
    assert quant._as_words(codes[:-1], x.numel() - 2) is None  # a partial last word
    shifted = torch.empty(codes.numel() + 1, dtype=torch.uint8, device=codes.device)[1:]
    shifted.copy_(codes)  # the same codes, at an odd address: the byte path
    want = R.dequantize_int4(codes, scales, x.shape, 64, torch.float32)
    assert torch.equal(quant.dequantize_int4(shifted, scales, x.shape, 64, torch.float32), want)
    assert torch.equal(quant.dequantize_int4(codes, scales, x.shape, 64, torch.float32), want)


def test_zero_block_and_tiny_values():
    x = torch.zeros(3, 64, device=DEV)
    x[1, 5] = 1e-30  # a block whose absmax is tiny, a block of zeros
    x[2] = torch.logspace(-6, 0, 64)
    for got, want in [
        (quant.quantize_int8(x, 64), R.quantize_int8(x, 64)),
        (
            quant.quantize_dynamic(x, signed=False, block_size=64),
            R.quantize_dynamic(x, signed=False, block_size=64),
        ),
        (quant.quantize_nf4(x, 64), R.quantize_nf4(x, 64)),
    ]:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ------------------------------------------------------------------------------ fused Adam

HP = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


@pytest.mark.parametrize("state", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("shape", [(1,), (6, 42, 123), (5, 431)])
def test_adam_update_exact(state, shape):
    g = _randn(*shape, seed=1, dtype=torch.bfloat16 if state == "bfloat16" else torch.float32)
    m = _randn(*shape, seed=2, scale=0.1)
    v = _randn(*shape, seed=3, scale=0.1) ** 2
    if state == "int8":
        (mc, ma), (vc, va) = (
            R.quantize_dynamic(m, signed=True, block_size=128),
            R.quantize_dynamic(v, signed=False, block_size=128),
        )
        ref_state = [mc.clone(), vc.clone(), ma.clone(), va.clone()]
        kw = lambda s: dict(exp_avg_absmax=s[2], exp_avg_sq_absmax=s[3], block_size=128)  # noqa: E731
        ker_state = [mc, vc, ma, va]
    else:
        dt = getattr(torch, state)
        ref_state = [m.to(dt), v.to(dt)]
        ker_state = [t.clone() for t in ref_state]
        kw = lambda s: {}  # noqa: E731
    want = R.adam_update(g, ref_state[0], ref_state[1], **HP, **kw(ref_state))
    got = fused_adam.adam_update(g, ker_state[0], ker_state[1], **HP, **kw(ker_state))
    assert got.dtype == torch.float32 and got.shape == g.shape
    assert torch.equal(got, want)
    for a, b in zip(ker_state, ref_state, strict=True):
        assert torch.equal(a, b)


# --------------------------------------------------------------------- stochastic rounding

N_DRAWS = 100_000


def _mean_within(vals: torch.Tensor, target: float, k: float = 4.0) -> None:
    vals = vals.double()
    se = vals.std().item() / math.sqrt(vals.numel())
    assert abs(vals.mean().item() - target) < k * se, (vals.mean().item(), target, se)


@pytest.mark.parametrize("frac", [0.3, 0.9])
def test_sr_bf16_unbiased_reproducible(frac):
    x0 = 1.0 + frac * 2**-7  # between the bf16 neighbours 1 and 1 + 2^-7
    x = torch.full((N_DRAWS,), x0, device=DEV)
    x[1::2] = -x0
    y = rounding.stochastic_round_bf16(x, seed=2**40 + 7)
    assert y.dtype == torch.bfloat16
    assert set(y[::2].double().unique().tolist()) == {1.0, 1.0 + 2**-7}
    _mean_within(y[::2], x0)
    _mean_within(y[1::2], -x0)
    assert torch.equal(y, rounding.stochastic_round_bf16(x, seed=2**40 + 7))
    assert not torch.equal(y, rounding.stochastic_round_bf16(x, seed=2**40 + 8))
    # offset shifts the counter: element i at offset o draws what element i + o draws at 0
    assert torch.equal(
        rounding.stochastic_round_bf16(x[2:], seed=5, offset=2),
        rounding.stochastic_round_bf16(x, seed=5)[2:],
    )
    exact = torch.tensor([1.0, -2.0, 0.0, float("inf")], device=DEV)
    assert torch.equal(rounding.stochastic_round_bf16(exact, seed=1).float(), exact)


def test_sr_int8_unbiased_reproducible():
    x = torch.full((N_DRAWS // 250, 250), 3.37, device=DEV)
    x[:, 0] = 127.0  # scale exactly 1 in every group
    codes, scales = rounding.stochastic_round_int8(
        x.reshape(-1)[: (N_DRAWS // 256) * 256].contiguous(), seed=9, group_size=256
    )
    # groups of 256 over rows of 250: recompute which groups hold a 127 (scale 1) and check those
    flat = x.reshape(-1)[: codes.numel()]
    want_scales = R._blocks(flat, 256).abs().amax(1) / 127.0
    assert torch.equal(scales, want_scales)
    vals = (codes.double() * scales.repeat_interleave(256).double())[flat != 127.0]
    _mean_within(vals, 3.37)
    again, _ = rounding.stochastic_round_int8(flat.contiguous(), seed=9, group_size=256)
    assert torch.equal(codes, again)


def test_int8_sr_update_matches_reference_in_distribution():
    w = _randn(8, 256, seed=4)
    codes, scales = R.quantize_int8(w, 64)
    update = _randn(8, 256, seed=5)
    lr, wd = 0.01, 0.1
    c_k, s_k = rounding.int8_sr_update(
        codes.clone(), scales.clone(), update, lr=lr, wd=wd, seed=3, group_size=64
    )
    c_r, s_r = R.int8_sr_update(
        codes.clone(), scales.clone(), update, lr=lr, wd=wd, seed=3, group_size=64
    )
    assert torch.equal(s_k, s_r)  # the new scales are deterministic
    assert (c_k.int() - c_r.int()).abs().max() <= 1  # the codes differ only in the random bit
    again = rounding.int8_sr_update(  # reproducible by seed (four elements a Philox draw)
        codes.clone(), scales.clone(), update, lr=lr, wd=wd, seed=3, group_size=64
    )[0]
    other = rounding.int8_sr_update(
        codes.clone(), scales.clone(), update, lr=lr, wd=wd, seed=4, group_size=64
    )[0]
    assert torch.equal(c_k, again) and not torch.equal(c_k, other)
    # unbiased: 200 copies of W in one call draw independent bits (distinct Philox counters);
    # their average -> deq(W) - lr (update + wd deq(W))
    trials = 200
    deq0 = R.dequantize_int8(codes, scales, 64)
    exact = deq0 - lr * (update + wd * deq0)
    c, s = rounding.int8_sr_update(
        codes.repeat(trials, 1),
        scales.repeat(trials),
        update.repeat(trials, 1),
        lr=lr,
        wd=wd,
        seed=11,
        group_size=64,
    )
    mean = R.dequantize_int8(c, s, 64).double().reshape(trials, *exact.shape).mean(0)
    err = (mean - exact.double()).mean().item()
    step = s_r.max().item()
    assert abs(err) < 4 * step / math.sqrt(trials * exact.numel())


# ----------------------------------------------------------------------- dequant-matmuls

MATMUL_CASES = [  # (M, N, K, group): odd sizes, a dimension of 1, groups crossing rows or not
    (6, 42, 123 * 2, 64),
    (1, 431, 64, 64),
    (17, 64, 256, 16),
    (5, 33, 128, 128),
    (20, 40, 128, 64),  # 16 rows or more: the unswapped tiles, aligned (the 4-bit pair path)
]
# Against float64 dequantize-then-matmul. The bf16 output alone costs ~55 dB (8 significant bits,
# measured 55.3 on the interpreter); 45 dB leaves 10 dB for the GPU's bf16 operand rounding, and a
# wrong scale, nibble or group index lands far below (< 30 dB).
SQNR_FLOOR_DB = 45.0


def _weights(fmt, n, k, group):
    w = _randn(n, k, seed=n + k)
    if fmt == "int8":
        codes, scales = R.quantize_int8(w, group)
        return (codes, scales), R.dequantize_int8(codes, scales, group)
    packed, scales = getattr(R, f"quantize_{fmt}")(w, group)
    return (packed, scales, (n, k)), getattr(R, f"dequantize_{fmt}")(packed, scales, (n, k), group)


@pytest.mark.parametrize("case", MATMUL_CASES)
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_dequant_matmul_sqnr(case, fmt):
    m, n, k, group = case
    wargs, deq = _weights(fmt, n, k, group)
    x = _randn(2, m, k, seed=1, dtype=torch.bfloat16)  # a leading batch dim
    g = _randn(m, n, seed=2, dtype=torch.bfloat16)
    y = getattr(matmul, f"{fmt}_matmul")(x, *wargs, group)
    gx = getattr(matmul, f"{fmt}_matmul_grad_x")(g, *wargs, group)
    assert y.shape == (2, m, n) and y.dtype == torch.bfloat16 and gx.shape == (m, k)
    y_db = sqnr_db(y, x.double() @ deq.double().T)
    gx_db = sqnr_db(gx, g.double() @ deq.double())
    print(f"{fmt} {case}: forward {y_db:.1f} dB, grad_x {gx_db:.1f} dB")
    assert y_db >= SQNR_FLOOR_DB and gx_db >= SQNR_FLOOR_DB


# ------------------------------------------------------------------------------ bad input


def _one_line(excinfo) -> None:
    assert "\n" not in str(excinfo.value)


def test_bad_input_raises_one_line():
    x = _randn(8, 64)
    cases = [
        (lambda: quant.quantize_int8(x.to(torch.int32), 64), "dtype"),
        (lambda: quant.quantize_int8(x.T, 64), "contiguous"),
        (lambda: quant.quantize_int8(x, 48), "power of two"),
        (lambda: quant.quantize_int4(_randn(7), 16), "even"),
        (
            lambda: quant.dequantize_int8(
                *R.quantize_int8(x, 64)[:1], torch.ones(3, device=DEV), 64
            ),
            "need 8",
        ),
        (
            lambda: quant.dequantize_int4(
                torch.zeros(5, dtype=torch.uint8, device=DEV), torch.ones(1, device=DEV), (3, 4), 16
            ),
            "bytes",
        ),
        (lambda: fused_adam.adam_update(x, x.clone(), x[:4].clone(), **HP), "elements"),
        (lambda: fused_adam.adam_update(x, x.clone(), x.clone().bfloat16(), **HP), "dtype"),
        (
            lambda: fused_adam.adam_update(
                x, x.clone(), x.clone(), **HP, exp_avg_absmax=torch.ones(2, device=DEV)
            ),
            "both",
        ),
        (lambda: rounding.stochastic_round_bf16(x.bfloat16(), seed=0), "dtype"),
        (lambda: rounding.stochastic_round_bf16(x, seed=-3), "seed"),
        (
            lambda: rounding.int8_sr_update(
                *R.quantize_int8(x, 64), x[:2].contiguous(), lr=0.1, wd=0.0, seed=0, group_size=64
            ),
            "elements",
        ),
        (
            lambda: matmul.int8_matmul(_randn(3, 65).bfloat16(), *R.quantize_int8(x, 64), 64),
            "last dim",
        ),
        (
            lambda: matmul.int8_matmul(
                _randn(3, 64).bfloat16(),
                R.quantize_int8(x, 64)[0].reshape(-1),
                torch.ones(8, device=DEV),
                64,
            ),
            "2-D",
        ),
        (
            lambda: matmul.int4_matmul(
                _randn(3, 64).bfloat16(), *R.quantize_int4(x, 64), (8, 63), 64
            ),
            "bytes",
        ),
        (
            lambda: matmul.int8_matmul(_randn(64, 3).bfloat16().T, *R.quantize_int8(x, 64), 64),
            "contiguous",
        ),
        (
            lambda: matmul.nf4_matmul(
                _randn(3, 64).bfloat16(), *R.quantize_nf4(x, 64), (8, 64), 24
            ),
            "power of two",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as excinfo:
            fn()
        _one_line(excinfo)
