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
from typing import ClassVar

import torch
import triton
from torch import Tensor

from qcompile.lowering.triton import dequant, gemv, kernels

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


def next_pow2(n: int) -> int:
    """`triton.next_power_of_2` for n >= 1. Host arithmetic on every call stays in
    plain Python: triton.cdiv and next_power_of_2 are jit-able builtins that cost ~2 us per call on the host."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


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
    """A configuration of the weight-only GEMV, for M <= GEMV_MAX_M: on the CUDA cores (`gemv.w4_gemv_kernel`)
    or, with MMA, on the tensor cores (`gemv.w4_gemv_mma_kernel`).

    Each program covers BLOCK_N weight rows; each iteration of its K loop reads BLOCK_C chunks of 16 bytes (32
    elements) of every one of those rows. CUDA cores: one chunk per thread when BLOCK_C = 32 * num_warps, so each
    thread keeps BLOCK_N 16-byte loads in flight. Tensor cores: BLOCK_N = 16 or 32 (MMA row tiles), BLOCK_C =
    4 * num_warps (a block of 128 elements per warp). One launch, no split-K (grid: N / BLOCK_N programs)."""

    BLOCK_N: int
    BLOCK_C: int
    num_warps: int = 4
    MMA: bool = False
    SPLIT_K: ClassVar[int] = 1  # read by `_gemm`: the GEMV writes the output dtype itself

    @property
    def kernel(self):
        return gemv.w4_gemv_mma_kernel if self.MMA else gemv.w4_gemv_kernel

    def kwargs(self) -> dict:
        return {"BLOCK_N": self.BLOCK_N, "BLOCK_C": self.BLOCK_C, "num_warps": self.num_warps, "num_stages": 1,
                **_COMPILE_OPTIONS}


GEMV_MAX_M = 4
# Tried alongside W4_DECODE on the first call of each shape; the fastest of both kernels is kept. Rows per program
# trade loads in flight per thread (and activation reuse) against the number of programs N / BLOCK_N (16 rows
# take about 250 registers a thread); BLOCK_C below 32 * num_warps puts several rows' chunks side by side for
# short K.
W4_GEMV = (
    GemvCfg(8, 128, 4),
    GemvCfg(4, 128, 4),
    GemvCfg(8, 256, 8),
    GemvCfg(4, 256, 8),
    GemvCfg(4, 64, 2),
    GemvCfg(8, 64, 2),
    GemvCfg(2, 128, 4),
    GemvCfg(8, 32, 4),
)
INTERPRET_GEMV = GemvCfg(4, 4, 1)
# The tensor-core GEMV (fp16/bf16 activations, INT groups a multiple of 128 or NVFP4, K a multiple of 8), tried
# before the CUDA-core one: about 2.2 SASS instructions per INT4 weight and 3.6 per NVFP4 weight against 3.7 and 5.5
# (docs/gpu.md). Two row tiles of 16 share each activation load; the warps of a program split K.
W4_GEMV_MMA = (
    GemvCfg(32, 16, 4, True),
    GemvCfg(32, 32, 8, True),
    GemvCfg(32, 8, 2, True),
    GemvCfg(32, 64, 16, True),
    GemvCfg(16, 32, 8, True),  # one row tile: twice the programs for small N, at 2.7 (INT4) and 4.1 (NVFP4)
)
INTERPRET_GEMV_MMA = GemvCfg(32, 4, 1, True)

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
            grid = (ceil_div(m, cfg.BLOCK_M) * ceil_div(n, cfg.BLOCK_N), cfg.SPLIT_K)
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
    block = min(4096, max(16, next_pow2(k)))
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
    nblk = ceil_div(k, 16)
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
    blocks = min(64, next_pow2(nblk))
    grid = (m, ceil_div(nblk, blocks))
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
    quant_a: bool = False,
) -> Tensor:
    """`a [M, K]` (float, or b's 8-bit type with `a_scale` [M] or [1]) times 8-bit `b [N, K]`^T, scaled, + bias.

    b_scale: one element (per tensor), N elements (per output channel), or `[ceil(N/bs), ceil(K/bs)]` block scales
    when `b_block = bs > 0`. quant_a: float `a` (no `a_scale`) is quantized to b's type with dynamic per-row
    scales inside the GEMM (as `quantize_rows(a, ...)` would, bit for bit): one kernel instead of two, for decode.
    """
    m, k = a.shape
    n = b.shape[0]
    if quant_a and (a_scale is not None or a.dtype not in FLOAT_DTYPES):
        raise ValueError("quant_a takes float activations without a scale")
    if m == 0 or n == 0 or k == 0:
        return _empty_product(m, n, bias, out_dtype, a.device)
    a_float = a.dtype in FLOAT_DTYPES and not quant_a
    phase = "decode" if m <= DECODE_MAX_M else "prefill"
    # K tiles of 8-bit operands hold at least 32 elements (tensor-core minimum); block scales need BLOCK_K | block.
    min_half, divides = (8 if a_float else 16), (b_block or None)
    configs, interpret_cfg = _plan("w8", a.dtype == torch.float32 and a_float, phase, min_half, divides)
    config = _resolve(config, configs, interpret_cfg, min_half, divides)
    if b_block:
        stride_bsn, stride_bsk = b_scale.stride(0), b_scale.stride(1)
    else:
        stride_bsn, stride_bsk = (0 if b_scale.numel() == 1 else 1), 0
        b_scale = b_scale.reshape(-1)
    has_as = a_scale is not None
    flags = dict(
        A_FLOAT=a_float, HAS_A_SCALE=has_as, B_BLOCK=b_block, HAS_BIAS=bias is not None,
        ACC_INT=(b if quant_a else a).dtype == torch.int8,
        DOT_PRECISION=_dot_precision(b.dtype if quant_a else a.dtype),
        QUANT_A=quant_a,
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
    Without `config`, products that PyTorch's GEMMs run faster leave first (`dequant.py`): fp16/bf16 prefill
    (M >= dequant.PREFILL_DEQUANT_MIN_M) as dequantize + cuBLAS, and the opt-in tinygemm path.
    """
    m, k = a.shape
    n, kp2 = packed.shape
    if m == 0 or n == 0 or k == 0:
        return _empty_product(m, n, bias, out_dtype, a.device)
    is_nvfp4 = global_scale is not None
    if config is None:  # PyTorch's GEMMs where they win (dequant.py); an explicit config asks for this kernel
        if dequant.tinygemm_applies(a, a_scale is not None, packed, zero_point, group_size, is_nvfp4):
            return dequant.tinygemm_mm(a, packed, scale, zero_point, group_size, bias, out_dtype)
        alpha = dequant.prefill_alpha(m, a.dtype, a_scale is not None, scale, zero_point, global_scale)
        if alpha is not None:
            return dequant.prefill_gemm(a, packed, scale, zero_point, group_size, is_nvfp4, alpha, bias, out_dtype)
    a_kind = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(a.dtype, 0)
    group = 16 if is_nvfp4 else group_size
    after_dot = not is_nvfp4 and w4_after_dot(group, a.dtype)
    if a_kind and (is_nvfp4 or not after_dot):
        raise ValueError(f"{a.dtype} activations need INT weights whose group has a power-of-two divisor >= 32")
    phase = "decode" if m <= DECODE_MAX_M else "prefill"
    min_half, divides = (16 if a_kind else 8), (group if after_dot else None)
    configs, interpret_cfg = _plan("w4", a.dtype == torch.float32, phase, min_half, divides)
    gemv_configs = (_gemv_configs(m, group, is_nvfp4, _gemv_mma(a, group, is_nvfp4))
                    if a_scale is None and _gemv_words(packed) else ())
    if isinstance(config, GemvCfg) and not gemv_configs:
        raise ValueError(f"{config} needs float activations without a scale, at most {GEMV_MAX_M} rows, INT groups "
                         f"of a multiple of 32 (here {group}) and packed rows of a multiple of 16 bytes (here {kp2})")
    if isinstance(config, GemvCfg) and config.MMA and not _gemv_mma(a, group, is_nvfp4):
        raise ValueError(f"{config} needs fp16/bf16 activations, K a multiple of 8 and INT groups of a multiple of "
                         f"128 (here {group})")
    if gemv_configs and not isinstance(config, Cfg):
        # few rows of float A: the GEMV competes with the tile kernel's decode configurations when tuning
        configs = gemv_configs + configs
        if config is None and interpreting():
            config = gemv_configs[0]  # the interpreter's configuration
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
                      BLOCK_M=next_pow2(m))

    def launch_gemv(cfg: GemvCfg, buf: Tensor) -> None:
        words = packed.view(torch.int32)  # 8 codes per word; _gemv_words checked that the view exists
        bits = -1912566272 if is_nvfp4 else 0x7F800000  # the kernel's shared bit mask (gemv.py)
        cfg.kernel[(ceil_div(n, cfg.BLOCK_N),)](
            _gemv_a(cfg, a), words, scale, zp, gs, bias_arg, buf, m, n, k, kp2 // 4, bits,
            a.stride(0), words.stride(0), scale.stride(0), zp.stride(0), buf.stride(0),
            **gemv_flags, **cfg.kwargs(),
        )

    return _gemm(
        kernels.w4_gemm_kernel, key, configs, config, m, n, out_dtype, a.device,
        (a, a_scale if has_as else a, packed, scale, zp, gs, bias_arg),
        (m, n, k, kp2), (a.stride(0), stride_as, packed.stride(0), scale.stride(0), zp.stride(0)), flags,
        launch_other=launch_gemv,
    )


def _gemv_words(packed: Tensor) -> bool:
    """Whether the GEMV can read `packed` as int32 words in whole 16-byte chunks per row."""
    return (packed.stride(-1) == 1 and packed.shape[-1] % 16 == 0 and packed.stride(0) % 4 == 0
            and packed.storage_offset() % 4 == 0)


@functools.lru_cache(maxsize=None)
def _gemv_configs(m: int, group: int, is_nvfp4: bool, mma: bool = False) -> tuple[GemvCfg, ...]:
    """The GEMV configurations for float activations with m rows; empty when M is too large or an INT group is
    not a multiple of 32 (the kernel scales each 32-element chunk by one group scale). mma: the tensor-core GEMV
    applies too (`_gemv_mma`); its configurations come first, and the interpreter runs it.

    The kernels share each decoded weight among the m rows, so the configuration does not depend on m."""
    if m > GEMV_MAX_M or (not is_nvfp4 and group % 32):
        return ()
    if interpreting():
        return (INTERPRET_GEMV_MMA,) if mma else (INTERPRET_GEMV,)
    return W4_GEMV_MMA + W4_GEMV if mma else W4_GEMV


def _gemv_mma(a: Tensor, group: int, is_nvfp4: bool) -> bool:
    """Whether the tensor-core GEMV applies: fp16/bf16 activations read as 4-byte words (an even row stride and
    K a multiple of 8), and INT groups a multiple of its 128-element blocks."""
    return (a.dtype in (torch.float16, torch.bfloat16) and a.stride(-1) == 1 and a.shape[-1] % 8 == 0
            and (a.stride(0) % 2 == 0 or a.shape[0] == 1) and (is_nvfp4 or group % 128 == 0)
            and (not a.is_cuda or a.data_ptr() % 4 == 0))


def _gemv_a(cfg: GemvCfg, a: Tensor) -> Tensor:
    """The activation as the GEMV reads it: the tensor-core kernel reads 4-byte words, so a later call's activation
    that lost that alignment is copied (a plan keeps the configuration chosen for the first call)."""
    if cfg.MMA and a.is_cuda and (a.data_ptr() % 4 or (a.stride(0) % 2 and a.shape[0] > 1)):
        return a.contiguous() if not a.is_contiguous() else a.clone()
    return a


# ------------------------------------------------------------------------------------------ prepared launches
# A decode step calls every layer with the same weights and the same M, so everything a launch derives from the
# weight, the activation's dtype/device, K, N and M (configuration, grid, flags, strides, the kernel itself) is
# derived once: `w8_prepare` / `w4_prepare` take the first call's operands and return a function of the call's
# tensors that allocates the output and launches. The dispatch plans (`dispatch.py`) keep one per M.

DIRECT_LAUNCH = True  # call the compiled kernel directly once Triton has bound it (see _KernelCall)


class _KernelCall:
    """`kernel[grid](*args, **kwargs)` with the grid and keyword arguments (constexprs, options) fixed.

    On CUDA the first launch goes through Triton's `JITFunction.run` (argument binding, specialization, the cache
    of compiled kernels); it returns the `CompiledKernel`, whose launcher later calls use directly, with the
    arguments `run` itself would pass after its lookup, as long as:
    - the per-call arguments specialize as at that first launch. The caller passes that as `guard`: Triton
      specializes pointers on 16-byte alignment and integers on being 1 or a multiple of 16, and the caller knows
      which of its arguments can change between calls (None: never launch directly);
    - the current device is the one the kernel was loaded on (the stream is that device's current stream, read
      per call, so CUDA-graph capture records the launch as `run` would);
    - no launch hook is installed (profilers get `run`'s launch metadata).
    Anything else takes `kernel[grid](...)`, which is always correct.
    """

    __slots__ = ("kernel", "grid", "kwargs", "compiled", "guard", "tail", "g", "device")

    def __init__(self, kernel, grid: tuple, kwargs: dict):
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs
        self.g = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)
        self.compiled = self.guard = self.tail = self.device = None

    def __call__(self, guard, *args) -> None:
        c = self.compiled
        if c is not None and guard == self.guard and _hookless():
            device = torch._C._cuda_getDevice()
            if device == self.device:
                c.run(*self.g, torch._C._cuda_getCurrentRawStream(device), c.function, c.packed_metadata, None,
                      None, None, *args, *self.tail)
                return
        compiled = self.kernel[self.grid](*args, **self.kwargs)
        if c is None and DIRECT_LAUNCH and guard is not None and _direct_ok(compiled):
            params = self.kernel.params
            # the bound values after the positional ones, in parameter order (defaults included): what
            # JITFunction.run hands the launcher
            self.tail = tuple(self.kwargs[p.name] if p.name in self.kwargs else p.default for p in params[len(args):])
            self.device = torch._C._cuda_getDevice()
            self.compiled, self.guard = compiled, guard


def _direct_ok(compiled) -> bool:
    """Whether a launch returned a compiled kernel whose launcher can be called directly (not the interpreter)."""
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))


try:
    from triton import knobs as _knobs

    _hooks = _knobs.runtime
except ImportError:  # an older Triton: no direct launches
    DIRECT_LAUNCH, _hooks = False, None


def _hookless() -> bool:
    """Whether no launch hook is installed (Triton keeps them as possibly empty chains, or None, or a function)."""
    enter, leave = _hooks.launch_enter_hook, _hooks.launch_exit_hook
    return (enter is None or not getattr(enter, "calls", True)) and (leave is None or not getattr(leave, "calls", True))


def _a_guard(a: Tensor):
    """How the activation specializes a kernel (it is the one operand that changes between a plan's calls; the
    output and quantized operands are new allocations, aligned), or None off CUDA (no direct launch)."""
    return (a.data_ptr() & 15, a.stride(0)) if a.is_cuda else None


class _TileLaunch:
    """A tile kernel's launch for one (weight, dtype, M): the configuration once known (fixed, or tuned by the
    first call through the general launcher), and then the output allocation and the launch."""

    __slots__ = ("key", "m", "n", "out_dtype", "device", "kernel", "flags", "cfg", "split", "call", "launch_other")

    def __init__(self, kernel, key, cfg, m, n, out_dtype, device, flags, launch_other=None):
        self.kernel, self.key, self.m, self.n = kernel, key, m, n
        self.out_dtype, self.device, self.flags, self.launch_other = out_dtype, device, flags, launch_other
        self.cfg = self.call = None
        if cfg is not None:
            self._set(cfg)

    def _set(self, cfg) -> None:
        self.cfg, self.split = cfg, cfg.SPLIT_K > 1
        if isinstance(cfg, Cfg):
            grid = (ceil_div(self.m, cfg.BLOCK_M) * ceil_div(self.n, cfg.BLOCK_N), cfg.SPLIT_K)
            self.call = _KernelCall(self.kernel, grid, {**self.flags, **cfg.kwargs()})
        else:
            self.call = self.launch_other(cfg)

    def ready(self) -> bool:
        """Whether the configuration is known (else the caller runs the general launcher, which tunes)."""
        if self.cfg is None:
            cfg = _BEST.get(self.key)
            if cfg is None:
                return False
            self._set(cfg)
        return True

    def buffer(self) -> Tensor:
        if self.split:
            return torch.zeros((self.m, self.n), dtype=torch.float32, device=self.device)
        return torch.empty((self.m, self.n), dtype=self.out_dtype, device=self.device)


def w8_prepare(a: Tensor, a_scale: Tensor | None, b: Tensor, b_scale: Tensor, b_block: int, bias: Tensor | None,
               out_dtype: torch.dtype, quant_a: bool = False):
    """`w8_gemm` for these operands, prepared: a function `(a, a_scale, b, b_scale, bias) -> Tensor` for later
    calls with tensors of the same shapes, dtypes and device (and the same weight, scales and bias), bit for bit
    `w8_gemm(a, a_scale, b, b_scale, b_block, bias, out_dtype, quant_a=quant_a)`."""

    def general(a, a_scale, b, b_scale, bias):
        return w8_gemm(a, a_scale, b, b_scale, b_block, bias, out_dtype, quant_a=quant_a)

    m, k = a.shape
    n = b.shape[0]
    if m == 0 or n == 0 or k == 0 or (quant_a and (a_scale is not None or a.dtype not in FLOAT_DTYPES)):
        return general
    a_float = a.dtype in FLOAT_DTYPES and not quant_a
    phase = "decode" if m <= DECODE_MAX_M else "prefill"
    min_half, divides = (8 if a_float else 16), (b_block or None)
    configs, interpret_cfg = _plan("w8", a.dtype == torch.float32 and a_float, phase, min_half, divides)
    config = _resolve(None, configs, interpret_cfg, min_half, divides)
    if b_block:
        stride_bsn, stride_bsk = b_scale.stride(0), b_scale.stride(1)
    else:
        stride_bsn, stride_bsk = (0 if b_scale.numel() == 1 else 1), 0
    flat_scale = not b_block and not b_scale.is_contiguous()  # else the tensor is its own flat view
    has_as, has_bias = a_scale is not None, bias is not None
    flags = dict(
        A_FLOAT=a_float, HAS_A_SCALE=has_as, B_BLOCK=b_block, HAS_BIAS=has_bias,
        ACC_INT=(b if quant_a else a).dtype == torch.int8,
        DOT_PRECISION=_dot_precision(b.dtype if quant_a else a.dtype),
        QUANT_A=quant_a,
    )
    stride_as = 0 if not has_as or a_scale.numel() == 1 else 1
    stride_bn = b.stride(0)
    key = ("w8", phase, _m_bucket(m), n, k, a.dtype, b.dtype, out_dtype, a.device.index, stride_bsn,
           *flags.values())
    tile = _TileLaunch(kernels.w8_gemm_kernel, key, config, m, n, out_dtype, a.device, flags)

    def run(a, a_scale, b, b_scale, bias):
        if tile.call is None and not tile.ready():
            return general(a, a_scale, b, b_scale, bias)
        if flat_scale:
            b_scale = b_scale.reshape(-1)
        buf = tile.buffer()
        tile.call(_a_guard(a), a, a_scale if has_as else a, b, b_scale, bias if has_bias else b_scale, buf,
                  m, n, k, a.stride(0), stride_as, stride_bn, stride_bsn, stride_bsk, n)
        return buf.to(out_dtype) if tile.split else buf

    return run


def w4_prepare(a: Tensor, a_scale: Tensor | None, packed: Tensor, scale: Tensor, zero_point: Tensor | None,
               group_size: int, global_scale: Tensor | None, bias: Tensor | None, out_dtype: torch.dtype):
    """`w4_gemm` for these operands, prepared: a function `(a, a_scale, packed, scale, zero_point, global_scale,
    bias) -> Tensor` for later calls with tensors of the same shapes, dtypes and device (and the same weight,
    scales and bias), bit for bit `w4_gemm(...)` without `config`. Products that leave for PyTorch's GEMMs
    (prefill, tinygemm) keep the general launcher."""

    def general(a, a_scale, packed, scale, zero_point, global_scale, bias):
        gs = global_scale.reshape(1) if global_scale is not None else None
        return w4_gemm(a, a_scale, packed, scale, zero_point, group_size, gs, bias, out_dtype)

    m, k = a.shape
    n, kp2 = packed.shape
    is_nvfp4 = global_scale is not None
    if m == 0 or n == 0 or k == 0 or m >= dequant.PREFILL_DEQUANT_MIN_M:
        return general  # prefill: the host's share is small, and the dequantize path reads the weight per call
    if dequant.tinygemm_applies(a, a_scale is not None, packed, zero_point, group_size, is_nvfp4):
        return general
    a_kind = {torch.int8: 1, torch.float8_e4m3fn: 2}.get(a.dtype, 0)
    group = 16 if is_nvfp4 else group_size
    after_dot = not is_nvfp4 and w4_after_dot(group, a.dtype)
    if a_kind and (is_nvfp4 or not after_dot):
        return general  # raises as w4_gemm does
    phase = "decode" if m <= DECODE_MAX_M else "prefill"
    min_half, divides = (16 if a_kind else 8), (group if after_dot else None)
    configs, interpret_cfg = _plan("w4", a.dtype == torch.float32, phase, min_half, divides)
    gemv_configs = (_gemv_configs(m, group, is_nvfp4, _gemv_mma(a, group, is_nvfp4))
                    if a_scale is None and _gemv_words(packed) else ())
    config = (gemv_configs[0] if gemv_configs and interpreting()
              else _resolve(None, configs, interpret_cfg, min_half, divides))
    has_as, has_zp, has_bias = a_scale is not None, zero_point is not None, bias is not None
    flags = dict(
        IS_NVFP4=is_nvfp4, HAS_ZP=has_zp, GROUP=group, SCALE_AFTER_DOT=after_dot,
        A_KIND=a_kind, HAS_A_SCALE=has_as, HAS_BIAS=has_bias, DOT_PRECISION=_dot_precision(a.dtype),
    )
    stride_as = 0 if not has_as or a_scale.numel() == 1 else 1
    stride_wn, stride_sn = packed.stride(0), scale.stride(0)
    stride_zn = zero_point.stride(0) if has_zp else stride_wn
    key = ("w4", phase, _m_bucket(m), n, k, a.dtype, out_dtype, a.device.index, *flags.values())
    words_stride = packed.stride(0) // 4  # of the int32 view the GEMV reads (_gemv_words checked it exists)

    # the closures below hold no tensor (a plan must not keep its weight alive): only numbers and flags
    def gemv_launch(cfg: GemvCfg):
        # the arguments of launch_gemv in w4_gemm, fixed for this product
        call = _KernelCall(cfg.kernel, (ceil_div(n, cfg.BLOCK_N),), dict(
            IS_NVFP4=is_nvfp4, HAS_ZP=has_zp, GROUP=group, HAS_BIAS=has_bias, BLOCK_M=next_pow2(m),
            **cfg.kwargs()))
        bits = -1912566272 if is_nvfp4 else 0x7F800000  # the kernel's shared bit mask (gemv.py)

        def launch_gemv(a, packed, scale, zp, gs, bias_arg, buf):
            a = _gemv_a(cfg, a)
            call(_a_guard(a), a, packed.view(torch.int32), scale, zp, gs, bias_arg, buf, m, n, k, kp2 // 4, bits,
                 a.stride(0), words_stride, stride_sn, stride_zn, n)

        return launch_gemv

    tile = _TileLaunch(kernels.w4_gemm_kernel, key, config, m, n, out_dtype, a.device, flags,
                       launch_other=gemv_launch)

    def run(a, a_scale, packed, scale, zero_point, global_scale, bias):
        if tile.call is None and not tile.ready():
            return general(a, a_scale, packed, scale, zero_point, global_scale, bias)
        if is_nvfp4:
            scale = scale.view(torch.uint8)
        zp = zero_point if has_zp else packed
        gs = global_scale if is_nvfp4 else a  # one float32 element: only its address is read
        bias_arg = bias if has_bias else a
        buf = tile.buffer()
        if tile.launch_other is not None and not isinstance(tile.cfg, Cfg):
            tile.call(a, packed, scale, zp, gs, bias_arg, buf)
        else:
            tile.call(_a_guard(a), a, a_scale if has_as else a, packed, scale, zp, gs, bias_arg, buf, m, n, k, kp2,
                      a.stride(0), stride_as, stride_wn, stride_sn, stride_zn, n)
        return buf.to(out_dtype) if tile.split else buf

    return run


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
    """Whether `scaled_mm_fp8` can run `a` (FP8, or float about to be quantized to FP8 per row) times FP8 `b`:
    row-wise scaling (scale_a [M, 1], scale_b [1, N], float32) needs sm_90, bf16 output and N, K multiples of 16."""
    n, k = b.shape
    return (
        a.is_cuda and a.dtype in (torch.float8_e4m3fn, *FLOAT_DTYPES) and b.dtype == torch.float8_e4m3fn
        and out_dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0
        and capability(a.device.index or 0) >= (9, 0) and hasattr(torch, "_scaled_mm")
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
    "w4_prepare",
    "w8_gemm",
    "w8_prepare",
]
