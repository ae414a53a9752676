"""The 4-bit weight-only GEMV of decode steps: a few rows of float activations (M <= 4) times a packed INT4/INT3
(symmetric, or asymmetric with zero points) or NVFP4 weight, on the CUDA cores (`w4_gemv_kernel`, below) or on the
tensor cores (`w4_gemv_mma_kernel`, fp16/bf16 activations; see its section further down).

A decode step reads every weight once, so the kernel is a stream of weight bytes and its speed is the memory
bandwidth it sustains. The layout serves that stream:

- The weight is read as int32 words, each holding 8 consecutive elements (docs/formats.md, nibble packing). A
  "chunk" is 4 words: 16 bytes, 32 elements, one 128-bit load. Each iteration of the K loop covers BLOCK_C chunks
  of each of BLOCK_N rows; thread t of the program owns chunk t (and t + 32 * num_warps, ...) of *every* row, so it
  issues BLOCK_N independent 16-byte loads per iteration and converts each activation element once for BLOCK_N
  weights.
- The activation is loaded as `[32 // VEC, BLOCK_C, VEC]` (VEC elements per 16 bytes): the leading axis lies in
  registers, so each thread loads exactly the 32 elements of its chunk with 16-byte loads, in the layout of the
  weights (no shared-memory reshuffle); the splits that hand each nibble its activation are register renames.
- Nibbles become exact float32 values by bit operations, never int-to-float conversions. INT codes: AND-ed with
  the exponent bits of a float constant, a nibble stays where it lies, in that constant's mantissa, and one
  subtraction leaves its value (`_int_at`): one 3-input bitwise op, one FADD and one FFMA per weight. E2M1 codes:
  sign, exponent and mantissa bits moved into fp16 bit patterns, two codes per 32-bit word, which are exact
  (value * 2**-14, code 1 becomes a subnormal) and widen to float32 in one instruction each (`_e2m1_word`).
- Products and sums are float32: each thread chains the fused multiply-adds of its chunk into one partial sum per
  row, multiplies it by the chunk's INT group scale (a chunk lies in one group) or each half by its FP8 block
  scale, and adds it to a per-thread accumulator. The sum across threads happens once, after the loop.
- One launch: no split-K, no zero-filled buffer, no cast; the kernel adds the bias and writes the output dtype.
  Programs come from N alone (BLOCK_N rows each), and the threads of a program share K.

NVFP4 products carry the 2**-14 of the fp16 patterns (the block scales are multiplied by 2**14 instead), so a
product underflows into the float32 subnormals only when |activation| < 2**-111.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ------------------------------------------------------------------------------------------------ helpers


@triton.jit
def _eight(x):
    """x [..., 2, 2, 2] (axes: bit 2, bit 1, bit 0 of an index 0..7) -> the 8 tensors x[..., i] for i = 0..7."""
    b0_0, b0_1 = tl.split(x)
    e0, e2 = tl.split(b0_0)
    e1, e3 = tl.split(b0_1)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e2)
    x1, x5 = tl.split(e1)
    x3, x7 = tl.split(e3)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _int_at(x, P: tl.constexpr, sub):
    """The nibble at bits 4P..4P+3 (P <= 3) of `x` minus `sub`, as an exact float32; x has all exponent bits set.

    Kept where it lies, in the mantissa of the float 2**(23 - 4P), the nibble reads as 2**(23 - 4P) + nibble, so
    one AND with (nibble mask | exponent of 2**(23 - 4P)) and the subtraction of that float plus 8 (symmetric
    codes, whose sign bits were flipped) or plus the zero point give the code's value: no shift, no int-to-float
    conversion.
    """
    BITS: tl.constexpr = (0xF << (4 * P)) | ((150 - 4 * P) << 23)
    return (x & BITS).to(tl.float32, bitcast=True) - sub


@triton.jit
def _int_sub(z, ZP: tl.constexpr, P: tl.constexpr):
    """What `_int_at` subtracts at nibble position P: the float 2**(23 - 4P) plus 8 (symmetric) or plus z."""
    MAGIC: tl.constexpr = (150 - 4 * P) << 23
    if ZP:
        return ((z << (4 * P)) | MAGIC).to(tl.float32, bitcast=True)
    else:
        return tl.full((1, 1), MAGIC | (8 << (4 * P)), tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _int_word(w, sub, exp_bits, ZP: tl.constexpr):
    """The 8 INT codes of int32 words `w` as float32 values: nibbles 0-3 where they lie, 4-7 from the high half.
    sub: the subtrahends of positions 0-3 (`_int_sub`). exp_bits: 0x7F800000, the float32 exponent field, which
    supplies every position's exponent bits (the flip of the sign bits and the OR fuse into one op; the high half
    is shifted down and added to it, bits that do not overlap, in one more).
    """
    if not ZP:
        w = w ^ -2004318072  # 0x88888888: two's-complement codes -8..7 become 0..15 (code + 8)
    lo = w | exp_bits
    hi = (w.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True) + exp_bits
    return (
        _int_at(lo, 0, sub[0]), _int_at(lo, 1, sub[1]), _int_at(lo, 2, sub[2]), _int_at(lo, 3, sub[3]),
        _int_at(hi, 0, sub[0]), _int_at(hi, 1, sub[1]), _int_at(hi, 2, sub[2]), _int_at(hi, 3, sub[3]),
    )


@triton.jit
def _f16_lo(r):
    return r.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_hi(r):
    return (r >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _e2m1_word(w, half_mask):
    """The 8 E2M1 codes of int32 words `w` as float32 values times 2**-14 (exact); half_mask is 0x8E008E00.

    An E2M1 code (sign, 2 exponent bits, 1 mantissa bit) shifted so that its exponent and mantissa bits land at
    bits 9-11 of an fp16, with its sign at bit 15, is that fp16's bit pattern for value * 2**-14 (code 1, 0.5,
    becomes the subnormal 2**-15). Per byte, the sign is first moved from bit 3 to bit 6 (bits 3-5 and 7 then hold
    copies that the final mask drops); shifting by 9 and 1 puts bytes 0/2 and 1/3 into the two halves of a word.
    """
    ev = (w & 0x07070707) | ((w << 3) & 0x78787878)  # even nibbles: codes of elements 0, 2, 4, 6 in bytes 0-3
    od = ((w >> 4) & 0x07070707) | ((w >> 1) & 0x78787878)  # odd nibbles: elements 1, 3, 5, 7
    e04 = (ev << 9) & half_mask
    e26 = (ev << 1) & half_mask
    o15 = (od << 9) & half_mask
    o37 = (od << 1) & half_mask
    return (
        _f16_lo(e04), _f16_lo(o15), _f16_lo(e26), _f16_lo(o37),
        _f16_hi(e04), _f16_hi(o15), _f16_hi(e26), _f16_hi(o37),
    )


@triton.jit
def _fp8_scale(b):
    """FP8 E4M3 bytes (int32 0..255) to float32 times 2**14, through the fp16 bit pattern (value * 2**-8)."""
    v = ((((b & 0x7F) << 7) | ((b & 0x80) << 8)).to(tl.int16).to(tl.float16, bitcast=True)).to(tl.float32)
    v = v * 4194304.0  # 2**22: exact
    return tl.where((b & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _dot8(x, a, t):
    """t + sum_i x[i] * a_i over one word's 8 elements, as a chain of fused multiply-adds; a: [C, 2, 2, 2]."""
    a0, a1, a2, a3, a4, a5, a6, a7 = _eight(a)
    t += x[0] * a0[None, :]
    t += x[1] * a1[None, :]
    t += x[2] * a2[None, :]
    t += x[3] * a3[None, :]
    t += x[4] * a4[None, :]
    t += x[5] * a5[None, :]
    t += x[6] * a6[None, :]
    t += x[7] * a7[None, :]
    return t


@triton.jit
def _row_chunk(a_row, k, K, BLOCK_C: tl.constexpr):
    """One row's activation for the chunks of this iteration: 4 word tensors [C, 2, 2, 2] in float32."""
    a = tl.load(a_row + k, mask=k < K, other=0.0).to(tl.float32)  # [32 // VEC, C, VEC]
    a = tl.reshape(tl.permute(a, (1, 0, 2)), (BLOCK_C, 2, 2, 2, 2, 2))  # axes: chunk, word bits 1/0, nibble bits
    a = tl.permute(a, (0, 3, 4, 5, 1, 2))  # word bits last, for the splits
    a_lo, a_hi = tl.split(a)  # word bit 0
    a0, a2 = tl.split(a_lo)  # word bit 1
    a1, a3 = tl.split(a_hi)
    return a0, a1, a2, a3


# ---------------------------------------------------------------------------------------------------- kernel


@triton.jit
def w4_gemv_kernel(
    a_ptr, w_ptr, s_ptr, zp_ptr, gs_ptr, bias_ptr, out_ptr,
    M, N, K, KW, mask_bits,
    stride_am, stride_wn, stride_sn, stride_zn, stride_om,
    IS_NVFP4: tl.constexpr, HAS_ZP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[M, N] = A @ dequant(W)^T (+ bias), A float [M, K] (M <= BLOCK_M <= 4), W int32 words [N, KW].

    INT weights: s_ptr float32 group scales [N, 8*KW/GROUP] (GROUP a multiple of 32, so a chunk of 32 elements
    lies in one group), zp_ptr uint8 zero points (HAS_ZP) or two's-complement codes. NVFP4: s_ptr the FP8 block
    scales [N, KW/2] as bytes, gs_ptr the float32 global scale. KW is a multiple of 4 (whole chunks).
    mask_bits: a bit mask passed at run time so that it occupies one register shared by every 3-input bitwise op
    (a compile-time constant would be folded into a second constant per op): 0x7F800000 for INT weights
    (`_int_word`), 0x8E008E00 for NVFP4 (`_e2m1_word`).

    The weight and scale loads are not masked (a mask costs a predicate and zeroing the registers of every load):
    rows past N read row N - 1 and are not stored; chunks past the end of K re-read the last chunk, whose decoded
    values are finite and meet a zero activation.
    """
    VEC: tl.constexpr = 128 // a_ptr.dtype.element_ty.primitive_bitwidth  # elements per 16-byte load
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rc = tl.arange(0, BLOCK_C)
    rw = tl.arange(0, 4)
    rx = tl.arange(0, 32 // VEC)
    rv = tl.arange(0, VEC)
    NC = KW // 4  # chunks per row
    rows = tl.minimum(rn, N - 1).to(tl.int64)
    w_rows = w_ptr + rows[:, None, None] * stride_wn
    s_rows = s_ptr + rows[:, None] * stride_sn
    z_rows = zp_ptr + rows[:, None] * stride_zn
    acc0 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        c = c0 + rc
        cl = tl.minimum(c, NC - 1)
        w = tl.load(w_rows + (4 * cl[:, None] + rw[None, :])[None, :, :])  # [N, C, 4] words
        w_even, w_odd = tl.split(tl.reshape(w, (BLOCK_N, BLOCK_C, 2, 2)))  # words 0, 2 and 1, 3 of each chunk
        w0, w2 = tl.split(w_even)
        w1, w3 = tl.split(w_odd)
        if IS_NVFP4:
            blk = 2 * cl[:, None] + tl.arange(0, 2)[None, :]  # the chunk's two blocks of 16
            sb = tl.load(s_rows[:, :, None] + blk[None, :, :])
            s_lo, s_hi = tl.split(_fp8_scale(sb.to(tl.int32)))
            x0 = _e2m1_word(w0, mask_bits)
            x1 = _e2m1_word(w1, mask_bits)
            x2 = _e2m1_word(w2, mask_bits)
            x3 = _e2m1_word(w3, mask_bits)
        else:
            g = (32 * cl) // GROUP
            sc = tl.load(s_rows + g[None, :])
            z = tl.load(z_rows + g[None, :]).to(tl.int32) if HAS_ZP else sc
            sub = (_int_sub(z, HAS_ZP, 0), _int_sub(z, HAS_ZP, 1), _int_sub(z, HAS_ZP, 2), _int_sub(z, HAS_ZP, 3))
            x0 = _int_word(w0, sub, mask_bits, HAS_ZP)
            x1 = _int_word(w1, sub, mask_bits, HAS_ZP)
            x2 = _int_word(w2, sub, mask_bits, HAS_ZP)
            x3 = _int_word(w3, sub, mask_bits, HAS_ZP)
        k = 32 * c[None, :, None] + VEC * rx[:, None, None] + rv[None, None, :]
        for r in tl.static_range(BLOCK_M):
            a0, a1, a2, a3 = _row_chunk(a_ptr + r * stride_am, k, tl.where(r < M, K, 0), BLOCK_C)
            t = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            t = _dot8(x0, a0, t)
            t = _dot8(x1, a1, t)
            if IS_NVFP4:  # words 0-1 form one block of 16, words 2-3 the next
                part = t * s_lo
                t = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
            t = _dot8(x2, a2, t)
            t = _dot8(x3, a3, t)
            if IS_NVFP4:
                part += t * s_hi
            else:
                part = t * sc
            if r == 0:
                acc0 += part
            elif r == 1:
                acc1 += part
            elif r == 2:
                acc2 += part
            else:
                acc3 += part

    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if IS_NVFP4:
        gs = tl.load(gs_ptr).to(tl.float32)
    else:
        gs = 1.0
    for r in tl.static_range(BLOCK_M):
        if r == 0:
            acc = acc0
        elif r == 1:
            acc = acc1
        elif r == 2:
            acc = acc2
        else:
            acc = acc3
        o = tl.sum(acc, axis=1)
        if IS_NVFP4:
            o = o * gs
        o = o + bias
        row_ok = tl.full((BLOCK_N,), r, tl.int32) < M
        tl.store(out_ptr + r * stride_om + rn, o.to(out_ptr.dtype.element_ty), mask=n_mask & row_ok)


# ------------------------------------------------------------------------------------ tensor-core variant
#
# `w4_gemv_mma_kernel`: the same product on the tensor cores, through `mma.sync.m16n8k16` with float32
# accumulation. The weight is the MMA's A operand (16 weight rows per tile) and the activation its B operand (8
# columns: M <= 8, the rows past M zero), so the decoded weight and the activation stay in the registers of the
# thread that loaded them: no layout conversion, no shared memory in the loop.
#
# A warp's lane (g, q) = (lane // 4, lane % 4) holds, per MMA, four weights of row g and four of row g + 8 at the
# k-slots 2q, 2q + 1, 2q + 8, 2q + 9, and four activations of column (row of A) g at the same slots. Since the
# product sums over k, any bijection between k-slots and the elements of K serves, if weights and activations use
# the same one: lane q of every group takes the 32 consecutive elements 128 b + 32 q .. +31 of block b (one
# 16-byte load per weight row, four per activation row), and word j of them feeds two MMAs, whose slot pairs are
# the element pairs (j0, j4), (j1, j5) and (j2, j6), (j3, j7) of the word. Warps split the blocks of K; their
# partial sums meet once, after the loop.
#
# Products are exact: INT codes (and code minus zero point) are small integers in fp16/bf16, E2M1 values times
# an FP8 block scale need at most 6 significant bits. The INT group scale multiplies each block's float32 sum
# (groups are multiples of 128 elements); the NVFP4 block scale multiplies the 16-bit weights (exact).
#
# The decoding and the MMA are inline PTX. Triton's CPU interpreter cannot run it, so under the interpreter
# (`_EMULATE`) the same lane program runs with float32 pairs ([T, 2] tensors) and an MMA written out from its
# fragment layout; everything else (which lane loads what, the pairing, the scales, the reduction) is shared.

_EMULATE = tl.constexpr(type(_eight).__name__ == "InterpretedFunction")


def _int_pairs_f16(low: int, high: int) -> str:
    """PTX for fp16 codes: nibbles at bits 0-3 of each half OR-ed into `low`, at bits 4-7 into `high`."""
    return f"""{{
    .reg .b32 t0, t1, t2, t3, h, k;
    mov.b32 k, 0x2C002C00;
    shr.u32 h, $4, 8;
    lop3.b32 t0, $4, 0x000F000F, {low:#010x}, 0x6A;
    lop3.b32 t1, $4, 0x00F000F0, {high:#010x}, 0x6A;
    lop3.b32 t2, h, 0x000F000F, {low:#010x}, 0x6A;
    lop3.b32 t3, h, 0x00F000F0, {high:#010x}, 0x6A;
    sub.f16x2 $0, t0, $5;
    fma.rn.f16x2 $1, t1, k, $6;
    sub.f16x2 $2, t2, $5;
    fma.rn.f16x2 $3, t3, k, $6;
    }}"""


def _int_pairs_bf16(base: int) -> str:
    """PTX for bf16 codes: each nibble shifted to bits 0-3 of each half and OR-ed into `base`."""
    return f"""{{
    .reg .b32 t0, t1, t2, t3, s, k;
    mov.b32 k, 0x3F803F80;
    lop3.b32 t0, $4, 0x000F000F, {base:#010x}, 0x6A;
    shr.u32 s, $4, 4;
    lop3.b32 t1, s, 0x000F000F, {base:#010x}, 0x6A;
    shr.u32 s, $4, 8;
    lop3.b32 t2, s, 0x000F000F, {base:#010x}, 0x6A;
    shr.u32 s, $4, 12;
    lop3.b32 t3, s, 0x000F000F, {base:#010x}, 0x6A;
    fma.rn.bf16x2 $0, t0, k, $5;
    fma.rn.bf16x2 $1, t1, k, $5;
    fma.rn.bf16x2 $2, t2, k, $5;
    fma.rn.bf16x2 $3, t3, k, $5;
    }}"""


# the 3-input op's XOR flips a symmetric code's sign bit (0x8 in its nibble) while OR-ing in the constant
_F16_ZERO_POINT = tl.constexpr(_int_pairs_f16(0x64006400, 0x64006400))
_F16_SYMMETRIC = tl.constexpr(_int_pairs_f16(0x64086408, 0x64806480))
_BF16_ZERO_POINT = tl.constexpr(_int_pairs_bf16(0x43004300))
_BF16_SYMMETRIC = tl.constexpr(_int_pairs_bf16(0x43084308))


@triton.jit
def _asm_int_pairs(w, zlo, zhi, F16: tl.constexpr, HAS_ZP: tl.constexpr):
    """Word w (8 nibbles) -> the pairs (0, 4), (1, 5), (2, 6), (3, 7) as packed 16-bit code values.

    fp16: a nibble at bits 0-3 (4-7) of each half, OR-ed into 1024 (0x6400), reads 1024 + n (1024 + 16 n); one
    subtraction (one FMA by 1/16) leaves n minus the zero point (zlo, zhi: 1024 + z, -64 - z per half). Symmetric
    codes flip their sign bit in the same 3-input op (XOR with 0x8 in the nibble; z = 8). bf16 (7 mantissa bits)
    takes each nibble at bits 0-3, 128 + n (0x4300), after a shift.
    """
    # (the string is chosen per branch: Triton cannot merge a string assigned in two branches)
    if F16:
        if HAS_ZP:
            return _int_pairs(w, zlo, zhi, _F16_ZERO_POINT)
        else:
            return _int_pairs(w, zlo, zhi, _F16_SYMMETRIC)
    else:
        if HAS_ZP:
            return _int_pairs(w, zlo, zhi, _BF16_ZERO_POINT)
        else:
            return _int_pairs(w, zlo, zhi, _BF16_SYMMETRIC)


@triton.jit
def _int_pairs(w, zlo, zhi, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r,r", [w, zlo, zhi],
                                     dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _asm_mul4(p0, p1, p2, p3, s, F16: tl.constexpr):
    """Four packed 16-bit pairs times the packed pair s (exact here: E2M1 values times FP8 scales)."""
    if F16:
        return tl.inline_asm_elementwise(
            "mul.rn.f16x2 $0, $4, $8; mul.rn.f16x2 $1, $5, $8; mul.rn.f16x2 $2, $6, $8; mul.rn.f16x2 $3, $7, $8;",
            "=r,=r,=r,=r,r,r,r,r,r", [p0, p1, p2, p3, s], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 z;
            mov.b32 z, 0x80008000;
            fma.rn.bf16x2 $0, $4, $8, z; fma.rn.bf16x2 $1, $5, $8, z;
            fma.rn.bf16x2 $2, $6, $8, z; fma.rn.bf16x2 $3, $7, $8, z;
            }""",
            "=r,=r,=r,=r,r,r,r,r,r", [p0, p1, p2, p3, s], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True, pack=1)


@triton.jit
def _scale_pairs(x, F16: tl.constexpr):
    """FP8 E4M3 block scales b0, b1 (x = b0 | b1 << 16) -> the packed pairs (s0, s0), (s1, s1) in the MMA's
    16-bit type, times 2**7 (fp16) or 2**118 (bf16): both scales decoded in each 32-bit op.

    The E4M3 exponent and mantissa bits placed in an fp16 (bf16) below its exponent's top bit read as s * 2**-8
    (s * 2**-120), subnormals included; code 0x7F (NaN) gets the rest of the exponent bits set, and exact
    multiplications by powers of two (2**15; bf16: 2**119 twice) finish.
    """
    em = x & 0x007F007F
    nan = ((em + 0x00010001) & 0x00800080)  # bit 7 of a half set where its 7 low bits are all ones
    if F16:
        p = (em << 7) | ((x & 0x00800080) << 8) | (nan << 7)
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 k, t;
            mov.b32 k, 0x78007800;
            mul.rn.f16x2 t, $2, k;
            prmt.b32 $0, t, t, 0x1010;
            prmt.b32 $1, t, t, 0x3232;
            }""",
            "=r,=r,r", [p], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        p = (em << 4) | ((x & 0x00800080) << 8) | (nan * 0xFF)
        return tl.inline_asm_elementwise(
            """{
            .reg .b32 k, z, t;
            mov.b32 k, 0x7B007B00;
            mov.b32 z, 0x80008000;
            fma.rn.bf16x2 t, $2, k, z;
            fma.rn.bf16x2 t, t, k, z;
            prmt.b32 $0, t, t, 0x1010;
            prmt.b32 $1, t, t, 0x3232;
            }""",
            "=r,=r,r", [p], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _asm_prmt(a, b, SEL: tl.constexpr):
    """Bytes of (a, b) picked by SEL: 0x5410 pairs the low halves of a and b, 0x7632 the high halves."""
    if SEL == 0x5410:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, F16: tl.constexpr, W: tl.constexpr):
    """D = A B + C for one m16n8k16 tile. A: a0/a2 row g, a1/a3 row g + 8, slots (2q, 2q+1) and (2q+8, 2q+9);
    B: b0, b1 column g at the same slots; D: c0, c1 (row g, columns 2q, 2q+1), c2, c3 (row g + 8)."""
    if _EMULATE:  # pairs are float32 [T, 2]; the fragment layout written out over the warp's lanes
        T: tl.constexpr = 32 * W
        a_lo = tl.reshape(tl.join(a0, a2), (W, 8, 1, 4, 4))  # [warp, g (row), -, q, slot]
        a_hi = tl.reshape(tl.join(a1, a3), (W, 8, 1, 4, 4))
        b = tl.reshape(tl.join(b0, b1), (W, 1, 8, 4, 4))  # [warp, -, g (column), q, slot]
        s_lo = tl.reshape(tl.sum(tl.sum(a_lo * b, axis=4), axis=3), (W, 8, 4, 2))  # [warp, row, column]
        s_hi = tl.reshape(tl.sum(tl.sum(a_hi * b, axis=4), axis=3), (W, 8, 4, 2))
        e_lo, o_lo = tl.split(s_lo)  # lane (g, q) gets columns 2q, 2q + 1 of its rows
        e_hi, o_hi = tl.split(s_hi)
        return (c0 + tl.reshape(e_lo, (T,)), c1 + tl.reshape(o_lo, (T,)), c2 + tl.reshape(e_hi, (T,)),
                c3 + tl.reshape(o_hi, (T,)))
    elif F16:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
            "{$10,$11,$12,$13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, "
            "{$10,$11,$12,$13};",
            "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _pair(lo, hi):
    return tl.join(lo.to(tl.float32), hi.to(tl.float32))


@triton.jit
def _e2m1_value(n):
    """Emulation: the E2M1 code n (0..15) as a float32 value."""
    e = (n >> 1) & 3
    mag = tl.where(e == 0, 0.5 * (n & 1), (1.0 + 0.5 * (n & 1)) * tl.exp2((e - 1).to(tl.float32)))
    return tl.where((n & 8) != 0, -mag, mag)


@triton.jit
def _weight_pairs(w, z, zlo, zhi, sp, half_mask, IS_NVFP4: tl.constexpr, HAS_ZP: tl.constexpr,
                  F16: tl.constexpr):
    """Word w of one weight row -> its pairs (0, 4), (1, 5), (2, 6), (3, 7) in the MMA's 16-bit type.
    INT: code minus 8 or minus the zero point (z; zlo, zhi its packed form). NVFP4: E2M1 value times the block
    scale (sp: packed (scale * 2**7, fp16) or (scale * 2**118, bf16); emulated: the float32 scale)."""
    if _EMULATE:
        n0 = w & 15
        n1 = (w >> 4) & 15
        n2 = (w >> 8) & 15
        n3 = (w >> 12) & 15
        n4 = (w >> 16) & 15
        n5 = (w >> 20) & 15
        n6 = (w >> 24) & 15
        n7 = (w >> 28) & 15
        if IS_NVFP4:
            return (_pair(_e2m1_value(n0) * sp, _e2m1_value(n4) * sp),
                    _pair(_e2m1_value(n1) * sp, _e2m1_value(n5) * sp),
                    _pair(_e2m1_value(n2) * sp, _e2m1_value(n6) * sp),
                    _pair(_e2m1_value(n3) * sp, _e2m1_value(n7) * sp))
        else:
            if not HAS_ZP:
                z = 8
                n0 = n0 ^ 8
                n1 = n1 ^ 8
                n2 = n2 ^ 8
                n3 = n3 ^ 8
                n4 = n4 ^ 8
                n5 = n5 ^ 8
                n6 = n6 ^ 8
                n7 = n7 ^ 8
            return _pair(n0 - z, n4 - z), _pair(n1 - z, n5 - z), _pair(n2 - z, n6 - z), _pair(n3 - z, n7 - z)
    else:
        if IS_NVFP4:
            # as in _e2m1_word: per byte, the code's exponent and mantissa bits at 0-2, its sign at 6
            ev = (w & 0x07070707) | ((w << 3) & 0x78787878)
            od = ((w >> 4) & 0x07070707) | ((w >> 1) & 0x78787878)
            if F16:  # sign at bit 15, exponent and mantissa at 9-11: value * 2**-14
                p0 = (ev << 9) & half_mask
                p1 = (od << 9) & half_mask
                p2 = (ev << 1) & half_mask
                p3 = (od << 1) & half_mask
            else:  # sign at bit 15, exponent and mantissa at 6-8: value * 2**-126 (code 1 a subnormal)
                p0 = ((ev << 6) & 0x01C001C0) | ((ev << 9) & -2147450880)  # 0x80008000
                p1 = ((od << 6) & 0x01C001C0) | ((od << 9) & -2147450880)
                p2 = ((ev >> 2) & 0x01C001C0) | ((ev << 1) & -2147450880)
                p3 = ((od >> 2) & 0x01C001C0) | ((od << 1) & -2147450880)
            return _asm_mul4(p0, p1, p2, p3, sp, F16)
        else:
            return _asm_int_pairs(w, zlo, zhi, F16, HAS_ZP)


@triton.jit
def _act_pairs(x_row, xi_row, xw, ok, K, j: tl.constexpr, r4):
    """The activation pairs (0, 4), (1, 5), (2, 6), (3, 7) of word j of the lane's 32 elements (xw: the offset
    of its first element; ok: the lane's row exists; xi_row: the row as int32 words)."""
    if _EMULATE:
        k = xw + 8 * j
        x0 = tl.load(x_row + k, mask=ok & (k < K), other=0.0)
        x1 = tl.load(x_row + k + 1, mask=ok & (k + 1 < K), other=0.0)
        x2 = tl.load(x_row + k + 2, mask=ok & (k + 2 < K), other=0.0)
        x3 = tl.load(x_row + k + 3, mask=ok & (k + 3 < K), other=0.0)
        x4 = tl.load(x_row + k + 4, mask=ok & (k + 4 < K), other=0.0)
        x5 = tl.load(x_row + k + 5, mask=ok & (k + 5 < K), other=0.0)
        x6 = tl.load(x_row + k + 6, mask=ok & (k + 6 < K), other=0.0)
        x7 = tl.load(x_row + k + 7, mask=ok & (k + 7 < K), other=0.0)
        return _pair(x0, x4), _pair(x1, x5), _pair(x2, x6), _pair(x3, x7)
    else:
        # 16 bytes as 4 words (x0 x1, x2 x3, x4 x5, x6 x7); K is a multiple of 8, so they lie in K or past it
        k = xw + 8 * j
        v = tl.load(xi_row[:, None] + (k // 2)[:, None] + r4[None, :], mask=(ok & (k < K))[:, None], other=0)
        v01, v23, v45, v67 = _quad(v)
        return (_asm_prmt(v01, v45, 0x5410), _asm_prmt(v01, v45, 0x7632), _asm_prmt(v23, v67, 0x5410),
                _asm_prmt(v23, v67, 0x7632))


@triton.jit
def _quad(x):
    """[T, 4] -> its 4 columns (register renames)."""
    lo, hi = tl.split(tl.reshape(x, (x.shape[0], 2, 2)))
    x0, x2 = tl.split(lo)
    x1, x3 = tl.split(hi)
    return x0, x1, x2, x3


@triton.jit
def _row_tile(w_ptr, s_ptr, zp_ptr, row_a, row_b, cw, gi, xp, c0, half_mask,
              stride_wn, stride_sn, stride_zn,
              IS_NVFP4: tl.constexpr, HAS_ZP: tl.constexpr, F16: tl.constexpr, W: tl.constexpr, r4):
    """One tile of 16 rows (row_a: rows g, row_b: rows g + 8) over the lane's 32 elements of this block: the
    float32 sums (d0, d1 of row_a, d2, d3 of row_b) for columns 2q, 2q + 1, group-scaled for INT weights."""
    wa = tl.load(w_ptr + row_a[:, None] * stride_wn + (cw[:, None] + r4[None, :]))
    wb = tl.load(w_ptr + row_b[:, None] * stride_wn + (cw[:, None] + r4[None, :]))
    wa0, wa1, wa2, wa3 = _quad(wa)
    wb0, wb1, wb2, wb3 = _quad(wb)
    za = 8
    zb = 8
    zla = 0
    zha = 0
    zlb = 0
    zhb = 0
    spa0 = 0
    spa1 = 0
    spb0 = 0
    spb1 = 0
    if IS_NVFP4:
        blk = cw // 2  # the lane's first block of 16 (words 0-1; words 2-3 the next)
        sa = tl.load(s_ptr + row_a[:, None] * stride_sn + (blk[:, None] + tl.arange(0, 2)[None, :])).to(tl.int32)
        sb = tl.load(s_ptr + row_b[:, None] * stride_sn + (blk[:, None] + tl.arange(0, 2)[None, :])).to(tl.int32)
        if _EMULATE:
            sa0, sa1 = tl.split(_fp8_scale(sa) * 0.00006103515625)  # 2**-14: the scales themselves
            sb0, sb1 = tl.split(_fp8_scale(sb) * 0.00006103515625)
            spa0 = sa0
            spa1 = sa1
            spb0 = sb0
            spb1 = sb1
        else:
            ba0, ba1 = tl.split(sa)
            bb0, bb1 = tl.split(sb)
            spa0, spa1 = _scale_pairs(ba0 | (ba1 << 16), F16)
            spb0, spb1 = _scale_pairs(bb0 | (bb1 << 16), F16)
    elif HAS_ZP:
        za = tl.load(zp_ptr + row_a * stride_zn + gi).to(tl.int32)
        zb = tl.load(zp_ptr + row_b * stride_zn + gi).to(tl.int32)
        if F16:  # 1024 + z and -64 - z in each half
            zla = (za | 0x6400) * 65537
            zha = ((za << 4) | 0xD400) * 65537
            zlb = (zb | 0x6400) * 65537
            zhb = ((zb << 4) | 0xD400) * 65537
        else:  # -128 - z in each half
            zla = (za | 0xC300) * 65537
            zha = zla
            zlb = (zb | 0xC300) * 65537
            zhb = zlb
    else:
        if F16:
            zla = 0x64086408
            zha = -729754496  # 0xD480D480: -72 in each half
        else:
            zla = -1022835960  # 0xC308C308: -136 in each half
            zha = zla
        zlb = zla
        zhb = zha
    d0 = c0
    d1 = c0
    d2 = c0
    d3 = c0
    for j in tl.static_range(4):
        if j == 0:
            ua = wa0
            ub = wb0
        elif j == 1:
            ua = wa1
            ub = wb1
        elif j == 2:
            ua = wa2
            ub = wb2
        else:
            ua = wa3
            ub = wb3
        if j < 2:
            spa = spa0
            spb = spb0
        else:
            spa = spa1
            spb = spb1
        pa0, pa1, pa2, pa3 = _weight_pairs(ua, za, zla, zha, spa, half_mask, IS_NVFP4, HAS_ZP, F16)
        pb0, pb1, pb2, pb3 = _weight_pairs(ub, zb, zlb, zhb, spb, half_mask, IS_NVFP4, HAS_ZP, F16)
        x04, x15, x26, x37 = xp[j]
        d0, d1, d2, d3 = _mma(pa0, pb0, pa1, pb1, x04, x15, d0, d1, d2, d3, F16, W)
        d0, d1, d2, d3 = _mma(pa2, pb2, pa3, pb3, x26, x37, d0, d1, d2, d3, F16, W)
    if not IS_NVFP4:
        s_a = tl.load(s_ptr + row_a * stride_sn + gi)
        s_b = tl.load(s_ptr + row_b * stride_sn + gi)
        d0 = d0 * s_a
        d1 = d1 * s_a
        d2 = d2 * s_b
        d3 = d3 * s_b
    return d0, d1, d2, d3


@triton.jit
def _store_tile(out_ptr, bias_ptr, acc0, acc1, acc2, acc3, row0, M, N, post, stride_om,
                HAS_BIAS: tl.constexpr, W: tl.constexpr):
    """Sum a row tile's lane sums over the warps and store out[2q (+1), row g (+8)] with the bias."""
    l = tl.arange(0, 32)
    rows = row0 + l // 4
    m0 = 2 * (l % 4)
    for h in tl.static_range(4):
        if h == 0:
            acc = acc0
        elif h == 1:
            acc = acc1
        elif h == 2:
            acc = acc2
        else:
            acc = acc3
        o = tl.sum(tl.reshape(acc, (W, 32)), axis=0) * post
        r = rows + 8 * (h // 2)
        m = m0 + (h % 2)
        if HAS_BIAS:
            o += tl.load(bias_ptr + r, mask=r < N, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + r, o.to(out_ptr.dtype.element_ty), mask=(r < N) & (m < M))


@triton.jit
def w4_gemv_mma_kernel(
    a_ptr, w_ptr, s_ptr, zp_ptr, gs_ptr, bias_ptr, out_ptr,
    M, N, K, KW, mask_bits,
    stride_am, stride_wn, stride_sn, stride_zn, stride_om,
    IS_NVFP4: tl.constexpr, HAS_ZP: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """w4_gemv_kernel's product on the tensor cores (fp16/bf16 A, M <= 8, INT groups a multiple of 128, K even,
    A 4-byte aligned with an even row stride). The arguments are w4_gemv_kernel's; BLOCK_N = 16 or 32 rows per
    program (one or two MMA row tiles), BLOCK_C = 4 * num_warps chunks per iteration (each warp a block of 128
    elements, each lane a chunk of 32 of it). mask_bits: 0x8E008E00 for NVFP4 (unused for INT weights)."""
    F16: tl.constexpr = a_ptr.dtype.element_ty == tl.float16
    W: tl.constexpr = BLOCK_C // 4
    T: tl.constexpr = 32 * W
    R: tl.constexpr = BLOCK_N // 16
    pid = tl.program_id(0)
    t = tl.arange(0, T)
    lane = t % 32
    warp = t // 32
    g = lane // 4
    q = lane % 4
    r4 = tl.arange(0, 4)
    x_row = a_ptr + g * stride_am
    if _EMULATE:
        xi_row = x_row
    else:
        xi_row = a_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + g * (stride_am // 2)
    x_ok = g < M
    row0 = pid * BLOCK_N
    ra0 = tl.minimum(row0 + g, N - 1).to(tl.int64)  # rows past N re-read row N - 1 and are not stored
    rb0 = tl.minimum(row0 + 8 + g, N - 1).to(tl.int64)
    ra1 = tl.minimum(row0 + 16 + g, N - 1).to(tl.int64)
    rb1 = tl.minimum(row0 + 24 + g, N - 1).to(tl.int64)
    c0 = tl.zeros((T,), tl.float32)
    acc00 = c0
    acc01 = c0
    acc02 = c0
    acc03 = c0
    acc10 = c0
    acc11 = c0
    acc12 = c0
    acc13 = c0
    NB = tl.cdiv(KW, 16)  # blocks of 128 elements
    for b0 in range(0, NB, W):
        b = b0 + warp
        xw = 128 * b + 32 * q  # the lane's first element; past K: activations masked to zero
        cw = tl.minimum(16 * b + 4 * q, KW - 4)  # its first word (past the row: the last chunk again)
        gi = (8 * cw) // GROUP
        xp = (_act_pairs(x_row, xi_row, xw, x_ok, K, 0, r4), _act_pairs(x_row, xi_row, xw, x_ok, K, 1, r4),
              _act_pairs(x_row, xi_row, xw, x_ok, K, 2, r4), _act_pairs(x_row, xi_row, xw, x_ok, K, 3, r4))
        d0, d1, d2, d3 = _row_tile(w_ptr, s_ptr, zp_ptr, ra0, rb0, cw, gi, xp, c0, mask_bits,
                                   stride_wn, stride_sn, stride_zn, IS_NVFP4, HAS_ZP, F16, W, r4)
        acc00 += d0
        acc01 += d1
        acc02 += d2
        acc03 += d3
        if R > 1:
            d0, d1, d2, d3 = _row_tile(w_ptr, s_ptr, zp_ptr, ra1, rb1, cw, gi, xp, c0, mask_bits,
                                       stride_wn, stride_sn, stride_zn, IS_NVFP4, HAS_ZP, F16, W, r4)
            acc10 += d0
            acc11 += d1
            acc12 += d2
            acc13 += d3
    post = 1.0
    if IS_NVFP4:
        post = tl.load(gs_ptr).to(tl.float32)
        if not _EMULATE:
            post = post * (128.0 if F16 else 256.0)  # the 2**-7 / 2**-8 the products carry
    _store_tile(out_ptr, bias_ptr, acc00, acc01, acc02, acc03, row0, M, N, post, stride_om, HAS_BIAS, W)
    if R > 1:
        _store_tile(out_ptr, bias_ptr, acc10, acc11, acc12, acc13, row0 + 16, M, N, post, stride_om, HAS_BIAS, W)
