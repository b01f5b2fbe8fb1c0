"""The current planner against measured rows: each of our rows re-planned from its own
config (the size's base, the method's recipe files, the row's recorded overrides) for CUDA,
beside the `peak_gib` and `peak_alloc_gib` it measured (issue 18's target: within 10%).

    python benchmarks/replan.py benchmarks/results/train_h200_*.jsonl [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line  # noqa: E402
from training import GIB, OURS, SIZES, our_run_file  # noqa: E402

from lowrank_train.planner import plan_run  # noqa: E402
from lowrank_train.resolve import load_run  # noqa: E402

VOCAB = 32000  # the benchmarks' token cache
PRESET_SIZE = {s.preset: name for name, s in SIZES.items() if s.preset}


# int8's weights.matmul defaulted to fused in every row up to this date (the default became
# dequantize after the last bench call of 2026-12-04)
INT8_FUSED_UNTIL = "2026-12-04"


def replan(row: dict, work: Path) -> dict | None:
    """{planned, measured, ratio, phase, activations} of one measured row of ours, else None."""
    m, settings = row.get("metrics", {}), row.get("settings", {})
    size = PRESET_SIZE.get(row.get("case", {}).get("model"))
    if row.get("provider") != "ours" or row["method"] not in OURS or "peak_gib" not in m:
        return None
    if size is None or "overrides" not in settings:
        return None
    case = {"id": f"{size}:{row['method']}:replan", "size": size}
    path = our_run_file(row["method"], case, work)
    overrides = list(settings["overrides"])
    # the method's keys as the row ran them: the recipe file may have changed since (the
    # lowrank 350m row ran rank 128, today's recipe says 256)
    options = settings.get("weights_options", {}).items()
    overrides += [f"weights.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in options]
    if "per_layer" in settings:  # rows from before bench_train set it both ways
        overrides.append(f"optim.per_layer={str(settings['per_layer']).lower()}")
    if "embeddings_8bit" not in settings:  # rows from before the key: 32-bit embedding moments
        overrides.append("optim.embeddings_8bit=false")
    cfg, _ = load_run(path, overrides)
    ran_matmul = any(o.startswith("weights.matmul=") for o in overrides)
    if cfg.weights.name == "int8" and not ran_matmul and row.get("date", "") <= INT8_FUSED_UNTIL:
        cfg, _ = load_run(path, [*overrides, "weights.matmul=fused"])  # that day's default
    plan = plan_run(cfg, "cuda", VOCAB, suggest=False)
    return {
        "model": row["case"]["model"],
        "method": row["method"],
        "call": settings.get("call"),
        "planned_gib": round(plan.total_gib, 3),
        "measured_peak_gib": round(m["peak_gib"], 3),
        "planned_over_measured": round(plan.total_gib / m["peak_gib"], 3),
        "peak_phase": plan.peak_phase,
        "activations": plan.activation_mode,
        "planned_live_gib": round((plan.total_bytes - plan.slack_bytes) / GIB, 3),
        "measured_alloc_gib": round(m["peak_alloc_gib"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", type=Path)
    ap.add_argument("--json", action="store_true", help="one JSON line per row")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = [
            r
            for f in args.rows
            for line in f.read_text().splitlines()
            if line.strip() and (r := replan(json.loads(line), Path(tmp)))
        ]
    if args.json:  # DESIGN.md's rows, bench "replan"
        for r in out:
            row = result_line(
                bench="replan",
                case={"model": r["model"]},
                provider="ours",
                method=r["method"],
                settings={
                    "call": r["call"],
                    "planned_for": "cuda",
                    "activations": r["activations"],
                },
                metrics={k: r[k] for k in r if k not in ("model", "method", "call", "activations")},
            )
            print(json.dumps(row))
        return
    print(
        "| model | method | call | planned GiB | measured peak_gib | planned / measured | activations |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(
            f"| {r['model']} | {r['method']} | {r['call']} | {r['planned_gib']:.2f} | "
            f"{r['measured_peak_gib']:.2f} | {r['planned_over_measured']:.3f} | {r['activations']} |"
        )


if __name__ == "__main__":
    main()
