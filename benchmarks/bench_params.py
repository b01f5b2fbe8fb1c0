"""Weight parameterizations against our dense AdamW of the same case (issue 17's benchmark;
DESIGN.md's JSON lines, bench "params"): llama_350m (micro-batch 8) and llama_1b (32), seq 256,
torch.compile, under the 24 GiB cap, each case in its own process through `train()`.

Methods: dense (AdamW), lowrank, sltrain, lost, loqt, int8 at their configs/runs/<name>_<size>.yaml
(the paper's rank and hyperparameters; the method fragment where no run file exists), and the
compositions sltrain + galore (GaLore's fragment, rank 128, over SLTrain's factors) and
int8 + qgalore. The same clip (1.0) for all. A method not registered yet is a skip row with
the reason. Each row: peak_gib, peak_alloc_gib, steady and amortized tok/s, the planner's
planned_gib, and the ratios to the dense row of its model (`*_vs_dense`), plus the memory the
planner says it saves beside the measured saving.

    python benchmarks/bench_params.py --cache DIR --out-dir $OUT --call call1 [--sizes 350m,1b]
        [--methods dense,lowrank,...] [--steps 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import training  # noqa: E402
from harness import case_main  # noqa: E402
from training import fmt, markdown_table, note  # noqa: E402

METHODS = [
    "adamw",
    "lowrank",
    "sltrain",
    "lost",
    "loqt",
    "int8",
    "int8+deq",
    "sltrain+galore",
    "int8+qgalore",
]
RATIOS = ("tok_s", "tok_s_amortized", "peak_gib", "peak_alloc_gib")


def ratio(row: dict, key: str) -> str:
    return fmt(row["metrics"].get(f"{key}_vs_dense"), ".3f")


COLUMNS = [
    ("model", lambda r: r["case"]["model"]),
    ("method", lambda r: "dense (adamw)" if r["method"] == "adamw" else r["method"]),
    ("rank", lambda r: fmt(r["settings"].get("weights_options", {}).get("rank"), "d")),
    ("tok/s", lambda r: fmt(r["metrics"].get("tok_s"))),
    ("x dense", lambda r: ratio(r, "tok_s")),
    ("amortized tok/s", lambda r: fmt(r["metrics"].get("tok_s_amortized"))),
    ("peak_gib", lambda r: fmt(r["metrics"].get("peak_gib"), ".2f")),
    ("x dense", lambda r: ratio(r, "peak_gib")),
    ("peak_alloc_gib", lambda r: fmt(r["metrics"].get("peak_alloc_gib"), ".2f")),
    ("x dense", lambda r: ratio(r, "peak_alloc_gib")),
    (
        "saved GiB (planned)",
        lambda r: (
            f"{fmt(r['metrics'].get('peak_saving_gib'), '.2f')} "
            f"({fmt(r['metrics'].get('planned_saving_gib'), '.2f')})"
        ),
    ),
    ("call", lambda r: r["settings"].get("call", "-")),
    ("note", note),
]


def readme_table(rows: list[dict]) -> str:
    """The README's table of the parameterization benchmark from its rows."""
    return markdown_table(rows, COLUMNS)


def against_dense() -> Callable[[dict, dict], dict]:
    """A row hook: ratios to the dense row of the same model in this call (run first)."""
    dense: dict[str, dict] = {}

    def extra(case: dict, metrics: dict) -> dict:
        if case["method"] == "adamw":
            dense[case["size"]] = metrics
        base = dense.get(case["size"])
        if base is None or "tok_s" not in metrics:
            return {}
        out = {
            f"{k}_vs_dense": metrics[k] / base[k]
            for k in RATIOS
            if metrics.get(k) is not None and base.get(k)
        }
        out["dense_from"] = "this call"
        out["peak_saving_gib"] = base["peak_gib"] - metrics["peak_gib"]
        if base.get("planned_gib") is not None and metrics.get("planned_gib") is not None:
            out["planned_saving_gib"] = base["planned_gib"] - metrics["planned_gib"]
        return out

    return extra


def run_case(case: dict) -> dict:
    return training.our_run(case)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    training.add_common_arguments(ap, "350m,1b", "steps per case (0: the size's, 100)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list; adamw = dense")
    args = ap.parse_args()
    args.grad_accum = "1"
    names = args.methods.split(",")
    names = ["adamw"] + [n for n in names if n != "adamw"]  # the ratios need dense first
    training.bench_main(
        args,
        Path(__file__).resolve(),
        lambda: training.build_cases(
            args, "params", names, Path(tempfile.mkdtemp(prefix="bench_params_"))
        ),
        readme_table,
        "params.png",
        "parameterizations (bench_params.py)",
        extra_metrics=against_dense(),
    )


if __name__ == "__main__":
    if "--case" in sys.argv:
        case_main(run_case)
    else:
        main()
