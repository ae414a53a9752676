"""Capture: an `nn.Module` and example inputs become an FX graph module through torch.export."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import itertools
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim
from torch.fx.experimental import _config as fx_config
from torch.utils import _pytree as pytree


def _dynamic_spec(value: Any):
    """Every dimension of every tensor may vary (batch and sequence length differ between calls)."""
    return pytree.tree_map(
        lambda leaf: {d: Dim.AUTO for d in range(leaf.dim())} if isinstance(leaf, torch.Tensor) else None, value
    )


def dynamic_shapes_for(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    spec = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: _dynamic_spec(v) for k, v in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_dynamic_spec(v) for v in value)
        else:
            spec[name] = _dynamic_spec(value)
    return spec


def export_program(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with every tensor dimension dynamic; `aten.linear` stays undecomposed.

    Size-oblivious reasoning keeps a size-1 example dimension (batch 1 is the usual example) dynamic instead of
    specializing the program to it.
    """
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(
            model, tuple(args), dict(kwargs), dynamic_shapes=dynamic_shapes_for(model, args, kwargs), strict=False
        )


def module_tree(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree that shares its tensors, with fused MoE experts as per-expert linears
    (`qcompile.moe`): what is captured, and what `QuantizedModel` later runs for generation. The caller's model
    is never modified."""
    from qcompile.moe import unfuse_experts

    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    tree = copy.deepcopy(model, shared)
    unfuse_experts(tree)
    return tree


@contextlib.contextmanager
def caches_off(model: nn.Module):
    """Hugging Face models return their KV cache (a `DynamicCache` object, not a tensor) unless told otherwise.
    A captured forward computes the whole sequence, so it needs no cache: switch `use_cache` off in every config
    of the model while it is traced (the caller's call may still pass `use_cache` explicitly)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = []
    for config in configs.values():
        for holder in (config, *(getattr(config, name, None) for name in ("text_config", "decoder", "encoder"))):
            if holder is not None and getattr(holder, "use_cache", None):
                saved.append(holder)
                holder.use_cache = False
    try:
        yield
    finally:
        for holder in saved:
            holder.use_cache = True


def capture(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    """The model as a graph module that is called like the model (parameters held as attributes)."""
    was_training = model.training
    model.eval()
    try:
        with caches_off(model):
            program = export_program(model, args, kwargs)
    finally:
        model.train(was_training)
    return program.module()


@dataclasses.dataclass
class GraphTemplate:
    """A captured graph that reads the tensors of its submodule at `path` by name only: a module of the same
    structure (the same code and settings, tensors of the same shapes and dtypes: the next decoder layer) placed at
    another path gets its graph from it (`instantiate`) without running torch.export again, which costs about half
    a second for one decoder layer. Holds no tensor of that submodule."""

    graph: fx.Graph
    path: str
    # what the graph reads outside `path`: the input guards, lifted constants
    others: dict[str, Any]
    meta: dict[str, Any]

    @classmethod
    def of(cls, gm: fx.GraphModule, path: str) -> GraphTemplate:
        """The template of `gm` as captured (call it before any pass changes the graph)."""
        graph = _copy_graph(gm.graph)
        others = {node.target: _attribute(gm, node.target) for node in graph.nodes
                  if node.op in ("get_attr", "call_module") and not _under(node.target, path)}
        return cls(graph, path, others, dict(gm.meta))

    def instantiate(self, root: nn.Module, path: str) -> fx.GraphModule:
        """The graph of the submodule of `root` at `path`: this template's graph reading that submodule's tensors,
        with its module paths (read by the passes that name layers and attentions) the new ones."""
        graph = _copy_graph(self.graph)
        attributes = dict(self.others)
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module") and _under(node.target, self.path):
                node.target = path + node.target[len(self.path):]
                attributes[node.target] = _attribute(root, node.target)
            stack = node.meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = {
                    key: ((path + where[len(self.path):] if _under(where, self.path) else where), kind)
                    for key, (where, kind) in stack.items()}
        gm = fx.GraphModule(attributes, graph)
        gm.meta.update(self.meta)
        return gm


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    """`graph`'s nodes copied, each with a copy of its meta dict (whose values are shared: replaced by `instantiate`,
    never mutated), and the same calling convention: the pytree codegen is shared (no pass changes it; deep-copying
    its specs warns in torch 2.13)."""
    copied = fx.Graph()
    output, old_output = copied.graph_copy(graph, {}, return_output_node=True)
    copied.output(output, type_expr=getattr(old_output, "type", None)).meta = copy.copy(old_output.meta)
    copied.set_codegen(graph._codegen)
    return copied


def _under(name: str, path: str) -> bool:
    return name == path or name.startswith(path + ".")


def _attribute(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module
