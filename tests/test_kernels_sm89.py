"""Every kernel compiles for an RTX 4090 (Ada, sm_89) within its 99 KB of shared memory a block,
with no Hopper-only instruction: checked by compiling for the target, not by running (issue
16). Triton's compiler needs no GPU, so this runs on the CPU machines too.

Compilation must not run under the interpreter (there ``@triton.jit`` yields functions that
cannot be compiled), so the check runs in a child process with TRITON_INTERPRET=0. The test
compiles every elementwise kernel and the dequant-matmul at its largest kept tiles;
``python tests/test_kernels_sm89.py --full`` compiles every autotune config x format x
direction x group size (about 5 minutes on 2 cores).
"""

import json  # noqa: E402
import os
import subprocess  # noqa: E402
import sys  # noqa: E402

SM89_SHARED_BYTES = 101376  # 99 KB: the opt-in maximum a block may use on compute capability 8.9
HOPPER_ONLY = ("wgmma", "cp.async.bulk", "setmaxnreg", "mbarrier.try_wait.parity")


def compile_all(full: bool) -> list[dict]:
    """Compile for sm_89; one row per kernel variant: name, shared bytes, Hopper-only ops seen."""
    import triton
    from triton.backends.compiler import GPUTarget

    from lowrank_train.kernels import fused_adam, matmul, quant, rounding

    target = GPUTarget("cuda", 89, 32)
    rows = []

    def build(fn, name, signature, constexprs, num_warps=4, num_stages=3):
        sig = dict(signature)
        sig.update({k: "constexpr" for k in constexprs})
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        k = triton.compile(
            src, target=target, options={"num_warps": num_warps, "num_stages": num_stages}
        )
        rows.append(
            {
                "kernel": name,
                "shared": k.metadata.shared,
                "hopper_only": [op for op in HOPPER_ONLY if op in k.asm["ptx"]],
            }
        )

    formats = [(0, "*i8", False), (1, "*u8", False), (2, "*u8", False), (3, "*u8", False)]
    formats += [(1, "*i32", True), (3, "*i32", True)]  # 4-bit codes as int32 words
    for fmt, qty, words in formats:
        sig = {
            "x_ptr": "*bf16",
            "q_ptr": qty,
            "s_ptr": "*fp32",
            "mids_ptr": "*fp32",
            "numel": "i32",
            "nblocks": "i32",
        }
        build(
            quant._quantize_kernel,
            f"quantize fmt={fmt} words={words}",
            sig,
            {"FMT": fmt, "BLOCK": 256, "ROWS": 16, "LOG2": 8, "WORDS": words},
        )
        sig = {
            "q_ptr": qty,
            "s_ptr": "*fp32",
            "table_ptr": "*fp32",
            "out_ptr": "*bf16",
            "numel": "i32",
        }
        build(
            quant._dequantize_kernel,
            f"dequantize fmt={fmt} words={words}",
            sig,
            {"FMT": fmt, "BLOCK": 256, "ROWS": 16, "WORDS": words},
        )
    for q in (False, True):
        st = "*u8" if q else "*bf16"
        sig = {
            "g_ptr": "*bf16",
            "m_ptr": st,
            "v_ptr": st,
            "ma_ptr": "*fp32",
            "va_ptr": "*fp32",
            "n_ptr": "*fp32",
        }
        sig.update({f"{t}_ptr": "*fp32" for t in ("smap", "slookup", "umap", "ulookup")})
        sig.update({"numel": "i32", "nblocks": "i32"})
        sig.update(
            {k: "fp32" for k in ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps")}
        )
        build(
            fused_adam._adam_kernel, f"adam quant={q}", sig, {"QUANT": q, "BLOCK": 256, "ROWS": 16}
        )
    sig = {"x_ptr": "*fp32", "out_ptr": "*bf16", "numel": "i32", "seed": "i64", "offset": "i32"}
    for by4 in (True, False):  # four elements a Philox evaluation, or one (any offset)
        build(rounding._sr_bf16_kernel, f"sr_bf16 by4={by4}", sig, {"BLOCK": 2048, "BY4": by4})
    sig = {
        "x_ptr": "*fp32",
        "q_ptr": "*i8",
        "s_ptr": "*fp32",
        "numel": "i32",
        "nblocks": "i32",
        "seed": "i64",
        "offset": "i32",
    }
    for by4 in (True, False):
        meta = {"BLOCK": 256, "ROWS": 16, "BY4": by4}
        build(rounding._sr_int8_kernel, f"sr_int8 by4={by4}", sig, meta)
    sig = {
        "q_ptr": "*i8",
        "s_ptr": "*fp32",
        "u_ptr": "*fp32",
        "numel": "i32",
        "nblocks": "i32",
        "lr": "fp32",
        "wd": "fp32",
        "seed": "i64",
    }
    build(rounding._int8_sr_update_kernel, "int8_sr_update", sig, {"BLOCK": 256, "ROWS": 16})

    base = {"a_ptr": "*bf16", "s_ptr": "*fp32", "out_ptr": "*bf16"}
    base.update({k: "i32" for k in ("M", "J", "R", "K", "stride_am", "stride_om", "M_BUCKET")})
    # (fmt, trans, row_aligned, group, swap): the quick set covers every scale path, format and
    # operand order at the largest tiles kept (the most shared memory); --full compiles all
    variants = [
        (0, False, True, 256, False),
        (1, True, False, 256, False),
        (2, False, False, 256, True),
        (2, True, True, 64, False),
        (1, False, True, 256, False),  # the 4-bit pair path, forward (TRANS: the row above)
        (1, True, True, 64, True),  # ...swapped: the tile layouts the unswapped ones do not try
    ]
    if full:
        variants = [
            (f, t, a, g, None)
            for f in (0, 1, 2)
            for t in (False, True)
            for a in (True, False)
            for g in (64, 128, 256)
        ]
    for fmt, trans, aligned, group, swap in variants:
        kept = matmul.prune_configs(matmul._configs(), {}, G=group, TRANS=trans)
        if swap is not None:
            same = [c for c in kept if c.kwargs["SWAP"] == swap] or kept
            kept = [
                max(
                    same,
                    key=lambda c: (
                        c.num_stages
                        * c.kwargs["BLOCK_J"]
                        * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_R"])
                    ),
                )
            ]
        for c in kept:
            sig = dict(base, q_ptr="*i8" if fmt == 0 else "*u8")
            meta = dict(
                G=group, FMT=fmt, TRANS=trans, ROW_ALIGNED=aligned, UPCAST=False, **c.kwargs
            )
            tiles = tuple(c.kwargs[k] for k in ("BLOCK_M", "BLOCK_J", "BLOCK_R"))
            name = f"matmul fmt={fmt} trans={trans} aligned={aligned} G={group} tiles={tiles} stages={c.num_stages} swap={c.kwargs['SWAP']}"
            build(matmul._dq_matmul_kernel, name, sig, meta, c.num_warps, c.num_stages)
    return rows


def _run_child(full: bool) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    args = [sys.executable, __file__, "--child"] + (["--full"] if full else [])
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kernels_compile_for_sm89():
    rows = _run_child(full=False)
    assert len(rows) == 12 + 2 + 5 + 6  # (de)quantize x 6 formats, adam, rounding, matmul
    for row in rows:
        print(row)
        assert row["shared"] <= SM89_SHARED_BYTES, row
        assert not row["hopper_only"], row


if __name__ == "__main__":
    if "--child" in sys.argv:
        print(json.dumps(compile_all("--full" in sys.argv)))
    else:
        rows = _run_child("--full" in sys.argv)
        for row in rows:
            print(f"{row['shared']:>7}  {','.join(row['hopper_only']) or '-':<6}  {row['kernel']}")
        print(
            f"{len(rows)} kernels; max shared {max(r['shared'] for r in rows)} bytes (limit {SM89_SHARED_BYTES})"
        )
