"""INT8 layers and the activation after them in one kernel call, on CPUs that run `native`'s INT8 kernel.

    from qcompile.lowering import activation_fusion
    activation_fusion.fuse_int8_activations(gm)   # a graph for inference, whose quantized weights are attributes

`int8_linear → GELU (erf form)` and `int8_linear → SiLU` become one `qcompile::cpu_int8_linear_activation`, which
applies the activation to each output tile while it is still in registers (`int8_gemm.c`). Apart, the activation is
a pass of its own over the layer's output: MiniLM's [1024, 1536] GELU output is 6 MB, read and written once more per
layer (~5% of a forward on a 2-core AVX2 CPU; the net gain, the GELU's arithmetic now being in the kernel, measured
~1.3%). The layer's numerics (docs/formats.md#int8) are unchanged; the kernel's GELU and SiLU are within a few
float32 ulps of the exact functions.

A layer is fused only where the kernel will run it (x86 with AVX2 and no INT8 dot product, float32 activations; see
`qcompile.lowering.cpu.int8.takes_native_int8_gemm`), so that elsewhere the graph keeps the op that inductor lowers to
the integer GEMMs of those CPUs, and only when the activation is the layer's one user (the activation-free output
is not needed by anything else). The fused op has no autograd formula: the pass is for graphs run without it
(`backend="quant"`, a `QuantizedModel` called under `no_grad`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qcompile.lowering import ensure_registered
from qcompile.lowering.cpu import int8
from qcompile.ops import op_arguments

ensure_registered()  # defines the qcompile::cpu_ ops these graph rewrites place
INT8_LINEARS = (torch.ops.qcompile.int8_linear.default, torch.ops.qcompile.cpu_int8_linear.default)
# the call targets a graph shows for each activation: dynamo's (torch functions) and export's (aten ops)
_ACTIVATION_TARGETS = {
    torch.ops.aten.gelu.default: "gelu",
    torch._C._nn.gelu: "gelu",
    F.gelu: "gelu",
    torch.ops.aten.silu.default: "silu",
    torch._C._nn.silu: "silu",
    F.silu: "silu",
}


def _activation(node: fx.Node) -> str | None:
    """The fusable activation that `node` applies to its first argument, if any (GELU only in its erf form)."""
    if node.op != "call_function" or node.target not in _ACTIVATION_TARGETS or len(node.args) < 1:
        return None
    name = _ACTIVATION_TARGETS[node.target]
    if name == "gelu":
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        if approximate != "none":
            return None
    elif len(node.args) > 1 or node.kwargs.get("inplace", False):
        return None
    return name


def constant_value(gm: fx.GraphModule, node) -> Tensor | None:
    """The tensor of a get_attr node (None for None); LookupError for anything else."""
    if node is None:
        return None
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise LookupError
    return functools.reduce(getattr, node.target.split("."), gm)


def runs_native_int8_kernel(gm: fx.GraphModule, linear: fx.Node) -> bool:
    """Whether the INT8 layer `linear` (public op, twin or fused with its activation; constants as attributes of `gm`)
    runs `native`'s kernel."""
    args = op_arguments(linear)
    x, input_format, granularity = args["x"], args["input_format"], args["input_granularity"]
    weight, weight_scale, input_scale = args["weight"], args["weight_scale"], args["input_scale"]
    example = x.meta.get("val", x.meta.get("example_value")) if isinstance(x, fx.Node) else None
    if not isinstance(example, Tensor) or example.dtype != torch.float32:
        return False
    try:
        weight, weight_scale, input_scale = (constant_value(gm, node) for node in (weight, weight_scale, input_scale))
    except LookupError:  # not constants of this graph: their dtypes and shapes are not known here
        return False
    return weight.device.type == "cpu" and int8.takes_native_int8_gemm(
        example.dtype, weight, weight_scale, input_scale, input_format, granularity
    )


def fuse_int8_activations(gm: fx.GraphModule) -> int:
    """Replace each `int8_linear → activation` that `native`'s kernel can run in one call; returns how many."""
    fused = 0
    for node in list(gm.graph.nodes):
        activation = _activation(node)
        linear = node.args[0] if activation else None
        if not (
            isinstance(linear, fx.Node)
            and linear.op == "call_function"
            and linear.target in INT8_LINEARS
            and len(linear.users) == 1
            and runs_native_int8_kernel(gm, linear)
        ):
            continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(torch.ops.qcompile.cpu_int8_linear_activation.default,
                                          (*linear.args, activation))
        call.meta.update(node.meta)  # the activation's output: same shape and dtype
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        gm.graph.erase_node(linear)
        fused += 1
    if fused:
        gm.graph.lint()
        gm.recompile()
    return fused


__all__ = ["INT8_LINEARS", "constant_value", "fuse_int8_activations", "runs_native_int8_kernel"]
