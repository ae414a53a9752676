"""4-bit weights on the CPU (INT4/INT3 groups, NVFP4): the CPU kernels of `qcompile::int4_linear` and
`qcompile::nvfp4_linear`.

The 4-bit kernel of `native` (C, compiled on first use) multiplies straight from the packed codes for small
batches (decode steps) and dequantizes the weight once for larger ones; without a C compiler the layers run the
reference. What runs where, and why: docs/cpu-lowering.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qcompile import numerics
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.cpu.weight_cache import cached_weight

# Rows (tokens) up to which the weight-only kernel multiplies straight from the packed codes; past it, the weight
# is dequantized once by the same kernel library and multiplied by the float32 GEMM, which wins when the codes are
# reused by many rows (measured crossover on MiniLM/SmolLM2 shapes: 16-32 rows).
SMALL_BATCH = 8

_INT4_SIGNED = torch.tensor([float(c if c < 8 else c - 16) for c in range(16)])  # 4-bit two's complement
_INT4_UNSIGNED = torch.arange(16, dtype=torch.float32)  # codes with zero points
_E2M1 = torch.tensor(numerics.E2M1_VALUES + tuple(-v for v in numerics.E2M1_VALUES))  # bit 3 is the sign
_FP8_VALUES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


def _lut4_linear(x, weight_fn, weight_key, bias, input_scale, input_format, input_granularity, reference):
    library = native.load()
    if library is None or x.numel() == 0 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return reference()
    weight = cached_weight(*weight_key, weight_fn)
    lead = x.shape[:-1]
    # the activation quantizer of W4A8 / NVFP4-input recipes is the reference's own; the product is the kernel's
    if input_format == "none" and x.dtype == torch.float32:
        x2d = x.reshape(-1, x.shape[-1])
    else:
        x2d = ref.quantize_input(x, input_format, input_granularity, input_scale).reshape(-1, x.shape[-1])
    x2d = x2d.contiguous()
    if x2d.shape[0] <= SMALL_BATCH:
        out = native.linear(library, x2d, weight, bias)
    else:
        out = F.linear(x2d, native.dequantize(library, weight), None if bias is None else bias.to(torch.float32))
    out = out.reshape(*lead, weight.out_features)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def int4_weight(packed, scale, zero_point, group_size, in_features) -> native.Lut4Weight:
    """An INT4/INT3 weight as the native kernel reads it (codes are 4-bit two's complement when symmetric)."""
    table = _INT4_SIGNED if zero_point is None else _INT4_UNSIGNED
    zero = None if zero_point is None else zero_point.to(torch.uint8)
    return native.Lut4Weight(packed, in_features, group_size, table, scale.to(torch.float32), zero=zero)


def nvfp4_weight(packed, block_scale, global_scale, in_features) -> native.Lut4Weight:
    """An NVFP4 weight as the native kernel reads it: E2M1 table, FP8 block-scale codes through a 256-entry table
    holding float(code) * global scale, the very product the reference forms for each block."""
    group = 2 * packed.shape[-1] // block_scale.shape[-1]
    scale_lut = _FP8_VALUES * global_scale.to(torch.float32)
    return native.Lut4Weight(packed, in_features, group, _E2M1, block_scale.view(torch.uint8), scale_lut)


def int4_linear(
    x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
    fp8_scale=None,
):
    """The CPU kernel of `qcompile::int4_linear`."""

    def reference():
        return ref.int4_linear(x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale,
                               input_format, input_granularity, fp8_scale)

    # W4A8's weights rounded through FP8 are no longer a code table times a group scale: the reference
    if packed.dim() != 2 or x.shape[-1] != in_features or fp8_scale is not None:
        return reference()

    def weight():
        return int4_weight(packed, scale, zero_point, group_size, in_features)

    key = ((packed, scale, zero_point), ("int4", group_size, in_features))
    return _lut4_linear(x, weight, key, bias, input_scale, input_format, input_granularity, reference)


def nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format,
                 input_granularity):
    """The CPU kernel of `qcompile::nvfp4_linear`."""

    def reference():
        return ref.nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format,
                                input_granularity)

    if packed.dim() != 2 or block_scale.dim() != 2 or x.shape[-1] != in_features:
        return reference()

    def weight():
        return nvfp4_weight(packed, block_scale, global_scale, in_features)

    key = ((packed, block_scale, global_scale), ("nvfp4", in_features))
    return _lut4_linear(x, weight, key, bias, input_scale, input_format, input_granularity, reference)


__all__ = ["SMALL_BATCH", "int4_linear", "int4_weight", "nvfp4_linear", "nvfp4_weight"]
