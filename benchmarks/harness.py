"""The one benchmark harness: each case in its own process, warm-up excluded, medians reported,
one JSON line per measurement in DESIGN.md's schema (benchmarks/results/<bench>_<device>_<date>.jsonl).

A bench file defines cases and providers only; it calls `run_cases` (parent) and `case_main`
(child) from here.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def quantiles(samples: list[float]) -> dict[str, float]:
    """median with p20 and p80 (the spread a reader needs to judge a ratio)."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return {"median": statistics.median(ordered), "p20": pick(0.2), "p80": pick(0.8)}


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    ):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or "cpu"


def device_slug(name: str | None = None) -> str:
    """The results file's device word: h100, h200, a100, rtx4090 for a GPU; cpu otherwise."""
    name = name or device_name()
    if "cores)" in name:
        return "cpu"
    words = re.sub(r"\b(NVIDIA|GeForce|AMD|Radeon)\b", "", name).replace("-", " ").split()
    if not words:
        return "gpu"
    first = words[0].lower()
    return first + words[1].lower() if first.isalpha() and len(words) > 1 else first


def versions() -> dict[str, str]:
    out = {}
    for dist in (
        "torch",
        "triton",
        "transformers",
        "bitsandbytes",
        "galore-torch",
        "lowrank-train",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def commit() -> str:
    if "LOWRANK_COMMIT" in os.environ:
        return os.environ["LOWRANK_COMMIT"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def result_line(
    *, bench: str, case: dict, provider: str, method: str, settings: dict, metrics: dict
) -> dict:
    return {
        "bench": bench,
        "case": case,
        "provider": provider,
        "method": method,
        "settings": settings,
        "metrics": metrics,
        "device": device_name(),
        "versions": versions(),
        "commit": commit(),
        "date": datetime.date.today().isoformat(),
    }


def write_results(bench: str, slug: str | None, rows: list[dict], out_dir: Path = RESULTS) -> Path:
    """Append rows to <bench>_<slug>_<date>.jsonl; slug None: this machine's device_slug()."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}_{slug or device_slug()}_{datetime.date.today().isoformat()}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def run_cases(
    script: Path,
    cases: list[dict],
    timeout_s: int = 900,
    log: Path | None = None,
    on_result: Callable[[dict, dict], None] | None = None,
) -> list[dict]:
    """Run each case in a fresh process (`script --case JSON`), so allocator caps and compile
    caches of one case never touch another. A failed or timed-out case yields {"case": ...,
    "error": ...}. With `log`, each child's stderr is appended to it as the child writes (a
    killed call keeps what ran); `on_result(case, result)` runs as each case ends."""
    out = []
    for case in cases:
        result = _run_one(script, case, timeout_s, log)
        print(f"case {case}: {json.dumps(result)[:300]}", file=sys.stderr, flush=True)
        out.append(result)
        if on_result is not None:
            on_result(case, result)
    return out


def _run_one(script: Path, case: dict, timeout_s: int, log: Path | None) -> dict:
    cmd = [sys.executable, str(script), "--case", json.dumps(case)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        if log is None:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
            stderr = proc.stderr
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as f:
                f.write(f"\n===== case {json.dumps(case)}\n")
                f.flush()
                proc = subprocess.run(
                    cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout_s, env=env
                )
            stderr = "".join(log.read_text().splitlines(keepends=True)[-5:])
    except subprocess.TimeoutExpired:
        return {"case": case, "error": f"timed out after {timeout_s} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or proc.stdout).strip().splitlines()[-5:]
        return {"case": case, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def case_main(run_case: Callable[[dict], dict]) -> None:
    """Child side: `--case JSON` -> print the case's metrics as one JSON line on stdout."""
    case = json.loads(sys.argv[sys.argv.index("--case") + 1])
    print(json.dumps(run_case(case)), flush=True)
