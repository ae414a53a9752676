"""ONNX lowering: a `QuantizedModel` becomes a QDQ ONNX graph that edge runtimes fuse into quantized kernels.

`export_onnx(qm, "model.onnx")` re-exports the quantized graph with torch.export, translates it with
`torch.onnx.export(..., dynamo=True)`, and lowers every `qcompile::` op through the translation table below
(onnxscript, traced). Each quantized linear becomes QuantizeLinear/DequantizeLinear around a `MatMul`, laid out
the way ONNX Runtime's graph optimizer recognizes:

| qcompile op, activation | ONNX pattern | ONNX Runtime CPU runs |
|---|---|---|
| int8, static per-tensor input | `Clip → Q(s, int8) → DQ → MatMul ← DQ(W int8 [K,N], per-channel, axis=1)` | `MatMulIntegerToFloat` |
| int8, dynamic per-token input | `s = amax(x)/127 per token; Q(x/s, 1, int8) → DQ → MatMul ← DQ(W) → ·s` | `MatMulIntegerToFloat` |
| int4/int3 weight-only | `MatMul ← DQ(W INT4/UINT4 [K,N], block_size=g, axis=0)` | `MatMulNBits` |
| fp8 (any scale layout) | `MatMul ← DQ(W FLOAT8E4M3FN [K,N], scale)`; inputs `Q/DQ` to FLOAT8E4M3FN | Q/DQ + float `MatMul` |
| nvfp4 | `MatMul ← DQ(W FLOAT4E2M1 [K,N], DQ(block scale FLOAT8E4M3FN, global scale), block_size=16)`; inputs likewise, block scales computed per call | (no CPU kernels; `onnx.reference`) |

The dynamic per-token INT8 form divides each token by its own scale and quantizes with a unit scale, so the
integer product runs in the fused `MatMulIntegerToFloat` kernel and the per-token scale is one multiply on the
output; the numbers are exactly `qcompile.numerics` (the reference clamps to ±127, so does the graph).

Weights: the translation functions run while the graph is traced, before parameters have values, so they wire
DequantizeLinear nodes to the stored `qcompile` buffers and record how each buffer must be re-laid out; once the
exporter has attached the tensors, `_Translation.apply` swaps in the ONNX-typed initializers (INT4/UINT4/FLOAT4E2M1
packed along the flattened `[K, N]` tensor, FLOAT8E4M3FN, INT8), so no transpose is left in the graph.

Every qcompile op in the graph must have a translation: a node without one raises `UntranslatableOpError` naming
the node, and the export verifies that every quantized node became a DequantizeLinear pattern, so a quantized model
never turns into a float graph silently.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = [
    "DEFAULT_OPSET",
    "FP4_OPSET",
    "INT4_ACCURACY_EXACT",
    "INT8_WEIGHT_TYPES",
    "OnnxExportError",
    "UntranslatableOpError",
    "export_onnx",
    "onnxruntime_session",
    "optimized_op_types",
    "translation_table",
]

DEFAULT_OPSET = 21  # DequantizeLinear with block_size (INT4 groups, FP8 blocks)
FP4_OPSET = 23  # FLOAT4E2M1
MIN_OPSET = 21
INT8_WEIGHT_TYPES = ("int8", "uint8")  # how INT8 weights are stored (see export_onnx)
# A protobuf message cannot exceed 2 GiB; above this many bytes of initializers, tensors go to an external file.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26
# ONNX Runtime's MatMulNBits `accuracy_level`: 1 computes in float32 (the product of the dequantized weight, as
# the QuantizedModel does); 4 quantizes activations to int8 per block, which is faster and not exact.
INT4_ACCURACY_EXACT = 1

_FP8_MAX = 448.0
_SMALLEST_NORMAL = 2.0**-126  # float32
_INT8_MAX = 127.0
_E2M1_MAX = 6.0
_NVFP4_BLOCK = 16
_QCOMPILE_NAMESPACE = "qcompile"


class OnnxExportError(RuntimeError):
    """The model cannot be exported to ONNX as asked."""


class UntranslatableOpError(OnnxExportError):
    """A node of the graph has no ONNX translation."""


# ------------------------------------------------------------------------------------------------ public API


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    *,
    example_inputs: tuple | Any = None,
    example_kwargs: dict | None = None,
    external_data: bool | None = None,
    optimize: bool = True,
    check: bool = True,
    int8_weights: str = "int8",
) -> Path:
    """Write `model` (a `qcompile.QuantizedModel`, or any module) to `path` as a QDQ ONNX model.

    - `opset`: 21 by default; a model with NVFP4 layers needs FLOAT4E2M1 and is written at opset 23 (at least).
    - Inputs: the model's own example call (`QuantizedModel`), or `example_inputs` / `example_kwargs`. Every
      dimension the model does not fix stays dynamic; the first input's leading dynamic axes are named
      `batch` and `sequence`. Outputs are named after the model's output fields (`logits`, `last_hidden_state`).
    - `external_data`: None writes tensors to `<path>.data` only when they exceed the 2 GB protobuf limit;
      True/False forces it.
    - `int8_weights`: how INT8 weights are stored. "int8" (default): the codes as they are, for ONNX Runtime's
      u8 × s8 kernels, the fast ones on CPUs with an INT8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX).
      On x86 CPUs without one those kernels add pairs of products in saturating int16 (measured: 19% relative
      error on a 384-input layer) unless the session sets `session.x64quantprecision` (`onnxruntime_session`
      does). "uint8": the codes plus 128 at zero point 128, the same integers, which ONNX Runtime multiplies
      u8 × u8, exactly on every x86 CPU and with any session options, at the speed of the exact kernels (slower
      than u8 × s8 with VNNI; the same without it).
    - The same model and inputs give byte-identical files. The file is written to a temporary directory next to
      `path`, checked with `onnx.checker.check_model(full_check=True)` when `check`, and moved into place with
      `os.replace`, so a reader never sees a partial file (with external data, the data file is moved first).

    Returns the path written. Raises `UntranslatableOpError` (naming the node) when a node has no translation.
    """
    _require_onnx()
    import onnx

    path = Path(path)
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: QDQ with block_size needs opset {MIN_OPSET} or newer")
    if int8_weights not in INT8_WEIGHT_TYPES:
        raise ValueError(f"int8_weights must be one of {INT8_WEIGHT_TYPES}, not {int8_weights!r}")
    args, kwargs = _example_call(model, example_inputs, example_kwargs)
    module = getattr(model, "graph_module", model)

    onnx_model = to_onnx_model(module, args, kwargs, opset=opset, optimize=optimize, int8_weights=int8_weights)
    _set_model_metadata(onnx_model, model)

    path.parent.mkdir(parents=True, exist_ok=True)
    initializer_bytes = sum(
        value.const_value.nbytes for value in onnx_model.graph.initializers.values() if value.const_value is not None
    )
    use_external = initializer_bytes > EXTERNAL_DATA_THRESHOLD if external_data is None else bool(external_data)
    data_name = f"{path.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        staged = staging / path.name
        _save(onnx_model, staged, data_name if use_external else None)
        if check:
            onnx.checker.check_model(str(staged), full_check=True)
        if use_external:
            os.replace(staging / data_name, path.parent / data_name)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def to_onnx_model(module: nn.Module, args: tuple, kwargs: dict, *, opset: int = DEFAULT_OPSET, optimize: bool = True,
                  int8_weights: str = "int8"):
    """The ONNX IR model (`onnx_ir.Model`) of `module` called as `module(*args, **kwargs)`; see `export_onnx`."""
    _require_onnx()
    from qcompile.capture import export_program

    with torch.no_grad(), _eval_mode(module):
        program = export_program(module, args, kwargs)
    nodes = _quantized_nodes(program.graph_module)
    _check_translatable(nodes, translation_table())
    if any(node.target == torch.ops.qcompile.nvfp4_linear.default or node.args[-2] == "nvfp4" for node in nodes):
        opset = max(opset, FP4_OPSET)
    translation = _Translation(opset, int8_weights=int8_weights)
    table = translation_table(translation)

    onnx_program = _run_exporter(program, table, opset)
    model = onnx_program.model
    translation.apply(model)
    if len(translation.translated) != len(nodes):
        raise OnnxExportError(
            f"{len(nodes)} quantized nodes in the graph but {len(translation.translated)} were translated to "
            "QDQ patterns; refusing to write a graph with float fallbacks"
        )
    _strip_exporter_metadata(model)
    _name_outputs(model, program)
    _name_dynamic_axes(model)
    if optimize:
        _optimize(model)
    else:
        import onnx_ir.passes.common as passes

        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    _dedicate_qdq_pairs(model)
    _keep_gelu_bias_apart(model)
    return model


def translation_table(translation: _Translation | None = None, opset: int = DEFAULT_OPSET) -> dict:
    """The `custom_translation_table` for `torch.onnx.export`: one onnxscript function per `qcompile::` op.

    The functions wire weights to the stored `qcompile` buffers; `translation.apply(model)` must then run on the
    exported model to give those initializers their ONNX types and layout (`to_onnx_model` does both).
    """
    t = translation if translation is not None else _Translation(opset)
    ops = torch.ops.qcompile

    def qcompile_int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
        return t.linear("int8", x, (weight, weight_scale), {}, bias, input_scale, input_format, input_granularity)

    def qcompile_fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
        return t.linear("fp8", x, (weight, weight_scale), {"block_size": block_size}, bias, input_scale,
                        input_format, input_granularity)

    def qcompile_int4_linear(x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale,
                             input_format, input_granularity):
        params = {"group_size": group_size, "bits": bits, "in_features": in_features}
        return t.linear("int4", x, (packed, scale, zero_point), params, bias, input_scale, input_format,
                        input_granularity)

    def qcompile_nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format,
                              input_granularity):
        return t.linear("nvfp4", x, (packed, block_scale, global_scale), {"in_features": in_features}, bias,
                        input_scale, input_format, input_granularity)

    return {
        ops.int8_linear.default: qcompile_int8_linear,
        ops.fp8_linear.default: qcompile_fp8_linear,
        ops.int4_linear.default: qcompile_int4_linear,
        ops.nvfp4_linear.default: qcompile_nvfp4_linear,
    }


def onnxruntime_session(
    path: str | os.PathLike,
    *,
    threads: int | None = None,
    optimized_model_filepath: str | os.PathLike | None = None,
    int4_accuracy_level: int = INT4_ACCURACY_EXACT,
    providers: tuple[str, ...] = ("CPUExecutionProvider",),
):
    """An `onnxruntime.InferenceSession` for an exported model, with the settings the export is meant for.

    ONNX Runtime fuses `DequantizeLinear(block_size) → MatMul` into `MatMulNBits` with the accuracy level of the
    session option `session.qdq_matmulnbits_accuracy_level`, which defaults to 4 (int8 activations, not exact).
    This helper keeps it exact (`INT4_ACCURACY_EXACT`, float32 compute) unless asked otherwise.

    It also sets `session.x64quantprecision`: on x86 CPUs without VNNI, ONNX Runtime's u8×s8 kernels add pairs of
    products in saturating int16, and INT8 layers come out wrong (relative error 0.1-0.4 on the tiny test models,
    AMD EPYC with AVX2); the option switches those CPUs, and only those, to its exact u8×u8 kernels. Other
    runtimes of these files on such CPUs need their equivalent setting.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(int(int4_accuracy_level)))
    options.add_session_config_entry("session.x64quantprecision", "1")
    if optimized_model_filepath is not None:
        options.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(str(path), options, providers=list(providers))


def optimized_op_types(path: str | os.PathLike, **session_kwargs) -> list[str]:
    """The op types of the graph ONNX Runtime actually runs for `path` (its optimized model), in order."""
    import onnx

    with tempfile.TemporaryDirectory() as folder:
        optimized = Path(folder) / "optimized.onnx"
        onnxruntime_session(path, optimized_model_filepath=optimized, **session_kwargs)
        graph = onnx.load(str(optimized), load_external_data=False).graph
        return [node.op_type for node in graph.node]


# ------------------------------------------------------------------------------------------- translation


@dataclass
class _Rewrite:
    """Replace input `index` of `node` (a stored qcompile buffer) by `convert(buffer)`, an ONNX-typed tensor."""

    node: Any  # onnx_ir.Node
    index: int
    convert: Callable[[torch.Tensor], Any]
    suffix: str


@dataclass
class _Translation:
    """State of one export: the onnxscript opset and the weight rewrites the traced functions recorded."""

    opset_version: int
    int8_weights: str = "int8"  # see export_onnx
    rewrites: list[_Rewrite] = field(default_factory=list)
    translated: list[str] = field(default_factory=list)

    def __post_init__(self):
        import onnxscript

        self.op = getattr(onnxscript, f"opset{min(self.opset_version, 23)}")

    # -- helpers for traced code ---------------------------------------------------------------------------
    def const(self, value, dtype: str = "float32"):
        import numpy as np
        import onnx_ir as ir

        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=dtype)))

    def const_ints(self, values):
        return self.op.Constant(value_ints=list(values))

    def fp8_zero(self):
        import ml_dtypes
        import numpy as np
        import onnx_ir as ir

        return self.op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))

    def rewrite(self, output, index: int, convert, suffix: str):
        self.rewrites.append(_Rewrite(output.producer(), index, convert, suffix))

    # -- one quantized linear --------------------------------------------------------------------------------
    def linear(self, family, x, weight_values, params, bias, input_scale, input_format, input_granularity):
        import onnx_ir as ir

        op = self.op
        out_dtype = x.dtype
        if out_dtype != ir.DataType.FLOAT:
            x = op.Cast(x, to=ir.DataType.FLOAT)
        # ONNX Runtime turns a 2-D MatMul + Add into Gemm before its QDQ fusions, and has no integer kernel for
        # DQ → Gemm: a 2-D int8 activation gets a leading unit axis so the product stays a MatMul.
        lifted = input_format == "int8" and x.shape is not None and len(x.shape) == 2
        if lifted:
            x = op.Unsqueeze(x, self.const_ints([0]))
        w = self.weight(family, weight_values, params)
        xq, token_scale = self.quantize_input(x, input_format, input_granularity, input_scale)
        y = op.MatMul(xq, w)
        if token_scale is not None:
            y = op.Mul(y, token_scale)
        if bias is not None:
            if bias.dtype != ir.DataType.FLOAT:
                bias = op.Cast(bias, to=ir.DataType.FLOAT)
            y = op.Add(y, bias)
        if lifted:
            y = op.Squeeze(y, self.const_ints([0]))
        if out_dtype != ir.DataType.FLOAT:
            y = op.Cast(y, to=out_dtype)
        self.translated.append(family)
        return y

    def weight(self, family, values, params):
        """The dequantized `[K, N]` weight: DequantizeLinear on initializers that `apply` re-lays out."""
        op = self.op
        if family == "int8":
            weight, scale = values
            if self.int8_weights == "uint8":
                # the zero point (128, shaped like the scale) is written in place of a second use of the scale
                w = op.DequantizeLinear(weight, scale, scale, axis=1)
                self.rewrite(w, 0, _uint8_weight, "onnx_uint8")
                self.rewrite(w, 2, _uint8_zero_point, "onnx_zero_point")
            else:
                w = op.DequantizeLinear(weight, scale, axis=1)
                self.rewrite(w, 0, _int8_weight, "onnx_int8")
            self.rewrite(w, 1, _channel_scale, "onnx_scale")
            return w
        if family == "fp8":
            weight, scale = values
            block = int(params["block_size"] or 0)
            if block > 0:
                n = weight.shape[0]
                w = op.DequantizeLinear(weight, scale, axis=0, block_size=block)
                self.rewrite(w, 1, lambda s, n=n, b=block: _fp8_block_scale(s, b, n), "onnx_scale")
            else:
                w = op.DequantizeLinear(weight, scale, axis=1)
                self.rewrite(w, 1, _channel_scale, "onnx_scale")
            self.rewrite(w, 0, _fp8_weight, "onnx_fp8")
            return w
        if family == "int4":
            packed, scale, zero_point = values
            k, g = int(params["in_features"]), int(params["group_size"])
            symmetric = zero_point is None
            inputs = (packed, scale) if symmetric else (packed, scale, zero_point)
            w = op.DequantizeLinear(*inputs, axis=0, block_size=g)
            self.rewrite(w, 0, lambda p, k=k, s=symmetric: _int4_weight(p, k, s), "onnx_int4")
            self.rewrite(w, 1, lambda s, k=k, g=g: _group_scale(s, k, g), "onnx_scale")
            if not symmetric:
                self.rewrite(w, 2, lambda z, k=k, g=g: _int4_zero_point(z, k, g), "onnx_zero_point")
            return w
        if family == "nvfp4":
            packed, block_scale, global_scale = values
            k = int(params["in_features"])
            scale = op.DequantizeLinear(block_scale, global_scale)
            self.rewrite(scale, 0, lambda s, k=k: _fp8_group_scale(s, k, _NVFP4_BLOCK), "onnx_block_scale")
            w = op.DequantizeLinear(packed, scale, axis=0, block_size=_NVFP4_BLOCK)
            self.rewrite(w, 0, lambda p, k=k: _fp4_weight(p, k), "onnx_fp4")
            return w
        raise UntranslatableOpError(f"no ONNX weight pattern for the {family!r} family")

    def quantize_input(self, x, fmt, granularity, scale):
        """(activation as the integer/fp8/fp4 kernel sees it, per-token scale to apply after the product or None)."""
        import onnx_ir as ir

        op = self.op
        if fmt == "none":
            return x, None
        if fmt in ("int8", "fp8_e4m3"):
            # INT8 codes travel as uint8 at zero point 128 (the same integers, shifted): ONNX Runtime's x86 integer
            # kernels multiply u8 activations by s8 weights natively (VNNI) and take a slower path for s8 × s8
            zero = self.const(128, "uint8") if fmt == "int8" else self.fp8_zero()
            qmax = _INT8_MAX if fmt == "int8" else _FP8_MAX
            if scale is not None:  # static scale from calibration
                if fmt == "int8":
                    # the reference clamps to ±127 (−128 unused); QuantizeLinear alone would saturate at −128
                    limit = op.Mul(scale, self.const(qmax))
                    x = op.Clip(x, op.Neg(limit), limit)
                q = op.QuantizeLinear(x, scale, zero)
                return op.DequantizeLinear(q, scale, zero), None
            # amax = max(max(x), -min(x)): two reads of x and no |x| temporary
            if granularity == "token":
                axes = self.const_ints([-1])
                largest, smallest = op.ReduceMax(x, axes, keepdims=1), op.ReduceMin(x, axes, keepdims=1)
            elif granularity == "tensor":
                largest, smallest = op.ReduceMax(x, keepdims=0), op.ReduceMin(x, keepdims=0)
            else:
                raise UntranslatableOpError(f"dynamic {fmt} activations per {granularity!r} have no ONNX pattern")
            if fmt == "int8":
                # The reference replaces a zero scale by 1. A floor under amax of 127 · 2^-126 (exact in float32,
                # and divided by 127 exactly 2^-126, the smallest normal float) does the same for all-zero rows
                # (codes 0) inside the Max that forms amax, where Where needs two more nodes; the scale stays
                # positive where denormals are flushed, and only rows whose |x| < 127 · 2^-126 move (outputs below
                # about 1e-36)
                amax = op.Max(largest, op.Neg(smallest), self.const(qmax * _SMALLEST_NORMAL))
                s = op.Div(amax, self.const(qmax))
            else:
                s = op.Div(op.Max(largest, op.Neg(smallest)), self.const(qmax))
                s = op.Where(op.Equal(s, self.const(0.0)), self.const(1.0), s)
            one = self.const(1.0)
            if granularity == "token" and fmt == "int8" and x.shape is not None and isinstance(x.shape[-1], int):
                zp = op.Expand(zero, op.Shape(s))
                q = op.QuantizeLinear(x, s, zp, axis=-1, block_size=int(x.shape[-1]))
            else:
                q = op.QuantizeLinear(op.Div(x, s), one, zero)
            return op.DequantizeLinear(q, one, zero), s
        if fmt == "nvfp4":
            return self.quantize_nvfp4_input(x, scale), None
        raise UntranslatableOpError(f"activation format {fmt!r} has no ONNX pattern")

    def quantize_nvfp4_input(self, x, global_scale):
        """NVFP4 activations: FP8 block scales computed per call, chained DQ with the FP32 global scale."""
        import onnx_ir as ir

        op = self.op
        k = _static_dim(x.shape[-1]) if x.shape is not None else None
        if k is None:
            raise UntranslatableOpError("NVFP4 activations need a static last dimension")
        groups = -(-k // _NVFP4_BLOCK)
        padded = x
        if groups * _NVFP4_BLOCK != k:
            rank = len(x.shape)
            pads = [0] * (2 * rank)
            pads[2 * rank - 1] = groups * _NVFP4_BLOCK - k
            padded = op.Pad(x, self.const_ints(pads))
        blocks = op.Reshape(padded, self.const_ints([-1, groups, _NVFP4_BLOCK]))
        amax = op.ReduceMax(op.Abs(blocks), self.const_ints([-1]), keepdims=0)
        if global_scale is None:  # dynamic global scale: amax of the whole tensor
            gs = op.Div(op.ReduceMax(op.Abs(x), keepdims=0), self.const(_E2M1_MAX * _FP8_MAX))
            global_scale = op.Where(op.Equal(gs, self.const(0.0)), self.const(1.0), gs)
        s = op.Div(amax, op.Mul(global_scale, self.const(_E2M1_MAX)))
        s = op.Where(op.Equal(s, self.const(0.0)), self.const(1.0), s)
        s = op.Min(s, self.const(_FP8_MAX))
        block_scale = op.QuantizeLinear(s, self.const(1.0), self.fp8_zero())
        scale = op.DequantizeLinear(block_scale, global_scale)
        lead = op.Shape(x, end=-1)
        scale = op.Reshape(scale, op.Concat(lead, self.const_ints([groups]), axis=0))
        q = op.QuantizeLinear(x, scale, axis=-1, block_size=_NVFP4_BLOCK, output_dtype=ir.DataType.FLOAT4E2M1)
        return op.DequantizeLinear(q, scale, axis=-1, block_size=_NVFP4_BLOCK)

    # -- after export: give the recorded initializers their ONNX types -------------------------------------
    def apply(self, model) -> None:
        """Swap each recorded buffer for its ONNX-typed, `[K, N]`-laid-out tensor (under the buffer's own name)."""
        graph = model.graph
        converted: dict[tuple[int, str], Any] = {}
        for rewrite in self.rewrites:
            old = rewrite.node.inputs[rewrite.index]
            if old is None or old.const_value is None or not old.is_initializer():
                raise OnnxExportError(
                    f"input {rewrite.index} of {rewrite.node.op_type} node {rewrite.node.name!r} is not a stored "
                    "tensor; quantized weights must be constants of the graph"
                )
            key = (id(old), rewrite.suffix)
            new = converted.get(key)
            register = new is None
            if register:
                tensor = rewrite.convert(_as_torch(old.const_value))
                shared = len(old.uses()) > 1
                name = f"{old.name}__{rewrite.suffix}" if shared else old.name
                new = _initializer_value(tensor, name)
                converted[key] = new
            rewrite.node.replace_input_with(rewrite.index, new)
            if not old.uses() and graph.initializers.get(old.name) is old:
                del graph.initializers[old.name]
            if register:
                graph.register_initializer(new)
        self.rewrites.clear()


# ------------------------------------------------------------------------------------- weight conversions


def _as_torch(tensor) -> torch.Tensor:
    import numpy as np

    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        return raw.detach().cpu()
    return torch.from_numpy(np.array(tensor.numpy()))


def _initializer_value(tensor, name: str):
    import onnx_ir as ir

    return ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _int8_weight(w: torch.Tensor):
    import onnx_ir as ir

    return ir.tensor(w.t().contiguous().numpy())


def _uint8_weight(w: torch.Tensor):
    """INT8 codes as uint8 at zero point 128 (the same integers), `[K, N]`."""
    import onnx_ir as ir

    return ir.tensor((w.t().to(torch.int16) + 128).to(torch.uint8).contiguous().numpy())


def _uint8_zero_point(s: torch.Tensor):
    """128 in uint8, shaped like `_channel_scale(s)`."""
    import onnx_ir as ir

    shape = () if s.numel() == 1 else (s.numel(),)
    return ir.tensor(torch.full(shape, 128, dtype=torch.uint8).numpy())


def _channel_scale(s: torch.Tensor):
    """Per-tensor scales stay scalars; per-channel `[N, 1]` scales become `[N]` (axis 1 of the `[K, N]` weight)."""
    import onnx_ir as ir

    s = s.float()
    if s.numel() == 1:
        return ir.tensor(s.reshape(()).numpy())
    return ir.tensor(s.reshape(-1).contiguous().numpy())


def _fp8_weight(w: torch.Tensor):
    import ml_dtypes
    import onnx_ir as ir

    return ir.tensor(w.t().contiguous().view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))


def _fp8_block_scale(s: torch.Tensor, block: int, n: int):
    """`[ceil(N/b), ceil(K/b)]` tile scales as `[ceil(K/b), N]` block scales along K (each repeated over its rows)."""
    import onnx_ir as ir

    expanded = s.float().t().repeat_interleave(block, dim=1)[:, :n]
    return ir.tensor(expanded.contiguous().numpy())


def _pack_flat(codes: torch.Tensor):
    """4-bit codes of a tensor packed in ONNX order: flattened row-major, element 2i in the low nibble."""
    flat = codes.reshape(-1).to(torch.uint8) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).numpy()


def _codes_kn(packed: torch.Tensor, k: int) -> torch.Tensor:
    from qcompile.numerics import unpack_nibbles

    return unpack_nibbles(packed)[:, :k].t().contiguous()


def _int4_weight(packed: torch.Tensor, k: int, symmetric: bool):
    import onnx_ir as ir

    codes = _codes_kn(packed, k)
    dtype = ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    return ir.PackedTensor(_pack_flat(codes), dtype, shape=ir.Shape(list(codes.shape)))


def _group_scale(s: torch.Tensor, k: int, group: int):
    import onnx_ir as ir

    return ir.tensor(s.float().t()[: -(-k // group)].contiguous().numpy())


def _int4_zero_point(z: torch.Tensor, k: int, group: int):
    import onnx_ir as ir

    z = z.t()[: -(-k // group)].contiguous()
    return ir.PackedTensor(_pack_flat(z), ir.DataType.UINT4, shape=ir.Shape(list(z.shape)))


def _fp8_group_scale(s: torch.Tensor, k: int, group: int):
    import ml_dtypes
    import onnx_ir as ir

    s = s.t()[: -(-k // group)].contiguous()
    return ir.tensor(s.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn))


def _fp4_weight(packed: torch.Tensor, k: int):
    import onnx_ir as ir

    codes = _codes_kn(packed, k)  # E2M1 codes are the FLOAT4E2M1 bit patterns
    return ir.PackedTensor(_pack_flat(codes), ir.DataType.FLOAT4E2M1, shape=ir.Shape(list(codes.shape)))


# ------------------------------------------------------------------------------------------- the export run


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript", "onnx_ir") if _find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'qcompile[onnx]'"
        )


def _find_spec(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def _example_call(model, example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if example_inputs is not None or example_kwargs is not None:
        if example_inputs is None:
            args = ()
        elif isinstance(example_inputs, tuple):
            args = example_inputs
        else:
            args = (example_inputs,)
        return args, dict(example_kwargs or {})
    example = getattr(model, "_example", None)
    if example is None:
        raise ValueError("pass example_inputs=(...) or example_kwargs={...}: this model carries no example call")
    args, kwargs = example
    return tuple(args), dict(kwargs)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Export in eval mode; modules unlifted from an ExportedProgram are already inference graphs (and refuse
    `eval()`)."""
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        module.train(was_training)


def _quantized_nodes(gm) -> list:
    return [
        node for node in gm.graph.nodes
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        and node.target.namespace == _QCOMPILE_NAMESPACE
    ]


def _layer_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1][0]
        return re.sub(r"^L\['self'\]\.?", "", str(path)) or "<root>"
    return "?"


def _check_translatable(nodes: list, table: dict) -> None:
    """Every qcompile op must have a translation; activation formats are checked here, before any tracing."""
    supported_inputs = {"none", "int8", "fp8_e4m3", "nvfp4"}
    for node in nodes:
        where = f"node {node.name!r} ({node.target}, layer {_layer_of(node)!r})"
        if node.target not in table:
            raise UntranslatableOpError(f"{where} has no ONNX translation")
        input_scale, fmt, granularity = node.args[-3], node.args[-2], node.args[-1]
        if fmt not in supported_inputs:
            raise UntranslatableOpError(f"{where}: activation format {fmt!r} has no ONNX pattern")
        if fmt in ("int8", "fp8_e4m3") and input_scale is None and granularity not in ("token", "tensor"):
            raise UntranslatableOpError(f"{where}: dynamic {fmt} activations per {granularity!r} have no ONNX pattern")


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs warnings about optional packages (torchvision) and prints progress; keep exports quiet."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _run_exporter(program, table: dict, opset: int):
    try:
        with _quiet_exporter():
            return torch.onnx.export(
                program,
                (),
                dynamo=True,
                custom_translation_table=table,
                opset_version=opset,
                optimize=False,
                verbose=False,
                report=False,
            )
    except UntranslatableOpError:
        raise
    except Exception as error:
        chain, cause = [], error
        while cause is not None and len(chain) < 20:
            chain.append(cause)
            if isinstance(cause, UntranslatableOpError):
                raise cause from error
            cause = cause.__cause__ or cause.__context__
        text = "\n".join(str(item) for item in chain)
        match = re.search(r"translating node %(\S+) : .*?target=([\w.:]+)", text)
        if match:
            reason = next((str(c) for c in chain if type(c).__name__ == "DispatchError"), str(chain[-1]))
            raise UntranslatableOpError(
                f"node {match.group(1)!r} ({match.group(2)}) has no ONNX translation: {reason.splitlines()[0]}"
            ) from error
        raise OnnxExportError(f"torch.onnx.export failed: {str(chain[-1]).splitlines()[0] if chain else error}") from error


def _strip_exporter_metadata(model) -> None:
    """Drop the exporter's per-node stack traces and FX dumps: they hold local paths and make files differ."""
    model.graph.metadata_props.clear()
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
        node.doc_string = None
        for value in node.outputs:
            value.metadata_props.clear()
    for value in [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]:
        value.metadata_props.clear()


def _output_names(program) -> list[str] | None:
    spec = program.call_spec.out_spec
    if spec is None:
        return None
    try:
        leaves = list(range(spec.num_leaves))
        structure = pytree.tree_unflatten(leaves, spec)
        with_paths, _ = pytree.tree_flatten_with_path(structure)
    except Exception:
        return None
    names = []
    for path, _ in with_paths:
        parts = []
        for entry in path:
            for attribute in ("key", "name", "idx"):
                if hasattr(entry, attribute):
                    parts.append(str(getattr(entry, attribute)))
                    break
        names.append("_".join(parts) if parts else "output")
    return names


def _name_outputs(model, program) -> None:
    names = _output_names(program)
    outputs = list(model.graph.outputs)
    if not names or len(names) != len(outputs):
        return
    if len(names) == 1 and names[0].isdigit():
        names = ["output"]
    names = [name if not name.isdigit() else f"output_{name}" for name in names]
    if len(set(names)) != len(names):
        return
    taken = {value.name for value in model.graph.inputs} | set(model.graph.initializers)
    taken |= {value.name for node in model.graph.all_nodes() for value in node.outputs if value not in outputs}
    for value, name in zip(outputs, names):
        if name in taken or value in model.graph.inputs or value.is_initializer():
            continue
        value.name = name


def _static_dim(dim) -> int | None:
    """A dimension's size when it is fixed: an int, or a symbol that torch specialized to a number ("40")."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", None)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _name_dynamic_axes(model) -> None:
    """Fixed sizes become numbers; the first input's leading dynamic dimensions are called `batch` and
    `sequence` everywhere in the graph (other inputs' own dynamic axes: `<input>_batch`, `<input>_sequence`)."""
    import onnx_ir as ir

    renames: dict[str, str] = {}
    for index, graph_input in enumerate(model.graph.inputs):
        if graph_input.shape is None:
            continue
        dynamic = [dim for dim in graph_input.shape if _static_dim(dim) is None]
        for dim, axis in zip(dynamic, ("batch", "sequence")):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None and dim.value not in renames:
                # another input's axis that torch could not prove equal (e.g. a broadcastable mask) keeps its own name
                renames[dim.value] = axis if index == 0 else f"{graph_input.name}_{axis}"
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, renames)) + r")\b") if renames else None

    def rename(value) -> None:
        if value is None or value.shape is None:
            return
        dims = []
        changed = False
        for dim in value.shape:
            size = _static_dim(dim)
            if size is not None:
                changed |= not isinstance(dim, int)
                dims.append(size)
            elif isinstance(dim, ir.SymbolicDim) and dim.value is not None and pattern is not None:
                new = pattern.sub(lambda m: renames[m.group(1)], dim.value)
                changed |= new != dim.value
                dims.append(new)
            else:
                dims.append(dim)
        if changed:
            value.shape = ir.Shape(dims)

    for value in [*model.graph.inputs, *model.graph.outputs]:
        rename(value)
    for node in model.graph.all_nodes():
        for value in node.outputs:
            rename(value)


def _optimize(model) -> None:
    """Fold constants (QuantizeLinear/DequantizeLinear are never folded), lift them to initializers, merge repeats.

    Initializers are deliberately not deduplicated: equal scales of different layers stay separate tensors, so
    each layer keeps its own Q/DQ pair (see `_dedicate_qdq_pairs`).
    """
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    onnxscript.optimizer.fold_constants(model)
    for step in (
        passes.RemoveUnusedNodesPass(),
        passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        passes.CommonSubexpressionEliminationPass(),
        passes.RemoveUnusedNodesPass(),
        passes.RemoveUnusedOpsetsPass(),
    ):
        step(model)


def _dedicate_qdq_pairs(model) -> None:
    """Give every QuantizeLinear → DequantizeLinear edge its own Q node and its own scale / zero-point tensors.

    ONNX Runtime fuses `DQ → MatMul` into an integer kernel only when the activation's Q feeds that one DQ;
    a Q shared by the q/k/v (or gate/up) projections of one input would leave all of them in float. Its common
    subexpression elimination merges Q nodes whose inputs are the same tensors, so each pair also gets private
    copies of its (scalar) scale and zero point.
    """
    import onnx_ir as ir

    graph = model.graph
    counter = 0
    for q in list(graph):
        if q.op_type != "QuantizeLinear" or q.domain not in ("", "ai.onnx"):
            continue
        uses = [(use.node, use.idx) for use in q.outputs[0].uses()]
        if not uses or any(node.op_type != "DequantizeLinear" or idx != 0 for node, idx in uses):
            continue
        for i, (dq, _) in enumerate(uses):
            pair_q = q
            if i > 0:
                pair_q = ir.Node(
                    q.domain, q.op_type, list(q.inputs), attributes=list(q.attributes.values()),
                    name=f"{q.name}__{i}", num_outputs=1, version=q.version,
                )
                pair_q.outputs[0].name = f"{q.outputs[0].name}__{i}"
                pair_q.outputs[0].type = q.outputs[0].type
                pair_q.outputs[0].shape = q.outputs[0].shape
                graph.insert_after(q, pair_q)
                dq.replace_input_with(0, pair_q.outputs[0])
            for slot, suffix in ((1, "scale"), (2, "zero_point")):
                if slot >= len(pair_q.inputs):
                    continue
                shared = pair_q.inputs[slot]
                if shared is None or not shared.is_initializer() or shared.const_value is None:
                    continue
                private_users = {(pair_q, slot), (dq, slot)}
                if all((use.node, use.idx) in private_users for use in shared.uses()):
                    continue
                counter += 1
                copy = ir.Value(
                    name=f"{dq.name}_{suffix}", shape=shared.shape, type=shared.type, const_value=shared.const_value
                )
                while copy.name in graph.initializers:
                    copy.name = f"{copy.name}_{counter}"
                graph.register_initializer(copy)
                pair_q.replace_input_with(slot, copy)
                if slot < len(dq.inputs) and dq.inputs[slot] is shared:
                    dq.replace_input_with(slot, copy)


def _keep_gelu_bias_apart(model) -> None:
    """Give the bias added just before a Gelu a leading unit axis (`[N]` -> `[1, N]`, the same broadcast).

    ONNX Runtime fuses `Add(x, 1-D bias) -> Gelu` into its BiasGelu kernel, which on the CPU took 2.4x as long as
    its Gelu plus a separate Add (MiniLM int8_dynamic, 2 threads: 5.4 ms against 2.2 + 1.2 for the six FFN layers);
    it leaves a 2-D bias alone.
    """
    import onnx_ir as ir

    for add in list(model.graph):
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        if not any(use.node.op_type == "Gelu" for use in add.outputs[0].uses()):
            continue
        for slot, bias in enumerate(add.inputs):
            value = None if bias is None else bias.const_value
            if value is None or not bias.is_initializer() or bias.shape is None or len(bias.shape) != 1:
                continue
            if any(use.node is not add for use in bias.uses()):
                continue  # shared: another node reads it as 1-D
            bias.const_value = ir.tensor(value.numpy().reshape(1, -1), name=bias.name)
            bias.shape = ir.Shape([1, bias.shape[0]])


def _set_model_metadata(model, source) -> None:
    import qcompile

    model.producer_name = "qcompile"
    model.producer_version = qcompile.__version__
    recipe = getattr(source, "recipe", None)
    if recipe is not None:
        model.metadata_props["qcompile.recipe"] = recipe.name
        model.metadata_props["qcompile.algorithm"] = str(getattr(source, "algorithm", recipe.algorithm))
        model.metadata_props["qcompile.quantized_layers"] = str(len(getattr(source, "layers", ())))


def _save(model, path: Path, data_name: str | None) -> None:
    import onnx_ir as ir

    if data_name is None:
        ir.save(model, path)
    else:
        ir.save(model, path, external_data=data_name)
