"""The formats: one entry per format, asked by every layer instead of branching on its name.

An entry says what the format is (its grid, its scale rule, how its codes are stored: `docs/formats.md`), what it
may quantize (weights and/or activations, at which granularities), which `qcompile::` op runs its weights and with
which arguments, which kernels run that op, and the names it has in the exported formats (ONNX element types,
compressed-tensors' `QuantizationArgs`). The arithmetic itself is `qcompile.numerics`, the one reference.

Adding a format: an entry here, its functions in `numerics`, its kernels (or the reference alone), its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qcompile import numerics

# What a weight quantizer returns: the tensors the layer stores, the op's integer arguments, and the dequantized
# weight (float32, for the report's SQNR and the algorithms' searches).
QuantizedWeight = tuple[dict[str, Tensor], dict, Tensor]


@dataclass(frozen=True)
class Format:
    name: str
    element_bits: int  # bits of information per code (INT3: 3)
    storage_bits: int  # bits each code occupies as stored (INT3: a 4-bit nibble)
    # scale = amax / static_divisor for a calibrated per-tensor scale (NVFP4: the global scale, E2M1 max * FP8 max);
    # None where the format never quantizes with one (the integer group formats)
    static_divisor: float | None
    weight_granularities: tuple[str, ...]
    input_granularities: tuple[str, ...]  # empty: weights only
    op: str  # the `qcompile::` op that runs weights in this format
    weight_args: tuple[str, ...]  # that op's weight-side arguments, in order (after x, before bias)
    quantize_weight: Callable[..., QuantizedWeight] = field(repr=False)
    asymmetric: bool = False  # offers a zero point
    fixed_block: int | None = None  # the only block size the format has
    # per-tensor scales that engines fusing layers which read one input (q/k/v, gate/up) keep one of per group
    shared_tensor_scale: Callable[[str], bool] = field(default=lambda granularity: False, repr=False)
    kernels: tuple[str, ...] = ()  # device lowerings with kernels for `op` (the reference runs everywhere)
    onnx_type: str = ""  # the ONNX element type of the stored codes
    # compressed-tensors: QuantizationArgs' (type, num_bits) and the layer's storage format; None: no layout
    compressed_tensors: tuple[str, int, str] | None = None

    @property
    def integer(self) -> bool:
        return self.name.startswith("int")

    @property
    def quantizes_inputs(self) -> bool:
        return bool(self.input_granularities)


def _int8_weight(weight: Tensor, spec, model_dtype: torch.dtype, group_amax: Tensor | None,
                 through_fp8: bool = False) -> QuantizedWeight:
    scale = None if group_amax is None else numerics.nonzero_scale(numerics.exact_div(group_amax, numerics.INT8_MAX))
    t = numerics.quantize_int8(weight, spec.granularity, scale=scale)
    return {"weight": t.q, "weight_scale": t.scale}, {}, numerics.dequantize_int8(t)


def _fp8_weight(weight: Tensor, spec, model_dtype: torch.dtype, group_amax: Tensor | None,
                through_fp8: bool = False) -> QuantizedWeight:
    block = 0
    if spec.granularity == "block":
        rows, cols = spec.block_size if isinstance(spec.block_size, tuple) else (spec.block_size,) * 2
        if rows != cols:
            raise NotImplementedError("fp8 weight blocks must be square")
        block = rows
    scale = None if group_amax is None or spec.granularity != "tensor" else \
        numerics.nonzero_scale(numerics.exact_div(group_amax, numerics.FP8_E4M3_MAX))
    t = numerics.quantize_fp8(weight, spec.granularity, block_size=block or 128, scale=scale)
    return {"weight": t.q, "weight_scale": t.scale}, {"block_size": block}, numerics.dequantize_fp8(t)


def _int_group_weight(weight: Tensor, spec, model_dtype: torch.dtype, group_amax: Tensor | None,
                      through_fp8: bool = False) -> QuantizedWeight:
    # a bf16/fp16 model's engines keep group scales in its dtype: codes are computed from the rounded scales
    scale_dtype = model_dtype if model_dtype in (torch.bfloat16, torch.float16) else None
    bits = FORMATS[spec.format].element_bits
    # W4A8: the per-tensor FP8 scale from the fused group's amax (engines keep one per group), or the layer's own
    fp8_scale = (True if group_amax is None else numerics.exact_div(group_amax, numerics.FP8_E4M3_MAX)) \
        if through_fp8 else None
    t = numerics.quantize_int4(weight, spec.block_size, symmetric=spec.symmetric, bits=bits, scale_dtype=scale_dtype,
                               fp8_scale=fp8_scale)
    tensors = {"packed": t.packed, "scale": t.scale}
    if t.zero_point is not None:
        tensors["zero_point"] = t.zero_point
    if t.fp8_scale is not None:
        tensors["fp8_scale"] = t.fp8_scale
    args = {"group_size": t.group_size, "bits": t.bits, "in_features": t.in_features}
    return tensors, args, numerics.dequantize_int4(t)


def _nvfp4_weight(weight: Tensor, spec, model_dtype: torch.dtype, group_amax: Tensor | None,
                  through_fp8: bool = False) -> QuantizedWeight:
    global_scale = None if group_amax is None else \
        numerics.nonzero_scale(numerics.exact_div(group_amax, FORMATS["nvfp4"].static_divisor))
    t = numerics.quantize_nvfp4(weight, global_scale=global_scale)
    tensors = {"packed": t.packed, "block_scale": t.block_scale, "global_scale": t.global_scale}
    return tensors, {"in_features": t.in_features}, numerics.dequantize_nvfp4(t)


_INT_GROUP_ARGS = ("packed", "scale", "zero_point", "group_size", "bits", "in_features")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int8", 8, 8, numerics.INT8_MAX, ("tensor", "channel"), ("tensor", "token"),
           "int8_linear", ("weight", "weight_scale"), _int8_weight,
           shared_tensor_scale=lambda granularity: granularity == "tensor",
           kernels=("cpu", "triton"), onnx_type="INT8", compressed_tensors=("int", 8, "int-quantized")),
    Format("fp8_e4m3", 8, 8, numerics.FP8_E4M3_MAX, ("tensor", "channel", "block"), ("tensor", "token"),
           "fp8_linear", ("weight", "weight_scale", "block_size"), _fp8_weight,
           shared_tensor_scale=lambda granularity: granularity == "tensor",
           kernels=("cpu", "triton"), onnx_type="FLOAT8E4M3FN", compressed_tensors=("float", 8, "float-quantized")),
    Format("int4", 4, 4, None, ("group",), (), "int4_linear", _INT_GROUP_ARGS, _int_group_weight,
           asymmetric=True, kernels=("cpu", "triton"), onnx_type="INT4", compressed_tensors=("int", 4, "pack-quantized")),
    Format("int3", 3, 4, None, ("group",), (), "int4_linear", _INT_GROUP_ARGS, _int_group_weight,
           asymmetric=True, kernels=("cpu", "triton"), onnx_type="INT4"),
    Format("nvfp4", 4, 4, numerics.E2M1_MAX * numerics.FP8_E4M3_MAX, ("block",), ("block",),
           "nvfp4_linear", ("packed", "block_scale", "global_scale", "in_features"), _nvfp4_weight,
           fixed_block=16, shared_tensor_scale=lambda granularity: True,  # the global scale
           kernels=("cpu", "triton"), onnx_type="FLOAT4E2M1", compressed_tensors=("float", 4, "nvfp4-pack-quantized")),
)}


def weights_through_fp8(weights, inputs) -> bool:
    """Integer group weights multiplied with FP8 activations (W4A8): the FP8 GEMM takes the weight as FP8 values,
    code x group scale rounded through FP8 under a per-tensor scale (docs/formats.md#w4a8), which engines fusing
    layers that read one input keep one of per group."""
    return (inputs is not None and inputs.format == "fp8_e4m3"
            and FORMATS[weights.format].integer and FORMATS[weights.format].weight_granularities == ("group",))


def get(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; valid formats: {', '.join(FORMATS)}") from None


def linear_op(name: str):
    """The `qcompile::` op overload that runs weights in format `name`."""
    import qcompile.ops  # noqa: F401  (defines the ops)

    return getattr(torch.ops.qcompile, FORMATS[name].op).default


__all__ = ["FORMATS", "Format", "QuantizedWeight", "get", "linear_op", "weights_through_fp8"]
