"""INT8 layers on the CPU: the choice of integer GEMM, the kernels, and the inductor decomposition.

`int8_linear` (the CPU kernel of `qcompile::int8_linear`) multiplies INT8 inputs by the INT8 weight with
`torch._int_mm` where the CPU has an INT8 dot product (`has_fast_int8_gemm`), with the C kernel of `native` on x86
CPUs with AVX2 and none (`takes_native_int8_gemm`), and with the reference's arithmetic elsewhere. The same kernel
runs an activation after the layer (`int8_linear_activation`) and layers that read one tensor (`int8_linear_shared`).
Under inductor, `decompose_int8_linear` writes the op as aten ops. What runs where, and why: docs/cpu-lowering.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from qcompile import numerics
from qcompile.lowering import native
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.cpu.activation_scale import checked_input_scale, input_scale_and_amax
from qcompile.lowering.cpu.weight_cache import cached_weight

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


def int8_gemm_for(x_dtype: torch.dtype, k: int, weight: Tensor, weight_scale: Tensor, input_scale: Tensor | None,
                  input_format: str, input_granularity: str) -> str:
    """The one place that picks the GEMM an int8_linear runs on this CPU, each choice behind its availability check:
    "int_mm" (`torch._int_mm`, oneDNN: an INT8 dot-product instruction), "native" (the C kernel: AVX2 without
    one), "float" (the reference's arithmetic on the INT8 codes), or "reference" (no INT8 inputs: weight-only)."""
    if not _has_int8_operands(x_dtype, weight, input_format, input_granularity):
        return "reference"
    if takes_integer_gemm(x_dtype, k, weight, input_format, input_granularity):
        return "int_mm"
    if takes_native_int8_gemm(x_dtype, weight, weight_scale, input_scale, input_format, input_granularity):
        return "native"
    return "float"


def int8_codes(x: Tensor, input_scale: Tensor | None, granularity: str) -> tuple[Tensor, Tensor, Tensor]:
    """(codes as float32, scale float32 [..., 1] or [], amax) of a float32 activation: `numerics.quantize_int8`
    before its cast to int8."""
    scale, amax = input_scale_and_amax(x, input_scale, granularity, numerics.INT8_MAX)
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
        # NaN/inf: the kernel raises
        static = input_scale_and_amax(x2d, None, "tensor", numerics.INT8_MAX)[0].reshape(())
    return x2d, static


def _native_weight(library, weight: Tensor, weight_scale: Tensor) -> native.Int8Weight:
    return cached_weight((weight, weight_scale), ("int8",), lambda: native.Int8Weight(library, weight, weight_scale))


def int8_linear_shared(x, weights, weight_scales, biases, input_scale, input_format, input_granularity,
                       activations):
    """`[activations[i](int8_linear(x, weights[i], weight_scales[i], biases[i], ...)) for each i]` ("none" for no
    activation): the layers that read one tensor (q/k/v, gate/up), placed by `qcompile.lowering.shared_input`.

    Where `native`'s INT8 kernel runs, one call quantizes x once for all of them (the same codes each separate call
    would form) and multiplies it by each weight, applying each layer's activation as `int8_linear_activation` does:
    the same outputs as separate calls, bit for bit. Elsewhere: the layers one by one.
    """
    check_shared_arguments(weights, weight_scales, biases, activations)
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
    return bool(x.numel()) and x.dtype == torch.float32 and int8_gemm_for(
        x.dtype, x.shape[-1], weight, weight_scale, input_scale, input_format, input_granularity) == "native"


def check_shared_arguments(weights, weight_scales, biases, activations) -> None:
    """Raise ValueError unless `int8_linear_shared` has one weight scale, bias and known activation per weight."""
    if not (len(weights) == len(weight_scales) == len(biases) == len(activations)):
        raise ValueError("int8_linear_shared takes one weight scale, one bias (or None) and one activation per weight")
    unknown = sorted(set(activations) - {"none", *INT8_ACTIVATIONS})
    if unknown:
        raise ValueError(f"unknown activation(s) {unknown}; expected 'none' or one of {sorted(INT8_ACTIVATIONS)}")


def int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    """The CPU kernel of `qcompile::int8_linear`: the integer GEMM this CPU runs exactly and fast, else the
    reference (see the module's docstring)."""
    gemm = int8_gemm_for(x.dtype, x.shape[-1], weight, weight_scale, input_scale, input_format, input_granularity) \
        if x.numel() else "reference"
    if gemm == "native":
        return int8_linear_native(x, weight, weight_scale, bias, input_scale, input_granularity)
    if gemm != "int_mm":
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
    gemm = int8_gemm_for(x.dtype, x.shape[-1], weight, weight_scale, input_scale, input_format, input_granularity)
    if gemm == "int_mm":
        return int8_linear_int_mm(x, weight, weight_scale, bias, input_scale, input_granularity)
    if gemm == "float":
        return int8_linear_dequantized(x, weight, weight_scale, bias, input_scale, input_granularity)
    # the op whole, through its twin without autograd (`qcompile::cpu_int8_linear`, see `qcompile.lowering.cpu`)
    return torch.ops.qcompile.cpu_int8_linear.default(
        x, weight, weight_scale, bias, input_scale, input_format, input_granularity
    )


__all__ = ["INT8_ACTIVATIONS", "MAX_EXACT_K", "check_shared_arguments", "decompose_int8_linear", "has_fast_int8_gemm",
           "int8_codes", "int8_gemm_for", "int8_linear", "int8_linear_activation", "int8_linear_dequantized", "int8_linear_int_mm",
           "int8_linear_native", "int8_linear_shared", "quantize_rows_int8", "takes_integer_gemm",
           "takes_native_int8_gemm"]
