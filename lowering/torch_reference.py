"""Plain-PyTorch lowering of the `qcompile::` ops: runs on every device and is the reference for every fast path.

Each op fake-quantizes its input activation as its arguments say, dequantizes the stored weight exactly as
`qcompile.numerics` defines it, and multiplies in float32; the result comes back in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile import numerics


def quantize_input(x: Tensor, fmt: str, granularity: str, scale: Tensor | None) -> Tensor:
    """The activation the integer/float8 kernel would see, dequantized to float32."""
    x = x.float()
    if fmt == "none":
        return x
    return numerics.fake_quantize(x, fmt, granularity, scale=scale).float()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    out = F.linear(x, weight, None if bias is None else bias.float())
    return out.to(out_dtype)


def dequantize_int8_weight(weight, weight_scale):
    return numerics.dequantize_int8(numerics.Int8Tensor(weight, weight_scale))


def dequantize_fp8_weight(weight, weight_scale, block_size):
    return numerics.dequantize_fp8(numerics.FP8Tensor(weight, weight_scale, block_size or None))


def dequantize_int4_weight(packed, scale, zero_point, group_size, bits, in_features, fp8_scale=None):
    return numerics.dequantize_int4(numerics.Int4Tensor(packed, scale, zero_point, group_size, bits, in_features,
                                                        fp8_scale))


def dequantize_nvfp4_weight(packed, block_scale, global_scale, in_features):
    return numerics.dequantize_nvfp4(numerics.NVFP4Tensor(packed, block_scale, global_scale, in_features))


def int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    w = dequantize_int8_weight(weight, weight_scale)
    return _linear(quantize_input(x, input_format, input_granularity, input_scale), w, bias, x.dtype)


def fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
    w = dequantize_fp8_weight(weight, weight_scale, block_size)
    return _linear(quantize_input(x, input_format, input_granularity, input_scale), w, bias, x.dtype)


def int4_linear(
    x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
    fp8_scale=None,
):
    w = dequantize_int4_weight(packed, scale, zero_point, group_size, bits, in_features, fp8_scale)
    return _linear(quantize_input(x, input_format, input_granularity, input_scale), w, bias, x.dtype)


def nvfp4_linear(
    x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity
):
    w = dequantize_nvfp4_weight(packed, block_scale, global_scale, in_features)
    return _linear(quantize_input(x, input_format, input_granularity, input_scale), w, bias, x.dtype)


def kv_round_trip(x: Tensor, scale: Tensor, fmt: str) -> Tensor:
    return numerics.fake_quantize_kv(x, fmt, scale)
