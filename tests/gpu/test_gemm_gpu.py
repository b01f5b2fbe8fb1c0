"""The padded GEMM of the custom ops on a GPU (`lowrank_train/gemm.py` pads only on CUDA):
llama_1b's misaligned 5461-wide shapes in every operand layout, against the float64 product of
the same bf16 operands on the CPU. Skipped without CUDA.

Tolerance: SQNR >= 45 dB, as the dequant-matmul's (bf16 output, 8 significant bits, ~55 dB;
fp32 accumulation)."""

import math

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the padded path)", allow_module_level=True)

from lowrank_train import gemm  # noqa: E402


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    noise = (x.double().cpu() - ref).square().sum()
    return 10 * math.log10(float(ref.square().sum() / noise))


@pytest.mark.parametrize("m, k, n", [(512, 5461, 2048), (512, 2048, 5461), (5461, 512, 2048)])
@pytest.mark.parametrize("a_t", [False, True])
def test_padded_mm_on_cuda_matches_float64(m, k, n, a_t):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(k, m, generator=gen).T if a_t else torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    a, b = a.bfloat16(), b.bfloat16()
    out = gemm.mm(a.cuda(), b.cuda())
    assert out.shape == (m, n) and out.is_contiguous() and out.dtype == torch.bfloat16
    assert sqnr_db(out, a.double() @ b.double()) >= 45


@pytest.mark.parametrize("inplace", [False, True])
def test_padded_addmm_on_cuda_matches_float64(inplace):
    """The projected optimizer's W += alpha B N onto llama_1b's 2048 x 5461 down_proj."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2048, 5461, generator=gen).bfloat16()
    a, b = torch.randn(2048, 512, generator=gen).bfloat16(), torch.randn(512, 5461).bfloat16()
    target = base.cuda()
    out = gemm.addmm(target, a.cuda(), b.cuda(), -0.5, inplace=inplace)
    assert (out is target) == inplace and out.shape == base.shape
    assert sqnr_db(out, base.double() - 0.5 * (a.double() @ b.double())) >= 45
