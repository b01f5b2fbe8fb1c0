"""GEMMs outside inductor's reach, padded to cuBLAS's alignment on CUDA: those of the
parameterizations' custom ops and of the projected optimizer's step.

Inside a custom op (and in the eager optimizer step), inductor's pad_mm pass cannot reach a
matmul, and cuBLAS sends an operand whose rows are not 16-byte aligned (llama_1b's 5461-wide
MLP) to slow legacy kernels: on the H200 a bf16 linear of 2048 x 5461 at 8192 tokens took
1.48 ms, against 0.38 ms for 4096 x 4096 with 1.5x its FLOPs (bench_kernels, 2026-12-01),
and the 1B int8 profile spent 95 ms a step in sm75-era kernels. `mm` zero-pads the
contraction and output dimensions to a multiple of ROW_ALIGN (one copy of each misaligned
operand, and one of the output when its rows are), as pad_mm does for the dense model: zeros
add nothing to the products. A transposed operand is padded as it lies, M included where M is
its leading dimension: the weight gradient g^T x of a 5461-wide output reads g^T, whose
leading dimension is 5461 (padding only K and N left it misaligned, and the 1B SLTrain and
int8 profiles of 2026-12-04 spent 62 ms a step in sm75 kernels on it), and a transposing copy
is a slow strided kernel where a plain one is a vectorized one.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

ROW_ALIGN = 8  # elements of a 2-byte dtype: 16 bytes


def padding(size: int) -> int:
    """Zeros that take `size` to a multiple of ROW_ALIGN."""
    return -size % ROW_ALIGN


def pads(t: Tensor) -> bool:
    """Whether GEMMs on t's device are padded by default: on CUDA (cuBLAS's alignment)."""
    return t.is_cuda


def mm(a: Tensor, b: Tensor, pad: bool | None = None) -> Tensor:
    """a @ b, contiguous (M, N), for a (M, K) and b (K, N) in any 2-D layout. `pad` (default:
    on CUDA) multiplies the `aligned_operands` copies when an operand or a dimension is
    misaligned, and slices the product back."""
    if pad is None:
        pad = pads(a)
    m, n = a.shape[0], b.shape[1]
    if not pad or _is_aligned_product(a, b):
        return a @ b
    a_padded, b_padded = aligned_operands(a, b)
    out = a_padded @ b_padded
    return out[:m, :n].contiguous() if out.shape[1] != n else out[:m]


def aligned_operands(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-padded copies a' (M', K'), b' (K', N') of a (M, K), b (K, N), each in its own layout
    (a transposed view stays transposed, so the copy is a plain one, never a transpose), with
    K' and N' multiples of ROW_ALIGN, and M' too when a is column-major (its leading dimension
    is then M). Every leading dimension cuBLAS reads, the output's (N') included, is then
    aligned, and (a' @ b')[:M, :N] == a @ b: the zeros add nothing. An operand that needs
    neither padding nor a new layout is returned as it is."""
    m, k = a.shape
    n = b.shape[1]
    pad_m = padding(m) if _column_major(a) else 0
    return _padded(a, pad_m, padding(k)), _padded(b, padding(k), padding(n))


def _padded(t: Tensor, rows: int, cols: int) -> Tensor:
    """t with `rows` zero rows and `cols` zero columns appended, in t's layout."""
    if rows == 0 and cols == 0 and _aligned(t):
        return t
    if _column_major(t):  # pad the row-major transpose: a plain copy, whose .T is column-major
        return _padded_row_major(t.T, cols, rows).T
    return _padded_row_major(t, rows, cols)


def _padded_row_major(t: Tensor, rows: int, cols: int) -> Tensor:
    # F.pad of all-zero pads clones in the input's strides: a misaligned view would stay one
    return F.pad(t, (0, cols, 0, rows)) if rows or cols else t.contiguous()


def _column_major(t: Tensor) -> bool:
    return t.stride(0) == 1 and t.stride(1) != 1


def _is_aligned_product(a: Tensor, b: Tensor) -> bool:
    dims_aligned = padding(a.shape[1]) == 0 and padding(b.shape[1]) == 0
    # a column-major a's leading dimension is M: _aligned checks it through its stride
    return dims_aligned and _aligned(a) and _aligned(b)


def _aligned(t: Tensor) -> bool:
    """Whether a 2-D operand's leading dimension (its stride across rows, or across columns
    for a transposed view) is a multiple of ROW_ALIGN."""
    return all(s % ROW_ALIGN == 0 for s in t.stride() if s != 1)


def addmm(
    base: Tensor,
    a: Tensor,
    b: Tensor,
    alpha: float,
    inplace: bool = False,
    pad: bool | None = None,
    beta: float = 1.0,
) -> Tensor:
    """beta base + alpha a @ b (into base when `inplace`): torch's addmm, one GEMM accumulating
    onto base, unless `pad` (default: on CUDA) and base or an operand is misaligned. Then the
    padded `mm` and one add: an extra pass over base, and the product rounded to base's dtype
    before the add, against a cuBLAS fallback kernel 5-9x slower (llama_1b's 2048 x 5461
    down_proj, optimizer step profile, H200, 2026-12-02)."""
    if pad is None:
        pad = pads(base)
    if not pad or (
        all(padding(d) == 0 for d in (*a.shape, b.shape[1])) and all(map(_aligned, (base, a, b)))
    ):
        if inplace:
            return base.addmm_(a, b, beta=beta, alpha=alpha)
        return torch.addmm(base, a, b, beta=beta, alpha=alpha)
    product = mm(a, b, pad=True)
    if beta != 1.0:
        base = base.mul_(beta) if inplace else base * beta
        inplace = True  # base is now a new tensor or the caller's, scaled
    return base.add_(product, alpha=alpha) if inplace else torch.add(base, product, alpha=alpha)


def linear(x: Tensor, w: Tensor, pad: bool | None = None) -> Tensor:
    """x w^T for x (..., K) and w (N, K): `mm` over the flattened leading dimensions."""
    return mm(x.reshape(-1, x.shape[-1]), w.T, pad).view(*x.shape[:-1], w.shape[0])


def matmul(x: Tensor, w: Tensor, pad: bool | None = None) -> Tensor:
    """x w for x (..., N) and w (N, K): `mm` over the flattened leading dimensions."""
    return mm(x.reshape(-1, x.shape[-1]), w, pad).view(*x.shape[:-1], w.shape[1])
