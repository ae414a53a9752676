"""4-bit weights through PyTorch's own GEMMs: dequantize-then-cuBLAS for prefill, and the opt-in tinygemm path.

Prefill (M >= `PREFILL_DEQUANT_MIN_M` rows of fp16/bf16 activations, no activation scale): the packed INT4/INT3
or NVFP4 weight is dequantized by `dequant_w4_kernel` into a `[N, K]` buffer of the activation dtype, and the
product is one `torch.addmm` (cuBLAS), which also adds the bias. At this size the GEMM is compute-bound, so
reading the weight once more as 16-bit values costs little next to a tensor-core GEMM that cuBLAS runs at full
speed, which the in-register dequantizing GEMM does not reach.

Numerics (docs/gpu.md):
- INT groups: each weight is `code * group scale` (minus the zero point first) in float32, rounded once to the
  activation dtype (as the in-kernel dequantize-first GEMM does for groups no K tile fits); the buffer is that
  rounding of `numerics.dequantize_int4`, bit for bit. Each weight then carries a relative error of at most
  the activation dtype's unit roundoff (2**-11 for fp16, 2**-8 for bf16).
- NVFP4: the buffer holds `E2M1 value * FP8 block scale`, exact in fp16/bf16; the float32 global scale is the
  `alpha` of the GEMM, applied in float32 before the single rounding of the output.
- The bias is added by cuBLAS in the activation dtype (rounded to it first when it is float32).

Both need one fact about the weight on the host (the largest INT scale, to rule out a buffer that overflows the
activation dtype; the NVFP4 global scale, as `alpha`): it is read once per weight tensor (one synchronisation) and
cached (`WeightCache`). Under CUDA-graph capture without a cached value the Triton GEMM runs instead.

tinygemm (`QCOMPILE_INT4_BACKEND=tinygemm`, opt-in): INT4/INT3 weight-only layers with bf16 activations below
the prefill threshold go through `torch._weight_int4pack_mm`, after repacking the weight once per tensor
(`torch._convert_weight_to_int4pack`) with bf16 scales and zeros. Not bit-exact to the reference: tinygemm keeps
scales and zero offsets in bf16 and computes `(u - 8) * scale + zero` in its own arithmetic.
"""

from __future__ import annotations

import os
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from qcompile.lowering.triton import kernels
from qcompile.lowering.triton.kernels import (
    _e2m1_decode,
    _fp8_e4m3_bits_to_f32,
    _signed_nibble_f32,
    _unsigned_nibble_f32,
)

PREFILL_DEQUANT_MIN_M = 64  # rows from which the dequantize + cuBLAS path replaces the Triton 4-bit GEMM
# "cublas" (default): dequantize + torch.addmm for M >= PREFILL_DEQUANT_MIN_M; "triton": always the Triton GEMM.
W4_PREFILL = os.environ.get("QCOMPILE_W4_PREFILL", "cublas")
# "triton" (default) or "tinygemm": INT4/INT3 weight-only bf16 layers below the prefill threshold through
# torch._weight_int4pack_mm (scales rounded to bf16, not bit-exact).
INT4_BACKEND = os.environ.get("QCOMPILE_INT4_BACKEND", "triton")
TINYGEMM_GROUPS = (32, 64, 128, 256)
TINYGEMM_INNER_K_TILES = 8


# ------------------------------------------------------------------------------------------------- kernel


@triton.jit
def _round_to_bf16(w):
    """float32 -> bf16, nearest with ties to even, by integer ops: the same bits on the GPU (whose cast does the
    same) and in the CPU interpreter (whose cast truncates). Overflow gives inf; NaN stays NaN."""
    bits = w.to(tl.int32, bitcast=True)
    r = bits + 0x7FFF + ((bits >> 16) & 1)
    r = tl.where(w != w, bits | 0x400000, r)
    return (r >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def dequant_w4_kernel(
    w_ptr, s_ptr, zp_ptr, out_ptr, N, K, KP2,
    stride_wn, stride_sn, stride_zn, stride_om,
    IS_NVFP4: tl.constexpr, HAS_ZP: tl.constexpr, GROUP: tl.constexpr, SUB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
):
    """out[n, k] = dequantized W[n, k] in out's dtype, k < K; W packed uint8 [N, KP2], low nibble = even element.

    Each program reads BLOCK_N rows of BLOCK_KB contiguous bytes (wide loads) and writes 2*BLOCK_KB contiguous
    elements per row. SUB > 0: every run of SUB elements shares one scale (SUB divides the group, or the group
    divides SUB's tile), so one scale per run is loaded and broadcast in registers; SUB == 0 (group sizes that
    are no power of two): each element's scale is gathered. INT: float32 (code [- zero point]) * scale, rounded
    once to out's dtype. NVFP4 (SUB = 16): E2M1 value * FP8 block scale, exact; the global scale is left out.
    """
    E: tl.constexpr = 2 * BLOCK_KB
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = pid_k * BLOCK_KB + tl.arange(0, BLOCK_KB)
    n_mask = rn < N
    rows = rn[:, None].to(tl.int64)
    wb = tl.load(w_ptr + rows * stride_wn + j[None, :], mask=n_mask[:, None] & (j[None, :] < KP2), other=0)
    wb = wb.to(tl.int32)
    codes = tl.reshape(tl.join(wb & 0xF, (wb >> 4) & 0xF), (BLOCK_N, E))  # element order: byte j -> 2j, 2j + 1
    k0 = pid_k * E
    if SUB > 0:
        NS: tl.constexpr = E // SUB
        ks = k0 + tl.arange(0, NS) * SUB  # first element of each run
        s_mask = n_mask[:, None] & (ks[None, :] < 2 * KP2)
        g = (ks // GROUP)[None, :]
        if IS_NVFP4:
            sc = _fp8_e4m3_bits_to_f32(tl.load(s_ptr + rows * stride_sn + g, mask=s_mask, other=0).to(tl.int32))
            v = tl.reshape(_e2m1_decode(codes), (BLOCK_N, NS, SUB))
        else:
            sc = tl.load(s_ptr + rows * stride_sn + g, mask=s_mask, other=0.0)
            if HAS_ZP:
                zp = tl.load(zp_ptr + rows * stride_zn + g, mask=s_mask, other=0).to(tl.float32)
                v = tl.reshape(_unsigned_nibble_f32(codes), (BLOCK_N, NS, SUB)) - zp[:, :, None]
            else:
                v = tl.reshape(_signed_nibble_f32(codes), (BLOCK_N, NS, SUB))
        w = tl.reshape(v * sc[:, :, None], (BLOCK_N, E))
    else:
        ke = k0 + tl.arange(0, E)
        e_mask = n_mask[:, None] & (ke[None, :] < 2 * KP2)
        g = (ke // GROUP)[None, :]
        sc = tl.load(s_ptr + rows * stride_sn + g, mask=e_mask, other=0.0)
        if HAS_ZP:
            zp = tl.load(zp_ptr + rows * stride_zn + g, mask=e_mask, other=0).to(tl.float32)
            v = _unsigned_nibble_f32(codes) - zp
        else:
            v = _signed_nibble_f32(codes)
        w = v * sc
    k = k0 + tl.arange(0, E)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        wq = _round_to_bf16(w)
    else:
        wq = w.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_om + k[None, :], wq, mask=n_mask[:, None] & (k[None, :] < K))


# ------------------------------------------------------------------------------------------------ launcher

DEQUANT_BLOCK_N, DEQUANT_BLOCK_KB, DEQUANT_WARPS = 16, 128, 4  # 16-byte loads, 256 elements per row per program
INTERPRET_DEQUANT = (4, 16)  # small tiles on the CPU interpreter, so that small test weights span several


def run_split(group: int, e: int) -> int:
    """The SUB of `dequant_w4_kernel` for a group size and E = 2*BLOCK_KB elements per tile (0: gather)."""
    if e % group == 0 or group % e == 0:
        return min(group, e)
    return 0


def dequantize_w4(
    packed: Tensor, scale: Tensor, zero_point: Tensor | None, group: int, is_nvfp4: bool, k: int,
    dtype: torch.dtype, block_n: int | None = None, block_kb: int | None = None,
) -> Tensor:
    """The weight `[N, k]` in `dtype`: INT codes times float32 group scales (minus zero points), or NVFP4 E2M1
    values times their FP8 block scales without the global scale. `scale` as stored (float8_e4m3fn for NVFP4)."""
    n, kp2 = packed.shape
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    if block_n is None:
        block_n, block_kb = INTERPRET_DEQUANT if _interpreting() else (DEQUANT_BLOCK_N, DEQUANT_BLOCK_KB)
    group = 16 if is_nvfp4 else group
    sub = run_split(group, 2 * block_kb)
    assert not is_nvfp4 or sub == 16, "NVFP4 tiles hold whole blocks of 16"
    s = scale.view(torch.uint8) if is_nvfp4 else scale
    zp = zero_point if zero_point is not None else packed
    grid = (triton.cdiv(n, block_n), triton.cdiv(kp2, block_kb))
    dequant_w4_kernel[grid](
        packed, s, zp, out, n, k, kp2, packed.stride(0), s.stride(0), zp.stride(0), out.stride(0),
        IS_NVFP4=is_nvfp4, HAS_ZP=zero_point is not None, GROUP=group, SUB=sub,
        BLOCK_N=block_n, BLOCK_KB=block_kb, num_warps=DEQUANT_WARPS,
    )
    return out


def _interpreting() -> bool:
    # launch.interpreting(), which this module cannot import (launch imports it)
    return type(kernels.w4_gemm_kernel).__name__ == "InterpretedFunction"


# ----------------------------------------------------------------------------------- per-weight host facts


class WeightCache:
    """Values derived from a weight tensor, computed once per tensor and in-place version.

    Keyed by the tensor (a view is traced back to its base, so `t.reshape(1)` on each call still hits) and
    dropped when that tensor is freed, so a new weight at a reused address is never served a stale value.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple] = {}

    @staticmethod
    def _version(t: Tensor) -> int:
        try:
            return t._version
        except RuntimeError:  # inference tensors keep no version counter
            return 0

    def get(self, t: Tensor, make, *extra):
        """The cached value for (t, *extra), or `make(t)` stored first; None from `make` is not cached."""
        root = t._base if t._base is not None else t
        key = (id(root), t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, *extra)
        hit = self._entries.get(key)
        version = self._version(root)
        if hit is not None and hit[0]() is root and hit[1] == version:
            return hit[2]
        value = make(t)
        if value is not None:
            entries = self._entries
            ref = weakref.ref(root, lambda _r, key=key: entries.pop(key, None))
            entries[key] = (ref, version, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_HOST = WeightCache()


def _host_value(t: Tensor, what: str) -> float | None:
    """max |t| ("absmax") or the single value ("item") of a weight tensor as a Python float, once per tensor;
    None during CUDA-graph capture when not read before (no synchronisation is allowed there)."""

    def read(x: Tensor) -> float | None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        if what == "item":
            return float(x.reshape(()).float())
        return float(x.float().abs().amax()) if x.numel() else 0.0

    return _HOST.get(t, read, what)


# ---------------------------------------------------------------------------------------------- the choice


def prefill_alpha(
    m: int, a_dtype: torch.dtype, has_a_scale: bool, scale: Tensor, zero_point: Tensor | None,
    global_scale: Tensor | None,
) -> float | None:
    """The GEMM's alpha when the dequantize + cuBLAS path runs this product (1.0 for INT weights), else None.

    It runs for M >= PREFILL_DEQUANT_MIN_M rows of unscaled fp16/bf16 activations, unless QCOMPILE_W4_PREFILL is
    "triton", and only when the dequantized INT weight fits the activation dtype (|code - zero point| <= 15 or
    8 times the largest scale), so that no buffer element overflows where the reference stays finite.
    """
    if W4_PREFILL == "triton" or m < PREFILL_DEQUANT_MIN_M or has_a_scale:
        return None
    if a_dtype not in (torch.float16, torch.bfloat16):
        return None
    if global_scale is not None:
        gs = _host_value(global_scale, "item")
        return gs if gs is not None and gs == gs else None
    smax = _host_value(scale, "absmax")
    if smax is None:
        return None
    reach = 15.0 if zero_point is not None else 8.0
    return 1.0 if smax * reach <= torch.finfo(a_dtype).max else None  # NaN/inf scales fail this too


def prefill_gemm(
    a: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor | None, group: int, is_nvfp4: bool,
    alpha: float, bias: Tensor | None, out_dtype: torch.dtype,
) -> Tensor:
    """`a [M, K] @ dequant(W)^T * alpha + bias` with the weight dequantized to a's dtype and one cuBLAS call."""
    w = dequantize_w4(packed, scale, zero_point, group, is_nvfp4, a.shape[1], a.dtype)
    if bias is not None:
        out = torch.addmm(bias.to(a.dtype), a, w.t(), alpha=alpha)
    elif alpha == 1.0:
        out = torch.mm(a, w.t())
    else:  # beta = 0: the input is ignored (not even multiplied), only its shape broadcasts
        out = torch.addmm(a.new_zeros(()).expand(a.shape[0], w.shape[0]), a, w.t(), beta=0, alpha=alpha)
    return out if out.dtype == out_dtype else out.to(out_dtype)


# ------------------------------------------------------------------------------------------------ tinygemm


def tinygemm_available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm") and hasattr(torch, "_convert_weight_to_int4pack")


def tinygemm_applies(
    a: Tensor, has_a_scale: bool, packed: Tensor, zero_point: Tensor | None, group: int, is_nvfp4: bool,
) -> bool:
    """Whether QCOMPILE_INT4_BACKEND=tinygemm routes this product to torch._weight_int4pack_mm."""
    if INT4_BACKEND != "tinygemm" or is_nvfp4 or has_a_scale or not tinygemm_available():
        return False
    n, kp2 = packed.shape
    return (
        a.is_cuda and a.dtype == torch.bfloat16 and a.shape[0] < PREFILL_DEQUANT_MIN_M
        and a.shape[1] == 2 * kp2 and group in TINYGEMM_GROUPS and n % 8 == 0
        and (2 * kp2) % (TINYGEMM_INNER_K_TILES * 16) == 0
        and torch.cuda.get_device_capability(a.device) >= (8, 0)
    )


def tinygemm_operands(
    packed: Tensor, scale: Tensor, zero_point: Tensor | None, dtype: torch.dtype = torch.bfloat16,
) -> tuple[Tensor, Tensor]:
    """(unsigned codes u [N, Kp] int32 in 0..15, scales-and-zeros [Kp/g, N, 2]) with W = (u - 8) * scale + zero.

    Symmetric codes c (two's complement) give u = c ^ 8 and zero 0; asymmetric codes give u = c and
    zero = (8 - zero point) * scale. Scales and zeros are rounded to `dtype`, tinygemm's precision.
    """
    c = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1).to(torch.int32)
    if zero_point is None:
        u = c ^ 8
        zero = torch.zeros_like(scale)
    else:
        u = c
        zero = (8.0 - zero_point.to(torch.float32)) * scale
    sz = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)
    return u, sz


def _pack_high_first(u: Tensor) -> Tensor:
    """u [N, Kp] (0..15) as the uint8 [N, Kp/2] that torch._convert_weight_to_int4pack takes: even element in the
    high nibble (the opposite of qcompile's packing)."""
    return ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8)


_TINYGEMM = WeightCache()


def tinygemm_weight(packed: Tensor, scale: Tensor, zero_point: Tensor | None) -> tuple[Tensor, Tensor]:
    """(tinygemm-packed weight, bf16 scales-and-zeros), converted once per packed weight tensor."""

    def convert(_p: Tensor):
        u, sz = tinygemm_operands(packed, scale, zero_point)
        return torch._convert_weight_to_int4pack(_pack_high_first(u), TINYGEMM_INNER_K_TILES), sz

    return _TINYGEMM.get(packed, convert, scale.data_ptr(),
                         None if zero_point is None else zero_point.data_ptr())


def tinygemm_mm(a: Tensor, packed: Tensor, scale: Tensor, zero_point: Tensor | None, group: int,
                bias: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    w, sz = tinygemm_weight(packed, scale, zero_point)
    out = torch._weight_int4pack_mm(a, w, group, sz)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out if out.dtype == out_dtype else out.to(out_dtype)


__all__ = [
    "INT4_BACKEND",
    "PREFILL_DEQUANT_MIN_M",
    "W4_PREFILL",
    "WeightCache",
    "dequant_w4_kernel",
    "dequantize_w4",
    "prefill_alpha",
    "prefill_gemm",
    "tinygemm_applies",
    "tinygemm_mm",
    "tinygemm_operands",
]
