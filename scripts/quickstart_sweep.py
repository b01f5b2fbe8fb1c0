"""The short sweep behind configs/runs/quickstart.yaml: lr x batch x precision on llama_20m, CPU.

Each candidate trains the quickstart for a fixed short schedule and reports validation loss and
tokens/s; results go to benchmarks/results/quality_<device>_<date>.jsonl (bench "quality").
    python scripts/quickstart_sweep.py [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from harness import result_line, write_results  # noqa: E402

CANDIDATES = [  # (lr, batch_size); each runs at the precision --autocast names
    (1e-3, 8),
    (2e-3, 8),
    (3e-3, 8),
    (4e-3, 8),
    (2e-3, 4),
    (2e-3, 16),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=150,
        help="steps of the batch-8 candidates (batch 16 gets half)",
    )
    ap.add_argument(
        "--device-slug", help="results file device word (default: from the device name)"
    )
    ap.add_argument("--out-dir", default="runs/sweep")
    ap.add_argument(
        "--autocast",
        choices=["off", "bfloat16"],
        default="off",
        help="precision of every candidate: off (fp32, the path of a CPU without native bf16) "
        "or bfloat16 (only where the CPU has native bf16 matmul)",
    )
    ap.add_argument(
        "--candidates", default="", help="comma-separated lr:batch pairs (default: the grid above)"
    )
    args = ap.parse_args()
    autocast = args.autocast
    grid = CANDIDATES
    if args.candidates:
        grid = [(float(c.split(":")[0]), int(c.split(":")[1])) for c in args.candidates.split(",")]
    rows = []
    for lr, batch in grid:
        steps = args.steps * 8 // batch  # the same tokens for every candidate
        name = f"lr{lr:g}_b{batch}_{autocast}"
        cmd = [
            sys.executable,
            "-m",
            "lowrank_train.cli",
            "train",
            "configs/runs/quickstart.yaml",
            "--samples",
            "0",
            f"name={name}",
            f"out_dir={args.out_dir}",
            f"train.steps={steps}",
            f"train.lr={lr}",
            f"train.batch_size={batch}",
            f"model.autocast={autocast}",
            "eval.every=0",
            "checkpoint.every=0",
            "logging.every=25",
        ]
        done = Path(args.out_dir) / name / "summary.json"
        if not done.exists():  # a candidate already run keeps its result: the sweep resumes
            subprocess.run(cmd, check=True)
        summary = json.loads(done.read_text())
        resolved = yaml.safe_load((done.parent / "config.yaml").read_text())
        print(
            f"{name}: val_loss {summary['final_val_loss']:.4f} tok/s {summary['tok_s']:.0f}",
            flush=True,
        )
        rows.append(
            result_line(
                bench="quality",
                case={
                    "model": "llama_20m",
                    "seq_len": 256,
                    "tokens": summary["tokens"],
                    "corpus": "embedded",
                    "tokenizer": "bpe8192",
                },
                provider="ours",
                method="adamw",
                settings={
                    "lr": lr,
                    "batch_size": batch,
                    "autocast": autocast,
                    "dtype": "float32",
                    "steps": steps,
                    "warmup_ratio": 0.1,
                    "eval_max_tokens": resolved["eval"]["max_tokens"],
                    "command": " ".join(cmd[2:]),
                },
                metrics={
                    "val_loss": summary["final_val_loss"],
                    "val_ppl": summary["final_val_ppl"],
                    "tokens": summary["tokens"],
                    "tok_s": summary["tok_s"],
                    "peak_gib": summary["peak_gib"],
                },
            )
        )
    print(write_results("quality", args.device_slug, rows))


if __name__ == "__main__":
    main()
