"""AWQ: activation-aware weight quantization (scale search, then clipping search).

For the linears that read one tensor x (q/k/v, gate/up), per input channel j:

    s_j = mean|x_j|^alpha / mean|W~[:, j]|^(1 - alpha),   normalized so that max(s) * min(s) = 1

where W~ is the weight with every quantization group divided by its own max, so channels are compared on the
grid the quantizer uses. x' = x / s and W' = W * s leave x W^T unchanged, while the channels that carry large
activations get finer steps. alpha runs over a grid in [0, 1] (and "no scaling" competes too); each candidate's
weights are fake-quantized with the recipe's own weight format (and its input format, for W4A8) and the candidate
with the lowest output error ||x' Q(W')^T - x W^T||^2 wins. The division by s folds into the producer of x exactly
as SmoothQuant's does (`smoothquant.migrate_scale`: norm weight, previous linear's rows, the value projection's
rows through attention without grouped heads, or an explicit mul).

Clipping search, once every scale is in place: for each quantization group (output row x group of input
channels) the group's range is shrunk to r * max over a grid of ratios r, and the ratio with the lowest error of
that group's share of the output, ||x_g (w_g - Q(clip_r(w))_g)||^2, is kept. The clipped weight becomes
`site.weight`, so the quantizer derives its group scales from the clipped range and stores exactly the searched
result. For NVFP4 every candidate keeps the unclipped tensor's global scale (see `search_clip`).

Where the error is measured: the weight's share, ||X (Q(W')/s - W)^T||^2 = sum_o d_o^T (X^T X) d_o, is computed
from the second moment X^T X / N that the observers sum over every calibration row (`input_moment`); only the input
quantization's share (W4A8, NVFP4 inputs) comes from the observers' sampled rows. Measured on SmolLM2-135M (8 windows
of calibration and of evaluation), a clipping search on 512 sampled rows overfits them (128 inputs per group:
perplexity 35.6 against 33.4 without clipping), while the same search on the full second moment gains (32.4). Without X^T X (observers built without
it) both searches fall back to the sampled rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from qcompile import formats
from qcompile.passes.find_linears import LinearSite
from qcompile.passes.insert_observers import ActivationObserver
from qcompile.passes.quantize_linears import CHUNK_ELEMENTS, grouped_padded, sqnr_db, sqnr_db_by_rows
from qcompile.passes.smoothquant import folds, migrate_scale, shared_input_groups
from qcompile.recipes import QuantSpec

_SCALE_RANGE = (1e-4, 1e4)
_EPS = 1e-8
# Upper bound on the elements of one [groups, rows, outputs] error tensor in the clipping search.
_CLIP_CHUNK_ELEMENTS = 1 << 24


def quantization_group_size(spec: QuantSpec, in_features: int) -> int | None:
    """How many consecutive input channels share one weight scale (None: one scale spans rows, e.g. per-tensor)."""
    fixed = formats.FORMATS[spec.format].fixed_block
    if fixed is not None:
        return fixed
    if spec.granularity == "group":
        return int(spec.block_size if isinstance(spec.block_size, int) else spec.block_size[-1])
    if spec.granularity == "channel":
        return in_features
    return None


def clips(spec: QuantSpec) -> bool:
    """Whether the clipping search applies: only where each scale covers part of one row."""
    return quantization_group_size(spec, 1) is not None


def weight_channel_mean(weights: list[Tensor], group: int | None, row_block: int | None = None) -> Tensor:
    """mean over output rows of |W| relative to its quantization group's max, per input channel (`row_block` rows
    at a time)."""
    total, rows = None, 0
    for weight in weights:
        step = len(weight) if row_block is None else max(1, row_block)
        for start in range(0, len(weight), step):
            w = weight[start : start + step].detach().float().abs()
            cols = w.shape[1]
            if group is None:
                normalized = w / w.amax(dim=1, keepdim=True).clamp(min=_EPS)
            else:
                grouped = grouped_padded(w, group)
                normalized = (grouped / grouped.amax(dim=2, keepdim=True).clamp(min=_EPS)).reshape(len(w), -1)[:, :cols]
            part = normalized.sum(dim=0)
            total = part if total is None else total + part
            rows += len(w)
    return total / max(rows, 1)


def awq_scale(x_mean: Tensor, w_mean: Tensor, alpha: float) -> Tensor:
    """s = x_mean^alpha / w_mean^(1-alpha), normalized to max(s) * min(s) = 1 and clamped to a sane range."""
    scale = x_mean.float().clamp(min=_EPS).pow(alpha) / w_mean.float().clamp(min=_EPS).pow(1.0 - alpha)
    scale = scale / (scale.max() * scale.min()).sqrt()
    return scale.clamp(*_SCALE_RANGE)


def _output_error(delta: Tensor, moment: Tensor) -> Tensor:
    """sum over rows o of delta_o^T M delta_o: ||X delta^T||^2 / N for the second moment M = X^T X / N."""
    return ((delta @ moment) * delta).sum()


def search_scale(
    sample: Tensor,
    x_mean: Tensor,
    input_amax: Tensor,
    weights: list[Tensor],
    fake_quantize_weight: Callable[[Tensor], Tensor],
    fake_quantize_input: Callable[[Tensor, Tensor], Tensor] | None,
    group: int | None,
    grid: tuple[float, ...],
    moment: Tensor | None = None,
    *,
    tensor_scale: bool = False,
    row_block: int | None = None,
) -> tuple[Tensor | None, float | None]:
    """(best scale or None for no scaling, its alpha) by output error.

    With `moment` (X^T X / N over every calibration row), the weight's share of the error, ||X (Q(W s)/s - W)^T||^2,
    is exact over the whole calibration set; the sampled rows then only supply the input quantization's share
    (none where `fake_quantize_input` is None: a weight-only recipe). Without it, the whole error is measured on
    the sampled rows. `tensor_scale` and `row_block` as in `search_clip`: every error is a sum over output rows, so
    candidates are measured a block of rows at a time, each block quantized under the whole scaled weight's max.
    """
    w_mean = weight_channel_mean(weights, group, row_block)
    quantizes_inputs = fake_quantize_input is not None
    x = sample.float() if (quantizes_inputs or moment is None) else None
    references = [x @ w.detach().float().t() for w in weights] if x is not None else []
    rows = max(1, x.shape[0]) if x is not None else 1
    best, best_alpha, best_error = None, None, float("inf")
    for alpha in (None, *grid):
        scale = torch.ones_like(x_mean, dtype=torch.float32) if alpha is None else awq_scale(x_mean, w_mean, alpha)
        error = 0.0
        xq = None
        if x is not None:
            xs = x / scale
            xq = fake_quantize_input(xs, (input_amax.float() / scale).amax()) if quantizes_inputs else xs
        for i, weight in enumerate(weights):
            step = len(weight) if row_block is None else max(1, row_block)
            tensor_amax = None
            if tensor_scale and step < len(weight):
                tensor_amax = torch.stack([(weight[j : j + step].detach().float().abs() * scale).amax()
                                           for j in range(0, len(weight), step)]).amax()
            for start in range(0, len(weight), step):
                w = weight[start : start + step].detach().float()
                quantized = _quantize_rows(w * scale, fake_quantize_weight, tensor_amax)
                reference = references[i][:, start : start + step] if references else None
                if moment is not None:
                    delta = quantized / scale - w
                    error += _output_error(delta, moment).item()
                    if quantizes_inputs:  # the sampled rows' error beyond their own weight-only share
                        error += ((xq @ quantized.t() - reference).pow(2).sum()
                                  - (x @ delta.t()).pow(2).sum()).item() / rows
                else:
                    error += (xq @ quantized.t() - reference).pow(2).sum().item()
                del quantized, w
        if error < best_error:
            best, best_alpha, best_error = (None if alpha is None else scale), alpha, error
    return best, best_alpha


def moment_blocks(moment: Tensor, group: int) -> Tensor:
    """The diagonal `[group, group]` blocks of X^T X / N, `[G, group, group]` (zero-padded to whole groups): all the
    clipping search reads of it, a K/group-th of its size."""
    cols = moment.shape[0]
    padded = -(-cols // group) * group
    blocks = torch.zeros(padded // group, group, group, dtype=torch.float32, device=moment.device)
    for g, start in enumerate(range(0, cols, group)):
        end = min(start + group, cols)
        blocks[g, : end - start, : end - start] = moment[start:end, start:end]
    return blocks


def search_clip(
    weight: Tensor,
    sample: Tensor | None,
    fake_quantize_weight: Callable[[Tensor], Tensor],
    group: int,
    ratios: tuple[float, ...],
    symmetric: bool = True,
    moment: Tensor | None = None,
    tensor_scale: bool = False,
    *,
    blocks: Tensor | None = None,
    row_block: int | None = None,
) -> Tensor:
    """The weight clipped, per quantization group, to the range whose quantization best preserves x_g w_g.

    The error of a group is ||X_g (w_g - q_g)||^2: from the second moment X^T X / N when given (`moment`, or its
    diagonal `blocks` from `moment_blocks`), else on the sampled rows. `tensor_scale`: the format also has a scale
    from the whole tensor's max (NVFP4's global scale); every candidate is then quantized with the unclipped tensor's
    max, and the groups that hold that max stay unclipped, so the stored weight has the very scales the search
    measured. `row_block`: search that many rows at a time (the same result where `fake_quantize_weight` treats rows
    independently, as every format does given the tensor's max: its float32 temporaries then stay small)."""
    rows, cols = weight.shape
    tensor_amax = _abs_max(weight)
    if blocks is None and moment is not None:
        blocks = moment_blocks(moment.float(), group)
    x = None if blocks is not None else grouped_padded(sample.float(), group).transpose(0, 1)  # [G, N, group]
    step = rows if row_block is None else max(1, row_block)
    out = torch.empty(rows, cols, dtype=torch.float32, device=weight.device)
    for start in range(0, rows, step):
        w = weight[start : start + step].detach().float()
        out[start : start + step] = _clip_rows(w, x, blocks, fake_quantize_weight, group, ratios, symmetric,
                                               tensor_amax if tensor_scale else None)
    return out


def _quantize_rows(candidate: Tensor, fake_quantize_weight: Callable[[Tensor], Tensor],
                   tensor_amax: Tensor | None) -> Tensor:
    """Q(candidate); with `tensor_amax`, under the scale that max gives (one extra row holding it pins it)."""
    if tensor_amax is None:
        return fake_quantize_weight(candidate).float()
    anchor = torch.zeros(1, candidate.shape[1], device=candidate.device)
    anchor[0, 0] = tensor_amax
    return fake_quantize_weight(torch.cat([candidate, anchor])).float()[: candidate.shape[0]]


def _clip_rows(w: Tensor, x: Tensor | None, blocks: Tensor | None, fake_quantize_weight, group: int,
               ratios: tuple[float, ...], symmetric: bool, tensor_amax: Tensor | None) -> Tensor:
    rows, cols = w.shape
    grouped = grouped_padded(w, group)  # [O, G, group]
    if symmetric:
        high = grouped.abs().amax(dim=2)
        low = -high
    else:
        high = grouped.amax(dim=2).clamp(min=0.0)
        low = grouped.amin(dim=2).clamp(max=0.0)
    best_error = torch.full((rows, grouped.shape[1]), float("inf"), device=w.device)
    best_ratio = torch.ones_like(best_error)
    if blocks is None:
        chunk = max(1, _CLIP_CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1]))
    for ratio in ratios:
        clipped = torch.maximum(torch.minimum(grouped, (high * ratio)[..., None]), (low * ratio)[..., None])
        clipped = clipped.reshape(rows, -1)[:, :cols]
        delta = grouped_padded(w - _quantize_rows(clipped, fake_quantize_weight, tensor_amax), group)
        del clipped
        if blocks is not None:
            error = (torch.einsum("ogi,gij->ogj", delta, blocks) * delta).sum(dim=2)
        else:
            error = torch.empty_like(best_error)
            for start in range(0, rows, chunk):
                part = delta[start : start + chunk].permute(1, 2, 0)  # [G, group, o]
                error[start : start + chunk] = torch.bmm(x, part).pow(2).sum(dim=1).t()
        del delta
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    if tensor_amax is not None:
        best_ratio = torch.where(torch.maximum(high, -low) >= tensor_amax, torch.ones_like(best_ratio), best_ratio)
    clipped = torch.maximum(torch.minimum(grouped, (high * best_ratio)[..., None]), (low * best_ratio)[..., None])
    return clipped.reshape(rows, -1)[:, :cols]


def awq_linears(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    observers: Mapping[str, ActivationObserver],
    fake_quantize_weight: Callable[[Tensor], Tensor],
    fake_quantize_input: Callable[[Tensor, Tensor], Tensor] | None,
    spec: QuantSpec,
    placeholder_values: Mapping[str, Tensor] | None = None,
    *,
    alpha_grid: tuple[float, ...],
    clip_ratios: tuple[float, ...],
    progress: bool = False,
    fold_only: bool = False,
    independent_rows: bool = True,
    free_observed: bool = False,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Scale search per shared-input group (folded into the graph), then clipping search per layer.

    Returns (per-layer input amax after scaling, per-layer SQNR in dB of the stored weight against the weight
    before clipping). `site.weight` becomes the scaled, clipped weight that the quantization pass stores; the graph
    keeps its float function. `independent_rows`: `fake_quantize_weight` quantizes rows independently given the
    tensor's max (all but W4A8, whose FP8 stage takes the whole weight's), so searches run a block of rows at a time.
    `free_observed`: drop each group's observed rows and x^T x once read (observers used for this conversion only).
    """
    placeholder_values = placeholder_values or {}
    by_node = {site.node: site for site in sites}
    new_amax: dict[str, Tensor] = {}
    scaled_rows: dict[str, Tensor | None] = {}  # each layer's sampled input rows, divided by its group's scale
    # each layer's X^T X / N for inputs divided by its group's scale, as the diagonal blocks the clipping reads
    moments: dict[str, Tensor | None] = {}
    tensor_scale = formats.FORMATS[spec.format].shared_tensor_scale(spec.granularity)
    with torch.no_grad():
        groups = shared_input_groups(sites)
        for index, group in enumerate(tqdm(groups, desc="awq scales", disable=not progress, leave=False)):
            observer = observers[group[0].name]
            moment = input_moment(observer, consume=free_observed)
            if observer.channel_abs_mean is None or (observer.sample is None and (moment is None or fake_quantize_input)):
                raise ValueError(f"AWQ needs sampled calibration rows for layer {group[0].name!r}")
            sample = None if observer.sample is None else observer.sample.float()
            group_size = quantization_group_size(spec, group[0].in_features)
            scale = None
            if not fold_only or folds(gm, group, by_node, placeholder_values):  # else clipping only
                scale, _ = search_scale(
                    sample, observer.channel_abs_mean, observer.channel_amax, [site.weight for site in group],
                    fake_quantize_weight, fake_quantize_input, group_size, alpha_grid, moment, tensor_scale=tensor_scale,
                    row_block=max(1, CHUNK_ELEMENTS // group[0].in_features) if independent_rows else None,
                )
            # all the clipping reads of the moment, taken now: the moment and the group's x^T x are freed before
            # the scale moves the weights (whose float32 temporaries would otherwise come on top of them)
            blocks = None
            if moment is not None and clips(spec) and clip_ratios:
                blocks = scaled_moment_blocks(moment, group_size, scale)
            del moment
            if free_observed:  # read for the last time: freed now rather than after every layer
                for site in group:
                    observers[site.name].xtx, observers[site.name].samples = None, []
            if scale is not None:
                migrate_scale(gm, group, scale, by_node, placeholder_values, f"_qc_awq_{index}")
                sample = None if sample is None else sample / scale
            for site in group:
                new_amax[site.name] = observer.amax if scale is None else (observer.channel_amax.float() / scale).amax()
                scaled_rows[site.name] = sample
                moments[site.name] = blocks
        gm.graph.lint()
        gm.recompile()

        sqnr: dict[str, float] = {}
        if clips(spec) and clip_ratios:
            # After every scale is folded: a later group's scale may have rescaled this layer's output rows.
            for site in tqdm(sites, desc="awq clipping", disable=not progress, leave=False):
                group_size = quantization_group_size(spec, site.in_features)
                row_block = max(1, CHUNK_ELEMENTS // site.in_features) if independent_rows else None
                reference = site.weight.detach()
                site.weight = search_clip(
                    reference, scaled_rows[site.name], fake_quantize_weight, group_size, clip_ratios, spec.symmetric,
                    tensor_scale=tensor_scale, blocks=moments.pop(site.name), row_block=row_block,
                )
                # the report's SQNR is against the weight before clipping; measured here, so that weight is freed
                sqnr[site.name] = stored_weight_sqnr_db(reference, site.weight, fake_quantize_weight, tensor_scale,
                                                        row_block)
                del reference
    return new_amax, sqnr


def input_moment(observer: ActivationObserver, consume: bool = False) -> Tensor | None:
    """X^T X / N of the observed inputs (float32), or None where the observer did not sum X^T X.

    `consume`: the observer serves this conversion only; its sum is divided in place and handed over (the
    observer's `xtx` becomes None) rather than copied, so that a wide layer's K x K matrix is not held twice."""
    if observer.xtx is None or observer.rows_seen == 0:
        return None
    if not consume:
        return observer.xtx.float() / observer.rows_seen
    xtx, observer.xtx = observer.xtx.float(), None
    return xtx.div_(observer.rows_seen)


def scaled_moment_blocks(moment: Tensor, group: int, scale: Tensor | None) -> Tensor:
    """`moment_blocks` of the moment of x / scale (scale None: of x): entry (i, j) divided by s_i, then by s_j."""
    blocks = moment_blocks(moment, group)
    if scale is None:
        return blocks
    s_padded = torch.nn.functional.pad(scale, (0, blocks.shape[0] * group - len(scale)), value=1.0)
    s_padded = s_padded.reshape(blocks.shape[0], group)
    return blocks / s_padded[:, :, None] / s_padded[:, None, :]


def stored_weight_sqnr_db(reference: Tensor, weight: Tensor, fake_quantize_weight: Callable[[Tensor], Tensor],
                          tensor_scale: bool, row_block: int | None) -> float:
    """SQNR in dB of Q(weight), as the quantization pass stores it, against `reference`. With `row_block` (rows
    quantized independently given the tensor's max), the quantized weight is made a block of rows at a time and
    never whole; None: the whole weight at once."""
    tensor_amax = _abs_max(weight) if tensor_scale else None
    if row_block is None:
        return sqnr_db(reference, _quantize_rows(weight, fake_quantize_weight, tensor_amax))
    return sqnr_db_by_rows(reference, lambda first, last: _quantize_rows(weight[first:last], fake_quantize_weight,
                                                                         tensor_amax))


def _abs_max(weight: Tensor) -> Tensor:
    """max |w| as float32, without the float32 |w| copy that `abs().amax()` makes."""
    w = weight.detach()
    return torch.maximum(w.amin().abs(), w.amax().abs()).float()
