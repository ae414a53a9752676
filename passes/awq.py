"""AWQ: activation-aware weight quantization (scale search, then clipping search).

For the linears that read one tensor x (q/k/v, gate/up), per input channel j:

    s_j = mean|x_j|^alpha / mean|W~[:, j]|^(1 - alpha),   normalized so that max(s) * min(s) = 1

where W~ is the weight with every quantization group divided by its own max, so channels are compared on the
grid the quantizer uses. x' = x / s and W' = W * s leave x W^T unchanged, while the channels that carry large
activations get finer steps. alpha runs over a grid in [0, 1] (and "no scaling" competes too); each candidate's
weights are fake-quantized with the recipe's own weight format (and its input format, for W4A8) and the candidate
with the lowest output error ||x' Q(W')^T - x W^T||^2 on the observers' sampled rows wins. The division by s folds
into the producer of x exactly as SmoothQuant's does (`smoothquant.migrate_scale`: norm weight, previous linear's
rows, or an explicit mul).

Clipping search, once every scale is in place: for each quantization group (output row x group of input
channels) the group's range is shrunk to r * max over a grid of ratios r, and the ratio with the lowest error of
that group's share of the output, ||x_g (w_g - Q(clip_r(w))_g)||^2, is kept. The clipped weight becomes
`site.weight`, so the quantizer derives its group scales from the clipped range and stores exactly the searched
result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, fx
from tqdm.auto import tqdm

from qcompile.passes.find_linears import LinearSite
from qcompile.passes.insert_observers import ActivationObserver
from qcompile.passes.smoothquant import migrate_scale, shared_input_groups
from qcompile.recipes import QuantSpec

ALPHA_GRID = tuple(i / 20 for i in range(0, 21))
CLIP_RATIOS = tuple(1.0 - i / 20 for i in range(0, 10))  # 1.0, 0.95, ..., 0.55
_SCALE_RANGE = (1e-4, 1e4)
_EPS = 1e-8
# Upper bound on the elements of one [groups, rows, outputs] error tensor in the clipping search.
_CLIP_CHUNK_ELEMENTS = 1 << 24


def quantization_group_size(spec: QuantSpec, in_features: int) -> int | None:
    """How many consecutive input channels share one weight scale (None: one scale spans rows, e.g. per-tensor)."""
    if spec.format == "nvfp4":
        return int(spec.block_size or 16)
    if spec.granularity == "group":
        return int(spec.block_size if isinstance(spec.block_size, int) else spec.block_size[-1])
    if spec.granularity == "channel":
        return in_features
    return None


def clips(spec: QuantSpec) -> bool:
    """Whether the clipping search applies: only where each scale covers part of one row."""
    return quantization_group_size(spec, 1) is not None


def _grouped(w: Tensor, group: int) -> Tensor:
    """[O, I] -> [O, G, group], zero-padded along I (the layout quantize_int4 and quantize_nvfp4 use)."""
    rows, cols = w.shape
    padded = -(-cols // group) * group
    if padded != cols:
        w = torch.nn.functional.pad(w, (0, padded - cols))
    return w.reshape(rows, padded // group, group)


def weight_channel_mean(weights: list[Tensor], group: int | None) -> Tensor:
    """mean over output rows of |W| relative to its quantization group's max, per input channel."""
    w = torch.cat([w.detach().float() for w in weights]).abs()
    cols = w.shape[1]
    if group is None:
        normalized = w / w.amax(dim=1, keepdim=True).clamp(min=_EPS)
    else:
        grouped = _grouped(w, group)
        normalized = (grouped / grouped.amax(dim=2, keepdim=True).clamp(min=_EPS)).reshape(w.shape[0], -1)[:, :cols]
    return normalized.mean(dim=0)


def awq_scale(x_mean: Tensor, w_mean: Tensor, alpha: float) -> Tensor:
    """s = x_mean^alpha / w_mean^(1-alpha), normalized to max(s) * min(s) = 1 and clamped to a sane range."""
    scale = x_mean.float().clamp(min=_EPS).pow(alpha) / w_mean.float().clamp(min=_EPS).pow(1.0 - alpha)
    scale = scale / (scale.max() * scale.min()).sqrt()
    return scale.clamp(*_SCALE_RANGE)


def search_scale(
    sample: Tensor,
    x_mean: Tensor,
    input_amax: Tensor,
    weights: list[Tensor],
    fake_quantize_weight: Callable[[Tensor], Tensor],
    fake_quantize_input: Callable[[Tensor, Tensor], Tensor],
    group: int | None,
    grid: tuple[float, ...] = ALPHA_GRID,
) -> tuple[Tensor | None, float | None]:
    """(best scale or None for no scaling, its alpha) by output error on the sampled rows."""
    x = sample.float()
    floats = [w.detach().float() for w in weights]
    references = [x @ w.t() for w in floats]
    w_mean = weight_channel_mean(floats, group)
    best, best_alpha, best_error = None, None, float("inf")
    for alpha in (None, *grid):
        scale = torch.ones_like(x_mean, dtype=torch.float32) if alpha is None else awq_scale(x_mean, w_mean, alpha)
        xq = fake_quantize_input(x / scale, (input_amax.float() / scale).amax())
        error = 0.0
        for w, reference in zip(floats, references):
            error += (xq @ fake_quantize_weight(w * scale).t() - reference).pow(2).sum().item()
        if error < best_error:
            best, best_alpha, best_error = (None if alpha is None else scale), alpha, error
    return best, best_alpha


def search_clip(
    weight: Tensor,
    sample: Tensor,
    fake_quantize_weight: Callable[[Tensor], Tensor],
    group: int,
    symmetric: bool = True,
    ratios: tuple[float, ...] = CLIP_RATIOS,
) -> Tensor:
    """The weight clipped, per quantization group, to the range whose quantization best preserves x_g w_g."""
    w = weight.detach().float()
    rows, cols = w.shape
    x = _grouped(sample.float(), group).transpose(0, 1)  # [G, N, group]
    grouped = _grouped(w, group)  # [O, G, group]
    if symmetric:
        high = grouped.abs().amax(dim=2)
        low = -high
    else:
        high = grouped.amax(dim=2).clamp(min=0.0)
        low = grouped.amin(dim=2).clamp(max=0.0)
    best_error = torch.full((rows, grouped.shape[1]), float("inf"))
    best_ratio = torch.ones_like(best_error)
    chunk = max(1, _CLIP_CHUNK_ELEMENTS // max(1, x.shape[0] * x.shape[1]))
    for ratio in ratios:
        clipped = torch.maximum(torch.minimum(grouped, (high * ratio)[..., None]), (low * ratio)[..., None])
        clipped = clipped.reshape(rows, -1)[:, :cols]
        delta = _grouped(w - fake_quantize_weight(clipped).float(), group)  # [O, G, group]
        error = torch.empty_like(best_error)
        for start in range(0, rows, chunk):
            part = delta[start : start + chunk].permute(1, 2, 0)  # [G, group, o]
            error[start : start + chunk] = torch.bmm(x, part).pow(2).sum(dim=1).t()
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    clipped = torch.maximum(torch.minimum(grouped, (high * best_ratio)[..., None]), (low * best_ratio)[..., None])
    return clipped.reshape(rows, -1)[:, :cols]


def awq_linears(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    observers: Mapping[str, ActivationObserver],
    fake_quantize_weight: Callable[[Tensor], Tensor],
    fake_quantize_input: Callable[[Tensor, Tensor], Tensor],
    spec: QuantSpec,
    placeholder_values: Mapping[str, Tensor] | None = None,
    *,
    alpha_grid: tuple[float, ...] = ALPHA_GRID,
    clip_ratios: tuple[float, ...] = CLIP_RATIOS,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Scale search per shared-input group (folded into the graph), then clipping search per layer.

    Returns (per-layer input amax after scaling, per-layer weight before clipping). `site.weight` becomes the
    scaled, clipped weight that the quantization pass stores; the graph keeps its float function.
    """
    placeholder_values = placeholder_values or {}
    by_node = {site.node: site for site in sites}
    new_amax: dict[str, Tensor] = {}
    scaled_rows: dict[str, Tensor] = {}  # each layer's sampled input rows, divided by its group's scale
    with torch.no_grad():
        groups = shared_input_groups(sites)
        for index, group in enumerate(tqdm(groups, desc="awq scales", disable=not progress, leave=False)):
            observer = observers[group[0].name]
            if observer.sample is None or observer.channel_abs_mean is None:
                raise ValueError(f"AWQ needs sampled calibration rows for layer {group[0].name!r}")
            sample = observer.sample.float()
            group_size = quantization_group_size(spec, group[0].in_features)
            scale, _ = search_scale(
                sample, observer.channel_abs_mean, observer.channel_amax, [site.weight for site in group],
                fake_quantize_weight, fake_quantize_input, group_size, alpha_grid,
            )
            if scale is not None:
                migrate_scale(gm, group, scale, by_node, placeholder_values, f"_qc_awq_{index}")
                sample = sample / scale
            for site in group:
                new_amax[site.name] = observer.amax if scale is None else (observer.channel_amax.float() / scale).amax()
                scaled_rows[site.name] = sample
        gm.graph.lint()
        gm.recompile()

        references: dict[str, Tensor] = {}
        if clips(spec) and clip_ratios:
            # After every scale is folded: a later group's scale may have rescaled this layer's output rows.
            for site in tqdm(sites, desc="awq clipping", disable=not progress, leave=False):
                group_size = quantization_group_size(spec, site.in_features)
                references[site.name] = site.weight.detach().float()
                site.weight = search_clip(
                    site.weight, scaled_rows[site.name], fake_quantize_weight, group_size, spec.symmetric, clip_ratios
                )
    return new_amax, references
