"""Where a training step's time goes: one of our bench cases (bench_train's ids, e.g.
7b:int8+apollo_mini+pl:accum1) is built through our `Trainer`, stepped `--warm` times (compile,
autotune, first refresh), then `--steps` steps run under `torch.profiler`.

It prints, and writes as `profile_<case>.txt` under --out-dir: the wall time per step, the GPU
time per step (the sum of kernel durations; wall minus GPU is the time the GPU waited on the
host), the kernel time by family (our Triton kernels by name, cuBLAS GEMMs, inductor's fused
kernels, other ATen kernels), and the top kernels; and one JSON line (bench "profile") with the
step's wall and GPU time and the time by family.

    python benchmarks/profile_case.py --cache DIR --case 7b:int8+apollo_mini+pl:accum1 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # noqa: E402
from harness import result_line, write_results  # noqa: E402

FAMILIES = [  # first match wins; a kernel's family says which part of the code launched it
    ("ours: dequant-matmul", re.compile(r"_dq_matmul")),
    ("ours: fused adam", re.compile(r"_adam_kernel")),
    ("ours: other triton", re.compile(r"^_\w+_kernel")),
    ("cuBLAS/cuDNN GEMM", re.compile(r"gemm|xmma|cutlass|nvjet|sm\d+_|ampere|flash|fmha", re.I)),
    ("inductor fused", re.compile(r"^triton_")),
    ("NCCL", re.compile(r"nccl", re.I)),
]


def family(name: str) -> str:
    return next((label for label, pattern in FAMILIES if pattern.search(name)), "ATen other")


def host_phases(trainer, clip: float, steps: int, sync) -> dict[str, float]:
    """Host seconds per step in each phase of `Trainer.step`, without syncs (the GPU runs
    behind): a step whose host phases sum to more than its GPU time is host-bound, and the
    phase that costs most is the one to cut. "wall" is the step's time with a sync after it."""
    phases = {
        "forward_backward": (trainer, "forward_backward"),
        "clip": (trainer.optimizer, "clip_grad_norm_"),
        "optimizer_step": (trainer.optimizer, "step"),
        "zero_grad": (trainer.optimizer, "zero_grad"),
    }
    spent = dict.fromkeys(phases, 0.0)
    originals = {}
    for label, (owner, attr) in phases.items():
        fn = originals[label] = getattr(owner, attr)

        def timed(*a, _fn=fn, _label=label, **k):
            start = time.perf_counter()
            out = _fn(*a, **k)
            spent[_label] += time.perf_counter() - start
            return out

        setattr(owner, attr, timed)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.step(clip)
    sync()
    wall = time.perf_counter() - start
    for owner, attr in phases.values():
        delattr(owner, attr)  # the instance attribute goes: the class's method shows again
    out = {label: seconds / steps for label, seconds in spent.items()}
    out["other"] = wall / steps - sum(out.values())
    out["wall"] = wall / steps
    return out


def profile(case: dict, warm: int, steps: int) -> tuple[str, dict]:
    import torch
    from torch.profiler import ProfilerActivity

    from lowrank_train.cli import setup_logging
    from lowrank_train.trainer import Trainer

    setup_logging(0)
    out_dir = Path(tempfile.mkdtemp(prefix="profile_"))
    cfg = training.load_case(case["config"], [*case["overrides"], f"out_dir={out_dir}", "name=p"])
    trainer = Trainer(cfg)
    trainer.model.train()
    clip = cfg.train.clip_grad_norm
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    for _ in range(warm):
        trainer.step(clip)
    sync()
    host = host_phases(trainer, clip, steps, sync)
    with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step(clip)
        sync()
        wall = (time.perf_counter() - start) / steps
    by_kernel: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    # on CUDA the kernels' durations; on CPU (the tests) each op's own time
    on_device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for event in prof.events():
        # a user annotation's GPU range (Optimizer.step#...) spans kernels counted on their own
        if event.device_type == on_device and not getattr(event, "is_user_annotation", False):
            us = event.device_time_total if cuda else event.self_cpu_time_total
            by_kernel[event.name] += us / 1e6 / steps
            counts[event.name] += 1
    gpu = sum(by_kernel.values())
    by_family: dict[str, float] = defaultdict(float)
    for name, seconds in by_kernel.items():
        by_family[family(name)] += seconds
    lines = [
        f"case {case['id']}: {steps} steps after {warm} warm-up steps"
        + ("" if cuda else " (no GPU: 'GPU kernels' are the CPU ops' own time)"),
        f"wall {wall * 1e3:.1f} ms/step, GPU kernels {gpu * 1e3:.1f} ms/step "
        f"({gpu / wall:.0%} busy)"
        + (f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""),
        "",
        "family                      ms/step   share",
    ]
    for label, seconds in sorted(by_family.items(), key=lambda kv: -kv[1]):
        lines.append(f"{label:<26} {seconds * 1e3:8.1f}  {seconds / gpu:6.1%}")
    lines += ["", "host time by phase (no syncs; wall has one at the end)      ms/step"]
    lines += [f"{label:<60} {seconds * 1e3:8.2f}" for label, seconds in host.items()]
    lines += [
        "",
        "top kernels                                                   ms/step  calls/step",
    ]
    for name, seconds in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"{name[:60]:<60} {seconds * 1e3:8.2f}  {counts[name] / steps:8.0f}")
    if cuda:  # where the host's time goes, for a GPU that waits on it
        # not `host`, which holds the phases the JSON reports as host_phase_ms (one variable,
        # the rows of 2026-12-04 reported these ops there)
        host_ops: dict[str, float] = defaultdict(float)
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CPU:
                host_ops[event.name] += event.self_cpu_time_total / 1e6 / steps
        lines += ["", f"host ops by own time (total {sum(host_ops.values()) * 1e3:.1f} ms/step)"]
        for name, seconds in sorted(host_ops.items(), key=lambda kv: -kv[1])[:25]:
            lines.append(f"{name[:60]:<60} {seconds * 1e3:8.2f}")
    metrics = {
        "wall_ms": round(wall * 1e3, 1),
        "gpu_kernel_ms": round(gpu * 1e3, 1),
        "gpu_busy": round(gpu / wall, 3),
        "family_ms": {k: round(v * 1e3, 1) for k, v in by_family.items()},
        "host_phase_ms": {k: round(v * 1e3, 2) for k, v in host.items()},
    }
    return "\n".join(lines), metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    training.add_common_arguments(ap, "7b", "unused")
    ap.add_argument("--case", required=True, help="a bench_train case id, size:method:accumN")
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--grad-accum", default="1")
    args = ap.parse_args()
    size, method, _ = args.case.split(":")
    args.sizes, args.only, args.steps = size, args.case, args.warm + args.profile_steps
    work = Path(tempfile.mkdtemp(prefix="profile_cases_"))
    cases = training.build_cases(args, "profile", [method], work)
    if not cases:
        sys.exit(f"profile_case.py: no case {args.case!r} (ids: size:method:accumN)")
    report, metrics = profile(cases[0], args.warm, args.profile_steps)
    print(report)
    row = result_line(
        bench="profile",
        case={"id": args.case},
        provider="ours",
        method=method,
        settings={
            "warm_steps": args.warm,
            "profile_steps": args.profile_steps,
            "overrides": args.set,
            "call": args.call,
        },
        metrics=metrics,
    )
    print(f"rows: {write_results('profile', args.device_slug, [row], args.out_dir)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.case.replace(":", "_").replace("+", "_")  # names the device's $OUT takes back
    (args.out_dir / f"profile_{stem}.txt").write_text(report + "\n")


if __name__ == "__main__":
    main()
