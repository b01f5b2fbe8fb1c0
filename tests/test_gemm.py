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
