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
import weakref

import torch
from torch import Tensor

from qcompile import numerics
from qcompile.lowering import torch_reference as ref
from qcompile.lowering.triton import dequant, launch

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


def _m_rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


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
    if prologue_quant(_m_rows(x), input_format, input_granularity, input_scale):
        return "triton: INT8 GEMM quantizing the activations per token in its prologue (one kernel, decode)"
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
    if prologue_quant(_m_rows(x), input_format, input_granularity, input_scale):
        return (f"triton: FP8 GEMM quantizing the activations per token in its prologue (one kernel, decode; "
                f"{scales} weight scales)")
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
    torch_path = _w4_torch_plan(x, packed, scale, zero_point, group_size, None)
    return f"triton: {kind} weight-only {torch_path or 'GEMM/GEMV (in-kernel dequantization)'}"


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
    torch_path = _w4_torch_plan(x, packed, block_scale, None, 16, global_scale)
    return f"triton: NVFP4 weight-only {torch_path or 'GEMM/GEMV (in-kernel dequantization)'}"


def _w4_torch_plan(x, packed, scale, zero_point, group_size, global_scale) -> str | None:
    """How `launch.w4_gemm` hands a weight-only product to PyTorch's GEMMs (dequant.py), or None."""
    x2 = x.reshape(-1, x.shape[-1])
    if dequant.tinygemm_applies(x2, False, packed, zero_point, group_size, global_scale is not None):
        return "torch._weight_int4pack_mm (tinygemm, bf16 scales: not bit-exact)"
    if dequant.prefill_alpha(x2.shape[0], x.dtype, False, scale, zero_point, global_scale) is not None:
        return f"prefill: dequantize kernel to {str(x.dtype).removeprefix('torch.')} + torch.addmm (cuBLAS)"
    return None


_PATHS = {"int8_linear": _int8_path, "fp8_linear": _fp8_path, "int4_linear": _int4_path, "nvfp4_linear": _nvfp4_path}


def plan(op: str, *args, **kwargs) -> str:
    """The path the CUDA implementation of `op` ("int8_linear", ...) takes for these arguments."""
    return _PATHS[op](*args, **kwargs) or "reference: plain PyTorch (no Triton kernel covers these arguments)"


# ---------------------------------------------------------------------------------------------- helpers


def _rows(x: Tensor) -> Tensor:
    if x.dim() == 2 and x.stride(1) == 1:
        return x  # already rows (a reshape costs about a microsecond on the host)
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _unrows(out2: Tensor, x: Tensor, n: int) -> Tensor:
    """The product's rows back in x's leading shape. Sizes as separate integers: a shape tuple costs twice as
    much to parse on the host (2.3 us against 1.1 us)."""
    d = x.dim()
    if d == 2:
        return out2
    if d == 3:  # [batch, tokens, K], a decoder's layers
        s = x.shape
        return out2.reshape(s[0], s[1], n)
    return out2.reshape(*x.shape[:-1], n)


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


def fp8_choices() -> dict[tuple, str]:
    """The FP8 GEMM backend chosen per (M bucket, N, K, bias, fused) so far (`FP8_GEMM="auto"`)."""
    return dict(_FP8_CHOICE)


def _fp8_backend(a, a_scale, weight, weight_scale, bias, out_dtype, fused=False) -> str:
    """"triton" or "scaled_mm" for an FP8 x FP8 product with per-tensor/channel weight scales.

    fused: `a` is the float activation, and the candidates are the GEMM that quantizes it in its prologue
    against quantize_rows + torch._scaled_mm (row-wise scales), each timed as a whole.
    """
    if FP8_GEMM == "triton" or not launch.scaled_mm_supported(a, weight, out_dtype):
        return "triton"
    if FP8_GEMM == "scaled_mm":
        return "scaled_mm"
    key = (launch._m_bucket(a.shape[0]), weight.shape[0], weight.shape[1], bias is not None, fused)
    choice = _FP8_CHOICE.get(key)
    if choice is None:
        if torch.cuda.is_current_stream_capturing():
            return "triton"
        if fused:
            def run_triton():
                return launch.w8_gemm(a, None, weight, weight_scale, 0, bias, out_dtype, quant_a=True)

            def run_cublas():
                return launch.scaled_mm_fp8(*launch.quantize_rows(a, "fp8_e4m3"), weight, weight_scale, bias,
                                            out_dtype)
        else:
            def run_triton():
                return launch.w8_gemm(a, a_scale, weight, weight_scale, 0, bias, out_dtype)

            def run_cublas():
                return launch.scaled_mm_fp8(a, a_scale, weight, weight_scale, bias, out_dtype)
        t_triton = launch.time_cuda(run_triton)
        try:
            t_cublas = launch.time_cuda(run_cublas)
        except RuntimeError:
            t_cublas = math.inf
        choice = "scaled_mm" if t_cublas < t_triton else "triton"
        _FP8_CHOICE[key] = choice
    return choice


def prologue_quant(m: int, input_format: str, input_granularity: str, input_scale) -> bool:
    """Whether the GEMM quantizes the activation itself: dynamic per-token INT8/FP8 for decode (M <= 16)."""
    return (input_format in ("int8", "fp8_e4m3") and input_granularity == "token" and input_scale is None
            and 0 < m <= launch.DECODE_MAX_M)


def w8_product(x2, input_format, input_granularity, input_scale, w, weight_scale, block_size, bias, out_dtype):
    """A 2-D activation times an 8-bit weight, its quantization included: inside the GEMM for decode
    (`prologue_quant`), else quantize_activation and then the Triton GEMM or, for FP8 with per-tensor/channel
    weight scales, torch._scaled_mm when `_fp8_backend` prefers it."""
    fp8 = w.dtype == torch.float8_e4m3fn
    if prologue_quant(x2.shape[0], input_format, input_granularity, input_scale):
        if CHECK_FINITE:
            numerics.check_finite(x2, _WHAT[input_format])
        if not fp8 or block_size or _fp8_backend(x2, None, w, weight_scale, bias, out_dtype, fused=True) == "triton":
            return launch.w8_gemm(x2, None, w, weight_scale, block_size, bias, out_dtype, quant_a=True)
        a, a_scale = launch.quantize_rows(x2, input_format)
        return launch.scaled_mm_fp8(a, a_scale, w, weight_scale, bias, out_dtype)
    a, a_scale = quantize_activation(x2, input_format, input_granularity, input_scale)
    if fp8 and a_scale is not None and not block_size and \
            _fp8_backend(a, a_scale, w, weight_scale, bias, out_dtype) == "scaled_mm":
        return launch.scaled_mm_fp8(a, a_scale, w, weight_scale, bias, out_dtype)
    return launch.w8_gemm(a, a_scale, w, weight_scale, block_size, bias, out_dtype)


# ------------------------------------------------------------------------------------------------ launch plans
# What a call decides from its arguments' metadata alone (the coverage checks, the prepared weight operands) is
# decided once per (op, weight tensors, activation dtype/device/K, constant arguments) and kept as a plan: a function
# of the call's arguments. Inside a plan, each M gets a launch prepared by its first call (`launch.w8_prepare`,
# `w4_prepare`: configuration, flags, strides, grid, the compiled kernel), so a decode step's call is two dictionary
# lookups, the output's allocation and the launch. Tensors enter the key by identity, storage address and version:
# `.data =` or an in-place update makes a new plan, and a plan goes when any of its tensors is freed (so an id
# reused by a new tensor finds nothing).

PLAN_CACHE = os.environ.get("QCOMPILE_PLAN_CACHE", "1") != "0"
_PLANS: dict[tuple, object] = {}
_PLANS_MAX = 4096  # versions bumped by in-place updates leave stale keys behind: forget everything past this
_plan_builds = 0


def clear_plans() -> None:
    """Forget every launch plan (they are rebuilt on the next calls)."""
    _PLANS.clear()


def plan_stats() -> dict[str, int]:
    """{"plans": plans held now, "builds": plans built in this process} (for tests and benchmarks)."""
    return {"plans": len(_PLANS), "builds": _plan_builds}


def _tensor_key(t: Tensor | None):
    if t is None:
        return None
    # inference tensors keep no version counter (an in-place update changes no metadata a plan depends on)
    return (id(t), t.data_ptr(), 0 if t.is_inference() else t._version)


def _lookup(key: tuple, tensors: tuple, build):
    """The plan for `key`, built by `build()` on a miss and kept until one of `tensors` is freed."""
    plan = _PLANS.get(key)
    if plan is None:
        global _plan_builds
        plan = build()
        _plan_builds += 1
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[key] = plan

        def forget(_, key=key):
            _PLANS.pop(key, None)

        # the weak references live as long as the plan (held by it), and drop it when a tensor goes
        plan.__dict__["_refs"] = [weakref.ref(t, forget) for t in tensors if t is not None]
    return plan


def _x_key(x: Tensor) -> tuple:
    return (x.dtype, x.device, x.shape[-1] if x.dim() else -1)


# A plan holds no tensor (a view would keep its weight alive): it is called with the call's own arguments, which its
# key guarantees are the tensors it was built for.


def _contiguous(t: Tensor | None) -> bool:
    return t is None or t.is_contiguous()


_ENTRIES_MAX = 64  # prepared launches per plan (one per M seen): prefill of many lengths starts over past this


def _entry(entries: dict, m: int, build):
    """The prepared launch for `m` rows: `build()` gives (launch, whether it may be kept) on a miss."""
    fn = entries.get(m)
    if fn is None:
        fn, keep = build()
        if keep:
            if len(entries) >= _ENTRIES_MAX:
                entries.clear()
            entries[m] = fn
    return fn


def _fp8_decided(a, weight, bias, out_dtype, fused) -> bool:
    """Whether `_fp8_backend` gives the same answer on every later call (it was not skipped during capture)."""
    if FP8_GEMM != "auto" or not launch.scaled_mm_supported(a, weight, out_dtype):
        return True
    return (launch._m_bucket(a.shape[0]), weight.shape[0], weight.shape[1], bias is not None, fused) in _FP8_CHOICE


def _w8_launch(x2, input_format, input_granularity, input_scale, w, weight_scale, block_size, bias, out_dtype):
    """(launch(x2, w, weight_scale, bias, input_scale), keep) for one M: `w8_product` with its choices (the
    quantizing prologue, the FP8 backend, the GEMM's configuration) made once."""
    fp8 = w.dtype == torch.float8_e4m3fn
    if prologue_quant(x2.shape[0], input_format, input_granularity, input_scale):
        what = _WHAT[input_format]
        keep = True
        if fp8 and not block_size:
            choice = _fp8_backend(x2, None, w, weight_scale, bias, out_dtype, fused=True)
            keep = _fp8_decided(x2, w, bias, out_dtype, True)
        if not fp8 or block_size or choice == "triton":
            gemm = launch.w8_prepare(x2, None, w, weight_scale, block_size, bias, out_dtype, quant_a=True)

            def run(x2, w, weight_scale, bias, input_scale):
                if CHECK_FINITE:
                    numerics.check_finite(x2, what)
                return gemm(x2, None, w, weight_scale, bias)
        else:
            def run(x2, w, weight_scale, bias, input_scale):
                if CHECK_FINITE:
                    numerics.check_finite(x2, what)
                a, a_scale = launch.quantize_rows(x2, input_format)
                return launch.scaled_mm_fp8(a, a_scale, w, weight_scale, bias, out_dtype)
        return run, keep

    gemm = None

    def run(x2, w, weight_scale, bias, input_scale):
        nonlocal gemm
        a, a_scale = quantize_activation(x2, input_format, input_granularity, input_scale)
        if fp8 and a_scale is not None and not block_size and \
                _fp8_backend(a, a_scale, w, weight_scale, bias, out_dtype) == "scaled_mm":
            return launch.scaled_mm_fp8(a, a_scale, w, weight_scale, bias, out_dtype)
        if gemm is None:  # the quantized operand's form is known once quantized
            gemm = launch.w8_prepare(a, a_scale, w, weight_scale, block_size, bias, out_dtype)
        return gemm(a, a_scale, w, weight_scale, bias)

    return run, True


def _w8_plan(input_format, input_granularity, block_size, contiguous, prepared=True):
    """The 8-bit product of a plan: the launch prepared for the call's M (`_w8_launch`), or without `prepared`
    (a plan used once: QCOMPILE_PLAN_CACHE=0) `w8_product`, which decides everything on the call."""
    entries: dict = {}

    def run(x, weight, weight_scale, bias, input_scale):
        w = weight if contiguous else weight.contiguous()
        x2 = _rows(x)
        if not prepared:
            out = w8_product(x2, input_format, input_granularity, input_scale, w, weight_scale, block_size, bias,
                             x.dtype)
            return out.reshape(*x.shape[:-1], w.shape[0])
        fn = entries.get(x2.shape[0]) or _entry(entries, x2.shape[0], lambda: _w8_launch(
            x2, input_format, input_granularity, input_scale, w, weight_scale, block_size, bias, x.dtype))
        return _unrows(fn(x2, w, weight_scale, bias, input_scale), x, w.shape[0])

    return run


def _int8_plan(x, weight, weight_scale, bias, input_scale, input_format, input_granularity, prepared=True):
    if _int8_path(x, weight, weight_scale, bias, input_scale, input_format, input_granularity) is None:
        return lambda args: ref.int8_linear(*args)
    run = _w8_plan(input_format, input_granularity, 0, weight.is_contiguous(), prepared)
    return lambda args: run(*args[:5])


def _fp8_plan(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity,
              prepared=True):
    if _fp8_path(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity) is None:
        return lambda args: ref.fp8_linear(*args)
    run = _w8_plan(input_format, input_granularity, block_size, weight.is_contiguous(), prepared)
    return lambda args: run(args[0], args[1], args[2], args[4], args[5])


def _w4_plan(input_format, input_granularity, group_size, contiguous, prepared=True):
    """The 4-bit product of a plan: quantize the activation (if its format asks), then the launch prepared for
    its M (`launch.w4_prepare`), or without `prepared` (a plan used once) `launch.w4_gemm`."""
    entries: dict = {}
    unquantized = input_format == "none"

    def run(x, packed, scale, zero_point, global_scale, bias, input_scale):
        if not contiguous:
            packed, scale = packed.contiguous(), scale.contiguous()
            zero_point = zero_point.contiguous() if zero_point is not None else None
        x2 = _rows(x)
        if unquantized:
            a, a_scale = x2, None
        else:
            a, a_scale = quantize_activation(x2, input_format, input_granularity, input_scale)
        if not prepared:
            gs = global_scale.reshape(1) if global_scale is not None else None
            out = launch.w4_gemm(a, a_scale, packed, scale, zero_point, group_size, gs, bias, x.dtype)
            return out.reshape(*x.shape[:-1], packed.shape[0])
        m = a.shape[0]
        fn = entries.get(m) or _entry(entries, m, lambda: (launch.w4_prepare(
            a, a_scale, packed, scale, zero_point, group_size, global_scale, bias, x.dtype), True))
        return _unrows(fn(a, a_scale, packed, scale, zero_point, global_scale, bias), x, packed.shape[0])

    return run


def _int4_plan(x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format,
               input_granularity, fp8_scale, prepared=True):
    rest = (packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format,
            input_granularity)
    if fp8_scale is not None:  # W4A8's weights rounded through FP8: no Triton kernel for that form yet
        return lambda args: ref.int4_linear(*args)
    if _int4_path(x, *rest) is None:
        return lambda args: ref.int4_linear(*args[:-1])
    contiguous = _contiguous(packed) and _contiguous(scale) and _contiguous(zero_point)
    run = _w4_plan(input_format, input_granularity, group_size, contiguous, prepared)
    return lambda args: run(args[0], args[1], args[2], args[3], None, args[7], args[8])


def _nvfp4_plan(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format,
                input_granularity, prepared=True):
    rest = (packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity)
    if _nvfp4_path(x, *rest) is None:
        return lambda args: ref.nvfp4_linear(*args)
    contiguous = _contiguous(packed) and _contiguous(block_scale)
    run = _w4_plan(input_format, input_granularity, 16, contiguous, prepared)
    # the global scale is one float32 element (checked): the kernels read it by address
    return lambda args: run(args[0], args[1], args[2], None, args[3], args[5], args[6])


# ------------------------------------------------------------------------------------------------ the ops


def int8_linear(x, weight, weight_scale, bias, input_scale, input_format, input_granularity):
    args = (x, weight, weight_scale, bias, input_scale, input_format, input_granularity)
    if not PLAN_CACHE:
        return _int8_plan(*args, prepared=False)(args)
    key = ("int8", *_x_key(x), _tensor_key(weight), _tensor_key(weight_scale), _tensor_key(bias),
           _tensor_key(input_scale), input_format, input_granularity)
    return _lookup(key, (weight, weight_scale, bias, input_scale), lambda: _int8_plan(*args))(args)


def fp8_linear(x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity):
    args = (x, weight, weight_scale, block_size, bias, input_scale, input_format, input_granularity)
    if not PLAN_CACHE:
        return _fp8_plan(*args, prepared=False)(args)
    key = ("fp8", *_x_key(x), _tensor_key(weight), _tensor_key(weight_scale), block_size, _tensor_key(bias),
           _tensor_key(input_scale), input_format, input_granularity)
    return _lookup(key, (weight, weight_scale, bias, input_scale), lambda: _fp8_plan(*args))(args)


def int4_linear(
    x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format, input_granularity,
    fp8_scale=None,
):
    args = (x, packed, scale, zero_point, group_size, bits, in_features, bias, input_scale, input_format,
            input_granularity, fp8_scale)
    if not PLAN_CACHE:
        return _int4_plan(*args, prepared=False)(args)
    key = ("int4", *_x_key(x), _tensor_key(packed), _tensor_key(scale), _tensor_key(zero_point), group_size, bits,
           in_features, _tensor_key(bias), _tensor_key(input_scale), input_format, input_granularity,
           _tensor_key(fp8_scale))
    tensors = (packed, scale, zero_point, bias, input_scale, fp8_scale)
    return _lookup(key, tensors, lambda: _int4_plan(*args))(args)


def nvfp4_linear(x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity):
    args = (x, packed, block_scale, global_scale, in_features, bias, input_scale, input_format, input_granularity)
    if not PLAN_CACHE:
        return _nvfp4_plan(*args, prepared=False)(args)
    key = ("nvfp4", *_x_key(x), _tensor_key(packed), _tensor_key(block_scale), _tensor_key(global_scale),
           in_features, _tensor_key(bias), _tensor_key(input_scale), input_format, input_granularity)
    tensors = (packed, block_scale, global_scale, bias, input_scale)
    return _lookup(key, tensors, lambda: _nvfp4_plan(*args))(args)


__all__ = [
    "CHECK_FINITE",
    "FP8_GEMM",
    "PLAN_CACHE",
    "clear_plans",
    "fp8_choices",
    "fp8_linear",
    "int4_linear",
    "int8_linear",
    "nvfp4_linear",
    "plan",
    "plan_stats",
    "quantize_activation",
]
