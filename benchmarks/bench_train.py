"""The 24 GB benchmark (issue 18, part 4; DESIGN.md's JSON lines, bench "train"): size x method,
each case in its own process under the 24 GiB cap, seq 256.

Sizes (benchmarks/training.py SIZES): 350m and 1b (micro-batch 8 and 32, no checkpointing), 7b
and 13b (micro-batch 4, gradient checkpointing); `--grad-accum 1,2,8` repeats each. Ours run
through `train()` with configs/runs/<method>_<size>.yaml (13b: the 7b recipes); peers (torch
AdamW, bitsandbytes AdamW8bit, galore-torch GaLoreAdamW / 8-bit / 8-bit per-layer, apollo-torch
APOLLO / APOLLO-Mini / per-layer) step our dense model of the same case in a hand-written loop,
per-layer ones from post-accumulate-grad hooks, one optimizer per parameter, uncompiled (their
recipe; a whole-model compile would defer the hooks to the end of backward). Per row: peak_gib,
peak_alloc_gib, steady and amortized tok/s, step-0 time, the planner's planned_gib, every flag.

    python benchmarks/bench_train.py --cache DIR --sizes 7b --out-dir $OUT --call call1
        [--methods a,b] [--only 7b:int8] [--grad-accum 1,2,8] [--steps N] [--run-unfit]
    python benchmarks/bench_train.py --from-rows benchmarks/results/train_h200_*.jsonl
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # noqa: E402
from harness import case_main  # noqa: E402
from training import fmt, markdown_table, note  # noqa: E402

# What each size runs when --methods is not given: at 7B and 13B only what can fit 24 GiB
# (the bf16 weights and gradients of whole-model AdamW alone are 25 GiB at 7B).
MATRIX = {
    "tiny": ["adamw", "galore", "torch-adamw"],
    "350m": [
        "adamw",
        "adamw8bit",
        "galore",
        "galore+8bit+pl",
        "apollo",
        "apollo_mini",
        "int8+qgalore",
        "int8+apollo_mini+pl",
        "torch-adamw",
        "bnb-adamw8bit",
        "galore-torch",
        "galore-torch-8bit",
        "galore-torch-8bit-pl",
        "apollo-torch",
        "apollo-torch-mini",
        "apollo-torch-mini-pl",
    ],
    "1b": [
        "adamw",
        "adamw8bit",
        "adamw8bit+pl",
        "galore",
        "galore+8bit+pl",
        "apollo",
        "apollo+pl",
        "apollo_mini",
        "apollo_mini+pl",
        "int8+qgalore",
        "int8+qgalore+pl",
        "int8+apollo_mini+pl",
        "torch-adamw",
        "bnb-adamw8bit",
        "galore-torch",
        "galore-torch-8bit",
        "galore-torch-8bit-pl",
        "apollo-torch",
        "apollo-torch-pl",
        "apollo-torch-mini",
        "apollo-torch-mini-pl",
    ],
    "7b": [
        "int8+apollo_mini+pl",
        "int8+apollo+pl",
        "int8+qgalore+pl",
        "galore+8bit+pl",
        "apollo_mini+pl",
        "adamw8bit+pl",
        "adamw",
        "lowrank",
        "sltrain",
        "loqt",
        "galore-torch-8bit-pl",
        "apollo-torch-mini-pl",
        "apollo-torch-pl",
    ],
    "13b": ["int8+apollo_mini+pl", "int8+qgalore+pl", "loqt+pl"],
}

COLUMNS = [
    ("model", lambda r: r["case"]["model"]),
    ("provider", lambda r: r["provider"]),
    ("method", lambda r: r["method"]),
    (
        "batch x accum",
        lambda r: (
            f"{r['settings'].get('batch_size', '-')} x {r['settings'].get('grad_accum', '-')}"
        ),
    ),
    ("ckpt", lambda r: "yes" if r["settings"].get("gradient_checkpointing") else "no"),
    ("per-layer", lambda r: "yes" if r["settings"].get("per_layer") else "no"),
    ("compile", lambda r: "yes" if r["settings"].get("compile") else "no"),
    ("clip", lambda r: fmt(r["settings"].get("clip_grad_norm"), "g")),
    ("peak_gib", lambda r: fmt(r["metrics"].get("peak_gib"), ".2f")),
    ("planned_gib", lambda r: fmt(r["metrics"].get("planned_gib"), ".2f")),
    ("peak_alloc_gib", lambda r: fmt(r["metrics"].get("peak_alloc_gib"), ".2f")),
    ("tok/s", lambda r: fmt(r["metrics"].get("tok_s"))),
    ("amortized tok/s", lambda r: fmt(r["metrics"].get("tok_s_amortized"))),
    ("step-0 s", lambda r: fmt(r["metrics"].get("step0_s"), ".1f")),
    ("call", lambda r: r["settings"].get("call", "-")),
    ("note", note),
]


def readme_table(rows: list[dict]) -> str:
    """The README's table of the 24 GB benchmark from its rows."""
    return markdown_table(rows, COLUMNS)


def run_case(case: dict) -> dict:
    return training.our_run(case) if case["provider"] == "ours" else training.peer_run(case)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training.add_common_arguments(ap, "350m,1b,7b,13b", "steps per case (0: the size's)")
    ap.add_argument("--methods", default="", help="comma list (default: MATRIX of each size)")
    ap.add_argument("--grad-accum", default="1", help="comma list of grad_accum values")
    args = ap.parse_args()

    def cases() -> list[dict]:
        work = Path(tempfile.mkdtemp(prefix="bench_train_"))
        out = []
        for size in args.sizes.split(","):
            names = args.methods.split(",") if args.methods else MATRIX[size]
            out += training.build_cases(
                argparse.Namespace(**{**vars(args), "sizes": size}), "train", names, work
            )
        return out

    training.bench_main(
        args,
        Path(__file__).resolve(),
        cases,
        readme_table,
        "train.png",
        "24 GB benchmark (bench_train.py)",
    )


if __name__ == "__main__":
    if "--case" in sys.argv:
        case_main(run_case)
    else:
        main()
