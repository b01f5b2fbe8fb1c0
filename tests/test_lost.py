"""`lost` (top-r SVD low-rank path + channel-sparse block of the complement, mixed by gamma)
against float64 references written here: the split, the full-budget identity, each key's
branch, forward and gradients, bytes, training, resume, export refusal and bad keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from projector_cases import assert_resume_is_bitwise, assert_short_run_learns, cli
from test_lowrank import dense_draw

from lowrank_train.cli import main
from lowrank_train.parameterizations import PARAMETERIZATIONS
from lowrank_train.parameterizations.lost import LOSTLinear

LOST = PARAMETERIZATIONS.get("lost")
F64 = torch.float64


def convert(linear, dtype=F64, **options) -> LOSTLinear:
    return LOST(LOST.Config(**options)).convert(linear, "layer", torch.Generator(), dtype)


def draw64(m: int, n: int, seed: int = 0) -> torch.nn.Linear:
    return dense_draw(m, n, seed).double()


def test_full_sparse_budget_without_the_nonlinearity_is_the_dense_init():
    """rho = 1 and the whole complement: gamma W_r + (1 - gamma) W_c, each divided by its
    weight at init, is W0, for any gamma."""
    dense = draw64(14, 23)
    x = torch.randn(4, 23, dtype=F64)
    for gamma in (0.2, 0.5, 0.9):
        layer = convert(dense, rank=5, sparse_ratio=1.0, gamma=gamma)
        assert layer.channels.tolist() == list(range(23))
        torch.testing.assert_close(layer.dense_weight(), dense.weight, rtol=0, atol=1e-14)
        torch.testing.assert_close(layer(x), dense(x), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "sparse_values, complement_rank", [("complement", 0), ("complement", 4), ("dense", 0)]
)
def test_the_split_matches_a_float64_svd(sparse_values, complement_rank):
    """gamma B A = W_r (the rank-r truncation); I = the k channels of largest ||W_c[:, j]||
    (ties to the lower index), sorted; (1 - gamma) W_s = W_c[:, I] or W0[:, I]."""
    m, n, r, rho, gamma = 18, 31, 4, 0.2, 0.3
    dense = draw64(m, n)
    layer = convert(
        dense,
        rank=r,
        sparse_ratio=rho,
        gamma=gamma,
        sparse_values=sparse_values,
        complement_rank=complement_rank,
    )
    W0 = dense.weight.detach()
    U, S, Vh = torch.linalg.svd(W0, full_matrices=False)
    W_r = U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]
    end = r + complement_rank if complement_rank else min(m, n)
    W_c = U[:, r:end] @ torch.diag(S[r:end]) @ Vh[r:end]
    k = int(rho * n)
    scores = W_c.norm(dim=0)
    order = sorted(range(n), key=lambda j: (-scores[j].item(), j))
    chosen = sorted(order[:k])
    torch.testing.assert_close(gamma * layer.B @ layer.A, W_r, rtol=0, atol=1e-14)
    assert layer.channels.dtype == torch.int32 and layer.channels.tolist() == chosen
    source = W_c if sparse_values == "complement" else W0
    torch.testing.assert_close((1 - gamma) * layer.W_s, source[:, chosen], rtol=0, atol=1e-14)


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_forward_and_gradients_match_float64(activation):
    """y = gamma B phi(A x) + (1 - gamma) W_s x_I + b."""
    layer = convert(draw64(12, 20), rank=3, sparse_ratio=0.25, gamma=0.7, activation=activation)
    phi = F.silu if activation == "silu" else (lambda h: h)
    x = torch.randn(2, 5, 20, dtype=F64, requires_grad=True)
    A, B, W_s = (p.detach().clone().requires_grad_() for p in (layer.A, layer.B, layer.W_s))
    chosen = layer.channels.long()
    ref = 0.7 * phi(x @ A.T) @ B.T + 0.3 * x[..., chosen] @ W_s.T + layer.bias.detach()
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (layer.A, layer.B, layer.W_s), g)
    for a, b in zip(grads, torch.autograd.grad(ref, (A, B, W_s), g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_each_key_isolates_its_branch():
    """sparse_ratio 0 leaves the low-rank path alone (same A, B); activation changes only the
    low-rank path; the sparse path is what the layer adds to it."""
    dense = draw64(16, 24)
    x = torch.randn(6, 24, dtype=F64)
    full = convert(dense, rank=4, gamma=0.6, sparse_ratio=0.25)
    lowrank = convert(dense, rank=4, gamma=0.6, sparse_ratio=0.0)
    silu = convert(dense, rank=4, gamma=0.6, sparse_ratio=0.25, activation="silu")
    assert lowrank.W_s is None and lowrank.channels is None
    assert "W_s" not in dict(lowrank.named_parameters())
    assert torch.equal(lowrank.A, full.A) and torch.equal(lowrank.B, full.B)
    torch.testing.assert_close(lowrank(x), 0.6 * x @ (full.B @ full.A).T + dense.bias.detach())
    sparse_path = 0.4 * x[:, full.channels.long()] @ full.W_s.T
    torch.testing.assert_close(full(x) - lowrank(x), sparse_path, rtol=1e-12, atol=1e-14)
    low_silu = 0.6 * F.silu(x @ full.A.T) @ full.B.T + dense.bias.detach()
    torch.testing.assert_close(silu(x) - low_silu, sparse_path, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, p_w", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_stored_bytes_are_the_formula(dtype, p_w):
    """p_w (r (m + n) + m k) + 4 k, k = max(1, int(rho n))."""
    m, n, r, rho = 24, 40, 4, 0.05
    layer = convert(dense_draw(m, n), dtype=dtype, rank=r, sparse_ratio=rho)
    k = 2
    stored = layer.stored_bytes()
    assert stored == {
        "A": p_w * r * n,
        "B": p_w * m * r,
        "W_s": p_w * m * k,
        "bias": p_w * m,
        "channels": 4 * k,
    }
    assert sum(stored.values()) - p_w * m == p_w * (r * (m + n) + m * k) + 4 * k


def test_compiles_forward_and_backward_without_a_graph_break():
    layer = convert(dense_draw(12, 20), dtype=torch.float32, rank=3, sparse_ratio=0.25)
    x = torch.randn(3, 20, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    params = (x, layer.A, layer.B, layer.W_s)
    eager = torch.autograd.grad(layer(x).square().sum(), params)
    graph = torch.autograd.grad(compiled(x).square().sum(), params)
    for a, b in zip(eager, graph, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weights.sparse_ratio=1.5", "weights.sparse_ratio: 1.5 must be in [0, 1]"),
        ("weights.gamma=0", "weights.gamma: 0.0 must be in (0, 1)"),
        ("weights.gamma=1", "weights.gamma: 1.0 must be in (0, 1)"),
        ("weights.rank=65", "weights.rank: 65 is above the smallest dimension"),
        ("weights.complement_rank=-1", "weights.complement_rank: -1 must be >= 0"),
    ],
)
def test_bad_options_are_one_line(tiny_run, capsys, override, expected):
    path = tiny_run("bad", {"weights": {"name": "lost", "rank": 8}})
    assert cli(path, override) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_lost_learns(tiny_run):
    # 60 steps: at 30 the tiny model ends ~0.06 nat short of the bar, as dense weights do there
    assert_short_run_learns(tiny_run, "lost", {"weights": {"name": "lost", "rank": 16}}, steps=60)


def test_lost_with_silu_trains_resumes_bitwise_and_refuses_export_in_one_line(
    tiny_run, tmp_path, capsys
):
    extra = {
        "weights": {"name": "lost", "rank": 16, "activation": "silu"},
        "train": {"steps": 6},
        "checkpoint": {"every": 3},
    }
    straight, _ = assert_resume_is_bitwise(tiny_run, extra, stop_at=3)
    capsys.readouterr()
    assert main(["export", str(straight), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a lost layer with weights.activation=silu" in err, err
