"""Basis finders shared by every projector: exact SVD, a randomized range finder, warm subspace
iteration, and seeded Gaussian projections.

Convention: a basis is a (d, r) tensor on the projected side of an (m, n) gradient G, d the
smaller dimension (GaLore's rule; square matrices project the right side). With
`A = G` when m < n (left: low = B^T G, shape (r, n)) and `A = G^T` otherwise (right: low = G B,
shape (m, r)), an SVD basis is the top-r left singular vectors of A (d x D).
All finders run in fp32 (or float64 for float64 input) on the gradient's device; on CUDA the
power iterations' products with the gradient take TF32 tensor cores (`_mm`): they only find the
span, and Rayleigh-Ritz (fp32) takes the basis out of it, so the basis's accuracy and
orthonormality are fp32's. A warm refresh's Ritz step takes no eigensolver (`_drop_weakest`):
its basis goes on from the previous one column by column, with column 0 the leading direction.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from lowrank_train.seeding import generator

OVERSAMPLE = 16  # extra columns of the randomized finders: they absorb a flat spectral tail
POWER_ITERATIONS = 2  # cold range finder: leakage falls like (s_{r+1}/s_r)^(2q+1)
WARM_ITERATIONS = 2  # warm start: 1 captured 0.94-0.97 of exact on a flat spectrum, 2 >= 0.99
INVERSE_ITERATIONS = 4  # the warm truncation's search for the span's weakest directions
JACOBI_MAX = 32  # cuSOLVER's batched Jacobi eigensolver (syevjBatched) takes n <= 32
LEADING_ITERATIONS = 8  # power iterations for the truncated basis's leading direction


def side_of(shape: tuple[int, int]) -> str:
    """'left' (project rows, basis m x r) when m < n, else 'right' (basis n x r)."""
    m, n = shape
    return "left" if m < n else "right"


def oriented(grad: Tensor, side: str) -> Tensor:
    """A (..., d, D): the matrix whose left singular vectors are the basis, in fp32 (float64
    stays float64: the tests' references). Leading dimensions batch same-shape tensors."""
    a = grad if grad.dtype == torch.float64 else grad.float()
    return a if side == "left" else a.mT


@contextmanager
def _tf32():
    """fp32 matmuls on TF32 tensor cores inside, the caller's setting restored after."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _mm(x: Tensor, y: Tensor) -> Tensor:
    """x @ y for the power iterations' products with the gradient: on CUDA in fp32 they take
    TF32, whose inputs keep 10 mantissa bits and whose sums stay fp32. A bf16 gradient loses
    nothing there (7 bits); the iterate rounds at 2^-11 relative, an error the next iteration
    and the fp32 Rayleigh-Ritz (with its oversampled columns) absorb, and below the 2^-9 at
    which the basis is stored in bf16. In plain fp32 the products were a fifth of a warm
    refresh at 1B. The Grams of CholeskyQR stay fp32: their error would be Q's orthogonality
    error."""
    if not (x.is_cuda and x.dtype == torch.float32):
        return x @ y
    with _tf32():
        return x @ y


def exact_basis(a: Tensor, rank: int) -> Tensor:
    """Top-r left singular vectors of A by a full thin SVD (GaLore's official finder)."""
    u, _, _ = torch.linalg.svd(a, full_matrices=False)
    return u[..., :rank].contiguous()


def _rayleigh_ritz(a: Tensor, q: Tensor, rank: int) -> Tensor:
    """Best rank-r basis inside span(Q): Q times the top-r left singular vectors of the small
    w x D matrix Q^T A. On CUDA they are the right singular vectors of its transpose by
    cuSOLVER's batched gesvda (98 ms for 168 matrices of 2048 x 528 on an H200, where torch's
    batched eigh of the 528 x 528 Grams loops one syevd a matrix: 892 ms;
    benchmarks/profile_eigh.py, 2026-12-02). Elsewhere, and on CUDA for w <= 32 (one batched
    Jacobi launch), the eigenvectors of the Gram (Q^T A)(Q^T A)^T. Both square the condition
    number, and both give the same subspace. Both loop an eigensolver over the batch where
    w > 32: the warm refresh takes `_drop_weakest` instead."""
    small = q.mT @ a
    w, big = small.shape[-2:]
    if small.is_cuda and big >= w > JACOBI_MAX:  # gesvda wants a tall matrix
        _, _, vh = torch.linalg.svd(small.mT, full_matrices=False, driver="gesvda")
        vectors = vh.mT[..., :rank]  # descending
    else:
        _, ascending = torch.linalg.eigh(small @ small.mT)
        vectors = ascending[..., -rank:].flip(-1)
    return (q @ vectors).contiguous()


def _drop_weakest(a: Tensor, q: Tensor, rank: int, orth) -> Tensor:
    """The warm refresh's Rayleigh-Ritz without an eigensolver: span(Q) (..., d, w) less its
    k = w - rank directions of least energy. With H = (Q^T A)(Q^T A)^T (w x w), the energy of
    a unit x in Q's coordinates is x^T H x; the k weakest directions Z are found by inverse
    subspace iteration, Z <- orth((H + mu I)^-1 Z) from the last k coordinates (the Gaussian
    columns' directions, last in Q's order), and the basis is Q times an orthonormal basis of
    Z's complement that keeps Q's column order (`_complement`), so column j still continues the
    previous basis's column j (the moments kept across a refresh stay meaningful). Where the
    exact Ritz step loops cuSOLVER's eigensolver over the batch (gesvda: ~760 launches a
    matrix, 128k in a warm refresh at 1B, 0.93 s a step; benchmarks/profile_optim_step.py,
    H200, 2026-12-02), this is a few batched small factorizations. The shift mu = 1e-5
    tr(H) bounds the factored matrix's condition number by 1e5 (fp32's Cholesky holds); the
    directions below it hold under 1e-5 of the span's energy each, so which of them is dropped
    hardly matters (16 of them: < 2e-4 of it). The energy kept equals the
    exact Ritz step's up to the inverse iteration's convergence, tested against float64."""
    w = q.shape[-1]
    small = q.mT @ a
    h = small @ small.mT
    eye = torch.eye(w, dtype=h.dtype, device=h.device)
    mu = 1e-5 * h.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]  # cond <= 1e5
    factor, info = torch.linalg.cholesky_ex(h + mu * eye)  # H + mu I = L L^T
    failed = info != 0
    z = eye[:, rank:].expand(*h.shape[:-2], w, w - rank)
    for _ in range(INVERSE_ITERATIONS):
        # two cuBLAS triangular solves; torch.cholesky_solve would take MAGMA, whose first
        # use in a process costs more than a warm refresh
        z = torch.linalg.solve_triangular(
            factor, torch.where(failed[..., None, None], 0.0, z), upper=False
        )
        z = orth(torch.linalg.solve_triangular(factor.mT, z, upper=True))
    if isinstance(orth, _Deferred):
        orth.failed = orth.failed | failed
    kept = _complement(z)
    return _lead_with_the_top_direction(q @ kept, kept.mT @ h @ kept)


def _lead_with_the_top_direction(basis: Tensor, energy: Tensor) -> Tensor:
    """The basis with its first column turned onto the span's leading direction (the top
    eigenvector y of `energy` = B^T A A^T B, r x r, by power iteration), by the
    Householder reflection along e_0 + y (it maps e_0 to -y; column 0 is negated after), so
    that columns stay orthonormal, the others move by a rank-one correction that vanishes as
    y nears e_0, and column 0 is the leading singular vector as in an exact SVD (Q-GaLore's
    lazy refresh compares it between refreshes)."""
    # start at the most energetic column, plus a little of every other (so that a start that
    # happens to be an eigenvector of a lesser eigenvalue cannot hold the iteration)
    r = energy.shape[-1]
    eye = torch.eye(r, dtype=energy.dtype, device=energy.device)
    y = eye[energy.diagonal(dim1=-2, dim2=-1).argmax(-1)]  # one_hot would sync to check
    y = (y + 0.01 / r**0.5)[..., None]
    for _ in range(LEADING_ITERATIONS):
        y = energy @ y
        y = y / y.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    u = y * torch.where(y[..., :1, :] >= 0, 1.0, -1.0)  # the sign nearest e_0
    u[..., 0, 0] += 1.0  # e_0 + y, of norm >= 1: no cancellation where y is near e_0
    u = u / u.norm(dim=-2, keepdim=True)
    out = basis - 2 * (basis @ u) @ u.mT  # column 0 is now -y
    out[..., :, 0] *= -1
    return out.contiguous()


def _complement(z: Tensor) -> Tensor:
    """(..., w, w - k): an orthonormal basis of the complement of span(Z), Z (..., w, k)
    orthonormal, by k Householder reflections of Z with its rows reversed (a QL
    factorization), so that where Z lies in the last k coordinates the result is the first
    w - k columns of the identity: column j stays coordinate j, as far as Z allows."""
    w, k = z.shape[-2:]
    rows = z.flip(-2).clone()
    reflectors = []
    for j in range(k):
        x = rows[..., j:, j]
        head = torch.where(x[..., :1] >= 0, 1.0, -1.0)
        v = x + head * x.norm(dim=-1, keepdim=True) * (torch.arange(w - j, device=x.device) == 0)
        v = v / v.norm(dim=-1, keepdim=True)
        rows[..., j:, :] -= 2 * v[..., :, None] * (v[..., None, :] @ rows[..., j:, :])
        reflectors.append(v)
    m = torch.eye(w, dtype=z.dtype, device=z.device)[:, k:].expand(*z.shape[:-2], w, w - k)
    m = m.contiguous()
    for j in reversed(range(k)):  # H_0 ... H_{k-1} applied to [0; I]
        v = reflectors[j]
        m[..., j:, :] -= 2 * v[..., :, None] * (v[..., None, :] @ m[..., j:, :])
    return m.flip(-2).flip(-1)


def orthonormal(y: Tensor, plain: int = 2) -> Tensor:
    """An orthonormal basis of span(Y), Y (..., d, w) with w <= d: shifted CholeskyQR3
    (`cholesky_qr3`, `plain` passes after the shifted one), and for a matrix whose Cholesky
    fails a Householder QR, alone, so a batch gives each matrix what it gets by itself. One
    host sync (the failure check)."""
    q, failed = cholesky_qr3(y, plain)
    if bool(failed.any()):
        return _householder_where(y, failed)
    return q


def cholesky_qr3(y: Tensor, plain: int = 2) -> tuple[Tensor, Tensor]:
    """(Q, failed): shifted CholeskyQR3 (Fukaya et al. 2020) of Y (..., d, w), without a host
    sync. Each pass is Q <- Q R^-1 with R^T R = Q^T Q (+ a shift s in the first), so the span
    never changes, only the conditioning: the shifted pass divides the condition number by
    about ||Y|| / sqrt(s), bringing Y into CholeskyQR2's range, and two plain passes make Q
    orthonormal to working precision. With `plain` = 1 (shifted CholeskyQR2) Q spans Y but
    its orthogonality error grows as cond(Q_1)^2 u: 2e-5 at cond(Y) 1e3, 0.37 at 3e5 (fp32,
    2-norm, on the CPU), still cond(Q) <= 1.5, all a power iteration's iterate needs (the next
    product reads its span alone), at two thirds of the cost. A w x w Gram, a Cholesky and a
    triangular solve per pass (as a GEMM with R's inverse it was no faster: 0.81 s against 0.79 s a warm refresh
    at 1B, refresh-7 and refresh-6, H200, 2026-12-03), where a Householder QR of the tall
    d x w matrix is latency-bound on a GPU (it was most of a refresh at 1B). `failed` (...)
    flags the matrices whose Cholesky failed in some pass; their Q is zero (never NaN, so the
    finders' later factorizations of a batch cannot raise)."""
    d, w = y.shape[-2:]
    unit = torch.finfo(y.dtype).eps / 2
    # Fukaya's proven shift, 11 (d w + w (w + 1)) u ||Y||_F^2, exceeds ||Y||_F^2 itself at a
    # refresh's sizes in fp32 (1.1x at 2736 x 528), so its pass conditioned nothing and any Y
    # past cond ~1e4 failed a plain pass: 21 of 168 warm matrices at 350M, rank 512 (H200,
    # 2026-12-03, bench_optim's optim-15), each redone by Householder. The shift only has to
    # cover the Gram's rounding, which grows as sqrt(d) u ||Y||^2 in practice (errors of
    # random sign), not as d w u: with it, Y up to cond ~1e6 passes at 1B's shapes (5461 x
    # 528). Where it is too small the Cholesky fails, is flagged and the matrix is redone, so
    # correctness never rests on it.
    shift = d**0.5 * unit * y.square().sum(dim=(-2, -1), keepdim=True)
    eye = torch.eye(w, dtype=y.dtype, device=y.device)
    q, failed = y, torch.zeros(y.shape[:-2], dtype=torch.bool, device=y.device)
    for shifted in (True, *[False] * plain):
        gram = q.mT @ q + (shift * eye if shifted else 0)
        r, info = torch.linalg.cholesky_ex(gram, upper=True)
        failed = failed | (info != 0)
        q = torch.linalg.solve_triangular(r, q, upper=True, left=False)
        q = q.masked_fill_(failed[..., None, None], 0.0)  # in place: its own fresh output
    return q, failed


def _householder_where(y: Tensor, bad: Tensor) -> Tensor:
    """orthonormal(y) with the matrices flagged `bad` by Householder QR, the rest again by
    shifted CholeskyQR3."""
    if y.ndim == 2:
        return torch.linalg.qr(y)[0]
    good = ~bad
    out = torch.empty_like(y)
    out[bad] = torch.linalg.qr(y[bad])[0]
    if bool(good.any()):
        out[good] = orthonormal(y[good])
    return out


class _Deferred:
    """An orthonormalizer for the finders that never syncs: CholeskyQR3 failures are collected
    in `failed`, for the caller to check once per finder call (a check a pass cost a warm
    refresh at 1B 15 host round trips per batch)."""

    def __init__(self):
        self.failed: Tensor | None = None

    def __call__(self, y: Tensor, plain: int = 2) -> Tensor:
        q, failed = cholesky_qr3(y, plain)
        self.failed = failed if self.failed is None else self.failed | failed
        return q


def _draws(gens: list[torch.Generator], rows: int, cols: int, like: Tensor) -> Tensor:
    """One (rows, cols) N(0, 1) draw per generator, stacked to like's batch shape. On the CPU
    from the generators themselves; on CUDA on the GPU, from a CUDA generator seeded by each
    CPU generator (a CPU draw of a warm refresh's 5.5M normals at 1B and its copy left the GPU
    idle ~0.1 s: benchmarks/profile_optim_step.py, H200, 2026-12-02). Every CUDA rank and a
    resume on CUDA draw the same; a CPU run draws other values (as `gaussian_basis`)."""
    if not like.is_cuda:
        draws = [torch.randn(rows, cols, generator=g) for g in gens]
        out = torch.stack(draws) if like.ndim == 3 else draws[0]
        return out.to(like.dtype)
    draws = []
    for g in gens:
        seed = int(torch.randint(0, 2**62, (), generator=g))
        on_gpu = torch.Generator(device=like.device).manual_seed(seed)
        draws.append(
            torch.randn(rows, cols, generator=on_gpu, device=like.device, dtype=like.dtype)
        )
    return torch.stack(draws) if like.ndim == 3 else draws[0]


def randomized_basis(a: Tensor, rank: int, omega: Tensor, orth=orthonormal) -> Tensor:
    """Halko-Martinsson-Tropp range finder: Y = (A A^T)^q A Omega, orthonormalized after every
    product; Omega (..., D, w) Gaussian."""
    q = orth(_mm(a, omega), plain=1)  # an iterate: its span alone matters
    return _rayleigh_ritz(a, _power_iterations(a, q, POWER_ITERATIONS, orth), rank)


def _power_iterations(a: Tensor, q: Tensor, count: int, orth) -> Tensor:
    """Q <- orth(A orth(A^T Q)), `count` times. Each product is orthonormalized on its own, so
    a factor's condition number grows by s_1 / s_w, not its square. Orthonormalizing only
    A A^T Q (half the CholeskyQR passes) failed shifted CholeskyQR3 in fp32 on every
    projected tensor of a real run's gradients (llama_20m, rank 128, s_1 / s_144 up to 7,300:
    cond ~ 1e5 to 5e7, where fp32's shift, ~5% of ||Y||^2 at these sizes, leaves the second
    pass past CholeskyQR2's ~4e3), so every warm refresh took the Householder fallback."""
    for i in range(count):  # the iterates' spans alone matter; the last is Q itself
        q = orth(_mm(a.mT, q), plain=1)
        q = orth(_mm(a, q), plain=2 if i == count - 1 else 1)
    return q


def warm_basis(a: Tensor, previous: Tensor, rank: int, extra: Tensor, orth=orthonormal) -> Tensor:
    """Subspace iteration started from the previous basis plus the Gaussian columns `extra`
    (..., d, k) (so a direction that entered the top r since the last refresh is found), then
    Rayleigh-Ritz. The start is not orthonormalized: the previous basis is orthonormal to its
    storage precision and `extra / sqrt(d)` has near-unit, near-orthogonal columns, so the
    start is well conditioned, and the first product's orthonormalization sees a condition
    number within a small factor of the one it would see from an orthonormal start (the span
    is the same). That saves three of the fifteen CholeskyQR passes of a warm refresh."""
    start = torch.cat([previous.to(a.dtype), extra / a.shape[-2] ** 0.5], dim=-1)
    q = _power_iterations(a, start, WARM_ITERATIONS, orth)
    small_ritz = q.shape[-1] <= JACOBI_MAX  # one batched Jacobi eigh: exact and cheap
    if isinstance(orth, _Deferred) and not small_ritz:  # the first try: no eigensolver loop
        return _drop_weakest(a, q, rank, orth)
    return _rayleigh_ritz(a, q, rank)  # and the fallback of a matrix that failed


def svd_basis(
    grad: Tensor,
    side: str,
    rank: int,
    method: str,
    previous: Tensor | None,
    gen: torch.Generator | list[torch.Generator],
    fallbacks: list[int] | None = None,
) -> Tensor:
    """The (d, r) basis of `grad` by `method` (exact | fast); fast warm-starts from `previous`.
    Batched: grad (b, m, n), previous (b, d, r), one generator per matrix; each matrix gets
    what it would get alone (its own draws). The fast finders run without host syncs; a
    matrix whose CholeskyQR failed anywhere is found again with the Householder fallback, from
    the same draws (one sync a call), and their count is appended to `fallbacks` (a fallback
    is correct and slow: the refresh event reports it)."""
    gens = gen if isinstance(gen, list) else [gen]
    a = oriented(grad, side)
    d, big = a.shape[-2:]
    if method == "exact" or rank + OVERSAMPLE >= d:  # near full rank: exact is cheaper
        return exact_basis(a, rank)
    if previous is None:
        omega = _draws(gens, big, rank + OVERSAMPLE, a)  # d > rank + OVERSAMPLE here

        def find(rows, orth):
            return randomized_basis(a[rows], rank, omega[rows], orth)
    else:
        extra = _draws(gens, d, OVERSAMPLE, a)  # d > rank + OVERSAMPLE here

        def find(rows, orth):
            return warm_basis(a[rows], previous[rows], rank, extra[rows], orth)

    every = (...,)  # a[...] is a itself, batched or not
    deferred = _Deferred()
    basis = find(every, deferred)
    if bool(deferred.failed.any()):
        if fallbacks is not None:
            fallbacks.append(int(deferred.failed.sum()))
        if a.ndim == 2:
            return find(every, orthonormal)
        basis[deferred.failed] = find(deferred.failed, orthonormal)
    return basis


# What a batched `svd_basis` call allocates beyond its gradients, in fp32 elements per matrix
# of the d x D input (d D), the D x w and d x w iterates (w = r + OVERSAMPLE), and per call:
# least-squares fits (each coefficient rounded up ~7%, to cover the worst fitted case) to 36
# measured cases, 1024 x 1024 to 11008 x 4096 at ranks 128 to 1024, 4 matrices a call
# (benchmarks/bench_refresh_memory.py, H200, 2026-12-03, call wsp-2;
# benchmarks/results/refresh_memory_h200_2026-12-03.jsonl; measured / model 0.97-1.07 warm
# and 0.93-1.17 cold before the rounding, 0.88-1.06 after: `bench_refresh_memory.py --replan`,
# refresh_memory_replan_cuda-planned_2026-12-03.jsonl). The cold finder holds more iterates
# (its Gaussian start, the randomized finder's extra products) and cuSOLVER's batched gesvda a
# workspace of its own; the exact SVD's workspace grows with the input alone.
EXACT_PER_INPUT = 4.4
COLD_TERMS = (0.4, 8.9, 4.4)  # x (d D, D w, d w)
COLD_CALL_BYTES = 32 * 2**20
WARM_TERMS = (0.9, 2.7, 5.4)


def finder_call_bytes(
    shape: tuple[int, int], rank: int, method: str, warm: bool, dtype: torch.dtype, matrices: int
) -> int:
    """The model of what a `svd_basis` call on `matrices` (m, n) gradients of `dtype`
    allocates beyond them: their stacked copy (d D of dtype each), a warm start's stacked
    previous bases (d r of dtype each) and the finder's fp32 temporaries (the constants above)."""
    d, big = min(shape), max(shape)
    per = d * big * dtype.itemsize
    if method == "exact" or rank + OVERSAMPLE >= d:  # svd_basis takes the exact SVD there
        return matrices * (per + int(4 * EXACT_PER_INPUT * d * big))
    w = rank + OVERSAMPLE
    terms = WARM_TERMS if warm else COLD_TERMS
    fp32 = sum(c * x for c, x in zip(terms, (d * big, big * w, d * w), strict=True))
    per += int(4 * fp32) + (d * rank * dtype.itemsize if warm else 0)
    return matrices * per + (0 if warm else COLD_CALL_BYTES)


def gaussian_basis(d: int, rank: int, seed: int, name: str, index: int, device) -> Tensor:
    """A (d, r) projection with entries N(0, 1/r), from (run seed, tensor name, resample index):
    E[B B^T] = I, identical on every rank and after a resume on the same device type. Drawn on
    `device` by that device's generator (Flora redraws it every step; a CPU draw and copy cost
    0.4 s a step at 1B), so a CUDA run and a CPU run of one seed draw different projections."""
    gen = generator(seed, name, "projection", index, device=device)
    return torch.randn(d, rank, generator=gen, device=device) / rank**0.5


def captured_energy(grad: Tensor, basis: Tensor, side: str) -> float:
    """||B^T A||_F^2 / ||A||_F^2: the share of the gradient's energy a basis keeps."""
    a = oriented(grad, side)
    return float((basis.to(a.dtype).mT @ a).square().sum() / a.square().sum())
