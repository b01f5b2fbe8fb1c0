"""Triton device functions shared by the kernels. Each mirrors an operation of reference.py
exactly, so deterministic codes agree bit for bit under the interpreter."""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from . import reference as R

# format ids (tl.constexpr FMT)
INT8, INT4, DYN, NF4 = 0, 1, 2, 3


@triton.jit
def round_half_away(v):
    """sign(v) * floor(|v| + 0.5), as reference._round_half_away."""
    return tl.where(v < 0, -tl.floor(-v + 0.5), tl.floor(v + 0.5))


@triton.jit
def nearest(v, mids_ptr, LOG2: tl.constexpr):
    """Index of the nearest table value = the number of the 2^LOG2 - 1 sorted midpoints strictly
    below v (torch.bucketize(v, mids, right=False)), by binary search: LOG2 gathers from a table
    of at most 1 KB, which stays in L1."""
    lo = tl.zeros(v.shape, dtype=tl.int32)
    for s in tl.static_range(LOG2):
        cand = lo + (1 << (LOG2 - 1 - s))
        mid = tl.load(mids_ptr + cand - 1)
        lo = tl.where(mid < v, cand, lo)
    return lo


# The dynamic map's nearest code by one bucket lookup and one comparison, in place of an 8-step
# binary search (8 dependent gathers a value, which ran the 8-bit Adam at 0.19 of copy
# bandwidth on the H200, bench_kernels 2026-12-01). A value v with |v| <= 1 falls in a bucket
# of its fp32 bits: |v|'s bits above 2^-24 (every midpoint is above it), shifted right by
# BUCKET_SHIFT (7 mantissa bits left), mirrored for v < 0 so the buckets are in v's order.
# Each bucket [L, U] holds at most one midpoint (checked where the table is built), so with
# lo = #(midpoints < L) the code is lo + (mids[lo] < v).
_SHIFT, _FLOOR, _ONE = 16, 0x33800000, 0x3F800000  # the fp32 bits of 2^-24 and of 1
_BUCKETS = ((_ONE - _FLOOR) >> _SHIFT) + 1  # |v| <= 1, one side
BUCKET_SHIFT = tl.constexpr(_SHIFT)
BUCKET_FLOOR = tl.constexpr(_FLOOR)
BUCKETS = tl.constexpr(_BUCKETS)
BUCKET_TABLE = tl.constexpr(256)  # where the bucket counts start (after the mids and +inf)


@triton.jit
def nearest_dynamic(v, lookup_ptr):
    """torch.bucketize(v, mids, right=False) for the 255 midpoints of the dynamic map, from
    `lookup` = (mids, +inf, then 2 * BUCKETS bucket counts as fp32): two gathers a value."""
    bits = v.to(tl.int32, bitcast=True)
    k = (tl.maximum(bits & 0x7FFFFFFF, BUCKET_FLOOR) - BUCKET_FLOOR) >> BUCKET_SHIFT
    k = tl.minimum(k, BUCKETS - 1)
    index = tl.where(bits < 0, BUCKETS - 1 - k, BUCKETS + k)
    lo = tl.load(lookup_ptr + BUCKET_TABLE + index).to(tl.int32)
    return lo + (tl.load(lookup_ptr + lo) < v).to(tl.int32)


def dynamic_lookup(mids: torch.Tensor) -> torch.Tensor:
    """nearest_dynamic's buffer for 255 sorted fp32 midpoints: mids, +inf, then per bucket
    (negative side first, in v's order) the count of midpoints below its smallest value."""

    def as_float(bits: torch.Tensor) -> torch.Tensor:
        return bits.to(torch.int32).view(torch.float32)

    k = torch.arange(_BUCKETS, dtype=torch.int64)
    start = _FLOOR + (k << _SHIFT)  # |v| bits where bucket k starts (k > 0)
    end = torch.minimum(start + (1 << _SHIFT) - 1, torch.tensor(_ONE))
    small, large = as_float(torch.where(k == 0, 0, start)), as_float(end)
    # v >= 0: [small, large]; v < 0: [-large, -small], listed from the most negative bucket
    lows = torch.cat([-large.flip(0), small])
    highs = torch.cat([-small.flip(0), large])
    below = (mids[None, :] < lows[:, None]).sum(1)
    inside = (mids[None, :] <= highs[:, None]).sum(1) - below
    if int(inside.max()) > 1:
        raise AssertionError("a dynamic-map bucket holds two midpoints: lower _SHIFT")
    return torch.cat([mids, torch.tensor([math.inf]), below.float()])


@triton.jit
def nf4_value(nib):
    """NF4[nib] by a 4-level select tree in registers. A table gather (tl.load(table + nib))
    inside a matmul's K-loop is software-pipelined into shared memory (4 bytes an element a
    stage: 108-149 KB at our tiles, over sm_89's 99 KB); the selects cost no memory. The
    constants are reference.NF4_CODE (exact fp32 values)."""
    b0 = (nib & 1) != 0
    b1 = (nib & 2) != 0
    b2 = (nib & 4) != 0
    b3 = (nib & 8) != 0
    p0 = tl.where(b0, -0.6961928009986877, -1.0)
    p1 = tl.where(b0, -0.39491748809814453, -0.5250730514526367)
    p2 = tl.where(b0, -0.18477343022823334, -0.28444138169288635)
    p3 = tl.where(b0, 0.0, -0.09105003625154495)
    p4 = tl.where(b0, 0.16093020141124725, 0.07958029955625534)
    p5 = tl.where(b0, 0.33791524171829224, 0.24611230194568634)
    p6 = tl.where(b0, 0.5626170039176941, 0.44070982933044434)
    p7 = tl.where(b0, 1.0, 0.7229568362236023)
    q0 = tl.where(b1, p1, p0)
    q1 = tl.where(b1, p3, p2)
    q2 = tl.where(b1, p5, p4)
    q3 = tl.where(b1, p7, p6)
    r0 = tl.where(b2, q1, q0)
    r1 = tl.where(b2, q3, q2)
    return tl.where(b3, r1, r0)


@triton.jit
def bf16_rne(x):
    """fp32 -> bf16 rounding to nearest even, done on the bits: the interpreter's .to(bf16)
    truncates (environment.md section 3), GPUs round to nearest even; this is exact on both and
    equals torch's conversion (finite values; NaN stays NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def store_as(ptr, x, mask):
    """Store fp32 x into ptr's dtype, rounding to nearest even for bf16."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, bf16_rne(x), mask=mask)
    else:
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@functools.cache
def _tables(device: str) -> dict[str, torch.Tensor]:
    dev = torch.device(device)
    return {
        "dyn_signed": R.dynamic_map(True).to(dev),
        "dyn_unsigned": R.dynamic_map(False).to(dev),
        "dyn_signed_lookup": dynamic_lookup(R.dynamic_midpoints(True)).to(dev),
        "dyn_unsigned_lookup": dynamic_lookup(R.dynamic_midpoints(False)).to(dev),
        "nf4": torch.tensor(R.NF4_CODE, dtype=torch.float32, device=dev),
        "nf4_mids": R.nf4_midpoints().to(dev),
    }


def tables(device: torch.device) -> dict[str, torch.Tensor]:
    """The code tables and their midpoints on `device`, built once per device on first use."""
    return _tables(str(device))
