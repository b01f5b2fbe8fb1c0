"""Stochastic rounding kernels: fp32 -> bf16, fp32 -> INT8 with fresh block scales, and the
INT8 writer's fused update W <- SR(deq(W) - lr (update + wd deq(W))).

Random bits come from Philox (``tl.randint4x``) keyed by the caller's seed and counted by the
element's flat index e plus ``offset``: element e takes one of the four outputs of counter
e // 4, so one evaluation serves four elements where the offset is a multiple of 4 (the fused
update's is 0), and each element alone otherwise, with the same bits. A result depends on
(seed, offset, index) only, never on tile sizes or launch order, so a resumed run redraws
exactly. These bits differ from reference.py's (torch.Generator); both are tested for
unbiasedness, each for reproducibility. One call handles fewer than 2^31 elements (Philox
counters are 32-bit here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks as C


@triton.jit
def _bits4(seed, counters):
    """32 random bits for each of 4 elements a counter: (..., C) counters -> (..., C, 4), the
    four outputs of one Philox evaluation (element 4c + i takes a fixed one of counter c's)."""
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    return tl.join(tl.join(r0, r1), tl.join(r2, r3))


@triton.jit
def _bits_at(seed, e):
    """The bits `_bits4` gives element e, one element at a time (any offset): output
    (0, 2, 1, 3)[e % 4] of counter e // 4, the order `_bits4`'s two joins lay out."""
    r0, r1, r2, r3 = tl.randint4x(seed, e // 4)
    lane = e % 4
    return tl.where(lane == 0, r0, tl.where(lane == 1, r2, tl.where(lane == 2, r1, r3)))


@triton.jit
def _sr_bf16_kernel(x_ptr, out_ptr, numel, seed, offset, BLOCK: tl.constexpr, BY4: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if BY4:  # offset a multiple of 4: four elements a Philox evaluation
        counters = (tl.program_id(0) * BLOCK + offset) // 4 + tl.arange(0, BLOCK // 4)
        r = tl.reshape(_bits4(seed, counters), (BLOCK,)) & 0xFFFF
    else:  # the same bits, one Philox evaluation an element
        r = _bits_at(seed, offs + offset) & 0xFFFF
    # add r in [0, 2^16) to the fp32 bits and drop the low 16: rounds up with probability
    # (x - down) / ulp; the result is exactly a bf16 value, so the cast is exact
    bits = ((x.to(tl.uint32, bitcast=True) + r) >> 16) << 16
    tl.store(out_ptr + offs, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=mask)


@triton.jit
def _uniform_tile(seed, rows, offset, BLOCK: tl.constexpr):
    """U[0, 1) for the (ROWS, BLOCK) tile of blocks `rows` (element e = row * BLOCK + j +
    offset, offset a multiple of 4): one Philox evaluation (`_bits4`) gives four elements'
    bits, so a value depends on (seed, e) only. Philox, not memory, bounded the fused update
    at one evaluation an element (750 GB/s against a 4,149 GB/s copy, bench_kernels, H200,
    2026-12-01)."""
    counters = (rows[:, None] * BLOCK + offset) // 4 + tl.arange(0, BLOCK // 4)[None, :]
    bits = tl.reshape(_bits4(seed, counters), (rows.shape[0], BLOCK))
    return tl.uint_to_uniform_float(bits)


@triton.jit
def _sr_int8_rows(w, mask, u):
    """SR-quantize fp32 rows w (ROWS, BLOCK), one block a row, by uniforms u of w's shape:
    (codes int8, scales (ROWS,))."""
    w = tl.where(mask, w, 0.0)
    scale = tl.div_rn(tl.max(tl.abs(w), axis=1), 127.0)
    ok = tl.where(scale > 0, scale, 1.0)
    q = tl.floor(tl.div_rn(w, ok[:, None]) + u)
    return tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8), scale


@triton.jit
def _sr_int8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    numel,
    nblocks,
    seed,
    offset,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    BY4: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if BY4:  # offset a multiple of 4: four elements a Philox evaluation
        u = _uniform_tile(seed, rows, offset, BLOCK)
    else:  # the same bits, one Philox evaluation an element
        u = tl.uint_to_uniform_float(_bits_at(seed, offs + offset))
    q, scale = _sr_int8_rows(x, mask, u)
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=rows < nblocks)


@triton.jit
def _int8_sr_update_kernel(
    q_ptr, s_ptr, u_ptr, numel, nblocks, lr, wd, seed, BLOCK: tl.constexpr, ROWS: tl.constexpr
):
    # fp32 arguments on a GPU, float64 in the interpreter: cast so both match torch's fp32 math
    lr = tl.cast(lr, tl.float32)
    wd = tl.cast(wd, tl.float32)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < numel
    row_ok = rows < nblocks
    # each program reads and rewrites only its own blocks, so the update is safely in place
    s = tl.load(s_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32) * s[:, None]
    upd = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w - lr * (upd + wd * w)
    q, scale = _sr_int8_rows(w, mask, _uniform_tile(seed, rows, 0, BLOCK))
    tl.store(q_ptr + offs, q, mask=mask)
    tl.store(s_ptr + rows, scale, mask=row_ok)


def _check_count(numel: int, offset: int = 0) -> None:
    if numel + offset >= 2**31:
        raise ValueError(
            f"{numel} elements from offset {offset}: one call handles fewer than 2**31"
        )


def stochastic_round_bf16(x: Tensor, seed: int, offset: int = 0) -> Tensor:
    """Triton reference.stochastic_round_bf16 (unbiased fp32 -> bf16; Philox bits)."""
    C.check_tensor("x", x, (torch.float32,))
    C.check_seed(seed, offset)
    _check_count(x.numel(), offset)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
    if x.numel():
        block = 1 << 16 if C.interpreting() else 2048
        _sr_bf16_kernel[(triton.cdiv(x.numel(), block),)](
            x, out, x.numel(), seed, offset, BLOCK=block, BY4=offset % 4 == 0
        )
    return out


def stochastic_round_int8(
    x: Tensor, seed: int, offset: int = 0, group_size: int = 256
) -> tuple[Tensor, Tensor]:
    """Triton reference.stochastic_round_int8: (codes int8 x.shape, scales fp32); Philox bits."""
    C.check_tensor("x", x, (torch.float32,))
    C.check_block(group_size, "group_size")
    C.check_seed(seed, offset)
    _check_count(x.numel(), offset)
    nblocks = C.num_blocks(x.numel(), group_size)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty(nblocks, dtype=torch.float32, device=x.device)
    if nblocks:
        rows = C.rows_per_program(group_size)
        _sr_int8_kernel[(triton.cdiv(nblocks, rows),)](
            x,
            codes,
            scales,
            x.numel(),
            nblocks,
            seed,
            offset,
            BLOCK=group_size,
            ROWS=rows,
            BY4=offset % 4 == 0,
        )
    return codes, scales


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
    """Triton reference.int8_sr_update: codes and scales rewritten in place and returned."""
    C.check_tensor("codes", codes, (torch.int8,))
    C.check_tensor("update", update, (torch.float32, torch.bfloat16))
    C.check_block(group_size, "group_size")
    C.check_scales("scales", scales, codes.numel(), group_size)
    C.check_numel("update", update, codes.numel())
    C.check_same_device(codes=codes, scales=scales, update=update)
    C.check_seed(seed, 0)
    _check_count(codes.numel())
    nblocks = scales.numel()
    if nblocks:
        rows = C.rows_per_program(group_size)
        _int8_sr_update_kernel[(triton.cdiv(nblocks, rows),)](
            codes, scales, update, codes.numel(), nblocks, lr, wd, seed, BLOCK=group_size, ROWS=rows
        )
    return codes, scales
