"""The projected optimizer in real training: GaLore trains on text, resumes bitwise through a
refresh (fp32 weights, and bf16 weights with fp32 state), keeps ranks equal under DDP, and works
in a hand-written loop outside lowrank-train's."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from projector_cases import assert_resume_is_bitwise

from lowrank_train.checkpoint import find_latest
from lowrank_train.cli import main
from lowrank_train.errors import ConfigError
from lowrank_train.optim.projected import projected_optimizer

GALORE = {"optim": {"projector": {"name": "galore", "rank": 8, "update_gap": 5}}}


def run(path, *args: str) -> int:
    return main(["train", str(path), "--samples", "0", *args])


def lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_galore_trains_on_real_text_and_logs_its_refreshes(tiny_run):
    path = tiny_run(
        "galore_falls",
        {
            **GALORE,
            "train": {"steps": 200, "batch_size": 8, "warmup_steps": 20, "lr": 1e-2},
            "logging": {"every": 20},
        },
    )
    assert run(path) == 0
    run_dir = path.parent / "runs" / "galore_falls"
    records = lines(run_dir)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert losses[20] > losses[200] + 1.0
    assert summary["final_val_loss"] < math.log(512) - 1.0, summary
    refreshes = [r for r in records if r.get("event") == "refresh"]
    assert [r["step"] for r in refreshes] == list(range(1, 200, 5))  # steps 1, 6, 11, ...
    assert all(r["tensors"] == 14 for r in refreshes)  # 7 Linears x 2 layers


def _assert_resume_matches(tiny_run, extra: dict, stop_at: int, steps: int):
    """Bitwise resume (losses, weights) and the same optimizer state, dtypes included."""
    extra = {**extra, "train": {**extra.get("train", {}), "steps": steps}}
    extra["checkpoint"] = {"every": stop_at}
    dirs = assert_resume_is_bitwise(tiny_run, extra, stop_at)
    states = []
    for run_dir in dirs:
        path, _ = find_latest(run_dir / "checkpoints")
        states.append(torch.load(path / "optimizer.pt", weights_only=True)["galore"]["state"])
    oa, ob = states
    for key, state in oa.items():
        for k, v in state.items():
            if torch.is_tensor(v):
                assert v.dtype == ob[key][k].dtype and torch.equal(v, ob[key][k])
            else:
                assert v == ob[key][k]
    return states[1]


def test_resume_is_bitwise_through_a_refresh(tiny_run):
    # stop at 4, resume: steps 6 and 11 refresh after the resume (warm start from the saved basis)
    _assert_resume_matches(tiny_run, GALORE, stop_at=4, steps=12)


def test_resume_keeps_fp32_state_of_bf16_weights(tiny_run):
    extra = {**GALORE, "model": {"dtype": "bfloat16"}}
    state = _assert_resume_matches(tiny_run, extra, stop_at=3, steps=7)
    first = next(iter(state.values()))
    assert first["exp_avg"].dtype == torch.float32 and first["basis"].dtype == torch.bfloat16


def test_a_hand_written_loop_trains_with_projected_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    # the README example: a model, the names of the Linears to project, the method's options
    opt = projected_optimizer(model, "galore", target=["0", "2"], lr=1e-2, rank=4, update_gap=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    x = torch.randn(256, 16)
    y = torch.tanh(x[:, :4] * 2)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert loss.item() < 0.3 * first
    owned = {name: len(o.param_groups[0]["params"]) for name, o in opt.optimizers.items()}
    assert owned == {"galore": 2, "adamw": 2}  # two weights projected; two biases by AdamW
    assert opt.param_groups[0]["lr"] == 1e-2  # the scheduler drives every inner group


def _two_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(projector="apollo_mini", rank=4), "optim.projector.rank: 4 is not allowed"),
        (
            dict(projector="galore", rank=8),
            "rank: 8 is above the smaller dimension of 2.weight (4, 32)",
        ),
        (dict(projector="galore", rank=0), "optim.projector.rank: 0 must be >= 1"),
        (dict(projector="galore", update_gap=0), "update_gap: 0 must be >= 1"),
        (dict(projector="galore", scale=-1.0), "optim.projector.scale: -1.0 must be > 0"),
        (dict(projector="apollo", svd="exact"), "'exact' does not apply to projector apollo"),
        (dict(projector="galore", rnak=4), "unknown key of galore"),
        (dict(projector="galoer"), "optim.projector.name"),
    ],
)
def test_projected_optimizer_refuses_what_the_yaml_path_refuses(options, message):
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        projected_optimizer(_two_layers(), target=["0", "2"], **options)
    assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)
    assert str(e.value).startswith("projected_optimizer: ")


def test_projected_optimizer_takes_parameter_groups_and_refuses_none_to_project():
    model = _two_layers()
    weights = [model[0].weight, model[2].weight]
    biases = [model[0].bias, model[2].bias]
    opt = projected_optimizer(
        [{"params": weights, "project": True, "lr": 2e-3}, {"params": biases, "weight_decay": 0.0}],
        "galore",
        lr=1e-3,
        weight_decay=0.1,
        rank=4,
    )
    galore, adamw = opt.optimizers["galore"], opt.optimizers["adamw"]
    assert galore.param_groups[0]["params"] == weights and galore.param_groups[0]["lr"] == 2e-3
    assert adamw.param_groups[0]["params"] == biases
    assert (
        adamw.param_groups[0]["weight_decay"] == 0.0
        and galore.param_groups[0]["weight_decay"] == 0.1
    )
    before = [w.detach().clone() for w in weights]
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    assert all(not torch.equal(b, w) for b, w in zip(before, weights, strict=True))
    with pytest.raises(ConfigError, match="no tensor to project"):
        projected_optimizer(model.parameters(), "galore", rank=4)
    with pytest.raises(ConfigError, match="not 2-D"):
        projected_optimizer([{"params": biases, "project": True}], "galore", rank=4)


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    import lowrank_train.projectors.galore as galore
    from lowrank_train.optim.projected import projected_optimizer
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if sys.argv[1] == "split":  # finders that fail on one rank only
        real = galore.svd_basis
        def failing(grad, side, rank_, svd, previous, *rest):
            shape, cold = tuple(grad.shape[-2:]), previous is None
            # step 1: rank 1 finds no first basis for layer 0; step 4: rank 0 none for
            # layer 2 (rank 1 installs one), rank 1 none for layer 0 (rank 0 installs one)
            if (rank, shape, cold) in {(1, (40, 24), True), (0, (6, 40), False),
                                       (1, (40, 24), False)}:
                raise torch.linalg.LinAlgError("injected")
            return real(grad, side, rank_, svd, previous, *rest)
        galore.svd_basis = failing
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 6))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    projector = sys.argv[2]
    extra = {"galore": dict(svd="fast", moments_at_refresh="rotate")}.get(projector, {})
    opt = projected_optimizer(model, projector, target=["0", "2"], lr=1e-2, rank=4, update_gap=3,
                              **extra)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own half batch
    for step in range(4):  # refreshes at steps 1 and 4
        x = torch.randn(32, 24, generator=gen)
        ddp(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    inner = opt.optimizers[projector]
    tensors = [p.detach() for p in model.parameters()]
    for p in inner.param_groups[0]["params"]:
        state = inner.state[p]
        tensors += [v for v in state.values() if torch.is_tensor(v)]
        plain = [{k: v for k, v in state.items() if not torch.is_tensor(v)}]
        gathered = [None, None]
        dist.all_gather_object(gathered, plain)
        assert gathered[0] == gathered[1], ("counters differ", gathered)
    for t in tensors:
        gathered = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(gathered, t.contiguous())
        assert torch.equal(gathered[0], gathered[1]), "ranks differ"
    if rank == 0:
        print("ranks equal", len(tensors))
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize(
    "finders, projector",
    [("agree", "galore"), ("split", "galore"), ("agree", "qgalore"), ("agree", "fira")]
    + [("agree", "flora"), ("agree", "apollo")],
)
def test_ddp_ranks_hold_the_same_basis_and_weights_after_a_refresh(tmp_path, finders, projector):
    """Every rank ends with rank 0's weights and whole projector state (bases, rotated moments,
    counters: Q-GaLore's INT4 basis and lazy gap, Flora's and APOLLO's regenerated projections
    included), also where a basis finder failed on one rank only, without a hang."""
    script = tmp_path / "ddp_projector.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*torchrun, str(script), finders, projector],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    compared = int(proc.stdout.split("ranks equal ")[1].split()[0])
    if projector == "galore":  # 4 weights and biases; per projected tensor: basis, 2 moments
        assert compared == 10
    else:  # the weights and biases, and state tensors of both projected tensors
        assert compared >= 4 + 2
    if finders == "split":
        assert "kept its old basis" in proc.stderr


def test_hf_trainer_trains_with_projected_optimizer(tmp_path):
    """The README's HF example: Trainer(optimizers=(opt, sched)) steps our optimizer and
    scheduler (Trainer builds neither of its own), and the loss falls."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    opt = projected_optimizer(model, "galore", lr=1e-2, rank=8, update_gap=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 5))
    # a learnable sequence: each row counts up from its own start, modulo the vocabulary
    starts = torch.randint(0, 64, (64, 1))
    ids = (starts + torch.arange(16)) % 64
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=30, logging_steps=5,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    # accelerate wraps the optimizer it was given; the wrapped one is ours
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is opt
    assert sched.last_epoch == 30  # Trainer stepped our schedule once a step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.5 * losses[0], losses
    galore = opt.optimizers["galore"]
    assert len(galore.param_groups[0]["params"]) == 2 * 7  # every projection of both layers
    assert all(galore.state[p]["basis"] is not None for p in galore.param_groups[0]["params"])


@pytest.mark.parametrize(
    "projector, event",
    [("galore", "refresh"), ("qgalore", "refresh"), ("flora", "resample"), ("apollo", "resample")],
)
def test_a_new_basis_logs_refresh_and_a_new_random_draw_resample(projector, event):
    model = _two_layers()
    opt = projected_optimizer(model, projector, target=["0", "2"], rank=2, update_gap=1)
    for _ in range(2):
        model(torch.randn(8, 16)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    events = opt.pop_events()
    assert [(e["event"], e["step"], e["tensors"]) for e in events] == [(event, 1, 2), (event, 2, 2)]
