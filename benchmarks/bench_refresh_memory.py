"""The memory a batched refresh allocates beyond its gradients, per matrix: for each basis finder
(exact, fast cold, fast warm), the shapes of the 350M, 1B and 7B layers and the ranks their
recipes run, the CUDA allocator's peak during one `SVDProjector.refresh_many`-shaped call (the
stacked gradients, the finder, the bases held in the gradients' dtype) less what was allocated
before it, over the call's matrices. Each row also carries the planner's model of it
(`subspace.finder_call_bytes` and the held bases), so a row whose ratio strays says the model is
off. One JSON line per case (bench "refresh_memory").

    python benchmarks/bench_refresh_memory.py --out-dir $OUT [--device-slug h200] [--call NAME]
    python benchmarks/bench_refresh_memory.py --replan benchmarks/results/refresh_memory_h200_2026-12-03.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line, write_results  # noqa: E402

# (rows, cols, ranks): 350M (hidden 1024, MLP 2736), 1B (2048, 5461), 7B (4096, 11008)
SHAPES = [
    (1024, 1024, (128, 512)),
    (2736, 1024, (128, 512)),
    (1024, 2736, (512,)),
    (2048, 2048, (256, 512, 1024)),
    (5461, 2048, (512, 1024)),
    (4096, 4096, (1024,)),
    (11008, 4096, (1024,)),
]
MATRICES = 4  # in one batched call: per-matrix bytes, with the call's fixed cost spread


def planned_per_matrix(m: int, n: int, count: int, rank: int, method: str, warm: bool) -> float:
    """The model's bytes a matrix for a call of `count` bf16 gradients: GaLore's
    `refresh_call_bytes` (the finder's `finder_call_bytes` and the bases it holds, bf16)."""
    import torch

    from lowrank_train.projectors.galore import GaLore

    galore = GaLore(GaLore.Config(rank=rank, svd=method))
    return galore.refresh_call_bytes((m, n), torch.bfloat16, warm, count) / count


def measure(m: int, n: int, count: int, rank: int, method: str, warm: bool) -> dict:
    import torch

    from lowrank_train.projectors.subspace import side_of, svd_basis
    from lowrank_train.seeding import generator

    device = torch.device("cuda")
    grads = [torch.randn(m, n, device=device, dtype=torch.bfloat16) for _ in range(count)]
    side = side_of((m, n))
    d = min(m, n)
    previous = [torch.randn(d, rank, device=device, dtype=torch.bfloat16) for _ in range(count)]
    gens = [generator(0, f"t{i}", "refresh", 0) for i in range(count)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stacked = torch.stack(grads)
    start = torch.stack(previous) if warm else None
    bases = svd_basis(stacked, side, rank, method, start, gens)
    held = [b.to(torch.bfloat16, copy=True) for b in bases.unbind(0)]
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del stacked, start, bases, held
    return {"extra_bytes_per_matrix": extra // count, "input_fp32_bytes_per_matrix": 4 * m * n}


def against_model(row_case: dict, label: str, measured: dict) -> dict:
    """A measurement with the current model's figure beside it."""
    (m, n), rank, count = row_case["shape"], row_case["rank"], row_case["matrices"]
    method, warm = label.split()[0], label.endswith("warm")
    planned = planned_per_matrix(m, n, count, rank, method, warm)
    return {
        "extra_bytes_per_matrix": measured["extra_bytes_per_matrix"],
        "input_fp32_bytes_per_matrix": measured["input_fp32_bytes_per_matrix"],
        "planned_bytes_per_matrix": int(planned),
        "measured_over_planned": round(measured["extra_bytes_per_matrix"] / planned, 3),
    }


def replan(path: Path, args) -> None:
    """Rows of an earlier call against the current model (bench "refresh_memory_replan"): the
    measurements are that call's, the model this commit's."""
    rows = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("bench") != "refresh_memory" or "extra_bytes_per_matrix" not in row["metrics"]:
            continue
        got = against_model(row["case"], row["method"], row["metrics"])
        print(f"{row['case']} {row['method']}: {got['measured_over_planned']:.3f}x planned")
        settings = {
            **row["settings"],
            "measured": f"{row['device']}, {row['date']}, {row['commit']}",
        }
        rows.append(
            result_line(
                bench="refresh_memory_replan",
                case=row["case"],
                provider="ours",
                method=row["method"],
                settings=settings,
                metrics=got,
            )
        )
    ratios = [r["metrics"]["measured_over_planned"] for r in rows]
    print(f"measured / model: {min(ratios):.3f} to {max(ratios):.3f} over {len(ratios)} cases")
    print(f"rows: {write_results('refresh_memory_replan', 'cuda-planned', rows, args.out_dir)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--device-slug")
    ap.add_argument("--call")
    ap.add_argument("--replan", type=Path, help="a rows file: its measurements against the model")
    args = ap.parse_args()
    if args.replan:
        return replan(args.replan, args)
    rows = []
    for m, n, ranks in SHAPES:
        for rank in ranks:
            for method, warm in [("exact", False), ("fast", False), ("fast", True)]:
                label = f"{method}{' warm' if warm else ''}"
                case = {"shape": [m, n], "matrices": MATRICES, "rank": rank}
                got = against_model(case, label, measure(m, n, MATRICES, rank, method, warm))
                print(
                    f"{m}x{n} rank {rank} {label}: {got['extra_bytes_per_matrix'] / 2**20:.1f} "
                    f"MiB a matrix, {got['measured_over_planned']:.3f}x planned",
                    flush=True,
                )
                rows.append(
                    result_line(
                        bench="refresh_memory",
                        case=case,
                        provider="ours",
                        method=label,
                        settings={"grad_dtype": "bfloat16", "call": args.call},
                        metrics=got,
                    )
                )
    print(f"rows: {write_results('refresh_memory', args.device_slug, rows, args.out_dir)}")


if __name__ == "__main__":
    main()
