"""Dequant-matmul, forward and backward, for INT8, INT4 and NF4 weights W (N, K).

    forward:   y      = x deq(W)^T     x (M, K) -> y (M, N)
    backward:  grad_x = g deq(W)       g (M, N) -> (M, K)

One kernel computes ``out[m, j] = sum_r a[m, r] W~[j, r]`` where ``W~ = deq(W)`` (forward: j = n,
r = k) or ``deq(W)^T`` (backward, TRANS: j = k, r = n). Each K-step loads a (BLOCK_R, BLOCK_J)
tile of *codes* (1 byte, or half a byte, an element), dequantizes it in registers (NF4 by a
select tree, never a table gather; scales loaded once per W row of the tile when the groups are
row-aligned and a tile never crosses one (ALIGNED), else two per row and a select while the
tile is no longer than a group, else gathered per element) and feeds a bf16 ``tl.dot`` with
fp32 accumulation: no dequantized copy of W ever exists in memory. 4-bit codes in the aligned
case load each byte once (``_pair_tile``); the rest take ``_general_tile``. Groups run along
the flattened W (reference.py), so any N, K work; ALIGNED is the fast case (K a multiple of
the group size).

The weight gradient ``g^T x`` is not here: it is a plain bf16 GEMM into the layer's side buffer.

Autotune configs fit an RTX 4090 (sm_89, 99 KB of shared memory a block): compiled for sm_89,
every config kept by ``prune_configs`` uses at most 65 KB (tests/test_kernels_sm89.py); no
Hopper-only instruction is required: for sm_89 plain tl.dot lowers to mma.sync (for sm_90
Triton itself picks wgmma, read in the sm_90 PTX, 2026-12-02), and no TMA is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks as C
from ._tl import INT4, INT8, NF4, nf4_value

# (BLOCK_M, BLOCK_J, BLOCK_R, warps, stages, SWAP), by the token counts (M) each suits: the
# autotuner only times a key's own row (prune_configs), so one key costs 3-4 timings.
_CONFIG_ROWS = {
    "small": [  # M <= 16: decode-like, bound by reading W; wide J tiles, many CTAs
        (16, 64, 128, 4, 4, True),
        (16, 128, 128, 4, 3, True),
        (16, 64, 128, 4, 4, False),
    ],
    "medium": [  # 16 < M <= 256
        (64, 128, 64, 4, 4, False),
        (64, 128, 64, 4, 4, True),
        (32, 64, 128, 4, 4, False),
    ],
    "large": [  # M > 256: bound by the tensor cores
        (128, 128, 64, 8, 3, False),
        (128, 256, 64, 8, 3, False),
        (128, 128, 64, 8, 3, True),
        (128, 64, 64, 4, 4, False),
    ],
}


def _size_class(m_bucket: int) -> str:
    return "small" if m_bucket <= 16 else "medium" if m_bucket <= 256 else "large"


def _configs() -> list[triton.Config]:
    out = []
    for size, rows in _CONFIG_ROWS.items():
        for m, j, r, w, st, sw in rows:
            cfg = triton.Config(
                {"BLOCK_M": m, "BLOCK_J": j, "BLOCK_R": r, "GROUP_M": 8, "SWAP": sw},
                num_warps=w,
                num_stages=st,
            )
            cfg.size_class = size  # read by prune_configs
            out.append(cfg)
    return out


@triton.jit
def _bcast(v, TRANS: tl.constexpr):
    """A per-W-row vector as a (BLOCK_R, BLOCK_J) tile operand."""
    if TRANS:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def _dq_matmul_kernel(
    a_ptr,
    q_ptr,
    s_ptr,
    out_ptr,
    M,
    J,
    R,
    K,
    stride_am,
    stride_om,
    M_BUCKET,
    G: tl.constexpr,
    FMT: tl.constexpr,
    TRANS: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP: tl.constexpr,
):
    # grouped launch order: GROUP_M row-tiles share each W column-tile while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_j = tl.cdiv(J, BLOCK_J)
    per_group = GROUP_M * num_j
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_j = (pid % per_group) // group_rows

    # a tile along r never crosses a group: one scale per tile row (TRANS: per tile column)
    SPAN: tl.constexpr = BLOCK_J if TRANS else BLOCK_R  # a tile's extent along W's rows (k)
    ALIGNED: tl.constexpr = ROW_ALIGNED and (G % SPAN == 0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    if SWAP:
        acc = tl.zeros((BLOCK_J, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_r[None, :],
            mask=(offs_m < M)[:, None] & (offs_r < R)[None, :],
            other=0.0,
        )
        # 4-bit codes in aligned tiles: a byte's two nibbles are consecutive k of one W row,
        # so the byte tile is loaded contiguously once (`_pair_tile`)
        if FMT != 0 and ALIGNED:
            w = _pair_tile(
                q_ptr, s_ptr, J, R, K, r0, offs_r, offs_j, pid_j,
                G, FMT, TRANS, BLOCK_J, BLOCK_R,
            )  # fmt: skip
        else:
            w = _general_tile(
                q_ptr, s_ptr, J, R, K, r0, offs_r, offs_j, pid_j,
                G, FMT, TRANS, ALIGNED, BLOCK_J, BLOCK_R,
            )  # fmt: skip
        # SWAP computes out^T = W~ a^T: the dequantized tile (in registers) is the dot's first
        # operand, which Hopper's wgmma may read from registers (the second must sit in shared
        # memory, where the pipelined activations already are); without SWAP the tile is
        # written to shared memory first. The autotuner picks.
        acc = _dot(acc, a, w, UPCAST, SWAP)
    _store_out(out_ptr, acc, offs_m, offs_j, M, J, stride_om, UPCAST, SWAP)


@triton.jit
def _general_tile(
    q_ptr, s_ptr, J, R, K, r0, offs_r, offs_j, pid_j,
    G: tl.constexpr, FMT: tl.constexpr, TRANS: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """W~'s (BLOCK_R, BLOCK_J) tile at r0, fp32: INT8, and 4-bit codes outside the aligned
    case, dequantized element by element (the module docstring's three scale cases)."""
    j_ok = offs_j < J
    r_ok = offs_r < R
    SPAN: tl.constexpr = BLOCK_J if TRANS else BLOCK_R
    NUM_GROUPS = tl.cdiv(J * R, G)
    if TRANS:  # W~[j, r] = W[n = r, k = j]
        flat = offs_r[:, None] * K + offs_j[None, :]
    else:  # W~[j, r] = W[n = j, k = r]
        flat = offs_j[None, :] * K + offs_r[:, None]
    w_ok = r_ok[:, None] & j_ok[None, :]
    if FMT == 0:
        q = tl.load(q_ptr + flat, mask=w_ok, other=0).to(tl.float32)
    else:
        byte = tl.load(q_ptr + flat // 2, mask=w_ok, other=0).to(tl.int32)
        nib = (byte >> ((flat & 1) * 4)) & 0xF
        if FMT == 1:
            q = (nib - 8).to(tl.float32)
        else:
            q = nf4_value(nib)
    # W's row n of this tile starts at flat index row_start + tile_start
    if TRANS:
        first = offs_r * K + pid_j * BLOCK_J  # (BLOCK_R,): scales vary along the tile's rows
        first_ok = r_ok
    else:
        first = offs_j * K + r0  # (BLOCK_J,): scales vary along the tile's columns
        first_ok = j_ok
    if ALIGNED:  # the tile's span of each W row lies in one group
        s = _bcast(tl.load(s_ptr + first // G, mask=first_ok, other=0.0), TRANS)
    elif SPAN <= G:  # ...in at most two consecutive groups: two vector loads and a select
        g0 = first // G
        s0 = _bcast(tl.load(s_ptr + g0, mask=first_ok, other=0.0), TRANS)
        s1 = _bcast(
            tl.load(s_ptr + g0 + 1, mask=first_ok & (g0 + 1 < NUM_GROUPS), other=0.0), TRANS
        )
        s = tl.where(flat // G == _bcast(g0, TRANS), s0, s1)
    else:  # groups smaller than the tile: a gather per element (pipelined through shared memory)
        s = tl.load(s_ptr + flat // G, mask=w_ok, other=0.0)
    return q * s


@triton.jit
def _store_out(
    out_ptr, acc, offs_m, offs_j, M, J, stride_om, UPCAST: tl.constexpr, SWAP: tl.constexpr
):
    """The fp32 tile into the output, in its dtype: (BLOCK_M, BLOCK_J), or its transpose
    (BLOCK_J, BLOCK_M) under SWAP, stored through transposed pointers (no data movement)."""
    if SWAP:
        o_ptr = out_ptr + offs_m[None, :] * stride_om + offs_j[:, None]
        o_ok = (offs_m < M)[None, :] & (offs_j < J)[:, None]
    else:
        o_ptr = out_ptr + offs_m[:, None] * stride_om + offs_j[None, :]
        o_ok = (offs_m < M)[:, None] & (offs_j < J)[None, :]
    if UPCAST and out_ptr.dtype.element_ty == tl.bfloat16:
        # round to nearest even on the bits: the interpreter's cast truncates (GPUs round)
        bits = acc.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        tl.store(o_ptr, bits.to(tl.float32, bitcast=True).to(tl.bfloat16), mask=o_ok)
    else:
        tl.store(o_ptr, acc.to(out_ptr.dtype.element_ty), mask=o_ok)


@triton.jit
def _dot(acc, x, y, UPCAST: tl.constexpr, SWAP: tl.constexpr):
    """acc + x @ y (SWAP: acc + (x @ y)^T = acc + y^T x^T, the dequantized tile y first), bf16
    operands and fp32 accumulation; UPCAST (the interpreter, whose bf16 dots are wrong) in
    fp32."""
    # no early returns: Triton compiles the code after a constexpr branch's return too
    if UPCAST:
        if SWAP:
            out = tl.dot(
                tl.trans(y.to(tl.float32)), tl.trans(x.to(tl.float32)), input_precision="ieee"
            )
        else:
            out = tl.dot(x.to(tl.float32), y.to(tl.float32), input_precision="ieee")
    else:
        if SWAP:
            out = tl.dot(tl.trans(y.to(x.dtype)), tl.trans(x))
        else:
            out = tl.dot(x, y.to(x.dtype))
    return acc + out


@triton.jit
def _pair_tile(
    q_ptr, s_ptr, J, R, K, r0, offs_r, offs_j, pid_j,
    G: tl.constexpr, FMT: tl.constexpr, TRANS: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """W~'s (BLOCK_R, BLOCK_J) tile at r0, fp32, for 4-bit codes in the aligned case (K a
    multiple of the group, a tile inside one group along W's rows). Byte b of W row n holds
    k = 2b (low nibble) and 2b + 1 (high). The byte tile is loaded contiguously (half the
    tile's elements, each byte once; the general tile reads each byte twice, at stride-2
    addresses), split into its even-k and odd-k nibble tiles and interleaved back (along r
    forward, along j in the backward). One scale a W row of the tile (the group)."""
    HALF_R: tl.constexpr = BLOCK_R // 2 if not TRANS else BLOCK_R
    HALF_J: tl.constexpr = BLOCK_J // 2 if TRANS else BLOCK_J
    if TRANS:  # W~[j, r] = W[n = r, k = j]: bytes run along j
        rows = offs_r
        cols = pid_j * HALF_J + tl.arange(0, HALF_J)  # byte index within W row n = r
        byte_ptr = q_ptr + rows[:, None] * (K // 2) + cols[None, :]
        ok = (rows < R)[:, None] & (cols * 2 < J)[None, :]
        first = rows * K + pid_j * BLOCK_J  # the tile's first flat index in each W row
        s = tl.load(s_ptr + first // G, mask=rows < R, other=0.0)[:, None]
    else:  # W~[j, r] = W[n = j, k = r]: bytes run along r
        rows = r0 // 2 + tl.arange(0, HALF_R)  # byte index within W row n = j
        byte_ptr = q_ptr + offs_j[None, :] * (K // 2) + rows[:, None]
        ok = (rows * 2 < R)[:, None] & (offs_j < J)[None, :]
        s = tl.load(s_ptr + (offs_j * K + r0) // G, mask=offs_j < J, other=0.0)[None, :]
    byte = tl.load(byte_ptr, mask=ok, other=0).to(tl.int32)
    if FMT == 1:
        lo, hi = ((byte & 0xF) - 8).to(tl.float32), ((byte >> 4) - 8).to(tl.float32)
    else:
        lo, hi = nf4_value(byte & 0xF), nf4_value(byte >> 4)
    lo, hi = lo * s, hi * s
    # back in W~'s order, for one dot a K-step: a loop with two dots (one a nibble tile) was
    # compiled for sm_90 with each wgmma waited on at once (TTGIR, 2026-12-02)
    if TRANS:  # k = 2b, 2b + 1 run along j
        w = tl.interleave(lo, hi)
    else:  # ...along r
        w = tl.trans(tl.interleave(tl.trans(lo), tl.trans(hi)))
    return w


def _span(config: triton.Config, trans: bool) -> int:
    return config.kwargs["BLOCK_J" if trans else "BLOCK_R"]


# For groups shorter than every tile (G = 16 or 32): the per-element scale gather, kept small.
_SMALL_GROUP_CONFIG = triton.Config(
    {"BLOCK_M": 32, "BLOCK_J": 32, "BLOCK_R": 32, "GROUP_M": 8, "SWAP": False},
    num_warps=4,
    num_stages=2,
)


def prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs of the key's token-count class whose tile spans at most one group along W's
    rows. A longer tile takes the per-element scale gather, which the pipeliner stages through
    shared memory (4 bytes an element a stage): up to 180 KB at G = 64, over sm_89's 99 KB
    (compiled for sm_89, 2026-12-01)."""
    group = kwargs.get("G", named_args.get("G"))
    trans = kwargs.get("TRANS", named_args.get("TRANS"))
    m_bucket = kwargs.get("M_BUCKET", named_args.get("M_BUCKET"))
    if m_bucket is not None:
        size = _size_class(m_bucket)
        configs = [c for c in configs if getattr(c, "size_class", size) == size]
    kept = [c for c in configs if _span(c, trans) <= group]
    return kept or [_SMALL_GROUP_CONFIG]


def _autotune_bench(kernel_call, quantiles):
    # 5 ms warm-up and 25 ms of repeats a config (the default 25 + 100 ms makes a first call at
    # a new shape cost over a second); medians are stable at these sizes
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


_tuned = triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "J", "R", "FMT", "TRANS", "G"],
    prune_configs_by={"early_config_prune": prune_configs},
    do_bench=_autotune_bench,
)(_dq_matmul_kernel)

# The interpreter runs each program as numpy steps: one small fixed tile (>= 16 for tl.dot),
# swapped below 16 rows (the decode-like case the swapped configs serve), so the CPU tests run
# both operand orders.
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_J": 32, "BLOCK_R": 32, "GROUP_M": 8}


def _matmul(
    a: Tensor, q: Tensor, s: Tensor, shape, group_size: int, fmt: int, trans: bool, name: str
) -> Tensor:
    C.check_tensor(name, a, C.FLOATS)
    n, k = (int(d) for d in shape)
    if fmt == INT8:
        C.check_tensor("codes", q, (torch.int8,))
        if tuple(q.shape) != (n, k):
            raise ValueError(f"codes have shape {tuple(q.shape)}; expected (N, K) = {(n, k)}")
    else:
        C.check_tensor("packed", q, (torch.uint8,))
        if (n * k) % 2 or q.numel() * 2 != n * k:
            raise ValueError(
                f"packed has {q.numel()} bytes; W of shape {(n, k)} needs {n * k / 2:g} (N*K even)"
            )
    C.check_block(group_size, "group_size")
    C.check_scales("scales", s, n * k, group_size)
    C.check_same_device(**{name: a, "codes": q, "scales": s})
    if n * k >= 2**31 or a.numel() >= 2**31:
        raise ValueError(
            f"W {(n, k)} or {name} {tuple(a.shape)} has 2**31 elements or more (32-bit indexing)"
        )
    r, j = (n, k) if trans else (k, n)
    if a.dim() < 1 or a.shape[-1] != r:
        raise ValueError(
            f"{name} has shape {tuple(a.shape)}; its last dim must be {r} for W of shape {(n, k)}"
        )
    a2 = a.reshape(-1, r)
    m = a2.shape[0]
    out = torch.empty(m, j, dtype=a.dtype, device=a.device)
    if m and j:
        # the autotune key's token bucket, next_power_of_2(m) by bit length (triton's helper costs
        # microseconds a call, on a path a 7B step takes 672 times)
        m_bucket = 1 << (m - 1).bit_length()
        args = (a2, q, s, out, m, j, r, k, a2.stride(0), out.stride(0), m_bucket)
        meta = dict(G=group_size, FMT=fmt, TRANS=trans, ROW_ALIGNED=k % group_size == 0)
        if C.interpreting():
            grid = (triton.cdiv(m, 16) * triton.cdiv(j, 32),)
            _dq_matmul_kernel[grid](*args, **meta, UPCAST=True, SWAP=m < 16, **_INTERPRET_META)
        else:
            grid = lambda mt: (triton.cdiv(m, mt["BLOCK_M"]) * triton.cdiv(j, mt["BLOCK_J"]),)  # noqa: E731
            _tuned[grid](*args, **meta, UPCAST=False)
    return out.reshape(*a.shape[:-1], j)


def _codes_shape(codes: Tensor) -> tuple[int, int]:
    if not isinstance(codes, Tensor) or codes.dim() != 2:
        raise ValueError(
            f"codes must be a 2-D (N, K) tensor, got shape {tuple(getattr(codes, 'shape', ()))}"
        )
    return tuple(codes.shape)


def int8_matmul(x: Tensor, codes: Tensor, scales: Tensor, group_size: int = 256) -> Tensor:
    """y = x deq(W)^T for x (..., K), INT8 codes (N, K): y (..., N) in x's dtype."""
    return _matmul(x, codes, scales, _codes_shape(codes), group_size, INT8, False, "x")


def int8_matmul_grad_x(g: Tensor, codes: Tensor, scales: Tensor, group_size: int = 256) -> Tensor:
    """grad_x = g deq(W) for g (..., N): (..., K) in g's dtype."""
    return _matmul(g, codes, scales, _codes_shape(codes), group_size, INT8, True, "g")


def _check_shape(shape) -> tuple[int, int]:
    shape = tuple(int(d) for d in shape)
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, K) with N, K >= 1, got {shape}")
    return shape


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256) -> Tensor:
    """y = x deq(W)^T for INT4 W of ``shape`` (N, K)."""
    return _matmul(x, packed, scales, _check_shape(shape), group_size, INT4, False, "x")


def int4_matmul_grad_x(
    g: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256
) -> Tensor:
    """grad_x = g deq(W) for INT4 W of ``shape`` (N, K)."""
    return _matmul(g, packed, scales, _check_shape(shape), group_size, INT4, True, "g")


def nf4_matmul(x: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256) -> Tensor:
    """y = x deq(W)^T for NF4 W of ``shape`` (N, K)."""
    return _matmul(x, packed, scales, _check_shape(shape), group_size, NF4, False, "x")


def nf4_matmul_grad_x(
    g: Tensor, packed: Tensor, scales: Tensor, shape, group_size: int = 256
) -> Tensor:
    """grad_x = g deq(W) for NF4 W of ``shape`` (N, K)."""
    return _matmul(g, packed, scales, _check_shape(shape), group_size, NF4, True, "g")
