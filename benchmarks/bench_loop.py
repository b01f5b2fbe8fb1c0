"""Loop overhead and the compiled dense 1B step, on the GPU, each case in its own process.

Cases (DESIGN.md, Benchmarks; the Foundation issue):
  * llama_60m and llama_350m, seq 256, batch 8: our `train()` vs a bare hand-written loop of the
    same HF model, dtypes (bf16 weights and gradients), fused AdamW, clipping and schedule,
    reading the loss only at logging steps. Target: ours >= 0.97x the bare loop's tokens/s.
  * llama_1b, seq 256, batch 32, torch.compile, under the 24 GiB cap: ours and the bare loop;
    MFU = 6 x all parameters x tokens/s / the bf16 matmul rate measured in the same call.
Both sides read the same token cache (`--cache`, built by `lowrank-train` on any machine).

    python benchmarks/bench_loop.py [--cache DIR] [--steps 300] [--only 60m,350m,1b] [--repeat N] [--in-process]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import case_main, quantiles, result_line, run_cases, write_results  # noqa: E402

LOG_EVERY = 10
CAP_GIB = 24.0


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """Median bf16 n x n x n matmul rate on random data (the MFU denominator)."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / quantiles(times)["median"] / 1e12


def ours(case: dict) -> dict:
    from lowrank_train.resolve import load_run
    from lowrank_train.trainer import train

    out_dir = tempfile.mkdtemp(prefix="bench_loop_")
    overrides = [
        f"model.preset={case['model']}",
        f"model.seq_len={case['seq_len']}",
        f"train.batch_size={case['batch_size']}",
        f"train.steps={case['steps']}",
        f"train.compile={str(case['compile']).lower()}",
        f"data.cache={case['cache']}",
        f"memory.cap_gib={case['cap_gib']}",
        f"logging.every={LOG_EVERY}",
        "eval.max_tokens=2048",
        "eval.every=0",  # the bare loop neither evaluates nor saves mid-run: neither do we here
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        "model.autocast=auto",
        f"out_dir={out_dir}",
        "name=ours",
        "train.lr=1e-4",
    ]
    cfg, _ = load_run(
        Path(__file__).resolve().parents[1] / "configs" / "runs" / "quickstart.yaml", overrides
    )
    result = train(cfg)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [m for m in lines if "tok_s" in m][1:]  # the first window holds warm-up and compile
    params = sum(p.numel() for p in result.model.parameters())
    return {
        "tok_s": quantiles([m["tok_s"] for m in windows]),
        "peak_gib": max(m["peak_gib"] for m in windows),
        "peak_alloc_gib": max(m["peak_alloc_gib"] for m in windows),
        "params": params,
    }


def fused_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)


def bare(case: dict, make_optimizer=fused_adamw) -> dict:
    """What a user writes by hand: the HF model in bf16, an optimizer (fused AdamW), clip,
    LambdaLR, loss read every 10. Returns tok/s per 10-step window too (`windows_s`)."""
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    from lowrank_train.config import ModelConfig
    from lowrank_train.memory import MemoryMonitor
    from lowrank_train.models import llama_config
    from lowrank_train.optim.schedule import lr_factor

    device = torch.device("cuda", 0)
    memory = MemoryMonitor(device, case["cap_gib"])
    tokens = np.load(Path(case["cache"]) / "train.npy", mmap_mode="r")
    vocab = Tokenizer.from_file(str(Path(case["cache"]) / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(0)
    hf_cfg = llama_config(ModelConfig(preset=case["model"], seq_len=case["seq_len"]), vocab)
    model = LlamaForCausalLM(hf_cfg).to(device=device, dtype=torch.bfloat16)
    opt = make_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, partial(lr_factor, total=case["steps"], warmup=case["steps"] // 10, min_ratio=0.1)
    )

    def loss_of(inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    loss_fn = (
        torch.compile(loss_of) if case["compile"] else loss_of
    )  # the loss inside the graph, as ours
    block = case["seq_len"] + 1
    n_blocks = len(tokens) // block
    rng = np.random.default_rng(0)
    samples, windows_s = [], []
    loss_sum, t0 = torch.zeros((), device=device), time.perf_counter()
    for step in range(1, case["steps"] + 1):
        idx = rng.integers(0, n_blocks, case["batch_size"])
        batch = torch.from_numpy(
            np.stack([tokens[i * block : (i + 1) * block] for i in idx]).astype(np.int64)
        )
        batch = batch.to(device, non_blocking=True)
        loss = loss_fn(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss_sum += loss.detach()
        if step % LOG_EVERY == 0:
            assert math.isfinite(loss_sum.item())
            now = time.perf_counter()
            samples.append(case["batch_size"] * case["seq_len"] * LOG_EVERY / (now - t0))
            windows_s.append(now - t0)
            loss_sum.zero_()
            t0 = now
    peaks = memory.peaks()
    return {
        "tok_s": quantiles(samples[1:]),
        "peak_gib": peaks["peak_gib"],
        "peak_alloc_gib": peaks["peak_alloc_gib"],
        "params": sum(p.numel() for p in model.parameters()),
        "windows_s": windows_s,
    }


def run_case(case: dict) -> dict:
    if case["provider"] == "matmul":
        return {"bf16_tflops": matmul_tflops()}
    if case["provider"] == "sequence":
        runs = [run_in_turn(c) for c in case["runs"]]
        for run in runs[1:]:
            # the CUDA context is read as the device memory in use at start, which after the
            # first run includes what that run left cached: only the first peak is clean
            run["peak_gib"] = None
        return {"runs": runs}
    return ours(case) if case["provider"] == "ours" else bare(case)


def run_in_turn(case: dict) -> dict:
    """One run of a same-process sequence: the previous run's memory is freed and the peak
    counters reset first, so each run's peak_alloc_gib is its own."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return run_case(case)


def in_one_process(cases: list[dict]) -> list[dict]:
    """Each model's runs as one child case: alternation at the scale of one run, with the same
    process, thread placement and allocator for both sides (launch-bound cases swing by 30%
    between processes on a virtualised host)."""
    models = list(dict.fromkeys(c["model"] for c in cases))
    return [{"provider": "sequence", "runs": [c for c in cases if c["model"] == m]} for m in models]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cache",
        help="token cache dir (train.npy, val.npy, tokenizer.json); default: build the embedded "
        "corpus with a 32000-token BPE here (needs `datasets`)",
    )
    ap.add_argument(
        "--device-slug", help="results file device word (default: from the device name)"
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", default="60m,350m,1b")
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="alternate ours and the bare loop this many times (launch-bound cases are noisy)",
    )
    ap.add_argument(
        "--in-process",
        action="store_true",
        help="run each model's alternating runs in one child process instead of one each",
    )
    args = ap.parse_args()
    if args.cache is None:
        from lowrank_train.config import DataConfig
        from lowrank_train.data import prepare_data

        args.cache = str(prepare_data(DataConfig(vocab_size=32000), "llama_60m").cache_dir)
    shapes = {
        "60m": ("llama_60m", 8, False),
        "350m": ("llama_350m", 8, False),
        "1b": ("llama_1b", 32, True),
    }
    cases = [{"provider": "matmul"}]
    for key in args.only.split(","):
        model, batch, compile_ = shapes[key]
        for repeat in range(args.repeat):
            # alternate which side runs first, so drift over the call favours neither
            for provider in ("ours", "torch")[:: 1 if repeat % 2 == 0 else -1]:
                cases.append(
                    {
                        "provider": provider,
                        "model": model,
                        "batch_size": batch,
                        "seq_len": 256,
                        "steps": args.steps,
                        "compile": compile_,
                        "cap_gib": CAP_GIB,
                        "cache": args.cache,
                        "repeat": repeat,
                    }
                )
    if args.in_process:
        groups = in_one_process(cases[1:])
        grouped = run_cases(Path(__file__).resolve(), [cases[0], *groups])
        results = [grouped[0]]
        for group, res in zip(groups, grouped[1:], strict=True):
            runs = res.get("runs") or [res] * len(group["runs"])  # an error stands for each run
            results.extend(runs)
    else:
        results = run_cases(Path(__file__).resolve(), cases)
    tflops = results[0].get("bf16_tflops")
    rows, table = [], []
    for case, res in zip(cases[1:], results[1:], strict=True):
        if "error" in res:
            table.append(f"{case['model']:<11} {case['provider']:<6} FAILED {res['error'][:200]}")
            continue
        tok_s = res["tok_s"]["median"]
        mfu = 6 * res["params"] * tok_s / (tflops * 1e12) if tflops else None
        settings = {
            "dtype": "bfloat16",
            "optimizer": "adamw (fused)",
            "compile": case["compile"],
            "gradient_checkpointing": False,
            "clip_grad_norm": 1.0,
            "cap_gib": CAP_GIB,
            "log_every": LOG_EVERY,
            "steps": case["steps"],
            "warmup_windows_dropped": 1,
            "repeat": case["repeat"],
            "in_process": args.in_process,
        }
        rows.append(
            result_line(
                bench="loop",
                case={k: case[k] for k in ("model", "batch_size", "seq_len", "cap_gib")},
                provider="ours" if case["provider"] == "ours" else "torch",
                method="adamw",
                settings=settings,
                metrics={
                    "tok_s": tok_s,
                    "tok_s_p20": res["tok_s"]["p20"],
                    "tok_s_p80": res["tok_s"]["p80"],
                    "peak_gib": res["peak_gib"],
                    "peak_alloc_gib": res["peak_alloc_gib"],
                    "params": res["params"],
                    "mfu": mfu,
                    "bf16_tflops": tflops,
                },
            )
        )
        table.append(
            f"{case['model']:<11} {case['provider']:<6} {tok_s:>10,.0f} tok/s  peak "
            + (f"{res['peak_gib']:.2f} GiB" if res["peak_gib"] is not None else "n/a")
            + (f"  MFU {mfu:.1%}" if mfu else "")
        )
    path = write_results("loop", args.device_slug, rows)
    print(f"bf16 matmul: {tflops:.0f} TFLOP/s" if tflops else "bf16 matmul: failed")
    print("\n".join(table))
    for model in sorted({c["model"] for c in cases[1:]}):
        runs = {
            p: {
                r["settings"]["repeat"]: r["metrics"]["tok_s"]
                for r in rows
                if r["case"]["model"] == model and r["provider"] == p
            }
            for p in ("ours", "torch")
        }
        if all(runs.values()):
            ratio = (
                quantiles(list(runs["ours"].values()))["median"]
                / quantiles(list(runs["torch"].values()))["median"]
            )
            # each pair ran back to back, so its ratio is free of the drift between pairs
            paired = [
                runs["ours"][r] / runs["torch"][r] for r in runs["ours"] if r in runs["torch"]
            ]
            print(
                f"{model}: ours / bare = {ratio:.3f} (medians over {len(runs['ours'])} runs each); "
                f"per pair: median {quantiles(paired)['median']:.3f}, "
                f"min {min(paired):.3f}, max {max(paired):.3f}"
            )
    print(f"results: {path}")


if __name__ == "__main__":
    if "--case" in sys.argv:
        case_main(run_case)
    else:
        main()
