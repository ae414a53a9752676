"""From calibrated statistics to quantized ops: the calibration algorithm, then the linear rewrite.

Shared by both entry points (`qcompile.quantize` and the `torch.compile` backend).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, fx

from qcompile import algorithms, formats
from qcompile.passes.find_linears import LinearSite
from qcompile.passes.insert_observers import ActivationObserver, insert_observers
from qcompile.passes.quantize_linears import LayerReport, sqnr_db, fake_quantize_weight, quantize_linears
from qcompile.recipes import Recipe

def observe(gm: fx.GraphModule, sites: list[LinearSite], recipe: Recipe) -> dict[str, ActivationObserver]:
    """The observers the recipe's algorithm needs (`algorithms.needs`), on the inputs of `sites`; none for a recipe
    that needs no data. Shared by `qcompile.prepare` and the torch.compile backend."""
    needs = algorithms.needs(recipe)
    if not needs.calibration:
        return {}
    return insert_observers(gm, sites, keep_rows=needs.sampled_rows, hessian=needs.gram)


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


def convert_linears(
    gm: fx.GraphModule,
    sites: list[LinearSite],
    recipe: Recipe,
    observers: Mapping[str, ActivationObserver] | None,
    placeholder_values: Mapping[str, Tensor] | None = None,
    calibration_forward: Callable[[Callable], object] | None = None,
    *,
    progress: bool = False,
    single_use_observers: bool = False,
) -> list[LayerReport]:
    """Run the recipe's algorithm (`qcompile.algorithms`) on the observed statistics, then rewrite every site into
    a qcompile:: op.

    `calibration_forward(model)`, when given, calls `model(...)` once per calibration batch; sequential algorithms
    (GPTQ) use it to measure each layer behind the layers already quantized. Without it they read one-shot
    statistics from the observers (inserted as `algorithms.needs(recipe)` says).
    """
    observers = observers or {}
    # a layer that saw only empty inputs (an expert no token was routed to) has no measured range
    fallbacks = uncalibrated_experts({name: obs.amax if obs.rows_seen else None for name, obs in observers.items()})
    observers = {name: obs for name, obs in observers.items() if name not in fallbacks}
    all_sites, sites = sites, [site for site in sites if site.name not in fallbacks]
    job = algorithms.Job(gm, sites, recipe, algorithms.options(recipe), observers,
                         {name: observer.amax for name, observer in observers.items()}, placeholder_values,
                         calibration_forward, progress, single_use_observers)
    outcome = algorithms.runs(recipe).run(job)
    input_amax, references = dict(outcome.input_amax), outcome.references
    unseen = uncalibrated_experts(input_amax)  # reached by no row in the algorithm's own pass (sequential GPTQ)
    input_amax.update(unseen)
    fallbacks.update(unseen)
    input_amax.update(fallbacks)
    reports = quantize_linears(gm, all_sites, recipe, input_amax)
    for report, site in zip(reports, all_sites):
        if site.name in fallbacks:
            report.calibration = "no tokens routed here: max weights, input range of its sibling experts"
        if site.name in outcome.weight_sqnr_db:
            report.weight_sqnr_db = outcome.weight_sqnr_db[site.name]
        elif site.name in references:
            dequantized = fake_quantize_weight(site.weight.detach(), recipe.weights,
                                               formats.weights_through_fp8(recipe.weights, recipe.inputs))
            report.weight_sqnr_db = sqnr_db(references[site.name].detach(), dequantized)
    return reports
