"""Triton lowering of the `qcompile::` ops: the CUDA implementation of every quantized linear.

    from qcompile.lowering import triton as triton_lowering
    triton_lowering.register()     # True when Triton is installed; the ops then run Triton kernels on CUDA tensors

`register()` attaches one function per op as its CUDA kernel (directly with the dispatcher), so `torch.compile` and
`torch.export` graphs use it too, and defines the autograd-free twins `qcompile::cuda_<op>` that inference graphs
call (`kernel_call_ops`, `use_kernel_call_ops`). The kernels module is imported on the first CUDA call, not before.
Each call picks a kernel by its arguments (see `dispatch.plan`) and falls back to the plain-PyTorch reference
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
    """The CUDA implementation of op `name`: `dispatch.<name>`, imported (with the kernels) on the first call."""
    target = None

    def impl(*args, **kwargs):
        nonlocal target
        if target is None:
            from qcompile.lowering.triton import dispatch

            target = getattr(dispatch, name)
        return target(*args, **kwargs)

    impl.__name__ = f"triton_{name}"
    impl.__qualname__ = impl.__name__
    return impl


_LIBRARY = None
_TWIN_LIBRARY = None


def register() -> bool:
    """Register the Triton kernels as the CUDA implementation of the qcompile:: ops, and define their
    autograd-free twins `qcompile::cuda_<op>` (see `kernel_call_ops`); idempotent.

    Returns False (and registers nothing) when Triton is not installed.
    """
    global _registered, _LIBRARY, _TWIN_LIBRARY
    if _registered:
        return True
    if not available():
        return False
    import torch

    import qcompile.ops  # noqa: F401  (defines the ops; a no-op when called from qcompile.ops itself)

    # Registered with the dispatcher directly, not through custom_op's register_kernel: its Python wrapper (a dynamo
    # guard and an aliasing check) cost 10-20 us per call (benchmarks/host_overhead.py), more than a decode GEMV's
    # device time. The functions return new tensors, which is all that check verifies.
    _LIBRARY = torch.library.Library("qcompile", "IMPL")
    _TWIN_LIBRARY = torch.library.Library("qcompile", "FRAGMENT")
    for name in OPS:
        _LIBRARY.impl(name, _cuda_impl(name), "CUDA")
        _define_twin(_TWIN_LIBRARY, name)
    _registered = True
    return True


# Inference graphs call the kernels through twins of the public ops, `qcompile::cuda_<op>`: the same schema and
# implementation, without the public ops' autograd formula. Under no_grad the public op's Python autograd layer still
# runs and redispatches on every call (5-10 us on the host, about a decode GEMV's device time); a twin goes from the
# dispatcher straight to `dispatch`. They exist only where Triton does (without it CUDA tensors run the reference through the public ops).
def _define_twin(library, name: str) -> None:
    import torch

    public = getattr(torch.ops.qcompile, name).default
    schema = str(public._schema).split("::", 1)[1]
    library.define(f"cuda_{schema}")
    library.impl(f"cuda_{name}", _cuda_impl(name), "CUDA")
    # other devices (a graph moved off the GPU): the public op
    library.impl(f"cuda_{name}", lambda *args, _public=public: _public(*args), "CompositeExplicitAutograd")
    # shapes (and errors on bad input) exactly as the public op's fake kernel gives them
    torch.library.register_fake(f"qcompile::cuda_{name}", lib=library)(lambda *args, _public=public: _public(*args))
    from torch._inductor import lowering

    lowering.make_fallback(getattr(torch.ops.qcompile, f"cuda_{name}").default)


def kernel_call_ops() -> dict:
    """{public op: its autograd-free CUDA twin}; empty when Triton is not installed. For graphs and calls that run
    without autograd (the `quant` backend's graphs, inference) on CUDA tensors."""
    import torch

    from qcompile.lowering import ensure_registered

    ensure_registered()
    if not _registered:
        return {}
    return {getattr(torch.ops.qcompile, name).default: getattr(torch.ops.qcompile, f"cuda_{name}").default
            for name in OPS}


def on_cuda(value) -> bool:
    """Whether `value` is a CUDA tensor (the layers whose calls the twins take; one place, for tests on the CPU)."""
    return getattr(value, "is_cuda", False)


def use_kernel_call_ops(gm) -> int:
    """Retarget, in place, the public-op calls of an inference graph whose weights are CUDA tensors to the
    autograd-free twins; returns how many. Nodes on other devices (or whose weight is not a graph constant) keep the
    public op."""
    twins = kernel_call_ops()
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in twins or len(node.args) < 2:
            continue
        weight = node.args[1]
        if getattr(weight, "op", None) != "get_attr":
            continue
        value = gm
        for part in str(weight.target).split("."):
            value = getattr(value, part, None)
        if on_cuda(value):
            node.target = twins[node.target]
            changed += 1
    if changed:
        gm.recompile()
    return changed


__all__ = ["NVFP4_ACTIVATIONS", "OPS", "available", "kernel_call_ops", "on_cuda", "register", "use_kernel_call_ops"]
