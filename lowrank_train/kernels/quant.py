"""Block-wise quantize / dequantize kernels: INT8 and INT4 symmetric absmax, NF4, and the 8-bit
dynamic map. Formats, scales and rounding as reference.py's module docstring says.

One program handles ROWS consecutive blocks as a (ROWS, BLOCK) tile, loaded and stored
contiguously (4-bit formats: the code tile is split into its even and odd elements in registers
to pack a byte, and a byte tile's nibbles interleaved back on the way out; strided loads and
stores of every other element ran 4-bit dequantization at 334 GB/s against a 4,149 GB/s copy on
the H200, bench_kernels, 2026-12-01); the block's absmax is a row reduction, so one pass reads
x once and writes codes and scales once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks as C
from ._tl import (
    DYN,
    INT4,
    INT8,
    NF4,
    nearest,
    nearest_dynamic,
    nf4_value,
    round_half_away,
    store_as,
    tables,
)


@triton.jit
def _codes(x, scale_ok, mids_ptr, FMT: tl.constexpr, LOG2: tl.constexpr):
    """Codes of x (ROWS, COLS) given each row's divisor (absmax or absmax / qmax, 1 if zero)."""
    v = tl.div_rn(x, scale_ok[:, None])
    if FMT == 0:
        return tl.minimum(tl.maximum(round_half_away(v), -127.0), 127.0).to(tl.int32)
    elif FMT == 1:
        return tl.minimum(tl.maximum(round_half_away(v), -7.0), 7.0).to(tl.int32) + 8
    elif FMT == 2:
        return nearest_dynamic(v, mids_ptr)
    else:
        return nearest(v, mids_ptr, LOG2)


@triton.jit
def _scale(absmax, FMT: tl.constexpr):
    if FMT == 0:
        return tl.div_rn(absmax, 127.0)
    elif FMT == 1:
        return tl.div_rn(absmax, 7.0)
    else:
        return absmax


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    mids_ptr,
    numel,
    nblocks,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    LOG2: tl.constexpr,
    WORDS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    x = tl.load(x_ptr + offs, mask=offs < numel, other=0.0).to(tl.float32)  # contiguous
    scale = _scale(tl.max(tl.abs(x), axis=1), FMT)
    ok = tl.where(scale > 0, scale, 1.0)
    codes = _codes(x, ok, mids_ptr, FMT, LOG2)
    if (FMT == 1 or FMT == 3) and WORDS:  # q_ptr: int32 words, element 8w + i at bits 4i
        nibbles = tl.reshape(codes, (ROWS, BLOCK // 8, 8)) << (4 * tl.arange(0, 8))[None, None, :]
        words = tl.sum(nibbles, axis=2)  # disjoint bit fields: the sum is their OR
        pos = rows[:, None].to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]
        tl.store(q_ptr + pos, words, mask=pos * 8 < numel)  # numel % 8 == 0 here
    elif FMT == 1 or FMT == 3:  # element 2i in the low nibble of byte i, 2i + 1 in the high one
        lo, hi = tl.split(tl.reshape(codes, (ROWS, BLOCK // 2, 2)))
        pos = rows[:, None].to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        # numel is even: a byte's two elements are both in range or both out
        tl.store(q_ptr + pos, (lo | (hi << 4)).to(tl.uint8), mask=pos * 2 < numel)
    else:
        tl.store(q_ptr + offs, codes.to(q_ptr.dtype.element_ty), mask=offs < numel)
    tl.store(s_ptr + rows, scale, mask=rows < nblocks)


@triton.jit
def _values(q, table_ptr, FMT: tl.constexpr):
    """fp32 values (before scaling) of integer codes q: NF4 by the select tree, the 8-bit
    dynamic map by a gather from its 1 KB table."""
    if FMT == 0:
        return q.to(tl.float32)
    elif FMT == 1:
        return (q - 8).to(tl.float32)
    elif FMT == 3:
        return nf4_value(q)
    else:
        return tl.load(table_ptr + q)


@triton.jit
def _dequantize_kernel(
    q_ptr,
    s_ptr,
    table_ptr,
    out_ptr,
    numel,
    FMT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    WORDS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    s = tl.load(s_ptr + rows, mask=rows * BLOCK < numel, other=0.0)[:, None]
    if (FMT == 1 or FMT == 3) and WORDS:  # q_ptr: int32 words, element 8w + i at bits 4i
        pos = rows[:, None].to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)[None, :]
        words = tl.load(q_ptr + pos, mask=pos * 8 < numel, other=0)
        nibbles = (words[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :]) & 0xF
        values = tl.reshape(_values(nibbles, table_ptr, FMT), (ROWS, BLOCK))
    elif FMT == 1 or FMT == 3:  # both nibbles of a contiguous byte tile, interleaved back
        pos = rows[:, None].to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)[None, :]
        byte = tl.load(q_ptr + pos, mask=pos * 2 < numel, other=0).to(tl.int32)
        lo = _values(byte & 0xF, table_ptr, FMT)
        hi = _values(byte >> 4, table_ptr, FMT)
        values = tl.interleave(lo, hi)
    else:
        values = _values(
            tl.load(q_ptr + offs, mask=offs < numel, other=0).to(tl.int32), table_ptr, FMT
        )
    store_as(out_ptr + offs, values * s, offs < numel)  # one contiguous store


def _table_args(fmt: int, device, signed: bool = True) -> tuple[Tensor | None, Tensor | None, int]:
    """(table, midpoints, log2 of the table size) for a format; the dynamic map's "midpoints"
    are nearest_dynamic's lookup buffer (midpoints and bucket counts)."""
    t = tables(device)
    if fmt == DYN:
        key = "dyn_signed" if signed else "dyn_unsigned"
        return t[key], t[key + "_lookup"], 8
    if fmt == NF4:
        return t["nf4"], t["nf4_mids"], 4
    return t["nf4"], t["nf4_mids"], 1  # unused by the linear formats: any valid pointer


def _quantize(x: Tensor, block_size: int, fmt: int, signed: bool = True) -> tuple[Tensor, Tensor]:
    C.check_tensor("x", x, C.FLOATS)
    C.check_block(block_size)
    packed = fmt in (INT4, NF4)
    if packed and x.numel() % 2:
        raise ValueError(f"a 4-bit tensor packs two codes a byte: numel {x.numel()} must be even")
    nblocks = C.num_blocks(x.numel(), block_size)
    if packed:
        codes = torch.empty(x.numel() // 2, dtype=torch.uint8, device=x.device)
    else:
        codes = torch.empty(
            x.shape, dtype=torch.int8 if fmt == INT8 else torch.uint8, device=x.device
        )
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if nblocks:
        _, mids, log2 = _table_args(fmt, x.device, signed)
        rows = C.rows_per_program(block_size)
        grid = (triton.cdiv(nblocks, rows),)
        words = _as_words(codes, x.numel()) if packed else None
        _quantize_kernel[grid](
            x,
            codes if words is None else words,
            scales,
            mids,
            x.numel(),
            nblocks,
            FMT=fmt,
            BLOCK=block_size,
            ROWS=rows,
            LOG2=log2,
            WORDS=words is not None,
        )
    return codes, scales


def _dequantize(
    codes: Tensor,
    scales: Tensor,
    numel: int,
    shape,
    block_size: int,
    fmt: int,
    dtype,
    signed: bool = True,
) -> Tensor:
    C.check_block(block_size)
    if dtype not in C.FLOATS:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    C.check_scales("scales", scales, numel, block_size)
    C.check_same_device(codes=codes, scales=scales)
    out = torch.empty(shape, dtype=dtype, device=codes.device)
    if numel:
        table, _, _ = _table_args(fmt, codes.device, signed)
        rows = C.rows_per_program(block_size)
        grid = (triton.cdiv(C.num_blocks(numel, block_size), rows),)
        words = _as_words(codes, numel) if fmt in (INT4, NF4) else None
        _dequantize_kernel[grid](
            codes if words is None else words, scales, table, out, numel,
            FMT=fmt, BLOCK=block_size, ROWS=rows, WORDS=words is not None,
        )  # fmt: skip
    return out


def _as_words(packed: Tensor, numel: int) -> Tensor | None:
    """The packed bytes as int32 words (8 codes each) where every word is whole and aligned,
    else None. A thread then makes 4 word accesses where a byte tile compiled to 16 one-byte
    accesses (sm_90 PTX, 2026-12-02; 4-bit dequantization had measured 0.08 of copy bandwidth
    on 2026-12-01, before the contiguous tiles)."""
    if numel % 8 or packed.data_ptr() % 4 or not packed.is_contiguous():
        return None
    return packed.view(torch.int32)


def _packed_numel(packed: Tensor, shape) -> int:
    C.check_tensor("packed", packed, (torch.uint8,))
    numel = 1
    for d in shape:
        numel *= int(d)
    if numel % 2 or packed.numel() * 2 != numel:
        raise ValueError(
            f"packed has {packed.numel()} bytes; shape {tuple(shape)} needs {numel / 2:g} (numel even)"
        )
    return numel


def quantize_int8(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Triton reference.quantize_int8: (codes int8 x.shape, scales fp32)."""
    return _quantize(x, group_size, INT8)


def dequantize_int8(
    codes: Tensor, scales: Tensor, group_size: int = 256, dtype=torch.float32
) -> Tensor:
    C.check_tensor("codes", codes, (torch.int8,))
    return _dequantize(codes, scales, codes.numel(), codes.shape, group_size, INT8, dtype)


def quantize_int4(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Triton reference.quantize_int4: (packed uint8 [numel/2], scales fp32)."""
    return _quantize(x, group_size, INT4)


def dequantize_int4(
    packed: Tensor, scales: Tensor, shape, group_size: int = 256, dtype=torch.float32
) -> Tensor:
    numel = _packed_numel(packed, shape)
    return _dequantize(packed, scales, numel, tuple(shape), group_size, INT4, dtype)


def quantize_nf4(x: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor]:
    """Triton reference.quantize_nf4: (packed uint8 [numel/2], scales fp32)."""
    return _quantize(x, group_size, NF4)


def dequantize_nf4(
    packed: Tensor, scales: Tensor, shape, group_size: int = 256, dtype=torch.float32
) -> Tensor:
    numel = _packed_numel(packed, shape)
    return _dequantize(packed, scales, numel, tuple(shape), group_size, NF4, dtype)


def quantize_dynamic(x: Tensor, *, signed: bool, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """Triton reference.quantize_dynamic: (codes uint8 x.shape, absmax fp32)."""
    return _quantize(x, block_size, DYN, signed)


def dequantize_dynamic(
    codes: Tensor, absmax: Tensor, *, signed: bool, block_size: int = 256, dtype=torch.float32
) -> Tensor:
    C.check_tensor("codes", codes, (torch.uint8,))
    return _dequantize(codes, absmax, codes.numel(), codes.shape, block_size, DYN, dtype, signed)
