"""Optimizer seams: state dtypes survive a load, the per-parameter state and events APIs of the
optimizer the loop holds, and the layers' after_step events."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowrank_train.optim.multi import MultiOptimizer
from lowrank_train.optim.state import load_state_dict_keeping_dtypes
from lowrank_train.parameterizations.dense import DenseLinear


class Fp32Momentum(torch.optim.Optimizer):
    """Heavy-ball SGD whose momentum and a nested basis stay fp32 whatever the weight's dtype
    (as lowrank-train's own Adam keeps its moments), with an event queue."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})
        self.events: list[dict] = []

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["momentum"] = torch.zeros(p.shape, dtype=torch.float32)
                    state["basis"] = {"q": torch.eye(p.shape[-1], dtype=torch.float32)}
                    state["count"] = 0
                    state["side"] = "right"  # plain values, as projectors keep them
                # 1 + 2^-12 has no bf16 form: a cast on load would be visible
                state["momentum"].mul_(0.9).add_(p.grad.float() + 2.0**-12)
                state["basis"]["q"].add_(2.0**-12)
                state["count"] += 1
                p.add_(state["momentum"].to(p.dtype), alpha=-group["lr"])
                self.events.append({"event": "refresh", "count": state["count"]})

    def pop_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events


def bf16_param() -> nn.Parameter:
    return nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).bfloat16())


def stepped(opt: torch.optim.Optimizer, params: list[nn.Parameter], steps: int = 2) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()


def checkpointed(state_dict: dict) -> dict:
    """Through bytes and weights_only, as checkpoint.py saves and loads optimizer.pt."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_torch_load_casts_fp32_state_to_the_bf16_param():
    """The bug the helper exists for; if torch stops casting, the helper can go."""
    p = bf16_param()
    opt = Fp32Momentum([p])
    stepped(opt, [p])
    fresh = Fp32Momentum([p])
    fresh.load_state_dict(checkpointed(opt.state_dict()))
    assert fresh.state[p]["momentum"].dtype == torch.bfloat16
    assert fresh.state[p]["side"] != "right"  # a str is rebuilt from a generator: garbled


def test_load_keeping_dtypes_round_trips_fp32_state_of_a_bf16_param():
    p = bf16_param()
    opt = Fp32Momentum([p])
    stepped(opt, [p])
    twin = nn.Parameter(p.detach().clone())  # the resumed run's weight
    fresh = Fp32Momentum([twin])
    load_state_dict_keeping_dtypes(fresh, checkpointed(opt.state_dict()))
    state, saved = fresh.state[twin], opt.state[p]
    assert state["momentum"].dtype == torch.float32 and state["basis"]["q"].dtype == torch.float32
    assert torch.equal(state["momentum"], saved["momentum"])
    assert torch.equal(state["basis"]["q"], saved["basis"]["q"])
    assert state["count"] == 2 and state["side"] == "right"
    assert state["momentum"].device == twin.device
    stepped(opt, [p], 1)  # and the resumed optimizer steps exactly as the one that saved
    stepped(fresh, [twin], 1)
    assert torch.equal(twin, p) and torch.equal(state["momentum"], saved["momentum"])


def test_load_keeping_dtypes_leaves_torch_adamw_as_torch_loads_it():
    """torch's own state already matches its parameters: nothing to restore, step unchanged."""
    p = bf16_param()
    opt = torch.optim.AdamW([p])
    stepped(opt, [p])
    fresh = torch.optim.AdamW([p])
    load_state_dict_keeping_dtypes(fresh, checkpointed(opt.state_dict()))
    assert fresh.state[p]["exp_avg"].dtype == torch.bfloat16
    assert fresh.state[p]["step"].dtype == torch.float32  # torch keeps step fp32 on the CPU
    assert torch.equal(fresh.state[p]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def two_optimizers(a: nn.Parameter | None = None, b: nn.Parameter | None = None):
    a = a if a is not None else bf16_param()
    b = b if b is not None else nn.Parameter(torch.zeros(5))
    stranger = nn.Parameter(torch.zeros(2))
    inner = {"ours": Fp32Momentum([a]), "adamw": torch.optim.AdamW([b], lr=0.1)}
    multi = MultiOptimizer(inner, {a: "layer.weight", b: "norm.weight", stranger: "stray"})
    return multi, a, b, stranger


def test_param_state_is_the_owners_live_dict_and_names_a_stranger():
    multi, a, b, stranger = two_optimizers()
    assert multi.param_state(a) == {}  # before the first step
    stepped(multi, [a, b])
    assert multi.param_state(a) is multi.optimizers["ours"].state[a]
    assert multi.param_state(b) is multi.optimizers["adamw"].state[b]
    multi.param_state(a)["momentum"].zero_()  # a write reaches the owner (LoQT's merge)
    assert not multi.optimizers["ours"].state[a]["momentum"].any()
    with pytest.raises(KeyError, match=r"no inner optimizer owns stray \(tensor of shape \(2,\)"):
        multi.param_state(stranger)


def test_state_is_a_read_only_merged_view():
    multi, a, b, stranger = two_optimizers()
    assert len(multi.state) == 0 and a not in multi.state
    with pytest.raises(KeyError, match="no optimizer state for layer.weight"):
        multi.state[a]
    assert a not in multi.optimizers["ours"].state  # the lookup created no entry
    stepped(multi, [a, b])
    assert set(multi.state) == {a, b} and len(multi.state) == 2
    assert multi.state[b]["exp_avg"].shape == (5,)
    with pytest.raises(TypeError):
        multi.state[a] = {}  # type: ignore[index]


def test_pop_events_collects_from_inner_optimizers_that_have_them():
    multi, a, b, _ = two_optimizers()
    assert multi.pop_events() == []
    stepped(multi, [a, b])
    assert multi.pop_events() == [
        {"event": "refresh", "count": 1},
        {"event": "refresh", "count": 2},
    ]
    assert multi.pop_events() == []  # popped once


def test_multi_load_keeps_dtypes_and_relinks_groups_and_state():
    multi, a, b, _ = two_optimizers()
    stepped(multi, [a, b])
    saved = checkpointed(multi.state_dict())
    fresh, *_ = two_optimizers(a, b)
    fresh.load_state_dict(saved)
    assert fresh.param_state(a)["momentum"].dtype == torch.float32
    assert torch.equal(fresh.param_state(a)["momentum"], multi.param_state(a)["momentum"])
    assert fresh.state[a] is fresh.optimizers["ours"].state[a]
    fresh.param_groups[0]["lr"] = 0.5  # the scheduler's write reaches the inner group
    assert fresh.optimizers["ours"].param_groups[0]["lr"] == 0.5


def test_after_step_returns_no_events_by_default():
    layer = DenseLinear(nn.Linear(3, 2))
    assert layer.after_step(1, None) == []


def test_optim_does_not_import_models():
    code = "import sys, lowrank_train.optim; assert 'lowrank_train.models' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "name, options",
    [
        ("galore", {"rank": 3, "svd": "exact"}),
        ("galore", {"rank": 3, "svd": "exact", "moments_at_refresh": "rotate"}),
        ("qgalore", {"rank": 3, "svd": "exact", "queue_size": 2}),
        ("apollo", {"rank": 3}),
    ],
)
@pytest.mark.parametrize("state_dtype", ["auto", "int8"])
def test_a_refresh_writes_the_new_basis_into_the_old_ones_storage(name, options, state_dtype):
    """Long-lived state keeps the storage it was first given through refreshes (only the
    values change), so no refresh leaves a basis in a block cut from the finder's transients."""
    from projector_cases import gradients, run_projector

    grads = gradients((12, 8), 5, seed=4)
    _, opt = run_projector(name, grads[:1], update_gap=2, state_dtype=state_dtype, **options)
    (w,) = opt.param_groups[0]["params"]
    state = opt.state[w]
    before = {k: (v.data_ptr(), v.clone()) for k, v in state.items() if isinstance(v, torch.Tensor)}
    assert any("basis" in k for k in before)
    for g in grads[1:]:  # refreshes at steps 3 and 5
        w.grad = g.clone()
        opt.step()
    assert state["refreshes"] == 3
    for key, (ptr, old) in before.items():
        assert state[key].data_ptr() == ptr, key
        if "basis" in key and old.is_floating_point():
            assert not torch.equal(state[key], old), key
