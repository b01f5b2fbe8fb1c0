"""The benchmark harness's pure parts: results-file naming, quantiles, run grouping."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_loop  # noqa: E402
import harness  # noqa: E402


@pytest.mark.parametrize(
    "name, slug",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("AMD EPYC 7B13 (2 cores)", "cpu"),
    ],
)
def test_device_slug(name, slug):
    assert harness.device_slug(name) == slug


def test_quantiles_median_and_spread():
    q = harness.quantiles([5.0, 1.0, 4.0, 2.0, 3.0])
    assert q == {"median": 3.0, "p20": 2.0, "p80": 4.0}


def test_in_one_process_keeps_each_models_runs_in_order():
    cases = [
        {"model": m, "provider": p, "repeat": r}
        for m in ("llama_60m", "llama_350m")
        for r in range(2)
        for p in ("ours", "torch")[:: 1 if r % 2 == 0 else -1]
    ]
    groups = bench_loop.in_one_process(cases)
    assert [g["provider"] for g in groups] == ["sequence", "sequence"]
    assert [c for g in groups for c in g["runs"]] == cases  # the flat order the parent expects
    assert {c["model"] for c in groups[0]["runs"]} == {"llama_60m"}
