"""The quantized model as a module tree: the original model's modules, its linears replaced by `QuantizedLinear`.

A captured graph computes one whole forward; generation with a KV cache needs the model's own code (its cache
objects, attention masks, `generate`). `build_quantized_tree` takes the module tree that was captured
(`qcompile.capture.module_tree`) and the quantized graph, and installs in the tree what the graph computes:

- each quantized linear becomes a `QuantizedLinear` holding the same tensors and calling the same `qcompile::` op
  with the same arguments as the graph's node (its layer name is on the node);
- a constant that the algorithms put in place of a model parameter (a norm weight with SmoothQuant's or AWQ's
  scale folded in) replaces that parameter;
- an input multiplier (the 1/s that SmoothQuant/AWQ insert where no fold point exists) is applied by the layer;
- a quantized KV cache is applied by the attention modules (`qcompile.kv_cache`).

Every other tensor of the tree is the graph's own (shared by name), so the tree and the graph compute the same
function with the same storage.
"""

from __future__ import annotations

import torch
from torch import Tensor, fx, nn

from qcompile.ops import QUANTIZED_LINEAR_OPS, op_arguments
from qcompile.passes.quantize_linears import LAYER_NAME
from qcompile.passes.smoothquant import INPUT_MULTIPLIER, REPLACES


class QuantizedLinear(nn.Module):
    """One quantized linear: `op(x, *arguments)`, the tensors among the arguments registered as buffers."""

    def __init__(self, op, arguments: dict, in_features: int, out_features: int,
                 input_multiplier: Tensor | None = None):
        super().__init__()
        self.op = op
        self.in_features, self.out_features = in_features, out_features
        self.argument_names = list(arguments)
        self.constants = {}
        for name, value in arguments.items():
            if isinstance(value, Tensor):
                self.register_buffer(name, value)
            else:
                self.constants[name] = value
        self.register_buffer("input_multiplier", input_multiplier)

    def _twin(self, device_type: str):
        """The op's autograd-free twin for a device ("cpu": qcompile::cpu_*, "cuda": qcompile::cuda_*), or the op
        itself where it has none; looked up once per device."""
        twins = self.__dict__.get("_twins")
        if twins is None:
            twins = self.__dict__["_twins"] = {}
        twin = twins.get(device_type)
        if twin is None:
            if device_type == "cpu":
                from qcompile.lowering import cpu

                table = cpu.kernel_call_ops()
            elif device_type == "cuda":
                from qcompile.lowering import triton

                table = triton.kernel_call_ops()
            else:
                table = {}
            twin = twins[device_type] = table.get(self.op, self.op)
        return twin

    def extra_repr(self) -> str:
        fmt = self.constants.get("input_format", "none")
        return f"{self.in_features} -> {self.out_features}, {self.op._schema.name}, inputs {fmt}"

    def forward(self, x: Tensor) -> Tensor:
        if self.input_multiplier is not None:
            x = (x * self.input_multiplier).to(x.dtype)
        op = self.op
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            op = self._twin(x.device.type)  # the autograd-free twin, as the eager graph calls it
        args = [self.constants[name] if name in self.constants else getattr(self, name)
                for name in self.argument_names]
        return op(x, *args)


def _fetch(gm: fx.GraphModule, node):
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    if isinstance(node, fx.Node):
        raise NotImplementedError(f"a quantized layer's argument {node.name} is computed in the graph")
    return node


def build_quantized_tree(tree: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """Install the quantized graph's layers and folded constants in `tree` (in place); returns `tree`."""
    graph_tensors = {**dict(gm.named_buffers(remove_duplicate=False)),
                     **dict(gm.named_parameters(remove_duplicate=False))}
    replaced = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and REPLACES in node.meta:
            replaced[node.meta[REPLACES]] = _fetch(gm, node)
    # every tensor the tree shares with the graph, by name (the folded ones by the parameter they replace)
    for module_name, module in tree.named_modules():
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for key, value in list(table.items()):
                name = f"{module_name}.{key}" if module_name else key
                source = replaced.get(name, graph_tensors.get(name))
                if source is not None and value is not None and source is not value:
                    table[key] = nn.Parameter(source, requires_grad=False) if kind == "_parameters" else source
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in QUANTIZED_LINEAR_OPS:
            continue
        layer = node.meta.get(LAYER_NAME)
        if layer is None or "#" in layer:
            raise NotImplementedError(f"graph node {node.name} is a quantized linear with no single module to replace")
        original = tree.get_submodule(layer)
        if not _is_linear_module(original):
            raise NotImplementedError(
                f"layer {layer!r} is a {type(original).__name__}, not a linear module; its quantized form runs in the "
                "captured graph only (exclude it to generate with this model)"
            )
        values = op_arguments(node)
        x = values.pop("x")
        multiplier = None
        if isinstance(x, fx.Node) and INPUT_MULTIPLIER in x.meta:
            multiplier = getattr(gm, x.meta[INPUT_MULTIPLIER])
        arguments = {name: _fetch(gm, value) for name, value in values.items()}
        weight_shape = _weight_shape(original)
        quantized = QuantizedLinear(node.target, arguments, weight_shape[1], weight_shape[0], multiplier)
        parent_name, _, attr = layer.rpartition(".")
        setattr(tree.get_submodule(parent_name) if parent_name else tree, attr, quantized)
    from qcompile.kv_cache import install_kv_quantization

    install_kv_quantization(tree, gm)
    freeze_parameters(tree)  # inference only, as the graph
    return tree.eval()


def freeze_parameters(root: nn.Module) -> None:
    """Parameters that require grad become detached copies that do not (same storage, ties kept), instead of
    flipping requires_grad on parameters shared with the caller's model."""
    frozen: dict[int, nn.Parameter] = {}
    for module in root.modules():
        for key, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.requires_grad:
                if id(parameter) not in frozen:
                    frozen[id(parameter)] = nn.Parameter(parameter.detach(), requires_grad=False)
                module._parameters[key] = frozen[id(parameter)]


def _is_linear_module(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2: a linear with its weight stored [in, out])."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    out_features, in_features = module.weight.shape
    return (in_features, out_features) if type(module).__name__ == "Conv1D" else (out_features, in_features)
