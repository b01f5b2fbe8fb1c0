"""lowrank_train.kernels.ops: opcheck on every custom op (Triton path under the interpreter and
the reference path), dispatch by LOWRANK_KERNELS, the dequant-matmul autograd, tracing under
torch.compile without a graph break, and an import without side effects."""

import os
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path

import pytest  # noqa: E402
import torch
from torch.library import opcheck  # noqa: E402

from lowrank_train.kernels import ops  # noqa: E402
from lowrank_train.kernels import reference as R  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
CAN_TRITON = DEV == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def _op_cases():
    """(name, op, args) for every custom op, small odd shapes."""
    x = _randn(6, 42, seed=1)
    w = _randn(42, 64, seed=2)
    c8, s8 = R.quantize_int8(x, 16)
    p4, s4 = R.quantize_int4(x, 16)
    pn, sn = R.quantize_nf4(x, 16)
    cd, ad = R.quantize_dynamic(x, signed=True, block_size=16)
    wc, ws = R.quantize_int8(w, 16)
    wp, wps = R.quantize_int4(w, 16)
    wn, wns = R.quantize_nf4(w, 16)
    xm = _randn(5, 64, seed=3).requires_grad_()
    gm = _randn(5, 42, seed=4).requires_grad_()
    mc, ma = R.quantize_dynamic(_randn(6, 42, seed=5) * 0.1, signed=True, block_size=16)
    vc, va = R.quantize_dynamic(_randn(6, 42, seed=6) ** 2, signed=False, block_size=16)
    return [
        ("quantize_int8", ops._quantize_int8, (x, 16)),
        ("dequantize_int8", ops._dequantize_int8, (c8, s8, 16, torch.bfloat16)),
        ("quantize_int4", ops._quantize_int4, (x, 16)),
        ("dequantize_int4", ops._dequantize_int4, (p4, s4, [6, 42], 16, torch.float32)),
        ("quantize_nf4", ops._quantize_nf4, (x, 16)),
        ("dequantize_nf4", ops._dequantize_nf4, (pn, sn, [6, 42], 16, torch.bfloat16)),
        ("quantize_dynamic", ops._quantize_dynamic, (x.abs(), False, 16)),
        ("dequantize_dynamic", ops._dequantize_dynamic, (cd, ad, True, 16, torch.float32)),
        ("adam_update", ops._adam_update, (x, x * 0.1, x * x, None, None, 0.9, 0.999, 1e-8, 16)),
        (
            "adam_update_bf16",
            ops._adam_update,
            (x, (x * 0.1).bfloat16(), (x * x).bfloat16(), None, None, 0.9, 0.999, 1e-8, 16),
        ),
        ("adam_update_8bit", ops._adam_update, (x, mc, vc, ma, va, 0.9, 0.999, 1e-8, 16)),
        ("stochastic_round_bf16", ops._sr_bf16, (x, 7, 3)),
        ("stochastic_round_int8", ops._sr_int8, (x, 7, 0, 16)),
        ("int8_sr_update", ops._int8_sr_update, (c8.clone(), s8.clone(), x, 0.1, 0.01, 5, 16)),
        ("int8_matmul", ops._int8_matmul, (xm, wc, ws, 16)),
        ("int8_matmul_grad_x", ops._int8_matmul_grad_x, (gm, wc, ws, 16)),
        ("int4_matmul", ops._int4_matmul, (xm, wp, wps, [42, 64], 16)),
        ("int4_matmul_grad_x", ops._int4_matmul_grad_x, (gm, wp, wps, [42, 64], 16)),
        ("nf4_matmul", ops._nf4_matmul, (xm, wn, wns, [42, 64], 16)),
        ("nf4_matmul_grad_x", ops._nf4_matmul_grad_x, (gm, wn, wns, [42, 64], 16)),
    ]


CASES = _op_cases()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_opcheck(case, backend, monkeypatch):
    if backend == "triton" and not CAN_TRITON:
        pytest.skip("needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setenv("LOWRANK_KERNELS", backend)
    _, op, args = case
    opcheck(op, args)


# ------------------------------------------------------------------------------- dispatch


def _forbid(monkeypatch, module: str, name: str):
    import importlib

    mod = importlib.import_module(f"lowrank_train.kernels.{module}")

    def boom(*a, **k):
        raise AssertionError(f"{module}.{name} must not run")

    monkeypatch.setattr(mod, name, boom)


def test_dispatch_reference_never_touches_triton(monkeypatch):
    _forbid(monkeypatch, "quant", "quantize_int8")
    x = _randn(4, 32)
    monkeypatch.setenv("LOWRANK_KERNELS", "reference")
    assert torch.equal(ops.quantize_int8(x, 16)[0], R.quantize_int8(x, 16)[0])


@pytest.mark.skipif(DEV == "cuda", reason="auto picks Triton on CUDA")
def test_dispatch_auto_on_cpu_is_the_reference(monkeypatch):
    _forbid(monkeypatch, "quant", "quantize_int8")
    monkeypatch.delenv("LOWRANK_KERNELS", raising=False)
    x = _randn(4, 32)
    assert torch.equal(ops.quantize_int8(x, 16)[0], R.quantize_int8(x, 16)[0])


@pytest.mark.skipif(not CAN_TRITON, reason="needs CUDA or Triton's interpreter")
def test_dispatch_triton_runs_the_kernel(monkeypatch):
    from lowrank_train.kernels import quant

    calls = []
    real = quant.quantize_int8
    monkeypatch.setattr(quant, "quantize_int8", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("LOWRANK_KERNELS", "triton")
    ops.quantize_int8(_randn(4, 32), 16)
    assert calls == [1]


def test_dispatch_errors_are_one_line(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS", "cuda")
    with pytest.raises(ValueError, match="expected one of auto, triton, reference"):
        ops.quantize_int8(_randn(4, 32), 16)
    if DEV == "cpu":
        monkeypatch.setenv("LOWRANK_KERNELS", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA") as e:
            ops.quantize_int8(_randn(4, 32), 16)
        assert "\n" not in str(e.value)


@pytest.mark.skipif(DEV != "cuda", reason="the auto fallback is for CUDA tensors")
def test_auto_falls_back_for_a_block_the_kernels_cannot_take(monkeypatch):
    monkeypatch.delenv("LOWRANK_KERNELS", raising=False)
    x = _randn(4, 48)
    assert torch.equal(ops.quantize_int8(x, 24)[0], R.quantize_int8(x, 24)[0])


# ------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "nf4"])
def test_matmul_gradients(fmt, backend, monkeypatch):
    if backend == "triton" and not CAN_TRITON:
        pytest.skip("needs CUDA or Triton's interpreter (TRITON_INTERPRET=1)")
    monkeypatch.setenv("LOWRANK_KERNELS", backend)
    n, k, group = 42, 64, 16
    w = _randn(n, k, seed=7)
    if fmt == "int8":
        codes, scales = R.quantize_int8(w, group)
        deq = R.dequantize_int8(codes, scales, group)
        mm = lambda a: ops.int8_matmul(a, codes, scales, group)  # noqa: E731
    else:
        packed, scales = getattr(R, f"quantize_{fmt}")(w, group)
        deq = getattr(R, f"dequantize_{fmt}")(packed, scales, (n, k), group)
        mm = lambda a: getattr(ops, f"{fmt}_matmul")(a, packed, scales, (n, k), group)  # noqa: E731
    x = _randn(2, 3, k, seed=8).requires_grad_()
    g = _randn(2, 3, n, seed=9)
    (y,) = (mm(x),)
    (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
    # dense float64 autograd of y = x deq^T gives grad_x = g deq
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(x64 @ deq.double().T, x64, g.double(), create_graph=True)
    torch.testing.assert_close(gx.double(), want, rtol=1e-5, atol=1e-5)  # fp32 math both ways
    # double backward: d<gx, h>/dg = h deq^T, the forward op again
    h = _randn(2, 3, k, seed=10)
    g_req = g.clone().requires_grad_()
    (gx2,) = torch.autograd.grad(mm(x), x, g_req, create_graph=True)
    (gg,) = torch.autograd.grad(gx2, g_req, h)
    torch.testing.assert_close(gg.double(), h.double() @ deq.double().T, rtol=1e-5, atol=1e-5)


def test_eager_calls_skip_the_dispatcher_but_keep_its_effects(monkeypatch):
    """The public functions call an op's implementation directly in eager code without grad
    (the dispatcher's hops are the cost), the op itself under autograd or a dispatch mode;
    both give the same values, and an in-place op still bumps the mutated tensors' versions."""
    monkeypatch.setenv("LOWRANK_KERNELS", "reference")
    direct_calls = []
    real = ops._int8_sr_update.direct
    monkeypatch.setattr(
        ops._int8_sr_update, "direct", lambda *a: direct_calls.append(1) or real(*a)
    )
    codes, scales = R.quantize_int8(_randn(6, 42, seed=1), 16)
    update = _randn(6, 42, seed=2)
    c2, s2 = codes.clone(), scales.clone()
    version = codes._version
    ops.int8_sr_update(codes, scales, update, lr=0.1, wd=0.0, seed=5, group_size=16)
    assert direct_calls == [1] and codes._version > version
    torch.ops.lowrank_train.int8_sr_update(c2, s2, update, 0.1, 0.0, 5, 16)
    assert torch.equal(codes, c2) and torch.equal(scales, s2)
    # under a dispatch mode the op runs (its fake implementation, here)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(codes), mode.from_tensor(scales), mode.from_tensor(update)
        ops.int8_sr_update(*fake, lr=0.1, wd=0.0, seed=5, group_size=16)
    assert direct_calls == [1]
    # with grad, the op's autograd runs: grad_x = g deq(W)
    c8, s8 = R.quantize_int8(_randn(42, 64, seed=7), 16)
    x = _randn(5, 64, seed=8).requires_grad_()
    mm_calls = []
    real_mm = ops._int8_matmul.direct
    monkeypatch.setattr(ops._int8_matmul, "direct", lambda *a: mm_calls.append(1) or real_mm(*a))
    y = ops.int8_matmul(x, c8, s8, 16)
    assert mm_calls == [] and y.requires_grad  # the op, so autograd records it
    y.sum().backward()
    torch.testing.assert_close(x.grad, R.dequantize_int8(c8, s8, 16).sum(0).expand(5, -1))
    # grad mode off (inside another op's implementation, or an optimizer step): direct, even
    # for an argument that needs grad, since nothing would be recorded
    with torch.no_grad():
        y = ops.int8_matmul(x, c8, s8, 16)
    assert mm_calls == [1] and not y.requires_grad


def test_compile_traces_without_graph_break(monkeypatch):
    monkeypatch.setenv("LOWRANK_KERNELS", "reference")
    w = _randn(42, 64, seed=7)
    codes, scales = R.quantize_int8(w, 16)
    m = torch.zeros(5, 64, device=DEV)
    v = torch.zeros(5, 64, device=DEV)

    def loss(x):  # backward runs the registered autograd through AOT autograd
        return ops.int8_matmul(x, codes, scales, 16).square().sum()

    def update(gx):
        n = ops.adam_update(gx, m, v, beta1=0.9, beta2=0.999, eps=1e-8)
        return ops.stochastic_round_bf16(n, seed=3)

    def run(f_loss, f_update):
        x = _randn(5, 64, seed=8).requires_grad_()
        f_loss(x).backward()
        m.zero_(), v.zero_()
        return x.grad, f_update(x.grad)

    eager = run(loss, update)
    compiled = run(
        torch.compile(loss, backend="aot_eager", fullgraph=True),
        torch.compile(update, backend="aot_eager", fullgraph=True),
    )
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    assert m.abs().sum() > 0  # the compiled update mutated the moments in place


def test_package_import_has_no_side_effects():
    code = (
        "import sys, lowrank_train.kernels, lowrank_train.kernels.reference; "
        "bad = [m for m in ('triton', 'lowrank_train.kernels.ops', 'lowrank_train.kernels.quant') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_top_level_package_shadows_an_installed_one():
    """The repository root is on sys.path wherever Python runs from it (`python -m pytest`, the
    device's PYTHONPATH). A top-level package there hides any installed distribution of the same
    name: our old top-level `kernels/` hid Hugging Face's `kernels`, which transformers 5.25
    imports, and no test module could import transformers."""
    root = Path(__file__).resolve().parents[1]
    packages = sorted(p.parent.name for p in root.glob("*/__init__.py"))
    assert packages == ["lowrank_train"], packages
    assert not (root / "kernels").exists()
