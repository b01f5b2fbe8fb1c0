"""APOLLO and APOLLO-Mini against a float64 re-implementation of research/projectors.md
section 6.5 (both sides, through resamples, the code's and the paper's decay), research's checks
(a per-row rescaling of G, P = I is the paper's channel-wise Adam, a resample reproduces P from
the seed bit for bit), state bytes, one-line refusals, and short CLI runs: the loss falls, and a
resume through a resample is bitwise."""

from __future__ import annotations

import json
import math

import pytest
import torch
from projector_cases import (
    assert_resume_is_bitwise,
    cli,
    gradients,
    run_projector,
    train_losses,
)

from lowrank_train.cli import main
from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.projectors import PROJECTORS, base
from lowrank_train.projectors.apollo import Apollo
from lowrank_train.projectors.subspace import gaussian_basis

# The moment math runs in fp32 (kernels.reference.adam_update), and so does the limiter's norm:
# float64 comparisons hold to a few fp32 ulp, amplified by 1/sqrt(V) near eps.
FP32 = dict(rtol=2e-5, atol=1e-7)
NAME = "layer.weight"  # run_projector's tensor name: the projection's seed depends on it


def projection(d: int, r: int, index: int, seed: int = 0) -> torch.Tensor:
    """B = P^T (d x r), as the projector draws it for resample `index` of NAME."""
    return gaussian_basis(d, r, seed, NAME, index, "cpu").double()


def apollo_reference(grads, w0, r, gap, alpha, wd, mini, left, paper_decay, lr=1e-2, eps=1e-6):
    """Section 6.5 in float64, the right case (the left one is the right one of G^T):
    P ~ N(0, 1/r) at each resample, R = G P^T, Adam moments on R (betas 0.9, 0.999, kept),
    s per row (Mini: one Frobenius ratio), U = s G, the limiter (gamma 1.01),
    W <- W - lr c alpha U with decay after it (code) or of the previous weight (paper)."""
    b1, b2, gamma = 0.9, 0.999, 1.01
    w = w0.T if left else w0
    m = v = 0.0
    b = previous = None
    out = []
    for t, g in enumerate(grads, start=1):
        if left:
            g = g.T
        if (t - 1) % gap == 0:
            b = projection(g.shape[1], r, (t - 1) // gap)
        low = g @ b
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        n = m / (v.sqrt() + eps)
        c = (1 - b2**t) ** 0.5 / (1 - b1**t)
        if mini:
            s = n.norm() / (low.norm() + 1e-8)
        else:
            s = n.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8)
        u = s * g
        if previous is not None:
            u = u / (max(u.norm() / (previous + 1e-8), gamma) / gamma)
        previous = u.norm()
        step = lr * c * alpha * u
        w = w - step - lr * wd * w if paper_decay else (w - step) * (1 - lr * wd)
        out.append(w.T.clone() if left else w.clone())
    return out


def start(shape) -> torch.Tensor:
    """A non-zero W_0, so that where the decay sits matters from the first step."""
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


CASES = {"apollo": dict(rank=4, scale=0.5), "apollo_mini": dict(rank=1, scale=11.3137)}


@pytest.mark.parametrize("decay_on", ["updated", "previous"])
@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right side, then left
def test_apollo_matches_the_float64_reference_through_resamples(shape, method, decay_on):
    """9 steps, resamples at 1, 5 and 9 (moments kept), the code's decay (of the updated
    weight) and the paper's (of the previous one), which differ by lr^2 wd terms."""
    grads = gradients(shape, 9)
    opts = CASES[method]
    w0 = start(shape)
    ours, _ = run_projector(
        method, grads, update_gap=4, weight_decay=0.5, w0=w0, decay_on=decay_on, **opts
    )
    mini, left, paper = method == "apollo_mini", shape[0] < shape[1], decay_on == "previous"
    ref = apollo_reference(grads, w0, opts["rank"], 4, opts["scale"], 0.5, mini, left, paper)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)
    other = apollo_reference(grads, w0, opts["rank"], 4, opts["scale"], 0.5, mini, left, not paper)
    with pytest.raises(AssertionError):  # the other decay is outside the tolerance
        torch.testing.assert_close(ours[-1], other[-1], **FP32)


@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_the_update_is_a_per_channel_rescaling_of_the_raw_gradient(shape, method):
    """dW_t = -k G_t with one k > 0 per channel (rows on the right, columns on the left) for
    APOLLO, one k for the whole matrix for APOLLO-Mini (wd 0)."""
    grads = gradients(shape, 6)
    ours, _ = run_projector(method, grads, update_gap=3, **CASES[method])
    left = shape[0] < shape[1]
    for before, after, g in zip([torch.zeros(shape)] + ours[:-1], ours, grads, strict=True):
        delta, g = (before - after, g) if not left else ((before - after).T, g.T)
        k = (delta * g).sum(dim=1) / (g * g).sum(dim=1)  # least-squares factor per channel
        assert (k > 0).all()
        torch.testing.assert_close(delta, k[:, None] * g, rtol=0, atol=1e-12 * delta.abs().max())
        if method == "apollo_mini":
            torch.testing.assert_close(k, k[:1].expand_as(k), rtol=1e-12, atol=0)
        else:
            assert k.std() > 1e-3 * k.mean()  # channel-wise: the factors differ


def test_identity_projection_is_the_papers_channel_wise_adam(monkeypatch):
    """P = I (r = n), eps 0, no limiter (gamma huge): c_t N = M_hat / sqrt(V_hat) is Adam's
    update A, and APOLLO moves each row of G to the norm of A's row:
    W <- W - lr alpha (||A_i|| / ||G_i||) G_i (the paper's full-rank channel-wise Adam)."""
    grads = gradients((12, 8), 6)
    monkeypatch.setattr(Apollo, "new_basis", lambda self, g, s: torch.eye(8, dtype=g.dtype))
    ours, _ = run_projector("apollo", grads, rank=8, scale=0.5, eps=0.0, gamma=1e9)
    w = torch.zeros(12, 8, dtype=torch.float64)
    m = v = 0.0
    for t, (g, mine) in enumerate(zip(grads, ours, strict=True), start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        adam = (m / (1 - 0.9**t)) / (v / (1 - 0.999**t)).sqrt()
        w = w - 1e-2 * 0.5 * (adam.norm(dim=1) / g.norm(dim=1))[:, None] * g
        torch.testing.assert_close(mine, w, **FP32)


@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
def test_a_resample_reproduces_the_projection_from_the_seed_bit_for_bit(method):
    """The stored P is gaussian_basis(seed, name, index), bit for bit; a resume from a state
    saved mid-window continues exactly (weights and P), and another run seed draws another P."""
    grads = gradients((20, 12), 9)
    opts = dict(update_gap=4, **CASES[method])
    r = opts["rank"]
    straight, opt = run_projector(method, grads, **opts)
    (state,) = opt.state.values()
    assert state["refreshes"] == 3 and torch.equal(state["basis"], projection(12, r, 2))
    _, first = run_projector(method, grads[:6], **opts)
    saved = first.state_dict()
    cls = PROJECTORS.get(method)
    w = torch.nn.Parameter(first.param_groups[0]["params"][0].detach().clone())
    resumed = ProjectedOptimizer(
        [{"params": [w], "param_names": [NAME]}], cls(cls.Config(**opts)), lr=1e-2, eps=1e-6
    )
    resumed.load_state_dict(saved)
    for g in grads[6:]:
        w.grad = g.clone()
        resumed.step()
    assert torch.equal(w.detach(), straight[-1])
    (state,) = resumed.state.values()
    assert torch.equal(state["basis"], projection(12, r, 2))
    _, other = run_projector(method, grads[:1], seed=1, **opts)
    (state,) = other.state.values()
    assert torch.equal(state["basis"], projection(12, r, 0, seed=1))
    assert not torch.equal(state["basis"], projection(12, r, 0))


@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
def test_state_bytes_match_the_tensors_in_state(method):
    cls = PROJECTORS.get(method)
    rank = CASES[method]["rank"]
    for state_dtype in ("float32", "bfloat16", "int8"):
        for shape in ((40, 24), (24, 40)):
            grads = [g.float() for g in gradients(shape, 2)]
            _, opt = run_projector(method, grads, rank=rank, state_dtype=state_dtype)
            (state,) = opt.state.values()
            stored = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
            formula = cls(cls.Config(rank=rank)).state_bytes(shape, state_dtype, 4)
            assert stored == formula, (state_dtype, shape, stored, formula)


def test_defaults_are_the_official_ones():
    apollo, mini = PROJECTORS.get("apollo").Config(), PROJECTORS.get("apollo_mini").Config()
    assert (apollo.rank, apollo.update_gap, apollo.scale, apollo.gamma) == (256, 200, 1.0, 1.01)
    assert (mini.rank, mini.update_gap, mini.gamma) == (1, 200, 1.01)
    assert mini.scale == pytest.approx(math.sqrt(128), rel=1e-6)  # the code's --scale 128
    for cfg in (apollo, mini):
        assert (cfg.moments_at_refresh, cfg.decay_on) == ("keep", "updated")
        assert not hasattr(cfg, "svd")


@pytest.mark.parametrize(
    "argv, key",
    [
        (["optim.projector.name=apollo_mini", "optim.projector.rank=4"], "apollo_mini is rank 1"),
        (["optim.projector.name=apollo", "optim.projector.svd=exact"], "does not apply to projector apollo"),
        (["optim.projector.name=apollo_mini", "optim.projector.svd=fast"], "does not apply to projector apollo_mini"),
        (["optim.projector.name=apollo", "optim.projector.gamma=0.5"], "optim.projector.gamma: 0.5"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys, argv, key):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("train: {steps: 10}\n")
    code = main(["train", str(run_file), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and key in err and "Traceback" not in err, err


# -- through the loop, on the tiny model ---------------------------------------------------------


@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
def test_it_trains_on_real_text(tiny_run, method):
    rank = {"apollo": 8, "apollo_mini": 1}[method]
    path = tiny_run(
        f"{method}_falls",
        {
            "train": {"steps": 100, "batch_size": 8, "warmup_steps": 20, "lr": 1e-2},
            "logging": {"every": 10},
            "optim": {"projector": {"name": method, "rank": rank, "update_gap": 25}},
        },
    )
    assert cli(path) == 0
    run_dir = path.parent / "runs" / f"{method}_falls"
    losses = train_losses(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert losses[10] > math.log(512) - 1.0  # starts near ln(vocab)
    assert summary["final_val_loss"] < math.log(512) - 1.5, summary
    assert losses[100] < losses[10] - 1.5, losses


@pytest.mark.parametrize("method, rank", [("apollo", 8), ("apollo_mini", 1)])
def test_resumes_bitwise_through_a_resample(tiny_run, method, rank):
    """Resamples at steps 1, 5, 9: stop at 4, resume through the checkpoint on disk, and step 5
    draws the same P from the seed (the kept moments and the limiter's norm come from the
    checkpoint)."""
    extra = {
        "optim": {"projector": {"name": method, "rank": rank, "update_gap": 4}},
        "checkpoint": {"every": 4},
    }
    assert_resume_is_bitwise(tiny_run, extra, stop_at=4, refreshes=[1, 5, 9])


@pytest.mark.parametrize("runs_of_two", [False, True])
@pytest.mark.parametrize("decay_on", ["updated", "previous"])
@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
def test_a_group_stepped_together_equals_each_tensor_stepped_alone(
    monkeypatch, method, decay_on, runs_of_two
):
    """update_many_ (the whole-model step: the group's norms and limiter batched, one addcmul_
    each) gives each tensor, bit for bit, what it gets stepped alone (per-layer mode): both
    sides, weight decay, a resample, the limiter's first step, and a tensor a step behind."""
    shapes = [(24, 16), (16, 24), (24, 16)]
    grads = [gradients(shape, 6, seed=i) for i, shape in enumerate(shapes)]
    opts = dict(CASES[method], update_gap=3, decay_on=decay_on)
    if runs_of_two:  # the low-rank budget of a batched run fits two of these tensors
        monkeypatch.setattr(base, "BATCH_RUN_BYTES", 2 * (16 * 24 * opts["rank"]) + 1)
        same = [(None, torch.zeros(24, 16), {"side": "right"}, 1)] * 3
        projector = PROJECTORS.get(method)(PROJECTORS.get(method).Config(**opts))
        assert [len(r) for r in projector.runs(same)] == [2, 1]

    def optimizer(params, names):
        cls = PROJECTORS.get(method)
        groups = [{"params": params, "param_names": names}]
        return ProjectedOptimizer(groups, cls(cls.Config(**opts)), lr=1e-2, weight_decay=0.5)

    together = [torch.nn.Parameter(start(shape).float()) for shape in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    group = optimizer(together, [f"t{i}" for i in range(3)])
    singles = [optimizer([p], [f"t{i}"]) for i, p in enumerate(alone)]
    for t in range(6):
        for i, (p, q, g) in enumerate(zip(together, alone, grads, strict=True)):
            # the last tensor joins a step late: its c_t and its limiter lag the others'
            late = i == 2 and t == 0
            p.grad, q.grad = (None, None) if late else (g[t].float().clone(), g[t].float().clone())
        group.step()
        for opt in singles:
            opt.step()
        for p, q in zip(together, alone, strict=True):
            assert torch.equal(p, q), t
        assert not torch.equal(together[0], start(shapes[0]).float())
