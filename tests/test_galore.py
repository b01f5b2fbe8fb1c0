"""GaLore against a float64 re-implementation of research/projectors.md section 1.5, and the
projected optimizer's shared mechanics (moments in every state dtype, refresh policies, a failed
refresh, state bytes)."""

from __future__ import annotations

import math

import pytest
import torch
from projector_cases import gradients, run_projector

from lowrank_train.projectors import PROJECTORS
from lowrank_train.projectors.galore import GaLore


def right_basis(g: torch.Tensor, r: int) -> torch.Tensor:
    """Top-r right singular vectors (n x r), as the left ones of G^T: signs are arbitrary, and
    moments kept across a refresh make them matter, so the reference uses our convention."""
    return torch.linalg.svd(g.T, full_matrices=False)[0][:, :r]


# The moment math runs in fp32 whatever the weights (kernels.reference.adam_update), so float64
# comparisons hold to fp32's precision: a few ulp of 1.2e-7, amplified by 1/sqrt(V) near eps.
FP32 = dict(rtol=2e-5, atol=1e-7)


def galore_reference(grads, r, gap, alpha, lr, b1, b2, eps, wd, left=False):
    """Section 1.5 in float64: refresh on (t-1) % T == 0, moments kept across refreshes."""
    w = torch.zeros_like(grads[0])
    m = v = 0.0
    q = None
    out = []
    for t, g in enumerate(grads, start=1):
        if left:
            g = g.T  # the left case is the transpose of the right one
        if (t - 1) % gap == 0:
            q = right_basis(g, r)
        low = g @ q
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low * low
        c = (1 - b2**t) ** 0.5 / (1 - b1**t)
        step = lr * c * alpha * (m / (v.sqrt() + eps)) @ q.T
        w = w - (step.T if left else step)
        w = w - lr * wd * w
        out.append(w.clone())
    return out


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])  # right side, then left
def test_galore_matches_the_float64_reference_through_refreshes(shape):
    grads = gradients(shape, 9)
    ours, _ = run_projector(
        "galore", grads, rank=4, update_gap=4, scale=0.25, svd="exact", weight_decay=0.1
    )
    ref = galore_reference(grads, 4, 4, 0.25, 1e-2, 0.9, 0.999, 1e-6, 0.1, left=shape[0] < shape[1])
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, **FP32)


def test_identity_basis_is_adamw_and_a_full_rank_svd_basis_is_not(monkeypatch):
    """With B = I (r = n), alpha 1, wd 0 and eps 0 (torch's eps sits outside the bias
    correction, ours inside: with eps 0 the two coincide), GaLore is AdamW step for step."""
    grads = gradients((12, 8), 6)
    monkeypatch.setattr(GaLore, "new_basis", lambda self, g, s: torch.eye(8, dtype=g.dtype))
    ours, _ = run_projector("galore", grads, rank=8, scale=1.0, eps=0.0)
    w = torch.nn.Parameter(torch.zeros(12, 8, dtype=torch.float64))
    adamw = torch.optim.AdamW([w], lr=1e-2, betas=(0.9, 0.999), eps=0.0, weight_decay=0.0)
    for g, mine in zip(grads, ours, strict=True):
        w.grad = g.clone()
        adamw.step()
        torch.testing.assert_close(mine, w.detach(), **FP32)
    monkeypatch.undo()
    rotated, _ = run_projector("galore", grads, rank=8, scale=1.0, eps=0.0, svd="exact")
    assert not torch.allclose(rotated[-1], w.detach(), rtol=1e-3)  # Adam in a rotated basis


def test_update_stays_in_the_subspace_between_refreshes():
    grads = gradients((20, 10), 5)
    ours, opt = run_projector("galore", grads, rank=3, update_gap=10, svd="exact")
    (state,) = opt.state.values()
    q = state["basis"]
    delta = ours[-1] - ours[0]
    residual = delta - delta @ q @ q.T  # dW (I - Q Q^T) = 0
    assert residual.abs().max() < 1e-12 * max(1.0, delta.abs().max().item())  # float64 basis


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16", "int8"])
def test_low_precision_moments_track_the_fp64_ones(state_dtype):
    grads = gradients((64, 48), 6)
    exact, _ = run_projector("galore", grads, rank=8, svd="exact", state_dtype="auto")
    low, opt = run_projector("galore", grads, rank=8, svd="exact", state_dtype=state_dtype)
    (state,) = opt.state.values()
    expected_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.uint8}
    assert state["exp_avg"].dtype == expected_dtype[state_dtype]
    # relative error of the accumulated update: mantissa bits (fp32 ~1e-7, bf16 ~4e-3) and the
    # 8-bit dynamic map (~1e-2 per value, averaged over the update)
    tolerance = {"float32": 1e-5, "bfloat16": 2e-2, "int8": 5e-2}[state_dtype]
    error = (low[-1] - exact[-1]).norm() / exact[-1].norm()
    assert error < tolerance, error


def test_state_bytes_match_the_tensors_in_state():
    for state_dtype in ("float32", "bfloat16", "int8"):
        grads = [g.float() for g in gradients((40, 24), 2)]
        _, opt = run_projector("galore", grads, rank=5, svd="exact", state_dtype=state_dtype)
        (state,) = opt.state.values()
        stored = sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        formula = GaLore(GaLore.Config(rank=5)).state_bytes((40, 24), state_dtype, 4)
        # fp32 weights: the basis is 4 bytes a value (the formula takes the weight's bytes)
        assert stored == formula, (state_dtype, stored, formula)


def test_rotate_re_expresses_the_moments_and_reset_zeroes_them():
    grads = gradients((20, 12), 6)
    _, keep = run_projector("galore", grads[:5], rank=4, update_gap=4, svd="exact")
    _, rot = run_projector(
        "galore", grads[:5], rank=4, update_gap=4, svd="exact", moments_at_refresh="rotate"
    )
    _, reset = run_projector(
        "galore", grads[:4], rank=4, update_gap=4, svd="exact", moments_at_refresh="reset"
    )
    # the first moment's full-space image survives a rotation where it lies in the new span
    (k_state,), (r_state,) = keep.state.values(), rot.state.values()
    assert not torch.allclose(k_state["exp_avg"], r_state["exp_avg"])
    (s_state,) = reset.state.values()
    assert s_state["moment_step"] == 4  # steps 1-4, no refresh after step 1 yet
    _, reset5 = run_projector(
        "galore", grads[:5], rank=4, update_gap=4, svd="exact", moments_at_refresh="reset"
    )
    (s5,) = reset5.state.values()
    assert s5["moment_step"] == 1  # restarted at the refresh of step 5


def test_rotate_is_exact_when_the_subspace_does_not_change(monkeypatch):
    """Rotating by T = B_old^T B_new re-expresses M exactly when span(B_new) = span(B_old)."""
    grads = gradients((16, 10), 5)
    flip = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64))
    bases = iter([right_basis(grads[0], 3), right_basis(grads[0], 3) @ flip])
    monkeypatch.setattr(GaLore, "new_basis", lambda self, g, s: next(bases))
    _, opt = run_projector("galore", grads, rank=3, update_gap=4, moments_at_refresh="rotate")
    (state,) = opt.state.values()
    bases = iter([right_basis(grads[0], 3), right_basis(grads[0], 3)])
    _, same = run_projector("galore", grads, rank=3, update_gap=4)
    (ref,) = same.state.values()
    # in full space the moments agree: M B^T is invariant under the sign flip
    torch.testing.assert_close(
        state["exp_avg"].double() @ state["basis"].T, ref["exp_avg"].double() @ ref["basis"].T
    )


def test_a_non_finite_gradient_at_a_refresh_keeps_the_old_basis_and_logs_it():
    grads = gradients((12, 8), 6)
    grads[4] = grads[4].clone()
    grads[4][0, 0] = float("nan")  # step 5 is a refresh (T = 4)
    _, opt = run_projector("galore", grads[:5], rank=3, update_gap=4, svd="exact")
    events = opt.pop_events()
    kept = [e for e in events if e["event"] == "kept_old_basis"]
    assert kept and kept[0]["step"] == 5 and "non-finite" in kept[0]["reason"]
    (state,) = opt.state.values()
    torch.testing.assert_close(state["basis"], right_basis(grads[0], 3))  # step 1's, same signs
    assert opt.pop_events() == []  # popped once


def test_fast_refresh_captures_the_exact_energy():
    from lowrank_train.projectors.subspace import captured_energy

    grads = [g.float() for g in gradients((96, 64), 3)]
    _, exact = run_projector("galore", grads, rank=8, update_gap=1, svd="exact")
    _, fast = run_projector("galore", grads, rank=8, update_gap=1, svd="fast")
    (se,), (sf,) = exact.state.values(), fast.state.values()
    ratio = captured_energy(grads[-1], sf["basis"], "right") / captured_energy(
        grads[-1], se["basis"], "right"
    )
    assert ratio > 0.99, ratio


def test_galore_defaults_are_the_official_ones():
    cfg = PROJECTORS.get("galore").Config()
    assert (cfg.rank, cfg.update_gap, cfg.scale, cfg.moments_at_refresh) == (128, 200, 0.25, "keep")


def test_a_batched_refresh_gives_each_tensor_what_it_gets_alone():
    """SVD projectors refresh all tensors of a shape in one batched finder call; each matrix
    must get its own result (its own random draws), cold and warm, exact and fast."""
    from lowrank_train.projectors.subspace import side_of

    for svd in ("exact", "fast"):
        galore = GaLore(GaLore.Config(rank=4, svd=svd), seed=3)
        grads = [g for g in gradients((40, 24), 3)] + [
            g.T.contiguous() for g in gradients((40, 24), 2, seed=1)
        ]
        states = [
            {"side": side_of(tuple(g.shape)), "name": f"t{i}", "refreshes": 0}
            for i, g in enumerate(grads)
        ]
        alone = [dict(s) for s in states]
        for _ in range(2):  # cold, then warm from the first bases
            galore.refresh_many(list(zip(grads, states, strict=True)))
            for g, s in zip(grads, alone, strict=True):
                galore.refresh(g, s)
            for s, a in zip(states, alone, strict=True):
                torch.testing.assert_close(s["basis"], a["basis"], rtol=1e-9, atol=1e-12)
                assert s["refreshes"] == a["refreshes"]


def test_a_rank_above_a_targeted_tensors_smaller_side_is_one_line_naming_it(tiny_run, capsys):
    from lowrank_train.cli import main

    path = tiny_run("too_wide", {"optim": {"projector": {"name": "galore", "rank": 65}}})
    assert main(["train", str(path), "--samples", "0"]) == 2  # hidden 64: q_proj is 64 x 64
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "optim.projector.rank: 65 is above the smaller dimension of" in err
    assert "model.layers.0.self_attn.q_proj.weight (64, 64) (at most 64)" in err


def tall(d: int, w: int, condition: float, seed: int) -> torch.Tensor:
    """A (d, w) fp32 matrix with singular values spread log-evenly from 1 to 1 / condition."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, w, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(w, w, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -math.log10(condition), w, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize(
    "d, w, condition, householder",
    [
        (200, 24, 1e2, False),
        (200, 24, 1e5, False),
        (200, 24, 1e9, True),
        (2736, 528, 1e5, False),
        (5461, 528, 3e5, False),
    ],
)
def test_orthonormal_spans_y_with_orthonormal_columns(monkeypatch, d, w, condition, householder):
    """Shifted CholeskyQR3 (and, past its range of about 1 / eps, the Householder fallback)
    gives Q^T Q = I and Q Q^T Y = Y in fp32; Householder runs only past that range. At a warm
    refresh's sizes too (350M's and 1B's MLP, w 528), where Fukaya's shift exceeded ||Y||^2
    and Y failed past cond ~1e4."""
    from lowrank_train.projectors import subspace

    y = tall(d, w, condition, seed=0)
    used = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda a: used.append(1) or qr(a))
    q = subspace.orthonormal(y)
    assert bool(used) == householder
    eye = torch.eye(w)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=5e-6)
    residual = (y - q @ (q.T @ y)).norm() / y.norm()
    assert residual < 1e-5, residual


@pytest.mark.parametrize("d, w, condition", [(200, 24, 1e3), (2736, 528, 1e5), (5461, 528, 3e5)])
def test_one_plain_pass_leaves_an_iterate_well_conditioned_with_ys_span(d, w, condition):
    """The power iterations' iterates take shifted CholeskyQR2 (`plain=1`): Q is not
    orthonormal to working precision (0.37 from I in the 2-norm at cond 3e5, CPU fp32) but
    spans Y, with cond(Q) <= 1.5, all the next product needs; two plain passes make it
    orthonormal."""
    from lowrank_train.projectors.subspace import cholesky_qr3

    y = tall(d, w, condition, seed=0)
    loose, failed = cholesky_qr3(y, plain=1)
    assert not bool(failed.any())
    s = torch.linalg.svdvals(loose.double())
    assert s.max() / s.min() <= 1.5, (s.max(), s.min())
    basis = torch.linalg.qr(loose.double())[0].float()
    residual = (y - basis @ (basis.T @ y)).norm() / y.norm()
    assert residual < 1e-5, residual


def test_orthonormal_in_a_batch_gives_each_matrix_what_it_gets_alone():
    """A batch mixing a matrix CholeskyQR2 handles and one it must hand to Householder."""
    from lowrank_train.projectors.subspace import orthonormal

    ys = torch.stack([tall(120, 16, 1e2, seed=1), tall(120, 16, 1e9, seed=2)])
    batched = orthonormal(ys)
    for y, q in zip(ys, batched, strict=True):
        torch.testing.assert_close(q, orthonormal(y), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warm, rank", [(False, 8), (True, 8), (True, 24)])
def test_a_cholesky_failure_inside_the_fast_finder_redoes_only_that_matrix(monkeypatch, warm, rank):
    """The fast finders defer CholeskyQR's failure check to one per call: a matrix whose
    Cholesky fails in the batch (forced here on matrix 1) is found again from the same draws
    with the Householder fallback, and every matrix ends where it ends alone. Rank 24 (w = 40
    columns) takes the warm truncation (`_drop_weakest`), whose own Cholesky fails too."""
    from lowrank_train.projectors import subspace

    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(3, 64, 128, generator=gen)
    previous = torch.linalg.qr(torch.randn(3, 64, rank, generator=gen))[0] if warm else None

    def gens():
        return [torch.Generator().manual_seed(10 + i) for i in range(3)]

    def alone(i):
        prev = previous[i] if warm else None
        return subspace.svd_basis(grads[i], "left", rank, "fast", prev, gens()[i])

    want = [alone(i) for i in range(3)]
    real, forced = torch.linalg.cholesky_ex, []

    def failing(a, upper=False):
        r, info = real(a, upper=upper)
        if a.ndim == 3 and a.shape[0] == 3:
            forced.append(1)
            info = info.clone()
            info[1] = 1
        return r, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    got = subspace.svd_basis(grads, "left", rank, "fast", previous, gens())
    assert forced and torch.isfinite(got).all()
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if i == 1 and rank > 16:  # redone by the exact Ritz step: as good, not the same basis
            kept = [subspace.captured_energy(grads[i], b, "left") for b in (g, w)]
            assert kept[0] >= 0.999 * kept[1], kept
        else:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def power_law(d: int, big: int, gen: torch.Generator) -> torch.Tensor:
    """float64 (d, big) with singular values 1 / i: no gap anywhere, a range finder's hard case."""
    u = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(big, d, generator=gen, dtype=torch.float64))[0]
    return (u / torch.arange(1, d + 1, dtype=torch.float64)) @ v.T


def test_the_warm_truncation_keeps_the_exact_ritz_energy():
    """`_drop_weakest` (the warm refresh's Rayleigh-Ritz without an eigensolver) against the
    exact Ritz step in float64, written here: the best rank-r basis inside span(Q) is Q times
    the top-r eigenvectors of (Q^T A)(Q^T A)^T. On a gapless spectrum, r = 48 of w = 64, the
    truncation keeps >= 0.999 of the exact step's energy, orthonormal to fp32's precision."""
    from lowrank_train.projectors import subspace

    gen = torch.Generator().manual_seed(5)
    a = power_law(128, 300, gen)
    q = torch.linalg.qr(a @ torch.randn(300, 64, generator=gen, dtype=torch.float64))[0]
    got = subspace._drop_weakest(a.float(), q.float(), 48, subspace.orthonormal).double()
    small = q.T @ a
    vectors = torch.linalg.eigh(small @ small.T)[1][:, -48:]
    exact = q @ vectors

    def energy(b):
        return (b.T @ a).square().sum() / a.square().sum()

    assert energy(got) / energy(exact) >= 0.999, energy(got) / energy(exact)
    torch.testing.assert_close(got.T @ got, torch.eye(48, dtype=torch.float64), rtol=0, atol=2e-6)


def test_the_warm_truncation_keeps_q_s_column_order():
    """Where Q's last k columns are the span's weakest directions (and its first the leading
    one), the truncated basis is Q's first r columns, in order and sign (column j goes on from
    the previous basis's column j: the moments kept across a refresh stay meaningful)."""
    from lowrank_train.projectors import subspace

    gen = torch.Generator().manual_seed(6)
    q = torch.linalg.qr(torch.randn(96, 40, generator=gen, dtype=torch.float64))[0]
    strength = torch.cat([torch.linspace(1, 0.3, 24), torch.full((16,), 1e-3)]).double()
    mix = torch.linalg.qr(torch.randn(200, 40, generator=gen, dtype=torch.float64))[0]
    a = (q * strength) @ mix.T  # energy along q_j: strength_j^2
    got = subspace._drop_weakest(a.float(), q.float(), 24, subspace.orthonormal).double()
    # the leading direction (column 0) is found by power iteration across a 3% gap in
    # singular value (1 vs 0.97): 8 iterations leave ~1e-3 of column 1 in it, and the
    # reflection that installs it moves columns 0 and 1 by about that; a column out of order
    # or of the other sign would be off by ~1
    torch.testing.assert_close(got, q[:, :24], rtol=0, atol=2e-3)


def test_complement_is_orthonormal_and_orthogonal_to_z():
    from lowrank_train.projectors.subspace import _complement

    gen = torch.Generator().manual_seed(7)
    z = torch.linalg.qr(torch.randn(2, 40, 16, generator=gen, dtype=torch.float64))[0]
    c = _complement(z)
    assert c.shape == (2, 40, 24)
    eye = torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(c.mT @ c, eye.expand(2, 24, 24), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        z.mT @ c, torch.zeros(2, 16, 24, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_the_warm_truncation_leads_with_the_spans_top_direction():
    """Column 0 of a truncated basis is the span's leading singular vector, as in an exact
    SVD (Q-GaLore's lazy refresh compares it between refreshes), even where Q holds it in
    another column; the basis stays orthonormal and keeps the top-r span."""
    from lowrank_train.projectors import subspace

    gen = torch.Generator().manual_seed(8)
    q = torch.linalg.qr(torch.randn(96, 40, generator=gen, dtype=torch.float64))[0]
    strength = torch.cat([torch.linspace(0.5, 0.3, 24), torch.full((16,), 1e-3)]).double()
    strength[5] = 1.0  # the leading direction is Q's column 5
    mix = torch.linalg.qr(torch.randn(200, 40, generator=gen, dtype=torch.float64))[0]
    a = (q * strength) @ mix.T
    got = subspace._drop_weakest(a.float(), q.float(), 24, subspace.orthonormal).double()
    assert abs(float(got[:, 0] @ q[:, 5])) > 1 - 1e-4
    eye = torch.eye(24, dtype=torch.float64)
    torch.testing.assert_close(got.T @ got, eye, rtol=0, atol=2e-6)
    torch.testing.assert_close(got @ got.T, q[:, :24] @ q[:, :24].T, rtol=0, atol=1e-4)


def test_a_refresh_that_fell_back_says_so_in_its_event(monkeypatch, caplog):
    """A fast refresh whose CholeskyQR fails (forced here in the warm refresh at step 2) is
    redone with Householder QR: correct, and slow enough that its event says so
    (`fallbacks`: matrices redone) with a warning; a refresh that needs none has no such key."""
    real, forced = torch.linalg.cholesky_ex, []

    def failing(a, upper=False):
        r, info = real(a, upper=upper)
        if forced:
            info = torch.ones_like(info)
        return r, info

    grads = gradients((64, 128), 3)
    _, opt = run_projector("galore", grads[:1], rank=24, update_gap=1, svd="fast")
    (first,) = opt.pop_events()
    assert first["event"] == "refresh" and "fallbacks" not in first
    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    forced.append(1)
    (w,) = [p for g in opt.param_groups for p in g["params"]]
    w.grad = grads[1].clone()
    opt.step()
    (second,) = opt.pop_events()
    assert second["event"] == "refresh" and second["step"] == 2 and second["fallbacks"] == 1
    assert "fell back to Householder QR" in caplog.text


def test_a_failing_batched_refresh_call_is_redone_alone_and_only_the_bad_matrix_keeps_its_basis(
    monkeypatch,
):
    """A batched finder call whose output is not finite is redone one matrix at a time; the
    matrix whose finder then raises keeps its old basis and is reported by position, the
    others are refreshed as they would be alone."""
    from lowrank_train.projectors import galore as galore_module
    from lowrank_train.projectors.subspace import side_of

    galore = GaLore(GaLore.Config(rank=3, svd="exact"), seed=1)
    grads = list(gradients((12, 8), 3))
    states = [{"side": side_of((12, 8)), "name": f"t{i}", "refreshes": 0} for i in range(3)]
    alone = [dict(s) for s in states]
    for g, s in zip(grads, alone, strict=True):
        galore.refresh(g, s)
    real = galore_module.svd_basis

    def finder(grad, *args):
        if grad.ndim == 3:  # the batched call: a non-finite basis
            return torch.full_like(real(grad, *args), float("nan"))
        if grad is grads[1]:
            raise torch.linalg.LinAlgError("singular")
        return real(grad, *args)

    monkeypatch.setattr(galore_module, "svd_basis", finder)
    failed = galore.refresh_many(list(zip(grads, states, strict=True)))
    assert failed == {1: "singular"}
    assert "basis" not in states[1] and states[1]["refreshes"] == 0
    for i in (0, 2):
        torch.testing.assert_close(states[i]["basis"], alone[i]["basis"])
        assert states[i]["refreshes"] == 1
