"""TensorRT engines from qcompile's QDQ ONNX: `build_engine("model.onnx", "model.engine")`.

The ONNX file is the one `qcompile.export_onnx(qm, path, target="tensorrt", ...)` writes (explicit quantization:
Q/DQ pairs around FP16/BF16 compute). `build_engine` runs it through TensorRT's own ONNX parser and builder, with a
strongly typed network by default: every tensor keeps the type the file gives it, so the precisions are the ones
the exporter chose and no builder precision flag is involved. See docs/tensorrt.md.

TensorRT is an optional dependency (`pip install qcompile[tensorrt]`); it is imported when `build_engine` runs,
never when qcompile is imported.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["EngineBuildError", "INSTALL_HINT", "PRECISION_CONSTRAINTS", "build_engine"]

INSTALL_HINT = ("install it from NVIDIA's package index: pip install --extra-index-url https://pypi.nvidia.com "
                "tensorrt (or qcompile's extra: pip install --extra-index-url https://pypi.nvidia.com "
                "qcompile[tensorrt]); it needs an NVIDIA GPU and driver")
PRECISION_CONSTRAINTS = ("obey", "prefer")
MIN_TENSORRT_MAJOR = 10

# A reduced-precision type found in a weakly typed network -> the builder flag that lets TensorRT run it.
_PRECISION_FLAGS = {"HALF": "FP16", "BF16": "BF16", "INT8": "INT8", "FP8": "FP8", "INT4": "INT4", "FP4": "FP4"}


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX file or build the engine; `errors` lists what it reported."""

    def __init__(self, message: str, errors: Sequence[str] = ()):
        super().__init__(message)
        self.errors = list(errors)


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    shapes: Mapping[str, Sequence[Sequence[int]]] | None = None,
    workspace_bytes: int | None = None,
    timing_cache: str | os.PathLike | None = None,
    precision_constraints: str | None = None,
    strongly_typed: bool = True,
    verbose: bool = False,
) -> Path:
    """Build a serialized TensorRT engine from `onnx_path` and write it to `engine_path`; return `engine_path`.

    - `shapes`: `{input name: (min, opt, max)}`, each a shape tuple, for the optimization profile. Inputs not named
      keep the shape the ONNX file gives them; an input with a dynamic dimension (the exporter's `batch` and
      `sequence` axes) must be named, or the build stops with an error naming the input and the dimension.
    - `workspace_bytes`: the builder's workspace pool limit (default: TensorRT's own, the device's memory).
    - `timing_cache`: a file of kernel timings: read when it exists, and written back (atomically) after a
      successful build, so that later builds on the same GPU and TensorRT version skip the timing runs. A cache
      TensorRT rejects (another GPU or version) is replaced, with a warning.
    - `strongly_typed` (default): the network takes every type from the file. `strongly_typed=False` builds a
      weakly typed network (deprecated by TensorRT since 10.12): the builder is allowed each reduced precision the
      parsed network uses (FP16, BF16, INT8, FP8, INT4, FP4 flags) and chooses kernels itself.
    - `precision_constraints`: "obey" or "prefer" the layer precisions (weakly typed builds only; a strongly
      typed network has no precisions to constrain) or None.
    - `verbose`: print TensorRT's info and verbose log too (by default its warnings and errors go to stderr).

    The engine is written to a temporary file next to `engine_path` and moved into place with `os.replace`: a
    failed build leaves no file behind and an existing engine untouched.

    Raises FileNotFoundError (no ONNX file), ValueError (bad arguments or shapes), ImportError (TensorRT is not
    installed) and `EngineBuildError` (the parser's errors, one per node, or a failed build with TensorRT's log).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision_constraints is not None and precision_constraints not in PRECISION_CONSTRAINTS:
        raise ValueError(f"precision_constraints must be 'obey', 'prefer' or None, not {precision_constraints!r}")
    if precision_constraints is not None and strongly_typed:
        raise ValueError(f"precision_constraints={precision_constraints!r} applies to weakly typed networks: a "
                         "strongly typed network takes its precisions from the ONNX file (pass strongly_typed=False "
                         "to constrain a weakly typed build)")
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or int(workspace_bytes) != workspace_bytes
                                        or workspace_bytes <= 0):
        raise ValueError(f"workspace_bytes must be a positive number of bytes, not {workspace_bytes!r}")
    requested = _normalize_shapes(shapes)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    if engine_path.exists() and engine_path.resolve() == onnx_path.resolve():
        raise ValueError(f"the engine path {engine_path} is the ONNX file itself")
    cache_path = None if timing_cache is None else Path(timing_cache)

    trt = _import_tensorrt()
    logger = _make_logger(trt, verbose)
    try:
        builder = trt.Builder(logger)
    except (RuntimeError, TypeError) as error:  # no CUDA device, driver too old: the binding gets a null builder
        builder, cause = None, error
    else:
        cause = None
    if builder is None:
        raise EngineBuildError(f"TensorRT could not create a builder (is an NVIDIA GPU visible?): "
                               f"{_last_errors(logger, cause)}", logger.errors)

    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    if not parsed or errors:
        listed = "; ".join(errors) if errors else _last_errors(logger, None)
        raise EngineBuildError(f"TensorRT's ONNX parser rejected {onnx_path} "
                               f"({len(errors)} error{'s' if len(errors) != 1 else ''}): {listed}", errors)

    config = builder.create_builder_config()
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    profile_shapes = _profile_shapes(_network_inputs(network), requested)
    if profile_shapes:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        if config.add_optimization_profile(profile) < 0:
            raise EngineBuildError(f"TensorRT rejected the optimization profile {profile_shapes}: "
                                   f"{_last_errors(logger, None)}", logger.errors)
    if not strongly_typed:
        for flag in _weak_precision_flags(trt, network):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        if precision_constraints is not None:
            config.set_flag(getattr(trt.BuilderFlag, f"{precision_constraints.upper()}_PRECISION_CONSTRAINTS"))
    cache = _load_timing_cache(config, cache_path) if cache_path is not None else None

    serialized = builder.build_serialized_network(network, config)
    if serialized is None or _nbytes(serialized) == 0:
        raise EngineBuildError(f"TensorRT could not build an engine from {onnx_path}: {_last_errors(logger, None)}",
                               logger.errors)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(engine_path, serialized)
    if cache_path is not None:
        updated = config.get_timing_cache() or cache
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(cache_path, updated.serialize())
    return engine_path


# ------------------------------------------------------------------------------------------------ TensorRT


def _import_tensorrt():
    """The `tensorrt` module, or an ImportError that says how to install it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as error:  # OSError: the package is there but its libraries are not
        raise ImportError(f"qcompile.build_engine needs NVIDIA TensorRT {MIN_TENSORRT_MAJOR} or newer, which is not "
                          f"installed ({error}): {INSTALL_HINT}") from error
    if not all(hasattr(trt, name) for name in ("Builder", "OnnxParser", "ILogger")):
        raise ImportError(f"the module 'tensorrt' at {getattr(trt, '__file__', '?')} is not NVIDIA TensorRT's Python "
                          f"package (a placeholder or a broken install): {INSTALL_HINT}")
    version = str(getattr(trt, "__version__", "0"))
    major = version.split(".")[0]
    if major.isdigit() and int(major) < MIN_TENSORRT_MAJOR:
        raise ImportError(f"TensorRT {version} is installed; qcompile.build_engine needs {MIN_TENSORRT_MAJOR} or "
                          f"newer: {INSTALL_HINT}")
    return trt


def _make_logger(trt, verbose: bool):
    """A TensorRT logger that prints warnings and errors (everything when `verbose`) to stderr and keeps the errors,
    so that a failed build can say what went wrong."""
    error_level = int(trt.ILogger.Severity.ERROR)
    print_level = int(trt.ILogger.Severity.VERBOSE if verbose else trt.ILogger.Severity.WARNING)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            level = int(severity)
            if level <= error_level:
                self.errors.append(str(msg))
            if level <= print_level:
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

    return _Logger()


def _last_errors(logger, cause: BaseException | None, count: int = 5) -> str:
    messages = list(logger.errors[-count:])
    if cause is not None:
        messages.append(str(cause))
    return "; ".join(messages) if messages else "TensorRT logged no error (rerun with verbose=True)"


def _describe_parser_error(error) -> str:
    """One parser error as `node 'name' (Operator): CODE: description` (TensorRT 10's parser errors name the node)."""

    def field(name):
        method = getattr(error, name, None)
        try:
            return method() if callable(method) else None
        except Exception:  # an older binding without that field
            return None

    name, operator, index = field("node_name"), field("node_operator"), field("node")
    if name:
        where = f"node {name!r}"
    elif isinstance(index, int) and index >= 0:
        where = f"node #{index}"
    else:
        where = "graph"
    if operator:
        where += f" ({operator})"
    code = field("code")
    code = getattr(code, "name", None) or (str(code) if code is not None else None)
    description = field("desc") or str(error)
    return f"{where}: {code}: {description}" if code else f"{where}: {description}"


def _network_inputs(network) -> dict[str, tuple[int, ...]]:
    """The parsed network's inputs: name -> shape, -1 for a dynamic dimension."""
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if getattr(tensor, "is_shape_tensor", False):
            raise ValueError(f"input {tensor.name!r} is a shape tensor, which build_engine does not support")
        inputs[tensor.name] = tuple(int(d) for d in tensor.shape)
    return inputs


def _weak_precision_flags(trt, network) -> list[str]:
    """The builder flags a weakly typed network needs: one per reduced-precision type among its tensors (inputs and
    every layer's outputs), for the ones the installed TensorRT knows."""
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        tensors += [layer.get_output(j) for j in range(layer.num_outputs)]
    found = {getattr(tensor.dtype, "name", str(tensor.dtype)).rsplit(".", 1)[-1] for tensor in tensors}
    flags = [flag for dtype, flag in _PRECISION_FLAGS.items() if dtype in found]
    return [flag for flag in dict.fromkeys(flags) if hasattr(trt.BuilderFlag, flag)]


def _load_timing_cache(config, path: Path):
    """Give the builder the timing cache stored at `path` (an empty one when there is none or TensorRT rejects it)."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return cache
    if data:
        warnings.warn(f"TensorRT rejected the timing cache {path} (another GPU or TensorRT version?); starting an "
                      "empty one, which replaces it after the build", stacklevel=3)
    cache = config.create_timing_cache(b"")
    config.set_timing_cache(cache, False)
    return cache


def _nbytes(buffer) -> int:
    nbytes = getattr(buffer, "nbytes", None)
    return int(nbytes) if nbytes is not None else len(memoryview(buffer).cast("B"))


def _write_atomically(path: Path, data) -> None:
    """Write `data` (bytes or any buffer) to `path` through a temporary file in the same directory and `os.replace`:
    readers see the old file or the new one, never part of one, and nothing is left behind on failure."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(memoryview(data).cast("B"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# -------------------------------------------------------------------------------------------------- shapes


def _normalize_shapes(shapes) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """`{name: (min, opt, max)}` with each shape a tuple of non-negative ints, min <= opt <= max."""
    if shapes is None:
        return {}
    if not isinstance(shapes, Mapping):
        raise ValueError(f"shapes must map input names to (min, opt, max) shapes, not {type(shapes).__name__}")
    normalized = {}
    for name, triple in shapes.items():
        try:
            low, opt, high = (tuple(_dim(d) for d in shape) for shape in triple)
        except (TypeError, ValueError) as error:
            raise ValueError(f"shapes[{name!r}] must be (min, opt, max), three shapes of non-negative ints, not "
                             f"{triple!r}") from error
        if not len(low) == len(opt) == len(high):
            raise ValueError(f"shapes[{name!r}]: min {low}, opt {opt} and max {high} have different ranks")
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ValueError(f"shapes[{name!r}]: every dimension needs min <= opt <= max (min {low}, opt {opt}, "
                             f"max {high})")
        normalized[str(name)] = (low, opt, high)
    return normalized


def _dim(value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"bad dimension {value!r}")
    return int(value)


def _profile_shapes(inputs: dict[str, tuple[int, ...]], requested: dict) -> dict:
    """The optimization profile: the requested shapes, checked against the network's inputs (the other inputs
    have fixed shapes). Empty when no input has a dynamic dimension and none was requested."""
    unknown = sorted(set(requested) - set(inputs))
    if unknown:
        raise ValueError(f"shapes name {', '.join(map(repr, unknown))}, not an input of the model; its inputs: "
                         f"{_describe_inputs(inputs)}")
    profile = {}
    for name, shape in inputs.items():
        dynamic = [axis for axis, size in enumerate(shape) if size < 0]
        if name in requested:
            low, opt, high = requested[name]
            if len(low) != len(shape):
                raise ValueError(f"shapes[{name!r}] has rank {len(low)}; input {name!r} has rank {len(shape)} "
                                 f"(shape {_show(shape)})")
            for axis, size in enumerate(shape):
                if size >= 0 and not low[axis] == opt[axis] == high[axis] == size:
                    raise ValueError(f"shapes[{name!r}]: dim {axis} of input {name!r} is fixed at {size} in the "
                                     f"model, but min/opt/max give {low[axis]}/{opt[axis]}/{high[axis]}")
            profile[name] = (low, opt, high)
        elif dynamic:
            dims = ", ".join(map(str, dynamic))
            raise ValueError(f"input {name!r} has dynamic dim{'s' if len(dynamic) > 1 else ''} {dims} (shape "
                             f"{_show(shape)}): give its range as shapes={{{name!r}: (min, opt, max)}} "
                             f"(command line: --shape {name}:MIN:OPT:MAX, each shape like 1x128)")
    return profile


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("?" if size < 0 else str(size) for size in shape) + "]"


def _describe_inputs(inputs: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {_show(shape)}" for name, shape in inputs.items()) or "none"
