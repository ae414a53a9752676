"""CPU lowering of the `qcompile::` ops: integer GEMMs where the CPU has them, the reference everywhere else.

    from qcompile.lowering import cpu
    cpu.register()   # the ops then run these functions on CPU tensors, eager and under torch.compile

This module registers the kernels with the dispatcher and inductor (`register`, normally run by
`qcompile.lowering.ensure_registered()`) and defines the autograd-free twins that compiled graphs and eager
inference call (`kernel_call_ops`). The kernels live in `int8` (INT8 layers), `fp8` (FP8 layers and FP8/E2M1
rounding in plain ops) and `four_bit` (INT4 and NVFP4 weights), with `activation_scale` and `weight_cache` shared by
them. What runs where, and why: docs/cpu-lowering.md.
"""

from __future__ import annotations

import torch

from qcompile.lowering.cpu.fp8 import decompose_fp8_linear, fake_quantize_input
from qcompile.lowering.cpu.four_bit import int4_linear, nvfp4_linear
from qcompile.lowering.cpu.int8 import (
    INT8_ACTIVATIONS,
    check_shared_arguments,
    decompose_int8_linear,
    int8_linear,
    int8_linear_activation,
    int8_linear_shared,
)

_registered = False
_LIBRARY: torch.library.Library | None = None
_CALL_OPS_LIBRARY: torch.library.Library | None = None


def register() -> None:
    """Make these functions the CPU kernels of the ops, and the int8 decomposition part of inductor's table."""
    global _registered
    if _registered:
        return
    import qcompile.ops  # noqa: F401  (defines the ops)

    # Registered with the dispatcher directly rather than through custom_op's register_kernel, whose Python
    # wrapper (a dynamo guard and an aliasing check per call) cost ~25 us a call, as much as a small decode GEMV.
    # The functions return new tensors, which is all that check verifies.
    global _LIBRARY
    _LIBRARY = torch.library.Library("qcompile", "IMPL")
    for name, fn in _cpu_kernels().items():
        _LIBRARY.impl(name, fn, "CPU")
    global _CALL_OPS_LIBRARY
    _CALL_OPS_LIBRARY = torch.library.Library("qcompile", "FRAGMENT")
    _define_kernel_call_ops(_CALL_OPS_LIBRARY)
    _define_fused_activation_op(_CALL_OPS_LIBRARY)
    _define_shared_input_op(_CALL_OPS_LIBRARY)
    _register_inductor_decomposition()
    _registered = True


# Compiled graphs call the CPU kernels through ops of their own, `qcompile::cpu_<op>`: the same schema and
# function, with no autograd formula. By the time inductor emits a call, autograd has been traced away, but the
# public ops' Python autograd layer (register_autograd) still ran on every call and redispatched: ~45 us per call,
# as much as a decode step's GEMV (210 calls per SmolLM2 token). An op without autograd goes straight from the
# dispatcher to the kernel.
def _cpu_kernels() -> dict:
    """The ops that have CPU kernels here, by name."""
    return {"int8_linear": int8_linear, "int4_linear": int4_linear, "nvfp4_linear": nvfp4_linear}


def kernel_call_ops() -> dict:
    """{public op: its autograd-free twin} for the ops with CPU kernels here."""
    from qcompile.lowering import ensure_registered

    ensure_registered()
    return {getattr(torch.ops.qcompile, name).default: getattr(torch.ops.qcompile, f"cpu_{name}").default
            for name in _cpu_kernels()}


def _define_kernel_call_ops(library: torch.library.Library) -> None:
    for name, fn in _cpu_kernels().items():
        public = getattr(torch.ops.qcompile, name).default
        schema = str(public._schema).split("::", 1)[1]
        library.define(f"cpu_{schema}")
        library.impl(f"cpu_{name}", fn, "CPU")
        # shapes (and errors on bad input) exactly as the public op's fake kernel gives them
        torch.library.register_fake(f"qcompile::cpu_{name}", lib=library)(
            lambda *args, _public=public: _public(*args)
        )


def _define_fused_activation_op(library: torch.library.Library) -> None:
    """`qcompile::cpu_int8_linear_activation`: an INT8 layer and the activation after it, in one kernel call
    (`int8_linear_activation`); no autograd, like the twins above, and only in graphs for inference."""
    schema = str(torch.ops.qcompile.int8_linear.default._schema).split("::", 1)[1]
    name, arguments = schema.split("(", 1)
    library.define(f"cpu_{name}_activation({arguments.replace(') -> Tensor', ', str activation) -> Tensor')}")
    library.impl("cpu_int8_linear_activation", int8_linear_activation, "CPU")

    @torch.library.register_fake("qcompile::cpu_int8_linear_activation", lib=library)
    def _(x, weight, weight_scale, bias, input_scale, input_format, input_granularity, activation):
        if activation not in INT8_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(INT8_ACTIVATIONS)}")
        return torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, input_scale, input_format,
                                              input_granularity)


def _define_shared_input_op(library: torch.library.Library) -> None:
    """`qcompile::cpu_int8_linear_shared`: the INT8 layers that read one tensor, in one kernel call
    (`int8_linear_shared`); no autograd, like the twins above, and only in graphs for inference."""
    library.define(
        "cpu_int8_linear_shared(Tensor x, Tensor[] weights, Tensor[] weight_scales, Tensor?[] biases, "
        "Tensor? input_scale, str input_format, str input_granularity, str[] activations) -> Tensor[]"
    )
    library.impl("cpu_int8_linear_shared", int8_linear_shared, "CPU")

    @torch.library.register_fake("qcompile::cpu_int8_linear_shared", lib=library)
    def _(x, weights, weight_scales, biases, input_scale, input_format, input_granularity, activations):
        check_shared_arguments(weights, weight_scales, biases, activations)
        return [torch.ops.qcompile.int8_linear(x, w, s, b, input_scale, input_format, input_granularity)
                for w, s, b in zip(weights, weight_scales, biases)]


def _four_bit_kernel_call(name: str):
    """Inductor decomposition of a 4-bit op on CPU tensors into its `qcompile::cpu_` twin (see above), with a
    quantized input's round trip (W4A8's FP8, NVFP4's blocks) taken out of the call as aten ops that inductor fuses.

    Inside the call the reference's own eager chain would quantize the input (a dozen passes over it and FP8 casts
    element by element; MiniLM W4A8 ran at 0.54x of FP32 eager, NVFP4 at 0.23x). The kernel gets the same float32
    values either way."""
    call = getattr(torch.ops.qcompile, f"cpu_{name}").default
    names = [argument.name for argument in call._schema.arguments]
    first_input_arg = names.index("input_scale")

    def decompose(x, *args, **kwargs):
        if x.device.type != "cpu":
            return NotImplemented
        values = {**dict(zip(names[1:], args)), **kwargs}
        weight_args = [values.get(n) for n in names[1:first_input_arg]]
        trailing = [values[n] for n in names[first_input_arg + 3:] if values.get(n) is not None]  # W4A8's FP8 scale
        quantized = fake_quantize_input(x, values["input_scale"], values["input_format"], values["input_granularity"])
        if quantized is None:
            return call(x, *args, **kwargs)
        return call(quantized, *weight_args, None, "none", "tensor", *trailing).to(x.dtype)

    return decompose


def _register_inductor_decomposition() -> None:
    from torch._inductor import decomposition, lowering

    for op, decompose in [(torch.ops.qcompile.int8_linear.default, decompose_int8_linear),
                          (torch.ops.qcompile.fp8_linear.default, decompose_fp8_linear),
                          (torch.ops.qcompile.int4_linear.default, _four_bit_kernel_call("int4_linear")),
                          (torch.ops.qcompile.nvfp4_linear.default, _four_bit_kernel_call("nvfp4_linear"))]:
        decomposition.register_decomposition(op)(decompose)
        # where the decomposition declines (NotImplemented: another device, another format), inductor calls the op
        lowering.make_fallback(op, override_decomp=True)
    for name in [*_cpu_kernels(), "int8_linear_activation", "int8_linear_shared"]:
        lowering.make_fallback(getattr(torch.ops.qcompile, f"cpu_{name}").default)


__all__ = ["kernel_call_ops", "register"]
