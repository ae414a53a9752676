"""Translation of `qcompile::` ops to ONNX: onnxscript functions, traced by the exporter, that build each quantized
linear's QDQ pattern (see `translation_table`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import OnnxExportError, UntranslatableOpError
from .graph_cleanup import _static_dim
from .weights import (
    _as_torch,
    _channel_scale,
    _fp4_weight,
    _fp8_block_scale,
    _fp8_group_scale,
    _fp8_weight,
    _group_scale,
    _initializer_value,
    _int4_weight,
    _int4_zero_point,
    _int8_weight,
    _int8_zero_point,
    _uint8_weight,
    _uint8_zero_point,
)

DEFAULT_OPSET = 21  # DequantizeLinear with block_size (INT4 groups, FP8 blocks)
FP4_OPSET = 23  # FLOAT4E2M1
MIN_OPSET = 21

_FP8_MAX = 448.0
_SMALLEST_NORMAL = 2.0**-126  # float32
_INT8_MAX = 127.0
_E2M1_MAX = 6.0
_NVFP4_BLOCK = 16


def translation_table(translation: _Translation | None = None, opset: int = DEFAULT_OPSET) -> dict:
    """The `custom_translation_table` for `torch.onnx.export`: one onnxscript function per `qcompile::` op.

    The functions wire weights to the stored `qcompile` buffers; `translation.apply(model)` must then run on the
    exported model to give those initializers their ONNX types and layout (`to_onnx_model` does both).

    Each quantized linear becomes QuantizeLinear/DequantizeLinear around a `MatMul`, laid out the way ONNX Runtime's
    graph optimizer recognizes:

    | qcompile op, activation | ONNX pattern | ONNX Runtime CPU runs |
    |---|---|---|
    | int8, static per-tensor input | `Clip → Q(s, uint8, 128) → DQ → MatMul ← DQ(W uint8 [K,N] (codes + 128), zero point 128, per-channel, axis=1)` | `MatMulIntegerToFloat` |
    | int8, dynamic per-token input | `s = amax(x)/127 per token; Q(x/s, 1, int8) → DQ → MatMul ← DQ(W) → ·s` | `MatMulIntegerToFloat` |
    | int4/int3 weight-only | `MatMul ← DQ(W INT4/UINT4 [K,N], block_size=g, axis=0)` | `MatMulNBits` |
    | int4 with fp8 inputs (W4A8) | the INT4 DQ, then `Q/DQ(FLOAT8E4M3FN, per-tensor fp8_scale)` on the weight; inputs as fp8 | Q/DQ + float `MatMul` |
    | fp8 (any scale layout) | `MatMul ← DQ(W FLOAT8E4M3FN [K,N], scale)`; inputs `Q/DQ` to FLOAT8E4M3FN | Q/DQ + float `MatMul` |
    | nvfp4 | `MatMul ← DQ(W FLOAT4E2M1 [K,N], DQ(block scale FLOAT8E4M3FN, global scale), block_size=16)`; inputs likewise, block scales computed per call | (no CPU kernels; `onnx.reference`) |
    """
    t = translation if translation is not None else _Translation(opset)
    ops = torch.ops.qcompile

    def qcompile_int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
        return t.linear("int8", x, (weight, weight_scale), {}, bias, input_scale, input_format, input_granularity)

    def qcompile_fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
        return t.linear("fp8", x, (weight, weight_scale), {"block_size": block_size}, bias, input_scale,
                        input_format, input_granularity)

    def qcompile_int4_linear(x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale,
                             input_format, input_granularity, fp8_scale=None):
        params = {"group_size": group_size, "bits": bits, "in_features": in_features}
        return t.linear("int4", x, (packed, scale, zero_point, fp8_scale), params, bias, input_scale, input_format,
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


@dataclass
class _Rewrite:
    """Replace input `index` of `node` (a stored qcompile buffer) by `convert(buffer)`, an ONNX-typed tensor."""

    node: Any  # onnx_ir.Node
    index: int
    convert: Callable[[torch.Tensor], Any]
    suffix: str


@dataclass
class _Translation:
    """State of one export: the onnxscript opset and the weight rewrites the traced functions recorded.

    The translation functions run while the graph is traced, before parameters have values, so they wire
    DequantizeLinear nodes to the stored `qcompile` buffers and record how each buffer must be re-laid out; once the
    exporter has attached the tensors, `apply` swaps in the ONNX-typed initializers (see `weights`).
    """

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
            # the zero point (shaped like the scale) is written in place of a second use of the scale
            w = op.DequantizeLinear(weight, scale, scale, axis=1)
            if self.int8_weights == "uint8":
                self.rewrite(w, 0, _uint8_weight, "onnx_uint8")
                self.rewrite(w, 2, _uint8_zero_point, "onnx_zero_point")
            else:
                # An explicit int8 zero point of 0, shaped like the scale: with session.x64quantprecision, ONNX
                # Runtime rewrites int8 weights to uint8 and gives a DequantizeLinear it did not fuse (T5's ReLU
                # FFN) a scalar zero point of 128 where none was written, which its per-channel kernel then refuses
                # ("x_zero_point must be null or 1D tensor with size N"); a written one is shifted with its shape.
                self.rewrite(w, 0, _int8_weight, "onnx_int8")
                self.rewrite(w, 2, _int8_zero_point, "onnx_zero_point")
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
            packed, scale, zero_point, fp8_scale = values
            k, g = int(params["in_features"]), int(params["group_size"])
            symmetric = zero_point is None
            inputs = (packed, scale) if symmetric else (packed, scale, zero_point)
            w = op.DequantizeLinear(*inputs, axis=0, block_size=g)
            self.rewrite(w, 0, lambda p, k=k, s=symmetric: _int4_weight(p, k, s), "onnx_int4")
            self.rewrite(w, 1, lambda s, k=k, g=g: _group_scale(s, k, g), "onnx_scale")
            if not symmetric:
                self.rewrite(w, 2, lambda z, k=k, g=g: _int4_zero_point(z, k, g), "onnx_zero_point")
            if fp8_scale is not None:  # W4A8 (docs/formats.md#w4a8): code x group scale rounded through FP8
                w = op.DequantizeLinear(op.QuantizeLinear(w, fp8_scale, self.fp8_zero()), fp8_scale, self.fp8_zero())
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
        """(activation as the integer/fp8/fp4 kernel sees it, per-token scale to apply after the product or None).

        The dynamic per-token INT8 form divides each token by its own scale and quantizes with a unit scale, so the
        integer product runs in the fused `MatMulIntegerToFloat` kernel and the per-token scale is one multiply on
        the output; the numbers are exactly `qcompile.numerics` (the reference clamps to ±127, so does the graph).
        """
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
