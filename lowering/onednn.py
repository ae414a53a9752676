"""INT8 layers for frozen CPU graphs: the pattern inductor's x86 passes turn into oneDNN's prepacked INT8 GEMM.

    from qcompile.lowering import onednn
    onednn.rewrite_int8_linears(gm)   # then compile gm with inductor and freezing on

Inductor, when it freezes a graph (`torch._inductor.config.freezing`, inference), rewrites PyTorch 2 quantization's
`dequantize_per_tensor(uint8 x) → linear(x, dequantize_per_channel(constant int8 weight))` into oneDNN's
`qlinear_pointwise` on a weight prepacked once, and fuses what follows (bias, GELU, ...) into that call. This pass
writes each `qcompile::int8_linear` with INT8 inputs in that form, keeping the INT8 numerics of docs/formats.md#int8:

- the codes are the reference's (x / scale, round half to even, clamp to ±127), shifted by +128 into uint8 with
  zero point 128: oneDNN's VNNI kernels take u8 × s8, and the shift gives the same integers, so the product is the
  same exact sum as `torch._int_mm`'s;
- a static per-tensor scale (`int8_sq`) is oneDNN's input scale, so the float ops after the GEMM fuse into it; a
  per-token scale (`int8_dynamic`) is applied after the GEMM, as in the eager path: (acc · s_w) · s_x + bias;
- non-finite inputs raise the same ValueError as the eager path, from one check of all the layers' input amax at
  the end of the graph (see `rewrite_int8_linears`).

The weight must be a constant of the graph being compiled, so the pass is for graphs whose quantized weights are
their own attributes, compiled with freezing: `backend="quant"` does it for its INT8 graphs, and a `QuantizedModel`
for `torch.compile(qm)` under `torch._inductor.config.freezing = True`. Measured on MiniLM (`benchmarks/cpu.py`),
the GEMM itself runs at the speed of `torch._int_mm`: the gain is the elementwise work that oneDNN takes over.
"""

from __future__ import annotations

import functools

import torch
import torch._inductor.inductor_prims  # noqa: F401  (defines prims.inductor_force_stride_order)
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines the quantized_decomposed ops)
from torch import Tensor, fx

from qcompile.lowering.cpu import activation_scale, int8

_DECOMPOSED = torch.ops.quantized_decomposed


def _weight_scaled(weight: Tensor, weight_scale: Tensor) -> Tensor:
    scales = weight_scale.to(torch.float32).reshape(-1).expand(weight.shape[0]).contiguous()
    return _DECOMPOSED.dequantize_per_channel.default(weight, scales, None, 0, -128, 127, torch.int8)


def per_token_pattern(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, check: bool):
    """Dynamic per-token INT8: codes at zero point 128 and scale 1 into the GEMM, the token scale after it.

    Returns (output, amax of each token of the input): with `check`, it is checked here; otherwise by the caller,
    unreduced (see `activation_scale.check_finite_amax`).
    """
    # The token amax must be known before the first code: two passes over x. Left unrealized (say, x = GELU of the
    # previous layer's scaled output), inductor would recompute x in each pass; a buffer costs one write and read.
    x = torch.ops.prims.inductor_force_stride_order.default(x, x.stride())
    codes, scale, amax = int8.int8_codes(x.to(torch.float32), None, "token")
    if check:
        scale = activation_scale.checked_input_scale(scale, amax)
    shifted = _DECOMPOSED.dequantize_per_tensor.default((codes + 128).to(torch.uint8), 1.0, 128, 0, 255, torch.uint8)
    out = torch.nn.functional.linear(shifted, _weight_scaled(weight, weight_scale)) * scale
    out = out if bias is None else out + bias.to(torch.float32)
    return out.to(x.dtype), amax


def per_tensor_pattern(
    x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None, input_scale: Tensor, scale_value: float,
    check: bool,
):
    """Static per-tensor INT8: `scale_value` (the value of `input_scale`) is oneDNN's input scale.

    Returns (output, amax of the input), as `per_token_pattern`.
    """
    x32 = x.to(torch.float32)
    amax = x32.abs().amax()
    scale = activation_scale.checked_input_scale(input_scale.to(torch.float32), amax) if check else input_scale
    codes, _, _ = int8.int8_codes(x32, scale, "tensor")
    shifted = (codes + 128).to(torch.uint8)
    dequantized = _DECOMPOSED.dequantize_per_tensor.default(shifted, scale_value, 128, 0, 255, torch.uint8)
    bias = None if bias is None else bias.to(torch.float32)
    out = torch.nn.functional.linear(dequantized, _weight_scaled(weight, weight_scale), bias)
    return out.to(x.dtype), amax


def _attribute(gm: fx.GraphModule, node: fx.Node) -> Tensor:
    return functools.reduce(getattr, node.target.split("."), gm)


def _example(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def _is_cpu_int8_gemm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.ops.qcompile.int8_linear.default:
        return False
    x, weight, weight_scale, bias, input_scale, input_format, granularity = node.args
    if weight.op != "get_attr":
        return False
    value = _attribute(gm, weight)
    example = _example(x)
    x_dtype = torch.float32 if example is None else example.dtype
    return (
        value.device.type == "cpu"
        and int8.takes_integer_gemm(x_dtype, value.shape[-1], value, input_format, granularity)
        and (granularity == "token" or (input_scale is not None and input_scale.op == "get_attr"))
    )


def _float_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    found = []
    fx.node.map_arg(gm.graph.output_node().args, found.append)
    return [node for node in found if isinstance(_example(node), Tensor) and _example(node).is_floating_point()]


def rewrite_int8_linears(gm: fx.GraphModule) -> int:
    """Replace every CPU `qcompile::int8_linear` with INT8 inputs by the patterns above; returns how many.

    Non-finite inputs raise the ValueError of the eager path. The amax of every rewritten layer's input is checked
    once, at the end of the graph (`qcompile::check_finite_amax`, whose result multiplies the float outputs by
    exactly 1 so that it stays in the graph): one call instead of one per layer, and the quantization of a static
    input need not wait for its check. A graph without a float output checks each layer where it runs.
    """
    check_each = not _float_outputs(gm)
    tracer = fx.proxy.GraphAppendingTracer(gm.graph)
    amaxes = []
    for node in list(gm.graph.nodes):
        if not _is_cpu_int8_gemm(gm, node):
            continue
        x, weight, weight_scale, bias, input_scale, _, granularity = node.args
        if granularity == "token":
            fn, args = per_token_pattern, (x, weight, weight_scale, bias, check_each)
        else:
            value = float(_attribute(gm, input_scale))
            fn, args = per_tensor_pattern, (x, weight, weight_scale, bias, input_scale, value, check_each)
        # calling the pattern on proxies of the node's inputs appends its ops to gm's graph, here
        with gm.graph.inserting_before(node):
            out, amax = fn(*[fx.Proxy(arg, tracer) if isinstance(arg, fx.Node) else arg for arg in args])
        out.node.meta.update(node.meta)  # same value: shape, dtype, source
        node.replace_all_uses_with(out.node)
        gm.graph.erase_node(node)
        amaxes.append(amax)
    if amaxes and not check_each:
        outputs = _float_outputs(gm)  # after the rewrite: an output may be a rewritten layer's
        output = gm.graph.output_node()
        with gm.graph.inserting_before(output):
            one = activation_scale.check_finite_amax(amaxes)
            checked = {node: (fx.Proxy(node, tracer) * one.to(_example(node).dtype)).node for node in outputs}
        output.args = fx.node.map_arg(output.args, lambda node: checked.get(node, node))
    if amaxes:
        gm.graph.lint()
        gm.recompile()
    return len(amaxes)


__all__ = ["per_tensor_pattern", "per_token_pattern", "rewrite_int8_linears"]
