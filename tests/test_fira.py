"""Fira against a float64 re-implementation of research/projectors.md section 4.5 (code and
paper placement of alpha, both sides, through refreshes and a 50x gradient), research's checks
(full rank + paper placement is GaLore, the limiter's cap, left = right transposed), state
bytes, and a short CLI run: the loss falls, and a resume through a refresh is bitwise."""

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
from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.fira import Fira

# The moment math runs in fp32 (kernels.reference.adam_update), and so does the limiter's norm:
# float64 comparisons hold to a few fp32 ulp, amplified by 1/sqrt(V) near eps.
FP32 = dict(rtol=2e-5, atol=1e-7)


def right_basis(g: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r right singular vectors (n x r), as the left ones of G^T: our finder's convention
    (svd: exact), so signs agree and the kept moments mean the same in both."""
    return torch.linalg.svd(g.T, full_matrices=False)[0][:, :r]


def fira_reference(grads, r, gap, alpha, lr, b1, b2, eps, wd, gamma, paper, left=False):
    """Section 4.5 in float64: GaLore's reference plus E = G - a_r R Q^T, phi per row,
    S = phi E, the limiter, and lr c (alpha N Q^T + a_s S); (a_r, a_s) = (1, alpha) in the
    paper, (alpha, 1) in the code. The left case is the right one of G^T."""
    a_r, a_s = (1.0, alpha) if paper else (alpha, 1.0)
    w = torch.zeros_like(grads[0])
    m = v = 0.0
    q = previous = None
    out = []
    for t, g in enumerate(grads, start=1):
        if left:
            g = g.T
        if (t - 1) % gap == 0:
            q = right_basis(g, r)
        low = g @ q
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        n = m / (v.sqrt() + eps)
        c = (1 - b2**t) ** 0.5 / (1 - b1**t)
        phi = n.norm(dim=1, keepdim=True) / (low.norm(dim=1, keepdim=True) + 1e-8)
        s = phi * (g - a_r * low @ q.T)
        if previous is not None:
            s = s / (max(s.norm() / (previous + 1e-8), gamma) / gamma)
        previous = s.norm()
        step = lr * c * (alpha * n @ q.T + a_s * s)
        w = w - (step.T if left else step)
        w = w - lr * wd * w
        out.append(w.clone())
    return out


@pytest.mark.parametrize("placement", ["code", "paper"])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right side, then left
def test_fira_matches_the_float64_reference(shape, placement):
    """9 steps, refreshes at 1, 5 and 9, and a 50x gradient at step 7 (the limiter acts)."""
    grads = gradients(shape, 9)
    grads[6] = grads[6] * 50
    options = dict(rank=4, update_gap=4, scale=0.25, svd="exact", alpha_placement=placement)
    ours, _ = run_projector("fira", grads, weight_decay=0.1, **options)
    left = shape[0] < shape[1]
    ref = fira_reference(
        grads, 4, 4, 0.25, 1e-2, 0.9, 0.999, 1e-6, 0.1, 1.01, placement == "paper", left
    )
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)


@pytest.mark.parametrize("placement", ["code", "paper"])
def test_the_direction_a_writer_applies_matches_the_reference(placement):
    """`direction` (what a quantized weight's writer applies, W - lr D) is the same move as
    the optimizer's fused update: it follows the float64 reference through refreshes and the
    limiter."""
    grads = gradients((24, 16), 9)
    grads[6] = grads[6] * 50
    options = dict(rank=4, update_gap=4, scale=0.25, svd="exact", alpha_placement=placement)
    fira = Fira(Fira.Config(**options), seed=0)
    hp = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, state_dtype="auto")
    w = torch.zeros_like(grads[0])
    state = fira.init_state(w, "layer.weight")
    ref = fira_reference(grads, 4, 4, 0.25, 1e-2, 0.9, 0.999, 1e-6, 0.0, 1.01, placement == "paper")
    for t, (g, expected) in enumerate(zip(grads, ref, strict=True), start=1):
        if fira.needs_refresh(state, t):
            fira.refresh(g, state)
        w = w - hp["lr"] * fira.direction(w, g, state, t, hp)
        torch.testing.assert_close(w, expected, **FP32)


def test_the_placements_differ_and_full_rank_paper_placement_is_galore():
    """r = n with an orthonormal basis: the paper's residual (I - Q Q^T) G is 0, so S = 0 and
    Fira is GaLore; the code's residual keeps (1 - alpha) G, so it is not."""
    grads = gradients((12, 8), 6)
    common = dict(rank=8, update_gap=4, scale=0.25, svd="exact")
    galore, _ = run_projector("galore", grads, **common)
    paper, opt = run_projector("fira", grads, alpha_placement="paper", **common)
    code, _ = run_projector("fira", grads, **common)
    (state,) = opt.state.values()
    assert state["limiter_norm"] < 1e-12  # ||S|| of the last step
    for a, b in zip(paper, galore, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(code[-1], galore[-1], rtol=1e-2)


def step_by_step(grads, **options) -> list[float]:
    """||S_t|| after the limiter, per step (the state's limiter_norm)."""
    _, opt = run_projector("fira", grads[:1], **options)
    (w,) = opt.param_groups[0]["params"]
    (state,) = opt.state.values()
    norms = [state["limiter_norm"].item()]
    for g in grads[1:]:
        w.grad = g.clone()
        opt.step()
        norms.append(state["limiter_norm"].item())
    return norms


def test_the_limiter_caps_growth_at_gamma_on_a_50x_gradient():
    """A gradient whose part outside the basis is scaled 50x at step 6 (scaling all of G 50x
    barely moves S: phi = ||N_i|| / ||R_i|| falls by about as much as E grows)."""
    grads = gradients((20, 12), 8)
    q = right_basis(grads[0], 3)  # the basis of steps 1-8 (no refresh after step 1)
    inside = grads[5] @ q @ q.T
    grads[5] = inside + 50 * (grads[5] - inside)
    options = dict(rank=3, update_gap=100, svd="exact")
    free = step_by_step(grads, gamma=1e9, **options)
    assert free[5] > 20 * free[4]  # unlimited, the residual's norm jumps
    capped = step_by_step(grads, **options)
    growth = [b / a for a, b in zip(capped[:-1], capped[1:], strict=True)]
    assert max(growth) <= 1.01 * (1 + 1e-6), growth
    assert growth[4] == pytest.approx(1.01, rel=1e-6)  # the jump is clamped to exactly gamma


def test_left_case_is_the_right_case_transposed():
    """Channel scaling commutes with transposing (rows of m x r vs columns of r x n)."""
    grads = gradients((18, 10), 6)
    right, _ = run_projector("fira", grads, rank=3, update_gap=3, svd="exact")
    left, _ = run_projector("fira", [g.T for g in grads], rank=3, update_gap=3, svd="exact")
    for a, b in zip(right, left, strict=True):
        torch.testing.assert_close(a, b.T, **FP32)


def test_state_bytes_match_the_tensors_in_state():
    for state_dtype in ("float32", "bfloat16", "int8"):
        for shape in ((40, 24), (24, 40)):
            grads = [g.float() for g in gradients(shape, 2)]
            _, opt = run_projector("fira", grads, rank=5, svd="exact", state_dtype=state_dtype)
            (state,) = opt.state.values()
            stored = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
            formula = Fira(Fira.Config(rank=5)).state_bytes(shape, state_dtype, 4)
            assert stored == formula, (state_dtype, shape, stored, formula)


def test_fira_defaults_are_the_official_ones():
    cfg = PROJECTORS.get("fira").Config()
    assert (cfg.rank, cfg.update_gap, cfg.scale, cfg.gamma) == (128, 200, 0.25, 1.01)
    assert (cfg.alpha_placement, cfg.moments_at_refresh) == ("code", "keep")


@pytest.mark.parametrize("gamma", ["0.99", "inf"])
def test_cli_refuses_a_gamma_below_1_in_one_line(tmp_path, capsys, gamma):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("train: {steps: 10}\n")
    code = main(
        ["train", str(run_file), "optim.projector.name=fira", f"optim.projector.gamma={gamma}"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "optim.projector.gamma" in err, err


# -- through the loop, on the tiny model ---------------------------------------------------------


def test_fira_trains_on_real_text(tiny_run):
    path = tiny_run(
        "fira_falls",
        {
            "train": {"steps": 100, "batch_size": 8, "warmup_steps": 20, "lr": 1e-2},
            "logging": {"every": 10},
            "optim": {"projector": {"name": "fira", "rank": 8, "update_gap": 25}},
        },
    )
    assert cli(path) == 0
    run_dir = path.parent / "runs" / "fira_falls"
    losses = train_losses(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert losses[10] > math.log(512) - 1.0  # starts near ln(vocab)
    assert summary["final_val_loss"] < math.log(512) - 1.5, summary
    assert losses[100] < losses[10] - 1.5, losses


def test_fira_resumes_bitwise_through_a_refresh(tiny_run):
    """Refreshes at steps 1, 5, 9: stop at 4, resume, and step 5's refresh (with the kept
    moments and the limiter's norm) gives the uninterrupted run's curve and weights."""
    extra = {
        "optim": {"projector": {"name": "fira", "rank": 8, "update_gap": 4}},
        "checkpoint": {"every": 4},
    }
    assert_resume_is_bitwise(tiny_run, extra, stop_at=4)
