"""`QuantizedModel`: the result of `qcompile.quantize`, with its report and its safetensors + JSON checkpoint."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import fx, nn
from torch.utils import _pytree as pytree

from qcompile.atomic import swap_into_place
from qcompile.capture import export_program
from qcompile.passes.quantize_linears import LayerReport
from qcompile.passes.quantize_kv import KVReport
from qcompile.quantized_modules import build_quantized_tree, freeze_parameters
from qcompile.recipes import QuantSpec, Recipe

FORMAT_VERSION = 1
_PROGRAM_FILE = "program.json"
_META_FILE = "qcompile.json"
_WEIGHTS_FILE = "model.safetensors"
_EXAMPLE_FILE = "example_inputs.safetensors"


class QuantizedModel(nn.Module):
    """A quantized graph, called exactly like the model it came from."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        recipe: Recipe,
        layers: list[LayerReport],
        example: tuple[tuple, dict],
        algorithm: str,
        float_bytes: int | None = None,
        tree: nn.Module | None = None,
        *,
        kv_layers: list[KVReport] = (),
    ):
        super().__init__()
        # marked here, not where it is defined: the mark imports dynamo, which `import qcompile` does not need
        torch.compiler.assume_constant_result(_inductor_freezes)
        self.graph_module = graph_module
        self.recipe = recipe
        self.layers = list(layers)
        self.kv_layers = list(kv_layers)
        self.algorithm = algorithm
        self.float_bytes = float_bytes
        self._example = example
        # Inference only (the qcompile:: ops have no autograd formulas): leftover float parameters (biases, norms)
        # must not require grad, or torch.compile(qm) traces a backward and fails.
        freeze_parameters(graph_module)
        # The model's own module tree with the quantized layers installed (`qcompile.quantized_modules`), for
        # calls the graph was not captured for (a KV cache, attention masks) and `generate`. Held outside the
        # module tree of `self` (not in the state dict; its tensors are the graph's).
        self._tree_missing = "a loaded checkpoint does not (it holds the captured graph only)"
        if tree is not None:
            try:
                tree = build_quantized_tree(tree, graph_module)
            except NotImplementedError as error:
                # the graph computes something the module tree cannot (a KV cache quantized outside an attention
                # module): calls go to the graph only
                tree, self._tree_missing = None, f"this model's does not: {error}"
        object.__setattr__(self, "_tree", tree)
        self._build_graph_variants()

    def _build_graph_variants(self) -> None:
        """The CPU forms of the graph that calls pick from (`qcompile.lowering.cpu.graph_variants`)."""
        from qcompile.lowering.cpu.graph_variants import cpu_graphs

        variants = cpu_graphs(self.graph_module, self._graph_copy)
        eager = variants.eager
        if eager is None:
            eager = cuda_eager_graph(self.graph_module, self._graph_copy)
        object.__setattr__(self, "_fused_graph_module", variants.fused)
        object.__setattr__(self, "_inference_graph_module", eager)
        object.__setattr__(self, "_frozen_graph_module", variants.frozen)

    def _graph_copy(self, source: fx.GraphModule | None = None) -> fx.GraphModule:
        """A copy of the graph of `source` (default `graph_module`) over `graph_module`'s tensors, for a variant
        kept off the module tree (not a submodule: not in the state dict, not counted twice)."""
        source = self.graph_module if source is None else source
        graph = fx.Graph()
        graph._codegen = source.graph._codegen  # the calling convention (pytree specs), shared
        graph.output(graph.graph_copy(source.graph, {}))
        return fx.GraphModule(self.graph_module, graph)

    def _apply(self, fn, *args, **kwargs):
        """.to() / .cuda() / .half() replace the tensors. Quantized weights and their scales keep their dtype
        (a bf16 scale would change the numerics); a new float dtype for the rest is traced anew from the module
        tree, since a graph's dtype casts were fixed when it was captured."""
        new_dtype = fn(torch.zeros((), dtype=torch.float32)).dtype
        if new_dtype != torch.float32 and self._tree is None and _float_dtype(self.graph_module) != new_dtype:
            raise ValueError(
                f"this model was captured in {_float_dtype(self.graph_module)} and cannot be converted to {new_dtype} "
                "(a loaded checkpoint has no module tree to trace again): quantize the model in the dtype you need"
            )
        protected = {id(t) for t in _quantization_tensors(self.graph_module)}

        def keep_quantized(t):
            out = fn(t)
            # the device move alone: a round trip through the new dtype would round float32 scales
            return t.to(device=out.device) if id(t) in protected and out.dtype != t.dtype else out

        previous_dtype = _float_dtype(self.graph_module)
        slots = self._tree_slots()
        result = super()._apply(keep_quantized, *args, **kwargs)
        if self._tree is not None:
            self._tree._apply(keep_quantized)
            graph_tensors = {**dict(self.graph_module.named_buffers(remove_duplicate=False)),
                             **dict(self.graph_module.named_parameters(remove_duplicate=False))}
            for table, key, name in slots:  # the tree shares the graph's converted tensors again
                value = graph_tensors[name]
                if isinstance(table[key], nn.Parameter) and not isinstance(value, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=False)
                table[key] = value
            if _float_dtype(self.graph_module) != previous_dtype:
                self._retrace()
        self._build_graph_variants()
        return result

    def _tree_slots(self) -> dict:
        """[(tensor table of a tree module, key, graph tensor name)] for the tree's tensors that are the graph's."""
        if self._tree is None:
            return []
        names = {}
        for name, t in [*self.graph_module.named_buffers(remove_duplicate=False),
                        *self.graph_module.named_parameters(remove_duplicate=False)]:
            names.setdefault(id(t), name)
        return [(getattr(m, kind), key, names[id(t)])
                for m in self._tree.modules() for kind in ("_parameters", "_buffers")
                for key, t in getattr(m, kind).items() if t is not None and id(t) in names]

    def _retrace(self) -> None:
        """Capture the graph again from the module tree (after a change of float dtype)."""
        from qcompile.capture import capture

        dtype = _float_dtype(self._tree)
        args, kwargs = pytree.tree_map(
            lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, self._example)
        self._example = (args, kwargs)
        self.graph_module = capture(self._tree, args, kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._build_graph_variants()  # assign=True replaces the tensors
        return result

    def generate(self, *args, compile: bool = False, **kwargs):
        """Hugging Face generation (`GenerationMixin.generate`) with the quantized layers and a KV cache.

        `compile=True` compiles the model's forward with `torch.compile` (inductor) on first use, for this and
        later calls: decode steps then run fused kernels around the quantized layers (measured 1.6x faster than
        the eager step on SmolLM2-135M, CPU), at the cost of a compile per new input shape."""
        if self._tree is None or not hasattr(self._tree, "generate"):
            raise TypeError(self._no_tree_reason("generate"))
        if compile:
            self.compile_module()
        return self._tree.generate(*args, **kwargs)

    def compile_module(self, **options) -> nn.Module:
        """Compile the module tree's forward with `torch.compile(**options)` (once); returns the tree."""
        tree = self.as_module()
        if not getattr(tree, "_qcompile_compiled", False):
            tree.forward = torch.compile(tree.forward, **options)
            tree._qcompile_compiled = True
        return tree

    @property
    def config(self):
        """The Hugging Face config of the model it came from (None for other models and loaded checkpoints)."""
        return getattr(self._tree, "config", None)

    def as_module(self) -> nn.Module:
        """The model's own module tree with every quantized linear as a `QuantizedLinear` (the graph's tensors)."""
        if self._tree is None:
            raise TypeError(self._no_tree_reason("as_module"))
        return self._tree

    def _no_tree_reason(self, what: str) -> str:
        return (f"{what}() needs the model's module tree with the quantized layers installed, which a QuantizedModel "
                f"returned by qcompile.quantize usually holds; {self._tree_missing}")

    def _matches_capture(self, args: tuple, kwargs: dict) -> bool:
        example_args, example_kwargs = self._example
        return len(args) == len(example_args) and set(kwargs) == set(example_kwargs)

    def forward(self, *args, **kwargs):
        if not self._matches_capture(args, kwargs):
            # other keywords than the captured call (attention_mask, past_key_values, ...): the model's own code
            if self._tree is not None:
                return self._tree(*args, **kwargs)
            example_args, example_kwargs = self._example
            raise TypeError(
                f"this model was captured for calls with {len(example_args)} positional inputs and keywords "
                f"{sorted(example_kwargs)}, got {len(args)} and {sorted(kwargs)} (a loaded checkpoint runs its "
                "captured call only)"
            )
        graph_module = self.graph_module
        if torch.compiler.is_compiling():
            if self._frozen_graph_module is not None and _inductor_freezes():
                graph_module = self._frozen_graph_module
            elif self._fused_graph_module is not None and not torch.is_grad_enabled():
                graph_module = self._fused_graph_module
        elif self._inference_graph_module is not None and not torch.is_grad_enabled():
            graph_module = self._inference_graph_module
        try:
            return graph_module(*args, **kwargs)
        except AssertionError as error:
            if "Guard failed" not in str(error):
                raise
            if self._tree is not None and not torch.compiler.is_compiling():
                # a size the model's code branches on (batch 1 after a batch-2 capture, a single token): the same
                # quantized layers through the model's own code, with the cache off as in the captured call
                from qcompile.capture import caches_off

                with caches_off(self._tree):
                    return self._tree(*args, **kwargs)
            raise ValueError(
                f"these inputs fall outside the shapes the model was captured for ({error}); the model's own code "
                "branches on this size, so quantize again with example inputs of this shape"
            ) from error

    @property
    def model_bytes(self) -> int:
        tensors = {id(t): t for t in [*self.graph_module.parameters(), *self.graph_module.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def report(self) -> str:
        """A per-layer table (format, shape, bits/weight, weight SQNR) with totals."""
        header = f"recipe {self.recipe.name}: weights {self.layers[0].weight_format if self.layers else '-'}, "
        header += f"inputs {self.layers[0].input_format if self.layers else '-'}, algorithm {self.algorithm}"
        rows = [("layer", "weights", "inputs", "shape", "bits/w", "SQNR dB")]
        for layer in self.layers:
            sqnr = "inf" if math.isinf(layer.weight_sqnr_db) else f"{layer.weight_sqnr_db:.1f}"
            rows.append((layer.name, layer.weight_format, layer.input_format,
                         f"{layer.out_features}x{layer.in_features}", f"{layer.bits_per_weight:.2f}", sqnr))
        elements = sum(layer.out_features * layer.in_features for layer in self.layers)
        weight_bytes = sum(layer.weight_bytes for layer in self.layers)
        finite = [layer.weight_sqnr_db for layer in self.layers if not math.isinf(layer.weight_sqnr_db)]
        mean_sqnr = f"{sum(finite) / len(finite):.1f}" if finite else "inf"
        bits = f"{8 * weight_bytes / elements:.2f}" if elements else "-"
        experts = sum(1 for layer in self.layers if ".experts." in layer.name)
        total = f"total: {len(self.layers)} layers" + (f" ({experts} in MoE experts)" if experts else "")
        rows.append((total, "", "", f"{elements} weights", bits, mean_sqnr))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        lines = [header]
        for i, row in enumerate(rows):
            lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * width for width in widths))
        size = f"model bytes: {self.model_bytes:,}"
        if self.float_bytes:
            size += f" (float: {self.float_bytes:,}, {self.float_bytes / self.model_bytes:.2f}x smaller)"
        lines.append(size)
        lines.extend(self._kv_report())
        notes = [layer for layer in self.layers if layer.calibration]
        if notes:
            lines.append(f"{len(notes)} layers calibrated otherwise: " + "; ".join(
                f"{layer.name}: {layer.calibration}" for layer in notes[:8]) + ("; ..." if len(notes) > 8 else ""))
        return "\n".join(lines)

    def _kv_report(self) -> list[str]:
        if not self.kv_layers:
            return []
        rows = [("attention", "kv cache", "key scale", "value scale", "elements/token")]
        rows += [(kv.name, kv.format, f"{kv.key_scale:.4g}", f"{kv.value_scale:.4g}", str(kv.elements_per_token))
                 for kv in self.kv_layers]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * width for width in widths))
        float_bytes = torch.finfo(_float_dtype(self.graph_module)).bits // 8
        before = sum(kv.bytes_per_token(float_bytes)[0] for kv in self.kv_layers)
        after = sum(kv.bytes_per_token(float_bytes)[1] for kv in self.kv_layers)
        if after:
            lines.append(f"KV cache per token: {before:,.0f} bytes in {str(_float_dtype(self.graph_module))[6:]} -> "
                         f"{after:,.0f} bytes in {self.kv_layers[0].format} ({before / after:.2f}x smaller)")
        return lines

    # -- checkpoint ---------------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write the program (JSON), tensors (safetensors) and metadata to `directory`, atomically."""
        args, kwargs = self._example
        from torch._export.serde.serialize import serialize  # loads dynamo: only when saving

        program = export_program(self.graph_module, args, kwargs)
        artifact = serialize(program)
        tensors = {**program.state_dict, **{k: v for k, v in program.constants.items() if isinstance(v, torch.Tensor)}}
        example_leaves, _ = pytree.tree_flatten((args, kwargs))
        meta = {
            "format_version": FORMAT_VERSION,
            "torch_version": torch.__version__,
            "recipe": _recipe_to_json(self.recipe),
            "algorithm": self.algorithm,
            "float_bytes": self.float_bytes,
            "layers": [layer.to_json() for layer in self.layers],
            "kv_cache": [layer.to_json() for layer in self.kv_layers],
            "example": _example_to_json(args, kwargs),
            # modules whose import registers the container types of the call's inputs and outputs (Hugging Face
            # ModelOutput classes register themselves with pytree when their module is imported)
            "pytree_modules": _pytree_modules(program),
        }
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (staging / _PROGRAM_FILE).write_bytes(artifact.exported_program)
            # safetensors refuses tensors that share memory (tied embeddings/lm_head): store a copy of each repeat.
            stored, storages = {}, set()
            for k, v in tensors.items():
                v = v.detach().contiguous()
                ptr = v.untyped_storage().data_ptr()
                stored[k] = v.clone() if ptr in storages else v
                storages.add(ptr)
            save_file(stored, staging / _WEIGHTS_FILE)
            save_file(
                {f"{i}": leaf.detach().contiguous() for i, leaf in enumerate(example_leaves) if isinstance(leaf, torch.Tensor)},
                staging / _EXAMPLE_FILE,
            )
            (staging / _META_FILE).write_text(json.dumps(meta, indent=2))
            _replace_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | os.PathLike) -> QuantizedModel:
        directory = Path(directory)
        meta_path = directory / _META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory} is not a qcompile checkpoint (no {_META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported checkpoint format version {meta.get('format_version')!r}")
        tensors = load_file(directory / _WEIGHTS_FILE)
        import qcompile.ops  # noqa: F401  (the program's ops must be registered before it is deserialized)

        for module in meta.get("pytree_modules", []):
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise ImportError(f"{directory}: the model's inputs/outputs are types of {module!r}, which cannot be "
                                  f"imported here ({error}); install the package that provides it") from error
        program_json = (directory / _PROGRAM_FILE).read_bytes()
        _check_tensors(directory / _WEIGHTS_FILE, json.loads(program_json), tensors)
        state_dict, constants = _split_state(program_json, tensors)
        examples = load_file(directory / _EXAMPLE_FILE)
        args, kwargs = _example_from_json(meta["example"], examples)
        from torch._export.serde.serialize import SerializedArtifact, deserialize

        artifact = SerializedArtifact(program_json, state_dict, constants, (args, kwargs))
        program = deserialize(artifact)
        return cls(
            program.module(),
            _recipe_from_json(meta["recipe"]),
            [LayerReport.from_json(layer) for layer in meta["layers"]],
            (args, kwargs),
            meta["algorithm"],
            meta.get("float_bytes"),
            kv_layers=[KVReport.from_json(layer) for layer in meta.get("kv_cache", [])],
        )


def cuda_eager_graph(graph_module: fx.GraphModule, copy) -> fx.GraphModule | None:
    """What calls without autograd run on CUDA: a copy (`copy()`, over the same tensors) whose quantized linears
    with CUDA weights call the autograd-free twins `qcompile::cuda_*` (`triton.use_kernel_call_ops`), which skip
    the public ops' Python autograd layer; None where no layer's weight is a CUDA tensor (or without Triton)."""
    from qcompile.lowering import triton as triton_lowering

    tensors = [*graph_module.parameters(), *graph_module.buffers()]
    if not any(triton_lowering.on_cuda(t) for t in tensors) or not triton_lowering.available():
        return None
    eager = copy()
    return eager if triton_lowering.use_kernel_call_ops(eager) else None


def _inductor_freezes() -> bool:
    """Inductor's own test for freezing a graph, read when dynamo traces (as dynamo reads it to decide whether
    module tensors become graph constants); a constant to dynamo (`QuantizedModel.__init__` marks it)."""
    from torch._inductor import config

    return bool(config.freezing) and not torch.is_grad_enabled()


def _float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's floating-point parameters (the model's compute dtype)."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def _quantization_tensors(gm: fx.GraphModule) -> list[torch.Tensor]:
    """The tensors of the quantized layers' formats (codes, scales, input scales, input multipliers): they keep
    their dtype when the model's is changed."""
    from qcompile.ops import QUANTIZED_LINEAR_OPS, op_arguments

    tensors = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZED_LINEAR_OPS:
            for name, arg in op_arguments(node).items():
                if name not in ("x", "bias") and isinstance(arg, fx.Node) and arg.op == "get_attr":
                    tensors.append(gm.get_buffer(str(arg.target)))
        elif node.op == "call_function" and node.target is torch.ops.qcompile.kv_round_trip.default:
            tensors.append(gm.get_buffer(str(op_arguments(node)["scale"].target)))
        elif node.op == "get_attr" and str(node.target).endswith(("_inverse_scale", "input_multiplier")):
            tensors.append(gm.get_buffer(str(node.target)))
    return tensors


def load(directory: str | os.PathLike) -> QuantizedModel:
    """Load a checkpoint written by `QuantizedModel.save`."""
    return QuantizedModel.load(directory)


def _replace_directory(staging: Path, target: Path) -> None:
    """Move a finished directory into place; an existing checkpoint is swapped out only once the new one is whole."""
    if target.exists() and not (target / _META_FILE).is_file() and any(target.iterdir()):
        raise FileExistsError(f"{target} exists and is not a qcompile checkpoint; refusing to overwrite it")
    swap_into_place(staging, target)


def _pytree_modules(program: torch.export.ExportedProgram) -> list[str]:
    """The modules defining the non-builtin container types of the program's call signature."""
    modules = set()

    def walk(spec):
        if spec is None or spec.is_leaf():
            return
        module = getattr(spec.type, "__module__", "builtins")
        if module not in ("builtins", "collections") and not module.startswith("torch."):
            modules.add(module)
        for child in spec.children():
            walk(child)

    walk(program.call_spec.in_spec)
    walk(program.call_spec.out_spec)
    return sorted(modules)


def _check_tensors(path: Path, program: dict, tensors: dict) -> None:
    """Every tensor the program reads must be in the file with the shape and dtype the program was built with:
    an edited or corrupted checkpoint is an error, never a silent change of outputs."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    graph = program["graph_module"]
    values = graph["graph"]["tensor_values"]
    read = set()
    for spec in graph["signature"]["input_specs"]:
        body = next(iter(spec.values()))
        name = body.get("parameter_name") or body.get("buffer_name") or body.get("tensor_constant_name")
        arg = body.get("arg", {}).get("name")
        if name is None or arg not in values:
            continue
        read.add(name)
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing (the program reads it)")
        meta, tensor = values[arg], tensors[name]
        dtype = _SERIALIZE_TO_TORCH_DTYPE[meta["dtype"]]
        shape = [size.get("as_int") for size in meta["sizes"]]
        if tensor.dtype != dtype or list(tensor.shape) != shape:
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, the program expects "
                             f"{dtype} {shape} (the checkpoint was edited or corrupted)")
    extra = sorted(set(tensors) - read)
    if extra:
        raise ValueError(f"{path}: tensors {extra[:5]} are not read by the program (the checkpoint was edited)")


def _split_state(program_json: bytes, tensors: dict) -> tuple[dict, dict]:
    """Separate parameters/buffers from lifted constants, as the program's signature names them."""
    signature = json.loads(program_json)["graph_module"]["signature"]["input_specs"]
    parameter_names, constant_names = set(), set()
    for spec in signature:
        if "parameter" in spec:
            parameter_names.add(spec["parameter"]["parameter_name"])
        for kind in ("tensor_constant", "constant_tensor"):
            if kind in spec:
                constant_names.add(spec[kind]["tensor_constant_name"])
        if "buffer" in spec and not spec["buffer"].get("persistent", True):
            # non-persistent buffers (e.g. rotary inv_freq) live in the program's constants, not its state dict
            constant_names.add(spec["buffer"]["buffer_name"])
    state = {
        k: nn.Parameter(v, requires_grad=False) if k in parameter_names else v
        for k, v in tensors.items()
        if k not in constant_names
    }
    constants = {k: v for k, v in tensors.items() if k in constant_names}
    return state, constants


def _recipe_to_json(recipe: Recipe) -> dict:
    def spec(s: QuantSpec | None):
        if s is None:
            return None
        data = {f: getattr(s, f) for f in ("format", "granularity", "block_size", "dynamic", "symmetric")}
        if isinstance(data["block_size"], tuple):
            data["block_size"] = list(data["block_size"])
        return data

    return {"name": recipe.name, "weights": spec(recipe.weights), "inputs": spec(recipe.inputs),
            "algorithm": recipe.algorithm, "exclude": list(recipe.exclude), "kv_cache": recipe.kv_cache,
            "options": dict(recipe.options), "explicit_input_scales": recipe.explicit_input_scales}


def _recipe_from_json(data: dict) -> Recipe:
    def spec(d):
        if d is None:
            return None
        d = dict(d)
        if isinstance(d["block_size"], list):
            d["block_size"] = tuple(d["block_size"])
        return QuantSpec(**d)

    options = data.get("options", {})
    if "alpha" in data and data["algorithm"] == "smoothquant":  # written before algorithms had options
        options = {"alpha": data["alpha"]}
    return Recipe(spec(data["weights"]), spec(data["inputs"]), data["algorithm"], tuple(data["exclude"]),
                  data["kv_cache"], data["name"], options, data.get("explicit_input_scales", True))


def _example_to_json(args: tuple, kwargs: dict):
    """The example call's structure; tensors become references into example_inputs.safetensors."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    encoded = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            encoded.append({"tensor": str(i)})
        elif leaf is None or isinstance(leaf, (bool, int, float, str)):
            encoded.append({"value": leaf})
        else:
            raise TypeError(f"cannot store example input of type {type(leaf).__name__}")
    return {"leaves": encoded, "spec": pytree.treespec_dumps(spec)}


def _example_from_json(data: dict, tensors: dict):
    leaves = [tensors[leaf["tensor"]] if "tensor" in leaf else leaf["value"] for leaf in data["leaves"]]
    return pytree.tree_unflatten(leaves, pytree.treespec_loads(data["spec"]))
