"""A refresh's memory on a GPU: the finder's allocations against the model the planner and the
chunking use (`subspace.finder_call_bytes`), and a batched refresh that sizes its calls by the
headroom under the run's peak (`galore.refresh_budget`) without raising that peak. Skipped
without CUDA.

Tolerances: the model is a least-squares fit to bench_refresh_memory's 36 cases with its
coefficients rounded up, measured / model 0.88-1.06 there; 0.8-1.1 here leaves the allocator's
rounding to 2 MiB blocks room at these smaller sizes."""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (the CUDA allocator's statistics)", allow_module_level=True)

from lowrank_train.projectors import galore  # noqa: E402
from lowrank_train.projectors.subspace import finder_call_bytes, side_of, svd_basis  # noqa: E402
from lowrank_train.seeding import generator  # noqa: E402

CUDA = torch.device("cuda")


@pytest.mark.parametrize("shape, rank", [((1024, 1024), 512), ((2736, 1024), 128)])
@pytest.mark.parametrize("warm", [False, True])
def test_the_finders_allocations_match_the_planners_model(shape, rank, warm):
    count, d = 4, min(shape)
    grads = [torch.randn(shape, device=CUDA, dtype=torch.bfloat16) for _ in range(count)]
    previous = torch.randn(count, d, rank, device=CUDA, dtype=torch.bfloat16) if warm else None
    gens = [generator(0, f"t{i}", "refresh", 0) for i in range(count)]
    # once before: cuBLAS's and cuSOLVER's workspaces (32 MiB and more on an H200) are
    # allocated through the caching allocator at their first use in a process, and stay
    warmup = previous.clone() if warm else None
    svd_basis(torch.stack(grads), side_of(shape), rank, "fast", warmup, gens)
    del warmup
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start = previous.clone() if warm else None  # the stacked previous bases are the call's
    basis = svd_basis(torch.stack(grads), side_of(shape), rank, "fast", start, gens)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base  # the model counts the output basis
    del basis
    planned = finder_call_bytes(shape, rank, "fast", warm, torch.bfloat16, count)
    assert 0.8 <= measured / planned <= 1.1, (measured, planned)


def test_a_refresh_within_the_backwards_headroom_does_not_raise_the_peak():
    """24 warm 1024 x 1024 matrices at rank 512 (~25 MiB a matrix in a call) after a
    'backward' that freed 300 MiB: the refresh takes several calls, and the peak stays."""
    projector = galore.GaLore(galore.GaLore.Config(rank=512, svd="fast"))
    shape = (1024, 1024)
    grads = [torch.randn(shape, device=CUDA, dtype=torch.bfloat16) for _ in range(24)]
    states = [{"side": side_of(shape), "name": f"t{i}", "refreshes": 0} for i in range(24)]
    assert projector.refresh_many(list(zip(grads, states, strict=True))) == {}  # cold
    calls, find = [], galore.svd_basis
    galore.svd_basis = lambda grad, *a: calls.append(grad.shape[0]) or find(grad, *a)
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        freed = 300 * 2**20
        activations = torch.empty(freed, dtype=torch.uint8, device=CUDA)  # the backward's
        del activations
        peak = torch.cuda.max_memory_allocated()
        assert projector.refresh_many(list(zip(grads, states, strict=True))) == {}
        torch.cuda.synchronize()
    finally:
        galore.svd_basis = find
    assert len(calls) > 1 and sum(calls) == 24, calls
    assert torch.cuda.max_memory_allocated() <= peak + 0.1 * freed
    assert all(s["refreshes"] == 2 for s in states)
