"""The benchmark harness's pure parts: results-file naming, quantiles, run grouping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_loop  # noqa: E402
import harness  # noqa: E402


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("AMD EPYC 7B13 (2 cores)", "cpu"),
    ],
)
def test_device_slug(name, slug):
    assert harness.device_slug(name) == slug


def test_quantiles_median_and_spread():
    q = harness.quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert q == {"median": 3.0, "p20": 2.0, "p80": 4.0}


def test_in_one_process_keeps_each_models_runs_in_order():
    cases = [
        {"model": m, "provider": p, "repeat": r}
        for m in ("llama_60m", "llama_350m")
        for r in range(2)
        for p in ("ours", "torch")[:: 1 if r % 2 == 0 else -1]
    ]
    groups = bench_loop.in_one_process(cases)
    assert [g["provider"] for g in groups] == ["sequence", "sequence"]
    assert [c for g in groups for c in g["runs"]] == cases  # the flat order the parent expects
    assert {c["model"] for c in groups[0]["runs"]} == {"llama_60m"}


# -- the training benchmarks' plumbing (bench_train, bench_params) on the tiny model, CPU --------

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402

import bench_params  # noqa: E402
import bench_train  # noqa: E402
import training  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FLAGS = (
    "batch_size",
    "grad_accum",
    "gradient_checkpointing",
    "clip_grad_norm",
    "compile",
    "per_layer",
    "steps",
    "call",
)


def bench_train_tiny(tiny_run, out, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/bench_train.py on the tiny model, writing under `out`; it must exit 0."""
    command = [sys.executable, str(BENCHMARKS / "bench_train.py"), "--sizes", "tiny"]
    command += ["--base", str(tiny_run("base")), "--out-dir", str(out), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_bench_train_runs_each_case_in_its_own_process_and_writes_rows_as_they_end(
    tiny_run, tmp_path
):
    out = tmp_path / "out"
    proc = bench_train_tiny(
        tiny_run, out, "--methods", "adamw,galore-torch-8bit-pl", "--grad-accum", "2",
        "--steps", "30", "--no-compile", "--call", "test-call",
    )  # fmt: skip
    (rows_file,) = out.glob("train_*.jsonl")
    rows = {r["method"]: r for r in map(json.loads, rows_file.read_text().splitlines())}
    assert list(rows) == ["adamw", "galore-torch-8bit-pl"]
    for row in rows.values():
        assert set(FLAGS) <= set(row["settings"]), row["settings"]
        assert row["settings"]["grad_accum"] == 2 and row["settings"]["call"] == "test-call"
    ours = rows["adamw"]
    assert ours["provider"] == "ours" and ours["settings"]["dtype"] == "float32"
    assert_timed(ours["metrics"], steps=30)
    assert ours["metrics"]["targeted_stored_gib"] > 0
    # the planner's figure beside the measurement, or null with the reason it is missing
    plan = ours["metrics"]
    assert isinstance(plan["planned_gib"], float) or plan["planned_error"]
    if plan["planned_gib"] is not None:
        assert plan["planned_over_measured"] == plan["planned_gib"] / plan["peak_gib"]
    skip = rows["galore-torch-8bit-pl"]["metrics"]
    assert "micro-batch" in skip["skipped"] and "tok_s" not in skip
    log = (out / "train.log").read_text()
    assert "===== case" in log and "step 20/30 | loss" in log  # the child's own output
    assert (out / "train.png").stat().st_size > 0
    assert "| tiny | ours | adamw | 4 x 2 | no | no | no |" in proc.stdout


def assert_timed(m: dict, steps: int) -> None:
    assert m["windows"] == steps // training.EVERY and m["quiet_windows"] == m["windows"] - 1
    assert m["tok_s"] > 0 and m["tok_s_amortized"] > 0 and m["peak_gib"] > 0
    assert isinstance(m["step0_s"], float) and math.isfinite(m["final_loss"])


def test_a_peer_steps_our_dense_model_of_the_case(tiny_run, tmp_path):
    case = {
        "bench": "train", "id": "tiny:torch-adamw:accum2", "size": "tiny",
        "method": "torch-adamw", "provider": "torch", "steps": 20, "grad_accum": 2,
        "clip": 1.0, "compile": False, "cap_gib": 0.0, "base": str(tiny_run("base")), "call": "c",
    }  # fmt: skip
    case["config"] = str(training.compose([Path(case["base"])], tmp_path / "peer.yaml"))
    case["overrides"] = training.common_overrides(case)
    case["peer"] = training.peer_settings(training.PEERS["torch-adamw"], case)
    result = training.peer_run(case)
    assert_timed(result, steps=20)
    s = result["settings"]
    assert (s["grad_accum"], s["clip_grad_norm"], s["per_layer"]) == (2, 1.0, False)
    assert result["params"] == 166208  # the tiny model of the base file, as ours builds it


def test_a_method_not_registered_yet_is_a_skip_row_with_its_reason(monkeypatch):
    monkeypatch.setitem(training.OURS, "later", training.Method("not_registered"))
    case = {
        "bench": "params", "id": "tiny:later:accum1", "size": "tiny", "method": "later",
        "provider": "ours", "steps": 20, "grad_accum": 1, "clip": 1.0, "compile": True,
        "cap_gib": 24.0, "call": "c", "config": "x.yaml", "overrides": [],
    }  # fmt: skip
    result = training.our_run(case)
    assert result == {"skipped": "weights.name 'not_registered' is not registered yet"}
    row = training.to_row(case, result, bench_params.against_dense())
    assert row["metrics"]["skipped"] == result["skipped"]
    assert set(FLAGS) <= set(row["settings"]) and row["settings"]["compile"] is True
    assert "skipped: weights.name 'not_registered'" in bench_params.readme_table([row])


def test_summarize_steady_step0_and_amortized_from_the_windows():
    # 5 windows of 10 steps: the first holds the compile, the fourth a refresh (step 35) of 3 s
    windows = [30.0, 2.0, 2.2, 5.0, 1.8]
    events = [{"step": 1, "seconds": 9.0}, {"step": 35, "seconds": 3.0}]
    out = training.summarize(windows, 1000, events, gap=200, compiled=True)
    step_s = 0.2  # the median of the quiet windows 2.0, 2.2, 1.8, over 10 steps
    assert out["step_s"] == pytest.approx(step_s)
    assert out["tok_s"] == pytest.approx(1000 / step_s)
    assert out["step0_s"] == pytest.approx(30.0 - 9 * step_s)
    assert out["event_s"] == 3.0  # a later refresh, not the cold first one
    assert out["tok_s_amortized"] == pytest.approx(200 * 1000 / (200 * step_s + 3.0))
    # a peer without its own timing: the event window's excess over a steady one
    peer = training.summarize(windows, 1000, [{"step": 1}, {"step": 35}], 200, compiled=True)
    assert peer["event_s"] == pytest.approx(5.0 - 2.0)
    # only the first step's refresh, compiled: the compile and the SVD are not separable
    first = training.summarize(windows[:3], 1000, [{"step": 1}], 200, compiled=True)
    assert first["tok_s_amortized"] is None
    uncompiled = training.summarize(windows[:3], 1000, [{"step": 1}], 200, compiled=False)
    assert uncompiled["event_s"] == pytest.approx(30.0 - 9 * 0.21 - 0.21)
    plain = training.summarize(windows[:3], 1000, [], None, compiled=True)
    assert plain["tok_s_amortized"] == pytest.approx(1000 * 20 / 4.2)


def test_params_rows_carry_ratios_to_the_dense_row_of_the_call():
    extra = bench_params.against_dense()
    case = {"size": "1b"}
    dense = {"tok_s": 100.0, "tok_s_amortized": 100.0, "peak_gib": 20.0, "peak_alloc_gib": 18.0,
             "planned_gib": 21.0}  # fmt: skip
    assert extra({**case, "method": "adamw"}, dense)["tok_s_vs_dense"] == 1.0
    low = {"tok_s": 120.0, "tok_s_amortized": 110.0, "peak_gib": 15.0, "peak_alloc_gib": 12.0,
           "planned_gib": 16.0}  # fmt: skip
    out = extra({**case, "method": "lowrank"}, low)
    assert out["tok_s_vs_dense"] == pytest.approx(1.2)
    assert out["peak_alloc_gib_vs_dense"] == pytest.approx(12 / 18)
    assert out["peak_saving_gib"] == 5.0 and out["planned_saving_gib"] == 5.0
    assert extra({"size": "350m", "method": "lowrank"}, low) == {}  # no dense row: no ratio


def test_readme_tables_from_rows():
    def row(method, provider, **metrics):
        return {
            "case": {"model": "llama_7b", "cap_gib": 24.0},
            "provider": provider,
            "method": method,
            "settings": {
                "batch_size": 4,
                "grad_accum": 1,
                "gradient_checkpointing": True,
                "per_layer": True,
                "compile": True,
                "clip_grad_norm": 0.0,
                "call": "call2",
            },  # fmt: skip
            "metrics": metrics,
        }

    rows = [
        row(
            "int8+apollo_mini+pl",
            "ours",
            peak_gib=9.71,
            planned_gib=9.5,
            tok_s=5432.1,
            tok_s_amortized=5400.0,
            step0_s=61.25,
            peak_alloc_gib=8.0,
        ),  # fmt: skip
        row("adamw", "ours", skipped="the planner: 40.00 GiB does not fit 24.0 GiB"),
    ]
    lines = bench_train.readme_table(rows).splitlines()
    assert lines[0].startswith("| model | provider | method | batch x accum |")
    assert len(lines) == 4 and lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2].startswith(
        "| llama_7b | ours | int8+apollo_mini+pl | 4 x 1 | yes | yes | yes | 0 | 9.71 |"
    )
    assert "| 9.50 | 8.00 | 5,432 | 5,400 | 61.2 | call2 |  |" in lines[2]
    assert lines[3].endswith("| call2 | skipped: the planner: 40.00 GiB does not fit 24.0 GiB |")


def test_plan_only_writes_the_planners_verdict_per_case_and_runs_nothing(tiny_run, tmp_path):
    out = tmp_path / "out"
    proc = bench_train_tiny(
        tiny_run, out, "--methods", "adamw,int8+apollo_mini+pl,galore-torch", "--plan-only",
        "--cap-gib", "0.5",
    )  # fmt: skip
    (rows_file,) = out.glob("plan_*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["adamw", "int8+apollo_mini+pl"]  # peers: not planned
    for row in rows:
        assert row["bench"] == "plan" and row["settings"]["planned_for"] == "cuda"
        assert row["metrics"]["planned_gib"] > 0 and row["metrics"]["planned_peak_phase"]
    assert "| tiny:adamw:accum1 |" in proc.stdout
    assert not list(out.glob("train_*.jsonl"))  # nothing ran


@pytest.mark.parametrize("rank", [8, 24])
def test_the_fast_refresh_keeps_the_exact_energy_on_a_real_runs_gradients(
    tiny_run, monkeypatch, rank
):
    """Issue 15's check of the fast finder, on gradients recorded from a run (the tiny model
    trained with GaLore): cold and warm bases keep >= 0.99 of the exact basis's energy for
    every projected tensor, and no matrix needs the Householder fallback (a real run's steep
    spectra once failed CholeskyQR on every tensor, so every warm refresh took it: correct and
    slow). Rank 24 (w = 40) takes the warm truncation; the benchmark runs the same functions on
    llama_20m and the 60M run file."""
    import bench_refresh_energy as energy

    from lowrank_train.projectors import subspace
    from lowrank_train.resolve import load_run
    from lowrank_train.trainer import Trainer

    fallbacks = []
    monkeypatch.setattr(subspace, "orthonormal", lambda y, plain=2: fallbacks.append(1) / 0)

    cfg, _ = load_run(
        tiny_run(),
        ["optim.projector.name=galore", f"optim.projector.rank={rank}", "train.steps=6"],
    )
    trainer = Trainer(cfg)
    trainer.model.train()
    records = []
    for step in range(1, 6):
        trainer.step(cfg.train.clip_grad_norm)
        if step in (3, 5):
            records.append(energy.recorded_gradients(trainer))
    found = energy.ratios(*records, rank=rank, seed=cfg.train.seed)
    assert len(found["fast warm"]) == 14  # 7 Linears x 2 layers
    assert min(found["fast cold"]) >= 0.99 and min(found["fast warm"]) >= 0.99, found
    assert not fallbacks
    # the records are real gradients: they change between the two steps
    late, early = next(iter(records[1].values())), next(iter(records[0].values()))
    assert not torch.equal(late, early)


def test_bench_optim_amortizes_over_the_whole_gaps_a_run_holds_up_to_1000_steps():
    """Issue 15's amortized rate is over 1,000 steps after the first refresh: a 1,020-step run
    amortizes steps 11..1010 (five refreshes, each a slow window), a 220-step run steps
    11..210 (one); the steady rate skips the refresh windows."""
    import bench_optim

    case = {"batch_size": 32}
    tokens = 32 * 256 * 10
    for steps, refreshes in ((1020, 5), (220, 1)):
        windows = [1.5] * (steps // 10)
        refresh_steps = {200 * k + 1 for k in range(1, steps // 200 + 1)}
        for r in refresh_steps:
            windows[(r - 1) // 10] += 0.7
        out = bench_optim.summarize(windows, case, refresh_steps)
        span = 1000 if steps > 1000 else 200
        assert out["amortized_steps"] == span
        expected = tokens * span / 10 / (1.5 * span / 10 + 0.7 * refreshes)
        assert out["tok_s_amortized"] == pytest.approx(expected)
        assert out["tok_s"] == pytest.approx(tokens / 1.5)
    short = bench_optim.summarize([1.5] * 4, case, set())  # a traced run, shorter than a gap
    assert short["amortized_steps"] == 0 and short["tok_s_amortized"] is None


def test_bench_optim_writes_each_row_as_its_case_ends(monkeypatch, tmp_path):
    """bench_optim's rows: one per finished case, appended before the next case runs (a call
    cut short keeps them), the ratio to the call's dense AdamW, or to `--dense-tok-s` from an
    earlier call (said in `settings.dense_from`), and a failed case gives no row."""
    import datetime

    import bench_optim

    results = {
        "adamw": {"tok_s": 60000.0, "peak_gib": 22.0, "peak_alloc_gib": 20.0},
        "galore": {"tok_s": 57000.0, "peak_gib": 20.0, "peak_alloc_gib": 17.0},
        "fira": {"error": "timed out after 1200 s"},
    }
    rows_file = tmp_path / f"optim_h200_{datetime.date.today().isoformat()}.jsonl"

    lines_after_each_case = []

    def fake_run_cases(script, cases, timeout_s, on_result):
        for case in cases:
            on_result(case, results[case["method"]])
            lines_after_each_case.append(len(rows_file.read_text().splitlines()))
        return [results[c["method"]] for c in cases]

    def run(*args: str) -> list[dict]:
        argv = ["bench_optim.py", "--cache", "C", "--device-slug", "h200", "--out-dir"]
        monkeypatch.setattr(sys, "argv", [*argv, str(tmp_path), *args])
        monkeypatch.setattr(bench_optim, "run_cases", fake_run_cases)
        bench_optim.main()
        return [json.loads(line) for line in rows_file.read_text().splitlines()]

    rows = run("--methods", "adamw,galore,fira", "--call", "optim-1")
    assert [r["method"] for r in rows] == ["adamw", "galore"]
    assert lines_after_each_case == [1, 2, 2]
    assert rows[1]["metrics"]["vs_our_dense_adamw"] == 57000 / 60000
    assert rows[1]["settings"]["call"] == "optim-1" and "dense_from" not in rows[1]["settings"]
    rows_file.unlink()
    rows = run("--methods", "galore", "--dense-tok-s", "59358")
    assert rows[0]["metrics"]["vs_our_dense_adamw"] == 57000 / 59358
    assert rows[0]["settings"]["dense_from"].startswith("--dense-tok-s 59358")


def test_the_refresh_stage_split_names_the_finders_parts():
    """bench_optim's split of a batched warm refresh (its GPU figures say which part to make
    faster): the products, CholeskyQR's Cholesky and triangular solves and Rayleigh-Ritz's eigh
    each get time, and the unprofiled call's wall time is the total."""
    import bench_optim

    from lowrank_train.projectors import subspace

    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 64, 96, generator=gen)
    previous = torch.linalg.qr(torch.randn(3, 64, 8, generator=gen))[0]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    parts = bench_optim.stage_seconds(subspace.svd_basis, grads, "left", 8, "fast", previous, gens)
    for family in ("products", "cholesky", "triangular_solve", "eigh", "total"):
        assert parts[family] > 0, family
    assert "householder_qr" not in parts  # a well-conditioned batch never falls back


@pytest.mark.parametrize("method", ["galore", "qgalore", "int8_qgalore", "fira", "gradnormlorp"])
def test_refresh_quality_overrides_are_a_valid_run_of_each_60m_svd_projector(method, tmp_path):
    """bench_refresh_quality's and bench_refresh_energy's overrides on each 60M run file of an
    SVD projector load (the run files budget train.tokens, which once made every call of each
    exit 2 before training)."""
    import bench_refresh_energy
    import bench_refresh_quality

    from lowrank_train.resolve import load_run

    run_file = Path(__file__).resolve().parents[1] / "configs" / "runs" / f"{method}_60m.yaml"
    for finder in ("exact", "fast"):
        args = bench_refresh_quality.overrides("q", tmp_path, 20, [], finder)
        cfg, _ = load_run(run_file, args)
        assert (cfg.train.steps, cfg.train.tokens) == (20, 0)
        assert cfg.optim.projector.method.svd == finder
    cfg, _ = load_run(run_file, bench_refresh_energy.overrides(30, str(tmp_path), []))
    assert (cfg.train.steps, cfg.train.tokens) == (30, 0)  # and bench_refresh_energy's


def test_idle_gaps_attributes_the_gpus_waits_to_host_ops():
    """profile_optim_step's timeline reading: a 50 us wait after a kernel, while the host sat
    in a sync (`aten::item`), ended by a kernel that `aten::mm` launched; a 5 us gap is below
    the floor; the busy time counts overlapping kernels once."""
    import profile_optim_step

    def x(cat, name, ts, dur, **args):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}

    trace = {
        "traceEvents": [
            x("kernel", "k1", 0, 10, correlation=1),
            x("kernel", "k1b", 5, 10, correlation=2),  # overlaps k1: busy to 15
            x("kernel", "k2", 65, 10, correlation=3),  # idle 15..65
            x("kernel", "k3", 80, 10, correlation=4),  # 5 us: under the floor
            x("cpu_op", "aten::item", 12, 60),
            x("cpu_op", "aten::mm", 62, 2),
            x("cuda_runtime", "cudaLaunchKernel", 63, 1, correlation=3),
        ]
    }
    got = profile_optim_step.idle_gaps(trace, top=5)
    assert got["idle_ms"] == 0.05 and got["gpu_busy_ms"] == 0.035  # 15 + 10 + 10 us
    assert got["idle_by_host_op_ms"] == {"aten::item": 0.05}
    assert got["idle_by_next_op_ms"] == {"aten::mm": 0.05}


def test_the_peak_breakdown_replays_the_trace_to_its_peak():
    """Blocks live at the highest running total, grouped by their first frame outside torch;
    the blocks from before the trace are the total at the end less the trace's net change,
    less those of them freed before the peak."""
    from peak_breakdown import UNTRACED, freed_untraced, live_at_peak, rounding, untraced

    def frames(name):
        return [
            {"filename": "/x/torch/nn/f.py", "line": 1, "name": "inner"},
            {"filename": f"/w/lowrank_train/{name}.py", "line": 7, "name": name},
        ]

    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": frames("acts")},
        {"action": "alloc", "addr": 2, "size": 50, "frames": frames("grads")},
        {"action": "free_completed", "addr": 900, "size": 30},  # a block from before
        {"action": "alloc", "addr": 3, "size": 40, "frames": frames("acts")},  # peak: 160
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 3, "size": 40},
        {"action": "alloc", "addr": 4, "size": 60, "frames": frames("step")},  # 80 < 160
    ]
    rows = live_at_peak(events, allocated_at_end=1000 + 80)
    by = {r["where"]: r["bytes"] for r in rows}
    assert by["(peak)"] == 1000 + 160
    assert by[UNTRACED] == 1000 - 30
    assert by["lowrank_train/acts.py:7 acts"] == 140
    assert by["lowrank_train/grads.py:7 grads"] == 50
    assert "lowrank_train/step.py:7 step" not in by
    segments = [
        {
            "blocks": [
                {"address": 2, "size": 50, "state": "active_allocated"},  # traced
                {"address": 4, "size": 60, "state": "active_allocated"},  # traced
                {"address": 901, "size": 700, "state": "active_allocated", "frames": []},
                {"address": 902, "size": 300, "state": "active_allocated"},
                {"address": 903, "size": 64, "state": "inactive"},  # cached, not allocated
            ]
        }
    ]
    parts = untraced(segments, events)
    assert [r["bytes"] for r in parts] == [700, 300]  # the 1,000 bytes from before the trace
    assert parts[0]["where"] == f"{UNTRACED} block: ?"  # no frames kept
    (freed,) = freed_untraced(events)  # the block at 900, freed third
    assert freed == {"where": f"{UNTRACED} freed at event 2: (torch internals)", "bytes": 30}
    frames_step = frames("step")
    live = [
        {"size": 2048, "requested_size": 1500, "state": "active_allocated", "frames": frames_step},
        {"size": 1024, "requested_size": 1000, "state": "active_allocated", "frames": frames_step},
        {"size": 4096, "requested_size": 100, "state": "inactive"},  # cached: not counted
        {"size": 512, "requested_size": 512, "state": "active_allocated"},
    ]
    assert rounding([{"blocks": live}]) == [
        {"where": "(rounding at the end)", "bytes": 548 + 24},
        {"where": "(rounding) lowrank_train/step.py:7 step", "bytes": 572},
    ]


def test_replan_plans_a_row_with_the_method_keys_it_ran(tmp_path):
    """A measured row is re-planned with its recorded `weights_options`, not today's recipe
    (the lowrank 350m row ran rank 128 where the recipe now says 256: 1.20x planned, 1.07x
    with its own rank)."""
    import replan
    from training import our_run_file

    from lowrank_train.planner import plan_run
    from lowrank_train.resolve import load_run

    overrides = ["model.preset=llama_350m", "model.seq_len=256", "train.batch_size=8"]
    row = {
        "provider": "ours",
        "method": "lowrank",
        "case": {"model": "llama_350m"},
        "settings": {"overrides": overrides, "weights_options": {"rank": 16, "init": "variance"}},
        "metrics": {"peak_gib": 3.0, "peak_alloc_gib": 2.5},
    }
    planned = replan.replan(row, tmp_path)["planned_gib"]
    path = our_run_file("lowrank", {"id": "350m:lowrank:t", "size": "350m"}, tmp_path)
    ran = plan_run(load_run(path, [*overrides, "weights.rank=16"])[0], "cuda", 32000, suggest=False)
    recipe = plan_run(load_run(path, overrides)[0], "cuda", 32000, suggest=False)
    assert planned == round(ran.total_gib, 3) and round(recipe.total_gib, 3) != planned
