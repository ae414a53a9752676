"""Launchers for the kernels in `kernels.py`: shapes, strides, configurations and tuning.

Each GEMM has a small set of configurations, separate for decode (M <= 16: one 16-row tile, narrow N tiles and
split-K so that a GEMV keeps every SM streaming weights) and prefill (tensor-core tiles for K, N in 2048..16384).
On a GPU the first call for a given (kernel, flags, M bucket, N, K, dtypes) times every configuration as a whole
call (buffer allocation, kernel, and for split-K the float32 accumulation buffer and the final cast) and keeps the
fastest; later calls go straight to it. Under `TRITON_INTERPRET=1` (CPU tests) the kernels run with one fixed
configuration, or the one a caller passes as `config=`; the launchers then accept CPU tensors.

Every launcher takes 2-D operands (`a` is `[M, K]` with a unit stride along K) and returns new tensors; the
callers in `dispatch.py` reshape and decide which launcher (if any) applies.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from qcompile.lowering.triton import kernels

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_M = 16  # M up to this runs the decode (GEMV) configurations


def interpreting() -> bool:
    """Whether the kernels run on Triton's CPU interpreter (TRITON_INTERPRET=1 when Triton was first imported).

    Triton fixes the mode of every `@triton.jit` function, its own standard library included, when it is
    decorated, so the mode is a property of the process: the CPU tests run in a process started with it.
    """
    return type(kernels.w4_gemm_kernel).__name__ == "InterpretedFunction"


def _device_ok(t: Tensor) -> bool:
    return t.is_cuda or (interpreting() and t.device.type == "cpu")


@functools.lru_cache(maxsize=None)
def capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _m_bucket(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------------------------------ configurations

# Multiply-add contraction on (Triton 3.9's default, stated so that it does not change under us): the exact
# rounding helpers only ever contract products that are exact, and the epilogues gain accuracy from it.
_COMPILE_OPTIONS = {"enable_fp_fusion": True}


@dataclass(frozen=True)
class Cfg:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int = 1
    GROUP_M: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_K": self.BLOCK_K,
                "SPLIT_K": self.SPLIT_K, "GROUP_M": self.GROUP_M,
                "num_warps": self.num_warps, "num_stages": self.num_stages, **_COMPILE_OPTIONS}


# Decode (M <= 16): one 16-row tile, enough programs through narrow N tiles and split-K to keep every SM streaming
# weights. Prefill: classic tensor-core tiles for K, N in 2048..16384.
W4_DECODE = (
    Cfg(16, 64, 128, 1, 1, 4, 4),
    Cfg(16, 32, 128, 2, 1, 4, 4),
    Cfg(16, 64, 128, 4, 1, 4, 4),
    Cfg(16, 128, 128, 4, 1, 4, 3),
    Cfg(16, 32, 256, 4, 1, 4, 3),
    Cfg(16, 64, 256, 8, 1, 4, 3),
    Cfg(16, 128, 64, 8, 1, 4, 4),
    Cfg(16, 16, 256, 2, 1, 2, 4),
)
W4_PREFILL = (
    Cfg(128, 128, 64, 1, 8, 8, 3),
    Cfg(128, 256, 64, 1, 8, 8, 3),
    Cfg(64, 128, 64, 1, 8, 4, 4),
    Cfg(128, 64, 128, 1, 8, 4, 3),
    Cfg(64, 256, 128, 1, 8, 8, 3),
    Cfg(32, 128, 128, 1, 8, 4, 4),
)
W8_DECODE = (
    Cfg(16, 64, 128, 1, 1, 4, 4),
    Cfg(16, 64, 256, 2, 1, 4, 3),
    Cfg(16, 128, 128, 4, 1, 4, 4),
    Cfg(16, 32, 256, 4, 1, 4, 3),
    Cfg(16, 64, 128, 8, 1, 4, 4),
    Cfg(16, 128, 256, 8, 1, 8, 3),
)
W8_PREFILL = (
    Cfg(128, 128, 128, 1, 8, 8, 3),
    Cfg(128, 256, 64, 1, 8, 8, 3),
    Cfg(128, 256, 128, 1, 8, 8, 3),
    Cfg(64, 128, 128, 1, 8, 4, 4),
    Cfg(128, 64, 128, 1, 8, 4, 4),
    Cfg(64, 64, 128, 1, 8, 4, 4),
)
# float32 activations (weight-only layers of an fp32 model): small tiles; large fp32 tiles spill registers and
# take minutes to compile.
FP32_DECODE = (Cfg(16, 64, 64, 1, 1, 4, 3), Cfg(16, 64, 64, 4, 1, 4, 3), Cfg(16, 32, 64, 8, 1, 4, 3))
FP32_PREFILL = (Cfg(64, 64, 32, 1, 8, 4, 3), Cfg(32, 64, 64, 1, 8, 4, 3))



@dataclass(frozen=True)
class GemvCfg:
    """A configuration of the CUDA-core weight-only GEMV (`w4_gemv_kernel`), for M <= GEMV_MAX_M."""

    BLOCK_N: int
    BLOCK_KB: int  # bytes of each weight row per step (2 * BLOCK_KB elements)
    SPLIT_K: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def kwargs(self) -> dict:
        return {"BLOCK_N": self.BLOCK_N, "BLOCK_KB": self.BLOCK_KB, "SPLIT_K": self.SPLIT_K,
                "num_warps": self.num_warps, "num_stages": self.num_stages, **_COMPILE_OPTIONS}


GEMV_MAX_M = 4
# Tried alongside W4_DECODE on the first call of each shape; the fastest of both kernels is kept.
W4_GEMV = (
    GemvCfg(16, 128, 1, 4, 3),
    GemvCfg(32, 64, 1, 4, 3),
    GemvCfg(8, 256, 1, 4, 3),
    GemvCfg(16, 256, 1, 8, 3),
    GemvCfg(32, 128, 1, 8, 3),
    GemvCfg(16, 128, 2, 4, 4),
    GemvCfg(16, 128, 4, 4, 3),
    GemvCfg(4, 256, 2, 2, 4),
)
INTERPRET_GEMV = GemvCfg(8, 16, 2)

# One small configuration per kernel family for the CPU interpreter (its speed hardly depends on tile sizes);
# decode uses split-K so that the atomic path is exercised as well.
INTERPRET_W4 = {"decode": Cfg(16, 32, 64, 2, 1), "prefill": Cfg(32, 32, 64, 1, 2)}
INTERPRET_W8 = {"decode": Cfg(16, 32, 64, 2, 1), "prefill": Cfg(32, 32, 64, 1, 2)}


@functools.lru_cache(maxsize=None)
def _fit_configs(configs: tuple[Cfg, ...], *, min_half_k: int, k_divides: int | None) -> tuple[Cfg, ...]:
    """Adapt BLOCK_K to constraints: BLOCK_K // 2 >= min_half_k, and BLOCK_K divides `k_divides` when given."""
    out = []
    for c in configs:
        bk = c.BLOCK_K
        if k_divides is not None:
            while bk > 1 and k_divides % bk:
                bk //= 2
        if bk // 2 < min_half_k or (k_divides is not None and k_divides % bk):
            continue
        fitted = dataclasses.replace(c, BLOCK_K=bk)
        if fitted not in out:
            out.append(fitted)
    return tuple(out)


_CONFIG_SETS = {
    ("w4", False): (W4_DECODE, W4_PREFILL, INTERPRET_W4),
    ("w4", True): (FP32_DECODE, FP32_PREFILL, INTERPRET_W4),
    ("w8", False): (W8_DECODE, W8_PREFILL, INTERPRET_W8),
    ("w8", True): (FP32_DECODE, FP32_PREFILL, INTERPRET_W8),
}


@functools.lru_cache(maxsize=None)
def _plan(family: str, fp32: bool, phase: str, min_half_k: int, k_divides: int | None):
    """(candidate configurations, the interpreter's configuration) for one kernel variant.

    family "w4" / "w8"; fp32: float32 activations (small tiles); phase "decode" / "prefill".
    """
    decode_cfgs, prefill_cfgs, interpret = _CONFIG_SETS[(family, fp32)]
    phase_cfgs = decode_cfgs if phase == "decode" else prefill_cfgs
    configs = _fit_configs(phase_cfgs, min_half_k=min_half_k, k_divides=k_divides)
    if not configs:  # a small group/block size: any tile shape that fits, without split-K
        configs = tuple(
            dataclasses.replace(c, SPLIT_K=1, BLOCK_M=16 if phase == "decode" else c.BLOCK_M)
            for c in _fit_configs(decode_cfgs + prefill_cfgs, min_half_k=min_half_k, k_divides=k_divides)
        )
    if not configs:
        raise ValueError(f"no GEMM configuration fits (K tile >= {2 * min_half_k} dividing {k_divides})")
    fitted = _fit_configs((interpret[phase],), min_half_k=min_half_k, k_divides=k_divides)
    return configs, (fitted[0] if fitted else configs[0])


def _resolve(config: Cfg | None, configs, interpret_cfg, min_half_k: int, k_divides: int | None) -> Cfg | None:
    """A fixed configuration (the interpreter's, or a caller's adapted like the others), or None to tune."""
    if config is None:
        return interpret_cfg if interpreting() else None
    fitted = _fit_configs((config,), min_half_k=min_half_k, k_divides=k_divides)
    if not fitted:
        raise ValueError(f"configuration {config} cannot satisfy K tile >= {2 * min_half_k} dividing {k_divides}")
    return fitted[0]


_BEST: dict[tuple, Cfg] = {}


def tuned_configs() -> dict[tuple, Cfg]:
    """The configuration chosen for each tuning key so far (for reports and benchmarks)."""
    return dict(_BEST)


def _tune(key: tuple, configs: tuple[Cfg, ...], run) -> Cfg:
    """The fastest of `configs` for `key`, timing `run(cfg)` once per configuration on first use."""
    best = _BEST.get(key)
    if best is None:
        if len(configs) == 1 or torch.cuda.is_current_stream_capturing():
            return configs[0]
        timings, error = {}, None
        for cfg in configs:
            try:
                timings[cfg] = time_cuda(functools.partial(run, cfg), iters=5)
            except Exception as e:  # e.g. out of shared memory on a smaller GPU: skip that configuration
                error = e
        if not timings:
            raise RuntimeError(f"no configuration of the {key[0]} kernel could run for {key}") from error
        best = min(timings, key=timings.get)
        _BEST[key] = best
    return best


def time_cuda(fn, iters: int = 10) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream (after two warm-up calls, which compile)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 activations: full-precision products (tf32 would lose the reference's float32 accuracy).
    return "ieee" if dtype == torch.float32 else "tf32"


def _empty_product(m: int, n: int, bias: Tensor | None, out_dtype: torch.dtype, device) -> Tensor:
    out = torch.zeros((m, n), dtype=torch.float32, device=device)
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)


def _gemm(kernel, key, configs, config, m, n, out_dtype, device, pointers, ints, strides, flags,
          launch_other=None) -> Tensor:
    """Launch `kernel` as `kernel(*pointers, out, *ints, *strides, stride_om, **flags, **config)`.

    Split-K configurations accumulate into a zeroed float32 buffer, cast to `out_dtype` at the end; the others
    write `out_dtype` directly. A configuration that is not a `Cfg` belongs to another kernel for the same product,
    launched by `launch_other(config, out)`; tuning then chooses between the kernels too.
    """

    def run(cfg) -> Tensor:
        split = cfg.SPLIT_K > 1
        if split:
            buf = torch.zeros((m, n), dtype=torch.float32, device=device)
        else:
            buf = torch.empty((m, n), dtype=out_dtype, device=device)
        if isinstance(cfg, Cfg):
            grid = (triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N), cfg.SPLIT_K)
            kernel[grid](*pointers, buf, *ints, *strides, buf.stride(0), **flags, **cfg.kwargs())
        else:
            launch_other(cfg, buf)
        return buf.to(out_dtype) if split else buf

    if config is None:
        config = _tune(key, configs, run)
    return run(config)


# ------------------------------------------------------------------------------------ activation quantization


def quantize_rows(x: Tensor, fmt: str, static_scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row INT8 / FP8 E4M3 quantization of a 2-D `x`: (codes [M, K], float32 scales [M]).

    `static_scale` (a one-element tensor) replaces the per-row amax/qmax, as the static per-tensor scale of a
    calibrated recipe; a zero scale counts as 1.0. Rows holding NaN or inf get a NaN scale.
    """
    assert x.dim() == 2 and x.stride(-1) == 1
    m, k = x.shape
    is_fp8 = fmt == "fp8_e4m3"
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn if is_fp8 else torch.int8, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    static = static_scale is not None
    sp = static_scale.reshape(1).to(device=x.device, dtype=torch.float32) if static else scale
    block = min(4096, max(16, triton.next_power_of_2(k)))
    kernels.quant_rows_kernel[(m,)](
        x, q, scale, sp, k, x.stride(0), q.stride(0),
        IS_FP8=is_fp8, STATIC=static, BLOCK=block, num_warps=4 if block <= 1024 else 8, **_COMPILE_OPTIONS,
    )
    return q, scale


def quantize_nvfp4(x: Tensor, global_scale: Tensor, packed: bool = True, out_dtype: torch.dtype | None = None):
    """NVFP4 quantization of a 2-D `x` along K with a given float32 global scale (already 0 -> 1 sanitized).

    packed=True: (codes uint8 [M, Kp/2], block scales float8_e4m3fn [M, Kp/16]), Kp = K rounded up to 16, bit for
    bit `qcompile.numerics.quantize_nvfp4(x, global_scale=...)`. packed=False: the values E2M1 * block scale
    `[M, K]` in `out_dtype` (default x.dtype), i.e. the dequantized activation divided by the global scale.
    """
    assert x.dim() == 2 and x.stride(-1) == 1
    m, k = x.shape
    nblk = triton.cdiv(k, 16)
    gs = global_scale.reshape(1).to(device=x.device, dtype=torch.float32)
    if packed:
        out = torch.empty((m, nblk * 8), dtype=torch.uint8, device=x.device)
        bscale = torch.empty((m, nblk), dtype=torch.float8_e4m3fn, device=x.device)
        stride_s = bscale.stride(0)
    else:
        out = torch.empty((m, k), dtype=out_dtype or x.dtype, device=x.device)
        bscale, stride_s = out, 0
    if m == 0 or k == 0:
        return (out, bscale) if packed else out
    blocks = min(64, triton.next_power_of_2(nblk))
    grid = (m, triton.cdiv(nblk, blocks))
    kernels.quant_nvfp4_kernel[grid](
        x, out, bscale.view(torch.uint8) if packed else bscale, gs, k, nblk, x.stride(0), out.stride(0), stride_s,
        PACKED=packed, BLOCKS=blocks, num_warps=4, **_COMPILE_OPTIONS,
    )
    return (out, bscale) if packed else out


# -------------------------------------------------------------------------------------------------- GEMMs


def w8_gemm(
    a: Tensor,
    a_scale: Tensor | None,
    b: Tensor,
    b_scale: Tensor,
    b_block: int,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    config: Cfg | None = None,
) -> Tensor:
    """`a [M, K]` (float, or b's 8-bit type with `a_scale` [M] or [1]) times 8-bit `b [N, K]`^T, scaled, + bias.

    b_scale: one element (per tensor), N elements (per output channel), or `[ceil(N/bs), ceil(K/bs)]` block scales
    when `b_block = bs > 0`.
    """
    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0:
        return _empty_product(m, n, bias, out_dtype, a.device)
    a_float = a.dtype in FLOAT_DTYPES
    phase = "decode" if m <= DECODE_MAX_M else "prefill"
    # K tiles of 8-bit operands hold at least 32 elements (tensor-core minimum); block scales need BLOCK_K | block.
    min_half, divides = (8 if a_float else 16), (b_block or None)
    configs, interpret_cfg = _plan("w8", a.dtype == torch.float32, phase, min_half, divides)
    config = _resolve(config, configs, interpret_cfg, min_half, divides)
    if b_block:
        stride_bsn, stride_bsk = b_scale.stride(0), b_scale.stride(1)
    else:
        stride_bsn, stride_bsk = (0 if b_scale.numel() == 1 else 1), 0
        b_scale = b_scale.reshape(-1)
    has_as = a_scale is not None
    flags = dict(
        A_FLOAT=a_float, HAS_A_SCALE=has_as, B_BLOCK=b_block, HAS_BIAS=bias is not None,
        ACC_INT=a.dtype == torch.int8, DOT_PRECISION=_dot_precision(a.dtype),
    )
    stride_as = 0 if not has_as or a_scale.numel() == 1 else 1
    key = ("w8", phase, _m_bucket(m), n, k, a.dtype, b.dtype, out_dtype, a.device.index, stride_bsn,
           *flags.values())
    return _gemm(
        kernels.w8_gemm_kernel, key, configs, config, m, n, out_dtype, a.device,
        (a, a_scale if has_as else a, b, b_scale, bias if bias is not None else b_scale),
        (m, n, k), (a.stride(0), stride_as, b.stride(0), stride_bsn, stride_bsk), flags,
    )


@functools.lru_cache(maxsize=None)
def w4_after_dot(group: int, a_dtype: torch.dtype) -> bool:
    """Whether INT group scales can multiply whole K tiles (a power-of-two K tile fits inside a group)."""
    min_half = 8 if a_dtype in FLOAT_DTYPES else 16
    return bool(_fit_configs(W4_PREFILL + W4_DECODE, min_half_k=min_half, k_divides=group))


def w4_gemm(
    a: Tensor,
    a_scale: Tensor | None,
    packed: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    group_size: int,
    global_scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    config: Cfg | None = None,
) -> Tensor:
    """`a [M, K]` times a packed 4-bit weight `[N, Kp/2]`^T with in-kernel dequantization, scaled, + bias.

    INT4/INT3 (global_scale None): `scale` float32 `[N, Kp/group_size]`, `zero_point` uint8 or None. NVFP4
    (global_scale given): `scale` float8_e4m3fn block scales `[N, Kp/16]`. `a` is float (fp16/bf16/fp32), or
    INT8 / FP8 with `a_scale` ([M] or one element) for INT weights.
    """
    m, k = a.shape
    n, kp2 = packed.shape
    if m == 0 or n == 0 or k == 0:
        return _empty_product(m, n, bias, out_dtype, a.device)
    is_nvfp4 = global_scale is not None
    a_kind = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(a.dtype, 0)
    group = 16 if is_nvfp4 else group_size
    after_dot = not is_nvfp4 and w4_after_dot(group, a.dtype)
    if a_kind and (is_nvfp4 or not after_dot):
        raise ValueError(f"{a.dtype} activations need INT weights whose group has a power-of-two divisor >= 32")
    phase = "decode" if m <= DECODE_MAX_M else "prefill"
    min_half, divides = (16 if a_kind else 8), (group if after_dot else None)
    configs, interpret_cfg = _plan("w4", a.dtype == torch.float32, phase, min_half, divides)
    gemv_configs = _gemv_configs(m, group, is_nvfp4) if a_scale is None else ()
    if isinstance(config, GemvCfg) and not (gemv_configs and (is_nvfp4 or group % (2 * config.BLOCK_KB) == 0)):
        raise ValueError(f"{config} needs float activations without a scale, at most {GEMV_MAX_M} rows, and "
                         f"chunks of 2*BLOCK_KB elements inside a group ({group})")
    if gemv_configs and not isinstance(config, Cfg):
        # few rows of float A: the GEMV competes with the tile kernel's decode configurations when tuning
        configs = gemv_configs + configs
        if config is None and interpreting():
            config = gemv_configs[-1]  # the interpreter's configuration (split-K, several chunks per row)
    else:
        config = _resolve(config, configs, interpret_cfg, min_half, divides)
    has_as = a_scale is not None
    if is_nvfp4:
        scale = scale.view(torch.uint8)  # decoded in the kernel by integer ops (no FP8 type needed on the GPU)
    zp = zero_point if zero_point is not None else packed
    flags = dict(
        IS_NVFP4=is_nvfp4, HAS_ZP=zero_point is not None, GROUP=group, SCALE_AFTER_DOT=after_dot,
        A_KIND=a_kind, HAS_A_SCALE=has_as, HAS_BIAS=bias is not None, DOT_PRECISION=_dot_precision(a.dtype),
    )
    stride_as = 0 if not has_as or a_scale.numel() == 1 else 1
    gs = global_scale.reshape(1) if is_nvfp4 else a
    bias_arg = bias if bias is not None else a
    key = ("w4", phase, _m_bucket(m), n, k, a.dtype, out_dtype, a.device.index, *flags.values())
    gemv_flags = dict(IS_NVFP4=is_nvfp4, HAS_ZP=zero_point is not None, GROUP=group, HAS_BIAS=bias is not None,
                      BLOCK_M=triton.next_power_of_2(m))

    def launch_gemv(cfg: GemvCfg, buf: Tensor) -> None:
        grid = (triton.cdiv(n, cfg.BLOCK_N), cfg.SPLIT_K)
        kernels.w4_gemv_kernel[grid](
            a, packed, scale, zp, gs, bias_arg, buf, m, n, k, kp2,
            a.stride(0), packed.stride(0), scale.stride(0), zp.stride(0), buf.stride(0),
            **gemv_flags, **cfg.kwargs(),
        )

    return _gemm(
        kernels.w4_gemm_kernel, key, configs, config, m, n, out_dtype, a.device,
        (a, a_scale if has_as else a, packed, scale, zp, gs, bias_arg),
        (m, n, k, kp2), (a.stride(0), stride_as, packed.stride(0), scale.stride(0), zp.stride(0)), flags,
        launch_other=launch_gemv,
    )


@functools.lru_cache(maxsize=None)
def _gemv_configs(m: int, group: int, is_nvfp4: bool) -> tuple[GemvCfg, ...]:
    """The GEMV configurations for float activations with m rows: chunks inside one INT group (2*BLOCK_KB
    divides it) or whole NVFP4 blocks (BLOCK_KB a multiple of 8 bytes); empty when M is too large or none fits.

    The kernel shares each decoded weight tile among the m rows, so the tile shape does not depend on m."""
    if m > GEMV_MAX_M:
        return ()
    out = []
    for c in (INTERPRET_GEMV,) if interpreting() else W4_GEMV:
        kb, bn = c.BLOCK_KB, c.BLOCK_N
        if not is_nvfp4:
            while kb >= 16 and group % (2 * kb):
                kb, bn = kb // 2, bn * 2  # same bytes per step: wide loads stay wide
            if kb < 16:
                continue
        fitted = dataclasses.replace(c, BLOCK_KB=kb, BLOCK_N=bn)
        if fitted not in out:
            out.append(fitted)
    return tuple(out)


# ------------------------------------------------------------------------------------------ cuBLASLt path


def scaled_mm_fp8(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, bias: Tensor | None, out_dtype) -> Tensor:
    """The FP8 x FP8 product through `torch._scaled_mm` (cuBLASLt): row-wise scales, bf16 output."""
    m, n = a.shape[0], b.shape[0]
    sa = a_scale.reshape(-1, 1).expand(m, 1).contiguous() if a_scale.numel() == 1 else a_scale.reshape(m, 1)
    sb = b_scale.reshape(1, -1).expand(1, n).contiguous() if b_scale.numel() == 1 else b_scale.reshape(1, n)
    out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


def scaled_mm_supported(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> bool:
    n, k = b.shape
    return (
        a.is_cuda and a.dtype == torch.float8_e4m3fn and out_dtype == torch.bfloat16
        and k % 16 == 0 and n % 16 == 0 and capability(a.device.index or 0) >= (9, 0)
    )


__all__ = [
    "Cfg",
    "DECODE_MAX_M",
    "GEMV_MAX_M",
    "GemvCfg",
    "capability",
    "ceil_div",
    "interpreting",
    "quantize_nvfp4",
    "quantize_rows",
    "scaled_mm_fp8",
    "scaled_mm_supported",
    "time_cuda",
    "tuned_configs",
    "w4_after_dot",
    "w4_gemm",
    "w8_gemm",
]
