"""qcompile: a quantization compiler for PyTorch 2.

The ahead-of-time pipeline, top to bottom (`quantize` below):

1. resolve the recipe (`qcompile.recipes`): how weights and input activations are quantized;
2. capture the model with torch.export (`qcompile.capture`: a copy of its module tree, with Hugging Face caches
   off and fused MoE experts as per-expert linears, `qcompile.moe`);
3. find the quantizable linears in the graph (`qcompile.passes.find_linears`);
4. if the recipe needs data, insert observers and run the calibration batches (`qcompile.passes.insert_observers`,
   `qcompile.calibration`);
5. run the recipe's calibration algorithm (SmoothQuant and AWQ fold their scales into the graph:
   `qcompile.passes.smoothquant`, `qcompile.passes.awq`; GPTQ reruns the calibration batches group of layers by
   group of layers: `qcompile.passes.gptq`) and rewrite each linear into a `qcompile::` op holding packed quantized
   weights (`qcompile.passes.quantize_linears`);
   the ops are defined in `qcompile.ops` and implemented in `qcompile.lowering`;
6. with a KV-cache format, find each attention's keys and values in the graph (`qcompile.passes.find_attention`),
   calibrate their static scales on the quantized graph and route them through the format
   (`qcompile.passes.quantize_kv`);
7. wrap the graph in a `QuantizedModel` (`qcompile.model`): call it, `.report()`, `.save()`, `qcompile.load()`,
   `.generate()` (on the model's own module tree with quantized layers: `qcompile.quantized_modules`), and write
   checkpoints that serving engines load (`qcompile.export_hf`, `qcompile.checkpoints`).

The just-in-time path, `torch.compile(model, backend="quant")`, runs steps 3-5 on dynamo's graphs
(`qcompile.backend`); static recipes calibrate inside `with qcompile.calibrate(compiled): ...`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable

from torch import nn

from qcompile import numerics, ops  # noqa: F401  (ops registers the qcompile:: operator library)
from qcompile.calibration import calibrate, describe_call, first_batch, run_calibration
from qcompile.capture import capture, module_tree
from qcompile.checkpoints import export_hf
from qcompile.convert import algorithm_that_runs, convert, needs_calibration, rows_to_keep, runs_gptq, wants_hessian
from qcompile.model import QuantizedModel, load
from qcompile.lowering.onnx import export_onnx
from qcompile.passes.find_attention import find_attention
from qcompile.passes.find_linears import find_linears
from qcompile.passes.insert_observers import insert_observers, remove_observers
from qcompile.passes.quantize_kv import insert_kv_observers, quantize_kv, remove_kv_observers
from qcompile.recipes import RECIPES, QuantSpec, Recipe, resolve_recipe

__all__ = [
    "RECIPES",
    "QuantSpec",
    "QuantizedModel",
    "Recipe",
    "calibrate",
    "export_hf",
    "export_onnx",
    "load",
    "numerics",
    "quantize",
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
    if recipe.kv_cache is not None:
        if calib is None:
            raise ValueError(f"kv_cache={recipe.kv_cache!r} calibrates static key and value scales: pass "
                             "calib=[batch, ...]")
        if isinstance(calib, Iterable) and iter(calib) is calib:
            calib = list(calib)  # read once for the layers and once more for the keys and values

    tree = module_tree(model)
    graph = capture(tree, args, kwargs)
    sites = [site for site in find_linears(graph) if not recipe.excludes(site.name)]
    if not sites:
        warnings.warn(
            f"{type(model).__name__} has no linear layer that recipe {recipe.name!r} targets "
            f"(exclude={list(recipe.exclude)}); returning the model unchanged",
            stacklevel=2,
        )
        return model

    for site in sites:  # a bad weight is named as such, before calibration runs it through the model
        numerics.check_finite(site.weight, f"weight of layer {site.name!r}")
    observers = None
    calibration_forward = None
    if runs_gptq(recipe):
        # Sequential GPTQ feeds the batches itself, layer group by layer group (its one pass also gives the
        # static input ranges, measured behind the already-quantized layers).
        if calib is None:
            raise ValueError(f"recipe {recipe.name!r} runs GPTQ, which needs calibration data: pass calib=[batch, ...]")
        calibration_forward = functools.partial(run_calibration, calib=calib, desc="gptq inputs", progress=progress,
                                                expected=describe_call(args, kwargs))
    elif needs_calibration(recipe):
        observers = insert_observers(graph, sites, keep_rows=rows_to_keep(recipe), hessian=wants_hessian(recipe))
        run_calibration(graph, calib, progress=progress, expected=describe_call(args, kwargs))
        remove_observers(graph)

    float_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    layers = convert(graph, sites, recipe, observers, calibration_forward=calibration_forward, progress=progress)
    kv_layers = []
    if recipe.kv_cache is not None:
        kv_layers = _quantize_kv_cache(graph, recipe.kv_cache, calib, describe_call(args, kwargs), progress)
    return QuantizedModel(graph, recipe, layers, (args, kwargs), algorithm_that_runs(recipe), float_bytes, tree,
                          kv_layers=kv_layers)


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
