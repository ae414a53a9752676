"""Lowerings of the `qcompile::` ops: plain PyTorch (`torch_reference`, the default), CPU kernels (`cpu`), Triton
kernels for CUDA (`triton`), ONNX (`onnx`).

The device lowerings register themselves with the dispatcher and inductor through `ensure_registered()`, once per
process, the first time an op or its fake runs (`qcompile.ops`): registering pulls in inductor, which a plain
`import qcompile` should not pay for.
"""

from __future__ import annotations

_registered = False


def ensure_registered() -> bool:
    """Register every device lowering (idempotent). True only for the call that registered them, whose op call
    must then dispatch again to reach its device's kernel."""
    global _registered
    if _registered:
        return False
    _registered = True  # first: registration itself runs the ops' fakes
    from qcompile.lowering import compile_cache, cpu, triton

    # CUDA tensors run the Triton kernels when Triton is installed (the kernels module loads on the first CUDA call)
    triton.register()
    # CPU tensors run the integer kernels where they keep the reference's numerics
    cpu.register()
    # what a graph of these ops compiles to is decided here, which torch.compile's on-disk caches do not see
    compile_cache.tag()
    return True


__all__ = ["ensure_registered"]
