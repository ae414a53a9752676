"""Clean-ups of the exported graph: exporter metadata stripped, outputs and dynamic axes named, constants folded,
a private Q/DQ pair per quantized input, Gelu biases kept out of BiasGelu, and qcompile's model metadata."""

from __future__ import annotations

import re

from torch.utils import _pytree as pytree


def _strip_exporter_metadata(model) -> None:
    """Drop the exporter's per-node stack traces and FX dumps: they hold local paths and make files differ."""
    model.graph.metadata_props.clear()
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


def _output_names(program) -> list[str] | None:
    spec = program.call_spec.out_spec
    if spec is None:
        return None
    try:
        leaves = list(range(spec.num_leaves))
        structure = pytree.tree_unflatten(leaves, spec)
        with_paths, _ = pytree.tree_flatten_with_path(structure)
    except Exception:
        return None
    names = []
    for path, _ in with_paths:
        parts = []
        for entry in path:
            for attribute in ("key", "name", "idx"):
                if hasattr(entry, attribute):
                    parts.append(str(getattr(entry, attribute)))
                    break
        names.append("_".join(parts) if parts else "output")
    return names


def _name_outputs(model, program) -> None:
    names = _output_names(program)
    outputs = list(model.graph.outputs)
    if not names or len(names) != len(outputs):
        return
    if len(names) == 1 and names[0].isdigit():
        names = ["output"]
    names = [name if not name.isdigit() else f"output_{name}" for name in names]
    if len(set(names)) != len(names):
        return
    taken = {value.name for value in model.graph.inputs} | set(model.graph.initializers)
    taken |= {value.name for node in model.graph.all_nodes() for value in node.outputs if value not in outputs}
    for value, name in zip(outputs, names):
        if name in taken or value in model.graph.inputs or value.is_initializer():
            continue
        value.name = name


def _static_dim(dim) -> int | None:
    """A dimension's size when it is fixed: an int, or a symbol that torch specialized to a number ("40")."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _name_dynamic_axes(model) -> None:
    """Fixed sizes become numbers; the first input's leading dynamic dimensions are called `batch` and
    `sequence` everywhere in the graph (other inputs' own dynamic axes: `<input>_batch`, `<input>_sequence`)."""
    import onnx_ir as ir

    renames: dict[str, str] = {}
    for index, graph_input in enumerate(model.graph.inputs):
        if graph_input.shape is None:
            continue
        dynamic = [dim for dim in graph_input.shape if _static_dim(dim) is None]
        for dim, axis in zip(dynamic, ("batch", "sequence")):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim.value not in renames:
                # another input's axis that torch could not prove equal (e.g. a broadcastable mask) keeps its own name
                renames[dim.value] = axis if index == 0 else f"{graph_input.name}_{axis}"
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b") if renames else None

    def rename(value) -> None:
        if value is None or value.shape is None:
            return
        dims = []
        changed = False
        for dim in value.shape:
            size = _static_dim(dim)
            if size is not None:
                changed |= not isinstance(dim, int)
                dims.append(size)
            elif isinstance(dim, ir.SymbolicDim) and dim.value is not None and pattern is not None:
                new = pattern.sub(lambda m: renames[m.group(1)], dim.value)
                changed |= new != dim.value
                dims.append(new)
            else:
                dims.append(dim)
        if changed:
            value.shape = ir.Shape(dims)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        rename(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            rename(value)


def _optimize(model) -> None:
    """Fold constants (QuantizeLinear/DequantizeLinear are never folded), lift them to initializers, merge repeats.

    Initializers are deliberately not deduplicated: equal scales of different layers stay separate tensors, so
    each layer keeps its own Q/DQ pair (see `_dedicate_qdq_pairs`).
    """
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    for step in (
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
        passes.RemoveUnusedOpsetsPass(),
    ):
        step(model)


def _dedicate_qdq_pairs(model) -> None:
    """Give every QuantizeLinear → DequantizeLinear edge its own Q node and its own scale / zero-point tensors.

    ONNX Runtime fuses `DQ → MatMul` into an integer kernel only when the activation's Q feeds that one DQ;
    a Q shared by the q/k/v (or gate/up) projections of one input would leave all of them in float. Its common
    subexpression elimination merges Q nodes whose inputs are the same tensors, so each pair also gets private
    copies of its (scalar) scale and zero point.
    """
    import onnx_ir as ir

    graph = model.graph
    counter = 0
    for q in list(graph):
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        uses = [(use.node, use.idx) for use in q.outputs[0].uses()]
        if not uses or any(node.op_type != "DequantizeLinear" or idx != 0 for node, idx in uses):
            continue
        for i, (dq, _) in enumerate(uses):
            pair_q = q
            if i > 0:
                pair_q = ir.Node(
                    q.domain, q.op_type, list(q.inputs), attributes=list(q.attributes.values()),
                    name=f"{q.name}__{i}", num_outputs=1, version=q.version,
                )
                pair_q.outputs[0].name = f"{q.outputs[0].name}__{i}"
                pair_q.outputs[0].type = q.outputs[0].type
                pair_q.outputs[0].shape = q.outputs[0].shape
                graph.insert_after(q, pair_q)
                dq.replace_input_with(0, pair_q.outputs[0])
            for slot, suffix in ((1, "scale"), (2, "zero_point")):
                if slot >= len(pair_q.inputs):
                    continue
                shared = pair_q.inputs[slot]
                if shared is None or not shared.is_initializer() or shared.const_value is None:
                    continue
                private_users = {(pair_q, slot), (dq, slot)}
                if all((use.node, use.idx) in private_users for use in shared.uses()):
                    continue
                counter += 1
                copy = ir.Value(
                    name=f"{dq.name}_{suffix}", shape=shared.shape, type=shared.type, const_value=shared.const_value
                )
                while copy.name in graph.initializers:
                    copy.name = f"{copy.name}_{counter}"
                graph.register_initializer(copy)
                pair_q.replace_input_with(slot, copy)
                if slot < len(dq.inputs) and dq.inputs[slot] is shared:
                    dq.replace_input_with(slot, copy)


def _keep_gelu_bias_apart(model) -> None:
    """Give the bias added just before a Gelu a leading unit axis (`[N]` -> `[1, N]`, the same broadcast).

    ONNX Runtime fuses `Add(x, 1-D bias) -> Gelu` into its BiasGelu kernel, which on the CPU took 2.4x as long as
    its Gelu plus a separate Add (MiniLM int8_dynamic, 2 threads: 5.4 ms against 2.2 + 1.2 for the six FFN layers);
    it leaves a 2-D bias alone.
    """
    import onnx_ir as ir

    for add in list(model.graph):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        if not any(use.node.op_type == "Gelu" for use in add.outputs[0].uses()):
            continue
        for slot, bias in enumerate(add.inputs):
            value = None if bias is None else bias.const_value
            if value is None or not bias.is_initializer() or bias.shape is None or len(bias.shape) != 1:
                continue
            if any(use.node is not add for use in bias.uses()):
                continue  # shared: another node reads it as 1-D
            bias.const_value = ir.tensor(value.numpy().reshape(1, -1), name=bias.name)
            bias.shape = ir.Shape([1, bias.shape[0]])


def _set_model_metadata(model, source) -> None:
    import qcompile

    model.producer_name = "qcompile"
    model.producer_version = qcompile.__version__
    recipe = getattr(source, "recipe", None)
    if recipe is not None:
        model.metadata_props["qcompile.recipe"] = recipe.name
        model.metadata_props["qcompile.algorithm"] = str(getattr(source, "algorithm", recipe.algorithm))
        model.metadata_props["qcompile.quantized_layers"] = str(len(getattr(source, "layers", ())))
