"""qcompile: a quantization compiler for PyTorch 2.

The ahead-of-time pipeline, top to bottom: `quantize` = `prepare` -> calibration batches -> `convert`, below.

1. resolve the recipe (`qcompile.recipes`): how weights and input activations are quantized (each format is an
   entry of `qcompile.formats`), and which algorithm calibrates them (`qcompile.algorithms`: what it needs, its
   options);
2. `prepare`: capture the model with torch.export (`qcompile.capture`: a copy of its module tree, with Hugging Face
   caches off and fused MoE experts as per-expert linears, `qcompile.moe`), find the quantizable linears in the
   graph (`qcompile.passes.find_linears`) and insert the observers the algorithm needs
   (`qcompile.passes.insert_observers`);
3. calibration: the batches run through the prepared model (`qcompile.calibration`);
4. `convert`: run the recipe's algorithm (SmoothQuant and AWQ fold their scales into the graph:
   `qcompile.passes.smoothquant`, `qcompile.passes.awq`; GPTQ reruns the calibration batches group of layers by
   group of layers: `qcompile.passes.gptq`) and rewrite each linear into a `qcompile::` op holding packed quantized
   weights (`qcompile.passes.quantize_linears`);
   the ops are defined in `qcompile.ops` and implemented in `qcompile.lowering`;
5. with a KV-cache format, find each attention's keys and values in the graph (`qcompile.passes.find_attention`),
   calibrate their static scales on the quantized graph and route them through the format
   (`qcompile.passes.quantize_kv`);
6. wrap the graph in a `QuantizedModel` (`qcompile.model`): call it, `.report()`, `.save()`, `qcompile.load()`,
   `.generate()` (on the model's own module tree with quantized layers: `qcompile.quantized_modules`), and write
   checkpoints that serving engines load (`qcompile.export_hf`, `qcompile.checkpoints`).

The just-in-time path, `torch.compile(model, backend="quant")`, runs the same passes on dynamo's graphs
(`qcompile.backend`); static recipes calibrate inside `with qcompile.calibrate(compiled): ...`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable

from torch import fx, nn

from qcompile import algorithms, formats, numerics, ops  # noqa: F401  (ops defines the qcompile:: operators)
from qcompile.calibration import calibrate, describe_call, first_batch, run_calibration
from qcompile.capture import capture, module_tree
from qcompile.checkpoints import export_hf
from qcompile.conversion import convert_linears, observe
from qcompile.model import QuantizedModel, load
from qcompile.prepared import PreparedModel
from qcompile.streaming import quantize_checkpoint
from qcompile.lowering.onnx import export_onnx
from qcompile.passes.find_attention import find_attention
from qcompile.passes.find_linears import find_linears
from qcompile.passes.insert_observers import remove_observers
from qcompile.passes.quantize_kv import insert_kv_observers, quantize_kv, remove_kv_observers
from qcompile.recipes import RECIPES, QuantSpec, Recipe, resolve_recipe
from qcompile.tensorrt import build_engine

__all__ = [
    "RECIPES",
    "PreparedModel",
    "QuantSpec",
    "QuantizedModel",
    "Recipe",
    "algorithms",
    "build_engine",
    "calibrate",
    "convert",
    "export_hf",
    "export_onnx",
    "load",
    "formats",
    "numerics",
    "prepare",
    "quantize",
    "quantize_checkpoint",
]
__version__ = "0.1.0"


def quantize(
    model: nn.Module,
    recipe: str | Recipe = "fp8_dynamic",
    calib: Iterable | Callable | None = None,
    *,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    exclude: Iterable[str] | None = None,
    kv_cache: str | None = None,
    progress: bool = True,
) -> QuantizedModel | nn.Module:
    """Quantize `model` ahead of time and return a `QuantizedModel` called exactly like it.

    `calib` is an iterable of model inputs (tensors, tuples of positional inputs, or dicts of keyword inputs) or a
    `forward_loop(model)` callable; it is needed by recipes with static activation scales. The example inputs
    used for capture default to the first calibration batch. A model with no quantizable linear comes back
    unchanged, with a warning. `kv_cache` ("fp8" or "nvfp4", default the recipe's) quantizes the keys and values
    of every attention with static scales calibrated on `calib`.
    """
    recipe = resolve_recipe(recipe, exclude=exclude, kv_cache=kv_cache)
    args, kwargs, calib = _example_call(example_inputs, example_kwargs, calib)
    prepared = prepare(model, recipe, example_inputs=args, example_kwargs=kwargs)
    if prepared is model:  # nothing to quantize (prepare warned)
        return model
    needs = algorithms.needs(recipe)
    if calib is None and (needs.calibration or recipe.kv_cache is not None):
        if recipe.static_inputs:
            why = f"recipe {recipe.name!r} has static activation scales, calibrated on data"
        elif needs.calibration:
            why = f"recipe {recipe.name!r} runs {algorithms.runs(recipe).name.upper()}, which needs calibration data"
        else:
            why = f"kv_cache={recipe.kv_cache!r} calibrates static key and value scales"
        raise ValueError(f"{why}: pass calib=[batch, ...]")
    if recipe.kv_cache is not None and isinstance(calib, Iterable) and iter(calib) is calib:
        calib = list(calib)  # read once for the layers and once more for the keys and values
    if needs.calibration and not needs.sequential:  # a sequential algorithm runs the batches itself, in convert
        run_calibration(prepared, calib, progress=progress, expected=prepared.expected_call)
    return convert(prepared, calib=calib, progress=progress)


def prepare(
    model: nn.Module,
    recipe: str | Recipe = "fp8_dynamic",
    *,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    exclude: Iterable[str] | None = None,
    kv_cache: str | None = None,
    capture_with: Callable[[nn.Module, tuple, dict], fx.GraphModule] = capture,
) -> PreparedModel | nn.Module:
    """Capture `model` and observe the inputs of the linears `recipe` targets: call the result on calibration
    batches, then `convert` it. A model with no targeted linear comes back unchanged, with a warning.

    `capture_with(tree, args, kwargs)` turns the model's module tree (`qcompile.module_tree`) into its graph:
    torch.export by default (`qcompile.capture`); streaming gives each decoder layer the graph of the first one."""
    recipe = resolve_recipe(recipe, exclude=exclude, kv_cache=kv_cache)
    args, kwargs, _ = _example_call(example_inputs, example_kwargs, None)
    tree = module_tree(model)
    graph = capture_with(tree, args, kwargs)
    sites = [site for site in find_linears(graph) if not recipe.excludes(site.name)]
    if not sites:
        warnings.warn(
            f"{type(model).__name__} has no linear layer that recipe {recipe.name!r} targets "
            f"(exclude={list(recipe.exclude)}); returning the model unchanged",
            stacklevel=3,
        )
        return model
    for site in sites:  # a bad weight is named as such, before calibration runs it through the model
        numerics.check_finite(site.weight, f"weight of layer {site.name!r}")
    observers = observe(graph, sites, recipe)
    float_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return PreparedModel(graph, tree, [site.name for site in sites], recipe, (args, kwargs), observers, float_bytes)


def convert(prepared: PreparedModel, *, calib: Iterable | Callable | None = None, recipe: str | Recipe | None = None,
            progress: bool = True) -> QuantizedModel:
    """Run the recipe's algorithm on what the prepared model observed and rewrite its linears into quantized ops.

    `calib`: the calibration batches (or a forward loop), for algorithms that rerun them layer group by layer
    group (GPTQ; without it they use the statistics observed while calibrating) and for a KV cache (default: the
    batches the prepared model ran). `recipe`: convert with another recipe than the one prepared, whose algorithm
    needs no statistics beyond those observed (one calibration, several recipes: copy the prepared model first)."""
    if not isinstance(prepared, PreparedModel):
        raise TypeError(f"qcompile.convert expects what qcompile.prepare returned, not {type(prepared).__name__}")
    if prepared.converted:
        raise RuntimeError("this PreparedModel was already converted")
    recipe = prepared.recipe if recipe is None else resolve_recipe(recipe)
    graph = prepared.graph_module
    layers = [name for name in prepared.layers if not recipe.excludes(name)]
    needs, observed = algorithms.needs(recipe), algorithms.needs(prepared.recipe)
    if (needs.calibration and not observed.calibration) or needs.sampled_rows > observed.sampled_rows or \
            (needs.gram and not observed.gram):
        raise ValueError(f"recipe {recipe.name!r} needs statistics ({needs}) that the model prepared for recipe "
                         f"{prepared.recipe.name!r} did not observe ({observed}): prepare it for {recipe.name!r}")
    observers = {name: prepared.observers[name] for name in layers} if prepared.observers else None
    calibration_forward = None
    if needs.sequential and calib is not None:
        # the algorithm measures each layer behind the layers already quantized (its one pass also gives the static
        # input ranges): the observers' statistics are not used
        observers = None
        calibration_forward = functools.partial(run_calibration, calib=calib, desc=f"{recipe.algorithm} inputs",
                                                progress=progress, expected=prepared.expected_call)
    elif needs.calibration and prepared.batches_seen == 0:
        if calib is None:
            raise ValueError(f"recipe {recipe.name!r} needs calibration data: call the prepared model on calibration "
                             "batches before qcompile.convert (or pass calib=[batch, ...])")
        run_calibration(prepared, calib, progress=progress, expected=prepared.expected_call)
    remove_observers(graph)
    prepared.converted = True
    sites = [site for site in find_linears(graph) if site.name in set(layers)]
    layers = convert_linears(graph, sites, recipe, observers, calibration_forward=calibration_forward,
                             progress=progress, single_use_observers=True)
    kv_layers = []
    if recipe.kv_cache is not None:
        if calib is None and not prepared.kept_batches:
            raise ValueError(f"kv_cache={recipe.kv_cache!r} calibrates static key and value scales: call the prepared "
                             "model on calibration batches first (or pass calib=[batch, ...])")
        kept = prepared.kept_batches
        kv_calib = calib if calib is not None else lambda model: [model(*args, **kwargs) for args, kwargs in kept]
        kv_layers = _quantize_kv_cache(graph, recipe.kv_cache, kv_calib, prepared.expected_call, progress)
    prepared.kept_batches = []
    return QuantizedModel(graph, recipe, layers, prepared.example,
                          algorithms.describe(recipe, sequential=calibration_forward is not None), prepared.float_bytes,
                          prepared.tree, kv_layers=kv_layers)


def _quantize_kv_cache(graph, fmt: str, calib, expected: str, progress: bool) -> list:
    """Calibrate the keys and values of every attention on the quantized graph (after the algorithms folded their
    scales, some into value projections) and route them through the KV-cache format."""
    attentions = find_attention(graph)
    if not attentions:
        raise ValueError(f"kv_cache={fmt!r}: the model has no attention (scaled_dot_product_attention or "
                         "softmax(q @ k^T) @ v) whose keys and values could be quantized")
    observers = insert_kv_observers(graph, attentions)
    run_calibration(graph, calib, desc="kv-cache scales", progress=progress, expected=expected)
    remove_kv_observers(graph)
    missing = [f"{name} ({which}s)" for (name, which), o in observers.items() if o.amax is None]
    if missing:
        raise ValueError(f"kv_cache={fmt!r}: the calibration batches never ran attention {missing[0]}")
    return quantize_kv(graph, attentions, fmt, {key: o.amax for key, o in observers.items()})


def _example_call(example_inputs, example_kwargs, calib):
    """The inputs to capture with: the given example, or the first calibration batch."""
    from qcompile.calibration import as_call

    if example_inputs is not None or example_kwargs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (
            () if example_inputs is None else (example_inputs,))
        return args, dict(example_kwargs or {}), calib
    if calib is None or callable(calib) and not isinstance(calib, Iterable):
        raise ValueError("pass example_inputs=(...) or example_kwargs={...} (or calibration batches) to capture the model")
    head, calib = first_batch(calib)
    if head is None:
        raise ValueError("the calibration set is empty and no example_inputs were given")
    args, kwargs = as_call(head)
    return args, kwargs, calib
