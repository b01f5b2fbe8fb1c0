"""Exact against fast refresh on the same run (issue 15, part 3: validation loss within 1%).

One run file is trained twice, `optim.projector.svd=exact` and `=fast`, with the same seed,
data and schedule, each in its own process through the CLI; the final validation losses and
their ratio are written as JSON lines (bench "quality", one row per finder, the ratio on the
fast row).

    python benchmarks/bench_refresh_quality.py --config configs/runs/galore_60m.yaml --steps 2000
    python benchmarks/bench_refresh_quality.py --config configs/runs/quickstart.yaml --steps 200 \
        --set optim.projector.name=galore optim.projector.rank=128 optim.projector.update_gap=50
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def overrides(name: str, out_dir: Path, steps: int, extra: list[str], finder: str) -> list[str]:
    """The run file's overrides: `steps` steps (a run file may budget tokens instead), the
    end-of-run validation only, no checkpoints, then the user's, then the finder."""
    return [
        f"name={name}",
        f"out_dir={out_dir}",
        "train.tokens=0",
        f"train.steps={steps}",
        "eval.every=0",
        "checkpoint.every=0",
        "checkpoint.at_end=false",
        *extra,
        f"optim.projector.svd={finder}",
    ]


def run(config: Path, finder: str, steps: int, extra: list[str], out_dir: Path) -> dict:
    """Train once with `svd=finder`; the summary and the resolved config (a run already
    finished keeps its result, so a killed call resumes where it stopped)."""
    name = f"{config.stem}_{finder}"
    cmd = [
        sys.executable,
        "-m",
        "lowrank_train.cli",
        "train",
        str(config),
        "--samples",
        "0",
        *overrides(name, out_dir, steps, extra, finder),
    ]
    done = out_dir / name / "summary.json"
    if not done.exists():
        subprocess.run(cmd, check=True)
    resolved = yaml.safe_load((done.parent / "config.yaml").read_text())
    return {"summary": json.loads(done.read_text()), "config": resolved, "command": cmd[2:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "refresh_quality")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device-slug")
    args = ap.parse_args()
    results = {
        f: run(args.config, f, args.steps, args.set, args.runs_dir) for f in ("exact", "fast")
    }
    exact_loss = results["exact"]["summary"]["final_val_loss"]
    rows = []
    for finder, got in results.items():
        summary, cfg = got["summary"], got["config"]
        metrics = {
            "val_loss": summary["final_val_loss"],
            "tokens": summary["tokens"],
            "tok_s": summary["tok_s"],
        }
        if finder == "fast":
            metrics["val_loss_over_exact"] = round(summary["final_val_loss"] / exact_loss, 5)
        print(f"{finder}: val_loss {summary['final_val_loss']:.4f}", flush=True)
        projector = cfg["optim"]["projector"]
        rows.append(
            result_line(
                bench="quality",
                case={"model": cfg["model"]["preset"], "seq_len": cfg["model"]["seq_len"]},
                provider="ours",
                method=f"{projector['name']} svd={finder}",
                settings={
                    "rank": projector.get("rank"),
                    "update_gap": projector.get("update_gap"),
                    "steps": args.steps,
                    "batch_size": cfg["train"]["batch_size"],
                    "lr": cfg["train"]["lr"],
                    "seed": cfg["train"]["seed"],
                    "eval_max_tokens": cfg["eval"]["max_tokens"],
                    "command": " ".join(got["command"]),
                },
                metrics=metrics,
            )
        )
    print(f"fast / exact validation loss: {rows[1]['metrics']['val_loss_over_exact']:.4f}")
    print(f"rows: {write_results('quality', args.device_slug, rows, args.out_dir)}")


if __name__ == "__main__":
    main()
