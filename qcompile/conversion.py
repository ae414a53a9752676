"""From calibrated statistics to quantized ops: the calibration algorithm, then the linear rewrite.

Shared by both entry points (`qcompile.quantize` and the `torch.compile` backend).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, fx

from qcompile import numerics
from qcompile.passes import awq, gptq
from qcompile.passes.find_linears import LinearSite
from qcompile.passes.insert_observers import ActivationObserver
from qcompile.passes.quantize_linears import (
    LayerReport,
    _sqnr_db,
    fake_quantize_input_nvfp4,
    fake_quantize_weight,
    quantize_linears,
    static_input_scale,
)
from qcompile.passes.smoothquant import smooth_linears
from qcompile.recipes import Recipe

# Rows of calibration input each observer keeps for the algorithms that search scales on output error.
SEARCH_ROWS = 512


# Algorithms that run on calibration data; the others fall back to max calibration and say so.
DATA_ALGORITHMS = ("smoothquant", "awq", "gptq")


def needs_calibration(recipe: Recipe) -> bool:
    """Static activation scales come from data, and so do the data-driven algorithms' scales."""
    return recipe.static_inputs or recipe.algorithm in DATA_ALGORITHMS


def runs_gptq(recipe: Recipe) -> bool:
    return recipe.algorithm == "gptq" and gptq.unsupported(recipe.weights) is None


def rows_to_keep(recipe: Recipe) -> int:
    searches = recipe.algorithm == "awq" or (recipe.algorithm == "smoothquant" and recipe.alpha == "search")
    return SEARCH_ROWS if searches else 0


def wants_hessian(recipe: Recipe) -> bool:
    """Whether observers sum x^T x: AWQ measures weight error on every calibration row through it, and GPTQ without
    sequential calibration (the torch.compile backend) builds its one-shot Hessians from it."""
    return runs_gptq(recipe) or recipe.algorithm == "awq"


def algorithm_that_runs(recipe: Recipe, sequential: bool = True) -> str:
    """What `convert` runs for this recipe, in words. `sequential`: GPTQ may rerun the calibration batches
    (`qcompile.quantize`); the torch.compile backend cannot, and uses one-shot Hessians."""
    if recipe.algorithm == "smoothquant":
        return f"smoothquant (alpha {recipe.alpha})"
    if recipe.algorithm == "awq":
        return "awq (scale search + clip search)" if awq.clips(recipe.weights) else "awq (scale search)"
    if recipe.algorithm == "gptq":
        reason = gptq.unsupported(recipe.weights)
        if reason is not None:
            return f"max (gptq {reason})"
        how = "sequential calibration" if sequential else "one-shot Hessians"
        return f"gptq ({how}, blocks of {gptq.BLOCK_SIZE}, damping {gptq.DAMPING}, group scale search)"
    if recipe.algorithm == "max":
        return "max"
    return f"max ({recipe.algorithm} not available yet)"


def input_fake_quantizer(recipe: Recipe):
    """x, amax -> x as the recipe's input quantization would see it (identity for weight-only recipes)."""
    spec = recipe.inputs

    def fake_quantize(x: Tensor, amax: Tensor) -> Tensor:
        if spec is None:
            return x
        scale = None if spec.dynamic else static_input_scale(spec.format, amax)
        if spec.format == "nvfp4" and scale is not None:  # the same values, without packing nibbles
            return fake_quantize_input_nvfp4(x, scale)
        return numerics.fake_quantize(x, spec.format, spec.granularity, scale=scale).float()

    return fake_quantize


_EXPERT = re.compile(r"\.experts\.(\d+)\.")


def uncalibrated_experts(input_amax: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
    """For MoE experts that no calibration token was routed to (amax None): the largest input range of the same
    projection in the layer's other experts, the range the router could send them. Any other layer with no data
    is an error: the calibration never reached it."""
    def projection(name: str) -> str | None:  # the name with its expert index wildcarded
        return _EXPERT.sub(".experts.*.", name) if _EXPERT.search(name) else None

    fallbacks = {}
    for name, amax in input_amax.items():
        if amax is not None:
            continue
        siblings = [a for other, a in input_amax.items()
                    if a is not None and projection(name) is not None and projection(other) == projection(name)]
        if not siblings:
            raise ValueError(f"layer {name!r} saw no calibration data: the calibration never reached it")
        fallbacks[name] = torch.stack([a.float().reshape(()) for a in siblings]).amax()
    if fallbacks:
        warnings.warn(f"{len(fallbacks)} MoE expert layers saw no calibration token ({', '.join(list(fallbacks)[:4])}"
                      f"{', ...' if len(fallbacks) > 4 else ''}): quantized from their weights alone, with the input "
                      "range of their sibling experts; calibrate with more tokens to cover every expert",
                      stacklevel=3)
    return fallbacks


def convert(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    recipe: Recipe,
    observers: Mapping[str, ActivationObserver] | None,
    placeholder_values: Mapping[str, Tensor] | None = None,
    calibration_forward: Callable[[Callable], object] | None = None,
    *,
    progress: bool = False,
) -> list[LayerReport]:
    """Run the recipe's algorithm on the observed statistics, then rewrite every site into a qcompile:: op.

    `calibration_forward(model)`, when given, calls `model(...)` once per calibration batch; GPTQ uses it for
    sequential calibration (each layer's Hessian from inputs that already went through the quantized layers
    before it). Without it GPTQ reads one-shot Hessians from the observers (built with `wants_hessian`).
    """
    observers = observers or {}
    # a layer that saw only empty inputs (an expert no token was routed to) has no measured range
    fallbacks = uncalibrated_experts({name: obs.amax if obs.rows_seen else None for name, obs in observers.items()})
    observers = {name: obs for name, obs in observers.items() if name not in fallbacks}
    all_sites, sites = sites, [site for site in sites if site.name not in fallbacks]
    input_amax = {name: observer.amax for name, observer in observers.items()}
    if recipe.algorithm == "smoothquant":
        alpha = None if recipe.alpha == "search" else float(recipe.alpha)
        input_amax = smooth_linears(
            gm, sites, observers, alpha,
            lambda w: fake_quantize_weight(w, recipe.weights), input_fake_quantizer(recipe), placeholder_values,
            fold_only=not recipe.explicit_input_scales,
        )
    # Weights as they were before an algorithm moved them off their float values (clipping, GPTQ): the report's
    # SQNR measures the quantization against these, not against the moved weights the quantizer sees.
    references: dict[str, Tensor] = {}
    if recipe.algorithm == "awq":
        input_amax, references = awq.awq_linears(
            gm, sites, observers, lambda w: fake_quantize_weight(w, recipe.weights),
            None if recipe.inputs is None else input_fake_quantizer(recipe),
            recipe.weights, placeholder_values, progress=progress, fold_only=not recipe.explicit_input_scales,
        )
    elif runs_gptq(recipe):
        references = {site.name: site.weight for site in sites}
        if calibration_forward is not None:
            measured = gptq.gptq_sequential(gm, sites, recipe.weights, calibration_forward, progress=progress)
            unseen = uncalibrated_experts(measured)  # their weights were left round-to-nearest
            input_amax.update({**measured, **unseen})
            fallbacks.update(unseen)
        else:
            missing = [site.name for site in sites if observers.get(site.name) is None or observers[site.name].xtx is None]
            if missing:
                raise ValueError(
                    f"GPTQ needs calibration data: no Hessian was recorded for layer {missing[0]!r} "
                    "(pass calib=... to qcompile.quantize, or calibrate inside qcompile.calibrate())"
                )
            gptq.gptq_from_hessians(sites, {name: obs.hessian for name, obs in observers.items()}, recipe.weights,
                                    progress=progress)
    input_amax.update(fallbacks)
    reports = quantize_linears(gm, all_sites, recipe, input_amax)
    for report, site in zip(reports, all_sites):
        if site.name in fallbacks:
            report.calibration = "no tokens routed here: max weights, input range of its sibling experts"
        if site.name in references:
            dequantized = fake_quantize_weight(site.weight.detach(), recipe.weights)
            report.weight_sqnr_db = _sqnr_db(references[site.name].detach(), dequantized)
    return reports
