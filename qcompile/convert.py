"""From calibrated statistics to quantized ops: the calibration algorithm, then the linear rewrite.

Shared by both entry points (`qcompile.quantize` and the `torch.compile` backend).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, fx

from qcompile import numerics
from qcompile.passes.find_linears import LinearSite
from qcompile.passes.insert_observers import ActivationObserver
from qcompile.passes.quantize_linears import LayerReport, fake_quantize_weight, quantize_linears, static_input_scale
from qcompile.passes.smoothquant import smooth_linears
from qcompile.recipes import Recipe

# Rows of calibration input each observer keeps for the algorithms that search scales on output error.
SEARCH_ROWS = 512


# Algorithms that run on calibration data; the others fall back to max calibration and say so.
DATA_ALGORITHMS = ("smoothquant",)


def needs_calibration(recipe: Recipe) -> bool:
    """Static activation scales come from data, and so do the data-driven algorithms' scales."""
    return recipe.static_inputs or recipe.algorithm in DATA_ALGORITHMS


def rows_to_keep(recipe: Recipe) -> int:
    return SEARCH_ROWS if recipe.algorithm == "smoothquant" and recipe.alpha == "search" else 0


def algorithm_that_runs(recipe: Recipe) -> str:
    if recipe.algorithm == "smoothquant":
        return f"smoothquant (alpha {recipe.alpha})"
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
        return numerics.fake_quantize(x, spec.format, spec.granularity, scale=scale).float()

    return fake_quantize


def convert(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    recipe: Recipe,
    observers: Mapping[str, ActivationObserver] | None,
    placeholder_values: Mapping[str, Tensor] | None = None,
) -> list[LayerReport]:
    """Run the recipe's algorithm on the observed statistics, then rewrite every site into a qcompile:: op."""
    observers = observers or {}
    for name, observer in observers.items():
        if observer.amax is None:
            raise ValueError(f"layer {name!r} saw no calibration data: the calibration never reached it")
    input_amax = {name: observer.amax for name, observer in observers.items()}
    if recipe.algorithm == "smoothquant":
        alpha = None if recipe.alpha == "search" else float(recipe.alpha)
        input_amax = smooth_linears(
            gm, sites, observers, alpha,
            lambda w: fake_quantize_weight(w, recipe.weights), input_fake_quantizer(recipe), placeholder_values,
        )
    return quantize_linears(gm, sites, recipe, input_amax)
