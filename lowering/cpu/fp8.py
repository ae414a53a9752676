"""FP8 and E2M1 rounding in plain ops on the CPU: the FP8 decomposition, the quantized inputs of the 4-bit kernels,
and the FP8 KV-cache round trip.

Inductor compiles the casts to and from `float8_e4m3fn` to a scalar conversion per element; `round_to_fp8_e4m3`,
`fp8_e4m3_to_float32` and `round_to_e2m1` give the same values, bit for bit, in integer and float arithmetic that it
vectorizes. `decompose_fp8_linear` writes `qcompile::fp8_linear` with them (there is no CPU FP8 GEMM faster than the
float32 one), and `fake_quantize_input` the FP8/NVFP4 input round trip of the 4-bit layers. What runs where, and
why: docs/cpu-lowering.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile import numerics
from qcompile.lowering.cpu.activation_scale import checked_input_scale, input_scale_and_amax

_FP8_SMALLEST_NORMAL = 2.0**-6
_FP8_SUBNORMAL_STEPS = 2.0**9  # FP8 E4M3's subnormals are the multiples of 2^-9


def round_to_fp8_e4m3(v: Tensor) -> Tensor:
    """`v.to(torch.float8_e4m3fn).to(torch.float32)` for float32 `v` with |v| <= 448, in ops inductor vectorizes.

    A normal FP8 value keeps the top 3 of float32's 23 mantissa bits: the bit pattern is rounded to nearest-even at
    bit 20 and the bits below are cleared (a carry into the exponent is the right rounding up to the next power of
    two). Below FP8's smallest normal, 2^-6, its values are the multiples of 2^-9: round(v * 2^9) / 2^9, also to
    nearest-even, and exact (the scaling is by a power of two). Equal bit for bit to the casts, signed zeros
    included, on every float32 with |v| <= 448 (checked exhaustively); callers clamp to ±448 first, as the reference.
    """
    bits = v.view(torch.int32)
    nearest_even = (bits + (0x7FFFF + ((bits >> 20) & 1))) & ~0xFFFFF
    normal = nearest_even.view(torch.float32)
    subnormal = torch.round(v * _FP8_SUBNORMAL_STEPS) * (1.0 / _FP8_SUBNORMAL_STEPS)
    return torch.where(v.abs() < _FP8_SMALLEST_NORMAL, subnormal, normal)


def fp8_e4m3_to_float32(codes: Tensor) -> Tensor:
    """`codes.to(torch.float32)` for a `float8_e4m3fn` tensor, in ops inductor vectorizes (all 256 codes, NaN too).

    Sign, 4 exponent bits (bias 7) and 3 mantissa bits move into float32's fields (bias 127: exponent + 120);
    exponent 0 is subnormal, mantissa * 2^-9; S.1111.111 is NaN (E4M3FN has no infinities).
    """
    byte = codes.view(torch.uint8).to(torch.int32)
    sign = (byte & 0x80) << 24
    exponent = (byte >> 3) & 0xF
    mantissa = byte & 0x7
    normal = (sign | ((exponent + 120) << 23) | (mantissa << 20)).view(torch.float32)
    subnormal = mantissa.to(torch.float32) * (1.0 / _FP8_SUBNORMAL_STEPS)
    subnormal = torch.where(sign != 0, -subnormal, subnormal)
    value = torch.where(exponent == 0, subnormal, normal)
    return torch.where((byte & 0x7F) == 0x7F, float("nan"), value)


def round_to_e2m1(v: Tensor) -> Tensor:
    """`numerics.e2m1_decode(numerics.e2m1_encode(v))` for float32 `v`, in ops inductor vectorizes.

    E2M1's magnitudes are the multiples of 0.5 below 2, of 1 from 2 to 4 and of 2 from 4 to 6: each range is
    rounded on its own grid (scaling by a power of two is exact; `torch.round` breaks ties to even, which is the
    even code here too) and everything past 5 saturates to 6. The sign is the input's, so small negatives give
    -0.0 as the encoder's code 8 does.
    """
    a = v.abs()
    below_2 = torch.round(a * 2.0) * 0.5
    below_4 = torch.round(a)
    up_to_6 = torch.clamp(torch.round(a * 0.5) * 2.0, max=numerics.E2M1_MAX)
    return torch.copysign(torch.where(a < 2.0, below_2, torch.where(a < 4.0, below_4, up_to_6)), v)


def fake_quantize_fp8_input(x2d: Tensor, input_scale: Tensor | None, granularity: str) -> Tensor:
    """A float32 activation's FP8 round trip (`numerics.fake_quantize`, per tensor or token, dynamic or with the
    calibrated scale), as aten ops inductor fuses into one pass; raises on NaN/inf as the reference does."""
    scale, amax = input_scale_and_amax(x2d, input_scale, granularity, numerics.FP8_E4M3_MAX)
    q = round_to_fp8_e4m3(torch.clamp(x2d / scale, -numerics.FP8_E4M3_MAX, numerics.FP8_E4M3_MAX))
    return q * checked_input_scale(scale, amax)


def fake_quantize_nvfp4_input(x2d: Tensor, global_scale: Tensor, block_size: int = 16) -> Tensor:
    """A float32 activation's NVFP4 round trip with the calibrated global scale (`numerics.quantize_nvfp4`, then
    `dequantize_nvfp4`): the same steps without the codes and their packing, as aten ops inductor fuses."""
    m, k = x2d.shape
    amax = x2d.abs().amax()
    gs = checked_input_scale(numerics.nonzero_scale(global_scale.to(torch.float32).reshape(())), amax)
    padded = numerics._pad_last(x2d, block_size)
    blocks = padded.reshape(m, padded.shape[-1] // block_size, block_size)
    s = numerics.nonzero_scale(blocks.abs().amax(dim=-1, keepdim=True) / (numerics.E2M1_MAX * gs))
    block_scale = round_to_fp8_e4m3(torch.clamp(s, max=numerics.FP8_E4M3_MAX))
    denom = block_scale * gs
    underflow = denom == 0  # the reference gives such blocks code 0: +0.0
    scaled = blocks / torch.where(underflow, torch.ones_like(denom), denom)
    values = torch.where(underflow, 0.0, round_to_e2m1(scaled) * denom)
    return values.reshape(m, padded.shape[-1])[:, :k]


def fake_quantize_input(x: Tensor, input_scale: Tensor | None, input_format: str, granularity: str) -> Tensor | None:
    """`torch_reference.quantize_input` of a CPU activation as aten ops (float32, x's shape), for the formats the
    4-bit kernels take quantized inputs in (FP8 per tensor or token, NVFP4 with a calibrated global scale); None
    for the rest."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or x.numel() == 0:
        return None  # (an empty input: the kernel call returns the empty result)
    x2d = x.reshape(-1, x.shape[-1]).to(torch.float32)
    if input_format == "fp8_e4m3" and granularity in ("tensor", "token"):
        return fake_quantize_fp8_input(x2d, input_scale, granularity).reshape(x.shape)
    if input_format == "nvfp4" and granularity == "block" and input_scale is not None:
        return fake_quantize_nvfp4_input(x2d, input_scale).reshape(x.shape)
    return None


def decompose_fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
    """Inductor decomposition of FP8 layers (per-tensor / per-channel weight scales) on the CPU.

    There is no CPU FP8 GEMM faster than the float32 one, so this is the reference's own arithmetic (FP8 round trip
    of the input, weight dequantized, float32 GEMM) written as aten ops: inductor fuses each round trip into one
    pass instead of the reference's chain of eager kernels. The FP8 casts become `round_to_fp8_e4m3` and
    `fp8_e4m3_to_float32`, the same values in vector arithmetic: with the casts, inductor's scalar conversions took
    ~40% of MiniLM's fp8_dynamic forward (0.63x of FP32 eager on an AVX2 CPU).
    """
    if (
        x.device.type != "cpu"
        or x.numel() == 0  # nothing to scale (a full amax of nothing is an error): the reference op returns it
        or block_size
        or input_format not in ("none", "fp8_e4m3")
        or input_granularity not in ("tensor", "token")
        or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return NotImplemented
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k).to(torch.float32)
    if input_format == "fp8_e4m3":
        x2d = fake_quantize_fp8_input(x2d, input_scale, input_granularity)
    w = fp8_e4m3_to_float32(weight) * weight_scale.to(torch.float32)
    out = F.linear(x2d, w, None if bias is None else bias.to(torch.float32))
    return out.reshape(*lead, weight.shape[0]).to(x.dtype)


def fp8_kv_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`qcompile::kv_round_trip(x, scale, "fp8")` in plain operations, without the reference's input checks: what
    eager decode steps call outside the dispatcher (whose call overhead and finiteness check cost more than the
    rounding of one token), and what inductor traces into its kernels (the cast as `round_to_fp8_e4m3`, which it
    vectorizes). The same numbers as `numerics.fake_quantize_kv` (tested bit for bit)."""
    q = (x.to(torch.float32) / scale).clamp(-numerics.FP8_E4M3_MAX, numerics.FP8_E4M3_MAX)
    rounded = round_to_fp8_e4m3(q) if torch.compiler.is_compiling() else q.to(torch.float8_e4m3fn).to(torch.float32)
    return (rounded * scale).to(x.dtype)


__all__ = ["decompose_fp8_linear", "fake_quantize_fp8_input", "fake_quantize_input", "fake_quantize_nvfp4_input",
           "fp8_e4m3_to_float32", "fp8_kv_round_trip", "round_to_e2m1", "round_to_fp8_e4m3"]
