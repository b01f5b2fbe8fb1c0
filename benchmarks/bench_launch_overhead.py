"""Host time per call of our kernel ops, the cost a per-layer 7B step pays hundreds of times
(issue 18's speed target; see benchmarks/profile_case.py). At a 7B layer's shape (1,024 tokens,
4096 x 4096, INT8 in groups of 256), each provider is called 200 times without a sync: `host_us`
is the time to issue one call, `wall_us` the time until the GPU has run it. Providers: torch.mm,
a bare Triton launch of the dequant-matmul with the autotuner's config, our launcher
(`kernels.matmul`), the custom ops through `torch.ops` (the dispatcher), and the public functions
of `kernels.ops` (the eager shortcut). One JSON line per provider (bench "launch").

    python benchmarks/bench_launch_overhead.py [--device-slug h200] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import result_line, write_results  # noqa: E402

M, N, K, GROUP, CALLS = 1024, 4096, 4096, 256, 200


def providers() -> dict:
    import torch
    import triton

    from lowrank_train.kernels import matmul
    from lowrank_train.kernels import ops as public

    dev = "cuda"
    x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=dev)
    codes, scales = public.quantize_int8(w, GROUP)
    w16, g = w.bfloat16(), torch.randn(M, N, device=dev, dtype=torch.bfloat16)
    update = torch.randn(N, K, device=dev)
    m1, v1, g1 = (torch.zeros(1, K, device=dev) for _ in range(3))  # APOLLO-Mini's rank-1 moments
    op = torch.ops.lowrank_train
    matmul.int8_matmul(x, codes, scales, GROUP)  # autotune this key once
    best, out = matmul._tuned.best_config, torch.empty(M, N, device=dev, dtype=torch.bfloat16)
    grid = (triton.cdiv(M, best.kwargs["BLOCK_M"]) * triton.cdiv(N, best.kwargs["BLOCK_J"]),)
    bucket = triton.next_power_of_2(M)
    meta = dict(G=GROUP, FMT=matmul.INT8, TRANS=False, ROW_ALIGNED=True, UPCAST=False)
    args = (x, codes, scales, out, M, N, K, K, x.stride(0), out.stride(0), bucket)
    return {
        "torch.mm bf16": lambda: torch.mm(x, w16.t()),
        "bare Triton launch (best config)": lambda: matmul._dq_matmul_kernel[grid](
            *args, **meta, **best.all_kwargs()
        ),
        "kernels.matmul.int8_matmul (launcher)": lambda: matmul.int8_matmul(
            x, codes, scales, GROUP
        ),
        "torch.ops int8_matmul (dispatcher)": lambda: op.int8_matmul(x, codes, scales, GROUP),
        "torch.ops int8_matmul_grad_x": lambda: op.int8_matmul_grad_x(g, codes, scales, GROUP),
        "kernels.ops.int8_matmul (no grad)": lambda: public.int8_matmul(x, codes, scales, GROUP),
        "torch.ops adam_update (rank 1)": lambda: op.adam_update(
            g1, m1, v1, None, None, 0.9, 0.999, 1e-8, GROUP
        ),
        "kernels.ops.adam_update (rank 1)": lambda: public.adam_update(
            g1, m1, v1, beta1=0.9, beta2=0.999, eps=1e-8
        ),
        "torch.ops int8_sr_update": lambda: op.int8_sr_update(
            codes, scales, update, 1e-9, 0.0, 1, GROUP
        ),
        "kernels.ops.int8_sr_update": lambda: public.int8_sr_update(
            codes, scales, update, lr=1e-9, wd=0.0, seed=1
        ),
        "torch.ops dequantize_int8": lambda: op.dequantize_int8(
            codes, scales, GROUP, torch.bfloat16
        ),
    }


def timed(fn) -> dict:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(CALLS):
        fn()
    host = (time.perf_counter() - start) / CALLS
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / CALLS
    return {"host_us": round(host * 1e6, 1), "wall_us": round(wall * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--device-slug")
    args = ap.parse_args()
    rows = []
    for name, fn in providers().items():
        metrics = timed(fn)
        print(f"{name:<42} host {metrics['host_us']:7.1f} us  wall {metrics['wall_us']:7.1f} us")
        rows.append(
            result_line(
                bench="launch",
                case={"tokens": M, "shape": [N, K], "group_size": GROUP, "calls": CALLS},
                provider="torch" if name.startswith("torch.mm") else "ours",
                method=name,
                settings={"dtype": "bfloat16", "weights": "int8"},
                metrics=metrics,
            )
        )
    print(f"rows: {write_results('launch', args.device_slug, rows, args.out_dir)}")


if __name__ == "__main__":
    main()
