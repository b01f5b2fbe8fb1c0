"""Where an optimizer step's time goes, without the model's forward and backward: the run's
model and optimizer are built through `build_run` (the trainer's builder) at a preset, every
trainable tensor gets a random gradient, the step runs `--warm` times (the first refresh, any
autotuning), then `--steps` quiet steps are timed, and one more set under torch.profiler.

Per method, one line of text and one JSON line (bench "optim_step"): the step's wall ms, its GPU
ms (the sum of kernel durations; wall minus GPU is the host's share), the kernel launches per
step, and the top kernels by time. The target of issue 15 reads in these terms: at 1B the dense
step is ~137 ms, so a projector keeps >= 0.85x dense tok/s only if its optimizer step costs at
most ~24 ms more than AdamW's.

    python benchmarks/profile_optim_step.py --methods adamw,galore,fira --out-dir $OUT [--preset llama_1b]

With `--set optim.projector.update_gap=1` every timed step is a warm refresh (the first, cold,
one falls in the warm-up). The profiled steps' timeline also says where the GPU sat idle, and
which host op it waited on (`idle_gaps`).
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_optim import GAP, RANKS  # noqa: E402
from harness import result_line, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str, method: str, state_dtype: str, rank: int | None, extra: list[str]):
    from lowrank_train.resolve import load_run
    from lowrank_train.trainer import build_run

    overrides = [f"model.preset={preset}", "train.steps=1000"]
    if method != "adamw":
        overrides += [
            f"optim.state_dtype={state_dtype}",
            f"optim.projector.name={method}",
            f"optim.projector.rank={rank_of(method, rank)}",
            f"optim.projector.update_gap={GAP}",
        ]
    overrides += extra  # last, so --set wins (update_gap=1: every step a warm refresh)
    cfg, _ = load_run(ROOT / "configs" / "runs" / "dense_1b_24gb.yaml", overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build_run(cfg, 32000, device)
    return built.model, built.optimizer


def rank_of(method: str, rank: int | None) -> int:
    """bench_optim's rank of the method at 1B, or `rank` (APOLLO-Mini stays at 1)."""
    return RANKS[method] if rank is None or method == "apollo_mini" else rank


def fill_gradients(model: torch.nn.Module, optimizer, gen: torch.Generator) -> None:
    """A fresh random gradient on every trainable tensor (and every writer's side buffer)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype)
    for g in getattr(optimizer, "gradients", lambda: [])():
        if g is not None and g.numel():
            g.normal_(generator=gen)


def idle_gaps(trace: dict, top: int, steps: int = 1, floor_us: float = 10.0) -> dict:
    """Where the GPU waits for the host, from a chrome trace: every interval over `floor_us`
    with no kernel, copy or memset running, summed (`idle_ms`) and attributed twice: to the
    innermost ATen op the host was in when the GPU went idle (`idle_by_host_op_ms`: a sync
    or a host computation shows here), and to the op that launched the work ending the wait
    (`idle_by_next_op_ms`). Milliseconds a step, over `steps` profiled steps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    launches = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]

    def innermost(t: float) -> str:
        i = bisect.bisect_right(starts, t) - 1
        for j in range(i, max(-1, i - 200), -1):  # ops nest: the latest-starting one holding t
            if ops[j]["ts"] + ops[j]["dur"] >= t:
                return ops[j]["name"]
        return "(no op: Python)"

    at_start: dict[str, float] = defaultdict(float)
    by_next: dict[str, float] = defaultdict(float)
    busy_end = gpu[0]["ts"] if gpu else 0.0
    busy = idle = 0.0
    for e in gpu:
        gap = e["ts"] - busy_end
        if gap > floor_us:
            idle += gap
            at_start[innermost(busy_end)] += gap
            launched = launches.get(e.get("args", {}).get("correlation"))
            by_next[innermost(launched) if launched is not None else "(unknown)"] += gap
        busy += max(0.0, e["ts"] + e["dur"] - max(busy_end, e["ts"]))
        busy_end = max(busy_end, e["ts"] + e["dur"])

    def ranked(table: dict[str, float]) -> dict[str, float]:
        most = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return {k: round(v / 1e3 / steps, 3) for k, v in most}

    return {
        "gpu_busy_ms": round(busy / 1e3 / steps, 3),
        "idle_ms": round(idle / 1e3 / steps, 3),
        "idle_by_host_op_ms": ranked(at_start),
        "idle_by_next_op_ms": ranked(by_next),
    }


def profile_step(method: str, args) -> dict:
    from lowrank_train.planner import refresh_workspace, run_temporaries
    from lowrank_train.projectors import galore

    # no backward pass here frees memory to size a refresh's finder calls by (`refresh_budget`
    # would give ~0): they take the cap, as in a run whose backward frees more than it
    galore.refresh_budget = lambda device: galore.REFRESH_WORKSPACE_BYTES

    model, optimizer = build(args.preset, method, args.state_dtype, args.rank, args.set)
    planned_step = run_temporaries(optimizer)
    planned_refresh = refresh_workspace(optimizer, galore.REFRESH_WORKSPACE_BYTES, per_layer=False)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    gen = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
    fill_gradients(model, optimizer, gen)
    for _ in range(args.warm):  # the first refresh and any compile or autotune happen here
        optimizer.step()
    sync()
    if cuda:  # what a step allocates beyond the weights, gradients and state it starts from
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        optimizer.step()
    sync()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    step_extra = torch.cuda.max_memory_allocated() - base if cuda else None
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        for _ in range(args.steps):
            optimizer.step()
        sync()
    on_device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    by_kernel: dict[str, float] = defaultdict(float)
    launches = 0
    for event in prof.events():
        if event.device_type == on_device and not getattr(event, "is_user_annotation", False):
            us = event.device_time_total if cuda else event.self_cpu_time_total
            by_kernel[event.name] += us / 1e3 / args.steps
            launches += 1
    gpu_ms = sum(by_kernel.values())
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[: args.top]
    host = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    top_host = sorted(host, key=lambda e: -e.self_cpu_time_total)[: args.top]
    with tempfile.TemporaryDirectory() as tmp:  # a trace of one 1B refresh step is ~40 MB
        prof.export_chrome_trace(f"{tmp}/trace.json")
        gaps = idle_gaps(json.loads(Path(f"{tmp}/trace.json").read_text()), args.top, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    del model, optimizer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {
        "wall_ms": round(wall_ms, 3),
        "gpu_ms": round(gpu_ms, 3),
        "launches": launches // args.steps,
        "peak_alloc_gib": None if peak is None else round(peak, 3),
        "step_extra_gib": None if step_extra is None else round(step_extra / 2**30, 4),
        # the planner's temporaries of a step and of a refresh step, for the same optimizer
        "planned_step_temp_gib": round(planned_step / 2**30, 4),
        "planned_refresh_gib": round(planned_refresh / 2**30, 4),
        "top_kernels_ms": {name[:120]: round(ms, 3) for name, ms in top},
        # host time of each ATen op (a sync's wait included: it shows where the host blocks)
        "top_host_ms": {
            e.key: round(e.self_cpu_time_total / 1e3 / args.steps, 3) for e in top_host
        },
        **gaps,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="adamw,galore,qgalore,fira,flora,gradnormlorp,apollo")
    ap.add_argument("--preset", default="llama_1b")
    ap.add_argument("--state-dtype", default="bfloat16", help="as bench_optim's default")
    ap.add_argument("--rank", type=int, default=None, help="instead of bench_optim's ranks")
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--device-slug", default=None)
    ap.add_argument("--call", default=None)
    args = ap.parse_args()
    for method in args.methods.split(","):
        metrics = profile_step(method, args)
        print(
            f"{method}: wall {metrics['wall_ms']:.1f} ms, gpu {metrics['gpu_ms']:.1f} ms, "
            f"{metrics['launches']} launches/step, peak_alloc {metrics['peak_alloc_gib']} GiB, "
            f"step extra {metrics['step_extra_gib']} GiB (planned: step "
            f"{metrics['planned_step_temp_gib']}, refresh {metrics['planned_refresh_gib']})",
            flush=True,
        )
        for name, ms in metrics["top_kernels_ms"].items():
            print(f"    {ms:8.3f} ms  {name}", flush=True)
        for name, ms in metrics["top_host_ms"].items():
            print(f"    {ms:8.3f} ms  host {name}", flush=True)
        print(f"  gpu busy {metrics['gpu_busy_ms']} ms, idle {metrics['idle_ms']} ms", flush=True)
        for table in ("idle_by_host_op_ms", "idle_by_next_op_ms"):
            for name, ms in metrics[table].items():
                print(f"    {ms:8.3f} ms  {table} {name}", flush=True)
        row = result_line(
            bench="optim_step",
            case={"preset": args.preset, "method": method},
            provider="ours",
            method=method,
            settings={
                "state_dtype": args.state_dtype,
                "rank": None if method == "adamw" else rank_of(method, args.rank),
                "update_gap": GAP,
                "warm": args.warm,
                "steps": args.steps,
                "overrides": args.set,
                "call": args.call,
            },
            metrics=metrics,
        )
        if args.out_dir is not None:
            write_results("optim_step", args.device_slug, [row], args.out_dir)


if __name__ == "__main__":
    main()
