"""The memory a batched refresh allocates beyond its gradients (the planner's SVD_WORKSPACE): for
each basis finder (exact, fast cold, fast warm) and the shapes of a 7B layer at GaLore's rank
1024, the CUDA allocator's peak during one `SVDProjector.refresh_many`-shaped call (the stacked
gradients, the finder, the per-matrix clones) less what was allocated before it, over the fp32
bytes of the batch's input. One JSON line per case (bench "refresh_memory").

    python benchmarks/bench_refresh_memory.py --out-dir $OUT [--device-slug h200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line, write_results  # noqa: E402

# (rows, cols, matrices in one batched call: the planner's chunk of BATCH_BYTES at 7B)
SHAPES = [(4096, 4096, 4), (11008, 4096, 1), (4096, 11008, 1)]


def measure(m: int, n: int, count: int, rank: int, method: str, warm: bool) -> dict:
    import torch

    from lowrank_train.projectors.subspace import side_of, svd_basis
    from lowrank_train.seeding import generator

    device = torch.device("cuda")
    grads = [torch.randn(m, n, device=device, dtype=torch.bfloat16) for _ in range(count)]
    side = side_of((m, n))
    d = min(m, n)
    previous = torch.randn(count, d, rank, device=device) if warm else None
    gens = [generator(0, f"t{i}", "refresh", 0) for i in range(count)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    stacked = torch.stack(grads)
    bases = svd_basis(stacked, side, rank, method, previous, gens)
    kept = [b.clone() for b in bases.unbind(0)]
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del stacked, bases, kept
    return {"extra_bytes": extra, "input_fp32_bytes": 4 * m * n * count}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--device-slug")
    args = ap.parse_args()
    rows = []
    for m, n, count in SHAPES:
        for method, warm in [("exact", False), ("fast", False), ("fast", True)]:
            got = measure(m, n, count, args.rank, method, warm)
            factor = got["extra_bytes"] / got["input_fp32_bytes"]
            label = f"{method}{' warm' if warm else ''}"
            print(
                f"{m}x{n} x{count} rank {args.rank} {label}: {factor:.2f} x fp32 input", flush=True
            )
            rows.append(
                result_line(
                    bench="refresh_memory",
                    case={"shape": [m, n], "matrices": count, "rank": args.rank},
                    provider="ours",
                    method=label,
                    settings={"grad_dtype": "bfloat16"},
                    metrics={**got, "workspace_factor": round(factor, 3)},
                )
            )
    print(f"rows: {write_results('refresh_memory', args.device_slug, rows, args.out_dir)}")


if __name__ == "__main__":
    main()
