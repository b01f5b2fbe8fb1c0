"""`sltrain` (W = (alpha/r) B A + S on a fixed random support) against float64 references
written here: support, init, forward and gradients, what backward keeps, bytes, training,
resume and bad keys."""

from __future__ import annotations

import math

import pytest
import torch
from projector_cases import assert_resume_is_bitwise, assert_short_run_learns, cli, final_weights
from test_lowrank import dense_draw

from lowrank_train import gemm
from lowrank_train.models import build_model
from lowrank_train.parameterizations import PARAMETERIZATIONS
from lowrank_train.parameterizations.sltrain import SLTrainLinear
from lowrank_train.resolve import load_run

SLTrain = PARAMETERIZATIONS.get("sltrain")


def convert(m: int, n: int, seed: int = 0, dtype=torch.float32, **options) -> SLTrainLinear:
    return SLTrain(SLTrain.Config(**options)).convert(
        dense_draw(m, n), "layer", torch.Generator().manual_seed(seed), dtype
    )


def trained_like(layer: SLTrainLinear) -> SLTrainLinear:
    """B = 0 at init hides every term of dA and of W's low-rank part: give it values."""
    with torch.no_grad():
        layer.B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(7))
    return layer


def test_support_is_fixed_by_the_generator_and_its_density_exact():
    m, n, delta = 13, 29, 0.07
    a, b = convert(m, n, density=delta, rank=3), convert(m, n, density=delta, rank=5)
    assert a.index.dtype == torch.int32
    assert a.index.numel() == int(delta * m * n) == 26
    assert torch.equal(a.index, b.index)  # drawn first: the rank does not move it
    idx = a.index.long()
    assert torch.equal(idx, idx.unique()) and 0 <= idx.min() and idx.max() < m * n  # sorted, unique
    assert not torch.equal(a.index, convert(m, n, seed=1, density=delta, rank=3).index)


def test_init_is_the_official_codes():
    """B = 0; A and v ~ U(-1/sqrt(n), 1/sqrt(n)): inside the bound, variance 1/(3n)."""
    n = 384
    layer = convert(256, n, rank=16, density=0.05)
    assert torch.equal(layer.B, torch.zeros_like(layer.B))
    for t in (layer.A, layer.values):
        assert t.abs().max() <= n**-0.5
        var, N = 1 / (3 * n), t.numel()
        # the sample variance of U(-a, a) has std var * sqrt(4 / (5 N)) (kurtosis 9/5); 4 of those
        assert abs(t.var().item() - var) < 4 * var * math.sqrt(0.8 / N)
    assert layer.scale == 32.0 / 16


def reference_weight(layer: SLTrainLinear, A, B, v) -> torch.Tensor:
    """float64: W = s B A, then W.view(-1)[I] += v."""
    W = layer.scale * B @ A
    return W.reshape(-1).index_put((layer.index.long(),), v, accumulate=True).reshape(W.shape)


def test_forward_and_gradients_match_float64():
    layer = trained_like(convert(12, 20, rank=4, density=0.2, alpha=6.0)).double()
    x = torch.randn(3, 7, 20, dtype=torch.float64, requires_grad=True)
    leaves = tuple(p.detach().clone().requires_grad_() for p in (layer.A, layer.B, layer.values))
    xr = x.detach().clone().requires_grad_()
    ref, out = xr @ reference_weight(layer, *leaves).T + layer.bias.detach(), layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        layer.dense_weight(), reference_weight(layer, *leaves), rtol=1e-12, atol=1e-15
    )
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, layer.A, layer.B, layer.values), g)
    ref_grads = torch.autograd.grad(ref, (xr, *leaves), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("out_features, in_features", [(13, 21), (16, 21), (13, 24)])
def test_padded_path_matches_float64_and_its_gemms_copy_nothing(
    monkeypatch, out_features, in_features
):
    """Padding forced (the CUDA path) at misaligned sizes: x, A get zero columns, B zero rows,
    the indices move to the padded rows, and y, every gradient are those of float64 W. Inside
    the ops every GEMM is then aligned: gemm never needs a padded copy (it would raise)."""
    monkeypatch.setattr(gemm, "pads", lambda t: True)

    def no_copy(a, b):
        raise AssertionError(f"a padded copy inside the op: {a.shape} {a.stride()} {b.shape}")

    monkeypatch.setattr(gemm, "aligned_operands", no_copy)
    layer = trained_like(convert(out_features, in_features, rank=8, density=0.2)).double()
    # 16 tokens: the weight gradient's contraction (over tokens) is aligned too
    x = torch.randn(2, 8, in_features, dtype=torch.float64, requires_grad=True)
    leaves = tuple(p.detach().clone().requires_grad_() for p in (layer.A, layer.B, layer.values))
    xr = x.detach().clone().requires_grad_()
    ref, out = xr @ reference_weight(layer, *leaves).T + layer.bias.detach(), layer(x)
    assert out.shape == (2, 8, out_features)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, layer.A, layer.B, layer.values), g)
    ref_grads = torch.autograd.grad(ref, (xr, *leaves), g)
    for a, b in zip(grads, ref_grads, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_backward_keeps_no_out_by_in_tensor(backend):
    """The autograd graph saves x, A, B, v and I, and rebuilds W in backward: nothing of W's
    (out, in) size is held between forward and backward, also when inductor compiles the
    layer (its partitioner, traced through, kept W: the custom ops hide it)."""
    m, n, r = 24, 40, 4
    layer = trained_like(convert(m, n, rank=r, density=0.1))
    x = torch.randn(
        2, 5, n, requires_grad=True
    )  # 10 tokens: no saved shape can be (m, n) by chance
    forward = layer if backend == "eager" else torch.compile(layer, backend=backend, fullgraph=True)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x)
    assert saved and all(math.prod(s) < m * n for s in saved), saved
    out.sum().backward()
    assert layer.A.grad is not None and layer.values.grad is not None


def test_the_custom_ops_pass_opcheck():
    layer = trained_like(convert(12, 20, rank=4, density=0.2))
    x = torch.randn(3, 20, requires_grad=True)
    args = (x, layer.A, layer.B, layer.values, layer.index, layer.scale)
    torch.library.opcheck(torch.ops.lowrank_train.sparse_lowrank_linear.default, args)


@pytest.mark.parametrize("backend, padded", [("aot_eager", False), ("inductor", True)])
def test_compiles_forward_and_backward_without_a_graph_break(monkeypatch, backend, padded):
    """padded: CUDA's path (x, A, B padded, the indices shifted, y sliced outside the ops) at
    misaligned out and in, under inductor, which fuses them."""
    if padded:
        monkeypatch.setattr(gemm, "pads", lambda t: True)
    torch._dynamo.reset()
    layer = trained_like(convert(13, 21, rank=8, density=0.2))
    x = torch.randn(2, 8, 21, requires_grad=True)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    params = (x, layer.A, layer.B, layer.values)
    eager = torch.autograd.grad(layer(x).square().sum(), params)
    graph = torch.autograd.grad(compiled(x).square().sum(), params)
    for a, b in zip(eager, graph, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype, p_w", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_stored_bytes_are_the_formula(dtype, p_w):
    """p_w (r (m + n) + nnz) + 4 nnz: factors and values in the run's dtype, int32 indices."""
    m, n, r, delta = 24, 40, 4, 0.1
    layer = convert(m, n, rank=r, density=delta, dtype=dtype)
    nnz = int(delta * m * n)
    stored = layer.stored_bytes()
    assert stored == {
        "A": p_w * r * n,
        "B": p_w * m * r,
        "values": p_w * nnz,
        "bias": p_w * m,
        "index": 4 * nnz,
    }
    assert sum(stored.values()) - p_w * m == p_w * (r * (m + n) + nnz) + 4 * nnz


def test_under_autocast_the_matmuls_run_in_bf16_and_gradients_stay_fp32():
    layer = trained_like(convert(12, 20, rank=4, density=0.2))
    x = torch.randn(3, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.values.grad.dtype == layer.A.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weights.density=0", "weights.density: 0.0 must be in (0, 1)"),
        ("weights.density=1", "weights.density: 1.0 must be in (0, 1)"),
        ("weights.rank=65", "weights.rank: 65 is above the smallest dimension"),
        ("weights.alpha=0", "weights.alpha: 0.0 must be > 0"),
    ],
)
def test_bad_options_are_one_line(tiny_run, capsys, override, expected):
    path = tiny_run("bad", {"weights": {"name": "sltrain", "rank": 8}})
    assert cli(path, override) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_sltrain_learns(tiny_run):
    # alpha 4 at rank 16 is the official 60M scale s = alpha / r = 32 / 128 = 0.25 (the default
    # alpha at rank 16 would be s = 2, eight times it, and spikes at this lr)
    extra = {"weights": {"name": "sltrain", "rank": 16, "alpha": 4.0}}
    assert_short_run_learns(tiny_run, "sltrain", extra)


def test_sltrain_resumes_bitwise_with_its_support_unchanged(tiny_run):
    extra = {
        "weights": {"name": "sltrain", "rank": 16},
        "train": {"steps": 6},
        "checkpoint": {"every": 3},
    }
    straight, _ = assert_resume_is_bitwise(tiny_run, extra, stop_at=3)
    cfg, _ = load_run(straight / "config.yaml")
    drawn = build_model(cfg, 512, torch.device("cpu")).state_dict()
    saved = final_weights(straight)
    supports = [k for k in saved if k.endswith(".index")]
    assert len(supports) == 14 and all(saved[k].dtype == torch.int32 for k in supports)
    assert all(torch.equal(saved[k], drawn[k]) for k in supports)  # as drawn at init
