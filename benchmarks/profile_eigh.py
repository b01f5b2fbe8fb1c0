"""Ways to run a refresh's small dense factorizations on a GPU, timed side by side.

A warm refresh at 1B (issue 15) spends most of its time in a batch of w x w symmetric
eigendecompositions (w = rank + 16) and in the CholeskyQR passes' Cholesky and triangular solve.
torch's batched CUDA eigh loops over the batch with one cuSOLVER syevd each, and a syevd of a
528 x 528 matrix is a chain of small kernels that leaves the GPU mostly idle. This script times,
on random positive definite matrices with a decaying spectrum:

- eigh: the batch in one call; the batch split over T host threads, each on its own CUDA
  stream; the batch on the host CPU (copy there and back included), also over T threads;
  torch.linalg.svd with cuSOLVER's batched gesvda on the w x D factor (a route that skips the Gram);
- the triangular step Q <- Q R^-1 by solve_triangular against an explicit triangular inverse
  followed by a GEMM, and the batched Cholesky.

One JSON line per variant (bench "linalg"): the variant, the batch shape, seconds (median of 3).

    python benchmarks/profile_eigh.py --batch 168 --width 528 --depth 2048 --out-dir $OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def seconds(fn, repeats: int = 3) -> float:
    """Median wall seconds of `fn` after one warm-up call, synchronized."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def threaded(fn, chunks: list[torch.Tensor], streams: list[torch.cuda.Stream] | None):
    """fn on each chunk in its own host thread (and CUDA stream, when given)."""

    def one(i: int):
        if streams is None:
            return fn(chunks[i])
        with torch.cuda.stream(streams[i]):
            out = fn(chunks[i])
        streams[i].synchronize()
        return out

    with ThreadPoolExecutor(len(chunks)) as pool:
        return list(pool.map(one, range(len(chunks))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=168)
    ap.add_argument("--width", type=int, default=528)
    ap.add_argument("--depth", type=int, default=2048)
    ap.add_argument("--threads", default="2,4,8,16")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device-slug")
    args = ap.parse_args()
    b, w, d = args.batch, args.width, args.depth
    gen = torch.Generator(device="cuda").manual_seed(0)
    decay = torch.logspace(0, -3, w, device="cuda")
    factor = torch.randn(b, w, d, device="cuda", generator=gen) * decay[:, None]
    gram = factor @ factor.mT
    results: dict[str, float] = {}
    results["eigh_batched"] = seconds(lambda: torch.linalg.eigh(gram))
    for t in map(int, args.threads.split(",")):
        chunks = list(gram.chunk(t))
        streams = [torch.cuda.Stream() for _ in chunks]
        results[f"eigh_streams_{t}"] = seconds(
            lambda c=chunks, s=streams: threaded(torch.linalg.eigh, c, s)
        )
        results[f"eigh_host_{t}"] = seconds(
            lambda c=chunks: [
                x.to("cuda", non_blocking=True)
                for pair in threaded(torch.linalg.eigh, [x.cpu() for x in c], None)
                for x in pair
            ]
        )
    results["svd_gesvda"] = seconds(
        lambda: torch.linalg.svd(factor.mT, full_matrices=False, driver="gesvda")
    )
    q = torch.randn(b, 4 * w, w, device="cuda", generator=gen)
    r = torch.linalg.cholesky(q.mT @ q, upper=True)
    eye = torch.eye(w, device="cuda")
    results["cholesky"] = seconds(lambda: torch.linalg.cholesky_ex(q.mT @ q, upper=True))
    results["trsm_tall"] = seconds(
        lambda: torch.linalg.solve_triangular(r, q, upper=True, left=False)
    )
    results["trinv_then_gemm"] = seconds(
        lambda: q @ torch.linalg.solve_triangular(r, eye, upper=True)
    )
    rows = []
    for variant, s in results.items():
        print(f"{variant:<20} {s * 1e3:9.2f} ms  ({b} x {w} x {w}; tall {4 * w} x {w})")
        rows.append(
            result_line(
                bench="linalg",
                case={"batch": b, "width": w, "depth": d},
                provider="torch",
                method=variant,
                settings={},
                metrics={"seconds": s},
            )
        )
    print(write_results("linalg", args.device_slug, rows, out_dir=args.out_dir))


if __name__ == "__main__":
    main()
