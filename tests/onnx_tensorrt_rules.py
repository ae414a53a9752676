"""What TensorRT 10's ONNX parser accepts in an explicitly quantized graph, written down as a checker, and a numpy
implementation of `trt::TRT_FP4DynamicQuantize` for `onnx.reference.ReferenceEvaluator`.

The rules, and where they come from (docs/onnx.md lists them with the same sources):

- opset <= 24 for the default domain; custom ops only in the `trt` domain (TensorRT's own, version 1).
- QuantizeLinear/DequantizeLinear (onnx-tensorrt `QuantDequantLinearHelper`, TensorRT's IQuantizeLayer and
  IDequantizeLayer): symmetric only, a zero point is absent or all zeros; quantized types INT8, FLOAT8E4M3FN, INT4,
  FLOAT4E2M1 (UINT8 is DLA-only); scales are positive; a scale is a scalar (per tensor), 1-D with one entry per
  element of `axis` (per channel), or of the input's rank with exactly one blocked dimension, whose block size
  TensorRT infers as dimension / scale dimension (so it must divide exactly and equal `block_size`); QuantizeLinear
  takes its scale in its input's type (IQuantizeLayer: input and scale of one type T1).
- No UINT8 or UINT4 tensor anywhere but the network's inputs and outputs.
- The GEMMs compute in the export's 16-bit dtype: both inputs of every MatMul/Gemm are FLOAT16 or BFLOAT16 (a
  strongly typed network needs 16-bit floats around FP8/FP4/INT4 GEMMs).
- Weights: INT8 `[K, N]` per channel (axis 1) or per tensor; FP8 `[K, N]` per tensor / channel / blocked along K;
  INT4 `[K, N]` blocked along K (axis 0); FLOAT4E2M1 `[N, K]` blocked along the last axis by 16 with FLOAT8E4M3FN
  block scales that a DequantizeLinear with a float32 scalar (the global scale) dequantizes first, then
  transposed into the MatMul (NVIDIA Model Optimizer's NVFP4 export).
- `TRT_FP4DynamicQuantize` (TensorRT's operator docs, DynamicQuantize / IDynamicQuantizeLayer, and the parser's
  importer): attributes axis = -1 (the last axis), block_size = 16, scale_type = FLOAT8E4M3FN (17); input 0 in the
  16-bit dtype, 2-D or 3-D, its blocked axis static and divisible by 16; input 1 a float32 scalar initializer (a
  build-time constant); outputs FLOAT4E2M1 data and FLOAT8E4M3FN block scales, dequantized as Model Optimizer
  writes it: DQ(block scales, the same global scale), then DQ(data, those, axis -1, block_size 16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper
from onnx.reference.op_run import OpRun

MAX_OPSET = 24
QUANTIZED = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN, TensorProto.INT4, TensorProto.FLOAT4E2M1}
SIXTEEN_BIT = {TensorProto.FLOAT16, TensorProto.BFLOAT16}
_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)
_E2M1_BOUNDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)


class TRT_FP4DynamicQuantize(OpRun):  # noqa: N801 (the operator's name)
    """TensorRT's dynamic NVFP4 quantization, from its documented semantics: per block of `block_size` elements
    along `axis`, scale = amax / 6, quantized to FP8 E4M3 (round to nearest even, saturating at 448) by the
    double-quantization scale `s`; data = E2M1(x / (fp8_scale · s)), nearest, ties to even. The input is taken to
    float32 first. An all-zero block gets scale 1 and zero codes; a block whose FP8 scale underflows to 0, zero
    codes."""

    op_domain = "trt"

    def _run(self, x, double_quant_scale, axis=None, block_size=None, scale_type=None):
        assert axis in (-1, x.ndim - 1) and block_size == 16 and scale_type == TensorProto.FLOAT8E4M3FN
        x32 = np.asarray(x).astype(np.float32)
        s = np.float32(np.asarray(double_quant_scale).astype(np.float32).reshape(()))
        k = x32.shape[-1]
        blocks = x32.reshape(*x32.shape[:-1], k // block_size, block_size)
        amax = np.abs(blocks).max(axis=-1)
        scale = amax / np.float32(np.float32(6.0) * s)
        scale = np.where(scale == 0, np.float32(1.0), scale)
        scale8 = np.minimum(scale, np.float32(448.0)).astype(ml_dtypes.float8_e4m3fn)
        d = scale8.astype(np.float32) * s
        v = blocks / np.where(d == 0, np.float32(1.0), d)[..., None]
        magnitude = np.abs(v)
        index = np.sum(magnitude[..., None] > _E2M1_BOUNDS, axis=-1)
        for i, bound in enumerate(_E2M1_BOUNDS):  # a value on a boundary goes to the even index
            index = np.where(magnitude == bound, i + (i % 2), index)
        values = np.where(np.signbit(v), -1.0, 1.0).astype(np.float32) * _E2M1[index]
        values = np.where((d == 0)[..., None], np.float32(0.0), values)
        return values.reshape(x32.shape).astype(ml_dtypes.float4_e2m1fn), scale8


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    def __init__(self, model: onnx.ModelProto):
        onnx.checker.check_model(model, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
        self.model = model
        self.init = {t.name: t for t in model.graph.initializer}
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list] = {}
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tensor = value.type.tensor_type
            self.types[value.name] = tensor.elem_type
            self.shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        for t in model.graph.initializer:
            self.types[t.name], self.shapes[t.name] = t.data_type, list(t.dims)
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.io = {v.name for v in [*model.graph.input, *model.graph.output]}

    def array(self, name):
        return numpy_helper.to_array(self.init[name])

    def type_name(self, name) -> str:
        return TensorProto.DataType.Name(self.types.get(name, 0))


def _check_scale(g: _Graph, node, x_name: str, scale_name: str) -> None:
    attrs = _attributes(node)
    where = f"{node.op_type} {node.name!r}"
    if scale_name in g.init:
        values = g.array(scale_name).astype(np.float32)
        assert values.size > 0 and np.all(np.isfinite(values)) and np.all(values > 0), f"{where}: scales not positive"
    x_shape, s_shape = g.shapes.get(x_name), g.shapes.get(scale_name)
    assert s_shape is not None and x_shape is not None, f"{where}: unknown shapes"
    if len(s_shape) == 0 or s_shape == [1]:
        return  # per tensor
    rank = len(x_shape)
    if len(s_shape) == 1:  # per channel
        axis = attrs.get("axis", 1) % rank
        assert "block_size" not in attrs or attrs["block_size"] == 0, f"{where}: 1-D scale with a block size"
        assert x_shape[axis] == s_shape[0], f"{where}: {s_shape[0]} scales for dimension {x_shape[axis]}"
        return
    assert len(s_shape) == rank, f"{where}: scale rank {len(s_shape)} for input rank {rank}"
    axis = attrs.get("axis", 1) % rank
    # dynamic dimensions (None) of an activation's scales follow the activation's
    blocked = [i for i in range(rank) if s_shape[i] != x_shape[i] or (i == axis and s_shape[i] is not None)]
    blocked = [i for i in blocked if not (s_shape[i] == x_shape[i] and i != axis)]
    assert blocked == [axis] or (blocked == [] and s_shape[axis] == 1 == x_shape[axis]), \
        f"{where}: blocked dimensions {blocked}, axis {axis} (shapes {x_shape}, {s_shape})"
    block = attrs.get("block_size", 0)
    assert x_shape[axis] is not None and x_shape[axis] % s_shape[axis] == 0, \
        f"{where}: dimension {x_shape[axis]} is not a whole number of {s_shape[axis]} blocks"
    assert block == x_shape[axis] // s_shape[axis], \
        f"{where}: block_size {block}, but TensorRT infers {x_shape[axis] // s_shape[axis]} from the shapes"


def _weight_of(g: _Graph, matmul) -> dict | None:
    """The weight pattern feeding input 1 of a MatMul, or None when it is not a dequantized initializer."""
    source = g.producer.get(matmul.input[1])
    transposed = source is not None and source.op_type == "Transpose"
    perm = _attributes(source).get("perm") if transposed else None
    if transposed:  # an attention's K^T is a Transpose too: only a dequantized weight's is checked
        source = g.producer.get(source.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        return None
    assert perm in (None, [1, 0]), f"weight transposed with perm {perm}"
    attrs = _attributes(source)
    data = source.input[0]
    fp8_through = None
    if data not in g.init:  # W4A8: Q/DQ to FP8 on a dequantized INT4 weight
        q = g.producer.get(data)
        assert q is not None and q.op_type == "QuantizeLinear", f"weight DQ {source.name!r} reads {data!r}"
        inner = g.producer.get(q.input[0])
        assert inner is not None and inner.op_type == "DequantizeLinear" and inner.input[0] in g.init
        fp8_through = g.type_name(data)
        source, attrs, data = inner, _attributes(inner), inner.input[0]
    dtype = g.type_name(data)
    rank_dims = list(g.init[data].dims)
    axis = attrs.get("axis", 1) % len(rank_dims)
    info = {"dtype": dtype, "dims": rank_dims, "axis": axis, "block_size": attrs.get("block_size", 0),
            "transposed": transposed, "through": fp8_through, "scale_from": None}
    scale_source = g.producer.get(source.input[1])
    if scale_source is not None and scale_source.op_type == "DequantizeLinear":
        global_scale = scale_source.input[1]
        assert global_scale in g.init and g.types[global_scale] == TensorProto.FLOAT and g.array(global_scale).size == 1
        info["scale_from"] = (g.type_name(scale_source.input[0]), g.type_name(scale_source.output[0]))
    return info


def _input_of(g: _Graph, matmul) -> str:
    """How the activation reaching a MatMul is quantized: 'none', 'int8', 'fp8' or 'nvfp4'."""
    source = g.producer.get(matmul.input[0])
    if source is None or source.op_type != "DequantizeLinear":
        return "none"
    upstream = g.producer.get(source.input[0])
    if upstream is None:
        return "none"
    if upstream.op_type == "QuantizeLinear":
        return {"INT8": "int8", "FLOAT8E4M3FN": "fp8"}[g.type_name(upstream.output[0])]
    if upstream.op_type == "TRT_FP4DynamicQuantize":
        return "nvfp4"
    raise AssertionError(f"activation DQ {source.name!r} after {upstream.op_type}")


def check_tensorrt_graph(model: onnx.ModelProto, dtype: int) -> dict:
    """Assert TensorRT's parser rules (module docstring) on `model`, whose 16-bit compute type is `dtype`
    (TensorProto.FLOAT16 / BFLOAT16); return what each quantized MatMul reads: {"weights": [...], "inputs": [...]}.
    """
    g = _Graph(model)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    assert opsets["ai.onnx"] <= MAX_OPSET, f"opset {opsets['ai.onnx']}"
    assert set(opsets) <= {"ai.onnx", "trt"} and opsets.get("trt", 1) == 1, f"opsets {opsets}"

    for name, elem in g.types.items():
        if elem in (TensorProto.UINT8, TensorProto.UINT4):
            assert name in g.io, f"{TensorProto.DataType.Name(elem)} tensor {name!r} inside the network"

    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx", "trt"):
            raise AssertionError(f"node {node.name!r} in domain {node.domain!r}")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            where = f"{node.op_type} {node.name!r}"
            if len(node.input) > 2 and node.input[2]:
                assert node.input[2] in g.init, f"{where}: zero point is not an initializer"
                assert g.types[node.input[2]] in QUANTIZED, f"{where}: zero point {g.type_name(node.input[2])}"
                assert not np.any(g.array(node.input[2]).astype(np.float32)), f"{where}: non-zero zero point"
            if node.op_type == "QuantizeLinear":
                assert g.types[node.output[0]] in QUANTIZED, f"{where}: quantizes to {g.type_name(node.output[0])}"
                assert g.types[node.input[1]] == g.types[node.input[0]], \
                    f"{where}: scale {g.type_name(node.input[1])} for input {g.type_name(node.input[0])}"
                assert g.types[node.input[0]] in SIXTEEN_BIT, f"{where}: quantizes {g.type_name(node.input[0])}"
            else:
                assert g.types[node.input[0]] in QUANTIZED, f"{where}: dequantizes {g.type_name(node.input[0])}"
            _check_scale(g, node, node.input[0], node.input[1])
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                assert g.types[name] == dtype, f"{node.op_type} {node.name!r}: input {name!r} is {g.type_name(name)}"
        if node.domain == "trt":
            _check_fp4_dynamic_quantize(g, node, dtype)

    facts = {"weights": [], "inputs": []}
    for node in model.graph.node:
        if node.op_type == "MatMul":
            weight = _weight_of(g, node)
            if weight is not None:
                facts["weights"].append(weight)
                facts["inputs"].append(_input_of(g, node))
    for weight in facts["weights"]:
        if weight["dtype"] == "FLOAT4E2M1":  # [N, K], blocked by 16 along K (the last axis), transposed in
            assert weight["transposed"] and weight["axis"] == 1 and weight["block_size"] == 16, weight
            assert weight["scale_from"] == ("FLOAT8E4M3FN", "FLOAT"), weight
        else:  # [K, N] straight into the MatMul; blocks along K (axis 0)
            assert not weight["transposed"], weight
            if weight["block_size"]:
                assert weight["axis"] == 0, weight
            elif len(weight["dims"]) == 2:
                assert weight["axis"] == 1, weight
    return facts


def _check_fp4_dynamic_quantize(g: _Graph, node, dtype: int) -> None:
    where = f"{node.op_type} {node.name!r}"
    assert node.op_type == "TRT_FP4DynamicQuantize", f"{where}: unknown TensorRT op"
    attrs = _attributes(node)
    x, scale = node.input
    rank = len(g.shapes[x])
    assert attrs.get("axis") in (-1, rank - 1), f"{where}: axis {attrs.get('axis')}"
    assert attrs.get("block_size") == 16 and attrs.get("scale_type") == TensorProto.FLOAT8E4M3FN, f"{where}: {attrs}"
    assert g.types[x] == dtype and rank in (2, 3), f"{where}: input {g.type_name(x)} of rank {rank}"
    k = g.shapes[x][-1]
    assert k is not None and k % 16 == 0, f"{where}: blocked axis of size {k}"
    assert scale in g.init and g.types[scale] == TensorProto.FLOAT and g.array(scale).size == 1, \
        f"{where}: double-quantization scale must be a float32 scalar initializer"
    assert float(g.array(scale).reshape(())) > 0
    data, scales = node.output
    assert g.types[data] == TensorProto.FLOAT4E2M1 and g.types[scales] == TensorProto.FLOAT8E4M3FN
    scale_dq = [c for c in g.consumers[scales]]
    assert len(scale_dq) == 1 and scale_dq[0].op_type == "DequantizeLinear" and scale_dq[0].input[1] == scale
    for consumer in g.consumers[data]:
        a = _attributes(consumer)
        assert consumer.op_type == "DequantizeLinear" and consumer.input[1] == scale_dq[0].output[0], where
        assert a.get("axis") in (-1, rank - 1) and a.get("block_size") == 16, f"{where}: data DQ {a}"
        assert g.types[consumer.output[0]] == dtype
