"""Triton lowering of the `qcompile::` ops: the CUDA implementation of every quantized linear.

    from qcompile.lowering import triton as triton_lowering
    triton_lowering.register()     # True when Triton is installed; the ops then run Triton kernels on CUDA tensors

`register()` attaches one function per op with `torch.library.register_kernel(op, "cuda", fn)`, so `torch.compile`
and `torch.export` graphs use it too. The kernels module is imported on the first CUDA call, not before. Each call
picks a kernel by its arguments (see `dispatch.plan`) and falls back to the plain-PyTorch reference
(`qcompile.lowering.torch_reference`) for combinations no kernel covers. On the CPU the same kernels run on
Triton's interpreter in a process started with `TRITON_INTERPRET=1` (tests/test_triton_kernels.py), called through
`dispatch` directly.

What runs where (details in `kernels.py`):
- fp8_linear with fp8_e4m3 inputs: fused per-token / static FP8 activation quantization, then the FP8 GEMM with
  the scales and bias in the epilogue (or torch._scaled_mm where it measures faster for the shape);
- fp8_linear with unquantized inputs: FP8 weights (per tensor, per channel or 128x128 blocks) upcast in registers;
- int8_linear with int8 inputs: fused per-token / per-tensor INT8 quantization, then the INT8 GEMM (int32
  accumulation, scales in the epilogue); with unquantized inputs the INT8 weight is upcast in registers;
- int4_linear: INT4/INT3 (symmetric or with zero points) GEMM/GEMV with in-kernel dequantization, separate
  decode and prefill configurations; inputs unquantized, INT8, FP8, or NVFP4 (emulated, as below);
- nvfp4_linear with unquantized inputs: the NVFP4 weight-only GEMM/GEMV with in-kernel dequantization;
- nvfp4_linear with nvfp4 inputs: EMULATION on every GPU (no FP4 tensor cores are used): the activations are
  quantized to NVFP4 and dequantized by a fused kernel, then multiplied by the weight-only kernel.
"""

from __future__ import annotations

import importlib.util

OPS = ("int8_linear", "fp8_linear", "int4_linear", "nvfp4_linear")

NVFP4_ACTIVATIONS = (
    "emulated: activations are quantized to NVFP4 and dequantized in a fused Triton kernel, then multiplied by "
    "the NVFP4 weight-only kernel; numerically the NVFP4 product, without FP4 tensor cores"
)

_registered = False


def available() -> bool:
    """Whether Triton can be imported (the kernels need it; CUDA itself is checked per call)."""
    return importlib.util.find_spec("triton") is not None


def _cuda_impl(name: str):
    def impl(*args, **kwargs):
        from qcompile.lowering.triton import dispatch

        return getattr(dispatch, name)(*args, **kwargs)

    impl.__name__ = f"triton_{name}"
    impl.__qualname__ = impl.__name__
    return impl


def register() -> bool:
    """Register the Triton kernels as the CUDA implementation of the qcompile:: ops; idempotent.

    Returns False (and registers nothing) when Triton is not installed.
    """
    global _registered
    if _registered:
        return True
    if not available():
        return False
    import torch

    import qcompile.ops  # noqa: F401  (defines the ops; a no-op when called from qcompile.ops itself)

    for name in OPS:
        torch.library.register_kernel(f"qcompile::{name}", "cuda", _cuda_impl(name))
    _registered = True
    return True


__all__ = ["NVFP4_ACTIVATIONS", "OPS", "available", "register"]
