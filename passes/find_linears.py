"""Find the quantizable linear layers of a captured graph.

A linear is a matrix product of an activation with a constant 2-D weight: `linear(x, W, b)`, or the
`mm`/`addmm`/`matmul` forms whose second operand is a constant `[K, N]` (possibly written as a transpose of a
`[N, K]` constant). Both capture paths are understood:

- torch.export (unlifted module): weights are `get_attr` nodes, ops are `aten.*` overloads;
- dynamo (`torch.compile` backend): weights are placeholders whose example input is the `nn.Parameter`, ops are
  torch-level functions and methods.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx

aten = torch.ops.aten

_LINEAR = {aten.linear.default, F.linear, torch._C._nn.linear}
_MATMUL = {aten.mm.default, aten.matmul.default, torch.mm, torch.matmul, operator.matmul}
_ADDMM = {aten.addmm.default, torch.addmm}
_TRANSPOSE_FUNCTIONS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default, torch.t,
                        torch.transpose, torch.permute}
_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


@dataclass
class LinearSite:
    """One matrix product to quantize. `weight` is the logical `[out, in]` float weight (a view, not a copy)."""

    node: fx.Node
    name: str
    input: fx.Node
    weight: Tensor
    weight_node: fx.Node
    bias: fx.Node | None
    source: Tensor  # the stored constant behind `weight` (its identity keys statistics across recompiles)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def _fetch_attr(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _is_transpose(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS:
        dims = node.args[1:]
        if node.target in (aten.permute.default, torch.permute):
            return tuple(dims[0]) == (1, 0)
        return len(dims) in (0, 2)
    if node.op == "call_method" and node.target in _TRANSPOSE_METHODS:
        dims = node.args[1:]
        if node.target == "permute":
            return tuple(dims[0] if len(dims) == 1 else dims) == (1, 0)
        return len(dims) in (0, 2)
    return False


def source_name(node: fx.Node) -> str:
    """The dotted module path of a parameter: the get_attr target, or the dynamo source of a placeholder."""
    if node.op == "get_attr":
        return str(node.target)
    grapharg = node.meta.get("grapharg")
    if grapharg is not None and getattr(grapharg, "source", None) is not None:
        parts = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", grapharg.source.name)
        if parts:
            return ".".join(parts)
    return node.name


def constant_tensor(gm: fx.GraphModule, node, placeholder_values: Mapping[str, Tensor]) -> Tensor | None:
    """The tensor a node stands for when it is a parameter or constant of the graph; None otherwise."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        value = _fetch_attr(gm, node.target)
        return value if isinstance(value, Tensor) else None
    if node.op == "placeholder":
        return placeholder_values.get(node.name)
    return None


def _resolve_weight(gm, node, placeholder_values, transposed: bool):
    """Follow transposes down to a 2-D constant: (logical [out, in] weight, constant node, constant) or None."""
    while isinstance(node, fx.Node) and _is_transpose(node):
        node = node.args[0]
        transposed = not transposed
    value = constant_tensor(gm, node, placeholder_values)
    if value is None or value.dim() != 2 or not value.is_floating_point():
        return None
    return (value.t() if transposed else value), node, value


def _layer_name(weight_node: fx.Node) -> str:
    name = source_name(weight_node)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def find_linears(gm: fx.GraphModule, placeholder_values: Mapping[str, Tensor] | None = None) -> list[LinearSite]:
    """Every linear of `gm` with a constant float weight, in graph order.

    `placeholder_values` maps placeholder names to the parameters they carry (dynamo graphs).
    """
    placeholder_values = placeholder_values or {}
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _LINEAR:
            x, weight_arg = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            resolved = _resolve_weight(gm, weight_arg, placeholder_values, transposed=False)
        elif node.target in _MATMUL:
            x, weight_arg = node.args[0], node.args[1]
            bias = None
            resolved = _resolve_weight(gm, weight_arg, placeholder_values, transposed=True)
        elif node.target in _ADDMM:
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
            bias, x, weight_arg = node.args[0], node.args[1], node.args[2]
            resolved = _resolve_weight(gm, weight_arg, placeholder_values, transposed=True)
            bias_value = constant_tensor(gm, bias, placeholder_values)
            if bias_value is None or bias_value.dim() != 1:
                continue
        else:
            continue
        if resolved is None or not isinstance(x, fx.Node):
            continue
        weight, weight_node, source = resolved
        if bias is not None and constant_tensor(gm, bias, placeholder_values) is None:
            continue  # a computed bias is not a linear layer's bias
        sites.append(LinearSite(node, _layer_name(weight_node), x, weight, weight_node, bias, source))
    _deduplicate_names(sites)
    return sites


def refresh_input(site: LinearSite) -> None:
    """Re-read the activation operand after an earlier rewrite replaced the node that produced it."""
    if site.input not in site.node.all_input_nodes:
        site.input = site.node.args[1] if site.node.target in _ADDMM else site.node.args[0]


def _deduplicate_names(sites: list[LinearSite]) -> None:
    """A weight used twice (tied, or a reused module) gives two sites; keep names unique for reports and files."""
    seen: dict[str, int] = {}
    for site in sites:
        count = seen.get(site.name, 0)
        seen[site.name] = count + 1
        if count:
            site.name = f"{site.name}#{count}"


def shared_input_groups(sites: list[LinearSite]) -> list[list[LinearSite]]:
    """Sites grouped by the tensor they read, in graph order: one smoothing scale per group, and the layers that
    engines fuse into one GEMM (q/k/v, gate/up)."""
    groups: dict[fx.Node, list[LinearSite]] = {}
    for site in sites:
        groups.setdefault(site.input, []).append(site)
    return list(groups.values())
