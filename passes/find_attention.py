"""Find the attentions of a captured graph and the keys and values that feed them.

An attention is `scaled_dot_product_attention(q, k, v, ...)`, or its decomposition: `softmax(q @ k^T ...)` whose
output multiplies `v`. The keys and values are the tensors the attention reads, so whatever the architecture
computes before (rotary embeddings, head reshapes, grouped-query repeats) is already applied: they are what a
KV cache stores, up to the repeat of grouped heads.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention,
         torch._C._nn.scaled_dot_product_attention}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, F.softmax, torch.softmax}
_MATMUL = {aten.matmul.default, aten.bmm.default, torch.matmul, torch.bmm, operator.matmul}
_TRANSPOSE = {aten.transpose.int, aten.permute.default, aten.t.default, torch.transpose, torch.permute}
# What may sit between the scores' product and the softmax, or between the softmax and the product with v.
_PASS_THROUGH = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor,
                 aten.div.Scalar, aten._to_copy.default, aten.to.dtype, aten.dropout.default, aten.type_as.default,
                 aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.clone.default,
                 aten.contiguous.default, operator.add, operator.mul, operator.truediv, torch.add, torch.mul,
                 F.dropout}
# Ops that only rearrange elements: walking back through them finds the tensor the model computed.
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
          aten.unsqueeze.default, aten.slice.Tensor, aten.clone.default, aten.contiguous.default,
          aten.transpose.int, aten.permute.default}


@dataclass
class AttentionSite:
    """One attention: `node` reads `key` and `value` (nodes of the graph); `name` is the module that computes it.
    `key_use` and `value_use` are (node, argument index) where each is read on the way to the attention."""

    node: fx.Node
    name: str
    key: fx.Node
    value: fx.Node
    key_use: tuple[fx.Node, int]
    value_use: tuple[fx.Node, int]


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # dynamo writes paths as Python expressions (L['self'].model.layers[0].attn)
    for prefix in ("L['self'].", "L['self']"):
        path = path.removeprefix(prefix)
    return path.replace("[", ".").replace("]", "").replace("'", "")


def _target(node) -> object:
    return node.target if isinstance(node, fx.Node) and node.op in ("call_function", "call_method") else None


def _walk(node, forward: bool, stop) -> fx.Node | None:
    """From `node`, follow pass-through ops (down its single user, or up its first tensor input) to the first node
    for which `stop` holds."""
    for _ in range(16):
        if forward:
            if len(node.users) != 1:
                return None
            node = next(iter(node.users))
        else:
            inputs = [a for a in node.args if isinstance(a, fx.Node)]
            if not inputs:
                return None
            node = inputs[0]
        if stop(node):
            return node
        if _target(node) not in _PASS_THROUGH:
            return None
    return None


def _decomposed(softmax: fx.Node) -> tuple[tuple[fx.Node, int], tuple[fx.Node, int]] | None:
    """((k^T node, 0), (product with v, 1)) of `softmax(q @ k^T ...) @ v`, or None when the softmax is not an
    attention's."""
    scores = _walk(softmax, forward=False, stop=lambda n: _target(n) in _MATMUL)
    probabilities = _walk(softmax, forward=True, stop=lambda n: _target(n) in _MATMUL)
    if scores is None or probabilities is None or len(scores.args) < 2 or len(probabilities.args) < 2:
        return None
    transposed, value = scores.args[1], probabilities.args[1]
    if _target(transposed) not in _TRANSPOSE or not isinstance(value, fx.Node):
        return None
    if not isinstance(transposed.args[0], fx.Node):
        return None
    return (transposed, 0), (probabilities, 1)


def find_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention of the graph, in graph order."""
    sites, seen = [], {}
    for node in gm.graph.nodes:
        target = _target(node)
        if target in _SDPA:
            key_use, value_use = (node, 1), (node, 2)
        elif target in _SOFTMAX:
            found = _decomposed(node)
            if found is None:
                continue
            key_use, value_use = found
        else:
            continue
        key, value = key_use[0].args[key_use[1]], value_use[0].args[value_use[1]]
        name = _module_path(node) or f"attention_{len(sites)}"
        count = seen.get(name, 0)
        seen[name] = count + 1
        sites.append(AttentionSite(node, name if count == 0 else f"{name}#{count}", key, value, key_use, value_use))
    return sites


def example_value(node: fx.Node):
    """The example tensor of a node: `val` in torch.export's graphs, `example_value` in dynamo's."""
    return node.meta.get("val", node.meta.get("example_value"))


def stored_elements_per_token(site: AttentionSite, which: str) -> int | None:
    """Elements one token adds to the cache for the attention's keys (`which="key"`) or values: the attended
    tensor `[batch, heads, tokens, head_dim]` traced back through reshapes and grouped-head repeats to the tensor
    the model computed (what a cache stores)."""
    attended = site.key if which == "key" else site.value
    shape = example_value(attended)
    if shape is None or shape.dim() != 4:
        return None
    tokens = shape.shape[0] * shape.shape[-2]
    origin = attended
    while _target(origin) in _VIEWS and isinstance(origin.args[0], fx.Node):
        origin = origin.args[0]
    value = example_value(origin)
    if value is None or not tokens or value.numel() % tokens:
        return None
    return int(value.numel() // tokens)
