"""The padded GEMMs of the custom ops and the optimizer step (`lowrank_train/gemm.py`): with
padding forced (the CUDA path) it is the plain product of the unpadded operands, for aligned
and misaligned sizes, row-major and transposed operands, and contiguous."""

from __future__ import annotations

import pytest
import torch

from lowrank_train import gemm


@pytest.mark.parametrize("m, k, n", [(16, 24, 40), (13, 21, 40), (16, 24, 37), (5, 21, 37)])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_padded_mm_equals_the_plain_product(m, k, n, a_t, b_t):
    gen = torch.Generator().manual_seed(m * k * n)
    a = torch.randn(k, m, generator=gen).T if a_t else torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen).T if b_t else torch.randn(k, n, generator=gen)
    padded = gemm.mm(a, b, pad=True)
    assert padded.shape == (m, n) and padded.is_contiguous()
    exact = (a.double() @ b.double()).float()
    torch.testing.assert_close(padded, exact, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gemm.mm(a, b), a @ b, rtol=0, atol=0)  # the CPU takes a @ b


def test_linear_and_matmul_flatten_the_leading_dimensions():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, 21, generator=gen), torch.randn(37, 21, generator=gen)
    torch.testing.assert_close(gemm.linear(x, w, pad=True), x @ w.T, rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 3, 37, generator=gen)
    torch.testing.assert_close(gemm.matmul(g, w, pad=True), g @ w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.1])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("m, k, n", [(16, 24, 40), (16, 24, 37), (13, 21, 37)])
def test_padded_addmm_equals_torch_addmm(m, k, n, inplace, beta):
    """beta base + alpha a b, padded (a misaligned base or operand) or not, in place or not."""
    gen = torch.Generator().manual_seed(m + k + n)
    base, a = torch.randn(m, n, generator=gen), torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    expected = torch.addmm(base.double(), a.double(), b.double(), beta=beta, alpha=-0.3).float()
    target = base.clone()
    out = gemm.addmm(target, a, b, -0.3, inplace=inplace, pad=True, beta=beta)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert (out is target) == inplace
    assert inplace or torch.equal(target, base)


@pytest.mark.parametrize("m, k, n", [(16, 24, 40), (13, 21, 37), (13, 24, 40), (16, 24, 37)])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_aligned_operands_are_aligned_in_their_own_layout(m, k, n, a_t, b_t):
    """What cuBLAS is given: K' and N' multiples of 8, every leading dimension (the output's is
    N') a multiple of 8, a transposed operand still transposed (a plain copy, not a transposing
    one), the original values in the top-left block and zeros elsewhere. g^T of the weight
    gradient (a_t, 13 rows) failed this before M was padded."""
    gen = torch.Generator().manual_seed(m + k + n)
    a = torch.randn(k, m, generator=gen).T if a_t else torch.randn(m, k, generator=gen)
    b = torch.randn(n, k, generator=gen).T if b_t else torch.randn(k, n, generator=gen)
    a2, b2 = gemm.aligned_operands(a, b)
    assert a2.shape[1] == b2.shape[0] and a2.shape[1] % 8 == 0 and b2.shape[1] % 8 == 0
    for padded, original, transposed in ((a2, a, a_t), (b2, b, b_t)):
        assert all(s % 8 == 0 for s in padded.stride() if s != 1)
        assert (padded.stride(0) == 1) == transposed  # the layout it had
        rows, cols = original.shape
        assert torch.equal(padded[:rows, :cols], original)
        assert padded[rows:].abs().sum() == 0
        assert padded[:, cols:].abs().sum() == 0
    if not a_t and not b_t and m % 8 == k % 8 == n % 8 == 0:
        assert a2 is a and b2 is b  # nothing to copy
