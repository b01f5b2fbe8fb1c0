"""Sparse storage and the sparse-plus-low-rank matmul that `sltrain` and `lost` build on.

Indices are stored as int32 (4 bytes each; the official SLTrain code keeps int64, 8): every
flat index of a LLaMA-7B projection fits (4096 * 11008 < 2^31), and `index_add_` and
`index_select` take int32 directly, so no int64 copy is made.

    y = x W^T,   W = s B A + scatter(I, v)       (B (out, r), A (r, in), v (nnz,), I (nnz,))

`sparse_lowrank_linear` forms W for one layer at a time and never keeps it: the backward saves
x, A, B, v and I and rebuilds W (as SLTrain's sparse_linear.cpp does), so no (out, in) tensor
lives between forward and backward. With G = dY^T X summed over tokens:

    dX = dY W,   dB = s G A^T,   dA = s B^T G,   dv = G.flat[I]
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lowrank_train import gemm

INDEX_DTYPE = torch.int32


def index_buffer(index: Tensor, bound: int) -> Tensor:
    """`index` (values in [0, bound)) stored as int32; refuses a bound int32 cannot address."""
    if bound > torch.iinfo(INDEX_DTYPE).max:
        raise ValueError(f"{bound} positions do not fit int32 indices")
    return index.to(INDEX_DTYPE)


def sparse_plus_lowrank(
    A: Tensor, B: Tensor, values: Tensor, index: Tensor, scale: float
) -> Tensor:
    """W = s B A with v added at the row-major flat positions I of the (out, in) matrix."""
    W = gemm.mm(B, A * scale)
    W.view(-1).index_add_(0, index, values)
    return W


# Custom ops, not an autograd.Function: torch.compile then sees the forward and backward as
# opaque calls whose saved tensors are exactly the ones set up below. Traced through, the
# partitioner kept the materialised W for backward (SLTrain compiled on the H200 peaked like
# dense, 0.03 GiB saved against the 0.94 its stored bytes predict).
@torch.library.custom_op("lowrank_train::sparse_lowrank_linear", mutates_args=())
def _forward(
    x: Tensor, A: Tensor, B: Tensor, values: Tensor, index: Tensor, scale: float
) -> Tensor:
    return gemm.linear(x, sparse_plus_lowrank(A, B, values, index, scale))


@_forward.register_fake
def _(x, A, B, values, index, scale):
    return x.new_empty((*x.shape[:-1], B.shape[0]))


@torch.library.custom_op("lowrank_train::sparse_lowrank_linear_backward", mutates_args=())
def _backward(
    g: Tensor, x: Tensor, A: Tensor, B: Tensor, values: Tensor, index: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX, dA, dB, dv); W is rebuilt and dropped before G exists: one (out, in) at a time."""
    grad_x = gemm.matmul(g, sparse_plus_lowrank(A, B, values, index, scale))
    G = gemm.mm(g.reshape(-1, g.shape[-1]).T, x.reshape(-1, x.shape[-1]))  # (out, in)
    grad_a, grad_b = gemm.mm(B.T, G) * scale, gemm.mm(G, A.T) * scale
    return grad_x, grad_a, grad_b, G.view(-1).index_select(0, index)


@_backward.register_fake
def _(g, x, A, B, values, index, scale):
    return (
        x.new_empty(x.shape),
        A.new_empty(A.shape),
        B.new_empty(B.shape),
        values.new_empty(values.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, A, B, values, index, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, A, B, values, index)


def _autograd_backward(ctx, g: Tensor):
    x, A, B, values, index = ctx.saved_tensors
    grad_x, grad_A, grad_B, grad_v = _backward(g, x, A, B, values, index, ctx.scale)
    return grad_x, grad_A, grad_B, grad_v, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (as F.linear would run), else x's."""
    # meta (the planner's structural pass) has no autocast to ask; a plain comparison, since
    # torch.compile (torch 2.11) cannot trace torch.amp.is_autocast_available
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def sparse_lowrank_linear(
    x: Tensor, A: Tensor, B: Tensor, values: Tensor, index: Tensor, scale: float
) -> Tensor:
    """y = x (s B A + scatter(I, v))^T for x (..., in); differentiable in x, A, B and v.

    Everything runs in one dtype (autocast's, where it is on): the casts happen here, outside
    the autograd function, so the gradients reach fp32 parameters in fp32 and the backward,
    which autocast does not cover, sees the forward's dtypes.

    Where gemm pads (CUDA), a misaligned out or in (llama_1b's 5461) is padded here, outside
    the custom ops, so that every GEMM inside them is aligned and copies nothing: x and A get
    zero columns, B zero rows, the flat indices move to the padded rows (I + (I // in) pad_in),
    and y is sliced back. Out here inductor fuses the pad of x into the kernel that produces x,
    the slice of y into its consumer, and the backward's pad of g likewise; inside the ops the
    same padding was 20 strided copies a layer (28 ms a step in the 1B profile of 2026-12-04).
    """
    dt = compute_dtype(x)
    out_features, in_features = B.shape[0], A.shape[1]
    pad_out, pad_in = (
        (gemm.padding(out_features), gemm.padding(in_features)) if gemm.pads(x) else (0, 0)
    )
    x, A, B = x.to(dt), A.to(dt), B.to(dt)
    if pad_in:
        x, A = F.pad(x, (0, pad_in)), F.pad(A, (0, pad_in))
        index = index + (index // in_features) * pad_in  # zero columns end each row
    if pad_out:
        B = F.pad(B, (0, 0, 0, pad_out))  # zero rows at the end: flat positions do not move
    y = _forward(x, A, B, values.to(dt), index, scale)
    return y[..., :out_features] if pad_out else y
