"""Pure-PyTorch references of every kernel: the test oracle and the CPU path.

Plain functions, tensor in, tensor out. Every quantizer groups the *flattened* tensor into
blocks of ``block_size`` (or ``group_size``) consecutive elements; the last block may be partial,
so a scale tensor has ``ceil(numel / block_size)`` entries. Math is fp32 whatever the input
dtype (bf16 inputs are upcast first), and each function is written as the exact sequence of fp32
operations its Triton kernel performs, so deterministic codes match the kernels bit for bit
under the Triton interpreter (on a GPU, fused multiply-adds may move a value that sits on a
rounding boundary by one code: the GPU tests allow that, the CPU tests do not).

Formats (code -> value, ``s`` the block's stored scale):

============  =========================  ==================================  ===============
format        stored code                value                               stored scale
============  =========================  ==================================  ===============
dynamic       uint8 index into the map   ``dynamic_map(signed)[c] * s``      absmax (fp32)
int8          int8 in [-127, 127]        ``c * s``                           absmax / 127
int4          nibble ``q + 8``, q in     ``q * s``                           absmax / 7
              [-7, 7]
nf4           nibble index into NF4      ``NF4[c] * s``                      absmax
============  =========================  ==================================  ===============

Nibbles are packed two a byte along the flattened tensor: byte ``i`` holds element ``2i`` in
its low nibble and element ``2i + 1`` in its high nibble (bitsandbytes puts the first element
in the high nibble; the layouts are not interchangeable).

Rounding to a code: linear formats use round-half-away-from-zero, ``sign(v) floor(|v| + 1/2)``;
table formats (dynamic, nf4) take the nearest table value, a value exactly half-way between two
going to the lower one (``torch.bucketize`` over the midpoints, ``right=False``).

Stochastic rounding draws its random bits from a generator seeded by the caller's seed, an
integer the caller derives from (run seed, tensor name, step) with
``lowrank_train.seeding.derived_seed``; ``offset`` shifts the random stream (for a tensor
processed in several calls). This reference and the Triton kernels (Philox through ``tl.rand``)
draw *different* bits for the same seed: each is reproducible for a seed, and both are tested
statistically (unbiasedness), not against each other.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "NF4_CODE",
    "adam_update",
    "dequantize_dynamic",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_nf4",
    "dynamic_map",
    "int4_matmul",
    "int4_matmul_grad_x",
    "int8_matmul",
    "int8_matmul_grad_x",
    "int8_sr_update",
    "nf4_matmul",
    "nf4_matmul_grad_x",
    "num_blocks",
    "quantize_dynamic",
    "quantize_int4",
    "quantize_int8",
    "quantize_nf4",
    "stochastic_round_bf16",
    "stochastic_round_int8",
]

# The 16 NF4 values of QLoRA (Dettmers et al. 2023, appendix E): quantiles of N(0, 1) scaled to
# [-1, 1], with an exact zero. Data, not code: the same table bitsandbytes ships.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def num_blocks(numel: int, block_size: int) -> int:
    """Scales a quantized tensor of ``numel`` elements has: ``ceil(numel / block_size)``."""
    return -(-numel // block_size)


def _check_block(block_size: int, name: str = "block_size") -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"{name} must be an even integer >= 2, got {block_size!r}")


def _blocks(x: Tensor, block_size: int) -> Tensor:
    """x flattened to fp32, zero-padded to whole blocks: shape (num_blocks, block_size)."""
    flat = x.reshape(-1).to(torch.float32)
    pad = num_blocks(flat.numel(), block_size) * block_size - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def _unblock(blocks: Tensor, numel: int, shape) -> Tensor:
    return blocks.reshape(-1)[:numel].reshape(shape)


def _round_half_away(v: Tensor) -> Tensor:
    """sign(v) * floor(|v| + 0.5), the linear formats' rounding, as trunc(v + copysign(0.5, v)):
    the same values (v - 0.5 is exactly -(-v + 0.5)) in three passes instead of seven."""
    return torch.copysign(torch.full_like(v, 0.5), v).add_(v).trunc_()


def _safe(scale: Tensor) -> Tensor:
    """A block of zeros has scale 0; divide by 1 there (its codes are then the zero code)."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


# --------------------------------------------------------------------------------------------
# The 8-bit dynamic map (bitsandbytes' optimizers)
# --------------------------------------------------------------------------------------------


@functools.cache
def _dynamic_map_cpu(signed: bool) -> Tensor:
    # Dettmers et al. 2022 ("8-bit optimizers via block-wise quantization"), section 2: dynamic
    # tree quantization. With 7 "exponent" decades 10^-6 .. 10^0, decade i holds the midpoints of
    # 2^i (signed: each with its negative) or 2^(i+1) (unsigned) equal bins of [0.1, 1], scaled
    # by 10^(i-6); 0 and 1 complete the 256 values. The arithmetic follows
    # bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits=7, total_bits=8) in
    # fp32 (linspace, midpoints, product), so the table equals it bit for bit (tested).
    values: list[Tensor] = []
    for i in range(7):
        bins = 2**i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, bins + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = (10 ** (i - 6)) * mids
        values.append(decade)
        if signed:
            values.append(-decade)
    values.append(torch.tensor([0.0, 1.0]))
    table = torch.cat(values).sort().values
    assert table.numel() == 256
    return table


def dynamic_map(signed: bool) -> Tensor:
    """The 256 code values of the 8-bit dynamic map, float32, sorted ascending.

    ``signed=True``: values in [-0.9930, 1], a single 0 (bitsandbytes' map for the first Adam
    moment); ``signed=False``: values in [0, 1], the smallest non-zero 3.25e-7 (the second
    moment's map). Relative spacing is about constant within each decade, so a value 10^-5 of
    its block's absmax keeps ~2 significant digits where linear absmax INT8 (step 1/127) would
    round it to zero. Equal to ``bitsandbytes.functional.create_dynamic_map(signed)``.
    """
    return _dynamic_map_cpu(bool(signed)).clone()


@functools.cache
def _midpoints_cpu(table: tuple[float, ...] | None, signed: bool = True) -> Tensor:
    q = _dynamic_map_cpu(signed) if table is None else torch.tensor(table, dtype=torch.float32)
    return (q[1:] + q[:-1]) / 2


def dynamic_midpoints(signed: bool) -> Tensor:
    """The 255 fp32 decision boundaries ``(q[j] + q[j+1]) / 2`` of the dynamic map."""
    return _midpoints_cpu(None, bool(signed)).clone()


def nf4_midpoints() -> Tensor:
    """The 15 fp32 decision boundaries of the NF4 table."""
    return _midpoints_cpu(NF4_CODE).clone()


def _nearest(v: Tensor, mids: Tensor) -> Tensor:
    """Index of the nearest table value: the number of midpoints strictly below v."""
    return torch.bucketize(v, mids.to(v.device), right=False)


def quantize_dynamic(x: Tensor, *, signed: bool, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """8-bit block-wise dynamic quantization (non-linear; bitsandbytes' optimizer states).

    Per block b of ``block_size`` consecutive elements of the flattened x:
    ``absmax_b = max |x_i|``, ``code_i = argmin_j |map[j] - x_i / absmax_b|`` (ties to the lower
    j). Returns ``(codes uint8 with x's shape, absmax float32 [ceil(numel / block_size)])``.
    ``signed=False`` expects x >= 0 (a negative value takes code 0, the value 0).
    """
    _check_block(block_size)
    blocks = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)
    v = blocks / _safe(absmax)[:, None]
    codes = _nearest(v, _midpoints_cpu(None, bool(signed)))
    return _unblock(codes.to(torch.uint8), x.numel(), x.shape), absmax


def dequantize_dynamic(
    codes: Tensor,
    absmax: Tensor,
    *,
    signed: bool,
    block_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``x_i = map[code_i] * absmax_b`` in fp32, then cast to ``dtype``; codes' shape."""
    _check_block(block_size)
    _check_scales(codes.numel(), absmax, block_size, "absmax")
    table = _dynamic_map_cpu(bool(signed)).to(codes.device)
    blocks = _blocks(table[codes.reshape(-1).long()], block_size) * absmax.float()[:, None]
    return _unblock(blocks, codes.numel(), codes.shape).to(dtype)


def _check_scales(numel: int, scales: Tensor, block_size: int, what: str = "scales") -> None:
    if scales.numel() != num_blocks(numel, block_size):
        raise ValueError(
            f"{what} has {scales.numel()} entries; {numel} elements in blocks of {block_size} "
            f"need {num_blocks(numel, block_size)}"
        )


# --------------------------------------------------------------------------------------------
# Linear INT8 / INT4 and NF4 (weights)
# --------------------------------------------------------------------------------------------


def quantize_int8(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Symmetric absmax INT8 per group of the flattened x.

    ``s_b = absmax_b / 127``, ``c_i = clamp(round(x_i / s_b), -127, 127)`` (half away from
    zero). Returns ``(codes int8 with x's shape, scales float32 [ceil(numel / group_size)])``.
    """
    _check_block(group_size, "group_size")
    blocks = _blocks(x, group_size)
    scales = blocks.abs().amax(dim=1) / 127.0
    q = _round_half_away(blocks / _safe(scales)[:, None]).clamp_(-127, 127)
    return _unblock(q.to(torch.int8), x.numel(), x.shape), scales


def dequantize_int8(
    codes: Tensor, scales: Tensor, group_size: int = 256, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``x_i = c_i * s_b`` in fp32, cast to ``dtype``; codes' shape."""
    _check_block(group_size, "group_size")
    _check_scales(codes.numel(), scales, group_size)
    blocks = _blocks(codes, group_size) * scales.float()[:, None]
    return _unblock(blocks, codes.numel(), codes.shape).to(dtype)


def _pack(nibbles: Tensor) -> Tensor:
    n = nibbles.reshape(-1).to(torch.uint8)
    return n[0::2] | (n[1::2] << 4)


def _unpack(packed: Tensor) -> Tensor:
    p = packed.reshape(-1)
    return torch.stack([p & 0xF, p >> 4], dim=1).reshape(-1)


def _check_even(numel: int) -> None:
    if numel % 2:
        raise ValueError(f"a 4-bit tensor packs two codes a byte: numel {numel} must be even")


def quantize_int4(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Symmetric absmax INT4, two codes a byte.

    ``s_b = absmax_b / 7``, ``q_i = clamp(round(x_i / s_b), -7, 7)`` (half away from zero),
    stored as the nibble ``q_i + 8``. Returns ``(packed uint8 [numel / 2], scales float32
    [ceil(numel / group_size)])``; numel must be even.
    """
    _check_block(group_size, "group_size")
    _check_even(x.numel())
    blocks = _blocks(x, group_size)
    scales = blocks.abs().amax(dim=1) / 7.0
    q = _round_half_away(blocks / _safe(scales)[:, None]).clamp(-7, 7) + 8
    return _pack(q.reshape(-1)[: x.numel()]), scales


def _shape_numel(shape) -> int:
    return math.prod(tuple(shape))


def _check_packed(packed: Tensor, shape) -> int:
    numel = _shape_numel(shape)
    _check_even(numel)
    if packed.numel() * 2 != numel:
        raise ValueError(
            f"packed has {packed.numel()} bytes; shape {tuple(shape)} needs {numel // 2}"
        )
    return numel


def dequantize_int4(
    packed: Tensor,
    scales: Tensor,
    shape,
    group_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``x_i = (nibble_i - 8) * s_b`` in fp32, cast to ``dtype``, reshaped to ``shape``."""
    _check_block(group_size, "group_size")
    numel = _check_packed(packed, shape)
    _check_scales(numel, scales, group_size)
    q = _unpack(packed).to(torch.float32) - 8.0
    blocks = _blocks(q, group_size) * scales.float()[:, None]
    return _unblock(blocks, numel, tuple(shape)).to(dtype)


def quantize_nf4(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """NF4 (QLoRA's normal-float table), two codes a byte.

    ``s_b = absmax_b``, ``c_i = argmin_j |NF4[j] - x_i / s_b|`` (ties to the lower j). Returns
    ``(packed uint8 [numel / 2], scales float32 [ceil(numel / group_size)])``.
    """
    _check_block(group_size, "group_size")
    _check_even(x.numel())
    blocks = _blocks(x, group_size)
    scales = blocks.abs().amax(dim=1)
    codes = _nearest(blocks / _safe(scales)[:, None], _midpoints_cpu(NF4_CODE))
    return _pack(codes.reshape(-1)[: x.numel()]), scales


def dequantize_nf4(
    packed: Tensor,
    scales: Tensor,
    shape,
    group_size: int = 256,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``x_i = NF4[c_i] * s_b`` in fp32, cast to ``dtype``, reshaped to ``shape``."""
    _check_block(group_size, "group_size")
    numel = _check_packed(packed, shape)
    _check_scales(numel, scales, group_size)
    table = torch.tensor(NF4_CODE, dtype=torch.float32, device=packed.device)
    blocks = _blocks(table[_unpack(packed).long()], group_size) * scales.float()[:, None]
    return _unblock(blocks, numel, tuple(shape)).to(dtype)


# --------------------------------------------------------------------------------------------
# Fused Adam moment step
# --------------------------------------------------------------------------------------------


def _store(dst: Tensor, value: Tensor) -> None:
    dst.copy_(value.reshape(dst.shape))  # fp32 -> bf16 rounds to nearest even, as the kernel


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
    """The elementwise Adam moment step, in place, without bias correction.

    ``M <- b1 M + (1 - b1) g``, ``V <- b2 V + (1 - b2) g^2``, returns
    ``N = M / (sqrt(V) + eps)`` in float32 with grad's shape. The caller folds the bias
    correction ``c_t = sqrt(1 - b2^t) / (1 - b1^t)`` into its step size (as GaLore's and
    APOLLO's code do). All math is fp32 whatever the storage:

    - fp32 or bf16 moments (grad's shape): read, updated, written back in place (bf16 rounds to
      nearest even); N uses the fp32 values *before* that rounding.
    - 8-bit moments: ``exp_avg``/``exp_avg_sq`` are uint8 dynamic-map codes (signed map for M,
      unsigned for V) with ``exp_avg_absmax``/``exp_avg_sq_absmax`` (fp32,
      ``ceil(numel / block_size)``); each block is dequantized, stepped, and re-quantized with
      its new absmax (codes and absmax rewritten in place), N from the fp32 values before
      re-quantization (as bitsandbytes' blockwise 8-bit Adam).

    grad may be bf16 or fp32.
    """
    quantized = exp_avg_absmax is not None
    if quantized != (exp_avg_sq_absmax is not None):
        raise ValueError(
            "pass both exp_avg_absmax and exp_avg_sq_absmax (8-bit moments) or neither"
        )
    if exp_avg.numel() != grad.numel() or exp_avg_sq.numel() != grad.numel():
        raise ValueError(
            f"moments have {exp_avg.numel()} and {exp_avg_sq.numel()} elements; grad has {grad.numel()}"
        )
    g = grad.reshape(-1).to(torch.float32)
    if quantized:
        m = dequantize_dynamic(exp_avg, exp_avg_absmax, signed=True, block_size=block_size)
        v = dequantize_dynamic(exp_avg_sq, exp_avg_sq_absmax, signed=False, block_size=block_size)
        m, v = m.reshape(-1), v.reshape(-1)
    else:
        m = exp_avg.reshape(-1).to(torch.float32)
        v = exp_avg_sq.reshape(-1).to(torch.float32)
    m = m * beta1 + g * (1.0 - beta1)
    v = v * beta2 + (g * g) * (1.0 - beta2)
    # torch's vectorized CPU sqrt is not correctly rounded (~15% of fp32 results 1 ulp off, seen
    # 2026-12-01); through float64 it is (53 >= 2*24 + 2 bits: the double rounding is exact), as
    # the kernels' sqrt_rn.
    n = m / (torch.sqrt(v.double()).float() + eps)
    if quantized:
        codes, absmax = quantize_dynamic(m, signed=True, block_size=block_size)
        _store(exp_avg, codes)
        exp_avg_absmax.copy_(absmax)
        codes, absmax = quantize_dynamic(v, signed=False, block_size=block_size)
        _store(exp_avg_sq, codes)
        exp_avg_sq_absmax.copy_(absmax)
    else:
        _store(exp_avg, m)
        _store(exp_avg_sq, v)
    return n.reshape(grad.shape)


# --------------------------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------------------------


def _generator(seed: int, offset: int, device) -> torch.Generator:
    if not 0 <= seed < 2**63 or not 0 <= offset < 2**63:
        raise ValueError(f"seed and offset must lie in [0, 2**63), got {seed} and {offset}")
    gen = torch.Generator(device=device)
    # The reference's stream for (seed, offset): a fixed odd multiplier keeps distinct offsets of
    # one seed on distinct streams (the kernel instead counts Philox offsets from `offset`).
    gen.manual_seed((seed + offset * 0x9E3779B97F4A7C15) % 2**63)
    return gen


def stochastic_round_bf16(x: Tensor, seed: int, offset: int = 0) -> Tensor:
    """Unbiased fp32 -> bf16: ``E[SR(x)] = x``.

    Adds a uniform random integer r in [0, 2^16) to the fp32 bit pattern and clears the low 16
    bits: x rounds up to the next bf16 value with probability (x - down) / (up - down). Signs are
    sign-magnitude, so negatives round symmetrically; inf stays inf.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_bf16 takes float32, got {x.dtype}")
    r = torch.randint(
        0,
        1 << 16,
        x.shape,
        generator=_generator(seed, offset, x.device),
        dtype=torch.int32,
        device=x.device,
    )
    bits = (x.contiguous().view(torch.int32) + r) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


def stochastic_round_int8(
    x: Tensor, seed: int, offset: int = 0, group_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Unbiased fp32 -> INT8 with fresh block scales (the INT8 format above).

    ``s_b = absmax_b / 127``, ``c_i = clamp(floor(x_i / s_b + u_i), -127, 127)`` with
    u_i ~ U[0, 1): ``E[c_i s_b] = x_i`` (|x_i / s_b| <= 127, so the clamp never binds on exact
    arithmetic). Returns ``(codes int8 with x's shape, scales float32)``.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_int8 takes float32, got {x.dtype}")
    _check_block(group_size, "group_size")
    blocks = _blocks(x, group_size)
    scales = blocks.abs().amax(dim=1) / 127.0
    u = torch.rand(blocks.shape, generator=_generator(seed, offset, x.device), device=x.device)
    q = torch.floor(blocks / _safe(scales)[:, None] + u).clamp(-127, 127)
    return _unblock(q.to(torch.int8), x.numel(), x.shape), scales


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
    """The INT8 writer's step, in place: ``W <- SR(deq(W) - lr * (update + wd * deq(W)))``.

    One pass in fp32 (never bf16: small updates would vanish), the block scales recomputed from
    the new values, one stochastic rounding (``stochastic_round_int8``). ``update`` (fp32 or
    bf16) has codes' shape. Returns ``(codes, scales)``, the same tensors, rewritten.
    """
    if update.numel() != codes.numel():
        raise ValueError(f"update has {update.numel()} elements; codes have {codes.numel()}")
    w = dequantize_int8(codes, scales, group_size)
    w = w - lr * (update.to(torch.float32).reshape(w.shape) + wd * w)
    new_codes, new_scales = stochastic_round_int8(w, seed, group_size=group_size)
    codes.copy_(new_codes)
    scales.copy_(new_scales)
    return codes, scales


# --------------------------------------------------------------------------------------------
# Dequant-matmul
# --------------------------------------------------------------------------------------------


def _times_wt(x: Tensor, w: Tensor) -> Tensor:
    """x W^T with fp32 math, in x's dtype (the forward of every dequant-matmul reference)."""
    return (x.to(torch.float32) @ w.T).to(x.dtype)


def _times_w(g: Tensor, w: Tensor) -> Tensor:
    """g W with fp32 math, in g's dtype (their grad_x)."""
    return (g.to(torch.float32) @ w).to(g.dtype)


def int8_matmul(x: Tensor, codes: Tensor, scales: Tensor, group_size: int = 256) -> Tensor:
    """``y = x deq(W)^T`` for x (..., K) and INT8 W (N, K); fp32 math, y in x's dtype."""
    return _times_wt(x, dequantize_int8(codes, scales, group_size))


def int8_matmul_grad_x(g: Tensor, codes: Tensor, scales: Tensor, group_size: int = 256) -> Tensor:
    """``grad_x = g deq(W)`` for g (..., N) and INT8 W (N, K); fp32 math, in g's dtype."""
    return _times_w(g, dequantize_int8(codes, scales, group_size))


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256) -> Tensor:
    """``y = x deq(W)^T`` for INT4 W of ``shape`` (N, K)."""
    return _times_wt(x, dequantize_int4(packed, scales, shape, group_size))


def int4_matmul_grad_x(
    g: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256
) -> Tensor:
    """``grad_x = g deq(W)`` for INT4 W of ``shape`` (N, K)."""
    return _times_w(g, dequantize_int4(packed, scales, shape, group_size))


def nf4_matmul(x: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256) -> Tensor:
    """``y = x deq(W)^T`` for NF4 W of ``shape`` (N, K)."""
    return _times_wt(x, dequantize_nf4(packed, scales, shape, group_size))


def nf4_matmul_grad_x(
    g: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256
) -> Tensor:
    """``grad_x = g deq(W)`` for NF4 W of ``shape`` (N, K)."""
    return _times_w(g, dequantize_nf4(packed, scales, shape, group_size))
