"""GradNormLoRP (reconstructed from the weight-normalization math, research/projectors.md 5.4):
the two gradients by central finite differences, the tangent property, a float64
re-implementation through refreshes on both sides, full rank with the identity basis equal to
torch's Adam on (v, g), a step changes W, state bytes, and the tiny model through the CLI (it
trains; a resume through a refresh is bitwise)."""

from __future__ import annotations

import pytest
import torch
from projector_cases import (
    assert_resume_is_bitwise,
    assert_short_run_learns,
    gradients,
    initial_weight,
    run_projector,
)

from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.gradnormlorp import GradNormLoRP, direction_grad, magnitude_grad

# The Adam moments run in fp32 (kernels.reference.adam_update): float64 comparisons hold to
# fp32's precision, amplified by 1/sqrt(V) near eps.
FP32 = dict(rtol=2e-5, atol=1e-7)


def loss_of(w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A smooth, non-quadratic loss of W: sum(A * sin(W)) + sum(W^4) / 4."""
    return (a * torch.sin(w)).sum() + (w**4).sum() / 4


def test_the_two_gradients_match_central_finite_differences():
    """At g != ||v|| (the formulas hold for any g): relative error < 1e-7 in float64."""
    gen = torch.Generator().manual_seed(0)
    m, n = 5, 7
    v = torch.randn(m, n, generator=gen, dtype=torch.float64)
    g = torch.rand(m, 1, generator=gen, dtype=torch.float64) + 0.5
    a = torch.randn(m, n, generator=gen, dtype=torch.float64)

    def weight(v_, g_):
        return g_ * v_ / v_.norm(dim=1, keepdim=True)

    w = weight(v, g).requires_grad_()
    loss_of(w, a).backward()
    grad = w.grad
    h = 1e-6
    fd_g = torch.zeros_like(g)
    for i in range(m):
        e = torch.zeros_like(g)
        e[i] = h
        fd_g[i] = (loss_of(weight(v, g + e), a) - loss_of(weight(v, g - e), a)) / (2 * h)
    fd_v = torch.zeros_like(v)
    for i in range(m):
        for j in range(n):
            e = torch.zeros_like(v)
            e[i, j] = h
            fd_v[i, j] = (loss_of(weight(v + e, g), a) - loss_of(weight(v - e, g), a)) / (2 * h)
    dg, dv = magnitude_grad(grad, v), direction_grad(grad, v, g)
    assert ((dg - fd_g).norm() / fd_g.norm()) < 1e-7
    assert ((dv - fd_v).norm() / fd_v.norm()) < 1e-7
    # tangent: the direction's gradient is orthogonal to each row of v
    inner = (dv * v).sum(dim=1)
    assert inner.abs().max() < 1e-12 * dv.norm() * v.norm()


def right_basis(x: torch.Tensor, r: int) -> torch.Tensor:
    return torch.linalg.svd(x.T, full_matrices=False)[0][:, :r]


def gradnormlorp_reference(grads, w0, r, gap, alpha, lr, b1, b2, eps, wd):
    """Section 5.4's construction in float64: v = W, g = ||W_i|| each step; GaLore's Adam on
    dL/dv (basis from dL/dv, refreshed on (t-1) % T == 0, moments kept); Adam on dL/dg; W =
    g' v'/||v'||; then W <- W - lr wd W. The left side is written out (B is m x r)."""
    m, n = w0.shape
    left = m < n
    w = w0.clone()
    mo = vo = 0.0
    mg = vg = torch.zeros(m, 1, dtype=torch.float64)
    basis = None
    out = []
    for t, grad in enumerate(grads, start=1):
        v = w
        norms = v.norm(dim=1, keepdim=True)
        g = norms
        dg = (grad * v).sum(dim=1, keepdim=True) / norms
        dv = (g / norms) * (grad - dg * v / norms)
        if (t - 1) % gap == 0:
            basis = right_basis(dv.T, r) if left else right_basis(dv, r)
        low = basis.T @ dv if left else dv @ basis
        mo = b1 * mo + (1 - b1) * low
        vo = b2 * vo + (1 - b2) * low * low
        c = (1 - b2**t) ** 0.5 / (1 - b1**t)
        n_low = mo / (vo.sqrt() + eps)
        v_new = v - lr * c * alpha * (basis @ n_low if left else n_low @ basis.T)
        mg = b1 * mg + (1 - b1) * dg
        vg = b2 * vg + (1 - b2) * dg * dg
        g_new = g - lr * c * mg / (vg.sqrt() + eps)
        w = g_new * v_new / v_new.norm(dim=1, keepdim=True)
        w = w - lr * wd * w
        out.append(w.clone())
    return out


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right side, then left
def test_gradnormlorp_matches_the_float64_reference_through_refreshes(shape):
    grads = gradients(shape, 9)
    w0 = initial_weight(shape)
    ours, opt = run_projector(
        "gradnormlorp", grads, rank=4, update_gap=4, svd="exact", w0=w0, weight_decay=0.1
    )
    ref = gradnormlorp_reference(grads, w0, 4, 4, 0.25, 1e-2, 0.9, 0.999, 1e-6, 0.1)
    (state,) = opt.state.values()
    assert state["refreshes"] == 3  # steps 1, 5, 9
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_full_rank_identity_basis_is_adam_on_v_and_g(monkeypatch):
    """B = I (r = n), alpha 1, eps 0 (torch's eps placement then coincides): one torch Adam
    step on the parameters (v, g) = (W, ||W_i||) with moments carried, then W = g v/||v||."""
    shape = (12, 8)
    grads = gradients(shape, 6)
    w0 = initial_weight(shape)
    monkeypatch.setattr(GradNormLoRP, "new_basis", lambda self, x, s: torch.eye(8, dtype=x.dtype))
    ours, _ = run_projector("gradnormlorp", grads, rank=8, scale=1.0, eps=0.0, w0=w0)
    v = torch.nn.Parameter(w0.clone())
    g = torch.nn.Parameter(w0.norm(dim=1, keepdim=True))
    adam = torch.optim.Adam([v, g], lr=1e-2, betas=(0.9, 0.999), eps=0.0)
    w = w0.clone()
    for grad, mine in zip(grads, ours, strict=True):
        with torch.no_grad():
            v.copy_(w)
            g.copy_(w.norm(dim=1, keepdim=True))
        wn = g * v / v.norm(dim=1, keepdim=True)
        (wn * grad).sum().backward()  # dL/dW = grad, through the normalization by autograd
        adam.step()
        adam.zero_grad()
        with torch.no_grad():
            w = g * v / v.norm(dim=1, keepdim=True)
        torch.testing.assert_close(mine, w, **FP32)


def test_a_step_changes_the_weight_and_its_row_norms():
    """The repository's WeightNormGaLoreAdamW never writes its update back (research 5.2):
    here one step moves W, the magnitude moves the row norms too, and zero rows train."""
    w0 = initial_weight((16, 12))
    ours, _ = run_projector("gradnormlorp", gradients((16, 12), 1), rank=4, w0=w0)
    assert (ours[0] - w0).abs().max() > 1e-4
    assert (ours[0].norm(dim=1) - w0.norm(dim=1)).abs().max() > 1e-4
    # a zero row has no direction to normalize: it takes GaLore's step and leaves zero
    w0[3] = 0.0
    ours, _ = run_projector("gradnormlorp", gradients((16, 12), 2), rank=4, w0=w0)
    assert torch.isfinite(ours[1]).all() and ours[0][3].abs().min() > 0
    zeros, _ = run_projector("gradnormlorp", gradients((16, 12), 2), rank=4)
    assert (zeros[1].norm(dim=1) > 0).all()  # a zero-initialized tensor trains


def test_state_bytes_match_the_tensors_in_state():
    for state_dtype in ("float32", "bfloat16", "int8"):
        grads = [g.float() for g in gradients((40, 24), 2)]
        w0 = initial_weight((40, 24)).float()
        _, opt = run_projector(
            "gradnormlorp", grads, rank=5, svd="exact", state_dtype=state_dtype, w0=w0
        )
        (state,) = opt.state.values()
        stored = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        formula = GradNormLoRP(GradNormLoRP.Config(rank=5)).state_bytes((40, 24), state_dtype, 4)
        assert stored == formula, (state_dtype, stored, formula)


def test_gradnormlorp_defaults_are_galores():
    cfg = PROJECTORS.get("gradnormlorp").Config()
    assert (cfg.rank, cfg.update_gap, cfg.scale, cfg.svd) == (128, 200, 0.25, "fast")


# -- the tiny model through the CLI ---------------------------------------------------------------

GNL = {"optim": {"projector": {"name": "gradnormlorp", "rank": 8, "update_gap": 3}}}


def test_gradnormlorp_trains_the_tiny_model(tiny_run):
    assert_short_run_learns(tiny_run, "gnl_trains", GNL)


def test_resume_through_a_refresh_is_bitwise(tiny_run):
    extra = {**GNL, "train": {"steps": 10}, "checkpoint": {"every": 5}}
    assert_resume_is_bitwise(tiny_run, extra, stop_at=5, refreshes=[1, 4, 7, 10])
