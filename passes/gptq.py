"""GPTQ: quantize weights column by column, pushing each column's rounding error onto the columns not yet quantized.

Per linear, with H = 2 X^T X / N over its calibration inputs (float32):

1. damp H by 0.01 * mean(diag H) on the diagonal; U = the upper Cholesky factor of H^-1;
2. walk the input columns in blocks of 128: quantize column i, spread its error e_i = (w_i - q_i) / U_ii over the
   rest of the block at once (W[:, j] -= e_i U_ij) and over the columns after the block lazily, with one matrix
   product per block;
3. optionally in act-order (columns by decreasing diag H), with the group scales then fixed up front from the
   original weight, so the groups stay the contiguous ones the storage format uses.

The quantization grid is the recipe's own (symmetric INT4/INT3 in groups along the input axis, or INT8 per output
channel). A group's scale is fixed when the walk reaches its first column, from the weights as updated so far:
ratio * group max / qmax, with the ratio (by default 1.0 down to 0.55: `qcompile.algorithms.GPTQ`) that best quantizes the group's
current values, each column weighted by its diag H; ratio 1 is the reference's plain max rule (`scale_ratios=
(1.0,)`). The element that set the max is rounded to +-qmax, so the dequantized result, handed to the quantization
pass as `site.weight`, requantizes to exactly these codes and scales (to the last float bit of a scale). A Cholesky that fails is retried with ten times the damping,
three times; then the layer falls back to round-to-nearest with a warning naming it.

Calibration (`gptq_sequential`): the calibration batches are recorded at the graph's inputs once, then the graph
runs segment by segment, from one shared-input group of linears (q/k/v, o, gate/up, down, ...) to the next: a
group's Hessian comes from its input as computed with every earlier layer already quantized, and only that one
Hessian is held at a time. The torch.compile backend cannot rerun its calibration block, so it builds one-shot
Hessians from the float model's activations inside `qcompile.calibrate()` (`gptq_from_hessians`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from tqdm.auto import tqdm

from qcompile import numerics
from qcompile.passes.find_linears import LinearSite
from qcompile.passes.smoothquant import shared_input_groups
from qcompile.recipes import QuantSpec

_DAMPING_RETRIES = 3


def unsupported(spec: QuantSpec) -> str | None:
    """Why GPTQ cannot produce weights for this spec (None: it can)."""
    if spec.format in ("int4", "int3") and spec.granularity == "group" and spec.symmetric:
        return None
    if spec.format == "int8" and spec.granularity == "channel":
        return None
    return f"needs symmetric int4/int3 group or int8 channel weights, not {spec.format} {spec.granularity}"


def _grid(spec: QuantSpec, in_features: int) -> tuple[int, float]:
    """(group size along the input axis, qmax) of the spec's integer grid."""
    if spec.format == "int8":
        return in_features, numerics.INT8_MAX
    group = spec.block_size if isinstance(spec.block_size, int) else spec.block_size[-1]
    return int(group), float(2 ** (spec.bits - 1) - 1)


def round_to_nearest(weight: Tensor, spec: QuantSpec) -> Tensor:
    """The plain quantized weight on GPTQ's grid (the fallback), dequantized to float32."""
    group, qmax = _grid(spec, weight.shape[1])
    w = weight.detach().float()
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group):
        part = w[:, start : start + group]
        scale = part.abs().amax(dim=1, keepdim=True) / qmax
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        out[:, start : start + group] = torch.clamp(torch.round(part / scale), -qmax, qmax) * scale
    return out


def inverse_cholesky(hessian: Tensor, damping: float) -> Tensor | None:
    """Upper Cholesky factor of (H + damp I)^-1, raising the damping on failure; None if it never succeeds."""
    h = hessian.float()
    if not bool(torch.isfinite(h).all()):
        return None
    damp = damping * h.diagonal().mean().item()
    for _ in range(_DAMPING_RETRIES + 1):
        if damp > 0:
            damped = h.clone()
            damped.diagonal().add_(damp)
            lower, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
                if int(info) == 0 and bool(torch.isfinite(factor).all()):
                    return factor
        damp *= 10.0
    return None


class _GroupGrid:
    """Per (row, group): scale = ratio * max / qmax, and the column index (within the group) of the element that
    set the max. With several ratios, each (row, group) keeps the one with the least quantization error of its
    current values, weighted per column by diag H (the ratio 1 is the plain max rule)."""

    def __init__(self, rows: int, groups: int, qmax: float, ratios: tuple[float, ...] = (1.0,), device=None):
        self.qmax = qmax
        self.ratios = ratios
        self.scale = torch.ones(rows, groups, device=device)
        self.anchor = torch.full((rows, groups), -1, dtype=torch.long, device=device)
        self.sign = torch.zeros(rows, groups, device=device)

    def fix(self, index: int, values: Tensor, importance: Tensor | None = None) -> None:
        amax, where = values.abs().max(dim=1)
        empty = amax == 0
        scale = amax / self.qmax
        if len(self.ratios) > 1:
            weight = torch.ones(values.shape[1], device=values.device) if importance is None else importance
            best, best_error = scale, None
            for ratio in self.ratios:
                candidate = torch.where(empty, torch.ones_like(amax), ratio * amax / self.qmax)[:, None]
                q = torch.clamp(torch.round(values / candidate), -self.qmax, self.qmax) * candidate
                error = ((values - q).pow(2) * weight).sum(dim=1)
                if best_error is None:
                    best, best_error = candidate[:, 0], error
                else:
                    better = error < best_error
                    best, best_error = torch.where(better, candidate[:, 0], best), torch.minimum(error, best_error)
            scale = best
        self.scale[:, index] = torch.where(empty, torch.ones_like(amax), scale)
        self.anchor[:, index] = torch.where(empty, torch.full_like(where, -1), where)
        self.sign[:, index] = torch.sign(values.gather(1, where[:, None])[:, 0])

    def quantize(self, w: Tensor, index: int, offset: int) -> Tensor:
        """Column `offset` of group `index`, dequantized."""
        scale = self.scale[:, index]
        q = torch.clamp(torch.round(w / scale), -self.qmax, self.qmax)
        anchor = self.anchor[:, index]
        q = torch.where(anchor == offset, self.sign[:, index] * self.qmax, q)
        q = torch.where(anchor < 0, torch.zeros_like(q), q)  # the group was all zero: it stays zero
        return q * scale


def gptq_weight(
    weight: Tensor,
    hessian: Tensor,
    spec: QuantSpec,
    *,
    name: str = "",
    block_size: int,
    damping: float,
    act_order: bool = False,
    scale_ratios: tuple[float, ...] = (1.0,),
) -> Tensor:
    """GPTQ-quantized `weight` ([out, in]) for the Hessian of its input ([in, in]), dequantized to float32.

    `scale_ratios` other than (1.0,) search each group's scale among ratio * max / qmax (see `_GroupGrid`)."""
    reason = unsupported(spec)
    if reason is not None:
        raise ValueError(f"GPTQ {reason}")
    w = weight.detach().float().clone()
    rows, cols = w.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"layer {name!r}: Hessian of shape {tuple(hessian.shape)} for a weight of {cols} inputs")
    group, qmax = _grid(spec, cols)
    h = hessian.detach().float()
    grid = _GroupGrid(rows, math.ceil(cols / group), qmax, scale_ratios, device=w.device)
    importance = h.diagonal().clone()
    order = torch.arange(cols, device=w.device)
    if act_order:
        for index in range(grid.scale.shape[1]):  # static groups: scales from the original weight
            columns = slice(index * group, (index + 1) * group)
            grid.fix(index, w[:, columns], importance[columns])
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
        w, h = w[:, order], h[order][:, order]
    factor = inverse_cholesky(h, damping)
    if factor is None:
        warnings.warn(
            f"GPTQ: the Hessian of layer {name!r} is not positive definite even with damping "
            f"{damping * 10 ** _DAMPING_RETRIES:g} x mean(diag); the layer falls back to round-to-nearest",
            RuntimeWarning,
            stacklevel=2,
        )
        return round_to_nearest(weight, spec)
    result = torch.empty_like(w)
    columns = order.tolist()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        inner = factor[start:end, start:end]
        for i in range(end - start):
            column = columns[start + i]
            index, offset = divmod(column, group)
            if not act_order and offset == 0:  # the walk enters a new group: fix its scales from current values
                current = torch.cat([block[:, i:], w[:, end:]], dim=1)[:, : min(group, cols - column)]
                grid.fix(index, current, importance[column : column + current.shape[1]])
            quantized = grid.quantize(block[:, i], index, offset)
            result[:, start + i] = quantized
            error = (block[:, i] - quantized) / inner[i, i]
            block[:, i + 1 :] -= error[:, None] * inner[i, i + 1 :][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ factor[start:end, end:]
    if act_order:
        result = result[:, torch.argsort(order)]
    return result


def _quantize_group(group: list[LinearSite], hessian: Tensor, spec: QuantSpec, settings: dict) -> None:
    """Linears reading one input share its Hessian: one GPTQ run over their stacked rows. `settings`: keyword
    arguments of `gptq_weight` (block_size, damping, act_order, scale_ratios)."""
    stacked = torch.cat([site.weight.detach().float() for site in group])
    name = ", ".join(site.name for site in group)
    quantized = gptq_weight(stacked, hessian, spec, name=name, **settings)
    for site, part in zip(group, quantized.split([site.out_features for site in group])):
        site.weight = part.contiguous()


def gptq_from_hessians(
    sites: list[LinearSite],
    hessians: Mapping[str, Tensor],
    spec: QuantSpec,
    *,
    progress: bool = False,
    **settings,
) -> None:
    """One-shot GPTQ: every layer from a Hessian of the float model's activations (`hessians` by layer name).
    `settings`: keyword arguments of `gptq_weight`."""
    with torch.no_grad():
        for group in tqdm(shared_input_groups(sites), desc="gptq", disable=not progress, leave=False):
            _quantize_group(group, hessians[group[0].name], spec, settings)


class _Recorded(Exception):
    """Raised by the input recorder to stop a calibration forward right after the graph's inputs are bound."""


class _InputRecorder(nn.Module):
    def __init__(self, placeholders: list[fx.Node]):
        super().__init__()
        self.placeholders = placeholders
        self.records: list[dict[fx.Node, object]] = []

    def forward(self, *values):
        self.records.append(dict(zip(self.placeholders, values)))
        raise _Recorded


def record_graph_inputs(gm: fx.GraphModule, calibration_forward: Callable[[Callable], object]) -> list[dict]:
    """The value of every placeholder for each calibration call, without running the graph past its inputs."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    recorder = _InputRecorder(placeholders)
    target = "_qc_gptq_input_recorder"
    gm.add_submodule(target, recorder)
    anchor = placeholders[-1] if placeholders else next(iter(gm.graph.nodes))
    insert = gm.graph.inserting_after(anchor) if placeholders else gm.graph.inserting_before(anchor)
    with insert:
        node = gm.graph.call_module(target, tuple(placeholders))
    gm.recompile()

    def model(*args, **kwargs):
        try:
            gm(*args, **kwargs)
        except _Recorded:
            pass

    try:
        calibration_forward(model)
    finally:
        gm.graph.erase_node(node)
        gm.delete_submodule(target)
        gm.recompile()
    if not recorder.records:
        raise ValueError("GPTQ's calibration forward never called the model: no calibration batch to run")
    return recorder.records


class _SegmentRunner(fx.Interpreter):
    """Runs a slice of the graph's nodes on a saved environment, with some linears computed from new weights."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=False)
        self.nodes = list(gm.graph.nodes)
        self.position = {node: i for i, node in enumerate(self.nodes)}
        # A value is needed up to its last user (the output node counts).
        self.last_use = {
            node: max((self.position[user] for user in node.users), default=self.position[node]) for node in self.nodes
        }
        self.overrides: dict[fx.Node, LinearSite] = {}

    def run_segment(self, env: dict, start: int, end: int) -> None:
        self.env = env
        for node in self.nodes[start:end]:
            if node.op in ("placeholder", "output") or node in env:
                continue
            site = self.overrides.get(node)
            if site is not None:
                bias = env[site.bias] if isinstance(site.bias, fx.Node) else site.bias
                env[node] = F.linear(env[site.input], site.weight.to(env[site.input].dtype),
                                     None if bias is None else bias)
            else:
                env[node] = self.run_node(node)
        for node in [node for node in env if self.last_use[node] < end]:
            del env[node]


def gptq_sequential(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    spec: QuantSpec,
    calibration_forward: Callable[[Callable], object],
    *,
    progress: bool = False,
    **settings,
) -> dict[str, Tensor]:
    """GPTQ with sequential calibration; returns each layer's input amax as the quantized model feeds it (None
    for a layer that saw no row). `settings`: keyword arguments of `gptq_weight`.

    `calibration_forward(model)` calls `model(...)` once per calibration batch (as `qcompile.quantize` does with
    `calib`). `site.weight` becomes each layer's GPTQ weight; the graph itself is left as it was.
    """
    with torch.no_grad():
        records = record_graph_inputs(gm, calibration_forward)
        runner = _SegmentRunner(gm)
        groups = sorted(shared_input_groups(sites), key=lambda g: min(runner.position[s.node] for s in g))
        starts = [min(runner.position[site.node] for site in group) for group in groups]
        for env in records:
            runner.run_segment(env, 0, starts[0])
        input_amax: dict[str, Tensor] = {}
        bar = tqdm(total=len(groups), desc="gptq", disable=not progress, leave=False, unit="group")
        for k, group in enumerate(groups):
            bar.set_postfix_str(group[0].name, refresh=False)
            source = group[0].input
            xtx, rows, amax = None, 0, torch.zeros(())
            for env in records:
                x = env[source].detach().float().reshape(-1, group[0].in_features)
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(f"calibration data gives NaN or inf in the input of layer {group[0].name!r}")
                xtx = x.t() @ x if xtx is None else xtx.addmm_(x.t(), x)
                rows += x.shape[0]
                if x.numel():
                    amax = torch.maximum(amax, x.abs().amax())
            if rows:
                _quantize_group(group, xtx * (2.0 / rows), spec, settings)
            del xtx
            for site in group:
                # no row (an MoE expert no token was routed to): the weight stays as it is, rounded to nearest,
                # and None tells the caller that this layer has no measured range
                input_amax[site.name] = amax if rows else None
                runner.overrides[site.node] = site
            if k + 1 < len(groups):
                for env in records:
                    runner.run_segment(env, starts[k], starts[k + 1])
            bar.update()
        bar.close()
    return input_amax
