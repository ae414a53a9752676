"""The compute dtype of a TensorRT export: the model's own float dtype is moved to float16 or bfloat16.

`source_dtype` is the float dtype the model computes in (its float inputs', else the one holding most of its float
parameters). `retype_floats` then gives every tensor of that dtype the compute dtype: graph inputs and outputs,
initializers (values converted, float16 clamped to its finite range), every node output, and the attributes that
name a dtype (`Cast.to`, `output_dtype`, `ConstantOfShape.value`, ...). Float32 islands of a half-precision model
(its own upcasts, e.g. RMSNorm) are a different dtype and stay as they are; the tensors the translation asked to
keep in float32 (scales) stay float32, an initializer that is also read elsewhere being copied for those reads.
Casts left converting a dtype to itself are removed. An op whose ONNX schema does not take the compute dtype (Cos
and Sin take no bfloat16) runs in float32 between two Casts.
"""

from __future__ import annotations

from typing import Any

import torch

TORCH_TO_ONNX = {torch.float32: "FLOAT", torch.float16: "FLOAT16", torch.bfloat16: "BFLOAT16"}
_DTYPE_ATTRIBUTES = ("to", "dtype", "output_dtype")


DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def torch_dtype(dtype) -> torch.dtype:
    """`dtype` or its name as a torch dtype."""
    return DTYPE_NAMES.get(dtype, dtype) if isinstance(dtype, str) else dtype


def compute_dtype(dtype, allow_float32: bool = False) -> Any:
    """`dtype` (torch.float16 / torch.bfloat16, or their names) as an `onnx_ir.DataType`. `allow_float32`: also
    float32, which `to_onnx_model` takes to write the TensorRT patterns in float32 (to check them exactly; not a
    form to deploy)."""
    import onnx_ir as ir

    value = torch_dtype(dtype)
    if value not in (torch.float16, torch.bfloat16) and not (allow_float32 and value == torch.float32):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16 for target='tensorrt' (TensorRT's strongly "
                         f"typed networks run FP8/FP4/INT4 GEMMs with 16-bit floats around them), not {dtype!r}")
    return getattr(ir.DataType, TORCH_TO_ONNX[value])


def source_dtype(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The float dtype `module` computes in: its first float input's, else the one with most parameter elements."""
    import onnx_ir as ir
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dtype in TORCH_TO_ONNX:
            return getattr(ir.DataType, TORCH_TO_ONNX[leaf.dtype])
    counts: dict[torch.dtype, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.dtype in TORCH_TO_ONNX:
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    dtype = max(counts, key=counts.get) if counts else torch.float32
    return getattr(ir.DataType, TORCH_TO_ONNX[dtype])


def _convert_array(array, target):
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    wide = np.asarray(array).astype(np.float32)
    if target == ir.DataType.FLOAT16:
        largest = float(np.finfo(np.float16).max)
        wide = np.where(np.isfinite(wide), np.clip(wide, -largest, largest), wide)
        return wide.astype(np.float16)
    if target == ir.DataType.BFLOAT16:
        return wide.astype(ml_dtypes.bfloat16)
    return wide


def _convert_tensor(tensor, target, name: str):
    import onnx_ir as ir

    return ir.tensor(_convert_array(tensor.numpy(), target), name=name)


def retype_floats(model, source, target, keep_float32=()) -> None:
    """Move every `source`-typed tensor of `model` (an `onnx_ir.Model`) to `target`; see the module docstring.

    `keep_float32`: `(node, "in" | "out", index)` entries naming tensors that stay float32.
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as passes

    # the tracer leaves some outputs untyped (those downstream of output_dtype and of the custom TensorRT node)
    passes.ShapeInferencePass(check_type=True, strict_mode=True)(model)
    graph = model.graph
    kept_uses = {(id(node), index) for node, kind, index in keep_float32 if kind == "in"}
    kept: set[int] = set()
    for node, kind, index in keep_float32:
        values = node.inputs if kind == "in" else node.outputs
        if index < len(values) and values[index] is not None:
            kept.add(id(values[index]))

    # a kept initializer that another node reads in the compute dtype: that node gets a converted copy
    for value in list(graph.initializers.values()):
        if id(value) not in kept or value.const_value is None:
            continue
        others = [use for use in value.uses() if (id(use.node), use.idx) not in kept_uses]
        if others and value.dtype == source:
            name = f"{value.name}_{target.name.lower()}"
            copy = ir.Value(name=name, shape=value.shape, type=ir.TensorType(target),
                            const_value=_convert_tensor(value.const_value, target, name))
            graph.register_initializer(copy)
            for use in others:
                use.node.replace_input_with(use.idx, copy)

    if source == target:
        return

    def convert(value) -> bool:
        if value is None or id(value) in kept or value.dtype != source:
            return False
        if value.const_value is not None:
            value.const_value = _convert_tensor(value.const_value, target, value.name)
        value.type = ir.TensorType(target)
        return True

    for value in [*graph.inputs, *graph.initializers.values()]:
        convert(value)
    for node in list(graph.all_nodes()):
        changed = [convert(output) for output in node.outputs]
        if not any(changed):
            continue
        for name in _DTYPE_ATTRIBUTES:
            attribute = node.attributes.get(name)
            if attribute is not None and attribute.type == ir.AttributeType.INT and attribute.value == source:
                node.attributes[name] = ir.AttrInt64(name, target)
        value = node.attributes.get("value")
        if value is not None and value.type == ir.AttributeType.TENSOR and value.value.dtype == source:
            node.attributes["value"] = ir.AttrTensor("value", _convert_tensor(value.value, target, value.value.name))
    _drop_identity_casts(model)
    _float32_where_unsupported(model, target)


def _float32_where_unsupported(model, target) -> None:
    """Nodes whose schema has no `target` for a type parameter that a `target` tensor binds run in float32: Casts
    to float32 in front of those inputs, Casts back to `target` behind those outputs."""
    import onnx
    import onnx_ir as ir

    graph = model.graph
    opset = model.opset_imports.get("", None)
    wanted = f"tensor({ {ir.DataType.FLOAT16: 'float16', ir.DataType.BFLOAT16: 'bfloat16'}.get(target, 'float') })"
    for node in list(graph):
        if node.domain not in ("", "ai.onnx") or opset is None:
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset, "")
        except onnx.defs.SchemaError:
            continue
        allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

        def params(formals, count):
            names = [f.type_str for f in formals]
            return [names[min(i, len(names) - 1)] for i in range(count)] if names else [None] * count

        in_params, out_params = params(schema.inputs, len(node.inputs)), params(schema.outputs, len(node.outputs))
        bad = {p for p, v in [*zip(in_params, node.inputs), *zip(out_params, node.outputs)]
               if v is not None and v.dtype == target and p in allowed and wanted not in allowed[p]}
        if not bad:
            continue
        for i, (param, value) in enumerate(zip(in_params, node.inputs)):
            if param in bad and value is not None and value.dtype == target:
                cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", ir.DataType.FLOAT)],
                               name=f"{node.name}_float32_in{i}")
                cast.outputs[0].name = f"{node.name}_float32_in{i}"
                cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), value.shape
                graph.insert_before(node, cast)
                node.replace_input_with(i, cast.outputs[0])
        for j, (param, value) in enumerate(zip(out_params, node.outputs)):
            if param not in bad or value.dtype != target:
                continue
            name = value.name
            value.name = f"{name}_float32"
            value.type = ir.TensorType(ir.DataType.FLOAT)
            cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", target)], name=f"{node.name}_back{j}")
            back = cast.outputs[0]
            back.name, back.type, back.shape = name, ir.TensorType(target), value.shape
            graph.insert_after(node, cast)
            for use in list(value.uses()):
                if use.node is not cast:
                    use.node.replace_input_with(use.idx, back)
            outputs = list(graph.outputs)
            if value in outputs:
                graph.outputs[outputs.index(value)] = back


def _drop_identity_casts(model) -> None:
    outputs = set(map(id, model.graph.outputs))
    for node in list(model.graph):
        if node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
            continue
        source, result = node.inputs[0], node.outputs[0]
        if source is None or source.dtype is None or source.dtype != result.dtype or id(result) in outputs:
            continue
        result.replace_all_uses_with(source)
        model.graph.remove(node, safe=True)
