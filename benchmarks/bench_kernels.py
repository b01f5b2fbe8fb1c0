"""Kernel benchmark (issue 16) on the shared harness: `bench: kernel`, one child process per op
group, every provider of a group in that process, `triton.testing.do_bench` medians.

Groups:
  * matmul: y = x W^T at the presets' shapes (N x K = 4096x4096, 11008x4096, 4096x11008,
    2048x5461) and 1, 16, 256, 2048, 8192 tokens: bf16 cuBLAS (F.linear), bitsandbytes INT8
    (Linear8bitLt) and NF4 (Linear4bit), torch._int_mm (W8A8, tokens > 16), the reference under
    torch.compile (INT8; one dynamic-shape compile), and ours (INT8, INT4, NF4 through the launchers; INT8 also
    through the custom op, to show the dispatch cost).
  * matmul_bwd: grad_x = g W for the same shapes: cuBLAS (g @ W) and ours (INT8, INT4).
  * elementwise: quantize / dequantize, stochastic rounding and the fused updates on 64M
    elements (256 MB of fp32), with bitsandbytes' blockwise quantizers as peers, and the
    yardstick: a device-to-device copy measured the same way in the same process.

Metrics: `ms` (median; p20/p80 beside it), `ms_graph` (a CUDA-graph replay, no launch
overhead; matmul at <= 16 tokens), `gb_s` (bytes read plus written over the median time),
and for matmuls `tflops`. The README reports ratios within one call.

    python benchmarks/bench_kernels.py [--only matmul,matmul_bwd,elementwise] [--out DIR] [--quick]
    python benchmarks/bench_kernels.py --plot benchmarks/results/kernel_h200_2026-12-01.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import RESULTS, case_main, result_line, run_cases, write_results  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (2048, 5461)]  # (N, K) = (out, in)
TOKENS = [1, 16, 256, 2048, 8192]
GROUP = 256
ELEMENTS = 64 * 2**20  # 64M: 256 MB of fp32, far past the 60 MB L2


def _bench(fn, graph: bool = False) -> dict:
    import torch
    import triton

    fn()  # warm-up: compiles and autotunes outside the timing
    torch.cuda.synchronize()
    q = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    out = {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
    if graph:
        try:
            out["ms_graph"] = triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
        except Exception as e:  # a provider that cannot be captured keeps its event timing
            out["graph_error"] = type(e).__name__
    return out


def _copy_yardstick() -> dict:
    """A device-to-device copy of 256 MB of fp32, bytes read plus written over its median."""
    import torch

    src = torch.randn(ELEMENTS, device="cuda")
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src))
    return dict(t, gb_s=8 * ELEMENTS / t["ms"] / 1e6, bytes=8 * ELEMENTS)


def _rows(records: list[tuple[dict, str, str, dict, dict]]) -> list[dict]:
    return [
        result_line(bench="kernel", case=c, provider=p, method=m, settings=s, metrics=x)
        for c, p, m, s, x in records
    ]


def _matmul_group(case: dict) -> dict:
    import torch

    from lowrank_train.kernels import ops
    from lowrank_train.kernels import reference as R

    torch.manual_seed(0)
    bnb = _import_bnb()
    backward = case["group"] == "matmul_bwd"
    shapes, tokens = case["shapes"], case["tokens"]
    records, errors, all_rows = [], {}, []
    ref8 = torch.compile(R.int8_matmul, dynamic=True)
    # the yardstick of the weight-read targets, measured the same way in this process
    copy = _copy_yardstick()
    records.append(({"op": "elementwise", "elements": ELEMENTS}, "torch", "copy_fp32", {}, copy))
    for n, k in shapes:
        w = torch.randn(n, k, device="cuda") * 0.02
        w_bf16 = w.bfloat16()
        q = {
            "int8": ops.quantize_int8(w, GROUP),
            "int4": ops.quantize_int4(w, GROUP),
            "nf4": ops.quantize_nf4(w, GROUP),
        }
        bnb_layers = _bnb_layers(bnb, w_bf16, errors) if bnb and not backward else {}
        w_t8 = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
        for m in tokens:
            x = torch.randn(m, n if backward else k, device="cuda").bfloat16()
            flops = 2 * m * n * k
            act_bytes = x.numel() * 2 + m * (k if backward else n) * 2
            providers = _providers(backward, x, m, n, k, w_bf16, q, bnb_layers, w_t8, ref8)
            for (provider, method), (fn, w_bytes) in providers.items():
                try:
                    t = _bench(fn, graph=m <= 16)
                except Exception as e:  # noqa: BLE001 - a failing peer is recorded, never fatal
                    errors[f"{provider}/{method}/{n}x{k}/{m}"] = (
                        f"{type(e).__name__}: {str(e)[:200]}"
                    )
                    continue
                metrics = dict(
                    t, tflops=flops / t["ms"] / 1e9, gb_s=(w_bytes + act_bytes) / t["ms"] / 1e6
                )
                settings = {
                    "dtype": "bfloat16",
                    "direction": "grad_x" if backward else "forward",
                    "timing": "do_bench median",
                }
                if provider != "cublas":
                    settings["group_size"] = 64 if provider == "bnb" and "nf4" in method else GROUP
                records.append(
                    (
                        {
                            "op": "matmul_grad_x" if backward else "matmul",
                            "n": n,
                            "k": k,
                            "tokens": m,
                        },
                        provider,
                        method,
                        settings,
                        metrics,
                    )
                )
        # written after each shape, so a call cut short keeps what it measured
        rows = _rows(records)
        write_results("kernel", case.get("slug"), rows, Path(case["out"]))
        all_rows += rows
        records = []
        print(f"{case['group']} {n}x{k} done: {len(rows)} rows", file=sys.stderr, flush=True)
        torch.cuda.empty_cache()
    return {"rows": len(all_rows), "errors": errors, "summary": _summary(all_rows)}


def _providers(backward, x, m, n, k, w_bf16, q, bnb_layers, w_t8, ref8) -> dict:
    """(provider, method) -> (callable, bytes of W it reads) for one shape and token count."""
    import torch
    import torch.nn.functional as F

    from lowrank_train.kernels import matmul, ops

    (c8, s8), (p4, s4), (pn, sn) = q["int8"], q["int4"], q["nf4"]
    if backward:
        return {
            ("cublas", "bf16_matmul"): (lambda: x @ w_bf16, n * k * 2),
            ("ours", "int8_matmul_grad_x"): (
                lambda: matmul.int8_matmul_grad_x(x, c8, s8, GROUP),
                n * k,
            ),
            ("ours", "int4_matmul_grad_x"): (
                lambda: matmul.int4_matmul_grad_x(x, p4, s4, (n, k), GROUP),
                n * k // 2,
            ),
        }
    out = {("cublas", "bf16_linear"): (lambda: F.linear(x, w_bf16), n * k * 2)}
    for name, layer in bnb_layers.items():
        out["bnb", name] = (lambda layer=layer: layer(x), n * k if "int8" in name else n * k // 2)
    if m > 16:  # torch._int_mm needs more than 16 rows
        x8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        out["torch", "int_mm_w8a8"] = (lambda: torch._int_mm(x8, w_t8.t()), n * k)
    out["torch-compile", "int8_matmul_reference"] = (lambda: ref8(x, c8, s8, GROUP), n * k)
    out["ours", "int8_matmul"] = (lambda: matmul.int8_matmul(x, c8, s8, GROUP), n * k)
    out["ours", "int8_matmul_op"] = (lambda: ops.int8_matmul(x, c8, s8, GROUP), n * k)
    out["ours", "int4_matmul"] = (lambda: matmul.int4_matmul(x, p4, s4, (n, k), GROUP), n * k // 2)
    out["ours", "nf4_matmul"] = (lambda: matmul.nf4_matmul(x, pn, sn, (n, k), GROUP), n * k // 2)
    return out


def _import_bnb():
    try:
        import bitsandbytes

        return bitsandbytes
    except Exception:  # noqa: BLE001 - the machine may not carry it: bnb rows are then absent
        return None


def _bnb_layers(bnb, w_bf16, errors: dict) -> dict:
    import torch

    n, k = w_bf16.shape
    layers = {}
    try:
        lin = bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False, threshold=0.0)
        lin.weight = bnb.nn.Int8Params(w_bf16.cpu(), requires_grad=False, has_fp16_weights=False)
        layers["int8_linear8bitlt"] = lin.cuda()
    except Exception as e:  # noqa: BLE001
        errors[f"bnb int8 {n}x{k}"] = f"{type(e).__name__}: {str(e)[:200]}"
    try:
        lin = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w_bf16.cpu(), requires_grad=False, quant_type="nf4")
        layers["nf4_linear4bit"] = lin.cuda()
    except Exception as e:  # noqa: BLE001
        errors[f"bnb nf4 {n}x{k}"] = f"{type(e).__name__}: {str(e)[:200]}"
    return layers


def _elementwise_group(case: dict) -> dict:
    import torch

    from lowrank_train.kernels import fused_adam, quant, rounding

    torch.manual_seed(0)
    bnb = _import_bnb()
    n = case["elements"]
    x = torch.randn(n, device="cuda")
    x_pos = x.abs()
    dst = torch.empty_like(x)
    c8, s8 = quant.quantize_int8(x)
    p4, s4 = quant.quantize_int4(x)
    cd, ad = quant.quantize_dynamic(x, signed=True)
    upd = torch.randn(n, device="cuda").bfloat16()
    g32 = torch.randn(n, device="cuda")
    m32, v32 = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
    m16, v16 = m32.bfloat16(), v32.bfloat16()
    mc, ma = quant.quantize_dynamic(torch.zeros(n, device="cuda"), signed=True)
    vc, va = quant.quantize_dynamic(torch.zeros(n, device="cuda"), signed=False)
    hp = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    sc = 4 * n // GROUP  # bytes of fp32 scales
    cases = {  # (provider, method): (fn, bytes read + written)
        ("torch", "copy_fp32"): (lambda: dst.copy_(x), 8 * n),
        ("ours", "quantize_int8"): (lambda: quant.quantize_int8(x), 4 * n + n + sc),
        ("ours", "dequantize_int8_bf16"): (
            lambda: quant.dequantize_int8(c8, s8, dtype=torch.bfloat16),
            n + sc + 2 * n,
        ),
        ("ours", "quantize_int4"): (lambda: quant.quantize_int4(x), 4 * n + n // 2 + sc),
        ("ours", "dequantize_int4_bf16"): (
            lambda: quant.dequantize_int4(p4, s4, (n,), dtype=torch.bfloat16),
            n // 2 + sc + 2 * n,
        ),
        ("ours", "quantize_nf4"): (lambda: quant.quantize_nf4(x), 4 * n + n // 2 + sc),
        ("ours", "quantize_dynamic_signed"): (
            lambda: quant.quantize_dynamic(x, signed=True),
            4 * n + n + sc,
        ),
        ("ours", "quantize_dynamic_unsigned"): (
            lambda: quant.quantize_dynamic(x_pos, signed=False),
            4 * n + n + sc,
        ),
        ("ours", "dequantize_dynamic_fp32"): (
            lambda: quant.dequantize_dynamic(cd, ad, signed=True),
            n + sc + 4 * n,
        ),
        ("ours", "stochastic_round_bf16"): (
            lambda: rounding.stochastic_round_bf16(x, seed=1),
            4 * n + 2 * n,
        ),
        ("ours", "stochastic_round_int8"): (
            lambda: rounding.stochastic_round_int8(x, seed=1),
            4 * n + n + sc,
        ),
        ("ours", "int8_sr_update_bf16_update"): (
            lambda: rounding.int8_sr_update(c8, s8, upd, lr=1e-6, wd=0.0, seed=2),
            n + sc + 2 * n + n + sc,
        ),
        ("ours", "adam_update_fp32_state"): (
            lambda: fused_adam.adam_update(g32, m32, v32, **hp),
            4 * n * 3 + 4 * n * 3,
        ),
        ("ours", "adam_update_bf16_state"): (
            lambda: fused_adam.adam_update(g32, m16, v16, **hp),
            4 * n + 4 * n + 4 * n + 4 * n,
        ),
        ("ours", "adam_update_8bit_state"): (
            lambda: fused_adam.adam_update(
                g32, mc, vc, **hp, exp_avg_absmax=ma, exp_avg_sq_absmax=va
            ),
            4 * n + 2 * n + 2 * sc + 2 * n + 2 * sc + 4 * n,
        ),
    }
    if bnb is not None:
        import bitsandbytes.functional as BF

        qmap = BF.create_dynamic_map(signed=True).cuda()
        bq, bstate = BF.quantize_blockwise(x, code=qmap, blocksize=GROUP)
        cases["bnb", "quantize_dynamic_signed"] = (
            lambda: BF.quantize_blockwise(x, code=qmap, blocksize=GROUP),
            4 * n + n + sc,
        )
        cases["bnb", "dequantize_dynamic_fp32"] = (
            lambda: BF.dequantize_blockwise(bq, bstate),
            n + sc + 4 * n,
        )
        cases["bnb", "quantize_nf4"] = (
            lambda: BF.quantize_4bit(x, blocksize=64, quant_type="nf4"),
            4 * n + n // 2 + 4 * n // 64,
        )
    records, errors = [], {}
    copy_gb_s = None
    for (provider, method), (fn, nbytes) in cases.items():
        try:
            t = _bench(fn)
        except Exception as e:  # noqa: BLE001
            errors[f"{provider}/{method}"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        gb_s = nbytes / t["ms"] / 1e6
        copy_gb_s = gb_s if method == "copy_fp32" else copy_gb_s
        metrics = dict(t, gb_s=gb_s, bytes=nbytes, of_copy=gb_s / copy_gb_s if copy_gb_s else None)
        settings = {
            "block_size": 64 if method == "quantize_nf4" and provider == "bnb" else GROUP,
            "input": "float32",
        }
        records.append(({"op": "elementwise", "elements": n}, provider, method, settings, metrics))
    rows = _rows(records)
    write_results("kernel", case.get("slug"), rows, Path(case["out"]))
    return {"rows": len(rows), "errors": errors, "summary": _summary(rows)}


def _summary(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        c, x = r["case"], r["metrics"]
        where = f"{c['n']}x{c['k']} t={c['tokens']}" if "tokens" in c else f"{c['elements']}"
        extra = f" graph {x['ms_graph']:.4f}" if "ms_graph" in x else ""
        rel = f" {x['of_copy']:.2f}x copy" if x.get("of_copy") else ""
        out.append(
            f"{where:<22} {r['provider']:<14} {r['method']:<28} {x['ms']:.4f} ms{extra} {x['gb_s']:.0f} GB/s{rel}"
        )
    return out


def run_case(case: dict) -> dict:
    if case["group"] == "elementwise":
        return _elementwise_group(case)
    return _matmul_group(case)


def plot(path: Path) -> Path:
    """One PNG: ms against tokens for each shape and provider (forward), from a results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [
        r
        for r in rows
        if r["case"].get("op") == "matmul" and r["settings"].get("direction") == "forward"
    ]
    shapes = sorted({(r["case"]["n"], r["case"]["k"]) for r in rows})
    labels = sorted({f"{r['provider']} {r['method']}" for r in rows})
    colors = {
        label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)
    }  # one colour a provider
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.6), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes, strict=True):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if (r["case"]["n"], r["case"]["k"]) == (n, k):
                series.setdefault(f"{r['provider']} {r['method']}", []).append(
                    (r["case"]["tokens"], r["metrics"]["ms"])
                )
        for label, pts in sorted(series.items()):
            pts.sort()
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                color=colors[label],
                label=label,
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="tokens",
            ylabel="ms (do_bench median)",
            title=f"W {n}x{k} (N x K)",
        )
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[label], marker="o") for label in labels]
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8)
    fig.subplots_adjust(bottom=0.3)
    fig.suptitle(f"{rows[0]['device']} {rows[0]['date']}" if rows else "")
    out = Path(__file__).resolve().parent / "plots" / f"{path.stem}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", default="matmul,matmul_bwd,elementwise")
    ap.add_argument("--out", default=str(RESULTS), help="directory of the results file")
    ap.add_argument("--device-slug", default=None)
    ap.add_argument("--quick", action="store_true", help="two shapes and three token counts")
    ap.add_argument("--plot", type=Path, default=None, help="only draw the PNG of a results file")
    args = ap.parse_args()
    if args.plot:
        print(plot(args.plot))
        return
    shapes, tokens = (SHAPES[1:3], [1, 16, 2048]) if args.quick else (SHAPES, TOKENS)
    base = {"out": args.out, "slug": args.device_slug}
    cases = []
    for group in args.only.split(","):
        if group == "elementwise":
            cases.append(dict(base, group=group, elements=ELEMENTS))
        else:
            cases.append(dict(base, group=group, shapes=shapes, tokens=tokens))
    for case, res in zip(
        cases, run_cases(Path(__file__).resolve(), cases, timeout_s=1200), strict=True
    ):
        print(f"== {case['group']}: {res.get('rows', 0)} rows", flush=True)
        for line in res.get("summary", []):
            print(line)
        for key, err in (res.get("errors") or {}).items():
            print(f"error {key}: {err}")
        if "error" in res:
            print(f"FAILED: {res['error']}")


if __name__ == "__main__":
    if "--case" in sys.argv:
        case_main(run_case)
    else:
        main()
