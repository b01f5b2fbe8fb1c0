"""The whole-model step batches a group's same-shape tensors into runs (LowRankAdam's
`update_many_`: one Adam kernel on the stacked low-rank gradients, the channel scales and the
limiter across the run); per-layer mode steps each tensor alone. Both must give every tensor
the same update, bit for bit, or per-layer training would drift from the whole-model step."""

from __future__ import annotations

import pytest
import torch
from projector_cases import gradients, initial_weight

from lowrank_train.optim.projected import ProjectedOptimizer
from lowrank_train.projectors import PROJECTORS, base
from lowrank_train.projectors.base import LowRankAdam, Projector

# each batched projector at a small rank, with its own keys where it has them
CASES = {
    "galore": dict(rank=4, update_gap=3),
    "qgalore": dict(rank=4, update_gap=3),
    "fira": dict(rank=4, update_gap=3, scale=0.5),
    "flora": dict(rank=4, update_gap=3),
    "gradnormlorp": dict(rank=4, update_gap=3),
    "apollo": dict(rank=4, update_gap=3, scale=0.5),
    "apollo_mini": dict(rank=1, update_gap=3, scale=11.3137),
}
# two of one shape on each side and a third on the right: runs of 2 and 1 under a small budget
SHAPES = [(24, 16), (16, 24), (24, 16), (16, 24), (24, 16)]


def optimizer(method: str, params, names, state_dtype: str, batched: bool) -> ProjectedOptimizer:
    """`batched` False: each tensor through LowRankAdam's `update_` (its per-tensor Adam step,
    nothing stacked), as the base Projector's loop does it (APOLLO's `update_` is its batched
    step of one tensor)."""
    cls = PROJECTORS.get(method)
    projector = cls(cls.Config(**CASES[method]))
    if not batched and cls.update_ is LowRankAdam.update_:
        projector.update_many_ = lambda items, hp: Projector.update_many_(projector, items, hp)
    groups = [{"params": params, "param_names": names}]
    return ProjectedOptimizer(
        groups,
        projector,
        lr=1e-2,
        weight_decay=0.1,
        state_dtype=state_dtype,
    )


@pytest.mark.parametrize("small_runs", [False, True])
@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
@pytest.mark.parametrize("method", sorted(CASES))
def test_a_group_stepped_together_equals_each_tensor_stepped_alone(
    monkeypatch, method, state_dtype, small_runs
):
    """Six steps through two refreshes: each tensor of the group equals, bitwise, the same
    tensor stepped by an optimizer of its own through `update_`; one tensor joins a step late
    (its c_t and limiter lag the others': a run of its own)."""
    if small_runs:  # the budget of a run fits two of these tensors, not three
        cls = PROJECTORS.get(method)
        item = cls(cls.Config(**CASES[method])).run_item_bytes((24, 16), torch.float32)
        monkeypatch.setattr(base, "BATCH_RUN_BYTES", 2 * item // cls.run_budget_scale + 1)
    grads = [gradients(shape, 6, seed=i) for i, shape in enumerate(SHAPES)]
    together = [torch.nn.Parameter(initial_weight(s, seed=i).float()) for i, s in enumerate(SHAPES)]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in together]
    names = [f"t{i}" for i in range(len(SHAPES))]
    group = optimizer(method, together, names, state_dtype, batched=True)
    singles = [
        optimizer(method, [p], [n], state_dtype, batched=False)
        for p, n in zip(alone, names, strict=True)
    ]
    for t in range(6):
        for i, (p, q, g) in enumerate(zip(together, alone, grads, strict=True)):
            late = i == 2 and t == 0
            p.grad, q.grad = (None, None) if late else (g[t].float(), g[t].float().clone())
        group.step()
        for opt in singles:
            opt.step()
        for i, (p, q) in enumerate(zip(together, alone, strict=True)):
            assert torch.equal(p, q), (t, i)
    assert not torch.equal(together[0], initial_weight(SHAPES[0], seed=0).float())


def test_runs_group_by_shape_side_and_moment_step_within_the_budget(monkeypatch):
    """`runs`: one shape, dtype, side and moment step a run, in order of first
    appearance, at most BATCH_RUN_BYTES / (16 D r) items each."""
    projector = PROJECTORS.get("galore")(PROJECTORS.get("galore").Config(rank=4))
    monkeypatch.setattr(base, "BATCH_RUN_BYTES", 2 * 16 * 24 * 4)

    def item(shape, side, moment_step=0):
        return (None, torch.zeros(shape), {"side": side, "moment_step": moment_step}, 1)

    items = [
        item((24, 16), "right"),
        item((16, 24), "left"),
        item((24, 16), "right"),
        item((24, 16), "right"),
        item((24, 16), "right", moment_step=3),
    ]
    index = {id(x): i for i, x in enumerate(items)}
    runs = [[index[id(x)] for x in run] for run in projector.runs(items)]
    assert runs == [[0, 2], [3], [1], [4]]


@pytest.mark.parametrize("method", sorted(CASES))
def test_the_planned_run_temporaries_are_the_largest_run_the_step_makes(monkeypatch, method):
    """`run_temporary_bytes` (the planner's step phase) equals the largest sum of
    `run_item_bytes` over the runs `runs` forms of the same tensors."""
    monkeypatch.setattr(base, "BATCH_RUN_BYTES", 3 * 16 * 24 * 4 + 1)
    cls = PROJECTORS.get(method)
    projector = cls(cls.Config(**CASES[method]))
    shapes = [(24, 16)] * 5 + [(16, 24)] * 2 + [(40, 8)]
    items = [
        (None, torch.zeros(s), {"side": "left" if s[0] < s[1] else "right"}, 1) for s in shapes
    ]
    largest = max(
        sum(projector.run_item_bytes(tuple(g.shape), torch.float32) for _, g, _, _ in run)
        for run in projector.runs(items)
    )
    assert projector.run_temporary_bytes(shapes, torch.float32) == largest
