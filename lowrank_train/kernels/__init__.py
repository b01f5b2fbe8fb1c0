"""Quantization, stochastic rounding, fused-update and dequant-matmul kernels.

Installed as ``lowrank_train.kernels``. Four layers (STYLE.md section 2 item 8):
``reference.py`` (pure PyTorch: the test oracle and the CPU path), ``quant.py``, ``rounding.py``,
``fused_adam.py``, ``matmul.py`` (a Triton kernel and its checking launcher each) and ``ops.py``
(``torch.library`` custom ops, fake impls, autograd and dispatch).

This file has no side effects on purpose: bitsandbytes runs ``from kernels import ...`` at import,
which can load this folder a second time under the top-level name ``kernels`` when the repository
root is on ``sys.path``; importing ``ops`` from here would then register every custom op twice.
Triton also reads ``TRITON_INTERPRET`` when ``@triton.jit`` runs, so the kernel modules must be
imported only after a test has set it. Import the submodule you need:
``from lowrank_train.kernels import reference`` or ``from lowrank_train.kernels import ops``.
"""
