"""The Rayleigh-Ritz step of the fast refresh on a GPU, where it takes cuSOLVER's batched gesvda
(`projectors/subspace.py`; the CPU takes the Gram's eigh, tested on the CPU by the projector tests):
against a float64 SVD on the CPU of the same small matrix Q^T A. Skipped without CUDA.

Tolerances: the matrices have a spectral gap at the rank (s_r / s_{r+1} = 10), so the top-r
subspace is well defined and fp32 finds it to ~1e-5 (Davis-Kahan: error ~ eps ||A|| / gap);
1e-3 on the projector's Frobenius distance leaves margin for gesvda's Gram-based accuracy."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the gesvda path)", allow_module_level=True)

from lowrank_train.projectors import subspace  # noqa: E402


def gapped(batch: int, d: int, big: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, d, big) with singular values 1..0.5 on the top r, then 0.05..0.001."""
    u = torch.linalg.qr(torch.randn(batch, d, d, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(batch, big, d, generator=gen, dtype=torch.float64))[0]
    s = torch.cat([torch.linspace(1, 0.5, rank), torch.logspace(-1.3, -3, d - rank)])
    return (u * s.double()) @ v.mT


@pytest.mark.parametrize("batch, d, big, width, rank", [(3, 96, 200, 40, 24), (1, 64, 64, 30, 16)])
def test_gesvda_ritz_matches_float64(batch, d, big, width, rank):
    gen = torch.Generator().manual_seed(0)
    a = gapped(batch, d, big, rank, gen)
    q = torch.linalg.qr(a @ torch.randn(big, width, generator=gen).double())[0]
    got = subspace._rayleigh_ritz(a.float().cuda(), q.float().cuda(), rank).double().cpu()
    u = torch.linalg.svd(q.mT @ a, full_matrices=False)[0][..., :rank]
    want = q @ u
    eye = torch.eye(rank, dtype=torch.float64)
    assert (got.mT @ got - eye).norm(dim=(-2, -1)).max() < 1e-4
    distance = (got @ got.mT - want @ want.mT).norm(dim=(-2, -1)).max()
    assert distance < 1e-3, distance


def test_the_fast_finders_on_cuda_are_orthonormal_and_seeded():
    """Cold and warm fast bases of a batch on CUDA (draws copied from pinned memory without a
    wait): orthonormal, and the same for the same generators."""
    gen = torch.Generator().manual_seed(1)
    grads = gapped(3, 96, 200, 24, gen).float().cuda()

    def gens(seed):
        return [torch.Generator().manual_seed(seed + i) for i in range(3)]

    cold = subspace.svd_basis(grads, "left", 24, "fast", None, gens(5))
    warm = subspace.svd_basis(grads, "left", 24, "fast", cold, gens(7))
    again = subspace.svd_basis(grads, "left", 24, "fast", cold, gens(7))
    eye = torch.eye(24, device="cuda")
    for basis in (cold, warm):
        assert (basis.mT @ basis - eye).norm(dim=(-2, -1)).max() < 1e-4
    assert torch.equal(warm, again)


def test_tf32_power_iterations_keep_the_energy_and_the_callers_precision():
    """The warm finder's TF32 products (`subspace._mm`) on a power-law spectrum with no gap at
    the rank (s_i = 1/i, the hard case for a range finder): the basis keeps >= 0.99 of the
    energy the exact top-r basis keeps (issue 15's bar), is orthonormal to fp32's precision
    (Rayleigh-Ritz is fp32), and the caller's matmul precision is restored."""
    gen = torch.Generator().manual_seed(2)
    d, big, rank = 256, 640, 64
    u = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(big, d, generator=gen, dtype=torch.float64))[0]
    s = torch.arange(1, d + 1, dtype=torch.float64) ** -1.0
    grad = ((u * s) @ v.mT).float().cuda()
    nudged = grad + 0.1 * grad.norm() / grad.numel() ** 0.5 * torch.randn_like(grad)
    before = torch.get_float32_matmul_precision()
    cold = subspace.svd_basis(grad, "left", rank, "fast", None, torch.Generator().manual_seed(3))
    warm = subspace.svd_basis(nudged, "left", rank, "fast", cold, torch.Generator().manual_seed(4))
    assert torch.get_float32_matmul_precision() == before
    exact = subspace.svd_basis(nudged.double(), "left", rank, "exact", None, gen)
    ratio = subspace.captured_energy(nudged.double(), warm.double(), "left") / (
        subspace.captured_energy(nudged.double(), exact, "left")
    )
    assert ratio >= 0.99, ratio
    eye = torch.eye(rank, device="cuda")
    assert (warm.mT @ warm - eye).norm() < 1e-4
