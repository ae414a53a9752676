"""The calibration algorithms: each declares what it needs and its options, and runs on the observed statistics.

`ALGORITHMS` maps a recipe's `algorithm` name to its entry. An entry says

- what it needs (`Needs`): observed calibration batches, rows of each layer's input kept for output-error
  searches, the Gram matrix x^T x of each layer's input, or the calibration batches themselves to rerun layer
  group by layer group (sequential);
- its options, with defaults (`Recipe.options` overrides them: SmoothQuant's alpha and grid, AWQ's grids, GPTQ's
  block size, damping, scale search and column order);
- how it describes itself (the report's "algorithm" line) and how it runs (`run`), moving the weights of
  `LinearSite`s and folding scales into the graph; the rewrite into quantized ops comes after, the same for all.

Adding an algorithm: a subclass registered with `@register`, its pass in `qcompile.passes`, its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, fx

# Rows of calibration input each observer keeps for the algorithms that search scales on output error.
SEARCH_ROWS = 512


@dataclass(frozen=True)
class Needs:
    calibration: bool = False  # observed calibration batches (at least each layer's input range)
    sampled_rows: int = 0  # rows of each layer's input kept for output-error searches
    gram: bool = False  # x^T x of each layer's input, summed over every calibration row
    sequential: bool = False  # the calibration batches, to rerun them behind the layers already quantized


@dataclass
class Job:
    """What an algorithm runs on. `input_amax`: each layer's observed input range (algorithms that move
    activation scales return new ones). `calibration_forward(model)`, when given, calls `model(...)` once per
    calibration batch (sequential algorithms); without it they use the observers' statistics."""

    gm: fx.GraphModule
    sites: list  # LinearSite
    recipe: Any  # Recipe
    options: dict
    observers: Mapping[str, Any]  # ActivationObserver by layer name
    input_amax: dict[str, Tensor]
    placeholder_values: Mapping[str, Tensor] | None = None
    calibration_forward: Callable[[Callable], object] | None = None
    progress: bool = False
    # the observers serve this conversion only (qcompile.convert): an algorithm may free their rows and x^T x as
    # soon as it has read them; the compile backend keeps them for the graphs it converts later
    single_use_observers: bool = False


@dataclass
class Outcome:
    # each layer's input range after the algorithm (scales folded in); None: no calibration row reached it
    input_amax: dict[str, Tensor | None]
    references: dict[str, Tensor] = field(default_factory=dict)  # weights before the algorithm moved them (SQNR)
    weight_sqnr_db: dict[str, float] = field(default_factory=dict)  # or the SQNR against them, measured already


class Algorithm:
    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def applies(self, recipe) -> str | None:
        """Why the algorithm cannot run for this recipe's formats (None: it can); it then falls back to max."""
        return None

    def check(self, options: dict) -> None:
        """Raise ValueError for option values the algorithm cannot run with."""

    def needs(self, recipe) -> Needs:
        return Needs()

    def describe(self, recipe, sequential: bool = True) -> str:
        return self.name

    def run(self, job: Job) -> Outcome:
        return Outcome(job.input_amax)


ALGORITHMS: dict[str, Algorithm] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls()
    return cls


def get(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; valid algorithms: {', '.join(ALGORITHMS)}") from None


def options(recipe) -> dict[str, Any]:
    """The recipe's algorithm options: its defaults, overridden by `recipe.options`. Options of other algorithms
    are left aside (a recipe derived with another algorithm keeps them); a name no algorithm has is an error."""
    algorithm = get(recipe.algorithm)
    given = dict(recipe.options)
    known = {name for entry in ALGORITHMS.values() for name in entry.defaults}
    unknown = sorted(set(given) - known)
    if unknown:
        valid = ", ".join(f"{entry.name}: {', '.join(entry.defaults)}" for entry in ALGORITHMS.values() if entry.defaults)
        raise ValueError(f"no algorithm has an option {unknown[0]!r} (options by algorithm: {valid})")
    return {**algorithm.defaults, **{name: value for name, value in given.items() if name in algorithm.defaults}}


def runs(recipe) -> Algorithm:
    """The algorithm that runs for this recipe: its own, or max where it does not apply to the recipe's formats."""
    algorithm = get(recipe.algorithm)
    return ALGORITHMS["max"] if algorithm.applies(recipe) is not None else algorithm


def needs(recipe) -> Needs:
    """What quantizing with this recipe needs: its algorithm's needs, and calibration for static input scales."""
    needed = runs(recipe).needs(recipe)
    if recipe.static_inputs and not needed.calibration:
        needed = Needs(True, needed.sampled_rows, needed.gram, needed.sequential)
    return needed


def describe(recipe, sequential: bool = True) -> str:
    """What runs for this recipe, in words. `sequential`: whether the calibration batches may be rerun
    (`qcompile.quantize`); the torch.compile backend cannot, and sequential algorithms use their one-shot form."""
    algorithm = get(recipe.algorithm)
    reason = algorithm.applies(recipe)
    if reason is not None:
        return f"max ({recipe.algorithm} {reason})"
    return algorithm.describe(recipe, sequential)


# ----------------------------------------------------------------------------------------------- the entries


def _weight_quantizer(recipe):
    from qcompile.formats import weights_through_fp8
    from qcompile.passes.quantize_linears import fake_quantize_weight

    through_fp8 = weights_through_fp8(recipe.weights, recipe.inputs)
    return lambda w: fake_quantize_weight(w, recipe.weights, through_fp8)


def input_fake_quantizer(recipe):
    """x, amax -> x as the recipe's input quantization would see it (identity for weight-only recipes)."""
    from qcompile import numerics
    from qcompile.passes.quantize_linears import fake_quantize_input_nvfp4, static_input_scale

    spec = recipe.inputs

    def fake_quantize(x: Tensor, amax: Tensor) -> Tensor:
        if spec is None:
            return x
        scale = None if spec.dynamic else static_input_scale(spec.format, amax)
        if spec.format == "nvfp4" and scale is not None:  # the same values, without packing nibbles
            return fake_quantize_input_nvfp4(x, scale)
        return numerics.fake_quantize(x, spec.format, spec.granularity, scale=scale).float()

    return fake_quantize


@register
class Max(Algorithm):
    """Scales from the largest magnitudes: of each weight slice, and of each layer's calibrated input."""

    name = "max"


@register
class SmoothQuant(Algorithm):
    """Moves activation outliers into the weights per input channel, s = amax_x^alpha / amax_w^(1 - alpha)
    (`qcompile.passes.smoothquant`)."""

    name = "smoothquant"
    defaults = {"alpha": 0.5, "alpha_grid": tuple(i / 10 for i in range(0, 11))}

    def check(self, options: dict) -> None:
        alpha = options["alpha"]
        if alpha != "search" and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1] or 'search', not {alpha!r}")

    def needs(self, recipe) -> Needs:
        return Needs(calibration=True, sampled_rows=SEARCH_ROWS if options(recipe)["alpha"] == "search" else 0)

    def describe(self, recipe, sequential: bool = True) -> str:
        return f"smoothquant (alpha {options(recipe)['alpha']})"

    def run(self, job: Job) -> Outcome:
        from qcompile.passes.smoothquant import smooth_linears

        alpha = job.options["alpha"]
        amax = smooth_linears(job.gm, job.sites, job.observers, None if alpha == "search" else float(alpha),
                              _weight_quantizer(job.recipe), input_fake_quantizer(job.recipe), job.placeholder_values,
                              fold_only=not job.recipe.explicit_input_scales, alpha_grid=tuple(job.options["alpha_grid"]))
        return Outcome(amax)


@register
class AWQ(Algorithm):
    """Activation-aware scale search per shared-input group, then a clipping search per layer, both on output
    error (`qcompile.passes.awq`)."""

    name = "awq"
    defaults = {"alpha_grid": tuple(i / 20 for i in range(0, 21)),
                "clip_ratios": tuple(1.0 - i / 20 for i in range(0, 10))}

    def needs(self, recipe) -> Needs:
        return Needs(calibration=True, sampled_rows=SEARCH_ROWS, gram=True)

    def describe(self, recipe, sequential: bool = True) -> str:
        from qcompile.passes import awq

        return "awq (scale search + clip search)" if awq.clips(recipe.weights) else "awq (scale search)"

    def run(self, job: Job) -> Outcome:
        from qcompile.passes import awq

        recipe = job.recipe
        from qcompile.formats import weights_through_fp8

        amax, sqnr = awq.awq_linears(
            job.gm, job.sites, job.observers, _weight_quantizer(recipe),
            None if recipe.inputs is None else input_fake_quantizer(recipe), recipe.weights, job.placeholder_values,
            alpha_grid=tuple(job.options["alpha_grid"]), clip_ratios=tuple(job.options["clip_ratios"]),
            progress=job.progress, fold_only=not recipe.explicit_input_scales, free_observed=job.single_use_observers,
            independent_rows=not weights_through_fp8(recipe.weights, recipe.inputs))
        return Outcome(amax, weight_sqnr_db=sqnr)


@register
class GPTQ(Algorithm):
    """Column-by-column rounding with error feedback through the inverse Hessian (`qcompile.passes.gptq`);
    sequential where the calibration batches can be rerun, from one-shot Hessians otherwise."""

    name = "gptq"
    defaults = {"block_size": 128, "damping": 0.01, "scale_ratios": tuple(1.0 - i / 20 for i in range(10)),
                "act_order": False}

    def applies(self, recipe) -> str | None:
        from qcompile.passes import gptq

        return gptq.unsupported(recipe.weights)

    def needs(self, recipe) -> Needs:
        return Needs(calibration=True, gram=True, sequential=True)

    def describe(self, recipe, sequential: bool = True) -> str:
        settings = options(recipe)
        how = "sequential calibration" if sequential else "one-shot Hessians"
        search = ", group scale search" if tuple(settings["scale_ratios"]) != (1.0,) else ""
        order = ", activation order" if settings["act_order"] else ""
        return f"gptq ({how}, blocks of {settings['block_size']}, damping {settings['damping']}{search}{order})"

    def run(self, job: Job) -> Outcome:
        from qcompile.passes import gptq

        settings = {"block_size": int(job.options["block_size"]), "damping": float(job.options["damping"]),
                    "scale_ratios": tuple(job.options["scale_ratios"]), "act_order": bool(job.options["act_order"])}
        references = {site.name: site.weight for site in job.sites}
        amax = dict(job.input_amax)
        if job.calibration_forward is not None:
            measured = gptq.gptq_sequential(job.gm, job.sites, job.recipe.weights, job.calibration_forward,
                                            progress=job.progress, **settings)
            return Outcome({**amax, **measured}, references)
        missing = [site.name for site in job.sites
                   if job.observers.get(site.name) is None or not job.observers[site.name].records_xtx]
        if missing:
            raise ValueError(f"GPTQ needs calibration data: no Hessian was recorded for layer {missing[0]!r} "
                             "(pass calib=... to qcompile.quantize, or calibrate inside qcompile.calibrate())")
        gptq.gptq_from_hessians(job.sites, {name: obs.hessian for name, obs in job.observers.items()},
                                job.recipe.weights, progress=job.progress, **settings)
        return Outcome(amax, references)


__all__ = ["ALGORITHMS", "Algorithm", "Job", "Needs", "Outcome", "SEARCH_ROWS", "describe", "get", "needs",
           "options", "register", "runs"]
