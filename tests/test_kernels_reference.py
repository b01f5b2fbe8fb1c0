"""The pure-PyTorch references of lowrank_train.kernels: exact codes, round-trip bounds, the
dynamic map's small values, Adam against float64, stochastic rounding's mean."""

import math  # noqa: E402

import pytest  # noqa: E402
import torch

from lowrank_train.kernels import reference as R  # noqa: E402


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ------------------------------------------------------------------------------------ tables


def test_dynamic_map_equals_bitsandbytes():
    bnb = pytest.importorskip(
        "bitsandbytes.functional", reason="needs bitsandbytes' create_dynamic_map"
    )
    for signed in (True, False):
        assert torch.equal(R.dynamic_map(signed), bnb.create_dynamic_map(signed=signed))


def test_dynamic_map_shape():
    s, u = R.dynamic_map(True), R.dynamic_map(False)
    assert s.numel() == u.numel() == 256
    assert torch.all(s[1:] > s[:-1]) and torch.all(u[1:] > u[:-1])
    assert s.max() == 1 and (s == 0).sum() == 1 and s.min() > -1
    assert u.min() == 0 and u.max() == 1 and 0 < u[1] < 1e-6


def test_nf4_table_equals_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="needs bitsandbytes' NF4 table")
    ours = torch.tensor(R.NF4_CODE, dtype=torch.float32)
    assert torch.equal(ours, bnb.get_4bit_type("nf4", device="cpu").float())


# ------------------------------------------------------------------------------ exact codes


def test_int8_exact_codes():
    # absmax 127 -> scale exactly 1, so codes are round-half-away of the values themselves.
    x = torch.tensor([127.0, -127.0, 0.5, -0.5, 1.49, -2.5, 3.0, 0.0])
    codes, scales = R.quantize_int8(x, group_size=8)
    assert scales.tolist() == [1.0]
    assert codes.tolist() == [127, -127, 1, -1, 1, -3, 3, 0]
    assert codes.dtype == torch.int8


def test_int4_exact_codes_and_packing():
    x = torch.tensor([7.0, -7.0, 0.5, -0.5, 2.2, -3.6, 0.0, 1.0])
    packed, scales = R.quantize_int4(x, group_size=8)
    assert scales.tolist() == [1.0]
    q = [7, -7, 1, -1, 2, -4, 0, 1]
    nib = [v + 8 for v in q]
    assert packed.tolist() == [nib[i] | (nib[i + 1] << 4) for i in range(0, 8, 2)]
    assert R.dequantize_int4(packed, scales, (8,), group_size=8).tolist() == [float(v) for v in q]


def test_table_formats_exact_codes():
    # Values that are table entries times absmax quantize to their own index.
    for signed in (True, False):
        table = R.dynamic_map(signed)
        idx = torch.tensor([255, 0, 200, 17, 128, 254, 3, 90])
        codes, absmax = R.quantize_dynamic(table[idx] * 3.0, signed=signed, block_size=8)
        assert absmax.tolist() == [3.0]
        assert codes.long().tolist() == idx.tolist()
    nf4 = torch.tensor(R.NF4_CODE)
    idx = torch.tensor([0, 15, 7, 3, 12, 9, 1, 14])
    packed, scales = R.quantize_nf4(nf4[idx] * 0.25, group_size=8)
    assert scales.tolist() == [0.25]
    nib = idx.tolist()
    assert packed.tolist() == [nib[i] | (nib[i + 1] << 4) for i in range(0, 8, 2)]


def test_ties_go_to_the_lower_code():
    table = R.dynamic_map(True)
    mid = (table[130] + table[131]) / 2
    x = torch.tensor([mid, 1.0])  # absmax 1: v is exactly the midpoint
    codes, _ = R.quantize_dynamic(x, signed=True, block_size=2)
    assert codes[0].item() == 130


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("block", [64, 128, 256])
def test_round_trip_bounds(block):
    x = _randn(6, 431, seed=block)  # 2586 elements: the last block is partial
    blocks = R._blocks(x, block)
    absmax = blocks.abs().amax(1)
    per_elem = lambda b: R._unblock(b, x.numel(), x.shape)  # noqa: E731

    codes, scales = R.quantize_int8(x, block)
    assert scales.shape == (math.ceil(x.numel() / block),)
    err = (R.dequantize_int8(codes, scales, block) - x).abs()
    # half a step of absmax/127, plus fp32 rounding of the product (2^-23 relative)
    assert torch.all(err <= per_elem((absmax / 254 + absmax * 2e-7)[:, None].expand_as(blocks)))

    packed, scales = R.quantize_int4(x, block)
    err = (R.dequantize_int4(packed, scales, x.shape, block) - x).abs()
    assert torch.all(err <= per_elem((absmax / 14 + absmax * 2e-7)[:, None].expand_as(blocks)))

    packed, scales = R.quantize_nf4(x, block)
    gap = torch.diff(torch.tensor(R.NF4_CODE)).max().item()
    err = (R.dequantize_nf4(packed, scales, x.shape, block) - x).abs()
    assert torch.all(err <= per_elem((absmax * (gap / 2 + 2e-7))[:, None].expand_as(blocks)))

    for signed, data in ((True, x), (False, x.abs())):
        codes, am = R.quantize_dynamic(data, signed=signed, block_size=block)
        table = R.dynamic_map(signed)
        deq = R.dequantize_dynamic(codes, am, signed=signed, block_size=block)
        # nearest table value: the error is at most half the gap to the neighbour on its side
        c = codes.reshape(-1).long()
        gaps = torch.maximum(
            table[c] - table[(c - 1).clamp(min=0)], table[(c + 1).clamp(max=255)] - table[c]
        )
        bound = per_elem(am[:, None].expand_as(blocks)).reshape(-1) * (gaps / 2 + 2e-7)
        assert torch.all((deq - data).abs().reshape(-1) <= bound)


def test_bf16_input_is_upcast():
    x = _randn(3, 130, dtype=torch.bfloat16)
    assert torch.equal(R.quantize_int8(x)[0], R.quantize_int8(x.float())[0])
    assert torch.equal(
        R.quantize_dynamic(x, signed=True)[0], R.quantize_dynamic(x.float(), signed=True)[0]
    )


def test_small_second_moments_survive_the_unsigned_map():
    # One large second moment sets the block's absmax; the others span 1e-6 .. 1e-2 of it.
    small = torch.logspace(-6, -2, 255)
    v = torch.cat([torch.ones(1), small])
    codes, absmax = R.quantize_dynamic(v, signed=False, block_size=256)
    deq = R.dequantize_dynamic(codes, absmax, signed=False, block_size=256)
    assert torch.all(deq[1:] > 0)
    rel = ((deq[1:] - small) / small).abs()
    assert rel.max() < 0.75, rel.max()  # at 1e-6 the map's step is ~4.5e-7
    # from 1e-5 up the decade holds >= 4 codes: half a step is < 30% of the value
    assert rel[small > 1e-5].max() < 0.3
    # linear absmax INT8 (step 1/127) rounds every one of them below 1/254 to zero
    lin = R.dequantize_int8(*R.quantize_int8(v, 256), 256)
    assert torch.all(lin[1:][small < 1 / 254] == 0)


# ------------------------------------------------------------------------------------ Adam


def _adam64(g, m, v, b1, b2, eps):
    g, m, v = g.double(), m.double(), v.double()
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return m / (v.sqrt() + eps), m, v


HP = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
U32 = 2.0**-24  # fp32 unit roundoff


def _assert_adam_close(n, m, v, g, m0, v0, *, ulps=8):
    """fp32 Adam against float64 from the same inputs. M's sum can cancel, so its error is
    relative to |b1 M| + |(1-b1) g|, not to M: `ulps` roundings of that magnitude (two products,
    one sum, then sqrt, add and divide for N). V's terms are all >= 0: plain relative error."""
    want_n, want_m, want_v = _adam64(g, m0, v0, 0.9, 0.999, 1e-8)
    mag_m = 0.9 * m0.double().abs() + 0.1 * g.double().abs()
    assert torch.all((m.double() - want_m).abs() <= ulps * U32 * mag_m)
    assert torch.all((v.double() - want_v).abs() <= ulps * U32 * want_v)
    mag_n = mag_m / (want_v.sqrt() + 1e-8) + want_n.abs()
    assert torch.all((n.double() - want_n).abs() <= ulps * U32 * mag_n)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_adam_update_fp32_moments(grad_dtype):
    g = _randn(7, 45, seed=1, dtype=grad_dtype)
    m = _randn(7, 45, seed=2) * 0.1
    v = _randn(7, 45, seed=3).abs() * 0.01
    m0, v0 = m.clone(), v.clone()
    n = R.adam_update(g, m, v, **HP)
    assert n.dtype == torch.float32 and n.shape == g.shape
    _assert_adam_close(n, m, v, g, m0, v0)


def test_adam_update_bf16_moments():
    g = _randn(5, 123, seed=4)
    m = (_randn(5, 123, seed=5) * 0.1).bfloat16()
    v = (_randn(5, 123, seed=6).abs() * 0.01).bfloat16()
    m0, v0 = m.clone(), v.clone()
    want_n, want_m, want_v = _adam64(g, m0, v0, 0.9, 0.999, 1e-8)
    n = R.adam_update(g, m, v, **HP)
    assert m.dtype == torch.bfloat16
    # N comes from the fp32 moments before the bf16 store; the stored moments are the nearest
    # bf16 (half an ulp: 2^-8 relative, 8 significant bits) of the fp32 values (plus their own few fp32 ulps)
    _assert_adam_close(n, want_m.float(), want_v.float(), g, m0, v0)
    torch.testing.assert_close(m.double(), want_m, rtol=2**-8 + 1e-6, atol=1e-30)
    torch.testing.assert_close(v.double(), want_v, rtol=2**-8 + 1e-6, atol=1e-30)


def test_adam_update_8bit_moments():
    g = _randn(6, 431, seed=7)
    m0 = _randn(6, 431, seed=8) * 0.1
    v0 = _randn(6, 431, seed=9).abs() * 0.01
    mc, ma = R.quantize_dynamic(m0, signed=True, block_size=128)
    vc, va = R.quantize_dynamic(v0, signed=False, block_size=128)
    m_in = R.dequantize_dynamic(mc, ma, signed=True, block_size=128)
    v_in = R.dequantize_dynamic(vc, va, signed=False, block_size=128)
    _, want_m, want_v = _adam64(g, m_in, v_in, 0.9, 0.999, 1e-8)
    n = R.adam_update(g, mc, vc, **HP, exp_avg_absmax=ma, exp_avg_sq_absmax=va, block_size=128)
    # N from the fp32 step of the dequantized moments, before re-quantization
    _assert_adam_close(n, want_m.float(), want_v.float(), g, m_in, v_in)
    # the re-quantized state is the nearest code of the step (fp32 ties aside: none here)
    assert torch.equal(mc, R.quantize_dynamic(want_m.float(), signed=True, block_size=128)[0])
    assert torch.equal(vc, R.quantize_dynamic(want_v.float(), signed=False, block_size=128)[0])
    torch.testing.assert_close(ma, R._blocks(want_m.float(), 128).abs().amax(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(va, R._blocks(want_v.float(), 128).abs().amax(1), rtol=1e-6, atol=0)


def test_adam_update_refuses_half_quantized_state():
    g = torch.ones(8)
    with pytest.raises(ValueError, match="both"):
        R.adam_update(
            g, torch.zeros(8, dtype=torch.uint8), torch.zeros(8), **HP, exp_avg_absmax=torch.ones(1)
        )


# ---------------------------------------------------------------------- stochastic rounding

N_DRAWS = 100_000


def test_sr_bf16_unbiased_and_seeded():
    # 1 + 0.3 ulp of bf16 (ulp 2^-7 at 1): round-to-nearest always gives 1.0
    x0 = 1.0 + 0.3 * 2**-7
    x = torch.full((N_DRAWS,), x0)
    y = R.stochastic_round_bf16(x, seed=11).double()
    assert set(y.unique().tolist()) == {1.0, 1.0 + 2**-7}
    se = y.std().item() / math.sqrt(N_DRAWS)
    assert abs(y.mean().item() - x0) < 4 * se, (y.mean().item(), x0, se)
    assert torch.equal(R.stochastic_round_bf16(x, seed=11), R.stochastic_round_bf16(x, seed=11))
    assert not torch.equal(R.stochastic_round_bf16(x, seed=12), R.stochastic_round_bf16(x, seed=11))
    assert not torch.equal(R.stochastic_round_bf16(x, 11, offset=1), R.stochastic_round_bf16(x, 11))
    neg = R.stochastic_round_bf16(-x, seed=11).double()
    assert abs(neg.mean().item() + x0) < 4 * se


def test_sr_int8_unbiased_and_seeded():
    # absmax 127 in every group -> scale 1; the other values sit between codes
    x = torch.full((N_DRAWS,), 3.37)
    x[::250] = 127.0
    codes, scales = R.stochastic_round_int8(x, seed=5, group_size=250)
    assert torch.all(scales == 1.0)
    vals = codes.double()[x != 127.0]
    se = vals.std().item() / math.sqrt(vals.numel())
    assert set(vals.unique().tolist()) == {3.0, 4.0}
    assert abs(vals.mean().item() - 3.37) < 4 * se
    again, _ = R.stochastic_round_int8(x, seed=5, group_size=250)
    assert torch.equal(codes, again)


def test_int8_sr_update_keeps_small_updates_in_the_mean():
    # An update of 0.1 code per step: round-to-nearest would never move W; SR moves it on average.
    w = _randn(4, 250, seed=3)
    codes, scales = R.quantize_int8(w, 250)
    scales0 = scales.clone()
    deq0 = R.dequantize_int8(codes, scales, 250)
    update = torch.full_like(w, 0.1) * scales0.repeat_interleave(250).reshape(w.shape)
    lr, trials = 1.0, 400
    acc = torch.zeros_like(w, dtype=torch.float64)
    for t in range(trials):
        c, s = codes.clone(), scales0.clone()
        R.int8_sr_update(c, s, update, lr=lr, wd=0.0, seed=t, group_size=250)
        acc += R.dequantize_int8(c, s, 250).double()
    mean = acc / trials
    want = (deq0 - lr * update).double()
    # per element the draw is a two-point variable of spread <= one step s; 4 standard errors
    # of the average over all 1000 elements of (mean - want)
    step = scales0.max().item()
    assert abs((mean - want).mean().item()) < 4 * step / math.sqrt(trials * w.numel())
    # in place, returns the same tensors
    c, s = codes.clone(), scales0.clone()
    out = R.int8_sr_update(c, s, update, lr=lr, wd=0.01, seed=0, group_size=250)
    assert out[0] is c and out[1] is s


# ----------------------------------------------------------------------------- matmuls


@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_matmul_references(fmt):
    n, k = 42, 123 * 2  # numel not a multiple of the group: groups cross rows
    w = _randn(n, k, seed=1)
    x = _randn(6, k, seed=2, dtype=torch.bfloat16)
    g = _randn(6, n, seed=3, dtype=torch.bfloat16)
    if fmt == "int8":
        codes, scales = R.quantize_int8(w, 64)
        deq = R.dequantize_int8(codes, scales, 64)
        y = R.int8_matmul(x, codes, scales, 64)
        gx = R.int8_matmul_grad_x(g, codes, scales, 64)
    else:
        quant, dequant, mm, mmg = {
            "int4": (R.quantize_int4, R.dequantize_int4, R.int4_matmul, R.int4_matmul_grad_x),
            "nf4": (R.quantize_nf4, R.dequantize_nf4, R.nf4_matmul, R.nf4_matmul_grad_x),
        }[fmt]
        packed, scales = quant(w, 64)
        deq = dequant(packed, scales, (n, k), 64)
        y = mm(x, packed, scales, (n, k), 64)
        gx = mmg(g, packed, scales, (n, k), 64)
    assert y.dtype == torch.bfloat16 and y.shape == (6, n) and gx.shape == (6, k)
    # fp32 accumulation then one bf16 rounding: 2^-8 relative
    torch.testing.assert_close(y.double(), x.double() @ deq.double().T, rtol=2**-8, atol=1e-5)
    torch.testing.assert_close(gx.double(), g.double() @ deq.double(), rtol=2**-8, atol=1e-5)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_raises_one_line():
    with pytest.raises(ValueError, match="even"):
        R.quantize_int4(torch.ones(7), 4)
    with pytest.raises(ValueError, match="group_size"):
        R.quantize_int8(torch.ones(8), 3)
    codes, scales = R.quantize_int8(torch.ones(10), 4)
    with pytest.raises(ValueError, match="need 3"):
        R.dequantize_int8(codes, scales[:2], 4)
    with pytest.raises(ValueError, match="float32"):
        R.stochastic_round_bf16(torch.ones(4, dtype=torch.bfloat16), seed=0)
    with pytest.raises(ValueError, match="seed"):
        R.stochastic_round_bf16(torch.ones(4), seed=-1)
