"""Projected optimizers against dense AdamW and the peers' libraries, on the GPU, compiled, under
the 24 GiB cap (issue 15's benchmark; DESIGN.md's JSON lines, bench "optim").

Cases, each in its own process (the harness), llama_1b (batch 32) or llama_350m (batch 8), seq
256, bf16 weights and gradients, torch.compile of the model and loss, clip 1.0, T = 200:
  * ours: dense AdamW, then each projector through lowrank-train's own loop (`train()`);
  * galore-torch GaLoreAdamW and apollo-torch APOLLOAdamW (APOLLO, and APOLLO-Mini as
    `apollo-torch-mini`) in the bare hand-written loop of
    bench_loop.py (the same HF model, data, clip and schedule).
Metrics: `tok_s` (median 10-step window without a refresh, the first window dropped),
`tok_s_amortized` (from step 11, the most whole gaps the run holds up to 1,000 steps, in
`amortized_steps`: 200 steps hold one refresh, `--steps 1020` the issue's 1,000 with five),
`step0_s` (the cold first refresh, ours only: the peers' first window also holds the
compile), `refresh_s`
(each later refresh: ours from the optimizer's refresh events; the peers' as the refresh
window's excess over the median window), `peak_gib` and `peak_alloc_gib`.
A `refresh` case times the basis finders alone on the preset's projected shapes (exact SVD vs
the fast finder, cold and warm) on gradients with a decaying spectrum, and splits the warm
refresh, batched by shape as the optimizer runs it, into its parts (products, CholeskyQR's
Cholesky and triangular solves, Rayleigh-Ritz's eigh, other) under torch.profiler.

    python benchmarks/bench_optim.py --cache DIR [--only 1b] [--methods adamw,galore,...] [--steps 250]
        [--out-dir $OUT] [--call NAME] [--dense-tok-s X]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loop import bare  # noqa: E402
from harness import case_main, result_line, run_cases, write_results  # noqa: E402

from lowrank_train.projectors.base import BASIS_EVENTS  # noqa: E402
from lowrank_train.projectors.galore import REFRESH_WORKSPACE_BYTES, GaLore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAP_GIB = 24.0
GAP = 200
AMORTIZED_STEPS = 1000  # issue 15: the amortized rate over 1,000 steps after the first refresh
TARGET = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# the rank each method runs at 1B: GaLore at the peer's 512 (issue 15), APOLLO at its 1B recipe's
# 256, Mini at 1; the other SVD-based methods at GaLore's rank, Flora at its recipe's 256.
RANKS = {
    "galore": 512,
    "qgalore": 512,
    "fira": 512,
    "gradnormlorp": 512,
    "flora": 256,
    "apollo": 256,
    "apollo_mini": 1,
}
# --methods name: (the peer library, the method it runs)
PEERS = {
    "galore-torch": ("galore-torch", "galore"),
    "apollo-torch": ("apollo-torch", "apollo"),
    "apollo-torch-mini": ("apollo-torch", "apollo_mini"),
}


def ours(case: dict) -> dict:
    from lowrank_train.resolve import load_run
    from lowrank_train.trainer import train

    overrides = [
        f"model.preset={case['model']}",
        f"train.batch_size={case['batch_size']}",
        f"train.steps={case['steps']}",
        f"data.cache={case['cache']}",
        f"memory.cap_gib={CAP_GIB}",
        "logging.every=10",
        "eval.every=0",
        "eval.max_tokens=2048",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        f"out_dir={tempfile.mkdtemp(prefix='bench_optim_')}",
        "name=ours",
    ]
    if case["method"] != "adamw":
        overrides += [
            f"optim.state_dtype={case['state_dtype']}",
            f"optim.projector.name={case['method']}",
            f"optim.projector.rank={case['rank']}",
            f"optim.projector.update_gap={GAP}",
        ]
        if case.get("svd"):
            overrides.append(f"optim.projector.svd={case['svd']}")
    cfg, _ = load_run(ROOT / "configs" / "runs" / "dense_1b_24gb.yaml", overrides)
    result = train(cfg)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [m for m in lines if "tok_s" in m]
    refreshes = [m for m in lines if m.get("event") in BASIS_EVENTS]
    windows_s = [m["step_s"] * 10 for m in windows]
    out = summarize(windows_s, case, refresh_steps={r["step"] for r in refreshes})
    out["step0_s"] = refreshes[0]["seconds"] if refreshes else None
    out["refresh_s"] = [r["seconds"] for r in refreshes[1:]]
    out["refresh_fallbacks"] = [r.get("fallbacks", 0) for r in refreshes]  # Householder redos
    out["peak_gib"] = max(m["peak_gib"] for m in windows)
    out["peak_alloc_gib"] = max(m["peak_alloc_gib"] for m in windows)
    out["alloc_retries"] = windows[-1].get("alloc_retries")
    return out


def summarize(windows_s: list[float], case: dict, refresh_steps: set[int]) -> dict:
    """Steady and amortized tokens/s from 10-step window times (window i ends at step 10 i)."""
    tokens = case["batch_size"] * 256 * 10
    quiet = [
        s
        for i, s in enumerate(windows_s[1:], start=2)
        if not any(10 * (i - 1) < r <= 10 * i for r in refresh_steps)
    ]
    # from step 11, the longest whole number of gaps the run holds, up to the 1,000
    # steps (5 refreshes, at 201, ..., 1001 - 200); 200 steps hold one, at 201
    span = min(AMORTIZED_STEPS, (len(windows_s) - 1) * 10 // GAP * GAP)
    amortized = windows_s[1 : 1 + span // 10]  # empty in a run shorter than a gap
    return {
        "tok_s": tokens / statistics.median(quiet),
        "tok_s_amortized": tokens * len(amortized) / sum(amortized) if amortized else None,
        "amortized_steps": span,
        "quiet_median_window_s": statistics.median(quiet),
    }


def peer_optimizer(case: dict):
    """The peer library's own optimizer over the same targets, arguments as its README gives."""

    def make(model: torch.nn.Module) -> torch.optim.Optimizer:
        low = [p for n, p in model.named_parameters() if n.split(".")[-2] in TARGET]
        ids = {id(p) for p in low}
        regular = [p for p in model.parameters() if id(p) not in ids]
        group = {"params": low, "rank": case["rank"], "update_proj_gap": GAP, "proj_type": "std"}
        if case["provider"] == "galore-torch":
            from galore_torch import GaLoreAdamW

            return GaLoreAdamW([{"params": regular}, {**group, "scale": 0.25}], lr=1e-4)
        from apollo_torch import APOLLOAdamW

        # APOLLO's 1B script: channel scaling, scale 1; Mini's: rank 1, one scale per tensor,
        # scale 128 (the code multiplies the update by its square root, as ours takes 11.31)
        extra = {"proj": "random", "scale_type": "channel", "scale": 1}
        if case["method"] == "apollo_mini":
            extra = {"proj": "random", "scale_type": "tensor", "scale": 128}
        return APOLLOAdamW([{"params": regular}, {**group, **extra}], lr=1e-4)

    return make


def peer(case: dict) -> dict:
    res = bare({**case, "seq_len": 256, "compile": True, "cap_gib": CAP_GIB}, peer_optimizer(case))
    windows_s = res["windows_s"]
    # the windows of steps 201..210, 401..410, ... hold the peer's refreshes after step 1
    later = windows_s[GAP // 10 :: GAP // 10]
    out = summarize(windows_s, case, refresh_steps={k * GAP + 1 for k in range(1, len(later) + 1)})
    out["refresh_s"] = [w - out["quiet_median_window_s"] for w in later]
    out["step0_s"] = None
    out["peak_gib"], out["peak_alloc_gib"] = res["peak_gib"], res["peak_alloc_gib"]
    return out


def refresh_timing(case: dict) -> dict:
    """Seconds a refresh of every projected tensor of the preset takes: exact vs fast (cold
    randomized finder, then the warm one from the previous basis), per distinct shape x count."""
    from lowrank_train.config import ModelConfig
    from lowrank_train.models import llama_config
    from lowrank_train.projectors import subspace

    hf = llama_config(ModelConfig(preset=case["model"]), 32000)
    h, i, layers = hf.hidden_size, hf.intermediate_size, hf.num_hidden_layers
    shapes = {(h, h): 4 * layers, (i, h): 2 * layers, (h, i): layers}
    gen = torch.Generator().manual_seed(0)
    out = {"exact_s": 0.0, "fast_cold_s": 0.0, "fast_warm_s": 0.0, "energy_ratio_min": 1.0}
    r = case["rank"]
    galore = GaLore(GaLore.Config(rank=r))
    for (m, n), count in shapes.items():
        side = subspace.side_of((m, n))
        g = synthetic_gradient(m, n)
        g2 = g + 0.3 * g.float().norm() / g.numel() ** 0.5 * torch.randn_like(g)  # the next one
        exact_s, _ = timed(subspace.svd_basis, g, side, r, "exact", None, gen)
        cold_s, previous = timed(subspace.svd_basis, g, side, r, "fast", None, gen)
        warm_s, warm = timed(subspace.svd_basis, g2, side, r, "fast", previous, gen)
        exact2 = subspace.svd_basis(g2, side, r, "exact", None, gen)
        ratio = subspace.captured_energy(g2, warm, side) / subspace.captured_energy(
            g2, exact2, side
        )
        out["energy_ratio_min"] = min(out["energy_ratio_min"], ratio)
        out["exact_s"] += exact_s * count
        out["fast_cold_s"] += cold_s * count
        out["fast_warm_s"] += warm_s * count
        # the warm refresh as the optimizer runs it: same-shape matrices in one batched call
        # (with the cap: a training run's headroom may make the calls smaller)
        batch = galore.refresh_chunk((m, n), g.dtype, True, count, REFRESH_WORKSPACE_BYTES)
        grads = torch.stack([g2] * batch)
        starts = torch.stack([previous] * batch)
        fallbacks = []  # Householder fallbacks: a matrix whose CholeskyQR failed is redone
        real = subspace.orthonormal
        subspace.orthonormal = lambda y, plain=2, real=real, seen=fallbacks: (
            seen.append(1) or real(y, plain)
        )
        try:
            stages = stage_seconds(
                subspace.svd_basis, grads, side, r, "fast", starts, [gen] * batch
            )
        finally:
            subspace.orthonormal = real
        calls = -(-count // batch)
        # stage_seconds calls it three times (warm-up, timed, profiled); per refresh: / 3
        out["warm_fallback_calls"] = out.get("warm_fallback_calls", 0) + len(fallbacks) // 3 * calls
        for family, seconds in stages.items():
            key = f"warm_batched_{family}_s"
            out[key] = out.get(key, 0.0) + seconds * calls
    return out


STAGES = [  # op-name fragments of the finders' parts, first match wins
    ("eigh", ("eigh",)),
    ("cholesky", ("cholesky",)),
    ("triangular_solve", ("solve_triangular", "trsm")),
    ("householder_qr", ("linalg_qr", "geqrf", "orgqr")),
    ("products", ("aten::mm", "aten::bmm", "aten::matmul")),
]


def stage_seconds(fn, *args) -> dict[str, float]:
    """Seconds of one call of `fn` (after a warm-up call) by the finders' parts: each ATen
    op's own time in a profiled call (device time on CUDA, CPU time elsewhere) summed into
    STAGES' families, the rest as "other", and on CUDA the ops' host time as "host_<family>";
    "total" is an unprofiled call's wall time."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    fn(*args)
    sync()
    start = time.perf_counter()
    fn(*args)
    sync()
    out = {"total": time.perf_counter() - start}  # unprofiled: the profiler's start costs seconds
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn(*args)
        sync()
    for event in prof.key_averages():
        name = event.key
        if not name.startswith("aten::"):
            continue
        family = next((label for label, parts in STAGES if any(p in name for p in parts)), "other")
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            out[family] = out.get(family, 0.0) + us / 1e6
        if cuda and event.self_cpu_time_total > 0:  # where the wall time without GPU work goes
            out[f"host_{family}"] = out.get(f"host_{family}", 0.0) + event.self_cpu_time_total / 1e6
    return out


def timed(fn, *args):
    """(seconds of the second call, its result): the first call pays the library loads."""
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def synthetic_gradient(m: int, n: int) -> torch.Tensor:
    """bf16 (m, n) with a power-law spectrum plus noise (the shape of real gradients' spectra)."""
    d = min(m, n)
    u = torch.linalg.qr(torch.randn(m, d, device="cuda"))[0]
    v = torch.linalg.qr(torch.randn(n, d, device="cuda"))[0]
    # s_i = i^-1.5: s_1 / s_144 = 1,700 at d = 2048, the range of a real run's gradients
    # (llama_20m: s_1 / s_144 up to 7,300, median 670); 1 / i (this bench's spectrum before
    # 2026-12-02) never made CholeskyQR fail where every real gradient did
    s = torch.arange(1, d + 1, device="cuda", dtype=torch.float32) ** -1.5
    return ((u * s) @ v.T + 1e-3 * torch.randn(m, n, device="cuda")).bfloat16()


def run_case(case: dict) -> dict:
    if case["provider"] == "refresh":
        return refresh_timing(case)
    run = ours if case["provider"] == "ours" else peer
    if not case.get("peak_breakdown"):
        return run(case)
    from peak_breakdown import breakdown, recording

    with recording():  # Python stacks on every allocation: the case's speed is not a figure
        out = run(case)
    return {**out, "peak_breakdown": breakdown()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", required=True, help="token cache dir (vocab 32000)")
    ap.add_argument("--device-slug")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--only", default="1b")
    ap.add_argument(
        "--methods",
        default="adamw,galore,galore-torch,apollo,apollo-torch",
        help="ours: adamw and projector names; peers: galore-torch, apollo-torch, "
        "apollo-torch-mini; refresh",
    )
    ap.add_argument("--state-dtype", default="bfloat16", help="our moments (the peers': bf16)")
    ap.add_argument("--out-dir", type=Path, help="rows go here as each case ends ($OUT on the GPU)")
    ap.add_argument("--call", help="label of this call, in every row")
    ap.add_argument(
        "--peak-breakdown",
        action="store_true",
        help="record the allocator's trace and add what is live at the peak, by allocating "
        "line (benchmarks/peak_breakdown.py); the recording slows the run: speeds not figures",
    )
    ap.add_argument(
        "--dense-tok-s",
        type=float,
        help="our dense AdamW's tok/s from a call just before on the same machine (the ratio's "
        "base when this call runs no adamw case; the rows say where it came from)",
    )
    args = ap.parse_args()
    shapes = {"350m": ("llama_350m", 8), "1b": ("llama_1b", 32)}
    cases = []
    for key in args.only.split(","):
        model, batch = shapes[key]
        for method in args.methods.split(","):
            provider, name = PEERS.get(method, ("ours", method))
            if method == "refresh":
                provider, name = "refresh", "galore"
            cases.append(
                {
                    "provider": provider,
                    "method": name,
                    "rank": RANKS.get(name),
                    "model": model,
                    "batch_size": batch,
                    "steps": args.steps,
                    "cache": args.cache,
                    "state_dtype": args.state_dtype,
                    "peak_breakdown": args.peak_breakdown,
                }
            )
    dense: dict[str, float] = {}
    written: list[Path] = []

    def record(case: dict, res: dict) -> None:
        """One row as soon as its case ends (a call cut short keeps the rows it ran)."""
        if "error" in res:
            print(f"{case['model']} {case['provider']} {case['method']}: FAILED {res['error']}")
            return
        if case["method"] == "adamw" and "tok_s" in res:
            dense[case["model"]] = res["tok_s"]
        base = dense.get(case["model"], args.dense_tok_s)
        settings = {
            "rank": case["rank"],
            "update_gap": GAP,
            "dtype": "bfloat16",
            "state_dtype": case["state_dtype"] if case["provider"] == "ours" else "bfloat16",
            "compile": True,
            "clip_grad_norm": 1.0,
            "cap_gib": CAP_GIB,
            "per_layer": False,
            "steps": case["steps"],
            "svd": "fast" if case["provider"] == "ours" and case["method"] != "adamw" else None,
            "call": args.call,
            "peak_breakdown": args.peak_breakdown,  # a traced run: its speeds are not figures
        }
        if case["model"] not in dense and base is not None:
            settings["dense_from"] = f"--dense-tok-s {base:.0f} (an earlier call)"
        ratio = res["tok_s"] / base if "tok_s" in res and base else None
        row = result_line(
            bench="optim",
            case={
                "model": case["model"],
                "batch_size": case["batch_size"],
                "seq_len": 256,
                "cap_gib": CAP_GIB,
            },
            provider=case["provider"],
            method=case["method"],
            settings=settings,
            metrics={**res, "vs_our_dense_adamw": ratio},
        )
        kwargs = {"out_dir": args.out_dir} if args.out_dir else {}
        written.append(write_results("optim", args.device_slug, [row], **kwargs))
        print(
            f"{case['model']} {case['provider']:<13} {case['method']:<12} "
            + " ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()
            )
            + (f" | x dense {ratio:.3f}" if ratio else ""),
            flush=True,
        )

    run_cases(Path(__file__).resolve(), cases, timeout_s=1200, on_result=record)
    print(f"results: {written[-1] if written else 'no rows'}")


if __name__ == "__main__":
    if "--case" in sys.argv:
        case_main(run_case)
    else:
        main()
