"""The elementwise Adam moment step in one pass (reference.adam_update): read g, M, V (fp32,
bf16, or 8-bit dynamic-map codes with block absmax), write M, V and N = M / (sqrt(V) + eps).

8-bit state: one tile row is one quantization block, so the block's new absmax is a row
reduction inside the program and the re-quantized codes are written in the same pass (as
bitsandbytes' blockwise 8-bit optimizers do): 2 bytes of state an element read and written
instead of 8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _checks as C
from ._tl import nearest_dynamic, store_as, tables


@triton.jit
def _adam_kernel(
    g_ptr,
    m_ptr,
    v_ptr,
    ma_ptr,
    va_ptr,
    n_ptr,
    smap_ptr,
    slookup_ptr,
    umap_ptr,
    ulookup_ptr,
    numel,
    nblocks,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Float arguments are fp32 on a GPU but float64 in the interpreter: cast, so both round the
    # products as torch does with fp32 tensors and Python scalars.
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None].to(tl.int64) * BLOCK + tl.arange(0, BLOCK)[None, :]
    mask = offs < numel
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if QUANT:
        row_ok = rows < nblocks
        ma = tl.load(ma_ptr + rows, mask=row_ok, other=0.0)[:, None]
        va = tl.load(va_ptr + rows, mask=row_ok, other=0.0)[:, None]
        mc = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.int32)
        vc = tl.load(v_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.where(mask, tl.load(smap_ptr + mc) * ma, 0.0)
        v = tl.where(mask, tl.load(umap_ptr + vc) * va, 0.0)
    else:
        m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    tl.store(n_ptr + offs, tl.div_rn(m, tl.sqrt_rn(v) + eps), mask=mask)
    if QUANT:
        m_abs = tl.max(tl.abs(m), axis=1)
        v_abs = tl.max(tl.abs(v), axis=1)
        m_ok = tl.where(m_abs > 0, m_abs, 1.0)
        v_ok = tl.where(v_abs > 0, v_abs, 1.0)
        tl.store(
            m_ptr + offs,
            nearest_dynamic(tl.div_rn(m, m_ok[:, None]), slookup_ptr).to(tl.uint8),
            mask=mask,
        )
        tl.store(
            v_ptr + offs,
            nearest_dynamic(tl.div_rn(v, v_ok[:, None]), ulookup_ptr).to(tl.uint8),
            mask=mask,
        )
        tl.store(ma_ptr + rows, m_abs, mask=row_ok)
        tl.store(va_ptr + rows, v_abs, mask=row_ok)
    else:
        store_as(m_ptr + offs, m, mask)
        store_as(v_ptr + offs, v, mask)


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
    """Triton reference.adam_update (same contract: moments in place, N fp32 returned)."""
    C.check_tensor("grad", grad, (torch.float32, torch.bfloat16))
    numel = grad.numel()
    quant = exp_avg_absmax is not None
    if quant != (exp_avg_sq_absmax is not None):
        raise ValueError(
            "pass both exp_avg_absmax and exp_avg_sq_absmax (8-bit moments) or neither"
        )
    if quant:
        C.check_block(block_size)
        C.check_tensor("exp_avg", exp_avg, (torch.uint8,))
        C.check_tensor("exp_avg_sq", exp_avg_sq, (torch.uint8,))
        C.check_scales("exp_avg_absmax", exp_avg_absmax, numel, block_size)
        C.check_scales("exp_avg_sq_absmax", exp_avg_sq_absmax, numel, block_size)
    else:
        C.check_tensor("exp_avg", exp_avg, (torch.float32, torch.bfloat16))
        C.check_tensor("exp_avg_sq", exp_avg_sq, (exp_avg.dtype,))
        block_size = 1024
        exp_avg_absmax = exp_avg_sq_absmax = exp_avg  # unused pointers
    C.check_numel("exp_avg", exp_avg, numel)
    C.check_numel("exp_avg_sq", exp_avg_sq, numel)
    C.check_same_device(grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    n = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    nblocks = C.num_blocks(numel, block_size)
    if nblocks:
        t = tables(grad.device)
        rows = C.rows_per_program(block_size)
        _adam_kernel[(triton.cdiv(nblocks, rows),)](
            grad, exp_avg, exp_avg_sq, exp_avg_absmax, exp_avg_sq_absmax, n,
            t["dyn_signed"], t["dyn_signed_lookup"], t["dyn_unsigned"], t["dyn_unsigned_lookup"],
            numel, nblocks, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
            QUANT=quant, BLOCK=block_size, ROWS=rows,
        )  # fmt: skip
    return n
