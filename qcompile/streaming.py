"""Quantize a Hugging Face checkpoint one decoder layer at a time, never holding the whole model.

`quantize_checkpoint(model_dir, out_dir, recipe, calib)` builds the model on the meta device, loads the embeddings
from the safetensors files (memory-mapped), runs the calibration batches up to the first decoder layer and keeps
what that layer receives. Then, layer by layer: load its tensors, quantize it with `qcompile.quantize` on the inputs
kept for it, compute the inputs of the next layer, write its quantized tensors to the output shards and free it.
The final norm and `lm_head` come last. Peak memory is about one layer, its statistics and the calibration
activations.

The next layer's inputs are what the whole-model pipeline gives that layer: the float layer's outputs for algorithms
that calibrate on the float model (max, SmoothQuant, AWQ), the quantized layer's outputs for sequential ones (GPTQ).
So a streamed checkpoint holds the tensors `export_hf(quantize(whole model))` writes (tested bit for bit with max
calibration). docs/streaming.md has the design, the limits and the measurements.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, fx, nn

from qcompile import algorithms, distributed
from qcompile.atomic import swap_into_place
from qcompile.calibration import as_call
from qcompile.capture import GraphTemplate, capture
from qcompile.moe import unfuse_experts
from qcompile.checkpoints.shards import INDEX_FILE as _INDEX_FILE
from qcompile.recipes import Recipe, resolve_recipe



class StreamingError(ValueError):
    """The model directory or the model cannot be streamed (not a Hugging Face checkpoint, a shard or tensor is
    missing, an architecture without the layout streaming needs)."""


class _StopAtLayer(Exception):
    """Raised by the hook on the first decoder layer once it has recorded its inputs."""


# ------------------------------------------------------------------------------------------- the checkpoint


class CheckpointReader:
    """The tensors of a Hugging Face safetensors checkpoint (one file or an index of shards) of `model` (on the meta
    device).

    Files are opened (memory-mapped) for one part of the model at a time and closed after: pages of a mapping that
    stays open count as the process's resident memory once read, which would grow to the whole checkpoint."""

    def __init__(self, model_dir: Path, model: nn.Module):
        from safetensors import safe_open

        from qcompile.checkpoints.names import load_plan

        self.model_dir, self.model = model_dir, model
        index = model_dir / _INDEX_FILE
        single = model_dir / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as error:
                raise StreamingError(f"{index}: not a safetensors index ({error})") from error
        elif single.is_file():
            with safe_open(str(single), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), single.name)
        else:
            raise StreamingError(f"{model_dir} has no model.safetensors or {_INDEX_FILE} (streaming reads "
                                 "safetensors checkpoints)")
        for name in sorted(set(weight_map.values())):
            if not (model_dir / name).is_file():
                raise StreamingError(f"shard {model_dir / name} named in {_INDEX_FILE} is missing")
        self.weight_map: dict[str, str] = weight_map
        # the model's tensor names → the checkpoint tensors each is made of
        self.plan = load_plan(model, weight_map)

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        """The tensors named `keys`, as copies that outlive the files' mappings."""
        from safetensors import safe_open

        missing = [key for key in keys if key not in self.weight_map]
        if missing:
            raise StreamingError(f"tensor {missing[0]!r} is in no file of {self.model_dir}")
        out = {}
        for file_name in sorted({self.weight_map[key] for key in keys}):
            with safe_open(str(self.model_dir / file_name), framework="pt") as f:
                for key in keys:
                    if self.weight_map[key] == file_name:
                        out[key] = f.get_tensor(key).clone()
        return out


def _load(module: nn.Module, prefix: str, reader: CheckpointReader, dtype: torch.dtype,
          aliases: dict[str, str] | None = None) -> None:
    """Give `module` (on the meta device, at path `prefix` of the model) its tensors from the checkpoint, floats in
    `dtype`. Tensors the checkpoint stores otherwise (per-expert weights of fused experts, renamed modules) are
    converted as transformers converts them (`qcompile.checkpoints.names`)."""
    expected = module.state_dict(keep_vars=True)
    names = {key: f"{prefix}{key}" for key in expected}
    if aliases:
        names = {key: name if name in reader.plan else aliases.get(name, name) for key, name in names.items()}
    missing = [name for name in names.values() if name not in reader.plan]
    if missing:
        raise StreamingError(f"tensor {missing[0]!r} is in no file of {reader.model_dir}")
    sources = {name: reader.plan[name] for name in names.values()}
    values = reader.read([key for source in sources.values() for key in source.keys])
    state = {}
    for key, meta in expected.items():
        source = sources[names[key]]
        try:
            value = source.combine(names[key], values, reader.model)
        except Exception as error:  # the converter's own error (a missing expert: tensors that do not stack)
            raise StreamingError(f"tensor {names[key]!r} could not be built from the checkpoint's {len(source.keys)} "
                                 f"tensors {source.keys[0]!r}...: {error}") from error
        if tuple(value.shape) != tuple(meta.shape):
            raise StreamingError(f"tensor {names[key]!r} has shape {list(value.shape)}, the model expects "
                                 f"{list(meta.shape)}")
        state[key] = value.to(dtype) if value.is_floating_point() else value
    del values
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise StreamingError(f"{prefix or 'the model'}: tensors not in the checkpoint and not computed: {left[:5]}")


def _free(module: nn.Module, *, freeze: bool = False) -> None:
    """Drop `module`'s tensors and return the memory; with `freeze`, what survives is frozen out of later collections
    too (`_freeze_survivors`: it lives for the run, like the modules torch.export imports on first use)."""
    module.to_empty(device="meta")
    _return_memory(freeze)


def _return_memory(freeze: bool = False) -> None:
    """Hand freed heap memory back to the system. glibc raises its mmap threshold as large blocks are freed, so a
    layer's tensors come from the heap after the first, and the heap keeps what they leave (measured: resident
    memory grew by two float layers per layer without this)."""
    import ctypes

    gc.collect()
    if freeze:
        gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _freeze_survivors() -> bool:
    """Leave every object alive now (the libraries, the model's skeleton) out of the collections `_free` runs for each
    layer (`gc.freeze`), which otherwise walk them all: 0.25 s a layer at 0.5B, 0.05 s more for what the first
    layer's capture imports (frozen by `_free(..., freeze=True)`). They are still freed once no longer referenced;
    only reference cycles among them wait for `gc.unfreeze`. Returns whether it froze: not where the caller froze
    objects itself (unfreezing would release theirs too)."""
    if gc.get_freeze_count():
        return False
    gc.collect()  # garbage is not frozen
    gc.freeze()
    return True


# ------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass
class _Layout:
    """Where a Llama-like causal LM keeps its parts."""

    model: nn.Module
    body: nn.Module  # model.model
    layers: nn.ModuleList

    @classmethod
    def of(cls, model: nn.Module) -> _Layout:
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        missing = [part for part, ok in (("model.layers", isinstance(layers, nn.ModuleList)),
                                         ("model.embed_tokens", hasattr(body, "embed_tokens")),
                                         ("model.norm", hasattr(body, "norm")),
                                         ("model.rotary_emb", hasattr(body, "rotary_emb")),
                                         ("lm_head", hasattr(model, "lm_head"))) if not ok]
        if missing:
            raise StreamingError(f"{type(model).__name__}: streaming needs a decoder laid out like Llama's; this model "
                                 f"has no {', '.join(missing)} (quantize it in memory with qcompile.quantize)")
        return cls(model, body, layers)


class _Block(nn.Module):
    """One decoder layer at its own path (`model.layers.<i>`), called with plain tensors: names in reports, recipes'
    exclude patterns and the written tensors are the whole model's."""

    def __init__(self, index: int, layer: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(index): layer})
        self._key = str(index)

    @property
    def path(self) -> str:
        return f"model.layers.{self._key}"

    @property
    def layer(self) -> nn.Module:
        return self.model.layers[self._key]

    def forward(self, hidden_states, cos, sin, position_ids, attention_mask=None):
        return self.layer(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                          position_embeddings=(cos, sin), use_cache=False)


class _LayerGraphs:
    """Captures `_Block`s for `qcompile.prepare` (its `capture_with`): torch.export runs once per layer structure,
    and every later layer of that structure gets the graph of the first, reading its own tensors at its own path
    (`GraphTemplate`): the layers run the same code on other weights, and capturing each anew cost about half a
    second a layer."""

    def __init__(self):
        self._templates: dict[tuple, GraphTemplate] = {}

    def __call__(self, block: _Block, args: tuple, kwargs: dict) -> fx.GraphModule:
        key = _structure(block.layer, args, kwargs)
        template = self._templates.get(key)
        if template is not None:
            return template.instantiate(block, block.path)
        graph = capture(block, args, kwargs)
        self._templates[key] = GraphTemplate.of(graph, block.path)
        return graph


def _structure(layer: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What a layer's captured graph depends on besides its tensors' values: the classes and settings of its modules
    (all but `layer_idx`, which only indexes KV caches), the names, shapes and dtypes of its tensors, and the kinds
    of its inputs (their sizes are dynamic in the graph)."""
    def setting(value):
        if isinstance(value, (bool, int, float, str, type(None))):
            return value
        if isinstance(value, (tuple, list)):
            return tuple(setting(v) for v in value)
        if isinstance(value, Tensor):  # a plain tensor attribute: the graph holds it as a constant, this layer's own
            return id(value)
        # an object (the config, a function): by its description, as each layer's module tree has its own copy
        return type(value), repr(value)

    modules = tuple((name, type(m), tuple(sorted((k, setting(v)) for k, v in vars(m).items()
                                                 if not k.startswith("_") and k not in ("training", "layer_idx"))))
                    for name, m in layer.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in [*layer.named_parameters(), *layer.named_buffers()])
    inputs = tuple(None if v is None else (v.dim(), v.dtype) if isinstance(v, Tensor) else setting(v)
                   for v in [*args, *kwargs.values()])
    return modules, tensors, tuple(kwargs), inputs


class _Head(nn.Module):
    """The final norm and lm_head at their own paths."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden_states):
        return self.lm_head(self.model.norm(hidden_states))


def _layer_inputs(layout: _Layout, calib: Iterable) -> list[tuple]:
    """What the first decoder layer receives for each calibration batch, as `_Block` call arguments."""
    kept: list[tuple] = []

    def record(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        position_ids = kwargs.get("position_ids")
        # one row per sequence: the captured layer's dimensions are all dynamic, and a size-1 batch dimension that
        # broadcasts against the hidden states' would not be (the values are the same rows)
        rows = hidden.shape[0]
        cos, sin = (t.expand(rows, *t.shape[1:]).contiguous() for t in (cos, sin))
        if position_ids is not None:
            position_ids = position_ids.expand(rows, *position_ids.shape[1:]).contiguous()
        kept.append((hidden, cos, sin, position_ids, kwargs.get("attention_mask")))
        raise _StopAtLayer

    handle = layout.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(calib):
                args, kwargs = as_call(batch)
                try:
                    layout.model(*args, **kwargs, use_cache=False)
                except _StopAtLayer:
                    continue
                raise StreamingError(f"calibration batch {i} did not reach the first decoder layer")
    finally:
        handle.remove()
    if not kept:
        raise StreamingError("the calibration set is empty")
    return kept


# ------------------------------------------------------------------------------------------- writing


def _rss_gb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------- the entry point


def quantize_checkpoint(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    recipe: str | Recipe,
    calib: Iterable,
    *,
    format: str = "compressed-tensors",
    dtype: torch.dtype | None = None,
    tokenizer=None,
    exclude: Iterable[str] | None = None,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    progress: bool = True,
) -> Path:
    """Quantize the Hugging Face causal LM in `model_dir` with `recipe` and write it to `out_dir` in `format`
    ("compressed-tensors" or "modelopt", or "qcompile": the program `qcompile.load` runs), one decoder layer of the
    float model in memory at a time (with "qcompile", the quantized model is held until it is saved).

    `calib`: calibration batches as the model takes them (dicts of `input_ids`, optionally `attention_mask`).
    `dtype`: the dtype the layers compute and the unquantized tensors are written in (default: the checkpoint's,
    `config.json`'s `dtype`). `max_shard_bytes`: 5 GB by default, as `export_hf`; a layer's tensors go to disk as soon
    as it is quantized and shards are assembled from them, so the shard size does not raise the peak. The output directory is
    built in a temporary sibling and renamed into place; an existing non-empty `out_dir` is refused unless
    `overwrite`. Under torchrun the calibration is split across the processes (`qcompile.distributed`) and rank 0
    writes. Returns `out_dir`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    import qcompile
    from qcompile.checkpoints import (FORMATS, MAX_SHARD_BYTES, CheckpointNames, ExportError, ShardWriter,
                                      ignored_linears, kv_cache_tensors, write_metadata)

    model_dir, target = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise StreamingError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    if format not in (*FORMATS, "qcompile"):
        raise ValueError(f"unknown format {format!r}; streaming writes {', '.join(FORMATS)} and qcompile")
    writer = FORMATS.get(format)  # None: the qcompile format (the whole quantized program, `_Assembly`)
    recipe = resolve_recipe(recipe, exclude=exclude)
    if writer is not None:
        writer.check_recipe(recipe)
    if format == "compressed-tensors":  # the format has no per-layer input multiplier (as the CLI's in-memory path)
        recipe = dataclasses.replace(recipe, explicit_input_scales=False)
    if target.exists() and (target.is_file() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    rank, size = distributed.init_from_environment()
    if size > 1 and recipe.kv_cache is not None:
        raise StreamingError("KV-cache scales are not combined across processes yet: quantize with kv_cache in one "
                             "process")
    calib = distributed.share(list(calib), rank, size) if size > 1 else list(calib)
    # across processes, GPTQ runs its one-shot form on the combined x^T x (a sequential rerun would see one
    # process's batches only), so every algorithm calibrates each layer on the float model's activations
    sequential = algorithms.needs(recipe).sequential and size == 1
    calibrates = algorithms.needs(recipe).calibration
    writes = rank == 0

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if writer is not None:
        writer.check_dtype(recipe, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    float_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    layout = _Layout.of(model)
    reader = CheckpointReader(model_dir, model)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    say = (lambda message: print(message, flush=True)) if progress and writes else (lambda message: None)

    # the parts in front of the layers: embeddings on the CPU, rotary tables computed
    _load(layout.body.embed_tokens, "model.embed_tokens.", reader, dtype)
    layout.body.rotary_emb = type(layout.body.rotary_emb)(config=config)
    inputs = _layer_inputs(layout, calib)
    assembly = _Assembly(layout, as_call(calib[0])) if writer is None else None
    del calib

    staging = None
    if writes:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    frozen = _freeze_survivors()
    try:
        shards = _CheckpointNamed(ShardWriter(staging, MAX_SHARD_BYTES if max_shard_bytes is None else max_shard_bytes,
                                              spill=True), CheckpointNames(layout.model))
        quantized: set[str] = set()
        if assembly is None:
            shards.add(_prefixed("model.embed_tokens.",
                                 _layer_tensors(layout.body.embed_tokens, writer, quantized, dtype)))
            _free(layout.body.embed_tokens)  # written; a tied lm_head reads its copy from the checkpoint again
        descriptions = set()
        started = time.perf_counter()
        # Keys and values are calibrated, as in the whole model, on the model with quantized weights: behind the
        # quantized layers. Where the weights calibrate on the float model, that is a second stream of inputs.
        kv_inputs = inputs if recipe.kv_cache is not None else None
        layer_graphs = _LayerGraphs()
        for i, layer in enumerate(layout.layers):
            _load(layer, f"model.layers.{i}.", reader, dtype)
            unfuse_experts(layer)  # the float outputs computed as the captured layer computes them
            block = _Block(i, layer).eval()
            kv_outputs: list = []
            # the float outputs come from the calibration pass, as in the whole model's (None where none ran)
            qm, outputs = _quantize(block, recipe, inputs, size, kv_inputs, kv_outputs, layer_graphs)
            tree = block
            if isinstance(qm, qcompile.QuantizedModel):
                descriptions.add(qm.algorithm)
                tree = qm.as_module()
            if sequential and kv_inputs is not None:  # the quantized outputs, before keys and values are
                outputs = kv_outputs  # quantized: what convert's one pass over the whole model gives
            elif sequential:  # the next layer calibrates on this one's quantized outputs, as in convert
                with torch.no_grad():
                    outputs = [qm(*call) for call in inputs]
            elif outputs is None and calibrates:  # no linear of this layer calibrated: the next layers' will
                with torch.no_grad():
                    outputs = [block(*call) for call in inputs]
            if kv_inputs is not None:
                kv_inputs = [(out, *call[1:]) for out, call in zip(kv_outputs, kv_inputs)]
            if outputs is not None:  # else nothing reads the float inputs' values: they are capture examples, and
                inputs = [(out, *call[1:]) for out, call in zip(outputs, inputs)]  # this layer's have their shapes
            if assembly is not None:  # the quantized layer takes the float one's place in the model
                assembly.add(qm, [f"model.layers.{i}"])
            else:
                shards.add({**_layer_tensors(tree, writer, quantized, dtype), **kv_cache_tensors(qm, tree, writer)})
            del qm, tree, block, outputs, kv_outputs
            if assembly is None:  # (the quantized layer may share the float one's norms)
                _free(layer, freeze=frozen)
            rss = _rss_gb()
            say(f"layer {i + 1}/{len(layout.layers)} quantized ({time.perf_counter() - started:.0f} s"
                + (f", {rss:.2f} GB resident)" if rss is not None else ")"))

        # the final norm and lm_head (quantized only if the recipe does not exclude it, as in the whole model)
        _load(layout.body.norm, "model.norm.", reader, dtype)
        aliases = {"lm_head.weight": "model.embed_tokens.weight"} if tied else None
        _load(layout.model.lm_head, "lm_head.", reader, dtype, aliases)
        head = _Head(layout.body.norm, layout.model.lm_head).eval()
        qm = _quantize(head, recipe, [(call[0],) for call in inputs], size)[0] if not recipe.excludes("lm_head") else head
        if assembly is not None:
            assembly.add(qm, ["model.norm", "lm_head"])
            del qm, head, inputs, kv_inputs
            if writes:
                shutil.rmtree(staging)  # QuantizedModel.save builds its own
                staging = None
                assembly.save(target, recipe, float_bytes)
            distributed.barrier()
            say(f"wrote {target} ({', '.join(sorted(assembly.algorithms))}; {time.perf_counter() - started:.0f} s)")
            return target
        tree = qm.as_module() if isinstance(qm, qcompile.QuantizedModel) else head
        head_tensors = _layer_tensors(tree, writer, quantized, dtype)
        if tied and "lm_head" not in quantized:
            head_tensors.pop("lm_head.weight", None)  # stored once, as the embeddings
        shards.add(head_tensors)
        del qm, tree, head, inputs, kv_inputs
        if not quantized:
            raise ExportError("the model has no quantized layer to export")
        if not writes:
            distributed.barrier()  # until rank 0 has written the directory
            return target
        shards.finish()

        generation = None
        if (model_dir / "generation_config.json").is_file():
            from transformers import GenerationConfig

            generation = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        write_metadata(staging, config, dtype, writer, recipe, ignored_linears(layout.model, quantized, shards.names),
                       tokenizer, generation)
        swap_into_place(staging, target)
        distributed.barrier()
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if frozen:
            gc.unfreeze()
    say(f"wrote {target} ({', '.join(sorted(descriptions)) or 'no layer quantized'}; "
        f"{time.perf_counter() - started:.0f} s)")
    return target


def _quantize(part: nn.Module, recipe: Recipe, calls: list[tuple], processes: int,
              kv_calls: list[tuple] | None = None, kv_outputs: list | None = None,
              capture_with: Callable = capture) -> tuple[nn.Module, list | None]:
    """`qcompile.quantize(part, recipe, calib=calls)` (capturing with `capture_with`), and the part's float outputs
    for `calls` from its calibration pass (None where none ran: nothing to calibrate, or a sequential algorithm,
    which runs the calls itself in convert). Across processes, the observers are combined between calibration and
    conversion. With `kv_calls`, keys and values are calibrated on those inputs instead, and what the part returns
    for them (quantized weights, keys and values not yet quantized) is appended to `kv_outputs`."""
    import qcompile
    from qcompile.calibration import run_calibration

    prepared = qcompile.prepare(part, recipe, example_inputs=calls[0], capture_with=capture_with)
    if not isinstance(prepared, qcompile.PreparedModel):
        if kv_calls is not None:
            with torch.no_grad():
                kv_outputs.extend(part(*call) for call in kv_calls)
        return prepared, None  # nothing to quantize
    needs = algorithms.needs(recipe)
    sequential = needs.sequential and processes == 1
    float_outputs = None
    if needs.calibration and not sequential:
        rank, size = distributed.world()
        for observer in prepared.observers.values():
            observer.batch_numbering = (rank, size)  # batch j of this process is batch j * size + rank of all
        float_outputs = []

        def calibration(model) -> None:  # a forward loop that keeps the outputs: no second float pass for them
            float_outputs.extend(model(*call) for call in calls)

        run_calibration(prepared, calibration, progress=False)
        distributed.reduce_observers(prepared.observers)

    def key_value_calibration(model) -> None:
        # a forward loop: convert runs it last on the graph whose keys and values it observes (GPTQ runs it
        # before, for its own inputs), so the outputs kept are that run's
        kv_outputs[:] = [model(*call) for call in kv_calls]

    calib = key_value_calibration if kv_calls is not None else calls if sequential else None
    return qcompile.convert(prepared, calib=calib, progress=False), float_outputs


class _CheckpointNamed:
    """Shards whose tensors are written under the checkpoint's names (per-expert projections, modules renamed as
    the model's Hugging Face checkpoints name them): what `export_hf` writes."""

    def __init__(self, shards, names):
        self.shards, self.names = shards, names

    def add(self, tensors: dict[str, Tensor]) -> None:
        names = self.names.of(tensors)
        self.shards.add({names[key]: value for key, value in tensors.items()})

    def finish(self) -> None:
        self.shards.finish()


def _prefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in tensors.items()}


def _layer_tensors(tree: nn.Module, writer, quantized: set[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """A streamed part's tensors as `export_hf` writes them; adds its quantized linears' names to `quantized`."""
    from qcompile.checkpoints import module_tensors

    tensors, here = module_tensors(tree, writer, dtype)
    quantized.update(here)
    return tensors


class _Assembly:
    """`format="qcompile"`: the program of the whole quantized model, which `qcompile.load` runs. Each part's quantized
    module tree (its `QuantizedLinear`s, folded norms, KV-cache quantization) is installed in the model's skeleton as
    it comes and the float part freed; at the end the assembled tree is captured once and saved as
    `qcompile.quantize(model).save()` saves. The quantized model is held until then (a fraction of the float one:
    4-bit weights are an eighth of float32, plus the float embeddings)."""

    def __init__(self, layout: _Layout, example: tuple[tuple, dict]):
        self.layout, self.example = layout, example
        self.layers: list = []  # LayerReport of every quantized linear, in model order
        self.kv_layers: list = []
        self.algorithms: set[str] = set()

    def add(self, qm, paths: list[str]) -> None:
        """Install the quantized modules at `paths` of what `qcompile.quantize` returned for a part (nothing where it
        returned the part unchanged: nothing in it is quantized, and the float modules are the model's already)."""
        import qcompile

        if not isinstance(qm, qcompile.QuantizedModel):
            return
        tree = qm.as_module()
        for path in paths:
            parent, _, name = path.rpartition(".")
            self.layout.model.get_submodule(parent).register_module(name, tree.get_submodule(path))
        self.layers.extend(qm.layers)
        self.kv_layers.extend(qm.kv_layers)
        self.algorithms.add(qm.algorithm)

    def save(self, target: Path, recipe: Recipe, float_bytes: int) -> None:
        import qcompile
        from qcompile.capture import module_tree

        if not self.layers:
            raise StreamingError("the model has no quantized layer")
        args, kwargs = self.example
        tree = module_tree(self.layout.model)  # experts are already per-expert linears
        qm = qcompile.QuantizedModel(capture(tree, args, kwargs), recipe, self.layers, self.example,
                                     ", ".join(sorted(self.algorithms)), float_bytes, kv_layers=self.kv_layers)
        qm.save(target)
