"""The memory planner against the bytes of real tensors on the tiny model (CPU), for every
accepted combination of the registries; its activation formula against the tensors autograd
saves; `estimate`'s JSON and suggestions; and out of memory in `train` as one line, exit 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from projector_cases import cli, metrics
from test_plug_points import SUPPORTED, tiny_method

from lowrank_train import trainer as trainer_module
from lowrank_train.checkpoint import find_latest
from lowrank_train.cli import main
from lowrank_train.evaluation import causal_lm_loss, compute_context
from lowrank_train.parameterizations.base import ParameterizedLinear, storage_allocated
from lowrank_train.planner import (
    GIB,
    inner_optimizers,
    plan_run,
    refresh_workspace,
    suggestions,
    with_changes,
)
from lowrank_train.precision import resolve_precision
from lowrank_train.resolve import load_run
from lowrank_train.trainer import build_run

CPU = torch.device("cpu")
VOCAB = 512
ROOT = Path(__file__).resolve().parents[1]


def covering() -> list[tuple[str, str, str]]:
    """Accepted combinations naming every registered parameterization, projector and inner
    optimizer at least once (the whole matrix would not fit the suite's budget)."""
    chosen, seen = [], set()
    for combo in SUPPORTED:
        if set(enumerate(combo)) - seen:
            seen |= set(enumerate(combo))
            chosen.append(combo)
    return chosen


COVERING = pytest.mark.parametrize(
    "weights, projector, optimizer", covering(), ids=["+".join(c) for c in covering()]
)


class Storage:
    """Bytes of distinct storages: views and shared tensors (bitsandbytes' maps) count once."""

    def __init__(self, exclude=()):
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.bytes = 0

    def add(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += t.untyped_storage().nbytes()
        return t


def state_tensors(state):
    if isinstance(state, torch.Tensor):
        yield state
    elif isinstance(state, dict):
        for v in state.values():
            yield from state_tensors(v)
    elif isinstance(state, list | tuple):
        for v in state:
            yield from state_tensors(v)


def one_step(cfg):
    """The run built for real on the CPU, after two steps as the loop takes them (forward,
    backward, optimizer step, the layers' after_step: LoQT's first step only captures G and
    its merge frees the buffer); returns (built, bytes of the gradients the second, steady
    step consumed)."""
    built = build_run(cfg, VOCAB, CPU)
    layers = [m for m in built.model.modules() if isinstance(m, ParameterizedLinear)]
    for step in (1, 2):
        x = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.model.seq_len + 1))
        causal_lm_loss(built.model, x[:, :-1], x[:, 1:]).backward()
        grads = Storage()
        for g in built.optimizer.gradients():
            grads.add(g)
        built.optimizer.step()
        for layer in layers:
            layer.after_step(step, built.optimizer)
        if step == 1:
            built.optimizer.zero_grad(set_to_none=True)
    return built, grads.bytes


@COVERING
def test_stored_gradient_and_state_bytes_are_exact(tiny_run, weights, projector, optimizer):
    # hidden 128: the 128 x 176 MLP matrices reach bitsandbytes' 4096-element 8-bit threshold
    cfg, _ = load_run(
        tiny_run(), [*tiny_method(weights, projector, optimizer), "model.hidden_size=128"]
    )
    plan = plan_run(cfg, "cpu", VOCAB)
    built, grad_bytes = one_step(cfg)
    model = Storage()
    for t in [*built.model.parameters(), *built.model.buffers()]:
        model.add(t)
    state = Storage()
    for opt in inner_optimizers(built.optimizer).values():
        for per_tensor in opt.state.values():
            for t in state_tensors(per_tensor):
                state.add(t)
    c = plan.components
    side = c["gradients"] - sum(p.numel() * p.element_size() for p in built.model.parameters())
    assert c["weights"] + c["quant_scales"] + side == model.bytes  # side buffers are buffers
    assert c["gradients"] == grad_bytes
    assert c["optimizer_states"] + c["projector"] == state.bytes
    # and a plan for the GPU (bf16 storage) of the same run, from the same meta build
    gpu = plan_run(cfg, "cuda", VOCAB)
    assert gpu.components["weights"] < c["weights"] and gpu.components["cuda_context"] > 0


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.autocast=bfloat16"],
        ["model.dtype=bfloat16", "model.autocast=off"],
        ["model.gradient_checkpointing=true"],
        ["model.gradient_checkpointing=true", "model.autocast=bfloat16"],
        ["weights.name=lowrank", "weights.rank=16"],
        ["weights.name=lowrank", "weights.rank=16", "weights.activation=silu"],
    ],
    ids=["fp32", "autocast", "bf16", "checkpointing", "checkpointing+autocast", "lowrank", "cola"],
)
def test_activations_equal_the_bytes_autograd_saves(tiny_run, overrides):
    """Exact, not within a tolerance: on the CPU the formula is the saved set itself (SDPA runs
    torch's flash CPU kernel: no s x s matrix), counted once per storage, weights excluded."""
    cfg, _ = load_run(tiny_run(), overrides)
    plan = plan_run(cfg, "cpu", VOCAB)
    model = build_run(cfg, VOCAB, CPU).model
    saved = Storage(exclude=[*model.parameters(), *model.buffers()])
    x = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.model.seq_len + 1))
    with (
        torch.autograd.graph.saved_tensors_hooks(saved.add, lambda t: t),
        compute_context(CPU, resolve_precision(cfg.model, CPU).autocast),
    ):
        causal_lm_loss(model, x[:, :-1], x[:, 1:])
    assert plan.components["activations"] == saved.bytes


def test_per_layer_plans_one_gradient_at_a_time(tiny_run):
    cfg, _ = load_run(tiny_run(), ["train.clip_grad_norm=0"])
    whole = plan_run(cfg, "cuda", VOCAB)
    per_layer = plan_run(with_changes(cfg, {"optim.per_layer": True}), "cuda", VOCAB)
    model = build_run(
        with_changes(cfg, {"model.dtype": "bfloat16"}), VOCAB, torch.device("meta")
    ).model
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    assert whole.components["gradients"] == sum(sizes)
    assert per_layer.components["gradients"] == max(sizes)  # the embedding's, here
    # accumulating, every full gradient lives until the last micro-batch in both modes
    accum = {"optim.per_layer": True, "train.grad_accum": 2}
    assert plan_run(with_changes(cfg, accum), "cuda", VOCAB).components["gradients"] == sum(sizes)


def test_projected_accumulation_plans_the_sums_and_one_gradient_in_flight(tiny_run):
    """Per-layer GaLore at grad_accum 2 with projected accumulation: between micro-batches each
    projected tensor holds its fp32 sum (as measured after a first micro-batch on the CPU), the
    others their full gradients, and one projected gradient is in flight in its hook."""
    overrides = [
        "train.clip_grad_norm=0",
        "optim.per_layer=true",
        "train.grad_accum=2",
        "optim.projector.name=galore",
        "optim.projector.rank=8",
        "optim.per_layer_accumulation=projected",
    ]
    cfg, _ = load_run(tiny_run(), overrides)
    plan = plan_run(cfg, "cpu", VOCAB)
    built = build_run(cfg, VOCAB, CPU)
    x = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.model.seq_len + 1))
    causal_lm_loss(built.model, x[:, :-1], x[:, 1:]).backward()  # the first micro-batch
    held = Storage()
    for p in built.model.parameters():
        if p.grad is not None:
            held.add(p.grad)
    for state in inner_optimizers(built.optimizer)["galore"].state.values():
        held.add(state["low_accum"])
    summed = [built.optimizer.params[i] for i in built.optimizer.projected]
    in_flight = max(p.numel() * p.element_size() for p in summed)
    assert plan.components["gradients"] == held.bytes + in_flight
    full = plan_run(with_changes(cfg, {"optim.per_layer_accumulation": "full"}), "cpu", VOCAB)
    assert plan.components["gradients"] < full.components["gradients"]


def test_per_layer_int8_plans_the_side_buffers_allocated_at_once(tiny_run):
    """4 layers at grad_accum 1: the gradients term is the largest gradient plus the peak bytes
    of allocated side buffers measured at every hook of a real backward (the top layer's and
    two more); at grad_accum 2 every gradient and every side buffer."""
    cfg, _ = load_run(
        tiny_run(),
        ["train.clip_grad_norm=0", "optim.per_layer=true", "weights.name=int8"]
        + ["model.num_layers=4"],
    )
    built = build_run(cfg, VOCAB, CPU)
    buffers = [m.weight_grad for m in built.model.modules() if hasattr(m, "weight_grad")]
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    allocated = []
    for p in built.model.parameters():  # after the wrapper's hook: acquired or released by then
        p.register_post_accumulate_grad_hook(
            lambda _: allocated.append(nbytes(b for b in buffers if storage_allocated(b)))
        )
    x = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.model.seq_len + 1))
    causal_lm_loss(built.model, x[:, :-1], x[:, 1:]).backward()
    params = list(built.model.parameters())
    assert max(allocated) == 3 * nbytes(buffers) // 4
    plan = plan_run(cfg, "cpu", VOCAB)
    assert plan.components["gradients"] == nbytes(params[:1]) + max(allocated)  # the embedding
    assert max(params, key=lambda p: p.numel()) is params[0]
    accum = plan_run(with_changes(cfg, {"train.grad_accum": 2}), "cpu", VOCAB)
    assert accum.components["gradients"] == nbytes(params) + nbytes(buffers)


def test_estimate_prints_the_json_and_suggestions_that_re_plan(tiny_run, capsys):
    path = tiny_run("big", {"train": {"batch_size": 8}})
    assert main(["estimate", str(path), "--device", "cuda", "--json", "memory.cap_gib=0.5"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["components"]) == {
        "weights", "gradients", "optimizer_states", "projector", "quant_scales",
        "activations", "temporary", "cuda_context",
    }  # fmt: skip
    assert out["device"] == "cuda" and out["cap_gib"] == 0.5 and out["fits"] is False
    assert (
        out["total_bytes"]
        == max(out["phases"].values()) + out["slack_bytes"] + out["components"]["cuda_context"]
    )
    assert "eager" in out["activations"]
    cfg, _ = load_run(path, ["memory.cap_gib=0.5"])
    base = plan_run(cfg, "cuda", suggest=False).total_bytes
    ckpt = plan_run(with_changes(cfg, {"model.gradient_checkpointing": True}), "cuda").total_bytes
    want = f"model.gradient_checkpointing=true saves {(base - ckpt) / GIB:.2f} GiB"
    assert want in out["suggestions"], out["suggestions"]
    assert any(
        s.startswith("train.batch_size=4 train.grad_accum=2 saves") for s in out["suggestions"]
    )
    assert main(["estimate", str(path), "--device", "cpu"]) == 0
    assert "planned" in capsys.readouterr().out


def test_estimate_bad_key_is_one_line_exit_2(tiny_run, capsys):
    assert main(["estimate", str(tiny_run()), "model.gradient_checkpointin=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.gradient_checkpointin" in err


def test_train_records_the_plan_beside_the_peak(tiny_run):
    path = tiny_run("planned", {"train": {"steps": 3}})
    assert cli(path) == 0
    summary = json.loads((path.parent / "runs" / "planned" / "summary.json").read_text())
    assert 0 < summary["planned_gib"] and summary["peak_gib"] > 0


def test_out_of_memory_is_one_line_exit_4_and_keeps_the_last_checkpoint(
    tiny_run, monkeypatch, capsys
):
    step = trainer_module.Trainer.step

    def step_until_7(self, clip):
        if self.progress.step == 6:  # the 7th step runs out of memory
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, clip)

    monkeypatch.setattr(trainer_module.Trainer, "step", step_until_7)
    path = tiny_run("oom", {"checkpoint": {"every": 3}})
    assert cli(path) == 4
    lines = [line for line in capsys.readouterr().err.splitlines() if "out of memory" in line]
    assert len(lines) == 1, lines
    assert "in step 7" in lines[0] and "planned" in lines[0] and "weights" in lines[0]
    assert "try model.gradient_checkpointing=true saves" in lines[0]
    ckpts = path.parent / "runs" / "oom" / "checkpoints"
    latest, skipped = find_latest(ckpts)
    assert latest.name == "step-00000006" and not skipped
    assert sorted(p.name for p in ckpts.glob("step-*"))[-1] == "step-00000006"
    assert max(m["step"] for m in metrics(path.parent / "runs" / "oom") if "loss" in m) == 6


def saved_by_inductors_partition(model, x) -> list[torch.Tensor]:
    """The tensors the compiled forward of `causal_lm_loss` keeps for backward: the graph
    partitioned as inductor partitions it (min-cut rematerialization), run uncompiled."""
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    kept: list[torch.Tensor] = []

    def forward_compiler(gm, _):
        def run(*args):
            out = gm(*args)
            kept.extend(t for t in out[1:] if isinstance(t, torch.Tensor))  # out[0]: the loss
            return out

        return make_boxed_func(run)

    def backend(gm, inputs):
        return aot_module_simplified(
            gm,
            inputs,
            fw_compiler=forward_compiler,
            bw_compiler=make_boxed_func,
            partition_fn=min_cut_rematerialization_partition,
        )

    torch._dynamo.reset()
    torch.compile(causal_lm_loss, backend=backend)(model, x[:, :-1], x[:, 1:])
    return kept


def test_a_run_with_eager_steps_plans_eager_activations(tiny_run):
    """With capture_eager, LoQT's capture steps run eagerly under train.compile
    (`steps_uncompiled`), and the first step is one: the eager saved set is the run's peak,
    so the planner plans it; without the key every step is compiled and planned so."""
    overrides = ["weights.name=loqt", "weights.rank=16"]
    compiled, _ = load_run(tiny_run(), [*overrides, "train.compile=true"])
    assert plan_run(compiled, "cpu", VOCAB).activation_mode != "eager"
    compiled, _ = load_run(
        tiny_run(), [*overrides, "train.compile=true", "weights.capture_eager=true"]
    )
    eager, _ = load_run(tiny_run(), overrides)
    plan = plan_run(compiled, "cpu", VOCAB)
    assert plan.activation_mode == "eager"
    assert plan.components["activations"] == plan_run(eager, "cpu", VOCAB).components["activations"]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.dtype=bfloat16", "model.autocast=off"],
        ["weights.name=lowrank", "weights.rank=16"],
    ],
    ids=["fp32", "bf16", "lowrank"],
)
def test_compiled_activations_equal_the_saved_set_of_inductors_partition(tiny_run, overrides):
    """Under train.compile the planner plans the forward outputs inductor's partitioner keeps
    for backward (not eager's larger set), counted once per storage, weights excluded."""
    cfg, _ = load_run(tiny_run(), [*overrides, "train.compile=true"])
    plan = plan_run(cfg, "cpu", VOCAB)
    assert plan.activation_mode == "compiled (inductor's saved set)"
    model = build_run(cfg, VOCAB, CPU).model
    saved = Storage(exclude=[*model.parameters(), *model.buffers()])
    x = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.model.seq_len + 1))
    saved.add(x)  # the ids are a view of the loader's block
    for t in saved_by_inductors_partition(model, x):
        saved.add(t)
    assert plan.components["activations"] == saved.bytes


def test_a_dequantizing_layer_plans_its_copy_of_w_in_forward_and_backward(tiny_run):
    """weights.matmul=dequantize: the largest layer's deq(W) joins the forward phase (beside
    the activations, in place of the loss's smaller transients) and the backward."""
    base = ["weights.name=int8", "model.intermediate_size=4096"]
    fused = plan_run(load_run(tiny_run(), [*base, "weights.matmul=fused"])[0], "cpu", VOCAB)
    deq = plan_run(load_run(tiny_run(), [*base, "weights.matmul=dequantize"])[0], "cpu", VOCAB)
    copy = 4096 * 64 * 4  # the largest W (the MLP's 4096 x 64) in the run's fp32
    loss = 2 * 4 * (4 * 32) * VOCAB  # eager: two fp32 T x V (batch 4, seq 32)
    assert deq.phases["forward"] - fused.phases["forward"] == copy - loss
    assert deq.phases["backward"] > fused.phases["backward"]


def test_per_layer_accumulation_of_galore_suggests_the_projected_sums(tiny_run):
    """Per-layer GaLore under accumulation holds every full gradient; the planner offers the
    documented alternative (projected sums) with what it saves, and not for a projector whose
    update reads the full gradient."""
    over = ["optim.per_layer=true", "train.clip_grad_norm=0", "train.grad_accum=2"]
    over += ["memory.cap_gib=0.01"]
    cfg, _ = load_run(tiny_run(), [*over, "optim.projector.name=galore", "optim.projector.rank=8"])
    plan = plan_run(cfg, "cuda", VOCAB)
    change = {"optim.per_layer_accumulation": "projected"}
    saved = plan.total_bytes - plan_run(with_changes(cfg, change), "cuda", VOCAB).total_bytes
    assert saved > 0
    assert f"optim.per_layer_accumulation=projected saves {saved / GIB:.2f} GiB" in plan.suggestions
    cfg, _ = load_run(tiny_run(), [*over, "optim.projector.name=apollo", "optim.projector.rank=8"])
    assert not any("per_layer_accumulation" in s for s in plan_run(cfg, "cuda", VOCAB).suggestions)


def test_loqt_plans_the_captured_gradients_of_a_merge_step(tiny_run):
    """Step 0 (and every merge step) holds each LoQT layer's fp32 captured G through forward,
    backward and the merges: the planner's forward and backward carry exactly the buffers the
    built run allocates, and a merge phase adds one layer's workspace beside them (1B: 17.19
    GiB planned before this against 21.48 measured, params-1b-6)."""
    cfg, _ = load_run(tiny_run(), ["weights.name=loqt", "weights.rank=16"])
    model = build_run(cfg, VOCAB, CPU).model
    layers = [m for m in model.modules() if isinstance(m, ParameterizedLinear)]
    buffers = [m.grad_buffer for m in layers]
    assert all(b is not None and b.dtype == torch.float32 for b in buffers)  # step 0 captures
    captured = sum(b.numel() * b.element_size() for b in buffers)
    plan = plan_run(cfg, "cpu", VOCAB)
    without = plan_run(load_run(tiny_run(), [])[0], "cpu", VOCAB)
    assert sum(m.step_buffer_bytes() for m in layers) == captured
    resident = plan.phases["merge"] - captured - max(m.merge_workspace_bytes() for m in layers)
    assert plan.phases["forward"] - captured > resident  # activations beside the buffers
    assert plan.components["temporary"] == plan.phases["merge"] - resident
    assert without.phases.get("merge") is None


@pytest.mark.parametrize("projector", ["galore", "qgalore", "apollo"])
def test_a_refresh_installs_each_finder_calls_bases_before_the_next_call(
    tiny_run, projector, monkeypatch
):
    """A refresh holds one finder call's new bases at a time: GaLore and Q-GaLore batch the
    tensors of a shape in calls of `refresh_chunk` matrices (here a budget of two 64 x 64
    matrices), APOLLO refreshes one tensor at a time. Each basis waits for `install` in its own
    storage (no view keeps a batched finder's output alive), a batched call's in the stored
    dtype (bf16 here; Q-GaLore fp32, which it quantizes), and every projected tensor is
    refreshed once."""
    from lowrank_train.projectors import galore

    overrides = [f"optim.projector.name={projector}", "model.dtype=bfloat16"]
    cfg, _ = load_run(tiny_run(), [*overrides, "model.autocast=off", "optim.projector.rank=8"])
    built = build_run(cfg, VOCAB, CPU)
    opt = inner_optimizers(built.optimizer)[projector]
    projector_obj = opt.projector
    if isinstance(projector_obj, galore.SVDProjector):
        two = projector_obj.refresh_call_bytes((64, 64), torch.bfloat16, False, 2)
        monkeypatch.setattr(galore, "refresh_budget", lambda device: two)
    calls, pending, most, dtypes, install = [], [0], [0], set(), projector_obj.install
    find = galore.svd_basis

    def finder(grad, *args):
        calls.append(grad.shape[0] if grad.ndim == 3 else 1)
        pending[0] += calls[-1]
        most[0] = max(most[0], pending[0])
        return find(grad, *args)

    def new_basis(grad, state):  # APOLLO's one-at-a-time path
        pending[0] += 1
        most[0] = max(most[0], pending[0])
        return type(projector_obj).new_basis(projector_obj, grad, state)

    def spy(basis, state, dtype):
        assert basis.untyped_storage().nbytes() == basis.numel() * basis.element_size()
        dtypes.add(basis.dtype)
        pending[0] -= 1
        install(basis, state, dtype)

    monkeypatch.setattr(galore, "svd_basis", finder)
    if not isinstance(projector_obj, galore.SVDProjector):
        projector_obj.new_basis = new_basis
    projector_obj.install = spy
    x = torch.randint(0, VOCAB, (cfg.train.batch_size, cfg.model.seq_len + 1))
    causal_lm_loss(built.model, x[:, :-1], x[:, 1:]).backward()
    built.optimizer.step()  # step 1 refreshes every projected tensor
    projected = sum(len(g["params"]) for g in opt.param_groups)
    if isinstance(projector_obj, galore.SVDProjector):  # APOLLO's lone basis: install casts it
        assert dtypes == {torch.float32 if projector == "qgalore" else torch.bfloat16}
        assert sum(calls) == projected and max(calls) == 2 and most[0] == 2, calls
    else:
        assert calls == [] and most[0] == 1
    assert pending[0] == 0  # every found basis installed
    assert all(s["refreshes"] == 1 for s in opt.state.values() if "refreshes" in s)


def test_a_planned_refresh_takes_what_the_backward_freed_on_cuda_and_the_cap_elsewhere(tiny_run):
    """On CUDA a refresh's finder calls are sized by the headroom under the run's peak
    (`refresh_budget`), so the planned refresh phase stays under the forward and backward
    phases once one matrix's call fits there; the CPU's calls take the fixed cap, all the
    tensors of a shape at once here."""
    from lowrank_train.projectors.galore import REFRESH_WORKSPACE_BYTES

    # the exact finder: its calls have no fixed part (the fast cold one's gesvda workspace,
    # 32 MiB, would exceed all of this model's activations)
    sets = ["optim.projector.name=galore", "optim.projector.svd=exact", "optim.projector.rank=8"]
    sets.append("train.batch_size=2")  # activations above one matrix's call, below all of them
    cfg, _ = load_run(tiny_run(), sets)
    gpu, cpu = plan_run(cfg, "cuda", VOCAB), plan_run(cfg, "cpu", VOCAB)
    before = max(gpu.phases["forward"], gpu.phases["backward"])
    c = gpu.components
    kept = c["weights"] + c["quant_scales"] + c["optimizer_states"] + c["projector"]
    freed = before - kept - c["gradients"]
    # the cap's calls (every tensor of a shape at once, bf16 as on CUDA) would not fit there
    built = build_run(with_changes(cfg, {"model.dtype": "bfloat16"}), VOCAB, torch.device("meta"))
    assert refresh_workspace(built.optimizer, REFRESH_WORKSPACE_BYTES, per_layer=False) > freed
    assert gpu.phases["refresh"] <= before
    built = build_run(cfg, VOCAB, torch.device("meta"))
    projector = inner_optimizers(built.optimizer)["galore"].projector
    every = projector.refresh_call_bytes((64, 64), torch.float32, False, 4 * cfg.model.num_layers)
    assert cpu.components["temporary"] >= every  # the CPU: all attention matrices in one call


def test_every_suggestion_is_a_run_load_run_accepts_and_together_they_re_plan(tiny_run):
    """Per-layer stepping refuses clipping, so its suggestion turns clipping off too; where no
    change fits alone, the `together` line's overrides plan what it says."""
    # wider than the tiny model, so the weights' and the activations' changes both save
    model = {"hidden_size": 256, "intermediate_size": 768, "num_layers": 4}
    path = tiny_run("suggest", {"model": model, "train": {"batch_size": 8, "clip_grad_norm": 1.0}})
    cfg, _ = load_run(path)
    base = plan_run(cfg, "cuda", VOCAB, suggest=False)
    alone = suggestions(cfg, torch.device("cuda"), VOCAB, 1, base)
    assert "optim.per_layer=true train.clip_grad_norm=0.0 saves" in " | ".join(alone)
    totals = []
    for line in alone:
        overrides = line.split(" saves ")[0].split()
        changed, _ = load_run(path, overrides)  # raises if a suggestion is refused
        totals.append(plan_run(changed, "cuda", VOCAB, suggest=False).total_bytes)
    cap = (min(totals) - 1) / GIB  # no single change fits under it
    cfg, _ = load_run(path, [f"memory.cap_gib={cap!r}"])
    lines = suggestions(
        cfg, torch.device("cuda"), VOCAB, 1, plan_run(cfg, "cuda", VOCAB, suggest=False)
    )
    together = lines[-1]
    assert together.startswith("together: "), lines
    overrides, planned = together.removeprefix("together: ").split(" plans ")
    assert len(overrides.split()) >= 2  # the best change and at least one more
    combined, _ = load_run(path, [f"memory.cap_gib={cap!r}", *overrides.split()])
    plan = plan_run(combined, "cuda", VOCAB, suggest=False)
    assert planned.startswith(f"{plan.total_bytes / GIB:.2f} GiB")
    assert plan.total_bytes < min(totals)
    assert ("(fits" in planned) == plan.fits


def test_every_gpu_recipe_plans_under_its_cap():
    """The 1b and 7b recipes are for one 24 GB GPU as shipped (the 7b ones step per layer); a
    recipe that cannot fit says so in its header, and the planner must agree."""
    recipes = sorted((ROOT / "configs" / "runs").glob("*_1b.yaml"))
    recipes += sorted((ROOT / "configs" / "runs").glob("*_7b.yaml"))
    assert len(recipes) >= 26
    for path in recipes:
        cfg, _ = load_run(path)
        assert cfg.memory.cap_gib == 24, path
        plan = plan_run(cfg, "cuda", 32000, suggest=False)
        assert plan.fits == ("does not fit" not in path.read_text()), (path.name, plan.summary())
