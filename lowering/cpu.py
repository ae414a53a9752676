"""CPU lowering of the `qcompile::` ops: integer GEMMs where the CPU has them, the reference everywhere else.

    from qcompile.lowering import cpu as cpu_lowering
    cpu_lowering.register()   # the ops then run these functions on CPU tensors, eager and under torch.compile

What runs where, and why (numbers from `benchmarks/cpu.py` on a 2-core AVX-512 VNNI machine):

- int8_linear with INT8 inputs (`int8_dynamic`, `int8_sq`): the activation is quantized exactly as docs/formats.md#int8 says
  (amax/127 per token or the calibrated per-tensor scale, round half to even, clamp to ±127) and multiplied by the
  stored INT8 weight with `torch._int_mm` (oneDNN s8×s8→s32, VNNI), then scaled once per output element. The
  integer product is exact, so the result is the reference's up to float32 rounding of the final scaling: about 9×
  faster than the float32 GEMM for MiniLM's shapes. Under inductor the op is decomposed into these steps
  (`decompose_int8_linear`) so that the quantization and the scaling fuse into the surrounding kernels. Graphs that
  inductor freezes take `qcompile.lowering.onednn` instead (oneDNN's GEMM on prepacked weights, with the float ops
  after it fused into the call): `backend="quant"` always, `torch.compile(qm)` under inductor's freezing flag.
  All of this needs an INT8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX): without one the integer GEMMs
  are wrong (oneDNN) or far slower than float32 (`torch._int_mm`). x86 CPUs with AVX2 and no such instruction run
  the C kernel of `native` instead (`int8_gemm.c`: the same quantization, an exact GEMM from byte multiply-adds
  on a weight packed once so that no int16 pair sum can overflow, the same scaling),
  eager and under inductor alike (the op is left whole, `takes_native_int8_gemm`); in graphs for inference a GELU or
  SiLU after such a layer runs in the same call (`int8_linear_activation`, placed by
  `qcompile.lowering.activation_fusion`), and layers reading one tensor share one call (`int8_linear_shared`, placed
  by `qcompile.lowering.shared_input`). Other CPUs run the reference's arithmetic, decomposed for inductor the same
  way (`has_fast_int8_gemm`, `int8_linear_dequantized`).
- int4_linear and nvfp4_linear: the 4-bit kernel of `native` (C, compiled on first use) multiplies straight from
  the packed codes for small batches (decode steps) and dequantizes once for larger ones. PyTorch's own packed INT4
  kernel (`_weight_int4pack_mm_for_cpu`) is fast only for bfloat16 activations, which would round every activation
  the reference keeps in float32, and it has no NVFP4.
- fp8_linear: there is no CPU FP8 GEMM faster than the float32 one (`_scaled_mm` on FP8 runs slower), so FP8 keeps
  the reference's arithmetic; under inductor it is decomposed (`decompose_fp8_linear`) so that each FP8 round trip
  is one fused pass. The casts to and from `float8_e4m3fn` compile to a scalar conversion per element, so the
  decomposition rounds and decodes FP8 with integer and float arithmetic that inductor vectorizes
  (`round_to_fp8_e4m3`, `fp8_e4m3_to_float32`), bit for bit the casts' results.
- Everything else falls back to `qcompile.lowering.torch_reference` (dequantize the weight, float32 GEMM).
"""

from __future__ import annotations

import functools
import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile import numerics
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref

# |q_x · q_w| ≤ 127², so an int32 accumulator holds K products exactly while K·127² < 2³¹.
MAX_EXACT_K = (2**31 - 1) // (127 * 127)


# x86 features with an INT8 dot product that sums u8·s8 products straight into int32 (vpdpbusd, AMX tiles).
_INT8_DOT_PRODUCT_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def has_fast_int8_gemm() -> bool:
    """Whether this CPU runs the integer GEMMs of the fast paths both exactly and fast.

    Both need an INT8 dot-product instruction (VNNI, AMX). Without one (AVX2-only or AVX-512F x86, measured on an
    AMD EPYC with AVX2 and torch 2.13): oneDNN's u8×s8 kernels add pairs of products in saturating int16, so codes
    near ±127 give wrong sums (relative error 0.3 on MiniLM's layers), and `torch._int_mm` falls back to a
    reference loop 50× slower than the float32 GEMM. The reference lowering (float32 GEMM on dequantized values) is
    then exact and the fastest choice. The feature list is checked against one oneDNN product that saturates
    without VNNI, so an unknown CPU that reports a feature it lacks still gets correct sums.
    """
    capabilities = torch.cpu.get_capabilities()
    if not any(capabilities.get(feature, False) for feature in _INT8_DOT_PRODUCT_FEATURES):
        return False
    return _onednn_int8_gemm_is_exact()


def _onednn_int8_gemm_is_exact() -> bool:
    # codes +127 (u8 255 at zero point 128) against weights +127: each pair sums to 2·255·127 > 2¹⁵ before the
    # zero-point correction, the case that saturates without VNNI
    k, n = 64, 16
    codes = torch.full((4, k), 255, dtype=torch.uint8)
    weight = torch.full((n, k), 127, dtype=torch.int8)
    try:
        packed = torch.ops.onednn.qlinear_prepack(weight, list(codes.shape))
        out = torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 128, packed, torch.ones(n), torch.zeros(n, dtype=torch.long), None, 1.0, 0, torch.float32,
            "none", [], "",
        )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool((out == 127 * 127 * k).all())


def _has_int8_operands(x_dtype: torch.dtype, weight: Tensor, input_format: str, input_granularity: str) -> bool:
    """Whether an int8_linear quantizes its float input to INT8 codes against a 2-D INT8 weight."""
    return (
        input_format == "int8"
        and input_granularity in ("tensor", "token")
        and weight.dtype == torch.int8
        and weight.dim() == 2
        and x_dtype in (torch.float32, torch.bfloat16, torch.float16)
    )


def takes_integer_gemm(
    x_dtype: torch.dtype, k: int, weight: Tensor, input_format: str, input_granularity: str
) -> bool:
    """Whether an int8_linear (activation dtype `x_dtype`, `k` input features) multiplies INT8 by INT8 on the CPU
    fast paths (`torch._int_mm` here, oneDNN in `qcompile.lowering.onednn`)."""
    return (
        _has_int8_operands(x_dtype, weight, input_format, input_granularity)
        # torch._int_mm returns wrong sums on the CPU when K == 1 (measured with torch 2.13); such a layer is a
        # scalar product per output anyway
        and 1 < k <= MAX_EXACT_K
        and has_fast_int8_gemm()
    )


def _takes_int_mm(x: Tensor, weight: Tensor, input_format: str, input_granularity: str) -> bool:
    return takes_integer_gemm(x.dtype, x.shape[-1], weight, input_format, input_granularity)


def takes_native_int8_gemm(
    x_dtype: torch.dtype, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None, input_format: str,
    input_granularity: str,
) -> bool:
    """Whether an int8_linear runs the C kernel of `native` (`int8_gemm.c`): INT8 inputs against a 2-D INT8 weight
    on a CPU with AVX2 and no INT8 dot product, where neither oneDNN nor `torch._int_mm` is both exact and fast."""
    return (
        _has_int8_operands(x_dtype, weight, input_format, input_granularity)
        and weight_scale.numel() in (1, weight.shape[0])
        and (input_scale is None or input_scale.numel() == 1)
        and weight.shape[-1] <= min(MAX_EXACT_K, native.INT8_KERNEL_MAX_K)
        and not has_fast_int8_gemm()
        and native.has_int8_gemm()
    )


def _raise_if_not_finite(amax: Tensor) -> None:
    if not math.isfinite(amax.max().item()):  # max propagates NaN
        raise ValueError("input to a quantized linear layer contains NaN or inf")


@torch.library.custom_op("qcompile::checked_input_scale", mutates_args=())
def checked_input_scale(scale: Tensor, amax: Tensor) -> Tensor:
    """`scale`, after checking that the activation's amax is finite: NaN/inf inputs have no INT8 code.

    An op of its own (not an assert in the graph) so that compiled code raises the same ValueError as the reference.
    Only the output scaling reads its result, so under inductor the quantization and the amax reduction still run
    in one pass over the activation, before the check.
    """
    _raise_if_not_finite(amax)
    return scale.clone()


@checked_input_scale.register_fake
def _(scale, amax):
    return torch.empty_like(scale)


@torch.library.custom_op("qcompile::check_finite_amax", mutates_args=())
def check_finite_amax(amaxes: list[Tensor]) -> Tensor:
    """1.0 (float32 scalar), after checking that every value in `amaxes` (largest |input| of quantized layers, by
    layer or by row) is finite.

    For graphs that check all their INT8 layers' inputs at once (`qcompile.lowering.onednn`): multiplying the
    outputs by the result keeps the check in the graph and changes no value. The amaxes come unreduced: reduced
    in the graph, inductor would compute each one in a loop of its own instead of in the layer's quantization loop.
    """
    _raise_if_not_finite(torch.cat([amax.reshape(-1) for amax in amaxes]))
    return torch.ones((), dtype=torch.float32)


@check_finite_amax.register_fake
def _(amaxes):
    return torch.empty((), dtype=torch.float32)


def _input_scale(x: Tensor, input_scale: Tensor | None, granularity: str, fmt_max: float) -> tuple[Tensor, Tensor]:
    """(scale, amax) of a float32 activation: amax/fmt_max per token (last dim) or tensor, or the calibrated scale.

    `amax` is there to be checked (`checked_input_scale`) before the scale is used again; with a static scale it is
    computed only for that check.
    """
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "token" else x.abs().amax()
    scale = amax / fmt_max if input_scale is None else input_scale.to(torch.float32)
    return numerics.nonzero_scale(scale), amax


def int8_codes(x: Tensor, input_scale: Tensor | None, granularity: str) -> tuple[Tensor, Tensor, Tensor]:
    """(codes as float32, scale float32 [..., 1] or [], amax) of a float32 activation: `numerics.quantize_int8`
    before its cast to int8."""
    scale, amax = _input_scale(x, input_scale, granularity, numerics.INT8_MAX)
    return torch.clamp(torch.round(x / scale), -numerics.INT8_MAX, numerics.INT8_MAX), scale, amax


def quantize_rows_int8(x2d: Tensor, input_scale: Tensor | None, granularity: str) -> tuple[Tensor, Tensor, Tensor]:
    """(q int8 [M, K], scale float32 [M, 1] or [], amax) for a 2-D float32 activation, as `numerics.quantize_int8`."""
    codes, scale, amax = int8_codes(x2d, input_scale, granularity)
    return codes.to(torch.int8), scale, amax


def int8_linear_int_mm(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    input_granularity: str,
) -> Tensor:
    """INT8 × INT8 → INT32 with `torch._int_mm`, then `acc · s_w · s_x + bias` in float32."""
    lead, k = x.shape[:-1], x.shape[-1]
    n = weight.shape[0]
    x2d = x.reshape(-1, k).to(torch.float32)
    q, x_scale, amax = quantize_rows_int8(x2d, input_scale, input_granularity)
    # weight is [N, K] row-major, so its transpose is the column-major [K, N] operand _int_mm takes without a copy
    acc = torch._int_mm(q, weight.t())
    x_scale = checked_input_scale(x_scale, amax)
    # the weight scale first: acc · s_w is about the size of Σ q_x·w, so only an output that itself overflows does
    out = acc.to(torch.float32) * weight_scale.to(torch.float32).reshape(1, -1) * x_scale
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.reshape(*lead, n).to(x.dtype)


def int8_linear_native(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    input_granularity: str,
    activation: str = "none",
) -> Tensor:
    """The C kernel of `native` (AVX2): quantize, exact integer GEMM on the packed weight, `acc · s_w · s_x + bias`,
    then `activation` ("none", "gelu", "silu") on the tile still in registers.

    Kept lean (a decode step calls it per layer): the kernel checks the input rows and a static scale itself."""
    library = native.load()
    x2d, static = _native_input(x, input_scale, input_granularity)
    packed = _native_weight(library, weight, weight_scale)
    out = native.int8_linear(library, x2d, packed, bias, static, activation).view(*x.shape[:-1], packed.out_features)
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _native_input(x: Tensor, input_scale: Tensor | None, input_granularity: str) -> tuple[Tensor, Tensor | None]:
    """(x as a contiguous float32 [M, K], the static scale for the kernel or None for its per-row scales)."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.dtype != torch.float32:
        x2d = x2d.to(torch.float32)
    x2d = x2d.contiguous()
    static = None  # the kernel's per-row scales (amax / 127), checking each row for NaN/inf as it goes
    if input_scale is not None:
        static = input_scale.reshape(()).to(torch.float32)
    elif input_granularity == "tensor":
        static = _input_scale(x2d, None, "tensor", numerics.INT8_MAX)[0].reshape(())  # NaN/inf: the kernel raises
    return x2d, static


def _native_weight(library, weight: Tensor, weight_scale: Tensor) -> native.Int8Weight:
    return _cached_weight((weight, weight_scale), ("int8",), lambda: native.Int8Weight(library, weight, weight_scale))


def int8_linear_shared(x, weights, weight_scales, biases, input_scale, input_format, input_granularity,
                       activations):
    """`[activations[i](int8_linear(x, weights[i], weight_scales[i], biases[i], ...)) for each i]` ("none" for no
    activation): the layers that read one tensor (q/k/v, gate/up), placed by `qcompile.lowering.shared_input`.

    Where `native`'s INT8 kernel runs, one call quantizes x once for all of them (the same codes each separate call
    would form) and multiplies it by each weight, applying each layer's activation as `int8_linear_activation` does:
    the same outputs as separate calls, bit for bit. Elsewhere: the layers one by one.
    """
    _check_shared_arguments(weights, weight_scales, biases, activations)
    if all(
        _fuses_on_native(x, w, s, input_scale, input_format, input_granularity) and w.shape[-1] == x.shape[-1]
        for w, s in zip(weights, weight_scales)
    ):
        library = native.load()
        x2d, static = _native_input(x, input_scale, input_granularity)
        packed = [_native_weight(library, w, s) for w, s in zip(weights, weight_scales)]
        outputs = native.int8_linear_many(library, x2d, packed, list(biases), static, list(activations))
        return [out.view(*x.shape[:-1], w.out_features) for out, w in zip(outputs, packed)]
    outputs = [int8_linear(x, w, s, b, input_scale, input_format, input_granularity)
               for w, s, b in zip(weights, weight_scales, biases)]
    return [out if a == "none" else INT8_ACTIVATIONS[a](out) for out, a in zip(outputs, activations)]


def _fuses_on_native(x, weight, weight_scale, input_scale, input_format, input_granularity) -> bool:
    """Whether `native`'s kernel runs a layer with work fused into its call: float32 activations only (the fused
    work is float32 arithmetic on the kernel's float32 output)."""
    return bool(x.numel()) and x.dtype == torch.float32 and takes_native_int8_gemm(
        x.dtype, weight, weight_scale, input_scale, input_format, input_granularity
    )


def _check_shared_arguments(weights, weight_scales, biases, activations) -> None:
    if not (len(weights) == len(weight_scales) == len(biases) == len(activations)):
        raise ValueError("int8_linear_shared takes one weight scale, one bias (or None) and one activation per weight")
    unknown = sorted(set(activations) - {"none", *INT8_ACTIVATIONS})
    if unknown:
        raise ValueError(f"unknown activation(s) {unknown}; expected 'none' or one of {sorted(INT8_ACTIVATIONS)}")


def int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    if not has_fast_int8_gemm():
        if x.numel() and takes_native_int8_gemm(
            x.dtype, weight, weight_scale, input_scale, input_format, input_granularity
        ):
            return int8_linear_native(x, weight, weight_scale, bias, input_scale, input_granularity)
        return ref.int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity)
    if not _takes_int_mm(x, weight, input_format, input_granularity) or x.numel() == 0:
        return ref.int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity)
    if input_scale is not None:
        numerics.check_finite(input_scale, "static int8 input scale")
        if bool((input_scale < 0).any()):
            raise ValueError("static int8 input scale must be non-negative")
    return int8_linear_int_mm(x, weight, weight_scale, bias, input_scale, input_granularity)


# The activations that an INT8 layer's output may go through inside the kernel (`int8_linear_activation`), as the
# float ops they stand for.
INT8_ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


def int8_linear_activation(x, weight, weight_scale, bias, input_scale, input_format, input_granularity, activation):
    """`activation(int8_linear(...))`, the activation fused into `native`'s INT8 kernel where that kernel runs.

    The kernel's GELU (erf form) and SiLU are within a few float32 ulps of the exact functions (relative error
    < 5e-7; PyTorch's float32 GELU is less accurate where x < -3, see `int8_gemm.c`). Elsewhere: the op, then the
    activation in PyTorch. The graphs get this op from `qcompile.lowering.activation_fusion`.
    """
    if activation not in INT8_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(INT8_ACTIVATIONS)}")
    if _fuses_on_native(x, weight, weight_scale, input_scale, input_format, input_granularity):
        return int8_linear_native(x, weight, weight_scale, bias, input_scale, input_granularity, activation)
    return INT8_ACTIVATIONS[activation](
        int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity)
    )


def int8_linear_dequantized(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    input_scale: Tensor | None,
    input_granularity: str,
) -> Tensor:
    """The reference's arithmetic for INT8 inputs: the input's codes times its scale, float32 GEMM with the
    dequantized weight (for CPUs without a fast integer GEMM, see `has_fast_int8_gemm`)."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k).to(torch.float32)
    codes, scale, amax = int8_codes(x2d, input_scale, input_granularity)
    x2d = codes * checked_input_scale(scale, amax)
    w = ref.dequantize_int8_weight(weight, weight_scale)
    out = F.linear(x2d, w, None if bias is None else bias.to(torch.float32))
    return out.reshape(*lead, weight.shape[0]).to(x.dtype)


def decompose_int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    """Inductor decomposition: the integer path as aten ops, so quantize and scale fuse with their neighbours.

    Where the integer GEMM is not fast and exact (see `has_fast_int8_gemm`), the op is called whole when the CPU
    runs `native`'s INT8 kernel (it quantizes, multiplies and scales in one call), and otherwise becomes the
    reference's arithmetic as aten ops: the quantization still fuses, and under freezing the weight is dequantized
    once. Layers without INT8 inputs (weight-only) are called whole too.
    """
    if x.device.type != "cpu":
        return NotImplemented
    if _takes_int_mm(x, weight, input_format, input_granularity):
        return int8_linear_int_mm(x, weight, weight_scale, bias, input_scale, input_granularity)
    if not _has_int8_operands(x.dtype, weight, input_format, input_granularity) or takes_native_int8_gemm(
        x.dtype, weight, weight_scale, input_scale, input_format, input_granularity
    ):  # the op whole, through its twin without autograd (see _define_kernel_call_ops)
        return torch.ops.qcompile.cpu_int8_linear.default(
            x, weight, weight_scale, bias, input_scale, input_format, input_granularity
        )
    return int8_linear_dequantized(x, weight, weight_scale, bias, input_scale, input_granularity)


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
    scale, amax = _input_scale(x2d, input_scale, granularity, numerics.FP8_E4M3_MAX)
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


# ------------------------------------------------------------------------------------ 4-bit weights

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
    weight = _cached_weight(*weight_key, weight_fn)
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


# The kernel's view of each stored weight (value tables, pointers, checks), built once per weight: compiled graphs
# pass the same constant tensors on every call, and rebuilding it cost a third of a small decode layer's time. An
# entry is used only for the very tensors it was built from (weak references), unchanged since (storage address
# and version counter); it keeps none of them alive, and goes when the first of them does.
_WEIGHTS: dict[tuple, tuple] = {}


def _cached_weight(sources: tuple, extra: tuple, build):
    tensors = [t for t in sources if t is not None]
    if any(t.is_inference() for t in tensors):  # no version counter to tell an in-place change: build each call
        return build()
    key = (tuple(id(t) if t is not None else None for t in sources), extra)
    stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    entry = _WEIGHTS.get(key)
    if entry is not None and entry[1] == stamp and all(ref() is t for ref, t in zip(entry[0], tensors)):
        return entry[2]
    weight = build()

    def forget(_, key=key):
        _WEIGHTS.pop(key, None)

    _WEIGHTS[key] = (tuple(weakref.ref(t, forget) for t in tensors), stamp, weight)
    return weight


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
    x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity
):
    def reference():
        return ref.int4_linear(x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale,
                               input_format, input_granularity)

    if packed.dim() != 2 or x.shape[-1] != in_features:
        return reference()

    def weight():
        return int4_weight(packed, scale, zero_point, group_size, in_features)

    key = ((packed, scale, zero_point), ("int4", group_size, in_features))
    return _lut4_linear(x, weight, key, bias, input_scale, input_format, input_granularity, reference)


def nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format,
                 input_granularity):
    def reference():
        return ref.nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format,
                                input_granularity)

    if packed.dim() != 2 or block_scale.dim() != 2 or x.shape[-1] != in_features:
        return reference()

    def weight():
        return nvfp4_weight(packed, block_scale, global_scale, in_features)

    key = ((packed, block_scale, global_scale), ("nvfp4", in_features))
    return _lut4_linear(x, weight, key, bias, input_scale, input_format, input_granularity, reference)


_registered = False
_LIBRARY: torch.library.Library | None = None
_CALL_OPS_LIBRARY: torch.library.Library | None = None


def register() -> None:
    """Make these functions the CPU kernels of the ops, and the int8 decomposition part of inductor's table."""
    global _registered
    if _registered:
        return
    import qcompile.ops  # noqa: F401  (defines the ops)

    # Registered with the dispatcher directly rather than through custom_op's register_kernel, whose Python
    # wrapper (a dynamo guard and an aliasing check per call) cost ~25 us a call, as much as a small decode GEMV.
    # The functions return new tensors, which is all that check verifies.
    global _LIBRARY
    _LIBRARY = torch.library.Library("qcompile", "IMPL")
    for name, fn in _cpu_kernels().items():
        _LIBRARY.impl(name, fn, "CPU")
    global _CALL_OPS_LIBRARY
    _CALL_OPS_LIBRARY = torch.library.Library("qcompile", "FRAGMENT")
    _define_kernel_call_ops(_CALL_OPS_LIBRARY)
    _define_fused_activation_op(_CALL_OPS_LIBRARY)
    _define_shared_input_op(_CALL_OPS_LIBRARY)
    _register_inductor_decomposition()
    _registered = True


# Compiled graphs call the CPU kernels through ops of their own, `qcompile::cpu_<op>`: the same schema and
# function, with no autograd formula. By the time inductor emits a call, autograd has been traced away, but the
# public ops' Python autograd layer (register_autograd) still ran on every call and redispatched: ~45 us per call,
# as much as a decode step's GEMV (210 calls per SmolLM2 token). An op without autograd goes straight from the
# dispatcher to the kernel.
def _cpu_kernels() -> dict:
    """The ops that have CPU kernels here, by name."""
    return {"int8_linear": int8_linear, "int4_linear": int4_linear, "nvfp4_linear": nvfp4_linear}


def kernel_call_ops() -> dict:
    """{public op: its autograd-free twin} for the ops with CPU kernels here."""
    from qcompile.lowering import ensure_registered

    ensure_registered()
    return {getattr(torch.ops.qcompile, name).default: getattr(torch.ops.qcompile, f"cpu_{name}").default
            for name in _cpu_kernels()}


def _define_kernel_call_ops(library: torch.library.Library) -> None:
    for name, fn in _cpu_kernels().items():
        public = getattr(torch.ops.qcompile, name).default
        schema = str(public._schema).split("::", 1)[1]
        library.define(f"cpu_{schema}")
        library.impl(f"cpu_{name}", fn, "CPU")
        # shapes (and errors on bad input) exactly as the public op's fake kernel gives them
        torch.library.register_fake(f"qcompile::cpu_{name}", lib=library)(
            lambda *args, _public=public: _public(*args)
        )


def _define_fused_activation_op(library: torch.library.Library) -> None:
    """`qcompile::cpu_int8_linear_activation`: an INT8 layer and the activation after it, in one kernel call
    (`int8_linear_activation`); no autograd, like the twins above, and only in graphs for inference."""
    schema = str(torch.ops.qcompile.int8_linear.default._schema).split("::", 1)[1]
    name, arguments = schema.split("(", 1)
    library.define(f"cpu_{name}_activation({arguments.replace(') -> Tensor', ', str activation) -> Tensor')}")
    library.impl("cpu_int8_linear_activation", int8_linear_activation, "CPU")

    @torch.library.register_fake("qcompile::cpu_int8_linear_activation", lib=library)
    def _(x, weight, weight_scale, bias, input_scale, input_format, input_granularity, activation):
        if activation not in INT8_ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(INT8_ACTIVATIONS)}")
        return torch.ops.qcompile.int8_linear(x, weight, weight_scale, bias, input_scale, input_format,
                                              input_granularity)


def _define_shared_input_op(library: torch.library.Library) -> None:
    """`qcompile::cpu_int8_linear_shared`: the INT8 layers that read one tensor, in one kernel call
    (`int8_linear_shared`); no autograd, like the twins above, and only in graphs for inference."""
    library.define(
        "cpu_int8_linear_shared(Tensor x, Tensor[] weights, Tensor[] weight_scales, Tensor?[] biases, "
        "Tensor? input_scale, str input_format, str input_granularity, str[] activations) -> Tensor[]"
    )
    library.impl("cpu_int8_linear_shared", int8_linear_shared, "CPU")

    @torch.library.register_fake("qcompile::cpu_int8_linear_shared", lib=library)
    def _(x, weights, weight_scales, biases, input_scale, input_format, input_granularity, activations):
        _check_shared_arguments(weights, weight_scales, biases, activations)
        return [torch.ops.qcompile.int8_linear(x, w, s, b, input_scale, input_format, input_granularity)
                for w, s, b in zip(weights, weight_scales, biases)]


def _four_bit_kernel_call(name: str):
    """Inductor decomposition of a 4-bit op on CPU tensors into its `qcompile::cpu_` twin (see above), with a
    quantized input's round trip (W4A8's FP8, NVFP4's blocks) taken out of the call as aten ops that inductor fuses.

    Inside the call the reference's own eager chain would quantize the input (a dozen passes over it and FP8 casts
    element by element; MiniLM W4A8 ran at 0.54x of FP32 eager, NVFP4 at 0.23x). The kernel gets the same float32
    values either way."""
    call = getattr(torch.ops.qcompile, f"cpu_{name}").default

    def decompose(x, *args):
        if x.device.type != "cpu":
            return NotImplemented
        *weight_args, input_scale, input_format, input_granularity = args
        quantized = fake_quantize_input(x, input_scale, input_format, input_granularity)
        if quantized is None:
            return call(x, *args)
        return call(quantized, *weight_args, None, "none", "tensor").to(x.dtype)

    return decompose


def _register_inductor_decomposition() -> None:
    from torch._inductor import decomposition, lowering

    for op, decompose in [(torch.ops.qcompile.int8_linear.default, decompose_int8_linear),
                          (torch.ops.qcompile.fp8_linear.default, decompose_fp8_linear),
                          (torch.ops.qcompile.int4_linear.default, _four_bit_kernel_call("int4_linear")),
                          (torch.ops.qcompile.nvfp4_linear.default, _four_bit_kernel_call("nvfp4_linear"))]:
        decomposition.register_decomposition(op)(decompose)
        # where the decomposition declines (NotImplemented: another device, another format), inductor calls the op
        lowering.make_fallback(op, override_decomp=True)
    for name in [*_cpu_kernels(), "int8_linear_activation", "int8_linear_shared"]:
        lowering.make_fallback(getattr(torch.ops.qcompile, f"cpu_{name}").default)



def fp8_kv_round_trip(x: Tensor, scale: Tensor) -> Tensor:
    """`qcompile::kv_round_trip(x, scale, "fp8")` in plain operations, without the reference's input checks: what
    eager decode steps call outside the dispatcher (whose call overhead and finiteness check cost more than the
    rounding of one token), and what inductor traces into its kernels (the cast as `round_to_fp8_e4m3`, which it
    vectorizes). The same numbers as `numerics.fake_quantize_kv` (tested bit for bit)."""
    q = (x.to(torch.float32) / scale).clamp(-numerics.FP8_E4M3_MAX, numerics.FP8_E4M3_MAX)
    rounded = round_to_fp8_e4m3(q) if torch.compiler.is_compiling() else q.to(torch.float8_e4m3fn).to(torch.float32)
    return (rounded * scale).to(x.dtype)


__all__ = ["INT8_ACTIVATIONS", "MAX_EXACT_K", "SMALL_BATCH", "check_finite_amax", "fp8_kv_round_trip", "decompose_fp8_linear",
           "decompose_int8_linear", "fake_quantize_fp8_input", "fake_quantize_input", "fake_quantize_nvfp4_input",
           "fp8_e4m3_to_float32", "has_fast_int8_gemm", "int4_linear", "int4_weight", "int8_codes", "int8_linear",
           "int8_linear_activation", "int8_linear_dequantized", "int8_linear_int_mm", "int8_linear_native",
           "int8_linear_shared", "kernel_call_ops", "nvfp4_linear", "nvfp4_weight", "register", "round_to_e2m1",
           "round_to_fp8_e4m3", "takes_integer_gemm", "takes_native_int8_gemm"]


def fp8_kv_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`qcompile::kv_round_trip(x, scale, "fp8")` without the dispatcher and the reference's input checks: decode
    steps store one token per attention, where the custom op's call overhead and the finiteness check cost more
    than the rounding. The same operations as `numerics.fake_quantize_kv` (tested bit for bit)."""
    q = (x.to(torch.float32) / scale).clamp_(-numerics.FP8_E4M3_MAX, numerics.FP8_E4M3_MAX)
    return (q.to(torch.float8_e4m3fn).to(torch.float32) * scale).to(x.dtype)
