"""The `torch.compile` backend: `torch.compile(model, backend="quant", options={"recipe": ...})`.

Registered through the `torch_dynamo_backends` entry point, so no import is needed. Dynamo hands each captured
subgraph (one per graph break) to `quant_backend`, with parameters as placeholders whose example inputs are the
`nn.Parameter`s. Weight-only and dynamic recipes are converted at once. Recipes that need data (static activation
scales, SmoothQuant) start observed: inside `qcompile.calibrate(compiled)` the graph runs in float and records
activation statistics, and on exit it is converted. The statistics are kept per weight tensor, so a graph compiled
later for a new input shape is converted at once. Quantized graphs are compiled by inductor; those with INT8 × INT8
layers on the CPU are frozen (a setting of that compile alone), so that their weights are prepacked for oneDNN
(`qcompile.lowering.onednn`); on CPUs that run qcompile's own INT8 kernel instead, a GELU or SiLU after an INT8 layer
joins the layer's kernel call (`qcompile.lowering.activation_fusion`), and INT8 layers that read one tensor share one
call (`qcompile.lowering.shared_input`).

A KV cache (`kv_cache` option) is calibrated on the converted graph: the graph keeps its calibration inputs until
conversion and runs them once more, observing each attention's keys and values (`qcompile.passes.quantize_kv`).

GPTQ here is one-shot: the backend cannot feed the calibration batches again, so each layer's Hessian is summed
from the float model's activations inside the `calibrate()` block (one Hessian per layer held until conversion),
where `qcompile.quantize` calibrates sequentially, each layer group behind the already-quantized ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from qcompile import algorithms, calibration, numerics
from qcompile.lowering import onednn
from qcompile.lowering.activation_fusion import fuse_int8_activations
from qcompile.lowering.shared_input import merge_shared_input_int8_linears
from qcompile.passes.find_attention import find_attention
from qcompile.passes.find_linears import LinearSite, find_linears
from qcompile.passes.insert_observers import remove_observers
from qcompile.conversion import convert_linears, observe
from qcompile.passes.quantize_kv import KVReport, insert_kv_observers, quantize_kv, remove_kv_observers
from qcompile.passes.quantize_linears import LayerReport
from qcompile.recipes import RECIPES, Recipe, resolve_recipe

OPTIONS = {
    "recipe": "a preset name from qcompile.RECIPES, or a qcompile.Recipe (default 'fp8_dynamic')",
    "exclude": "glob patterns of layer names to leave in float (replaces the recipe's list)",
    "compiler": "'inductor' (default) or 'eager': what runs the quantized graph",
    "kv_cache": "'fp8' or 'nvfp4': quantize every attention's keys and values (static scales, calibrated)",
    "mode": "'default' or 'reduce-overhead' (CUDA graphs for graphs on CUDA, ignored elsewhere); the same as "
            "torch.compile's mode=, which torch.compile refuses together with options=",
}
COMPILERS = ("inductor", "eager")
MODES = ("default", "reduce-overhead")



class _CompileState:
    """What the subgraphs of one `torch.compile` call share: calibration observers, keyed by weight tensor.

    torch.compile hands the same `options` dict to every backend call it makes, so the dict identifies the call.
    It lives as long as the compiled model (its options dict): graphs compiled later (new shapes, after
    `torch._dynamo.reset()`) are converted with the statistics calibrated once.
    """

    def __init__(self, options: dict | None):
        self.options = options  # held so that its id stays unique while this state lives
        self.observers: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.kv_amax: dict[tuple[str, str], torch.Tensor] = {}  # (attention, "key" | "value") -> max |x|


_STATES: dict[int, _CompileState] = {}


def _prune_states() -> None:
    """Forget the states of compiled models that are gone: the options dict that torch.compile's wrapper held is
    referenced by nothing but its state (a dict takes no weak reference, hence the count)."""
    for key, state in list(_STATES.items()):
        if state.options is not None and sys.getrefcount(state.options) <= 2:  # the attribute and the argument
            del _STATES[key]


def _state_for(options: dict | None) -> _CompileState:
    _prune_states()
    state = _STATES.get(id(options))
    if state is None or state.options is not options:
        state = _STATES[id(options)] = _CompileState(options)
    return state


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    recipe: Recipe
    compiler: str = "inductor"
    mode: str = "default"

    @classmethod
    def parse(cls, options: dict[str, Any] | None, mode: str | None = None) -> BackendOptions:
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTIONS))
        valid = "; ".join(f"{k}: {v}" for k, v in OPTIONS.items())
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for backend 'quant'; valid options are {valid}")
        recipe = resolve_recipe(options.get("recipe", "fp8_dynamic"), exclude=options.get("exclude"),
                                kv_cache=options.get("kv_cache"))
        compiler = options.get("compiler", "inductor")
        if compiler not in COMPILERS:
            raise ValueError(f"unknown compiler {compiler!r}; valid compilers: {', '.join(COMPILERS)}")
        mode = options.get("mode", mode) or "default"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} for backend 'quant' (valid modes: {', '.join(MODES)}); valid "
                             f"options are {valid}")
        return cls(recipe, compiler, mode)


class QuantizedGraph:
    """One dynamo subgraph: observed until calibrated (when the recipe needs data), then quantized and compiled."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list,
        sites: list[LinearSite],
        parameters: dict[str, torch.Tensor],
        options: BackendOptions,
        state: _CompileState,
    ):
        self.gm = gm
        self.state = state
        self.example_inputs = example_inputs
        self.sites = sites
        self.parameters = parameters
        self.options = options
        self.layers: list[LayerReport] = []
        self.kv_layers: list[KVReport] = []
        self._run = None
        self._observers = None
        # A KV cache is calibrated on the converted graph (SmoothQuant/AWQ fold scales into value projections):
        # the graph's calibration inputs are kept until conversion, then run once more through it.
        self.attentions = find_attention(gm) if options.recipe.kv_cache is not None else []
        self._calibration_inputs: list[tuple] = []
        # Dynamo's tracing context (fake mode, symbolic shapes) for this graph: a static recipe compiles after
        # calibration, outside the backend call, and without it inductor would specialize a dynamic graph to the
        # concrete shapes of example_inputs.
        self._tracing_context = torch._guards.TracingContext.try_get()
        self.needs = algorithms.needs(options.recipe)
        if (self.needs.calibration or self.attentions) and not self._has_statistics():
            # sequential algorithms take their one-shot form here: the batches cannot rerun
            self._observers = observe(gm, sites, options.recipe) or None
        else:
            self._convert()

    def _has_statistics(self) -> bool:
        layers = not self.needs.calibration or all(
            site.source in self.state.observers for site in self.sites)
        return layers and all((site.name, which) in self.state.kv_amax
                              for site in self.attentions for which in ("key", "value"))

    def _convert(self) -> None:
        observers = None
        if self.needs.calibration:
            observers = {site.name: self.state.observers[site.source] for site in self.sites}
        self.layers = convert_linears(self.gm, self.sites, self.options.recipe, observers, self.parameters)
        if self.attentions:
            self._quantize_kv_cache()
        # qcompile's own INT8 kernel: activations into its calls, layers reading one tensor into one call (only where
        # oneDNN's route, below, does not take the layers)
        fuse_int8_activations(self.gm)
        merge_shared_input_int8_linears(self.gm)
        # CUDA layers: the ops' autograd-free twins (the graph runs without autograd, below)
        from qcompile.lowering import triton as triton_lowering

        triton_lowering.use_kernel_call_ops(self.gm)
        cudagraphs = self.options.mode == "reduce-overhead" and _on_cuda(self.gm, self.example_inputs)
        if cudagraphs and self.options.compiler == "eager":
            warnings.warn("backend 'quant' with compiler='eager' runs without CUDA graphs; mode='reduce-overhead' "
                          "needs compiler='inductor'", stacklevel=2)
        if cudagraphs and self.options.compiler == "inductor":
            self._run = torch.no_grad()(_compile_with_cudagraphs(self.gm, self.example_inputs, self.parameters,
                                                                 self._tracing_context))
        elif self.options.compiler == "inductor":
            from torch._inductor.compile_fx import compile_fx

            # A fresh module without dynamo's metadata: the quantized buffers are new attributes dynamo never saw.
            context = self._tracing_context if torch._guards.TracingContext.try_get() is None else None
            with torch.no_grad(), torch._guards.tracing(context) if context is not None else contextlib.nullcontext():
                # INT8 × INT8 layers on the CPU: frozen, for oneDNN's prepacked GEMM (qcompile.lowering.onednn); the
                # float parameters left in the graph freeze with them, as in any frozen inference graph
                frozen = onednn.rewrite_int8_linears(self.gm) > 0
                compiled = compile_fx(
                    fx.GraphModule(self.gm, self.gm.graph), self.example_inputs, config_patches={"freezing": frozen}
                )
        else:
            compiled = self.gm.forward
        if self._run is None:
            self._run = torch.no_grad()(compiled)  # quantized graphs are for inference: no autograd formulas
        # what only conversion needed: the example call (activations of the first batch), the float weights' views
        self.example_inputs, self.sites, self.parameters = [], [], {}

    def _quantize_kv_cache(self) -> None:
        missing = [site for site in self.attentions
                   if any((site.name, which) not in self.state.kv_amax for which in ("key", "value"))]
        if missing:
            observers = insert_kv_observers(self.gm, missing)
            with torch.no_grad():
                for inputs in self._calibration_inputs:
                    self.gm(*inputs)
            remove_kv_observers(self.gm)
            for key, observer in observers.items():
                if observer.amax is None:
                    raise ValueError(f"attention {key[0]!r} saw no calibration data inside qcompile.calibrate()")
                previous = self.state.kv_amax.get(key)
                self.state.kv_amax[key] = observer.amax if previous is None else torch.maximum(previous, observer.amax)
        self._calibration_inputs = []
        self.kv_layers = quantize_kv(self.gm, self.attentions, self.options.recipe.kv_cache, self.state.kv_amax)

    def finish_calibration(self) -> None:
        """Called by `qcompile.calibrate` on exit: keep the statistics, drop the observers, convert."""
        if self._run is not None:
            return
        for site in self.sites if self._observers is not None else ():
            observer = self._observers[site.name]
            if observer.amax is None:
                raise ValueError(f"layer {site.name!r} saw no calibration data inside qcompile.calibrate()")
            previous = self.state.observers.get(site.source)
            self.state.observers[site.source] = observer if previous is None else previous.merge(observer)
        self._drop_observers_and_convert()

    def _drop_observers_and_convert(self) -> None:
        if self._observers is not None:
            remove_observers(self.gm)
        self._observers = None
        self._convert()

    def __call__(self, *args):
        if self._run is not None:
            return self._run(*args)
        session = calibration.active_session()
        if session is None:
            if self._has_statistics():  # calibrated through another graph of the same compiled model
                self._drop_observers_and_convert()
                return self._run(*args)
            recipe = self.options.recipe
            why = "has static activation scales" if recipe.static_inputs else f"runs {recipe.algorithm} on calibration data"
            if not self.needs.calibration:
                why = f"quantizes the KV cache ({recipe.kv_cache}) with static scales"
            raise RuntimeError(
                f"recipe {recipe.name!r} {why} and this model was never calibrated: run calibration batches inside "
                "`with qcompile.calibrate(compiled): ...` first"
            )
        session.observe(self)
        if self.attentions:
            self._calibration_inputs.append(tuple(args))
        with torch.no_grad():
            return self.gm(*args)


def _on_cuda(gm: fx.GraphModule, example_inputs: list) -> bool:
    tensors = [*example_inputs, *gm.buffers(), *gm.parameters()]
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def _compile_with_cudagraphs(gm: fx.GraphModule, example_inputs: list, parameters: dict[str, torch.Tensor],
                             tracing_context):
    """Inductor with CUDA graphs (cudagraph trees, as torch.compile's mode="reduce-overhead").

    The graph's weights must be static inputs of the CUDA graph, or every replay would copy them into the graph's
    memory first. Inductor knows them as static from dynamo's metadata, which a graph holding new attributes (the
    quantized buffers) cannot keep; so the inputs dynamo marks static (the module's parameters and buffers) become
    attributes of the graph too, and the graph is marked as dynamo's, whose attributes are then all static (the
    marking an exported graph gets). The compiled function is called with dynamo's inputs, less those."""
    from torch._inductor.compile_fx import compile_fx

    # a copy: dynamo calls the graph with the inputs of its own graph, which must keep its placeholders
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    fresh = fx.GraphModule(gm, graph)
    keep = []
    for i, node in enumerate([node for node in graph.nodes if node.op == "placeholder"]):
        value = example_inputs[i]
        static = node.name in parameters or (
            isinstance(value, torch.Tensor) and node.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))
        if static and not node.users:  # a float weight the quantized layer replaced
            graph.erase_node(node)
        elif static:
            attr = f"_qcompile_input_{i}"
            if isinstance(value, nn.Parameter):
                fresh.register_parameter(attr, nn.Parameter(value.detach(), requires_grad=False))
            else:
                fresh.register_buffer(attr, value)
            with graph.inserting_before(node):
                getter = graph.get_attr(attr)
            getter.meta.update(node.meta)
            node.replace_all_uses_with(getter)
            graph.erase_node(node)
        else:
            keep.append(i)
    fresh.recompile()
    fresh.meta["dynamo_compile_id"] = gm.meta.get("dynamo_compile_id", "qcompile")
    inputs = [example_inputs[i] for i in keep]
    context = tracing_context if torch._guards.TracingContext.try_get() is None else None
    with torch.no_grad(), torch._guards.tracing(context) if context is not None else contextlib.nullcontext():
        compiled = compile_fx(fresh, inputs, config_patches={"triton.cudagraphs": True})

    def run(*args):
        return compiled(*[args[i] for i in keep])

    return run


def quant_backend(gm: fx.GraphModule, example_inputs: list, options: dict[str, Any] | None = None, **kwargs):
    """Dynamo backend entry point (`backend="quant"`). `mode="reduce-overhead"` (torch.compile's argument, or the
    `mode` option) runs graphs on CUDA through CUDA graphs; elsewhere it is accepted and has no effect."""
    mode = kwargs.get("mode")
    if mode is not None and mode not in MODES:
        warnings.warn(f"backend 'quant' ignores mode={mode!r}", stacklevel=2)
        mode = None
    parsed = BackendOptions.parse(options, mode)
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    parameters = {
        node.name: value for node, value in zip(placeholders, example_inputs) if isinstance(value, nn.Parameter)
    }
    sites = [site for site in find_linears(gm, parameters) if not parsed.recipe.excludes(site.name)]
    if not sites:
        return gm.forward
    for site in sites:  # a bad weight is named as such, before calibration runs it through the model
        numerics.check_finite(site.weight, f"weight of layer {site.name!r}")
    return QuantizedGraph(gm, example_inputs, sites, parameters, parsed, _state_for(options))


__all__ = ["OPTIONS", "RECIPES", "quant_backend"]
