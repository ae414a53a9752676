"""SmoothQuant: migrate activation outliers into the weights before quantizing both.

For the linears that read one tensor x (q/k/v, gate/up), per input channel j:

    s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha)        x' = x / s,   W' = W * s

so x' W'^T = x W^T while x' has flatter channels. The division by s is folded into the producer of x, found in
the graph: a LayerNorm's weight and bias, an elementwise multiply by a constant vector (the RMSNorm weight), the
output rows of a preceding linear, or, for the linear after attention (o_proj), the rows of the value projection
when heads are not grouped, whichever feeds only the smoothed linears. Where none applies, an explicit `mul` stays
in the graph.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from qcompile.passes.find_linears import LinearSite, constant_tensor, shared_input_groups, source_name
from qcompile.passes.insert_observers import ActivationObserver

aten = torch.ops.aten

_SCALE_RANGE = (1e-4, 1e4)
_LAYER_NORM = {aten.layer_norm.default, F.layer_norm, torch.layer_norm}
_MUL = {aten.mul.Tensor, torch.mul, operator.mul}

# Node metadata: the op input that is x * (1 / s) holds the constant's attribute name here.
INPUT_MULTIPLIER = "qcompile_input_multiplier"
# Node metadata: a constant that replaces a model parameter (a folded norm weight) holds that parameter's name.
REPLACES = "qcompile_replaces"
_LINEAR_BIAS_INDEX = {aten.linear.default: 2, F.linear: 2, torch._C._nn.linear: 2}


def smoothing_scale(input_amax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s_j = amax_x^alpha / amax_w^(1-alpha), 1 where either side is zero, clamped to a sane range."""
    weight_amax = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    input_amax = input_amax.float()
    scale = input_amax.clamp(min=1e-8).pow(alpha) / weight_amax.clamp(min=1e-8).pow(1.0 - alpha)
    scale = torch.where((input_amax > 0) & (weight_amax > 0), scale, torch.ones_like(scale))
    return scale.clamp(*_SCALE_RANGE)


def search_alpha(
    sample: Tensor,
    input_amax: Tensor,
    weights: list[Tensor],
    fake_quantize_weight: Callable[[Tensor], Tensor],
    fake_quantize_input: Callable[[Tensor, Tensor], Tensor],
    grid: tuple[float, ...],
    folds: list[tuple[Tensor, Tensor]] | None = None,
) -> float | None:
    """The alpha whose smoothed, quantized product is closest to the float product on sampled inputs.

    None (no smoothing) competes too: on layers without outlier channels smoothing only costs accuracy.
    `folds`, [(per-channel amax, rows)], measures each candidate on rows that did not set the amax it is fitted
    to (`ActivationObserver.folds`: one half of the batches against the other). Smoothing flattens every channel
    up to the calibrated static range, so it leaves no headroom for a channel that exceeds its calibrated max;
    judged on the rows that set those maxima it always looks better than it is on new inputs.
    """
    if folds is None:
        folds = [(input_amax, sample)]
    folds = [(amax.float(), rows.float()) for amax, rows in folds]
    references = [[rows @ w.float().t() for w in weights] for _, rows in folds]
    best_alpha, best_error = None, float("inf")
    for alpha in (None, *grid):
        error = 0.0
        for (amax, rows), fold_references in zip(folds, references):
            scale = torch.ones_like(amax) if alpha is None else smoothing_scale(amax, weights, alpha)
            quantized_input = fake_quantize_input(rows / scale, (amax / scale).amax())
            error += sum(
                (quantized_input @ fake_quantize_weight(w.float() * scale).t() - ref).pow(2).sum().item()
                for w, ref in zip(weights, fold_references)
            )
        if error < best_error:
            best_alpha, best_error = alpha, error
    return best_alpha


def smooth_linears(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    observers: Mapping[str, ActivationObserver],
    alpha: float | None,
    fake_quantize_weight: Callable[[Tensor], Tensor] | None = None,
    fake_quantize_input: Callable[[Tensor, Tensor], Tensor] | None = None,
    placeholder_values: Mapping[str, Tensor] | None = None,
    fold_only: bool = False,
    alpha_grid: tuple[float, ...] = (),
) -> dict[str, Tensor]:
    """Smooth every shared-input group; returns the new per-layer input amax. With `fold_only`, groups whose
    scale would need an explicit division of their input are left as they are.

    `site.weight` becomes the smoothed weight (the quantization pass reads it) and the graph is rewritten so its
    float function is unchanged. `alpha=None` searches alpha per group on the observers' sampled rows, measuring
    the error with the two fake-quantizers; where the observer saw two or more batches, each candidate is fitted to
    one half of the batches and measured on the rows of the other (`ActivationObserver.folds`).
    """
    placeholder_values = placeholder_values or {}
    by_node = {site.node: site for site in sites}
    new_amax: dict[str, Tensor] = {}
    for index, group in enumerate(shared_input_groups(sites)):
        observer = observers[group[0].name]
        weights = [site.weight for site in group]
        if fold_only and not folds(gm, group, by_node, placeholder_values):
            for site in group:
                new_amax[site.name] = observer.amax
            continue
        group_alpha = alpha
        if group_alpha is None:
            if observer.sample is None or fake_quantize_weight is None or fake_quantize_input is None or not alpha_grid:
                raise ValueError("alpha search needs sampled calibration rows, the recipe's fake-quantizers and a grid")
            group_alpha = search_alpha(observer.sample, observer.channel_amax, weights, fake_quantize_weight,
                                       fake_quantize_input, grid=alpha_grid, folds=observer.folds())
            if group_alpha is None:  # smoothing loses here: leave the group as it is
                for site in group:
                    new_amax[site.name] = observer.amax
                continue
        scale = smoothing_scale(observer.channel_amax, weights, group_alpha)
        migrate_scale(gm, group, scale, by_node, placeholder_values, f"_qc_smooth_{index}")
        for site in group:
            new_amax[site.name] = (observer.channel_amax.float() / scale).amax()
    gm.graph.lint()
    gm.recompile()
    return new_amax


def migrate_scale(
    gm: fx.GraphModule,
    group: list[LinearSite],
    scale: Tensor,
    by_node: Mapping[fx.Node, LinearSite],
    placeholder_values: Mapping[str, Tensor],
    prefix: str,
) -> None:
    """x -> x / scale for the group's shared input and W -> W * scale for each of its linears (per input channel).

    The float function is unchanged: the division folds into the producer of x where the graph allows (see the
    module docstring), else an explicit `mul` goes in. `by_node` maps linear nodes to their sites, so that a
    producing linear's `weight` is updated too. Shared by SmoothQuant and AWQ; the graph still needs `recompile()`.
    """
    _divide_producer(gm, group, scale, by_node, placeholder_values, prefix)
    for site in group:
        site.weight = (site.weight.detach().float() * scale).to(site.weight.dtype)


def folds(gm: fx.GraphModule, group: list[LinearSite], by_node, placeholder_values=None) -> bool:
    """Whether a scale migrated into `group` folds into an earlier op (a norm or a linear), so that no explicit
    division of the input is needed (checkpoint formats without a per-layer input scale need this)."""
    producer = group[0].input
    if not set(producer.users) <= {site.node for site in group}:
        return False
    return (_fold_into_norm(gm, producer, None, placeholder_values or {}, "", apply=False)
            or _producing_linear(producer, by_node) is not None)


def _divide_producer(gm, group, scale, by_node, placeholder_values, prefix) -> None:
    """Make the group's shared input x become x / scale, folding into its producer where the graph allows."""
    producer = group[0].input
    only_feeds_group = set(producer.users) <= {site.node for site in group}
    if only_feeds_group and _fold_into_norm(gm, producer, scale, placeholder_values, prefix):
        return
    if only_feeds_group:
        previous = _producing_linear(producer, by_node)
        if previous is not None:
            _fold_into_linear(gm, previous, scale, placeholder_values, prefix)
            return
    name = f"{prefix}_inverse_scale"
    inverse = _constant_node(gm, name, (1.0 / scale), group[0].node)
    value = producer.meta.get("val", producer.meta.get("example_value"))
    with gm.graph.inserting_before(_first_in_graph(gm, [site.node for site in group])):
        divided = gm.graph.call_function(aten.mul.Tensor, (producer, inverse))
        if isinstance(value, torch.Tensor) and value.dtype != scale.dtype:
            # a bf16/fp16 activation stays in its dtype (the float32 product rounded once), so that the rest of
            # the graph (residual adds, norms) sees the dtype it was traced with
            divided = gm.graph.call_function(aten._to_copy.default, (divided,), {"dtype": value.dtype})
    divided.meta.update({k: v for k, v in producer.meta.items() if k in ("val", "example_value", "tensor_meta")})
    divided.meta[INPUT_MULTIPLIER] = name  # read by QuantizedModel's module tree (qcompile.quantized_modules)
    for site in group:
        site.node.replace_input_with(producer, divided)
        site.input = divided


def _producing_linear(producer: fx.Node, by_node) -> LinearSite | None:
    """The linear whose output rows can absorb the scale: x itself, one factor of x = a * linear(...) (the up
    projection of a gated MLP), or the value projection behind an attention output (see `_value_projection`),
    provided that linear feeds nothing else."""
    if producer in by_node:
        return by_node[producer]
    value = _value_projection(producer, by_node)
    if value is not None:
        return value
    if producer.op == "call_function" and producer.target in _MUL and len(producer.args) == 2:
        for factor in producer.args:
            other = producer.args[1] if factor is producer.args[0] else producer.args[0]
            if factor in by_node and set(factor.users) == {producer} and isinstance(other, fx.Node) and other is not factor:
                return by_node[factor]
    return None


_SDPA = {aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention}
_TRANSPOSE = {aten.transpose.int, torch.transpose}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default,
            aten.clone.default}


def _value_projection(attention_output: fx.Node, by_node) -> LinearSite | None:
    """The value projection v_proj when x = merge_heads(attention(q, k, split_heads(v_proj(h)))), else None.

    Attention mixes the rows of V with weights that do not depend on V, per channel: scaling channel c of V scales
    channel c of every head's output. Splitting and merging heads keep channel c = head * D + d on both sides when
    the chain only reshapes the last axis into (heads, D) and back and swaps the head and sequence axes; with
    grouped heads (GQA) a value channel feeds several output channels, which need not share a scale, so then
    (and for anything else in the chain) there is no fold. Every node on the way must feed only the next.
    """

    def shape(node):
        value = node.meta.get("val")
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def layout_chain(node, stop):
        """Walk up from `node` over single-use reshapes / (1, 2) transposes until `stop(node)`; the nodes passed."""
        passed = []
        while not stop(node):
            if node.op != "call_function" or len(node.users) != 1:
                return None
            if node.target in _TRANSPOSE:
                if {d % 4 for d in node.args[1:3]} != {1, 2}:
                    return None
            elif node.target not in _RESHAPE:
                return None
            passed.append(node)
            node = node.args[0]
        return node, passed

    up = layout_chain(attention_output, lambda n: n.op == "call_function" and n.target in _SDPA)
    if up is None:
        return None
    attention, merge = up
    if len(attention.users) != 1 or _arg(attention, 4, "dropout_p") or _arg(attention, 7, "enable_gqa"):
        return None
    query, value = attention.args[0], attention.args[2]
    down = layout_chain(value, lambda n: n in by_node)
    if down is None:
        return None
    projection, split = down
    if len(projection.users) != 1:
        return None
    q_shape, v_shape, out_shape, proj_shape = shape(query), shape(value), shape(attention_output), shape(projection)
    if None in (q_shape, v_shape, out_shape, proj_shape) or len(v_shape) != 4 or q_shape[1] != v_shape[1]:
        return None
    heads, head_dim = v_shape[1], v_shape[3]
    # every 4-D tensor on the way is [batch, heads or sequence, sequence or heads, D]; the ends are [..., heads * D]
    for node in (*split, *merge):
        s = shape(node)
        if s is None or (len(s) == 4 and s[3] != head_dim) or (len(s) != 4 and s[-1] != heads * head_dim):
            return None
    if out_shape[-1] != heads * head_dim or proj_shape[-1] != heads * head_dim:
        return None
    return by_node[projection]


def _first_in_graph(gm, nodes):
    wanted = set(nodes)
    return next(node for node in gm.graph.nodes if node in wanted)


def _constant_node(gm: fx.GraphModule, name: str, value: Tensor, before: fx.Node) -> fx.Node:
    gm.register_buffer(name, value.detach().contiguous())
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def _mark_replacement(constant: fx.Node, original) -> None:
    """Note which model parameter a new constant stands in for (its module keeps the same role)."""
    if isinstance(original, fx.Node) and original.op in ("get_attr", "placeholder"):
        constant.meta[REPLACES] = source_name(original)


def _replace_constant_arg(gm, node, position, key, value, prefix, role) -> None:
    constant = _constant_node(gm, f"{prefix}_{role}", value, node)
    _mark_replacement(constant, node.kwargs[key] if key is not None and key in node.kwargs else node.args[position])
    if key is not None and key in node.kwargs:
        node.update_kwarg(key, constant)
    else:
        node.update_arg(position, constant)


def _arg(node: fx.Node, position: int, key: str):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(key)


def _fold_into_norm(gm, producer: fx.Node, scale: Tensor | None, placeholder_values, prefix, apply: bool = True) -> bool:
    """Fold 1/scale into the norm that produces x; with `apply=False`, only say whether it would."""
    if producer.op != "call_function":
        return False
    if producer.target in _LAYER_NORM:
        weight_arg, bias_arg = _arg(producer, 2, "weight"), _arg(producer, 3, "bias")
        weight = constant_tensor(gm, weight_arg, placeholder_values) if weight_arg is not None else None
        bias = constant_tensor(gm, bias_arg, placeholder_values) if bias_arg is not None else None
        if (weight_arg is not None and weight is None) or (bias_arg is not None and bias is None):
            return False
        if not apply:
            return True
        dtype = weight.dtype if weight is not None else scale.dtype
        new_weight = (weight.float() if weight is not None else torch.ones_like(scale)) / scale
        _set_norm_arg(gm, producer, 2, "weight", new_weight.to(dtype), prefix)
        if bias is not None:
            _set_norm_arg(gm, producer, 3, "bias", (bias.float() / scale).to(bias.dtype), prefix)
        return True
    if producer.target in _MUL and len(producer.args) == 2:
        for position in (0, 1):
            value = constant_tensor(gm, producer.args[position], placeholder_values)
            other = producer.args[1 - position]
            channels = producer.meta.get("val").shape[-1] if isinstance(producer.meta.get("val"), Tensor) else None
            size = channels if scale is None else scale.shape[0]
            if value is not None and value.dim() == 1 and value.shape[0] == size and isinstance(other, fx.Node):
                if not apply:
                    return True
                _replace_constant_arg(gm, producer, position, None, (value.float() / scale).to(value.dtype), prefix, "norm_weight")
                return True
    return False


def _set_norm_arg(gm, node, position, key, value, prefix):
    constant = _constant_node(gm, f"{prefix}_norm_{key}", value, node)
    _mark_replacement(constant, _arg(node, position, key))
    if key in node.kwargs:
        node.update_kwarg(key, constant)
        return
    args = list(node.args)
    while len(args) <= position:
        args.append(None)
    args[position] = constant
    node.args = tuple(args)


def _fold_into_linear(gm, previous: LinearSite, scale: Tensor, placeholder_values, prefix) -> None:
    """Scale the output rows (and bias) of the linear that produces x (or a factor of it)."""
    if previous.bias is not None:
        bias = constant_tensor(gm, previous.bias, placeholder_values)
        index = _LINEAR_BIAS_INDEX.get(previous.node.target, 0)  # addmm keeps its bias first
        key = "bias" if "bias" in previous.node.kwargs else None
        _replace_constant_arg(gm, previous.node, index, key, (bias.float() / scale).to(bias.dtype), prefix, "previous_bias")
        previous.bias = previous.node.kwargs["bias"] if key else previous.node.args[index]
    previous.weight = (previous.weight.detach().float() / scale[:, None]).to(previous.weight.dtype)
