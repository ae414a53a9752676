"""Recipes: what each targeted linear layer becomes.

A `Recipe` names how weights and input activations are quantized and which calibration algorithm runs.
Presets live in `RECIPES`; variants are derived with `dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass

from qcompile import algorithms, formats

GRANULARITIES = ("tensor", "channel", "token", "group", "block")
KV_CACHE_FORMATS = ("fp8", "nvfp4")

# Module names never quantized unless the user says otherwise: the output head and embeddings are small in
# compute and large in accuracy cost, and MoE routers (`mlp.gate`, `router`, Qwen's `shared_expert_gate`) decide
# which experts run, where a small error changes the computation itself.
DEFAULT_EXCLUDE = ("*lm_head*", "*embed*", "*wte*", "*wpe*", "*.gate", "*router*", "*shared_expert_gate")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (weights or input activations) is quantized."""

    format: str
    granularity: str = "tensor"
    block_size: int | tuple[int, int] | None = None
    dynamic: bool = False
    symmetric: bool = True

    def __post_init__(self):
        fmt = formats.get(self.format)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.granularity!r}; valid granularities: {', '.join(GRANULARITIES)}"
            )
        if self.granularity in ("group", "block") and self.block_size is None:
            raise ValueError(f"granularity {self.granularity!r} needs a block_size")
        if not self.symmetric and not fmt.asymmetric:
            offered = "/".join(f.name for f in formats.FORMATS.values() if f.asymmetric)
            raise ValueError(f"asymmetric quantization is only offered for {offered}, not {self.format!r}")
        if fmt.fixed_block is not None and self.block_size not in (None, fmt.fixed_block):
            raise ValueError(f"{self.format} uses blocks of {fmt.fixed_block} elements")

    @property
    def bits(self) -> int:
        """Bits of information per element, before scales (INT3: 3, though stored in 4)."""
        return formats.FORMATS[self.format].element_bits


@dataclass(frozen=True)
class Recipe:
    """Weights and input-activation specs for every targeted linear, plus the calibration algorithm."""

    weights: QuantSpec
    inputs: QuantSpec | None = None
    algorithm: str = "max"
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    kv_cache: str | None = None
    name: str = "custom"
    # The algorithm's options over its defaults (`qcompile.algorithms`: SmoothQuant's alpha, a number in [0, 1] or
    # "search", and its grid; AWQ's grids; GPTQ's block size, damping, scale ratios, act_order). A dict, kept as
    # sorted (name, value) pairs so that recipes stay hashable.
    options: tuple = ()
    # Where a SmoothQuant/AWQ scale has no earlier op to fold into (the output projection of attention with grouped
    # heads, a down projection after a non-linear gate): divide the input explicitly (True), or leave that layer
    # unscaled (False), which checkpoint formats without a per-layer input scale (compressed-tensors) need.
    explicit_input_scales: bool = True

    def __post_init__(self):
        algorithm = algorithms.get(self.algorithm)
        if self.kv_cache is not None and self.kv_cache not in KV_CACHE_FORMATS:
            raise ValueError(f"unknown kv_cache {self.kv_cache!r}; valid values: None, {', '.join(KV_CACHE_FORMATS)}")
        object.__setattr__(self, "options", _frozen_options(self.options))
        algorithm.check(algorithms.options(self))
        if self.weights.dynamic:
            raise ValueError("weights are quantized once, ahead of time: QuantSpec.dynamic must be False for weights")
        self._check_granularity(self.weights, "weights", formats.get(self.weights.format).weight_granularities)
        if self.inputs is not None:
            fmt = formats.get(self.inputs.format)
            if not fmt.quantizes_inputs:
                raise ValueError(f"{self.inputs.format} activations are not supported (weights only)")
            self._check_granularity(self.inputs, "inputs", fmt.input_granularities)
        if isinstance(self.exclude, (list, str)):
            object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude))

    @staticmethod
    def _check_granularity(spec: QuantSpec, role: str, offered: tuple[str, ...]) -> None:
        # NVFP4's 16-element blocks are its format, whatever granularity the spec names
        if spec.granularity not in offered and formats.FORMATS[spec.format].fixed_block is None:
            raise ValueError(f"{spec.format} {role} are quantized per {' or '.join(offered)}, "
                             f"not per {spec.granularity!r}")

    @property
    def static_inputs(self) -> bool:
        return self.inputs is not None and not self.inputs.dynamic

    def excludes(self, layer_name: str) -> bool:
        return any(fnmatch.fnmatchcase(layer_name, pattern) for pattern in self.exclude)


def _frozen_options(options) -> tuple:
    """A dict (or pairs) of options as sorted (name, value) pairs, lists as tuples."""
    items = options.items() if isinstance(options, dict) else options
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in items))


def _int4_groups(fmt: str = "int4") -> QuantSpec:
    return QuantSpec(fmt, "group", block_size=128)


_FP8_TENSOR = QuantSpec("fp8_e4m3", "tensor")
_NVFP4 = QuantSpec("nvfp4", "block", block_size=16)

RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(_FP8_TENSOR, _FP8_TENSOR, "max", name="fp8"),
        Recipe(QuantSpec("fp8_e4m3", "channel"), QuantSpec("fp8_e4m3", "token", dynamic=True), "max", name="fp8_dynamic"),
        Recipe(QuantSpec("fp8_e4m3", "block", block_size=(128, 128)), None, "max", name="fp8_block"),
        Recipe(QuantSpec("int8", "channel"), QuantSpec("int8", "tensor"), "smoothquant", name="int8_sq",
               options={"alpha": "search"}),
        Recipe(QuantSpec("int8", "channel"), QuantSpec("int8", "token", dynamic=True), "max", name="int8_dynamic"),
        Recipe(_int4_groups(), None, "awq", name="int4_awq"),
        Recipe(_int4_groups(), _FP8_TENSOR, "awq", name="w4a8_awq"),
        Recipe(_NVFP4, QuantSpec("nvfp4", "block", block_size=16, dynamic=False), "max", name="nvfp4"),
        Recipe(_NVFP4, None, "max", name="nvfp4_weight_only"),
        Recipe(_int4_groups(), None, "gptq", name="int4_gptq"),
    )
}


def resolve_recipe(recipe: str | Recipe, **overrides) -> Recipe:
    """A preset name or a Recipe, with optional field overrides (e.g. exclude=...)."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
        recipe = RECIPES[recipe]
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a preset name or a qcompile.Recipe, not {type(recipe).__name__}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if "exclude" in overrides:
        overrides["exclude"] = tuple(overrides["exclude"])
    return dataclasses.replace(recipe, **overrides) if overrides else recipe
