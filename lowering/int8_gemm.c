/* INT8 x INT8 linear layers for x86 CPUs with AVX2 but no INT8 dot-product instruction (no VNNI, no AMX).
 *
 * There, oneDNN's u8 x s8 kernels add pairs of products in saturating int16 (wrong sums near +-127) and
 * torch._int_mm runs a reference loop. This kernel widens both operands to int16 and uses vpmaddwd, which adds
 * pairs of int16 products into int32 lanes exactly (|q_x * q_w| <= 127^2, so a pair is at most 32258): the integer
 * product is exact for K up to 2^31 / 127^2, and the kernel moves half the bytes of a float32 GEMM.
 *
 *   y[m, n] = act(float(sum_k q_x[m, k] * q_w[n, k]) * s_w[n] * s_x[m] + bias[n])
 *
 * with q_x = clamp(round_half_even(x / s_x), -127, 127) and s_x = amax / 127 per row (or one static scale), formed
 * exactly as qcompile.numerics.quantize_int8 forms them (IEEE division, not a reciprocal), and the output scaled in
 * the same order as qcompile.lowering.cpu.int8_linear_int_mm (this file is compiled with -ffp-contract=off). act is
 * the identity, or GELU (erf form) or SiLU applied while the tile is still in registers, which saves a separate
 * elementwise pass over the layer's output (MiniLM: [1024, 1536] floats per FFN). Several weights can share one
 * quantization of x (qc_int8_linear_many: q/k/v, gate/up).
 *
 * Layout: the weight is packed once into panels of 16 output columns, each K/2 pairs of 16 x (w[k], w[k+1]) int16,
 * one 32-byte vector per 8 columns; the activation is quantized into rows of int16 pairs, so one 32-bit broadcast
 * feeds a vpmaddwd against a weight vector. The micro-kernel holds a 6 x 16 tile of int32 sums in 12 registers for
 * the whole of K and writes float32 outputs, so no int32 partial sums ever go to memory.
 *
 * Speed: vpmaddwd does 16 multiply-adds per instruction and issues twice per cycle on Zen 3, as two float32 FMAs
 * do. The full tile's loop (assembly, see full_tile_sums) runs at ~27 multiply-adds per cycle out of a possible 32,
 * against ~15 for MKL's float32 GEMM: on MiniLM's 36 layer shapes in sequence (distinct weights, as in the model)
 * 1.4-1.7x MKL's float32 GEMM, 2 threads, AMD EPYC Zen 3; 2.5-3.3x for one row (a decode step reads 2 bytes a
 * weight).
 */
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QC_NR 16                 /* output columns per weight panel */
#define QC_MR 6                  /* activation rows per micro-kernel call */
#define QC_N_TILE 2              /* panels per task with few rows (32 output columns) */
#define QC_TASKS_PER_THREAD 4    /* row groups per thread from which rows, not columns, are shared out */
#ifndef QC_A_BLOCK_BYTES
#define QC_A_BLOCK_BYTES 196608  /* activation codes per row block: 192 KB, in L2 beside a weight panel */
#endif

static void *aligned_buffer(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes) == 0 ? p : NULL;
}

static int64_t pairs_of(int64_t k) { return (k + 1) / 2; }
static int64_t panels_of(int64_t n) { return (n + QC_NR - 1) / QC_NR; }

/* 1 when this build has the kernel (the compiler targeted a CPU with AVX2), else 0. */
int qc_int8_available(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* Bytes of the packed form of an [N, K] weight (what qc_int8_pack_weight writes). */
int64_t qc_int8_packed_bytes(int64_t N, int64_t K) { return panels_of(N) * pairs_of(K) * QC_NR * 2 * 2; }

/* w int8 [N, K] row-major -> packed int16 panels, zero past N and K. `out` must be 32-byte aligned. */
void qc_int8_pack_weight(const int8_t *w, int64_t N, int64_t K, int16_t *out, int threads) {
    const int64_t KP = pairs_of(K), NP = panels_of(N);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < NP; ++p) {
        int16_t *panel = out + p * KP * QC_NR * 2;
        for (int64_t kp = 0; kp < KP; ++kp)
            for (int64_t c = 0; c < QC_NR; ++c)
                for (int64_t t = 0; t < 2; ++t) {
                    const int64_t n = p * QC_NR + c, k = 2 * kp + t;
                    panel[(kp * QC_NR + c) * 2 + t] = (n < N && k < K) ? w[n * K + k] : 0;
                }
    }
}

#if defined(__AVX2__)
/* Activations applied to a tile before it is stored (see qc_int8_linear's `activation`). */
enum { QC_IDENTITY = 0, QC_GELU = 1, QC_SILU = 2 };

static inline __m256 mul_add(__m256 a, __m256 b, __m256 c) {
#if defined(__FMA__)
    return _mm256_fmadd_ps(a, b, c);
#else
    return _mm256_add_ps(_mm256_mul_ps(a, b), c);
#endif
}

/* The activations below work on QC_ACT_LANES vectors at a time, one step for all of them before the next: each is a
 * chain of ~40 dependent operations, and done one vector at a time the chains queue behind each other (the fused
 * GELU cost as much as a separate pass over memory). */
#define QC_ACT_LANES 4
#define QC_EACH for (int j = 0; j < QC_ACT_LANES; ++j)

/* v[j] = exp(v[j] + lo[j]), lo a small correction; v is clamped to [-87, 88], where 2^n stays a normal float.
 * Relative error ~2e-7: n = round(v / ln 2), r = v - n ln 2 + lo in [-0.35, 0.35] (ln 2 split so that n * LN2_HI is
 * exact), e^r by its Taylor series to r^7 (truncation < 6e-9), times 2^n built in the exponent bits. */
static inline void exp_sum(__m256 v[QC_ACT_LANES], const __m256 lo[QC_ACT_LANES]) {
    static const float inverse_factorials[8] = {1.0f, 1.0f, 0.5f, 1.66666667e-1f, 4.16666667e-2f, 8.33333333e-3f,
                                                1.38888889e-3f, 1.98412698e-4f};
    __m256 n[QC_ACT_LANES], r[QC_ACT_LANES];
    QC_EACH {
        const __m256 hi = _mm256_min_ps(_mm256_max_ps(v[j], _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
        n[j] = _mm256_round_ps(_mm256_mul_ps(hi, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r[j] = _mm256_sub_ps(hi, _mm256_mul_ps(n[j], _mm256_set1_ps(0.693359375f)));
        r[j] = _mm256_add_ps(_mm256_sub_ps(r[j], _mm256_mul_ps(n[j], _mm256_set1_ps(-2.12194440e-4f))), lo[j]);
        v[j] = _mm256_set1_ps(inverse_factorials[7]);
    }
    for (int i = 6; i >= 0; --i) QC_EACH v[j] = mul_add(v[j], r[j], _mm256_set1_ps(inverse_factorials[i]));
    QC_EACH {
        const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[j]), _mm256_set1_epi32(127)), 23);
        v[j] = _mm256_mul_ps(v[j], _mm256_castsi256_ps(two_n));
    }
}

/* GELU(x) = x * Phi(x), Phi the standard normal CDF, to a few float32 ulps in relative terms also where x is
 * negative (torch's float32 1 + erf(x / sqrt 2) loses those digits). Phi(-|x|) = erfc(z) / 2 with z = |x| / sqrt 2,
 * erfc(z) = exp(-z^2) * erfcx(z), and erfcx(z) ~ t * P(t) with t = 1 / (1 + 0.375 z): P fitted here for the
 * relative error of erfcx over z in [0, 10] (1.2e-8; ~4e-7 evaluated in float32). Below x = -15, Phi(x) * x is under
 * the smallest float32: 0 (and NaN at -inf, as torch gives). */
static inline void gelu_erf(__m256 x[QC_ACT_LANES]) {
    static const float erfcx_p[9] = {0.21161349f, 0.2106494f, 0.2053153f, 0.121497765f, 0.27374187f,
                                     -0.22943877f, 0.43242136f, -0.2873414f, 0.061540958f};
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), minus_half = _mm256_set1_ps(-0.5f);
    const __m256 limit = _mm256_set1_ps(15.0f);
    __m256 in_range[QC_ACT_LANES], t[QC_ACT_LANES], g[QC_ACT_LANES], e[QC_ACT_LANES], e_lo[QC_ACT_LANES];
    QC_EACH {
        const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x[j]);
        in_range[j] = _mm256_cmp_ps(ax, limit, _CMP_LT_OQ);
        const __m256 a = _mm256_min_ps(ax, limit);
        t[j] = _mm256_div_ps(one, mul_add(_mm256_set1_ps(0.375f * 0.70710678f), a, one));
        /* -z^2 = -a^2 / 2, with the rounding error of a^2 carried (it matters in the tail, where z^2 is large) */
        const __m256 a2 = _mm256_mul_ps(a, a);
        e[j] = _mm256_mul_ps(a2, minus_half);
#if defined(__FMA__)
        e_lo[j] = _mm256_mul_ps(_mm256_fmsub_ps(a, a, a2), minus_half);
#else
        e_lo[j] = _mm256_setzero_ps();
#endif
        g[j] = _mm256_set1_ps(erfcx_p[8]);
    }
    exp_sum(e, e_lo);
    for (int i = 7; i >= 0; --i) QC_EACH g[j] = mul_add(g[j], t[j], _mm256_set1_ps(erfcx_p[i]));
    QC_EACH {
        const __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(g[j], t[j]), e[j]);
        const __m256 lower_tail = _mm256_and_ps(_mm256_mul_ps(erfc, half), in_range[j]); /* Phi(-|x|) */
        const __m256 phi = _mm256_blendv_ps(_mm256_sub_ps(one, lower_tail), lower_tail, x[j]); /* by x's sign */
        x[j] = _mm256_mul_ps(x[j], phi);
    }
}

/* SiLU(x) = x * sigmoid(x), sigmoid(x) = 1 / (1 + exp(-x)); below x = -88 (where exp(-x) would overflow) the
 * sigmoid is taken as 0: |SiLU(x)| < 6e-37 there (and NaN at -inf, as torch gives). */
static inline void silu(__m256 x[QC_ACT_LANES]) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 e[QC_ACT_LANES], zero[QC_ACT_LANES];
    QC_EACH {
        e[j] = _mm256_sub_ps(_mm256_setzero_ps(), x[j]);
        zero[j] = _mm256_setzero_ps();
    }
    exp_sum(e, zero);
    QC_EACH {
        const __m256 sigmoid = _mm256_and_ps(_mm256_div_ps(one, _mm256_add_ps(one, e[j])),
                                             _mm256_cmp_ps(x[j], _mm256_set1_ps(-88.0f), _CMP_GE_OQ));
        x[j] = _mm256_mul_ps(x[j], sigmoid);
    }
}
#undef QC_EACH

/* The activation on n vectors (n a multiple of QC_ACT_LANES). */
static inline void activate(__m256 *v, int n, int activation) {
    for (int i = 0; i < n; i += QC_ACT_LANES) {
        if (activation == QC_GELU) gelu_erf(v + i);
        else if (activation == QC_SILU) silu(v + i);
    }
}

/* 1 when row x [K] holds a NaN or inf; its largest |x| in *amax otherwise. */
static int row_amax(const float *x, int64_t K, float *amax) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7FFFFFFF), inf_bits = _mm256_set1_epi32(0x7F800000);
    __m256i m = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        /* on |x| as int32, ordering is the float ordering, and NaN/inf are the values >= the inf pattern */
        const __m256i v = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(x + k)), abs_mask);
        m = _mm256_max_epi32(m, v);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(v, _mm256_sub_epi32(inf_bits, _mm256_set1_epi32(1))));
    }
    int32_t lanes[8], best = 0;
    _mm256_storeu_si256((__m256i *)lanes, m);
    for (int i = 0; i < 8; ++i) best = lanes[i] > best ? lanes[i] : best;
    for (; k < K; ++k) {
        int32_t v;
        memcpy(&v, x + k, sizeof v);
        v &= 0x7FFFFFFF;
        best = v > best ? v : best;
    }
    float result;
    memcpy(&result, &best, sizeof result);
    *amax = result;
    return !_mm256_testz_si256(bad, bad) || best >= 0x7F800000;
}

/* Row x [K] -> int16 codes [2 * KP] (zero past K): clamp(round_half_even(x / scale), -127, 127). */
static void quantize_row(const float *x, int64_t K, float scale, int16_t *q, int64_t KP) {
    const __m256 s = _mm256_set1_ps(scale), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 a = _mm256_div_ps(_mm256_loadu_ps(x + k), s), b = _mm256_div_ps(_mm256_loadu_ps(x + k + 8), s);
        a = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
        b = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
        /* packs interleaves 128-bit halves; the permute puts the 16 codes back in order */
        const __m256i packed = _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permute4x64_epi64(packed, 0xD8));
    }
    for (; k < K; ++k) {
        float v = nearbyintf(x[k] / scale);
        v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
        q[k] = (int16_t)v;
    }
    for (; k < 2 * KP; ++k) q[k] = 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define QC_ASM_TILE 1
/* One row of the full tile for one pair of k: broadcast the row's pair, two vpmaddwd against the panel's vectors
 * (ymm12, ymm13), added into the row's two sums. */
#define QC_TILE_ROW(addr, c0, c1)                 \
    "vpbroadcastd " addr ", %%ymm14\n\t"          \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"      \
    "vpaddd %%ymm15, %%" c0 ", %%" c0 "\n\t"      \
    "vpmaddwd %%ymm13, %%ymm14, %%ymm14\n\t"      \
    "vpaddd %%ymm14, %%" c1 ", %%" c1 "\n\t"

/* The int32 sums of a full tile (QC_MR = 6 rows of a, 16 panel columns) into sums[6][16]. Written in assembly
 * because compilers either spill some of the 12 sums or test the row count inside the loop: this loop keeps the
 * sums in ymm0-11, the panel's two vectors in ymm12-13, and runs at about 27 multiply-adds per cycle on Zen 3,
 * 1.35x the compiled loop (vpmaddwd issues twice per cycle there). KP >= 1. */
static void full_tile_sums(const int16_t *a, int64_t lda, const int16_t *b, int64_t KP, int32_t sums[QC_MR][16]) {
    const int64_t row_bytes = 2 * lda, three_rows = 3 * row_bytes;
    const char *row0 = (const char *)a, *row5 = (const char *)(a + 5 * lda), *panel = (const char *)b;
    int64_t n = KP;
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"
        "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
        "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"
        "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"
        "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
        "vpxor %%ymm10, %%ymm10, %%ymm10\n\t"
        "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
        "1:\n\t"
        "vmovdqa (%[panel]), %%ymm12\n\t"
        "vmovdqa 32(%[panel]), %%ymm13\n\t"
        QC_TILE_ROW("(%[row0])", "ymm0", "ymm1")
        QC_TILE_ROW("(%[row0],%[row_bytes])", "ymm2", "ymm3")
        QC_TILE_ROW("(%[row0],%[row_bytes],2)", "ymm4", "ymm5")
        QC_TILE_ROW("(%[row0],%[three_rows])", "ymm6", "ymm7")
        QC_TILE_ROW("(%[row0],%[row_bytes],4)", "ymm8", "ymm9")
        QC_TILE_ROW("(%[row5])", "ymm10", "ymm11")
        "add $4, %[row0]\n\t"
        "add $4, %[row5]\n\t"
        "add $64, %[panel]\n\t"
        "dec %[n]\n\t"
        "jnz 1b\n\t"
        "vmovdqu %%ymm0, (%[sums])\n\t"
        "vmovdqu %%ymm1, 32(%[sums])\n\t"
        "vmovdqu %%ymm2, 64(%[sums])\n\t"
        "vmovdqu %%ymm3, 96(%[sums])\n\t"
        "vmovdqu %%ymm4, 128(%[sums])\n\t"
        "vmovdqu %%ymm5, 160(%[sums])\n\t"
        "vmovdqu %%ymm6, 192(%[sums])\n\t"
        "vmovdqu %%ymm7, 224(%[sums])\n\t"
        "vmovdqu %%ymm8, 256(%[sums])\n\t"
        "vmovdqu %%ymm9, 288(%[sums])\n\t"
        "vmovdqu %%ymm10, 320(%[sums])\n\t"
        "vmovdqu %%ymm11, 352(%[sums])\n\t"
        : [row0] "+r"(row0), [row5] "+r"(row5), [panel] "+r"(panel), [n] "+r"(n)
        : [row_bytes] "r"(row_bytes), [three_rows] "r"(three_rows), [sums] "r"(&sums[0][0])
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
#undef QC_TILE_ROW
#endif

/* y[rows][16 columns of panel] = scaled a[rows][2 * KP] . panel[KP][16 x 2]: the int32 sums stay in registers for
 * the whole of K, then become float32 outputs. `cols` (<= 16) columns are stored. */
static inline void micro_kernel(const int16_t *a, int64_t lda, int rows, const int16_t *b, int64_t KP,
                                const float *row_scale, const float *col_scale, const float *bias, int activation,
                                float *y, int64_t ldy, int cols) {
    __m256i c[QC_MR][2];
#if defined(QC_ASM_TILE)
    if (rows == QC_MR && KP > 0) {
        int32_t sums[QC_MR][16] __attribute__((aligned(32)));
        full_tile_sums(a, lda, b, KP, sums);
        for (int r = 0; r < QC_MR; ++r) {
            c[r][0] = _mm256_load_si256((const __m256i *)sums[r]);
            c[r][1] = _mm256_load_si256((const __m256i *)(sums[r] + 8));
        }
    } else
#endif
    {
        for (int r = 0; r < QC_MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
        for (int64_t kp = 0; kp < KP; ++kp) {
            const __m256i b0 = _mm256_load_si256((const __m256i *)(b + kp * 32));
            const __m256i b1 = _mm256_load_si256((const __m256i *)(b + kp * 32 + 16));
#define QC_ROW(r)                                                                            \
    if ((r) < rows) {                                                                        \
        const __m256i av = _mm256_set1_epi32(*(const int32_t *)(a + (r) * lda + 2 * kp));   \
        c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(av, b0));                      \
        c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(av, b1));                      \
    }
            QC_ROW(0) QC_ROW(1) QC_ROW(2) QC_ROW(3) QC_ROW(4) QC_ROW(5)
#undef QC_ROW
        }
    }
    __m256 out[QC_MR][2];
    if (rows < QC_MR) memset(out, 0, sizeof out); /* the activation runs on whole groups of vectors */
    for (int r = 0; r < rows; ++r) {
        const __m256 sx = _mm256_set1_ps(row_scale[r]);
        for (int h = 0; h < 2; ++h) {
            /* (acc * s_w) * s_x + bias, each step rounded to float32 as in int8_linear_int_mm */
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(c[r][h]), _mm256_loadu_ps(col_scale + 8 * h));
            v = _mm256_mul_ps(v, sx);
            out[r][h] = bias ? _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * h)) : v;
        }
    }
    if (activation != QC_IDENTITY) activate(&out[0][0], (2 * rows + QC_ACT_LANES - 1) / QC_ACT_LANES * QC_ACT_LANES,
                                            activation);
    for (int r = 0; r < rows; ++r) {
        float *row = y + r * ldy;
        for (int h = 0; h < 2; ++h) {
            if (cols >= 8 * (h + 1)) {
                _mm256_storeu_ps(row + 8 * h, out[r][h]);
            } else if (cols > 8 * h) {
                float lanes[8];
                _mm256_storeu_ps(lanes, out[r][h]);
                memcpy(row + 8 * h, lanes, (size_t)(cols - 8 * h) * sizeof(float));
            }
        }
    }
}

/* Row group g (6 rows) times weight panel p (16 columns), into y. */
static inline void multiply_tile(const int16_t *a, int64_t lda, int64_t M, int64_t g, const int16_t *packed,
                                 int64_t KP, int64_t N, int64_t p, const float *row_scale, const float *col_scale,
                                 const float *bias, int activation, float *y) {
    const int64_t m = g * QC_MR, n = p * QC_NR;
    const int rows = (int)(M - m < QC_MR ? M - m : QC_MR);
    const int cols = (int)(N - n < QC_NR ? N - n : QC_NR);
    micro_kernel(a + m * lda, lda, rows, packed + p * KP * QC_NR * 2, KP, row_scale + m, col_scale + n,
                 bias ? bias + n : NULL, activation, y + m * N + n, N, cols);
}
#endif

#if defined(__AVX2__)
/* y [M, N] = the codes a [M rows of 2 * KP] (scales row_scale) times one packed weight, scaled, plus bias, through
 * the activation. Returns 0, or 1 when a buffer could not be allocated. */
static int multiply_codes(const int16_t *a, const float *row_scale, int64_t M, int64_t K, const int16_t *packed,
                          int64_t N, const float *weight_scale, const float *bias, int activation, float *y,
                          int threads) {
    const int64_t KP = pairs_of(K), NP = panels_of(N), lda = 2 * KP;
    /* scales and bias padded to whole panels, so the micro-kernel loads 16 of each */
    float *col_scale_pad = calloc((size_t)(NP * QC_NR), sizeof(float));
    float *bias_pad = bias ? calloc((size_t)(NP * QC_NR), sizeof(float)) : NULL;
    if (!col_scale_pad || (bias && !bias_pad)) {
        free(col_scale_pad);
        free(bias_pad);
        return 1;
    }
    memcpy(col_scale_pad, weight_scale, (size_t)N * sizeof(float));
    if (bias) memcpy(bias_pad, bias, (size_t)N * sizeof(float));
    const int64_t row_groups = (M + QC_MR - 1) / QC_MR;
    if (row_groups >= (int64_t)threads * QC_TASKS_PER_THREAD) {
        /* Many rows: blocks of rows whose codes fit in L2, each multiplied by every weight panel in turn (a panel
         * stays in L1/L2 while the block's row groups pass over it); a thread takes a contiguous run of blocks, so
         * the weight is read from L3 once per block and the activation once. */
        int64_t blocks = (row_groups * QC_MR * lda * 2 + QC_A_BLOCK_BYTES - 1) / QC_A_BLOCK_BYTES;
        blocks = (blocks + threads - 1) / threads * threads;
        const int64_t block_groups = (row_groups + blocks - 1) / blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t g0 = block * block_groups;
            const int64_t g1 = g0 + block_groups < row_groups ? g0 + block_groups : row_groups;
            for (int64_t p = 0; p < NP; ++p)
                for (int64_t g = g0; g < g1; ++g)
                    multiply_tile(a, lda, M, g, packed, KP, N, p, row_scale, col_scale_pad, bias ? bias_pad : NULL,
                                  activation, y);
        }
    } else {
        /* Few rows (decode steps): the weight panels are shared out, every thread reads its own part of them. */
        const int64_t n_tasks = (NP + QC_N_TILE - 1) / QC_N_TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < n_tasks; ++task) {
            const int64_t p1 = (task + 1) * QC_N_TILE < NP ? (task + 1) * QC_N_TILE : NP;
            for (int64_t p = task * QC_N_TILE; p < p1; ++p)
                for (int64_t g = 0; g < row_groups; ++g)
                    multiply_tile(a, lda, M, g, packed, KP, N, p, row_scale, col_scale_pad, bias ? bias_pad : NULL,
                                  activation, y);
        }
    }
    free(col_scale_pad);
    free(bias_pad);
    return 0;
}
#endif

/* y[i] [M, N[i]] = int8 linear of x [M, K] float32 against each of `count` packed weights (see the top of this
 * file), x quantized once for all of them: the layers that read one tensor (q/k/v, gate/up).
 * static_scale: NULL for per-row scales amax / 127, else the one scale of every row (0 means 1, as in the reference).
 * activation[i]: 0 none, 1 GELU (erf form), 2 SiLU, applied to each output of y[i].
 * Returns 0; 1 when a buffer could not be allocated; 2 when x holds a NaN or inf; 3 without AVX2; 4 when the static
 * scale is negative, NaN or inf; 5 for an unknown activation. */
int qc_int8_linear_many(const float *x, int64_t M, int64_t K, const float *static_scale, int count,
                        const int16_t *const *packed, const int64_t *N, const float *const *weight_scale,
                        const float *const *bias, const int *activation, float *const *y, int threads) {
#if !defined(__AVX2__)
    (void)x; (void)M; (void)K; (void)static_scale; (void)count; (void)packed; (void)N; (void)weight_scale;
    (void)bias; (void)activation; (void)y; (void)threads;
    return 3;
#else
    for (int i = 0; i < count; ++i)
        if (activation[i] < QC_IDENTITY || activation[i] > QC_SILU) return 5;
    float fixed_scale = 0.0f;
    if (static_scale) {
        fixed_scale = *static_scale;
        if (!(fixed_scale >= 0.0f) || isinf(fixed_scale)) return 4;
        if (fixed_scale == 0.0f) fixed_scale = 1.0f;
    }
    const int64_t KP = pairs_of(K), lda = 2 * KP;
    int16_t *a = aligned_buffer((size_t)(M * lda * 2));
    float *row_scale = malloc((size_t)M * sizeof(float));
    if (!a || !row_scale) {
        free(a);
        free(row_scale);
        return 1;
    }
    int bad = 0;
    /* one thread for a few rows (decode steps): waking the others costs more than the work */
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (M * K >= 16384)
    for (int64_t m = 0; m < M; ++m) {
        float amax;
        bad |= row_amax(x + m * K, K, &amax);
        float s = static_scale ? fixed_scale : amax / 127.0f;
        if (s == 0.0f) s = 1.0f;
        row_scale[m] = s;
        quantize_row(x + m * K, K, s, a + m * lda, KP);
    }
    int status = bad ? 2 : 0;
    for (int i = 0; i < count && status == 0; ++i)
        status = multiply_codes(a, row_scale, M, K, packed[i], N[i], weight_scale[i], bias[i], activation[i], y[i],
                                threads);
    free(a);
    free(row_scale);
    return status;
#endif
}

/* y [M, N] = int8 linear of x [M, K] float32 against one packed weight: qc_int8_linear_many with one weight. */
int qc_int8_linear(const float *x, int64_t M, int64_t K, const float *static_scale, const int16_t *packed, int64_t N,
                   const float *weight_scale, const float *bias, int activation, float *y, int threads) {
    return qc_int8_linear_many(x, M, K, static_scale, 1, &packed, &N, &weight_scale, &bias, &activation, &y, threads);
}
