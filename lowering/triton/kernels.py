"""Triton kernels behind the `qcompile::` ops.

Four kernels, all plain `@triton.jit` functions (the launchers in `launch.py` pick a tile configuration by timing
a few on a GPU, and use one fixed configuration under `TRITON_INTERPRET=1`):

- `quant_rows_kernel`: per-token (or static per-tensor) INT8 / FP8 E4M3 quantization of activations, one program
  per row, writing the codes and one float32 scale per row.
- `quant_nvfp4_kernel`: NVFP4 quantization of activations in blocks of 16 with a static global scale, writing
  either the packed E2M1 codes and FP8 block scales (exactly `qcompile.numerics.quantize_nvfp4`) or the
  dequantized values *without* the global scale (`code * block_scale`, exact in fp16/bf16), which is what the
  emulated NVFP4 x NVFP4 product feeds to the weight-only GEMM.
- `w8_gemm_kernel`: GEMM against an 8-bit weight `[N, K]` (INT8 or FP8 E4M3) with per-tensor, per-channel or 2-D
  block weight scales; the activation is either quantized (same 8-bit type, one scale per row, int32 or fp32
  accumulation) or left in float (the weight is upcast in registers, which is exact). With `QUANT_A` it
  quantizes float activations per row itself (decode), giving the codes of `quant_rows_kernel`.
- `w4_gemm_kernel`: GEMM/GEMV against a 4-bit weight packed two codes per byte along K: INT4/INT3 in groups
  (symmetric, or asymmetric with zero points) and NVFP4 (E2M1 codes, FP8 block scales of 16, fp32 global scale).
  The weight is dequantized in registers. Integer codes go into the dot product as exact small integers and the
  group scale multiplies the partial product of each K tile (the tile lies inside one group); NVFP4 values times
  their FP8 block scale are exact in fp16/bf16, and the global scale is applied in the epilogue. The result thus
  differs from the dequantize-then-matmul reference only by float32 accumulation order.

Numerics follow docs/formats.md exactly: divisions use IEEE round-to-nearest (`div_rn`), rounding is half to even,
FP8 rounding is done on the E4M3 grid in float32 before the (then exact) cast, so the interpreter and the GPU
give the same bits. A row holding NaN or +-inf gets a NaN scale, so its output row is NaN (the reference raises;
see `qcompile.lowering.triton.dispatch` for the optional check that does the same).

The weight-only GEMV of decode steps (M <= 4, float activations) is `gemv.w4_gemv_kernel` (CUDA cores) or
`gemv.w4_gemv_mma_kernel` (tensor cores).

Both GEMM kernels support split-K (`SPLIT_K > 1`): the programs of one output tile add float32 partial results
into a zeroed float32 buffer with atomics; the decode (M <= 16) configurations use it to spread a GEMV over enough
programs to saturate memory bandwidth.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------ element helpers


@triton.jit
def _nonfinite(x):
    """True where float32 `x` is NaN or +-inf (exponent bits all ones); integer test, safe under fast math."""
    return ((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) == 0xFF


@triton.jit
def _nan_like(x):
    return tl.full(x.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _round_half_even(x):
    """Round float32 `x` (|x| < 2**22) to the nearest integer, ties to even; float32 result."""
    f = tl.floor(x)
    d = x - f  # exact: the fractional part of a float32 below 2**22 is representable
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _fp8_e4m3_round(v):
    """float32 `v` with |v| <= 448 rounded to the nearest FP8 E4M3 value (ties to even), still as float32.

    The spacing of E4M3 values is 2**(e-3) for a normal binade 2**e (e >= -6) and 2**-9 below 2**-6; dividing by
    that spacing (an exact power-of-two scaling), rounding to an integer and scaling back gives the RNE result.
    The sign is kept, also for values that round to zero (-0.0, as torch's cast gives).
    """
    a = tl.abs(v)
    e = (a.to(tl.int32, bitcast=True) >> 23) & 0xFF
    ue = tl.maximum(e, 121) - 3  # biased exponent of the spacing; 121 is the biased exponent of 2**-6
    ulp = (ue << 23).to(tl.float32, bitcast=True)
    inv = ((254 - ue) << 23).to(tl.float32, bitcast=True)
    r = _round_half_even(a * inv) * ulp
    neg = v.to(tl.int32, bitcast=True) < 0
    return tl.where(neg, -r, r)


@triton.jit
def _e2m1_encode(v):
    """E2M1 codes (int32 0..15) of already scaled float32 values: nearest, ties to even, saturating at +-6.

    Bit 3 is the sign bit of `v` (so -0.0 and small negatives that round to zero give code 8), as in
    `qcompile.numerics.e2m1_encode`.
    """
    a = tl.abs(v)
    idx = (
        (a > 0.25).to(tl.int32)
        + (a >= 0.75).to(tl.int32)
        + (a > 1.25).to(tl.int32)
        + (a >= 1.75).to(tl.int32)
        + (a > 2.5).to(tl.int32)
        + (a >= 3.5).to(tl.int32)
        + (a > 5.0).to(tl.int32)
    )
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
    return idx | (sign << 3)


@triton.jit
def _signed_nibble_f32(code):
    """Two's-complement 4-bit codes (int32 0..15) as float32 -8..7 without an int-to-float conversion.

    (code ^ 8) is the code offset by 8 (0..15); OR-ing it into the mantissa of 2**23 gives the float 2**23 + that
    value exactly, and subtracting 2**23 + 8 leaves the signed value: two integer ops and one float add, where a
    conversion instruction runs at a quarter of the rate on NVIDIA GPUs.
    """
    return ((code ^ 8) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def _unsigned_nibble_f32(code):
    """Codes 0..15 (or any int32 below 2**23) as float32, by the same mantissa trick."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _e2m1_decode(code):
    """E2M1 codes (int32 0..15) to float32: magnitude index i is 0.5*i below 2, else 2**(i//2-1) * (1 + (i&1)/2)."""
    idx = code & 7
    big = ((((idx >> 1) + 126) << 23) | ((idx & 1) << 22)).to(tl.float32, bitcast=True)
    mag = tl.where(idx < 2, _unsigned_nibble_f32(idx) * 0.5, big)
    return tl.where((code & 8) != 0, -mag, mag)


@triton.jit
def _e4m3_bits(r):
    """FP8 E4M3 byte (int32) of float32 `r` that is already an E4M3 value (or NaN), by integer encoding.

    Used instead of a cast so that NaN is encoded the same everywhere (0x7F with the sign) and no FP8 type is
    needed on the GPU.
    """
    bits = r.to(tl.int32, bitcast=True)
    e = (bits >> 23) & 0xFF
    a = tl.abs(r)
    normal = ((e - 120) << 3) | ((bits >> 20) & 7)
    sub = (a * 512.0).to(tl.int32)  # below 2**-6: multiples of 2**-9
    code = tl.where(e >= 121, normal, sub)
    code = tl.where(e == 0xFF, 0x7F, code)
    return code | ((bits >> 24) & 0x80)


@triton.jit
def _fp8_e4m3_bits_to_f32(b):
    """FP8 E4M3 bytes (int32 0..255) to float32 by integer decoding: works on GPUs without FP8 conversions."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, _unsigned_nibble_f32(m) * 0.001953125, normal)  # subnormals: m * 2**-9
    v = tl.where((b & 0x7F) == 0x7F, _nan_like(v), v)
    return tl.where((b & 0x80) != 0, -v, v)


@triton.jit
def _tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of output tiles, so that programs running together share rows of A and columns of B in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _split_k_range(pid_k, size, BLOCK: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K tiles [kt0, kt1) of split `pid_k` when `size` elements in tiles of BLOCK are shared by SPLIT_K programs."""
    num_kt = tl.cdiv(size, BLOCK)
    per_split = tl.cdiv(num_kt, SPLIT_K)
    kt0 = pid_k * per_split
    return kt0, tl.minimum(kt0 + per_split, num_kt)


@triton.jit
def _epilogue(
    acc, rm, rn, m_mask, n_mask, pid_k,
    a_scale_ptr, stride_as, col_scale_ptr, stride_cs, gs_ptr, bias_ptr, out_ptr, stride_om,
    HAS_A_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_GS: tl.constexpr, HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out = acc * a_scale[m] * col_scale[n] * gs + bias[n]; atomically added into float32 when split along K."""
    c = acc.to(tl.float32)
    if HAS_A_SCALE:
        sa = tl.load(a_scale_ptr + rm * stride_as, mask=m_mask, other=0.0).to(tl.float32)
        c = c * sa[:, None]
    if HAS_COL_SCALE:
        sc = tl.load(col_scale_ptr + rn * stride_cs, mask=n_mask, other=0.0).to(tl.float32)
        c = c * sc[None, :]
    if HAS_GS:
        c = c * tl.load(gs_ptr).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)
        c = c + bias[None, :]
    o_ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    o_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(o_ptrs, c, mask=o_mask, sem="relaxed")
    else:
        tl.store(o_ptrs, c.to(out_ptr.dtype.element_ty), mask=o_mask)


# ---------------------------------------------------------------------------------- activation quantization


@triton.jit
def _quantize_values(x, s, qmax, IS_FP8: tl.constexpr):
    """float32 `x / s` (correctly rounded), clamped to +-qmax and rounded onto the INT8 / E4M3 grid, as float32.

    `s` broadcasts against `x`. NaN (a row flagged through its scale) becomes 0 so that the codes stay defined.
    Shared by `quant_rows_kernel` and the GEMM prologue, so that both give the same codes bit for bit.
    """
    v = tl.math.div_rn(x, tl.zeros_like(x) + s)
    v = tl.minimum(tl.maximum(v, -qmax), qmax)
    v = tl.where(v == v, v, 0.0)
    if IS_FP8:
        return _fp8_e4m3_round(v)
    else:
        return _round_half_even(v)


@triton.jit
def quant_rows_kernel(
    x_ptr, q_ptr, scale_ptr, static_ptr, K, stride_xm, stride_qm,
    IS_FP8: tl.constexpr, STATIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row `program_id(0)` of x -> INT8 or FP8 codes and its scale (dynamic: amax/qmax; static: *static_ptr)."""
    if IS_FP8:
        qmax = 448.0
    else:
        qmax = 127.0
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK)
    nbad = tl.zeros([BLOCK], dtype=tl.int32)
    if STATIC:
        s = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            nbad += _nonfinite(x).to(tl.int32)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.math.div_rn(tl.max(amax, axis=0), qmax)
    s = tl.where(s == 0.0, 1.0, s)  # all-zero row (or underflow): any scale maps it to code 0
    for k0 in range(0, K, BLOCK):
        m = k0 + offs < K
        x = tl.load(x_row + k0 + offs, mask=m, other=0.0).to(tl.float32)
        if STATIC:
            nbad += _nonfinite(x).to(tl.int32)
        v = _quantize_values(x, s, qmax, IS_FP8)
        if IS_FP8:
            q = v.to(q_ptr.dtype.element_ty)
        else:
            q = v.to(tl.int32).to(tl.int8)
        tl.store(q_row + k0 + offs, q, mask=m)
    bad = tl.sum(nbad, axis=0) > 0
    tl.store(scale_ptr + row, tl.where(bad, _nan_like(s), s))


@triton.jit
def quant_nvfp4_kernel(
    x_ptr, out_ptr, bscale_ptr, gs_ptr, K, NBLK, stride_xm, stride_om, stride_sm,
    PACKED: tl.constexpr, BLOCKS: tl.constexpr,
):
    """BLOCKS blocks of 16 of row `program_id(0)`, starting at block `program_id(1) * BLOCKS`.

    PACKED: out = packed E2M1 codes (uint8, two per byte), bscale = FP8 block scales (as bytes), as
    quantize_nvfp4 with the static global scale *gs_ptr. Otherwise: out[k] = E2M1 value * block scale in out's
    dtype (the global scale is left out, for the caller to apply), and bscale is unused. Blocks with NaN/inf get
    a NaN scale (NaN values).
    """
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # block index along K
    j = tl.arange(0, 8)  # pair index inside a block
    ke = b[:, None] * 16 + 2 * j[None, :]  # even elements [BLOCKS, 8]
    ko = ke + 1
    x_row = x_ptr + row * stride_xm
    xe = tl.load(x_row + ke, mask=ke < K, other=0.0).to(tl.float32)
    xo = tl.load(x_row + ko, mask=ko < K, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr).to(tl.float32)

    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    bad = tl.max((_nonfinite(xe) | _nonfinite(xo)).to(tl.int32), axis=1) > 0
    s = tl.math.div_rn(amax, tl.zeros_like(amax) + gs * 6.0)
    s = tl.where(s == 0.0, 1.0, s)
    s = tl.minimum(s, 448.0)  # a static global scale too small for this block saturates (as the reference)
    bs = _fp8_e4m3_round(s)
    denom = bs * gs
    under = denom == 0.0  # the block scale underflowed: the block quantizes to +0
    d = tl.where(under, 1.0, denom)
    ce = tl.where(under[:, None], 0, _e2m1_encode(tl.math.div_rn(xe, tl.zeros_like(xe) + d[:, None])))
    co = tl.where(under[:, None], 0, _e2m1_encode(tl.math.div_rn(xo, tl.zeros_like(xo) + d[:, None])))
    bs = tl.where(bad, _nan_like(bs), bs)
    bmask = b < NBLK
    if PACKED:
        byte = (ce | (co << 4)).to(tl.uint8)
        tl.store(out_ptr + row * stride_om + b[:, None] * 8 + j[None, :], byte, mask=bmask[:, None])
        tl.store(bscale_ptr + row * stride_sm + b, _e4m3_bits(bs).to(tl.uint8), mask=bmask)
    else:
        o_row = out_ptr + row * stride_om
        ve = _e2m1_decode(ce) * bs[:, None]
        vo = _e2m1_decode(co) * bs[:, None]
        tl.store(o_row + ke, ve.to(out_ptr.dtype.element_ty), mask=ke < K)
        tl.store(o_row + ko, vo.to(out_ptr.dtype.element_ty), mask=ko < K)


# --------------------------------------------------------------------------------------------- 8-bit GEMM


@triton.jit
def _row_scales(a_rows, m_mask, K, qmax, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Dynamic per-row scales of float A over all of K: (scale to quantize with, scale for the epilogue).

    As `quant_rows_kernel`: amax / qmax with `div_rn`, 0 -> 1.0; a row holding NaN or inf gets a NaN epilogue
    scale (its codes are then irrelevant but defined).
    """
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    nbad = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(a_rows + k0 + rk[None, :], mask=m_mask[:, None] & (rk[None, :] < K - k0), other=0.0)
        x = x.to(tl.float32)
        nbad += _nonfinite(x).to(tl.int32)
        amax = tl.maximum(amax, tl.abs(x))
    row_amax = tl.max(amax, axis=1)
    s = tl.math.div_rn(row_amax, tl.zeros_like(row_amax) + qmax)
    s = tl.where(s == 0.0, 1.0, s)
    return s, tl.where(tl.sum(nbad, axis=1) > 0, _nan_like(s), s)


@triton.jit
def w8_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_am, stride_as, stride_bn, stride_bsn, stride_bsk, stride_om,
    A_FLOAT: tl.constexpr, HAS_A_SCALE: tl.constexpr, B_BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC_INT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, QUANT_A: tl.constexpr = False,
):
    """out[M, N] = (A @ B^T) * a_scale[m] * b_scale[n] (+ bias); B is an INT8 / FP8 weight [N, K].

    A_FLOAT: A is fp16/bf16/fp32 and B is upcast to it (exact). Otherwise A has B's 8-bit type.
    QUANT_A (A_FLOAT False, HAS_A_SCALE False): A is float and is quantized here to B's type with dynamic per-row
    scales, the codes of `quant_rows_kernel` bit for bit: a prologue finds each row's amax over all of K, each K
    tile is quantized after its load, and the row scales join the epilogue. For decode, where the separate
    quantization kernel would cost a launch of its own.
    B_BLOCK == 0: b_scale[n] = b_scale_ptr[n * stride_bsn] (stride 0 for a per-tensor scale), applied in the
    epilogue. B_BLOCK > 0: 2-D block scales b_scale_ptr[(n // B_BLOCK) * stride_bsn + (k // B_BLOCK) * stride_bsk],
    applied to each K tile's partial product (BLOCK_K divides B_BLOCK).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    kt0, kt1 = _split_k_range(pid_k, K, BLOCK_K, SPLIT_K)

    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]
    if QUANT_A:
        if ACC_INT:
            qmax = 127.0
        else:
            qmax = 448.0
        s_q, s_epi = _row_scales(a_ptr + rm[:, None].to(tl.int64) * stride_am, m_mask, K, qmax, BLOCK_M, BLOCK_K)
    if ACC_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt0, kt1):
        k0 = kt * BLOCK_K
        k_mask = rk < K - k0
        a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if QUANT_A:
            v = _quantize_values(a.to(tl.float32), s_q[:, None], qmax, not ACC_INT)
            if ACC_INT:
                a = v.to(tl.int32).to(tl.int8)
            else:
                a = v.to(b.dtype)  # already on the E4M3 grid: exact
        if A_FLOAT:
            b = b.to(a.dtype)
        if B_BLOCK > 0:
            sb = tl.load(
                b_scale_ptr + (rn // B_BLOCK) * stride_bsn + (k0 // B_BLOCK) * stride_bsk, mask=n_mask, other=0.0
            )
            acc += tl.dot(a, b, input_precision=DOT_PRECISION) * sb[None, :]
        elif ACC_INT:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if QUANT_A:  # the row scale first, as the epilogue would apply a loaded one: the same float32 products
        acc = acc.to(tl.float32) * s_epi[:, None]
    _epilogue(
        acc, rm, rn, m_mask, n_mask, pid_k,
        a_scale_ptr, stride_as, b_scale_ptr, stride_bsn, b_scale_ptr, bias_ptr, out_ptr, stride_om,
        HAS_A_SCALE, B_BLOCK == 0, False, HAS_BIAS, SPLIT_K,
    )


# --------------------------------------------------------------------------------------------- 4-bit GEMM


@triton.jit
def _int_operand(q, a, A_KIND: tl.constexpr):
    """Integer weight codes (int32, |q| <= 15) as the dot operand matching A (exact in every case)."""
    if A_KIND == 1:
        return q.to(tl.int8)
    elif A_KIND == 2:
        return q.to(tl.float32).to(a.dtype)
    else:
        return q.to(a.dtype)


@triton.jit
def _pair_dot(a_e, w_e, a_o, w_o, A_KIND: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Partial product of one K tile split into even and odd elements (float32, or int32 for INT8 A)."""
    if A_KIND == 1:
        part = tl.dot(a_e, w_e, out_dtype=tl.int32)
        part = tl.dot(a_o, w_o, part, out_dtype=tl.int32)
    else:
        part = tl.dot(a_e, w_e, input_precision=DOT_PRECISION)
        part = tl.dot(a_o, w_o, part, input_precision=DOT_PRECISION)
    return part


@triton.jit
def w4_gemm_kernel(
    a_ptr, a_scale_ptr, w_ptr, s_ptr, zp_ptr, gs_ptr, bias_ptr, out_ptr,
    M, N, K, KP2,
    stride_am, stride_as, stride_wn, stride_sn, stride_zn, stride_om,
    IS_NVFP4: tl.constexpr, HAS_ZP: tl.constexpr, GROUP: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr,
    A_KIND: tl.constexpr, HAS_A_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """out[M, N] = A @ dequant(W)^T * a_scale[m] (* global scale) (+ bias); W packed uint8 [N, KP2], 2 codes/byte.

    A_KIND: 0 float (fp16/bf16/fp32), 1 INT8, 2 FP8 E4M3 (quantized activations, one scale per row, or a scalar
    with stride_as = 0). K is the true in_features (A has K columns); the weight is padded to 2*KP2 >= K.
    INT weights: s_ptr float32 [N, 2*KP2/GROUP], zp_ptr uint8 (HAS_ZP) or symmetric two's-complement codes.
    SCALE_AFTER_DOT (BLOCK_K divides GROUP): codes enter the dot and the group scale multiplies the partial
    product; otherwise (float A only) each code is dequantized in float32 and rounded to A's dtype.
    NVFP4 weights: s_ptr FP8 block scales [N, 2*KP2/16] read as bytes, gs_ptr the float32 global scale.
    """
    HALF: tl.constexpr = BLOCK_K // 2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = _tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, HALF)
    m_mask = rm < M
    n_mask = rn < N
    kt0, kt1 = _split_k_range(pid_k, K, BLOCK_K, SPLIT_K)

    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    w_cols = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    s_cols = s_ptr + rn[None, :].to(tl.int64) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt0, kt1):
        k0 = kt * BLOCK_K
        j = k0 // 2 + rj  # byte index along the packed row
        ke = 2 * j  # element index of the low nibble; the high nibble holds ke + 1
        w_mask = (j[:, None] < KP2) & n_mask[None, :]
        wb = tl.load(w_cols + j[:, None], mask=w_mask, other=0).to(tl.int32)
        lo = wb & 0xF
        hi = (wb >> 4) & 0xF
        a_e = tl.load(a_rows + ke[None, :], mask=m_mask[:, None] & (ke[None, :] < K), other=0.0)
        a_o = tl.load(a_rows + ke[None, :] + 1, mask=m_mask[:, None] & (ke[None, :] + 1 < K), other=0.0)
        if IS_NVFP4:
            bsc = _fp8_e4m3_bits_to_f32(tl.load(s_cols + (j // 8)[:, None], mask=w_mask, other=0).to(tl.int32))
            w_e = (_e2m1_decode(lo) * bsc).to(a_e.dtype)
            w_o = (_e2m1_decode(hi) * bsc).to(a_e.dtype)
            acc = tl.dot(a_e, w_e, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(a_o, w_o, acc, input_precision=DOT_PRECISION)
        elif SCALE_AFTER_DOT:
            g = k0 // GROUP
            if HAS_ZP:
                zp = tl.load(zp_ptr + rn.to(tl.int64) * stride_zn + g, mask=n_mask, other=0).to(tl.int32)
                q_e = lo - zp[None, :]
                q_o = hi - zp[None, :]
            else:
                q_e = tl.where(lo >= 8, lo - 16, lo)
                q_o = tl.where(hi >= 8, hi - 16, hi)
            part = _pair_dot(
                a_e, _int_operand(q_e, a_e, A_KIND), a_o, _int_operand(q_o, a_e, A_KIND), A_KIND, DOT_PRECISION
            )
            sc = tl.load(s_ptr + rn.to(tl.int64) * stride_sn + g, mask=n_mask, other=0.0)
            acc += part.to(tl.float32) * sc[None, :]
        else:
            ge = ke // GROUP
            go = (ke + 1) // GROUP
            sc_e = tl.load(s_cols + ge[:, None], mask=w_mask, other=0.0)
            sc_o = tl.load(s_cols + go[:, None], mask=w_mask, other=0.0)
            if HAS_ZP:
                z_cols = zp_ptr + rn[None, :].to(tl.int64) * stride_zn
                q_e = lo - tl.load(z_cols + ge[:, None], mask=w_mask, other=0).to(tl.int32)
                q_o = hi - tl.load(z_cols + go[:, None], mask=w_mask, other=0).to(tl.int32)
            else:
                q_e = tl.where(lo >= 8, lo - 16, lo)
                q_o = tl.where(hi >= 8, hi - 16, hi)
            w_e = (q_e.to(tl.float32) * sc_e).to(a_e.dtype)
            w_o = (q_o.to(tl.float32) * sc_o).to(a_e.dtype)
            acc = tl.dot(a_e, w_e, acc, input_precision=DOT_PRECISION)
            acc = tl.dot(a_o, w_o, acc, input_precision=DOT_PRECISION)

    _epilogue(
        acc, rm, rn, m_mask, n_mask, pid_k,
        a_scale_ptr, stride_as, s_ptr, 0, gs_ptr, bias_ptr, out_ptr, stride_om,
        HAS_A_SCALE, False, IS_NVFP4, HAS_BIAS, SPLIT_K,
    )
