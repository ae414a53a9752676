"""The TensorRT target: explicit quantization as TensorRT 10's ONNX parser reads it (see docs/onnx.md).

Every quantized linear becomes the Q/DQ pattern that NVIDIA Model Optimizer's ONNX exporter writes and TensorRT
fuses into a quantized GEMM, in the compute dtype (float16 or bfloat16) around it:

| qcompile op, activation | pattern |
|---|---|
| int8, static per-tensor input | `Clip → Q(s, INT8) → DQ → MatMul ← DQ(W INT8 [K, N], per-channel, axis=1)` |
| fp8 (tensor/channel/block weights), static per-tensor input | `Q(s, FLOAT8E4M3FN) → DQ → MatMul ← DQ(W FLOAT8E4M3FN [K, N])` |
| int4/int3 symmetric groups | `MatMul ← DQ(W INT4 [K, N], block_size=g, axis=0)` |
| nvfp4 weights | `MatMul ← Transpose ← DQ(W FLOAT4E2M1 [N, K], DQ(block scale FP8, FP32 global), axis=-1, block_size=16)` |
| nvfp4 inputs | `trt::TRT_FP4DynamicQuantize(x, global) → (FP4, FP8 scales)`; `DQ(FP4, DQ(FP8 scales, global), axis=-1, 16)` |

No zero point is ever written (symmetric, TensorRT's only kind): QuantizeLinear says its type with `output_dtype`.
The translation computes in the model's own float dtype; `precision.retype_floats` then moves the graph to the
compute dtype, leaving the tensors recorded in `keep_float32` (the NVFP4 global scales and block-scale chain, and
at opset >= 23 the weight scales, whose DequantizeLinear writes the compute dtype through `output_dtype`) in FP32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qcompile.ops import op_arguments

from .errors import UntranslatableOpError
from .graph_cleanup import _static_dim
from .translate import _INT8_MAX, _NVFP4_BLOCK, _Translation
from .weights import (
    _channel_scale,
    _fp4_weight_nk,
    _fp8_block_scale,
    _fp8_block_scale_nk,
    _fp8_weight,
    _group_scale,
    _int4_weight,
    _int8_weight,
)

TRT_DOMAIN = "trt"
FP4_DYNAMIC_QUANTIZE = "TRT_FP4DynamicQuantize"
MAX_OPSET = 24  # the newest opset the TensorRT target writes
OUTPUT_DTYPE_OPSET = 23  # DequantizeLinear gains `output_dtype`: weight scales stay FP32 from here on
_FLOAT8E4M3FN = 17  # TensorProto.FLOAT8E4M3FN, TRT_FP4DynamicQuantize's scale_type

# The forms that export to TensorRT, named in the errors for the ones that do not.
TENSORRT_RECIPES = ("int8_sq and fp8 (static per-tensor activations), w4a8_awq, weight-only int4_awq / int4_gptq, "
                    "fp8_block and nvfp4_weight_only, and nvfp4")


def register_schemas() -> None:
    """Register the schema of `trt::TRT_FP4DynamicQuantize` with ONNX (once per process, unless something else
    registered it): onnxscript needs it to trace the node, and `onnx.checker` then checks its attributes and types.

    Inputs: the activation (float16/bfloat16/float32) and the double-quantization (global) scale, a float32 or
    input-typed build-time-constant scalar; attributes `axis`, `block_size`, `scale_type`; outputs: the FP4 data
    (same shape as the input) and the FP8 block scales (the input's shape with the blocked axis divided by the
    block size). Output shapes are set on the graph by the exporter (a Python schema has no shape inference).
    """
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(FP4_DYNAMIC_QUANTIZE, TRT_DOMAIN):
        return
    floats = ["tensor(float16)", "tensor(bfloat16)", "tensor(float)"]
    schema = OpSchema(
        FP4_DYNAMIC_QUANTIZE, TRT_DOMAIN, 1,
        doc="TensorRT's dynamic block quantization to NVFP4 (IDynamicQuantizeLayer): per block of `block_size` "
            "elements along `axis`, scale = amax / 6 quantized to `scale_type` by the double-quantization scale; "
            "data = FP4(x / (scale * double_quant_scale)).",
        inputs=[OpSchema.FormalParameter("input", "T1"), OpSchema.FormalParameter("double_quant_scale", "T2")],
        outputs=[OpSchema.FormalParameter("output_data", "T3"), OpSchema.FormalParameter("output_scale", "T4")],
        type_constraints=[("T1", floats, "the activation"), ("T2", floats, "the double-quantization scale"),
                          ("T3", ["tensor(float4e2m1)"], "FP4 data"), ("T4", ["tensor(float8e4m3fn)"], "FP8 scales")],
        attributes=[OpSchema.Attribute("axis", OpSchema.AttrType.INT, "the blocked axis (last or second to last)"),
                    OpSchema.Attribute("block_size", OpSchema.AttrType.INT, "elements per block (16)"),
                    OpSchema.Attribute("scale_type", OpSchema.AttrType.INT, "type of the block scales (FLOAT8E4M3FN)")],
    )
    onnx.defs.register_schema(schema)


def check_tensorrt(nodes: list, recipe: str | None, where_of) -> None:
    """Refuse, naming the node, what TensorRT's explicit quantization cannot express (before any tracing)."""
    from_recipe = f" (recipe {recipe!r})" if recipe else ""
    for node in nodes:
        args = op_arguments(node)
        where = where_of(node)
        fmt, granularity = args.get("input_format"), args.get("input_granularity")
        if fmt in ("int8", "fp8_e4m3") and args.get("input_scale") is None:
            raise UntranslatableOpError(
                f"{where}{from_recipe}: {fmt} activations with a scale computed on every call (per {granularity}) "
                "have no TensorRT form: TensorRT's QuantizeLinear takes only a build-time constant scale, and its "
                "dynamic quantization (TRT_FP4DynamicQuantize, IDynamicQuantizeLayer) makes NVFP4 blocks of 16 "
                f"(and MXFP8 blocks of 32) only. Recipes that export with target='tensorrt': {TENSORRT_RECIPES}")
        if fmt == "nvfp4" and args.get("input_scale") is None:
            raise UntranslatableOpError(
                f"{where}{from_recipe}: NVFP4 activations with a global scale computed on every call have no "
                "TensorRT form: TRT_FP4DynamicQuantize's double-quantization scale must be a build-time constant "
                "(calibrate a static global scale, as the nvfp4 recipe does)")
        if node.target == torch.ops.qcompile.int4_linear.default and args.get("zero_point") is not None:
            raise UntranslatableOpError(
                f"{where}{from_recipe}: asymmetric INT4 groups (a zero point per group) have no TensorRT form: "
                "TensorRT's DequantizeLinear takes zero points of 0 only (symmetric quantization); quantize the "
                "weights with symmetric groups (the int4_awq / int4_gptq default)")


@dataclass
class _TensorRTTranslation(_Translation):
    """The translation for `target="tensorrt"`; see the module docstring."""

    compute: Any = None  # onnx_ir.DataType the translated subgraphs compute in: the model's own float dtype
    keep_float32: list = field(default_factory=list)  # (node, "in" | "out", index): tensors that stay FP32
    fp4_nodes: list = field(default_factory=list)  # (TRT_FP4DynamicQuantize node, padded K)

    def __post_init__(self):
        import onnxscript

        super().__post_init__()
        register_schemas()
        self.trt = onnxscript.values.Opset(TRT_DOMAIN, 1)

    # -- helpers ---------------------------------------------------------------------------------------------------
    def const_c(self, value):
        """A scalar constant in the compute dtype."""
        import numpy as np
        import onnx_ir as ir

        return self.op.Constant(value=ir.tensor(np.asarray(value, dtype=self.compute.numpy())))

    def keep(self, value, kind: str, index: int) -> None:
        self.keep_float32.append((value.producer(), kind, index))

    def to_compute(self, value):
        if value is None or value.dtype == self.compute:
            return value
        return self.op.Cast(value, to=self.compute)

    def dequantize_weight(self, codes, codes_convert, scale, scale_convert, suffix: str, **attrs):
        """DequantizeLinear of a stored weight whose output is in the compute dtype: with its FP32 scale and
        `output_dtype` from opset 23 on, with the scale in the compute dtype before (the output takes the scale's
        type there)."""
        import onnx_ir as ir

        op = self.op
        if self.opset_version >= OUTPUT_DTYPE_OPSET:
            w = op.DequantizeLinear(codes, scale, output_dtype=self.compute, **attrs)
            self.keep(w, "in", 1)
            self.rewrite(w, 1, scale_convert, "onnx_scale")
        elif self.compute != ir.DataType.FLOAT:
            cast = op.Cast(scale, to=self.compute)
            w = op.DequantizeLinear(codes, cast, **attrs)
            self.rewrite(cast, 0, scale_convert, "onnx_scale")
        else:  # float32 model: the scale goes to the compute dtype with the rest of the graph
            w = op.DequantizeLinear(codes, scale, **attrs)
            self.rewrite(w, 1, scale_convert, "onnx_scale")
        self.rewrite(w, 0, codes_convert, suffix)
        return w

    # -- one quantized linear --------------------------------------------------------------------------------------
    def linear(self, family, x, weight_values, params, bias, input_scale, input_format, input_granularity):
        op = self.op
        out_dtype = x.dtype
        x = self.to_compute(x)
        k = _static_dim(x.shape[-1]) if x.shape is not None else None
        if k is None:
            raise UntranslatableOpError(f"a {family} layer needs a static last input dimension for TensorRT")
        # The K that the weight (and so the activation) is laid out with: TensorRT infers a block size as
        # dimension / scale dimension, so a partial last block is padded to a whole one (zero codes, zero inputs).
        padded_k = self.padded_k(family, params, k, input_format)
        rank = len(x.shape)
        flatten = input_format == "nvfp4" and rank not in (2, 3)  # TRT_FP4DynamicQuantize takes 2-D or 3-D input
        lead = None
        if flatten:
            lead = op.Shape(x, end=-1)
            x = op.Reshape(x, self.const_ints([-1, k]))
            rank = 2
        if padded_k != k:
            pads = [0] * (2 * rank)
            pads[2 * rank - 1] = padded_k - k
            x = op.Pad(x, self.const_ints(pads))
        w = self.weight(family, weight_values, params, padded_k)
        xq = self.quantize_input(x, input_format, input_scale, padded_k)
        y = op.MatMul(xq, w)
        if bias is not None:
            y = op.Add(y, self.to_compute(bias))
        if flatten:
            y = op.Reshape(y, op.Concat(lead, op.Shape(y, start=-1), axis=0))
        if out_dtype != self.compute:
            y = op.Cast(y, to=out_dtype)
        self.translated.append(family)
        return y

    @staticmethod
    def padded_k(family, params, k, input_format) -> int:
        if family == "nvfp4" or input_format == "nvfp4":
            return -(-k // _NVFP4_BLOCK) * _NVFP4_BLOCK
        if family == "int4":
            g = int(params["group_size"])
            groups = -(-k // g)
            return k if groups == 1 else groups * g
        if family == "fp8":
            b = int(params["block_size"] or 0)
            if b > 0 and -(-k // b) > 1:
                return -(-k // b) * b
        return k

    def weight(self, family, values, params, kp: int):
        """The dequantized weight in the compute dtype, `[Kp, N]` (NVFP4: DQ on `[N, Kp]`, then transposed)."""
        op = self.op
        if family == "int8":
            weight, scale = values
            if kp != _static_dim(weight.shape[1]):
                raise UntranslatableOpError("INT8 weights are not padded along K")
            return self.dequantize_weight(weight, _int8_weight, scale, _channel_scale, "onnx_int8", axis=1)
        if family == "fp8":
            weight, scale = values
            block = int(params["block_size"] or 0)
            codes = lambda w, kp=kp: _fp8_weight(w, kp)  # noqa: E731
            if block > 0:
                n = weight.shape[0]
                scales = lambda s, n=n, b=block: _fp8_block_scale(s, b, n)  # noqa: E731
                return self.dequantize_weight(weight, codes, scale, scales, "onnx_fp8", axis=0,
                                              block_size=min(block, kp))
            return self.dequantize_weight(weight, codes, scale, _channel_scale, "onnx_fp8", axis=1)
        if family == "int4":
            packed, scale, zero_point, fp8_scale = values
            g = int(params["group_size"])
            # one group (K <= g): the K rows as they are, in one block of K, the size TensorRT infers from the shapes
            rows = kp if kp % g == 0 else int(params["in_features"])
            w = self.dequantize_weight(
                packed, lambda p, k=rows: _int4_weight(p, k, True), scale,
                lambda s, k=rows, g=g: _group_scale(s, k, g), "onnx_int4", axis=0, block_size=min(g, rows))
            if fp8_scale is not None:  # W4A8 (docs/formats.md#w4a8): code x group scale rounded through FP8
                import onnx_ir as ir

                s = self.to_compute(fp8_scale)
                w = op.DequantizeLinear(op.QuantizeLinear(w, s, output_dtype=ir.DataType.FLOAT8E4M3FN), s)
            return w
        if family == "nvfp4":
            packed, block_scale, global_scale = values
            scale = op.DequantizeLinear(block_scale, global_scale)
            self.keep(scale, "in", 1)
            self.keep(scale, "out", 0)
            self.rewrite(scale, 0, lambda s, kp=kp: _fp8_block_scale_nk(s, kp, _NVFP4_BLOCK), "onnx_block_scale")
            w = op.DequantizeLinear(packed, scale, axis=-1, block_size=_NVFP4_BLOCK, output_dtype=self.compute)
            self.keep(w, "in", 1)
            self.rewrite(w, 0, lambda p, kp=kp: _fp4_weight_nk(p, kp), "onnx_fp4")
            return op.Transpose(w, perm=[1, 0])
        raise UntranslatableOpError(f"no TensorRT weight pattern for the {family!r} family")

    def quantize_input(self, x, fmt, scale, kp: int):
        """The activation as the quantized GEMM reads it (static scales only: `check_tensorrt` refused the rest)."""
        import onnx_ir as ir

        op = self.op
        if fmt == "none":
            return x
        if fmt in ("int8", "fp8_e4m3"):
            # QuantizeLinear takes its scale in the input's type (ONNX before opset 23; TensorRT's IQuantizeLayer)
            s = self.to_compute(scale)
            if fmt == "int8":
                # qcompile's INT8 grid is ±127; QuantizeLinear alone would give −128 below −127.5 · s
                limit = op.Mul(s, self.const_c(_INT8_MAX))
                x = op.Clip(x, op.Neg(limit), limit)
                q = op.QuantizeLinear(x, s, output_dtype=ir.DataType.INT8)
            else:
                q = op.QuantizeLinear(x, s, output_dtype=ir.DataType.FLOAT8E4M3FN)
            return op.DequantizeLinear(q, s)
        if fmt == "nvfp4":
            data, block_scales = self.trt.TRT_FP4DynamicQuantize(
                x, scale, axis=-1, block_size=_NVFP4_BLOCK, scale_type=_FLOAT8E4M3FN)
            node = data.producer()
            self.keep_float32.append((node, "in", 1))
            self.fp4_nodes.append((node, kp))
            s = op.DequantizeLinear(block_scales, scale)
            self.keep(s, "in", 1)
            self.keep(s, "out", 0)
            xq = op.DequantizeLinear(data, s, axis=-1, block_size=_NVFP4_BLOCK, output_dtype=self.compute)
            self.keep(xq, "in", 1)
            return xq
        raise UntranslatableOpError(f"activation format {fmt!r} has no TensorRT pattern")

    # -- after export --------------------------------------------------------------------------------------------
    def apply(self, model) -> None:
        """The weight rewrites, and the types and shapes of the TRT_FP4DynamicQuantize outputs (its Python schema
        has no shape inference)."""
        import onnx_ir as ir

        super().apply(model)
        for node, kp in self.fp4_nodes:
            source = node.inputs[0]
            data, scales = node.outputs
            data.type = ir.TensorType(ir.DataType.FLOAT4E2M1)
            scales.type = ir.TensorType(ir.DataType.FLOAT8E4M3FN)
            if source.shape is not None:
                dims = list(source.shape)
                data.shape = ir.Shape(dims)
                scales.shape = ir.Shape([*dims[:-1], kp // _NVFP4_BLOCK])
