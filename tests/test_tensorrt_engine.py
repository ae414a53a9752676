"""`qcompile.build_engine` and `qcompile build-engine` against a stand-in `tensorrt` module.

TensorRT itself cannot be installed here (no NVIDIA GPU; its libraries come from NVIDIA's own package index), so
these tests check what qcompile does with TensorRT's Python API: the calls it makes and their arguments, the shapes
it derives or rejects, the errors it reports and how it writes files. The stand-in follows TensorRT 10's Python
API; it does not build anything. Whether real engines build and run is checked on a machine with TensorRT
(docs/tensorrt.md).
"""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest

import qcompile
from qcompile import tensorrt as qtrt

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


# ------------------------------------------------------------------------------------------- the stand-in


class Severity(enum.IntEnum):
    INTERNAL_ERROR = 0
    ERROR = 1
    WARNING = 2
    INFO = 3
    VERBOSE = 4


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


_ONNX_TYPES = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF,
               TensorProto.BFLOAT16: DataType.BF16, TensorProto.INT64: DataType.INT64}


class Record:
    """What the stand-in was asked to do, and how it should behave."""

    def __init__(self):
        self.network_flags = None
        self.parsed = None
        self.workspace = None
        self.builder_flags = []
        self.profiles = []
        self.cache_read = None
        self.cache_ignore_mismatch = None
        self.built = 0
        # behaviour
        self.parser_errors = []       # [(node index, node name, operator, code, description)]
        self.engine = b"serialized-engine"
        self.builder_fails = False
        self.layer_dtypes = []        # output types of the parsed network's layers
        self.reject_cache = False
        self.logs = [(Severity.WARNING, "parser warning"), (Severity.INFO, "parser info")]


def fake_tensorrt(record: Record, version: str = "10.9.0.34") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__file__ = "<stand-in>"
    trt.DataType = DataType
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {
        "FP16": 0, "INT8": 1, "OBEY_PRECISION_CONSTRAINTS": 9, "PREFER_PRECISION_CONSTRAINTS": 10, "FP8": 15,
        "BF16": 17, "INT4": 22})  # like TensorRT 10.3: no FP4 flag yet
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1})

    class ILogger:
        Severity = Severity

        def __init__(self):
            pass

    class Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype
            self.is_shape_tensor = False

    class Layer:
        def __init__(self, dtype):
            self.outputs = [Tensor("out", (1,), dtype)]
            self.num_outputs = 1

        def get_output(self, index):
            return self.outputs[index]

    class Network:
        def __init__(self):
            self.inputs, self.layers = [], []

        num_inputs = property(lambda self: len(self.inputs))
        num_layers = property(lambda self: len(self.layers))

        def get_input(self, index):
            return self.inputs[index]

        def get_layer(self, index):
            return self.layers[index]

    class ParserError:
        def __init__(self, node, name, operator, code, description):
            self._fields = node, name, operator, types.SimpleNamespace(name=code), description

        def node(self):
            return self._fields[0]

        def node_name(self):
            return self._fields[1]

        def node_operator(self):
            return self._fields[2]

        def code(self):
            return self._fields[3]

        def desc(self):
            return self._fields[4]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            record.parsed = path
            for severity, message in record.logs:
                self.logger.log(severity, message)
            model = onnx.load(path, load_external_data=False)
            initializers = {t.name for t in model.graph.initializer}
            for value in model.graph.input:
                if value.name in initializers:
                    continue
                tensor_type = value.type.tensor_type
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim)
                self.network.inputs.append(Tensor(value.name, shape, _ONNX_TYPES[tensor_type.elem_type]))
            self.network.layers = [Layer(dtype) for dtype in record.layer_dtypes]
            self.errors = [ParserError(*fields) for fields in record.parser_errors]
            return not self.errors

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, index):
            return self.errors[index]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return memoryview(self.data)

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Config:
        def __init__(self):
            self.cache = None

        def set_memory_pool_limit(self, pool, size):
            assert pool is trt.MemoryPoolType.WORKSPACE
            record.workspace = size

        def set_flag(self, flag):
            record.builder_flags.append(flag.name)

        def add_optimization_profile(self, profile):
            record.profiles.append(profile.shapes)
            return len(record.profiles) - 1

        def create_timing_cache(self, data):
            if record.cache_read is None:
                record.cache_read = bytes(data)
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            record.cache_ignore_mismatch = ignore_mismatch
            if record.reject_cache and cache.data:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            if record.builder_fails:
                raise TypeError("pybind11::init(): factory function returned nullptr")
            self.logger = logger

        def create_network(self, flags):
            record.network_flags = flags
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record.built += 1
            if record.engine is None:
                self.logger.log(Severity.ERROR, "Error Code 2: out of device memory")
                return None
            if config.cache is not None:
                config.cache.data += b"+timed"
            return memoryview(record.engine)  # like IHostMemory: a buffer with nbytes

    trt.ILogger, trt.OnnxParser, trt.Builder = ILogger, OnnxParser, Builder
    return trt


@pytest.fixture
def trt(monkeypatch):
    record = Record()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(record))
    return record


def onnx_file(path: Path, dims=("batch", 8), name: str = "x") -> Path:
    """A one-node fp16 ONNX model; a string dim is dynamic (named), an int fixed."""
    x = helper.make_tensor_value_info(name, TensorProto.FLOAT16, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, list(dims))
    graph = helper.make_graph([helper.make_node("Relu", [name], ["y"], name="relu")], "tiny", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------------- API


def test_exported_lazily():
    assert qcompile.build_engine is qtrt.build_engine
    assert "build_engine" in qcompile.__all__


def test_static_model_builds_strongly_typed(trt, tmp_path, capsys):
    model = onnx_file(tmp_path / "m.onnx", dims=(2, 8))
    path = qcompile.build_engine(model, tmp_path / "out" / "m.engine", workspace_bytes=1 << 30)
    assert path == tmp_path / "out" / "m.engine"
    assert path.read_bytes() == b"serialized-engine"
    assert trt.network_flags == 1 << 1  # STRONGLY_TYPED
    assert trt.parsed == str(model)
    assert trt.workspace == 1 << 30
    assert trt.profiles == []  # nothing dynamic: no profile
    assert trt.builder_flags == []  # strongly typed: no precision flag
    assert trt.cache_read is None
    assert leftovers(tmp_path / "out") == []
    err = capsys.readouterr().err
    assert "[TensorRT] parser warning" in err and "parser info" not in err


def test_verbose_prints_the_whole_log(trt, tmp_path, capsys):
    qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), tmp_path / "m.engine", verbose=True)
    assert "[TensorRT] parser info" in capsys.readouterr().err


def test_dynamic_dims_need_shapes(trt, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", dims=("batch", 8), name="input_ids")
    with pytest.raises(ValueError, match=r"input 'input_ids' has dynamic dim 0 \(shape \[\?, 8\]\).*"
                                         r"--shape input_ids:MIN:OPT:MAX"):
        qcompile.build_engine(model, tmp_path / "m.engine")
    assert trt.built == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(ValueError, match=r"dynamic dims 0, 1"):
        qcompile.build_engine(onnx_file(tmp_path / "two.onnx", dims=("batch", "sequence")), tmp_path / "m.engine")


def test_dynamic_dims_with_shapes_make_a_profile(trt, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", dims=("batch", 8))
    qcompile.build_engine(model, tmp_path / "m.engine", shapes={"x": ([1, 8], (4, 8), (16, 8))})
    assert trt.profiles == [{"x": ((1, 8), (4, 8), (16, 8))}]


@pytest.mark.parametrize("shapes, message", [
    ({"y": ((1, 8),) * 3}, r"shapes name 'y', not an input of the model; its inputs: x \[\?, 8\]"),
    ({"x": ((1,), (2,), (4,))}, r"shapes\['x'\] has rank 1; input 'x' has rank 2"),
    ({"x": ((1, 8), (2, 8), (4, 16))}, r"dim 1 of input 'x' is fixed at 8 in the model, but min/opt/max give 8/8/16"),
])
def test_shapes_checked_against_the_network(trt, tmp_path, shapes, message):
    with pytest.raises(ValueError, match=message):
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx"), tmp_path / "m.engine", shapes=shapes)
    assert trt.built == 0 and not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"shapes": {"x": ((4, 8), (2, 8), (8, 8))}}, r"min <= opt <= max"),
    ({"shapes": {"x": ((1, 8), (2, 8))}}, r"must be \(min, opt, max\)"),
    ({"shapes": {"x": ((1, 8), (2,), (4, 8))}}, r"different ranks"),
    ({"shapes": {"x": ((-1, 8), (2, 8), (4, 8))}}, r"non-negative"),
    ({"shapes": [("x", (1, 8))]}, r"shapes must map input names"),
    ({"workspace_bytes": 0}, r"workspace_bytes must be a positive"),
    ({"precision_constraints": "always"}, r"'obey', 'prefer' or None"),
    ({"precision_constraints": "obey"}, r"applies to weakly typed networks"),
])
def test_bad_arguments_fail_before_tensorrt(monkeypatch, tmp_path, kwargs, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # never reached
    with pytest.raises(ValueError, match=message):
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx"), tmp_path / "m.engine", **kwargs)


def test_missing_onnx_file(trt, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        qcompile.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine")
    assert trt.parsed is None


def test_engine_path_must_not_be_the_model(trt, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", dims=(2, 8))
    with pytest.raises(ValueError, match="is the ONNX file itself"):
        qcompile.build_engine(model, model)


def test_not_installed(monkeypatch, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", dims=(2, 8))
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(ImportError) as caught:
        qcompile.build_engine(model, tmp_path / "m.engine")
    message = str(caught.value)
    assert "needs NVIDIA TensorRT 10 or newer, which is not installed" in message
    assert "pip install --extra-index-url https://pypi.nvidia.com tensorrt" in message
    assert "qcompile[tensorrt]" in message
    assert not (tmp_path / "m.engine").exists()
    import importlib.util

    monkeypatch.delitem(sys.modules, "tensorrt")
    if importlib.util.find_spec("tensorrt") is None:  # the real situation on this machine
        with pytest.raises(ImportError, match="not installed"):
            qcompile.build_engine(model, tmp_path / "m.engine")


def test_placeholder_or_old_tensorrt(monkeypatch, tmp_path):
    model = onnx_file(tmp_path / "m.onnx", dims=(2, 8))
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(ImportError, match="is not NVIDIA TensorRT's Python package.*pypi.nvidia.com"):
        qcompile.build_engine(model, tmp_path / "m.engine")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(Record(), version="8.6.1"))
    with pytest.raises(ImportError, match="TensorRT 8.6.1 is installed; .* needs 10 or newer"):
        qcompile.build_engine(model, tmp_path / "m.engine")


def test_no_gpu(trt, tmp_path):
    trt.builder_fails = True
    with pytest.raises(qtrt.EngineBuildError, match="could not create a builder.*factory function returned nullptr"):
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), tmp_path / "m.engine")


def test_parser_errors_listed(trt, tmp_path):
    trt.parser_errors = [
        (3, "layers.0/mlp/MatMul", "MatMul", "UNSUPPORTED_NODE", "no implementation for these input types"),
        (-1, "", "", "INVALID_GRAPH", "graph has a cycle"),
    ]
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"previous engine")
    with pytest.raises(qtrt.EngineBuildError) as caught:
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), engine)
    message = str(caught.value)
    assert "TensorRT's ONNX parser rejected" in message and "(2 errors)" in message
    assert ("node 'layers.0/mlp/MatMul' (MatMul): UNSUPPORTED_NODE: no implementation for these input types"
            in message)
    assert "graph: INVALID_GRAPH: graph has a cycle" in message
    assert len(caught.value.errors) == 2
    assert trt.built == 0
    assert engine.read_bytes() == b"previous engine"


def test_failed_build_writes_nothing(trt, tmp_path):
    trt.engine = None
    engine, cache = tmp_path / "m.engine", tmp_path / "timing.cache"
    engine.write_bytes(b"previous engine")
    with pytest.raises(qtrt.EngineBuildError, match="could not build an engine .*out of device memory") as caught:
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), engine, timing_cache=cache)
    assert caught.value.errors == ["Error Code 2: out of device memory"]
    assert engine.read_bytes() == b"previous engine"  # replaced only on success
    assert not cache.exists()  # the timing cache is written after a successful build only
    assert leftovers(tmp_path) == []


def test_interrupted_write_leaves_old_engine(trt, tmp_path, monkeypatch):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"previous engine")

    def replace_fails(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(qtrt.os, "replace", replace_fails)
    with pytest.raises(OSError, match="disk full"):
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), engine)
    assert engine.read_bytes() == b"previous engine"
    assert leftovers(tmp_path) == []


def test_existing_engine_replaced_on_success(trt, tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"previous engine")
    qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), engine)
    assert engine.read_bytes() == b"serialized-engine"
    assert leftovers(tmp_path) == []


def test_timing_cache_read_and_written_back(trt, tmp_path):
    model, cache = onnx_file(tmp_path / "m.onnx", dims=(2, 8)), tmp_path / "caches" / "timing.cache"
    qcompile.build_engine(model, tmp_path / "m.engine", timing_cache=cache)
    assert trt.cache_read == b"" and trt.cache_ignore_mismatch is False
    assert cache.read_bytes() == b"+timed"
    trt.cache_read = None
    qcompile.build_engine(model, tmp_path / "m.engine", timing_cache=cache)
    assert trt.cache_read == b"+timed"
    assert cache.read_bytes() == b"+timed+timed"
    assert leftovers(cache.parent) == []


def test_rejected_timing_cache_replaced(trt, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    trt.reject_cache = True
    with pytest.warns(UserWarning, match="rejected the timing cache"):
        qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), tmp_path / "m.engine", timing_cache=cache)
    assert cache.read_bytes() == b"+timed"


@pytest.mark.parametrize("constraints", ["obey", "prefer", None])
def test_weakly_typed_flags(trt, tmp_path, constraints):
    trt.layer_dtypes = [DataType.INT8, DataType.HALF, DataType.FLOAT, DataType.FP4, DataType.INT8]
    qcompile.build_engine(onnx_file(tmp_path / "m.onnx", dims=(2, 8)), tmp_path / "m.engine",
                          strongly_typed=False, precision_constraints=constraints)
    assert trt.network_flags == 0
    expected = ["FP16", "INT8"]  # the fp16 input and the layers' types; FP4 unknown to this TensorRT
    if constraints is not None:
        expected.append(f"{constraints.upper()}_PRECISION_CONSTRAINTS")
    assert trt.builder_flags == expected


# --------------------------------------------------------------------------------------------- command line


def test_cli_builds(trt, tmp_path, capsys):
    from qcompile.cli import main

    model = onnx_file(tmp_path / "m.onnx", dims=("batch", 8))
    engine, cache = tmp_path / "m.engine", tmp_path / "timing.cache"
    assert main(["build-engine", str(model), str(engine), "--shape", "x:1x8:4x8:16x8", "--workspace-gb", "2",
                 "--timing-cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {engine}" in out
    assert engine.read_bytes() == b"serialized-engine" and cache.read_bytes() == b"+timed"
    assert trt.network_flags == 1 << 1 and trt.workspace == 2 << 30
    assert trt.profiles == [{"x": ((1, 8), (4, 8), (16, 8))}]
    assert trt.builder_flags == []

    assert main(["build-engine", str(model), str(engine), "--shape", "x:2x8", "--weakly-typed",
                 "--precision-constraints", "obey"]) == 0
    assert trt.profiles[-1] == {"x": ((2, 8), (2, 8), (2, 8))}
    assert trt.network_flags == 0 and trt.builder_flags == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]


@pytest.mark.parametrize("args, code, message", [
    ([], 2, "input 'x' has dynamic dim 0"),
    (["--shape", "x:1x8:4x8"], 2, "shapes name 'x:1x8', not an input"),  # read as NAME:SHAPE
    (["--shape", "x=1x8"], 2, "expected NAME:MIN:OPT:MAX"),
    (["--shape", "x:1x8", "--shape", "x:2x8"], 2, "gives input 'x' twice"),
    (["--shape", "x:1x8", "--workspace-gb", "0"], 2, "--workspace-gb must be positive"),
    (["--shape", "x:1x8", "--precision-constraints", "prefer"], 2, "applies to weakly typed networks"),
])
def test_cli_bad_input(trt, tmp_path, capsys, args, code, message):
    from qcompile.cli import main

    model = onnx_file(tmp_path / "m.onnx", dims=("batch", 8))
    assert main(["build-engine", str(model), str(tmp_path / "m.engine"), *args]) == code
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after TensorRT's own warnings, if it ran
    assert last.startswith("qcompile: ") and message in last and "Traceback" not in err
    assert not (tmp_path / "m.engine").exists()


def test_cli_failures(trt, tmp_path, capsys, monkeypatch):
    from qcompile.cli import main

    model = onnx_file(tmp_path / "m.onnx", dims=(2, 8))
    engine = tmp_path / "m.engine"
    assert main(["build-engine", str(tmp_path / "missing.onnx"), str(engine)]) == 2
    assert "missing.onnx is not a file" in capsys.readouterr().err
    trt.engine = None
    assert main(["build-engine", str(model), str(engine)]) == 1
    err = capsys.readouterr().err
    assert "qcompile: TensorRT could not build an engine" in err and "Traceback" not in err
    trt.parser_errors = [(0, "relu", "Relu", "UNSUPPORTED_NODE", "unsupported")]
    assert main(["build-engine", str(model), str(engine)]) == 1
    assert "node 'relu' (Relu): UNSUPPORTED_NODE: unsupported" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert main(["build-engine", str(model), str(engine)]) == 1
    err = capsys.readouterr().err
    assert "which is not installed" in err and "https://pypi.nvidia.com" in err and len(err.strip().splitlines()) == 1
    assert not engine.exists()


@pytest.mark.parametrize("spec, expected", [
    ("x:1x8:4x8:16x8", ("x", ((1, 8), (4, 8), (16, 8)))),
    ("x:4x8", ("x", ((4, 8),) * 3)),
    ("input:0:1x8:2x8:4x8", ("input:0", ((1, 8), (2, 8), (4, 8)))),
    ("input:0:3", ("input:0", ((3,),) * 3)),
])
def test_cli_shape_spec(spec, expected):
    from qcompile.cli import _shape_spec

    assert _shape_spec(spec) == expected
