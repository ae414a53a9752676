"""CUDA implementations of the `qcompile::` ops: choose a Triton kernel by the arguments, or fall back.

Each public function here has exactly the signature of its op in `qcompile.ops`. It checks that a kernel covers the
combination of formats, granularities, shapes, dtypes and device; if not, it returns the plain-PyTorch reference
(`qcompile.lowering.torch_reference`), so every call is answered. `plan(op, *args)` names the path a call takes.

Behaviour that differs from the reference on purpose:
- NaN or +-inf in an activation that is quantized (INT8, FP8, NVFP4 inputs): the reference raises ValueError;
  checking would cost a device-to-host synchronisation per layer (and break CUDA graph capture), so by default
  the kernels give NaN in the output rows of the offending tokens instead. Set `CHECK_FINITE = True` (or the
  environment variable QCOMPILE_CHECK_FINITE=1) to raise exactly the reference's ValueError.
- Unquantized (weight-only) inputs propagate NaN/inf through the product exactly as the reference does.
- Static activation scales are trusted (the reference re-validates them on every call; they are validated when
  the graph is quantized).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from qcompile import numerics
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.triton import launch

CHECK_FINITE = os.environ.get("QCOMPILE_CHECK_FINITE", "") == "1"
# FP8 x FP8 GEMM with per-tensor/per-channel scales: "auto" (time both once per shape), "triton" or "scaled_mm".
FP8_GEMM = os.environ.get("QCOMPILE_FP8_GEMM", "auto")

_QMAX = {"int8": numerics.INT8_MAX, "fp8_e4m3": numerics.FP8_E4M3_MAX}
# The names the reference gives a non-finite input in its ValueError.
_WHAT = {"int8": "input to quantize_int8", "fp8_e4m3": "input to quantize_fp8", "nvfp4": "tensor to quantize_nvfp4"}
_FP8_CHOICE: dict[tuple, str] = {}


# ---------------------------------------------------------------------------------------------- checks


def _device_ok(x: Tensor, tensors, need: tuple[int, int]) -> bool:
    if not launch._device_ok(x):
        return False
    if any(t is not None and t.device != x.device for t in tensors):
        return False
    if x.is_cuda and launch.capability(x.device.index if x.device.index is not None else 0) < need:
        return False
    return True


def _x_ok(x: Tensor, k: int) -> bool:
    return x.dtype in launch.FLOAT_DTYPES and x.dim() >= 1 and x.shape[-1] == k


def _bias_ok(bias: Tensor | None, n: int) -> bool:
    return bias is None or (bias.dim() == 1 and bias.shape[0] == n and bias.is_floating_point())


def _col_scale_ok(scale: Tensor, n: int) -> bool:
    return scale.dtype == torch.float32 and (scale.numel() == 1 or tuple(scale.shape) == (n, 1))


def _input_ok(fmt: str, granularity: str, input_scale: Tensor | None, allowed: tuple[str, ...]) -> bool:
    if fmt == "none":
        return True
    if fmt not in allowed:
        return False
    if input_scale is not None and (input_scale.numel() != 1 or not input_scale.is_floating_point()):
        return False
    return fmt == "nvfp4" or granularity in ("token", "tensor")


def _w8_tile_fits(block: int, a_is_float: bool) -> bool:
    return bool(launch._fit_configs(launch.W8_PREFILL + launch.W8_DECODE,
                                    min_half_k=8 if a_is_float else 16, k_divides=block))


def _int8_path(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    if weight.dtype != torch.int8 or weight.dim() != 2:
        return None
    n, k = weight.shape
    if not (_x_ok(x, k) and _bias_ok(bias, n) and _col_scale_ok(weight_scale, n)):
        return None
    if not _input_ok(input_format, input_granularity, input_scale, ("int8",)):
        return None
    if not _device_ok(x, (weight, weight_scale, bias, input_scale), (8, 0)):
        return None
    if input_format == "int8":
        return f"triton: fused INT8 {input_granularity} activation quantization + INT8 GEMM (int32 accumulation)"
    return "triton: INT8 weight-only GEMM (weight upcast in registers)"


def _fp8_path(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2 or weight_scale.dtype != torch.float32:
        return None
    n, k = weight.shape
    if not (_x_ok(x, k) and _bias_ok(bias, n)):
        return None
    if not _input_ok(input_format, input_granularity, input_scale, ("fp8_e4m3",)):
        return None
    if block_size:
        shape = (launch.ceil_div(n, block_size), launch.ceil_div(k, block_size))
        if tuple(weight_scale.shape) != shape or not _w8_tile_fits(block_size, input_format == "none"):
            return None
    elif not _col_scale_ok(weight_scale, n):
        return None
    if not _device_ok(x, (weight, weight_scale, bias, input_scale), (8, 9)):
        return None
    if block_size:
        scales = f"{block_size}x{block_size} block"
    else:
        scales = "tensor" if weight_scale.numel() == 1 else "channel"
    if input_format == "fp8_e4m3":
        return f"triton: fused FP8 {input_granularity} activation quantization + FP8 GEMM ({scales} weight scales)"
    return f"triton: FP8 weight-only GEMM ({scales} weight scales, weight upcast in registers)"


def _int4_path(
    x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
    fp8_scale=None,
):
    if fp8_scale is not None or packed.dtype != torch.uint8 or packed.dim() != 2 or bits not in (3, 4) or group_size <= 0:
        return None
    n, kp = packed.shape[0], 2 * packed.shape[1]
    if not (_x_ok(x, in_features) and 0 < in_features <= kp and kp % group_size == 0 and _bias_ok(bias, n)):
        return None
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n, kp // group_size):
        return None
    if zero_point is not None and (zero_point.dtype != torch.uint8 or zero_point.shape != scale.shape):
        return None
    if not _input_ok(input_format, input_granularity, input_scale, ("int8", "fp8_e4m3", "nvfp4")):
        return None
    quantized_a = input_format in ("int8", "fp8_e4m3")
    if quantized_a and not launch.w4_after_dot(group_size, torch.int8):
        return None
    need = (8, 9) if input_format == "fp8_e4m3" else (8, 0)
    if not _device_ok(x, (packed, scale, zero_point, bias, input_scale), need):
        return None
    kind = f"INT{bits} {'asymmetric' if zero_point is not None else 'symmetric'} groups of {group_size}"
    if input_format == "nvfp4":
        return f"triton: {kind}, NVFP4 activations EMULATED (fused quantize-dequantize) + weight-only GEMM"
    if quantized_a:
        return f"triton: {kind}, fused {input_format} activation quantization + GEMM"
    return f"triton: {kind} weight-only GEMM/GEMV (in-kernel dequantization)"


def _nvfp4_path(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity):
    if packed.dtype != torch.uint8 or packed.dim() != 2 or block_scale.dtype != torch.float8_e4m3fn:
        return None
    n, kp = packed.shape[0], 2 * packed.shape[1]
    if not (_x_ok(x, in_features) and 0 < in_features <= kp and kp % 16 == 0 and _bias_ok(bias, n)):
        return None
    if tuple(block_scale.shape) != (n, kp // 16):
        return None
    if global_scale.numel() != 1 or global_scale.dtype != torch.float32:
        return None
    if not _input_ok(input_format, input_granularity, input_scale, ("nvfp4",)):
        return None
    if not _device_ok(x, (packed, block_scale, global_scale, bias, input_scale), (8, 0)):
        return None
    if input_format == "nvfp4":
        return ("triton: NVFP4 x NVFP4 EMULATED: fused NVFP4 quantize-dequantize of the activations "
                "+ NVFP4 weight-only GEMM (no FP4 tensor cores)")
    return "triton: NVFP4 weight-only GEMM/GEMV (in-kernel dequantization)"


_PATHS = {"int8_linear": _int8_path, "fp8_linear": _fp8_path, "int4_linear": _int4_path, "nvfp4_linear": _nvfp4_path}


def plan(op: str, *args, **kwargs) -> str:
    """The path the CUDA implementation of `op` ("int8_linear", ...) takes for these arguments."""
    return _PATHS[op](*args, **kwargs) or "reference: plain PyTorch (no Triton kernel covers these arguments)"


# ---------------------------------------------------------------------------------------------- helpers


def _rows(x: Tensor) -> Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _nonzero(s: Tensor) -> Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def _amax(x2: Tensor) -> Tensor:
    if x2.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x2.device)
    return x2.abs().amax().float()


def quantize_activation(x2: Tensor, fmt: str, granularity: str, input_scale: Tensor | None):
    """(operand for the GEMM, its scale or None) for a 2-D activation, as `ref.quantize_input` defines it.

    int8 / fp8_e4m3: codes and a float32 scale per row (static or dynamic per-tensor scales are broadcast).
    nvfp4: E2M1 value * FP8 block scale in x's dtype (exact), and the global scale (static, or dynamic
    amax/(6*448) when none is given) as a one-element tensor.
    """
    if fmt == "none":
        return x2, None
    if CHECK_FINITE:
        numerics.check_finite(x2, _WHAT[fmt])
    if fmt == "nvfp4":
        if input_scale is None:
            gs = _nonzero(numerics.exact_div(_amax(x2), numerics.E2M1_MAX * numerics.FP8_E4M3_MAX))
        else:
            gs = _nonzero(input_scale.reshape(()).to(device=x2.device, dtype=torch.float32))
        return launch.quantize_nvfp4(x2, gs, packed=False), gs.reshape(1)
    static = input_scale
    if static is None and granularity == "tensor":
        static = numerics.exact_div(_amax(x2), _QMAX[fmt])  # dynamic per-tensor: one scale for the whole call
    return launch.quantize_rows(x2, fmt, static)


def _finish(out2: Tensor, x: Tensor, n: int) -> Tensor:
    return out2.reshape(*x.shape[:-1], n)


def fp8_choices() -> dict[tuple, str]:
    """The FP8 GEMM backend chosen per (M bucket, N, K, bias) so far (`FP8_GEMM="auto"`)."""
    return dict(_FP8_CHOICE)


def _fp8_backend(a, a_scale, weight, weight_scale, bias, out_dtype) -> str:
    if FP8_GEMM == "triton" or not launch.scaled_mm_supported(a, weight, out_dtype):
        return "triton"
    if FP8_GEMM == "scaled_mm":
        return "scaled_mm"
    key = (launch._m_bucket(a.shape[0]), weight.shape[0], weight.shape[1], bias is not None)
    choice = _FP8_CHOICE.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return "triton"
        t_triton = launch.time_cuda(lambda: launch.w8_gemm(a, a_scale, weight, weight_scale, 0, bias, out_dtype))
        try:
            t_cublas = launch.time_cuda(lambda: launch.scaled_mm_fp8(a, a_scale, weight, weight_scale, bias, out_dtype))
        except RuntimeError:
            t_cublas = math.inf
        choice = "scaled_mm" if t_cublas < t_triton else "triton"
        _FP8_CHOICE[key] = choice
    return choice


# ------------------------------------------------------------------------------------------------ the ops


def int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    args = (x, weight, weight_scale, bias, input_scale, input_format, input_granularity)
    if _int8_path(*args) is None:
        return ref.int8_linear(*args)
    a, a_scale = quantize_activation(_rows(x), input_format, input_granularity, input_scale)
    out = launch.w8_gemm(a, a_scale, weight.contiguous(), weight_scale, 0, bias, x.dtype)
    return _finish(out, x, weight.shape[0])


def fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
    args = (x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity)
    if _fp8_path(*args) is None:
        return ref.fp8_linear(*args)
    a, a_scale = quantize_activation(_rows(x), input_format, input_granularity, input_scale)
    w = weight.contiguous()
    cublas = a_scale is not None and not block_size
    if cublas and _fp8_backend(a, a_scale, w, weight_scale, bias, x.dtype) == "scaled_mm":
        out = launch.scaled_mm_fp8(a, a_scale, w, weight_scale, bias, x.dtype)
    else:
        out = launch.w8_gemm(a, a_scale, w, weight_scale, block_size, bias, x.dtype)
    return _finish(out, x, weight.shape[0])


def int4_linear(
    x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
    fp8_scale=None,
):
    args = (x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format,
            input_granularity)
    if fp8_scale is not None:  # W4A8's weights rounded through FP8: no Triton kernel for that form yet
        return ref.int4_linear(*args, fp8_scale)
    if _int4_path(*args) is None:
        return ref.int4_linear(*args)
    a, a_scale = quantize_activation(_rows(x), input_format, input_granularity, input_scale)
    zp = zero_point.contiguous() if zero_point is not None else None
    out = launch.w4_gemm(a, a_scale, packed.contiguous(), scale.contiguous(), zp, group_size, None, bias, x.dtype)
    return _finish(out, x, packed.shape[0])


def nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity):
    args = (x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity)
    if _nvfp4_path(*args) is None:
        return ref.nvfp4_linear(*args)
    a, a_scale = quantize_activation(_rows(x), input_format, input_granularity, input_scale)
    gs = global_scale.reshape(1).float()
    out = launch.w4_gemm(a, a_scale, packed.contiguous(), block_scale.contiguous(), None, 16, gs, bias, x.dtype)
    return _finish(out, x, packed.shape[0])


__all__ = [
    "CHECK_FINITE",
    "FP8_GEMM",
    "fp8_choices",
    "fp8_linear",
    "int4_linear",
    "int8_linear",
    "nvfp4_linear",
    "plan",
    "quantize_activation",
]
