"""The `qcompile::` operator library: one op per weight-format family.

Every op takes the activation `x [..., K]`, the stored quantized weight of logical shape `[N, K]` with its scales,
an optional bias, and a description of how the activation is quantized before the product:

- `input_format`: "none" (weight-only), "int8", "fp8_e4m3" or "nvfp4";
- `input_granularity`: "tensor", "token" or "block";
- `input_scale`: the static scale from calibration (for nvfp4, the global scale), or None for a dynamic scale
  computed on every call.

Each op has a fake (meta) implementation, so quantized graphs export, compile with inductor and translate to ONNX.
The default implementation is the plain-PyTorch reference in `qcompile.lowering.torch_reference`. This module holds
the schemas, fakes and autograd formulas only: the device lowerings (CPU kernels and their inductor decompositions,
Triton kernels for CUDA) register themselves through `qcompile.lowering.ensure_registered()`, which the first call of
any op, or of its fake (every trace, export and compilation runs those), makes. Importing qcompile therefore does not
import inductor.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, fx

from qcompile.lowering import ensure_registered
from qcompile.lowering import torch_reference as ref


def _output_like(x: Tensor, out_features: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("qcompile::int8_linear", mutates_args=())
def int8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Optional[Tensor],
    input_scale: Optional[Tensor],
    input_format: str,
    input_granularity: str,
) -> Tensor:
    """INT8 weight `[N, K]` with per-tensor or per-channel float32 scale."""
    if ensure_registered():  # the device's kernel is registered now: dispatch again
        return torch.ops.qcompile.int8_linear.default(x, weight, weight_scale, bias, input_scale, input_format,
                                                      input_granularity)
    return ref.int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity)


@int8_linear.register_fake
def _(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    ensure_registered()
    return _output_like(x, weight.shape[0])


@torch.library.custom_op("qcompile::fp8_linear", mutates_args=())
def fp8_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    block_size: int,
    bias: Optional[Tensor],
    input_scale: Optional[Tensor],
    input_format: str,
    input_granularity: str,
) -> Tensor:
    """FP8 E4M3 weight `[N, K]`; scale per tensor, per channel, or per `block_size`² block (block_size > 0)."""
    if ensure_registered():  # the device's kernel is registered now: dispatch again
        return torch.ops.qcompile.fp8_linear.default(x, weight, weight_scale, block_size, bias, input_scale,
                                                     input_format, input_granularity)
    return ref.fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity)


@fp8_linear.register_fake
def _(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
    ensure_registered()
    return _output_like(x, weight.shape[0])


@torch.library.custom_op("qcompile::int4_linear", mutates_args=())
def int4_linear(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero_point: Optional[Tensor],
    group_size: int,
    bits: int,
    in_features: int,
    bias: Optional[Tensor],
    input_scale: Optional[Tensor],
    input_format: str,
    input_granularity: str,
    fp8_scale: Optional[Tensor] = None,
) -> Tensor:
    """INT4/INT3 weight in groups along K, two codes per byte; `zero_point` is None when symmetric. `fp8_scale`
    (W4A8): the per-tensor scale through which code x group scale is rounded to FP8 (docs/formats.md#w4a8)."""
    if ensure_registered():  # the device's kernel is registered now: dispatch again
        return torch.ops.qcompile.int4_linear.default(x, packed, scale, zero_point, group_size, bits, in_features,
                                                      bias, input_scale, input_format, input_granularity, fp8_scale)
    return ref.int4_linear(
        x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
        fp8_scale,
    )


@int4_linear.register_fake
def _(x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
      fp8_scale=None):
    ensure_registered()
    return _output_like(x, packed.shape[0])


@torch.library.custom_op("qcompile::nvfp4_linear", mutates_args=())
def nvfp4_linear(
    x: Tensor,
    packed: Tensor,
    block_scale: Tensor,
    global_scale: Tensor,
    in_features: int,
    bias: Optional[Tensor],
    input_scale: Optional[Tensor],
    input_format: str,
    input_granularity: str,
) -> Tensor:
    """NVFP4 weight: E2M1 codes two per byte, FP8 E4M3 scale per 16 elements, float32 global scale."""
    if ensure_registered():  # the device's kernel is registered now: dispatch again
        return torch.ops.qcompile.nvfp4_linear.default(x, packed, block_scale, global_scale, in_features, bias,
                                                       input_scale, input_format, input_granularity)
    return ref.nvfp4_linear(
        x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity
    )


@nvfp4_linear.register_fake
def _(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity):
    ensure_registered()
    return _output_like(x, packed.shape[0])



@torch.library.custom_op("qcompile::kv_round_trip", mutates_args=())
def kv_round_trip(x: Tensor, scale: Tensor, format: str) -> Tensor:
    """Keys or values `[..., head_dim]` as a quantized KV cache stores them, back in x's dtype: `format` "fp8"
    (static per-tensor scale) or "nvfp4" (blocks of 16 along the last axis under the static global `scale`)."""
    if ensure_registered():  # the device's kernel is registered now: dispatch again
        return torch.ops.qcompile.kv_round_trip.default(x, scale, format)
    return ref.kv_round_trip(x, scale, format)


@kv_round_trip.register_fake
def _(x, scale, format):
    ensure_registered()
    return torch.empty_like(x)


# Gradients pass straight through the rounding, as for the linears below.
kv_round_trip.register_autograd(lambda ctx, grad: (grad, None, None))

# ------------------------------------------------------------------------------------------------- autograd
# The weights are frozen codes, so only the activation and the bias get gradients: d x = d out @ W, d bias = sum of
# d out, with W the dequantized weight. Quantized activations pass the gradient straight through (the usual
# straight-through estimate). This lets a quantized layer sit inside a model that is still trained around it
# (adapters, heads) and lets graphs with parameters that require grad compile.


def _register_backward(op, bias_index: int, dequantize_weight, trailing_weight_args: int = 0) -> None:
    """`trailing_weight_args`: weight arguments after the activation's (int4's W4A8 FP8 scale)."""
    def setup_context(ctx, inputs, output):
        ctx.weight_args = (*inputs[1:bias_index], *inputs[len(inputs) - trailing_weight_args:])
        ctx.x_dtype = inputs[0].dtype
        bias = inputs[bias_index]
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad):
        grads = [None] * ctx.num_inputs
        if ctx.needs_input_grad[0]:
            w = dequantize_weight(*ctx.weight_args)
            grads[0] = (grad.to(w.dtype) @ w).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[bias_index]:
            grads[bias_index] = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return tuple(grads)

    op.register_autograd(backward, setup_context=setup_context)


_register_backward(int8_linear, 3, lambda weight, scale: ref.dequantize_int8_weight(weight, scale))
_register_backward(fp8_linear, 4, lambda weight, scale, block_size: ref.dequantize_fp8_weight(weight, scale, block_size))
_register_backward(int4_linear, 7, lambda *weight: ref.dequantize_int4_weight(*weight), trailing_weight_args=1)
_register_backward(nvfp4_linear, 5, lambda *weight: ref.dequantize_nvfp4_weight(*weight))


QUANTIZED_LINEAR_OPS = (
    torch.ops.qcompile.int8_linear.default,
    torch.ops.qcompile.fp8_linear.default,
    torch.ops.qcompile.int4_linear.default,
    torch.ops.qcompile.nvfp4_linear.default,
)


def op_arguments(node: fx.Node) -> dict[str, Any]:
    """The arguments of a node calling a `qcompile::` op (or any op overload), by their schema names: graph passes
    read `x`, `weight`, `input_scale`, ... by name, not by position."""
    names = [argument.name for argument in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}
