"""Reference numerics for every qcompile format (docs/formats.md), in plain PyTorch.

This module is the ground truth: every fast path (Triton kernels, torch._scaled_mm lowering, ONNX and
TensorRT exports) is tested against it. It favours clarity and exactness over speed and runs on any device.
All arithmetic happens in float32, whatever the input dtype, so results are bit-identical across input dtypes
that convert exactly to float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = [
    "Int8Tensor",
    "FP8Tensor",
    "Int4Tensor",
    "NVFP4Tensor",
    "check_finite",
    "quantize_int8",
    "dequantize_int8",
    "quantize_fp8",
    "dequantize_fp8",
    "quantize_int4",
    "dequantize_int4",
    "quantize_nvfp4",
    "dequantize_nvfp4",
    "pack_nibbles",
    "unpack_nibbles",
    "e2m1_encode",
    "e2m1_decode",
    "fake_quantize",
    "kv_cache_scale",
    "fake_quantize_kv",
    "INT8_MAX",
    "FP8_E4M3_MAX",
    "E2M1_MAX",
    "E2M1_VALUES",
]

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
# Magnitudes of the eight non-negative E2M1 codes; the index is the code's low three bits.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

ScaleLike = Union[Tensor, float, None]


# eq=False: the generated __eq__ would compare tensors element-wise and fail on truthiness; identity is the
# only meaningful equality for containers of tensors, and it keeps the objects hashable.
@dataclass(frozen=True, eq=False)
class Int8Tensor:
    q: Tensor  # int8, same shape as the input
    scale: Tensor  # float32, broadcastable to q


@dataclass(frozen=True, eq=False)
class FP8Tensor:
    q: Tensor  # float8_e4m3fn, same shape as the input
    scale: Tensor  # float32; broadcastable to q, or [ceil(N/bs), ceil(K/bs)] for 2-D blocks
    block_size: Optional[int] = None  # set only for "block" granularity


@dataclass(frozen=True, eq=False)
class Int4Tensor:
    packed: Tensor  # uint8 [..., Kp/2]
    scale: Tensor  # float32 [..., Kp/g]
    zero_point: Optional[Tensor]  # uint8 [..., Kp/g] for asymmetric, None for symmetric
    group_size: int
    bits: int  # 4, or 3 for the INT3 accuracy-study variant
    in_features: int  # true K before padding
    # W4A8 (docs/formats.md#w4a8): the per-tensor scale through which code x group scale is rounded to FP8
    fp8_scale: Optional[Tensor] = None  # float32, shape []


@dataclass(frozen=True, eq=False)
class NVFP4Tensor:
    packed: Tensor  # uint8 [..., Kp/2], E2M1 codes
    block_scale: Tensor  # float8_e4m3fn [..., Kp/block_size]
    global_scale: Tensor  # float32, shape []
    in_features: int  # true K before padding
    block_size: int = 16


# --------------------------------------------------------------------------------------------- helpers


def check_finite(x: Tensor, what: str) -> None:
    """Raise ValueError if `x` holds NaN or ±inf; `what` names the offending tensor (e.g. a layer)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains NaN or inf")


def _as_f32(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    check_finite(x, what)
    return x.to(torch.float32)


def exact_div(t: Tensor, divisor: float) -> Tensor:
    """`t / divisor`, correctly rounded on every device: with a Python number as divisor, PyTorch's CUDA kernels
    multiply by its reciprocal, which can be one ulp off the division docs/formats.md#conventions defines (and the CPU
    does)."""
    return t / torch.full((), divisor, dtype=t.dtype, device=t.device)


def nonzero_scale(scale: Tensor) -> Tensor:
    # A zero scale means an all-zero slice (or an amax so small the division underflowed); 1.0 keeps x/scale
    # finite and still maps every element of that slice to code 0.
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _static_scale(scale: ScaleLike, device: torch.device, what: str) -> Tensor:
    s = torch.as_tensor(scale, dtype=torch.float32, device=device)
    check_finite(s, what)
    if bool((s < 0).any()):
        raise ValueError(f"{what} must be non-negative")
    return nonzero_scale(s)


def _amax_all(x: Tensor) -> Tensor:
    # A full reduction over an empty tensor is an error in torch; an empty tensor has nothing to scale.
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.abs().amax()


def _amax(x: Tensor, granularity: str) -> Tensor:
    if granularity == "tensor":
        return _amax_all(x)
    if x.dim() == 0:
        raise ValueError(f"granularity {granularity!r} needs a tensor with at least one dimension")
    if granularity == "channel":
        if x.dim() == 1:
            return x.abs()  # each element is its own output channel
        return x.abs().amax(dim=tuple(range(1, x.dim())), keepdim=True)
    if granularity == "token":
        return x.abs().amax(dim=-1, keepdim=True)
    raise ValueError(f"unknown granularity {granularity!r}; expected 'tensor', 'channel' or 'token'")


def _pad_last(x: Tensor, multiple: int) -> Tensor:
    """Zero-pad the last axis to a multiple of `multiple` that is also even (two codes per byte)."""
    k = x.shape[-1]
    kp = -(-k // multiple) * multiple
    if kp % 2:
        kp += multiple
    if kp == k:
        return x
    return torch.nn.functional.pad(x, (0, kp - k))


def _check_block(block_size: int, what: str) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"{what} must be a positive int, got {block_size!r}")
    return block_size


# ------------------------------------------------------------------------------------------------ INT8


def quantize_int8(x: Tensor, granularity: str = "tensor", scale: ScaleLike = None) -> Int8Tensor:
    """Symmetric INT8: scale = amax/127, q = clamp(round_half_even(x/scale), -127, 127).

    `scale`, when given, is a static (calibrated) scale used as is; it must broadcast to `x`.
    """
    xf = _as_f32(x, "input to quantize_int8")
    if scale is None:
        s = nonzero_scale(exact_div(_amax(xf, granularity), INT8_MAX))
    else:
        s = _static_scale(scale, xf.device, "static int8 scale")
    # -128 stays unused so the grid is symmetric and negation never overflows.
    q = torch.clamp(torch.round(xf / s), -INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Tensor(q=q, scale=s)


def dequantize_int8(t: Int8Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (t.q.to(torch.float32) * t.scale).to(dtype)


# ------------------------------------------------------------------------------------------------- FP8


def _fp8_cast(v: Tensor) -> Tensor:
    # float8_e4m3fn has no inf: anything past 448 would become NaN, so saturate before the (RNE) cast.
    return v.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def _expand_blocks(scale: Tensor, block_size: int, shape: torch.Size) -> Tensor:
    full = scale.repeat_interleave(block_size, dim=0).repeat_interleave(block_size, dim=1)
    return full[: shape[0], : shape[1]]


def quantize_fp8(
    x: Tensor, granularity: str = "tensor", block_size: int = 128, scale: ScaleLike = None
) -> FP8Tensor:
    """FP8 E4M3: scale = amax/448, q = fp8(saturate(x/scale)) with round-to-nearest-even.

    Granularities "tensor", "channel", "token" as for INT8, and "block": 2-D `x` [N, K] in
    block_size x block_size tiles, edge tiles partial, scale shape [ceil(N/bs), ceil(K/bs)].
    """
    xf = _as_f32(x, "input to quantize_fp8")
    if granularity == "block":
        bs = _check_block(block_size, "block_size")
        if xf.dim() != 2:
            raise ValueError(f"fp8 'block' granularity needs a 2-D tensor, got shape {tuple(xf.shape)}")
        n, k = xf.shape
        nb, kb = -(-n // bs), -(-k // bs)
        if scale is None:
            # Zero padding never raises a block's amax, so partial edge blocks are handled exactly.
            padded = torch.nn.functional.pad(xf.abs(), (0, kb * bs - k, 0, nb * bs - n))
            amax = padded.reshape(nb, bs, kb, bs).amax(dim=(1, 3))
            s = nonzero_scale(exact_div(amax, FP8_E4M3_MAX))
        else:
            s = _static_scale(scale, xf.device, "static fp8 block scale")
            if tuple(s.shape) != (nb, kb):
                raise ValueError(f"fp8 block scale must have shape {(nb, kb)}, got {tuple(s.shape)}")
        q = _fp8_cast(xf / _expand_blocks(s, bs, xf.shape))
        return FP8Tensor(q=q, scale=s, block_size=bs)

    if scale is None:
        s = nonzero_scale(exact_div(_amax(xf, granularity), FP8_E4M3_MAX))
    else:
        s = _static_scale(scale, xf.device, "static fp8 scale")
    return FP8Tensor(q=_fp8_cast(xf / s), scale=s, block_size=None)


def dequantize_fp8(t: FP8Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    s = t.scale
    if t.block_size is not None:
        s = _expand_blocks(s, t.block_size, t.q.shape)
    return (t.q.to(torch.float32) * s).to(dtype)


# ------------------------------------------------------------------------------------------ nibble packs


def pack_nibbles(codes: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte along the last axis: element 2i low nibble, 2i+1 high nibble."""
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"pack_nibbles needs an even last dimension, got shape {tuple(codes.shape)}")
    c = codes.to(torch.uint8) & 0xF
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of pack_nibbles: uint8 [..., K/2] -> uint8 codes [..., K]."""
    p = packed.to(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], 2 * p.shape[-1])


# ------------------------------------------------------------------------------------------- INT4/INT3


def quantize_int4(
    w: Tensor, group_size: int = 128, symmetric: bool = True, bits: int = 4, scale_dtype: torch.dtype | None = None,
    fp8_scale: ScaleLike | bool = None,
) -> Int4Tensor:
    """Group-wise INT4 (or INT3 with bits=3) along the last axis, packed two codes per byte.

    Symmetric: scale = amax_group/7 (INT3: /3), q in [-8, 7] (INT3: [-4, 3]) stored as 4-bit two's complement.
    Asymmetric: range [min(min,0), max(max,0)], scale = range/15 (INT3: /7), q and zero point unsigned.
    `scale_dtype` (bfloat16 or float16): the scales are first rounded to that dtype (engines keep group scales in
    the model's dtype) and the codes computed from the rounded scales; the scales stay stored as float32.
    `fp8_scale` (W4A8): True for amax(w)/448, or a static per-tensor scale; the dequantized weight is then rounded
    through FP8 with it (`dequantize_int4`).
    """
    if bits not in (3, 4):
        raise ValueError(f"bits must be 3 or 4, got {bits!r}")
    g = _check_block(group_size, "group_size")
    wf = _as_f32(w, "weight to quantize_int4")
    if wf.dim() == 0:
        raise ValueError("quantize_int4 needs a tensor with at least one dimension")
    k = wf.shape[-1]
    wp = _pad_last(wf, g)
    groups = wp.reshape(*wp.shape[:-1], wp.shape[-1] // g, g)

    if symmetric:
        qmax = float(2 ** (bits - 1) - 1)  # 7 or 3
        scale = nonzero_scale(exact_div(groups.abs().amax(dim=-1), qmax))
        scale = rounded_scale(scale, scale_dtype)
        q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)), -qmax - 1, qmax)
        codes = (q.to(torch.int32) & 0xF).to(torch.uint8)
        zero_point = None
    else:
        levels = float(2**bits - 1)  # 15 or 7
        # Including 0 in the range makes zero exactly representable (padding, ReLU outputs, pruned weights).
        lo = torch.clamp(groups.amin(dim=-1), max=0.0)
        hi = torch.clamp(groups.amax(dim=-1), min=0.0)
        scale = exact_div(hi - lo, levels)
        # hi - lo can overflow to inf near the float32 limit even though the scale itself is representable.
        scale = torch.where(torch.isinf(scale), exact_div(hi, levels) - exact_div(lo, levels), scale)
        scale = rounded_scale(nonzero_scale(scale), scale_dtype)
        zp = torch.clamp(torch.round(-lo / scale), 0.0, levels)
        q = torch.clamp(torch.round(groups / scale.unsqueeze(-1)) + zp.unsqueeze(-1), 0.0, levels)
        codes = q.to(torch.uint8)
        zero_point = zp.to(torch.uint8)

    packed = pack_nibbles(codes.reshape(wp.shape))
    second = None
    if fp8_scale is True:
        second = nonzero_scale(exact_div(_amax_all(wf), FP8_E4M3_MAX))
    elif fp8_scale is not None and fp8_scale is not False:
        second = _static_scale(fp8_scale, wf.device, "fp8_scale")
    return Int4Tensor(
        packed=packed, scale=scale, zero_point=zero_point, group_size=g, bits=bits, in_features=k, fp8_scale=second
    )


def rounded_scale(scale: Tensor, dtype: torch.dtype | None) -> Tensor:
    """Scales rounded to `dtype` and back to float32 (None: unchanged); a scale that rounds to 0 becomes the
    dtype's smallest normal, one past its range its largest value, so that every code stays finite."""
    if dtype is None or dtype == torch.float32:
        return scale
    info = torch.finfo(dtype)
    return scale.clamp(min=info.tiny, max=info.max).to(dtype).to(torch.float32)


def dequantize_int4(t: Int4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    codes = unpack_nibbles(t.packed).to(torch.int32)
    lead, kp = codes.shape[:-1], codes.shape[-1]
    codes = codes.reshape(*lead, kp // t.group_size, t.group_size)
    if t.zero_point is None:
        q = torch.where(codes >= 8, codes - 16, codes).to(torch.float32)
    else:
        q = (codes - t.zero_point.to(torch.int32).unsqueeze(-1)).to(torch.float32)
    w = (q * t.scale.unsqueeze(-1)).reshape(*lead, kp)
    if t.fp8_scale is not None:  # W4A8: code x group scale, rounded to FP8 under the per-tensor scale
        s = t.fp8_scale.to(torch.float32)
        w = _fp8_cast(w / s).to(torch.float32) * s
    return w[..., : t.in_features].to(dtype)


# ----------------------------------------------------------------------------------------------- E2M1


def e2m1_encode(v: Tensor) -> Tensor:
    """Encode (already scaled) values to E2M1 codes 0..15: nearest, ties to even, saturating at ±6.

    Bit 3 is torch.signbit of the input, so -0.0 and small negatives that round to zero give code 8.
    """
    a = v.to(torch.float32).abs()
    # Count the decision boundaries that |v| lies above. Each boundary is the midpoint between two
    # neighbouring magnitudes; at a tie the even index (even mantissa) wins, hence '>' below an even
    # index and '>=' below an odd one. Everything past 5 saturates to index 7 (6.0), inf included.
    idx = (
        (a > 0.25).to(torch.uint8)
        + (a >= 0.75).to(torch.uint8)
        + (a > 1.25).to(torch.uint8)
        + (a >= 1.75).to(torch.uint8)
        + (a > 2.5).to(torch.uint8)
        + (a >= 3.5).to(torch.uint8)
        + (a > 5.0).to(torch.uint8)
    )
    return idx | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: Tensor) -> Tensor:
    """E2M1 codes 0..15 -> float32 values (code 8 decodes to -0.0)."""
    c = codes.to(torch.int64)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=codes.device)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


# ---------------------------------------------------------------------------------------------- NVFP4


def quantize_nvfp4(w: Tensor, block_size: int = 16, global_scale: ScaleLike = None) -> NVFP4Tensor:
    """NVFP4: E2M1 values in blocks of 16 along the last axis, FP8 E4M3 block scales, FP32 global scale.

    `global_scale`, when given, is the static activation global scale from calibration (amax/(6*448));
    otherwise it is computed from `w`.
    """
    bs = _check_block(block_size, "block_size")
    wf = _as_f32(w, "tensor to quantize_nvfp4")
    if wf.dim() == 0:
        raise ValueError("quantize_nvfp4 needs a tensor with at least one dimension")
    k = wf.shape[-1]

    if global_scale is None:
        gs = nonzero_scale(exact_div(_amax_all(wf), E2M1_MAX * FP8_E4M3_MAX))
    else:
        gs = _static_scale(global_scale, wf.device, "nvfp4 global scale")
        if gs.numel() != 1:
            raise ValueError(f"nvfp4 global scale must be a scalar, got shape {tuple(gs.shape)}")
        gs = gs.reshape(())

    wp = _pad_last(wf, bs)
    blocks = wp.reshape(*wp.shape[:-1], wp.shape[-1] // bs, bs)
    s = blocks.abs().amax(dim=-1) / (E2M1_MAX * gs)
    s = torch.where(s == 0, torch.ones_like(s), s)
    # A static global scale smaller than the data needs would push s past the FP8 range; saturate (the
    # E2M1 encoder then saturates the values too) instead of letting the cast produce NaN.
    block_scale = torch.clamp(s, max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)

    denom = (block_scale.to(torch.float32) * gs).unsqueeze(-1)
    # A block whose scale underflowed to 0 in FP8 holds values negligible next to the tensor's amax;
    # it becomes +0 (code 0) rather than x/0 = inf/NaN.
    underflow = denom == 0
    scaled = blocks / torch.where(underflow, torch.ones_like(denom), denom)
    codes = torch.where(underflow, torch.zeros((), dtype=torch.uint8, device=wf.device), e2m1_encode(scaled))

    packed = pack_nibbles(codes.reshape(wp.shape))
    return NVFP4Tensor(packed=packed, block_scale=block_scale, global_scale=gs, in_features=k, block_size=bs)


def dequantize_nvfp4(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    vals = e2m1_decode(unpack_nibbles(t.packed))
    lead, kp = vals.shape[:-1], vals.shape[-1]
    vals = vals.reshape(*lead, kp // t.block_size, t.block_size)
    scale = (t.block_scale.to(torch.float32) * t.global_scale.to(torch.float32)).unsqueeze(-1)
    return (vals * scale).reshape(*lead, kp)[..., : t.in_features].to(dtype)


# ------------------------------------------------------------------------------------------ fake quant


def fake_quantize(
    x: Tensor,
    fmt: str,
    granularity: str,
    scale: ScaleLike = None,
    block_size: Optional[int] = None,
) -> Tensor:
    """dequantize(quantize(x)) in x's dtype.

    fmt: "int8" and "fp8_e4m3" (granularity "tensor" / "channel" / "token", or "block" for fp8; `scale` is a
    static scale), "nvfp4" (blocks along the last axis; `scale` is the static global scale), and "int4" /
    "int3" (symmetric groups along the last axis; block_size is the group size).
    """
    if fmt == "int8":
        return dequantize_int8(quantize_int8(x, granularity, scale=scale), x.dtype)
    if fmt == "fp8_e4m3":
        bs = 128 if block_size is None else block_size
        return dequantize_fp8(quantize_fp8(x, granularity, block_size=bs, scale=scale), x.dtype)
    if fmt == "nvfp4":
        bs = 16 if block_size is None else block_size
        return dequantize_nvfp4(quantize_nvfp4(x, block_size=bs, global_scale=scale), x.dtype)
    if fmt in ("int4", "int3"):
        if scale is not None:
            raise ValueError(f"{fmt} fake quantization computes its own group scales; scale must be None")
        g = 128 if block_size is None else block_size
        bits = 4 if fmt == "int4" else 3
        return dequantize_int4(quantize_int4(x, group_size=g, symmetric=True, bits=bits), x.dtype)
    raise ValueError(f"unknown format {fmt!r}; expected 'int8', 'fp8_e4m3', 'nvfp4', 'int4' or 'int3'")


# ------------------------------------------------------------------------------------------- KV cache

# The largest magnitude each KV-cache format represents at scale 1 (docs/kv-cache.md).
KV_CACHE_QMAX = {"fp8": FP8_E4M3_MAX, "nvfp4": E2M1_MAX * FP8_E4M3_MAX}


def kv_cache_scale(amax: Tensor, fmt: str) -> Tensor:
    """The static scale of keys or values whose calibrated max |x| is `amax`: amax/448 for "fp8" (the per-tensor
    scale), amax/(6*448) for "nvfp4" (the global scale under the per-block FP8 scales). Float32, 0-d."""
    if fmt not in KV_CACHE_QMAX:
        raise ValueError(f"unknown KV-cache format {fmt!r}; expected one of {', '.join(KV_CACHE_QMAX)}")
    return nonzero_scale(exact_div(torch.as_tensor(amax, dtype=torch.float32).reshape(()), KV_CACHE_QMAX[fmt]))


def fake_quantize_kv(x: Tensor, fmt: str, scale: Tensor) -> Tensor:
    """Keys or values `[..., head_dim]` through the KV-cache format and back, in x's dtype: "fp8" is FP8 E4M3 with
    one static scale; "nvfp4" is NVFP4 in blocks of 16 along the head dimension with the static global `scale`."""
    if fmt == "fp8":
        return fake_quantize(x, "fp8_e4m3", "tensor", scale=scale)
    if fmt == "nvfp4":
        return fake_quantize(x, "nvfp4", "block", scale=scale, block_size=16)
    raise ValueError(f"unknown KV-cache format {fmt!r}; expected one of {', '.join(KV_CACHE_QMAX)}")
