/* Weight-only linear layers with 4-bit codes, for the CPU: INT4/INT3 (symmetric or with zero points) and NVFP4.
 *
 * Every such weight is "code -> value through a 16-entry table, times a scale per group of G codes along K":
 *   w[n, k] = (lut[code(n, k)] - zero(n, k / G)) * scale(n, k / G)
 * with two codes per byte (element 2i in the low nibble, 2i+1 in the high one), as qcompile.numerics packs them.
 * The kernel reads the packed bytes once per output row and never writes a dequantized weight, which is why it
 * beats a float32 GEMM on small batches (decode steps): it moves 1/8 of the bytes. With AVX-512 the table lookup
 * is one permute per 16 codes; with AVX2 (8 lanes), two permutes and a blend per 8 codes.
 *
 * Numerics: each weight value is formed exactly as qcompile.numerics forms it (lut[c] * scale, (c - z) * scale, or
 * the E2M1 value times float(FP8 block scale) * global scale), so only the order of the float32 sums differs from
 * the reference's dequantize-then-GEMM.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define QC_AVX2 1
#endif

/* The scale of group g in row n: float32 [N, groups], or uint8 codes mapped through scale_lut[256] (NVFP4's FP8
 * block scales with the global scale folded in). */
static inline float group_scale(const void *scale, const float *scale_lut, int64_t index) {
    if (scale_lut) return scale_lut[((const uint8_t *)scale)[index]];
    return ((const float *)scale)[index];
}

/* x [M, K] float32 -> even [M, H] and odd [M, H] halves (H = KP / 2), zero past K. */
static void split_even_odd(const float *x, int64_t M, int64_t K, int64_t H, float *even, float *odd) {
    for (int64_t m = 0; m < M; ++m) {
        const float *row = x + m * K;
        float *e = even + m * H, *o = odd + m * H;
        for (int64_t j = 0; j < H; ++j) {
            int64_t k = 2 * j;
            e[j] = k < K ? row[k] : 0.0f;
            o[j] = k + 1 < K ? row[k + 1] : 0.0f;
        }
    }
}

#ifdef __AVX512F__
#define ROWS 8 /* activation rows per pass over a weight row: 8 accumulators, the codes decoded once for all */

/* The 32 scaled weight values of chunk j (lanes hold codes 2j' and 2j'+1 of the chunk's 16 bytes): lo = even k,
 * hi = odd k. Lane j' of the chunk belongs to group (j + j') / half_group: one group per chunk when half_group is
 * a multiple of 16, two (8 lanes each) for NVFP4's 16-element blocks. */
static inline void decode_chunk(const uint8_t *codes, int64_t j, __m512 table, const void *scale,
                                const float *scale_lut, const uint8_t *zero, int64_t srow, int64_t half_group,
                                __m512 *lo, __m512 *hi) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + j)));
    __m512 l = _mm512_permutexvar_ps(_mm512_and_si512(c, _mm512_set1_epi32(0xF)), table);
    __m512 h = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
    __m512 s, z;
    if (half_group % 16 == 0) {
        int64_t g = srow + j / half_group;
        s = _mm512_set1_ps(group_scale(scale, scale_lut, g));
        z = _mm512_set1_ps(zero ? (float)zero[g] : 0.0f);
    } else { /* half_group == 8 */
        int64_t g = srow + j / 8;
        s = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(group_scale(scale, scale_lut, g))),
                               _mm256_set1_ps(group_scale(scale, scale_lut, g + 1)), 1);
        z = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(zero ? (float)zero[g] : 0.0f)),
                               _mm256_set1_ps(zero ? (float)zero[g + 1] : 0.0f), 1);
    }
    *lo = _mm512_mul_ps(_mm512_sub_ps(l, z), s);
    *hi = _mm512_mul_ps(_mm512_sub_ps(h, z), s);
}
#endif

#ifdef QC_AVX2
#define ROWS 8

/* lut16[idx] for 8 indices in 0..15: the table's halves are two registers, bit 3 of the index picks one. */
static inline __m256 lookup16(__m256i idx, __m256 table_low, __m256 table_high) {
    const __m256 low = _mm256_permutevar8x32_ps(table_low, idx), high = _mm256_permutevar8x32_ps(table_high, idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* The 16 scaled weight values of the 8 bytes at chunk j: lo = even k, hi = odd k; the chunk lies in one group
 * (half_group is a multiple of 8), whose scale s and zero z the caller broadcasts once per group. */
static inline void decode_chunk8(const uint8_t *codes, int64_t j, __m256 table_low, __m256 table_high, __m256 s,
                                 __m256 z, __m256 *lo, __m256 *hi) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + j)));
    const __m256 l = lookup16(_mm256_and_si256(c, _mm256_set1_epi32(0xF)), table_low, table_high);
    const __m256 h = lookup16(_mm256_srli_epi32(c, 4), table_low, table_high);
    *lo = _mm256_mul_ps(_mm256_sub_ps(l, z), s);
    *hi = _mm256_mul_ps(_mm256_sub_ps(h, z), s);
}

static inline __m256 group_scale8(const void *scale, const float *scale_lut, int64_t g) {
    return _mm256_set1_ps(group_scale(scale, scale_lut, g));
}

static inline __m256 group_zero8(const uint8_t *zero, int64_t g) {
    return _mm256_set1_ps(zero ? (float)zero[g] : 0.0f);
}

static inline float sum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
}

/* The 16 table values (minus the group's zero point when there is one) of the 8 bytes at chunk j, unscaled. */
static inline __attribute__((always_inline)) void lookup_chunk8(const uint8_t *codes, int64_t j, __m256 table_low,
                                                                __m256 table_high, const int has_zero, __m256 z,
                                                                __m256 *lo, __m256 *hi) {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + j)));
    *lo = lookup16(_mm256_and_si256(c, _mm256_set1_epi32(0xF)), table_low, table_high);
    *hi = lookup16(_mm256_srli_epi32(c, 4), table_low, table_high);
    if (has_zero) {
        *lo = _mm256_sub_ps(*lo, z);
        *hi = _mm256_sub_ps(*hi, z);
    }
}

/* As the AVX-512 dot_rows, 8 codes per step; the group scale multiplies each group's partial sums once (a fused
 * multiply-add into the row's total) instead of every decoded weight. */
static inline __attribute__((always_inline)) void dot_rows8(const int rows, const int has_zero, const float *even,
                                                            const float *odd, int64_t H, int64_t vector_end,
                                                            const uint8_t *codes, __m256 table_low,
                                                            __m256 table_high, const void *scale,
                                                            const float *scale_lut, const uint8_t *zero,
                                                            int64_t srow, int64_t half_group, float *y, int64_t N) {
    /* one group after another: its scale and zero are broadcast once, and no chunk divides to find its group */
    __m256 acc[ROWS], part[ROWS];
    for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t start = 0, g = srow; start < vector_end; start += half_group, ++g) {
        const __m256 s = group_scale8(scale, scale_lut, g), z = group_zero8(zero, g);
        const int64_t end = start + half_group < vector_end ? start + half_group : vector_end;
        for (int r = 0; r < rows; ++r) part[r] = _mm256_setzero_ps();
        for (int64_t j = start; j < end; j += 8) {
            __m256 lo, hi;
            lookup_chunk8(codes, j, table_low, table_high, has_zero, z, &lo, &hi);
            for (int r = 0; r < rows; ++r) {
                part[r] = _mm256_fmadd_ps(_mm256_loadu_ps(even + r * H + j), lo, part[r]);
                part[r] = _mm256_fmadd_ps(_mm256_loadu_ps(odd + r * H + j), hi, part[r]);
            }
        }
        for (int r = 0; r < rows; ++r) acc[r] = _mm256_fmadd_ps(part[r], s, acc[r]);
    }
    for (int r = 0; r < rows; ++r) y[r * N] = sum8(acc[r]);
}
#endif

/* The value of code c in group g of row n, as the scalar tail and the portable path form it. */
static inline float weight_value(const float *lut16, const void *scale, const float *scale_lut, const uint8_t *zero,
                                 int64_t g, uint8_t c) {
    float z = zero ? (float)zero[g] : 0.0f;
    return (lut16[c] - z) * group_scale(scale, scale_lut, g);
}

#ifdef __AVX512F__
/* y[r * N] for r < rows, one weight row against `rows` activation rows; always inlined with a constant `rows`. */
static inline __attribute__((always_inline)) void dot_rows(const int rows, const float *even, const float *odd,
                                                           int64_t H, int64_t vector_end, const uint8_t *codes,
                                                           __m512 table, const void *scale, const float *scale_lut,
                                                           const uint8_t *zero, int64_t srow, int64_t half_group,
                                                           float *y, int64_t N) {
    __m512 acc[ROWS];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < vector_end; j += 16) {
        __m512 lo, hi;
        decode_chunk(codes, j, table, scale, scale_lut, zero, srow, half_group, &lo, &hi);
        for (int r = 0; r < rows; ++r) {
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(even + r * H + j), lo, acc[r]);
            acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(odd + r * H + j), hi, acc[r]);
        }
    }
    for (int r = 0; r < rows; ++r) y[r * N] = _mm512_reduce_add_ps(acc[r]);
}
#endif

/* One output row n for every m: y[m, n]. */
static void row_dot(const float *even, const float *odd, int64_t M, int64_t H, const uint8_t *codes,
                    const float *lut16, const void *scale, const float *scale_lut, const uint8_t *zero,
                    int64_t groups, int64_t half_group, int64_t n, float *y, int64_t N) {
    const int64_t srow = n * groups;
    int64_t vector_end = 0;
#ifdef __AVX512F__
    if (half_group % 16 == 0 || half_group == 8) {
        const __m512 table = _mm512_loadu_ps(lut16);
        vector_end = H - H % 16;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int64_t rows = M - m0 < ROWS ? M - m0 : ROWS;
            /* a constant row count per call, so that the accumulators stay in registers */
            switch (rows) {
#define CASE(R) case R: dot_rows(R, even + m0 * H, odd + m0 * H, H, vector_end, codes, table, scale, scale_lut, \
                                 zero, srow, half_group, y + m0 * N + n, N); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
            }
        }
    } else
#elif defined(QC_AVX2)
    if (half_group % 8 == 0) {
        const __m256 table_low = _mm256_loadu_ps(lut16), table_high = _mm256_loadu_ps(lut16 + 8);
        vector_end = H - H % 8;
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
            const int64_t rows = M - m0 < ROWS ? M - m0 : ROWS;
            switch (rows) {
            /* constant row counts and zero-point presence per call: accumulators in registers, no dead subtracts */
#define CASE(R) case R: if (zero) dot_rows8(R, 1, even + m0 * H, odd + m0 * H, H, vector_end, codes, table_low,  \
                                            table_high, scale, scale_lut, zero, srow, half_group, y + m0 * N + n, N); \
                        else dot_rows8(R, 0, even + m0 * H, odd + m0 * H, H, vector_end, codes, table_low,           \
                                       table_high, scale, scale_lut, zero, srow, half_group, y + m0 * N + n, N);     \
                        break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
            }
        }
    } else
#endif
    {
        for (int64_t m = 0; m < M; ++m) y[m * N + n] = 0.0f;
    }
    for (int64_t m = 0; m < M; ++m) { /* the portable path, and the tail shorter than one chunk */
        const float *e = even + m * H, *o = odd + m * H;
        float total = 0.0f;
        for (int64_t j = vector_end; j < H; ++j) {
            int64_t g = srow + j / half_group;
            total += e[j] * weight_value(lut16, scale, scale_lut, zero, g, codes[j] & 0xF) +
                     o[j] * weight_value(lut16, scale, scale_lut, zero, g, codes[j] >> 4);
        }
        y[m * N + n] += total;
    }
}

/* y[M, N] = x[M, K] @ w[N, K]^T (+ bias), w given by packed [N, KP/2] codes as described above.
 * Returns 0, or -1 when memory runs out. */
int qc_lut4_linear(const float *x, int64_t M, int64_t K, const uint8_t *packed, int64_t N, int64_t KP,
                   int64_t group, const float *lut16, const void *scale, const float *scale_lut,
                   const uint8_t *zero, const float *bias, float *y, int threads) {
    const int64_t H = KP / 2, half_group = group / 2, groups = KP / group;
    float *even = (float *)malloc(sizeof(float) * (size_t)(M * H));
    float *odd = (float *)malloc(sizeof(float) * (size_t)(M * H));
    if (!even || !odd) {
        free(even);
        free(odd);
        return -1;
    }
    split_even_odd(x, M, K, H, even, odd);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        row_dot(even, odd, M, H, packed + n * H, lut16, scale, scale_lut, zero, groups, half_group, n, y, N);
        if (bias)
            for (int64_t m = 0; m < M; ++m) y[m * N + n] += bias[n];
    }
    free(even);
    free(odd);
    return 0;
}

/* w[N, K] float32, the dequantized weight (columns past K dropped), for batches too large for qc_lut4_linear. */
void qc_lut4_dequantize(const uint8_t *packed, int64_t N, int64_t KP, int64_t K, int64_t group, const float *lut16,
                        const void *scale, const float *scale_lut, const uint8_t *zero, float *w, int threads) {
    const int64_t H = KP / 2, groups = KP / group, half_group = group / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; ++n) {
        const uint8_t *codes = packed + n * H;
        float *out = w + n * K;
        int64_t j = 0;
#ifdef __AVX512F__
        if (half_group % 16 == 0 || half_group == 8) {
            const __m512 table = _mm512_loadu_ps(lut16);
            /* lo holds even k, hi odd k: interleave them back into k order, 16 + 16 values */
            const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
            const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
            for (; j + 16 <= H && 2 * j + 32 <= K; j += 16) {
                __m512 lo, hi;
                decode_chunk(codes, j, table, scale, scale_lut, zero, n * groups, half_group, &lo, &hi);
                _mm512_storeu_ps(out + 2 * j, _mm512_permutex2var_ps(lo, first, hi));
                _mm512_storeu_ps(out + 2 * j + 16, _mm512_permutex2var_ps(lo, second, hi));
            }
        }
#elif defined(QC_AVX2)
        if (half_group % 8 == 0) {
            const __m256 table_low = _mm256_loadu_ps(lut16), table_high = _mm256_loadu_ps(lut16 + 8);
            for (; j + 8 <= H && 2 * j + 16 <= K; j += 8) {
                const int64_t g = n * groups + j / half_group;
                __m256 lo, hi;
                decode_chunk8(codes, j, table_low, table_high, group_scale8(scale, scale_lut, g), group_zero8(zero, g),
                              &lo, &hi);
                /* interleave even and odd k back: unpack works within 128-bit halves, then the halves are joined */
                const __m256 a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);
                _mm256_storeu_ps(out + 2 * j, _mm256_permute2f128_ps(a, b, 0x20));
                _mm256_storeu_ps(out + 2 * j + 8, _mm256_permute2f128_ps(a, b, 0x31));
            }
        }
#endif
        for (int64_t k = 2 * j; k < K; ++k) {
            uint8_t byte = codes[k / 2];
            out[k] = weight_value(lut16, scale, scale_lut, zero, n * groups + k / group,
                                  (k & 1) ? (uint8_t)(byte >> 4) : (uint8_t)(byte & 0xF));
        }
    }
}
