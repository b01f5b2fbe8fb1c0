"""The GEMMs of the parameterizations' custom ops, padded to cuBLAS's alignment on CUDA.

Inside a custom op, inductor's pad_mm pass cannot reach a matmul, and cuBLAS sends an operand
whose rows are not 16-byte aligned (llama_1b's 5461-wide MLP) to slow legacy kernels: on the
H200 a bf16 linear of 2048 x 5461 at 8192 tokens took 1.48 ms, against 0.38 ms for 4096 x 4096
with 1.5x its FLOPs (bench_kernels, 2026-12-01), and the 1B int8 profile spent 95 ms a step in
sm75-era kernels. `mm` zero-pads the contraction and output dimensions to a multiple of
ROW_ALIGN (one copy of each misaligned operand, and one of the output when its rows are), as
pad_mm does for the dense model: zeros add nothing to the products.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

ROW_ALIGN = 8  # elements of a 2-byte dtype: 16 bytes


def _padding(size: int) -> int:
    return -size % ROW_ALIGN


def mm(a: Tensor, b: Tensor, pad: bool | None = None) -> Tensor:
    """a @ b, contiguous (M, N), for a (M, K) and b (K, N) in any 2-D layout. `pad` (default:
    on CUDA) zero-pads K and N to multiples of ROW_ALIGN when either is not one; a row-major
    copy of a has ld K, of b ld N, so M never needs it."""
    if pad is None:
        pad = a.is_cuda
    k, n = a.shape[1], b.shape[1]
    if not pad or (_padding(k) == 0 and _padding(n) == 0 and _aligned(a) and _aligned(b)):
        return a @ b
    a = F.pad(a, (0, _padding(k)))
    b = F.pad(b, (0, _padding(n), 0, _padding(k)))
    out = a @ b
    return out[:, :n].contiguous() if _padding(n) else out


def _aligned(t: Tensor) -> bool:
    """Whether a 2-D operand's leading dimension (its stride across rows, or across columns
    for a transposed view) is a multiple of ROW_ALIGN."""
    return all(s % ROW_ALIGN == 0 for s in t.stride() if s != 1)


def linear(x: Tensor, w: Tensor, pad: bool | None = None) -> Tensor:
    """x w^T for x (..., K) and w (N, K): `mm` over the flattened leading dimensions."""
    return mm(x.reshape(-1, x.shape[-1]), w.T, pad).view(*x.shape[:-1], w.shape[0])


def matmul(x: Tensor, w: Tensor, pad: bool | None = None) -> Tensor:
    """x w for x (..., N) and w (N, K): `mm` over the flattened leading dimensions."""
    return mm(x.reshape(-1, x.shape[-1]), w, pad).view(*x.shape[:-1], w.shape[1])
