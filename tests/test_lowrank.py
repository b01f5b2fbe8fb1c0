"""`lowrank` (W = s B A, and CoLA's y = s B silu(A x)) against float64 references written here."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from projector_cases import assert_resume_is_bitwise, cli, train_losses

from lowrank_train.parameterizations import PARAMETERIZATIONS
from lowrank_train.parameterizations.lowrank import LowRankLinear

LowRank = PARAMETERIZATIONS.get("lowrank")


def dense_draw(m: int, n: int, seed: int = 0) -> torch.nn.Linear:
    linear = torch.nn.Linear(n, m, bias=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02, generator=gen)
        linear.bias.normal_(0.0, 0.1, generator=gen)
    return linear


def convert(m: int, n: int, seed: int = 0, **options) -> LowRankLinear:
    return LowRank(LowRank.Config(**options)).convert(
        dense_draw(m, n), "layer", torch.Generator().manual_seed(seed), torch.float32
    )


def test_full_rank_svd_init_reproduces_the_dense_layer():
    dense = dense_draw(24, 40)
    layer = LowRank(LowRank.Config(rank=24, init="svd", scale=0.5)).convert(
        dense, "layer", torch.Generator(), torch.float32
    )
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)  # fp32 factors
    torch.testing.assert_close(layer.dense_weight(), dense.weight, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_forward_and_gradients_match_float64(activation):
    layer = convert(12, 20, rank=4, scale=2.0, activation=activation).double()
    x = torch.randn(3, 7, 20, dtype=torch.float64, requires_grad=True)
    A = layer.A.detach().clone().requires_grad_()
    B = layer.B.detach().clone().requires_grad_()
    h = x @ A.T
    ref = 2.0 * ((F.silu(h) if activation == "silu" else h) @ B.T) + layer.bias.detach()
    out = layer(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-14)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (layer.A, layer.B), g)
    ref_grads = torch.autograd.grad(ref, (A, B), g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_variance_init_matches_the_dense_entry_variance():
    """Each factor ~ N(0, (sigma^2 / (r s^2))^(1/2)): s B A has the dense std 0.02."""
    r, s = 16, 0.5
    layer = convert(256, 384, rank=r, scale=s)
    expected = (0.02**2 / (r * s**2)) ** 0.25
    for factor in (layer.A, layer.B):
        # std of the sample std of N values: sigma / sqrt(2N); 4 of those
        assert abs(factor.std().item() - expected) < 4 * expected / math.sqrt(2 * factor.numel())
    assert abs(layer.dense_weight().std().item() - 0.02) < 0.02 * 0.05


def test_cola_init_has_colas_variance():
    r, m, n = 16, 256, 384
    layer = convert(m, n, rank=r, init="cola", activation="silu")
    expected = (r * (m + n)) ** -0.25
    for factor in (layer.A, layer.B):
        assert abs(factor.std().item() - expected) < 4 * expected / math.sqrt(2 * factor.numel())
        assert abs(factor.mean().item()) < 4 * expected / math.sqrt(factor.numel())


@pytest.mark.parametrize("dtype, p_w", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_stored_bytes_are_the_formula(dtype, p_w):
    """p_w r (m + n), plus p_w m for a bias: the two factors and nothing else."""
    m, n, r = 24, 40, 4
    layer = LowRank(LowRank.Config(rank=r)).convert(
        dense_draw(m, n), "layer", torch.Generator().manual_seed(0), dtype
    )
    stored = layer.stored_bytes()
    assert stored == {"A": p_w * r * n, "B": p_w * m * r, "bias": p_w * m}
    assert sum(stored.values()) - p_w * m == p_w * r * (m + n)


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_compiles_forward_and_backward_without_a_graph_break(activation):
    layer = convert(12, 20, rank=4, activation=activation)
    x = torch.randn(3, 20, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    params = (x, layer.A, layer.B, layer.bias)
    eager = torch.autograd.grad(layer(x).square().sum(), params)
    graph = torch.autograd.grad(compiled(x).square().sum(), params)
    for a, b in zip(eager, graph, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_silu_layers_refuse_a_dense_weight_in_one_line():
    layer = convert(8, 8, rank=2, init="cola", activation="silu")
    with pytest.raises(Exception, match="has no dense weight") as e:
        layer.dense_weight()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("weights.rank=65", "weights.rank: 65 is above the smallest dimension"),
        ("weights.rank=0", "weights.rank: 0 must be >= 1"),
        ("weights.scale=0", "weights.scale: 0.0 must be > 0"),
    ],
)
def test_bad_options_are_one_line(tiny_run, capsys, override, expected):
    path = tiny_run("bad", {"weights": {"name": "lowrank", "rank": 8}})
    assert cli(path, override) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_svd_init_with_silu_is_refused(tiny_run, capsys):
    path = tiny_run("bad2", {"weights": {"name": "lowrank", "rank": 8, "init": "svd"}})
    assert cli(path, "weights.activation=silu") == 2
    assert "weights.init: svd" in capsys.readouterr().err


def test_lowrank_trains_and_resumes_bitwise(tiny_run):
    extra = {
        "weights": {"name": "lowrank", "rank": 16},
        "train": {"steps": 8},
        "checkpoint": {"every": 4},
    }
    straight, _ = assert_resume_is_bitwise(tiny_run, extra, stop_at=4)
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["final_val_loss"] < math.log(512), summary  # below the start, ln(vocab)


@pytest.mark.parametrize("activation", ["none", "silu"])
def test_loss_falls_on_real_text(tiny_run, activation):
    init = "cola" if activation == "silu" else "variance"
    path = tiny_run(
        f"lowrank_{activation}",
        {
            "weights": {"name": "lowrank", "rank": 16, "init": init, "activation": activation},
            "train": {"steps": 150, "batch_size": 8, "warmup_steps": 15, "lr": 1e-2},
            "logging": {"every": 10},
        },
    )
    assert cli(path) == 0
    run_dir = path.parent / "runs" / f"lowrank_{activation}"
    losses = train_losses(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    # from ln(512) = 6.24 at step 0 (a layer that does not train stays there)
    assert losses[150] < losses[10] - 0.5, losses
    assert summary["final_val_loss"] < math.log(512) - 0.8, summary
