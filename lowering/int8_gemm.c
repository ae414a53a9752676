/* INT8 x INT8 linear layers for x86 CPUs with AVX2 but no INT8 dot-product instruction (no VNNI, no AMX).
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
 * The integer sum is exact. AVX2's byte multiply-add, vpmaddubsw, multiplies unsigned by signed bytes and adds each
 * pair of products in saturating int16: fed u = q_x + 127 in [0, 254] against q_w, a pair u0 w0 + u1 w1 overflows
 * only where w0 and w1 have the same sign and |w0| + |w1| > 129 (254 * 129 = 32766). oneDNN's u8 x s8 kernels take
 * those wrong sums; this kernel arranges the weight so that no pair can overflow:
 *
 * - the second code of a pair may be stored negated, multiplied by 127 - q_x instead of 127 + q_x: the product is
 *   the same up to a constant, and a pair of opposite signs cannot overflow. The activation is stored in the four
 *   variants of each group of four codes (neither, the second, the fourth, or both negated), and every group of
 *   four k of a weight panel picks the variant in which the fewest of its 16 columns' pairs can overflow;
 * - a pair that can still overflow keeps its first code in that step and moves its second to an extra step (the
 *   same four k again, against zeros): on MiniLM's weights 11% of the steps;
 * - y_int = sum over steps of u . w_stored - 127 * sum of w_stored: the offset is removed once per column.
 *
 * Each product is at most 254 * 127 in magnitude, so the int32 sums are exact for K up to 2^31 / 32258 (QC_MAX_K).
 *
 * Layout: a weight panel holds 16 output columns as a list of steps, each one group of four k: the byte offset of
 * its activation variant, and 64 bytes of weight (two vectors of 8 columns x 4 codes). The activation is stored by
 * groups of 6 rows, [group][k / 4][row][variant][4 codes], so one step's six 32-bit broadcasts lie at fixed
 * distances from one address. The micro-kernel holds a 6 x 16 tile of int32 sums in 12 registers for the whole of K
 * (vpmaddubsw, vpmaddwd against ones, vpaddd per vector) and writes float32 outputs.
 *
 * Speed: a step is 24 multiply instructions (vpmaddubsw, vpmaddwd) and 12 additions for 384 multiply-adds, where
 * the int16 form this replaced (vpmaddwd + vpaddd per 16 products) needs the same multiplies but 4 operations per
 * 32 products instead of 3. Measured on Zen 3 (one thread, data in L1): the tile loop runs at ~94 multiply-adds
 * per ns, the int16 one at ~78; and the weight takes one byte a code instead of two.
 * With MiniLM's 11% extra steps, its 36 layers in sequence ran 4-13% faster than the int16 kernel (2 threads,
 * round-robin, medians), and the model 6-7% faster per forward. Tried and dropped: the two other pairings of four
 * codes as further variants (12 in all) leave 2% extra steps, but the activation triples to 12 bytes a code and
 * the 36 layers ran 10-25% slower than with 4.
 */
#define _GNU_SOURCE /* posix_memalign; sysconf's cache sizes */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define QC_NR 16                 /* output columns per weight panel */
#define QC_MR 6                  /* activation rows per micro-kernel call (a row group) */
#define QC_VARIANTS 4            /* stored sign variants of each group of four activation codes */
#define QC_ROW_QUAD_BYTES (QC_VARIANTS * 4)            /* one row's variants of one group of four codes */
#define QC_QUAD_BYTES (QC_MR * QC_ROW_QUAD_BYTES)      /* a row group's variants of one group of four codes */
#define QC_STEP_BYTES (QC_NR * 4)                      /* one step of a weight panel */
#define QC_OFFSET 127            /* u = 127 + q_x */
#define QC_MAX_PAIR 129          /* |w0| + |w1| <= 129 keeps 254 * (|w0| + |w1|) inside int16 */
#define QC_MAX_K 65536           /* K * 254 * 127 < 2^31 */
#define QC_N_TILE 2              /* panels per task with few rows (32 output columns) */
#define QC_TASKS_PER_THREAD 4    /* row groups per thread from which rows, not columns, are shared out */
#ifndef QC_A_BLOCK_BYTES
#define QC_A_BLOCK_BYTES 196608  /* activation bytes per row block where the L2 size is unknown */
#endif

static void *aligned_buffer(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

static int64_t quads_of(int64_t k) { return (k + 3) / 4; }
static int64_t panels_of(int64_t n) { return (n + QC_NR - 1) / QC_NR; }
static int64_t align64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

/* 1 when this build has the kernel (the compiler targeted a CPU with AVX2), else 0. */
int qc_int8_available(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* The packed weight: [int64 panels, steps][int64 first step of each panel, NP + 1] | int32 offset sums 127 * sum of
 * the stored codes per column [NP * 16] | int32 activation offset per step | int8 codes [steps][64]; each part
 * 64-byte aligned. */
typedef struct {
    int64_t panels, steps;
    const int64_t *first_step;
    const int32_t *column_offset;
    const int32_t *step_offset;
    const int8_t *codes;
} packed_weight;

static int64_t packed_layout(int64_t NP, int64_t steps, int64_t at[3]) {
    at[0] = align64((int64_t)sizeof(int64_t) * (2 + NP + 1));
    at[1] = at[0] + align64((int64_t)sizeof(int32_t) * NP * QC_NR);
    at[2] = at[1] + align64((int64_t)sizeof(int32_t) * steps);
    return at[2] + steps * QC_STEP_BYTES;
}

static packed_weight packed_view(const void *packed) {
    const int64_t *head = packed;
    int64_t at[3];
    packed_layout(head[0], head[1], at);
    const char *base = packed;
    packed_weight view = {head[0], head[1], head + 2, (const int32_t *)(base + at[0]),
                          (const int32_t *)(base + at[1]), (const int8_t *)(base + at[2])};
    return view;
}

static int overflows(int w0, int w1) { return w0 * w1 > 0 && abs(w0) + abs(w1) > QC_MAX_PAIR; }

/* Panel p's group of four k number `quad` as steps: the main step (codes in `main`, its variant in *variant) and,
 * where some pair could overflow in every variant, an extra one (`extra`, variant 0). Returns the step count, 1 or
 * 2. `main` and `extra` hold 16 columns x 4 codes. */
static int quad_steps(const int8_t *w, int64_t N, int64_t K, int64_t p, int64_t quad, int8_t main[QC_STEP_BYTES],
                      int8_t extra[QC_STEP_BYTES], int *variant) {
    int codes[QC_NR][4];
    for (int c = 0; c < QC_NR; ++c)
        for (int t = 0; t < 4; ++t) {
            const int64_t n = p * QC_NR + c, k = 4 * quad + t;
            codes[c][t] = (n < N && k < K) ? w[n * K + k] : 0;
        }
    /* the two pairs of the group choose their sign independently: the one with fewer pairs that could overflow */
    int negate[2];
    for (int pair = 0; pair < 2; ++pair) {
        int as_is = 0, negated = 0;
        for (int c = 0; c < QC_NR; ++c) {
            as_is += overflows(codes[c][2 * pair], codes[c][2 * pair + 1]);
            negated += overflows(codes[c][2 * pair], -codes[c][2 * pair + 1]);
        }
        negate[pair] = negated < as_is;
    }
    *variant = negate[0] | (negate[1] << 1);
    int steps = 1;
    memset(extra, 0, QC_STEP_BYTES);
    for (int c = 0; c < QC_NR; ++c)
        for (int pair = 0; pair < 2; ++pair) {
            const int first = codes[c][2 * pair], second = negate[pair] ? -codes[c][2 * pair + 1]
                                                                         : codes[c][2 * pair + 1];
            main[c * 4 + 2 * pair] = (int8_t)first;
            if (overflows(first, second)) {
                /* alone in its pair (against a zero) a product cannot overflow */
                main[c * 4 + 2 * pair + 1] = 0;
                extra[c * 4 + 2 * pair + 1] = (int8_t)codes[c][2 * pair + 1];
                steps = 2;
            } else {
                main[c * 4 + 2 * pair + 1] = (int8_t)second;
            }
        }
    return steps;
}

/* The number of steps of panel p. */
static int64_t panel_steps(const int8_t *w, int64_t N, int64_t K, int64_t p) {
    int8_t main[QC_STEP_BYTES], extra[QC_STEP_BYTES];
    int variant;
    int64_t steps = 0;
    for (int64_t q = 0; q < quads_of(K); ++q) steps += quad_steps(w, N, K, p, q, main, extra, &variant);
    return steps;
}

/* Bytes of the packed form of an [N, K] int8 weight (what qc_int8_pack_weight writes); -1 when K > QC_MAX_K. */
int64_t qc_int8_packed_bytes(const int8_t *w, int64_t N, int64_t K, int threads) {
    if (K > QC_MAX_K) return -1;
    const int64_t NP = panels_of(N);
    int64_t steps = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : steps)
    for (int64_t p = 0; p < NP; ++p) steps += panel_steps(w, N, K, p);
    int64_t at[3];
    return packed_layout(NP, steps, at);
}

/* w int8 [N, K] row-major -> the packed form, in `out` of qc_int8_packed_bytes bytes, 64-byte aligned. */
void qc_int8_pack_weight(const int8_t *w, int64_t N, int64_t K, void *out, int threads) {
    const int64_t NP = panels_of(N), KQ = quads_of(K);
    int64_t *head = out;
    head[0] = NP;
    int64_t *first_step = head + 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < NP; ++p) first_step[p + 1] = panel_steps(w, N, K, p);
    first_step[0] = 0;
    for (int64_t p = 0; p < NP; ++p) first_step[p + 1] += first_step[p];
    head[1] = first_step[NP];
    int64_t at[3];
    packed_layout(NP, head[1], at);
    int32_t *column_offset = (int32_t *)((char *)out + at[0]);
    int32_t *step_offset = (int32_t *)((char *)out + at[1]);
    int8_t *codes = (int8_t *)((char *)out + at[2]);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < NP; ++p) {
        int8_t main[QC_STEP_BYTES], extra[QC_STEP_BYTES];
        int64_t s = first_step[p];
        int32_t sums[QC_NR] = {0};
        for (int64_t q = 0; q < KQ; ++q) {
            int variant;
            const int steps = quad_steps(w, N, K, p, q, main, extra, &variant);
            for (int t = 0; t < steps; ++t) {
                const int8_t *step = t == 0 ? main : extra;
                memcpy(codes + s * QC_STEP_BYTES, step, QC_STEP_BYTES);
                step_offset[s] = (int32_t)(q * QC_QUAD_BYTES + (t == 0 ? variant : 0) * 4);
                for (int i = 0; i < QC_STEP_BYTES; ++i) sums[i / 4] += step[i];
                ++s;
            }
        }
        for (int c = 0; c < QC_NR; ++c) column_offset[p * QC_NR + c] = QC_OFFSET * sums[c];
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

/* Codes of x[k .. k + 16) (zeros past K) as u = 127 + q in bytes, q = clamp(round_half_even(x / scale), -127, 127):
 * *plus, and 127 - q: *minus. */
static inline void codes16(const float *x, int64_t k, int64_t K, __m256 scale, __m128i *plus, __m128i *minus) {
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    const __m128i offset = _mm_set1_epi16(QC_OFFSET);
    __m256 a, b;
    if (k + 16 <= K) {
        a = _mm256_loadu_ps(x + k);
        b = _mm256_loadu_ps(x + k + 8);
    } else {
        float tail[16] = {0};
        if (k < K) memcpy(tail, x + k, (size_t)(K - k) * sizeof(float));
        a = _mm256_loadu_ps(tail);
        b = _mm256_loadu_ps(tail + 8);
    }
    a = _mm256_div_ps(a, scale);
    b = _mm256_div_ps(b, scale);
    a = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    b = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi);
    /* packs interleaves 128-bit halves; the permute puts the 16 codes back in order */
    const __m256i q = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)), 0xD8);
    const __m128i q_lo = _mm256_castsi256_si128(q), q_hi = _mm256_extracti128_si256(q, 1);
    *plus = _mm_packus_epi16(_mm_add_epi16(q_lo, offset), _mm_add_epi16(q_hi, offset));
    *minus = _mm_packus_epi16(_mm_sub_epi16(offset, q_lo), _mm_sub_epi16(offset, q_hi));
}

/* A row group of x (`rows` <= 6 rows of K, row scales `scale`) -> its codes in the layout the micro-kernel reads:
 * for each four k, each row's four variants (see the top of this file) of u = 127 + q; rows past `rows` as zeros.
 * Two rows at a time, so each store writes two rows' 32 adjacent bytes. */
static void quantize_group(const float *x, int64_t K, int rows, const float *scale, uint8_t *out) {
    /* bytes taken from 127 - q: the second code in variant 1, the fourth in 2, both in 3 (for each of two rows) */
    const __m256i negated = _mm256_setr_epi8(0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0, -1, 0, -1,
                                             0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0, -1, 0, -1);
    const int64_t KQ = quads_of(K);
    for (int r = 0; r < QC_MR; r += 2) {
        const float *x0 = x + r * K, *x1 = x + (r + 1) * K;
        const __m256 s0 = _mm256_set1_ps(r < rows ? scale[r] : 1.0f);
        const __m256 s1 = _mm256_set1_ps(r + 1 < rows ? scale[r + 1] : 1.0f);
        for (int64_t k = 0; k < 4 * KQ; k += 16) {
            __m128i plus0, minus0, plus1, minus1;
            codes16(x0, k, r < rows ? K : 0, s0, &plus0, &minus0);
            codes16(x1, k, r + 1 < rows ? K : 0, s1, &plus1, &minus1);
            const __m256i plus = _mm256_set_m128i(plus1, plus0), minus = _mm256_set_m128i(minus1, minus0);
            uint8_t *quad = out + (k / 4) * QC_QUAD_BYTES + r * QC_ROW_QUAD_BYTES;
            const int64_t quads = KQ - k / 4 < 4 ? KQ - k / 4 : 4;
#define QC_VARIANTS_OF(j, control)                                                                               \
    if ((j) < quads)                                                                                             \
        _mm256_storeu_si256((__m256i *)(quad + (j) * QC_QUAD_BYTES),                                             \
                            _mm256_blendv_epi8(_mm256_shuffle_epi32(plus, control),                              \
                                               _mm256_shuffle_epi32(minus, control), negated));
            QC_VARIANTS_OF(0, 0x00) QC_VARIANTS_OF(1, 0x55) QC_VARIANTS_OF(2, 0xAA) QC_VARIANTS_OF(3, 0xFF)
#undef QC_VARIANTS_OF
        }
    }
}

static const int16_t qc_ones[16] __attribute__((aligned(32))) = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

#if defined(__x86_64__) && defined(__GNUC__)
#define QC_ASM_TILE 1
/* One row of the full tile for one step: broadcast the row's four codes (at `disp` from the step's variant), then
 * per panel vector (ymm12, ymm13) vpmaddubsw, vpmaddwd against ones, vpaddd into the row's two sums. */
#define QC_TILE_ROW(disp, c0, c1)                             \
    "vpbroadcastd " #disp "(%[step]), %%ymm14\n\t"            \
    "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t"                \
    "vpmaddwd (%[ones]), %%ymm15, %%ymm15\n\t"                \
    "vpaddd %%ymm15, %%" c0 ", %%" c0 "\n\t"                  \
    "vpmaddubsw %%ymm13, %%ymm14, %%ymm14\n\t"                \
    "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n\t"                \
    "vpaddd %%ymm14, %%" c1 ", %%" c1 "\n\t"

/* The int32 sums (offset included) of a full tile: a row group (at `group`) times `n` >= 1 steps of a panel
 * (activation offsets `offsets`, codes `codes`), into sums[6][16]. Written in assembly because compilers spill
 * some of the 12 sums: this loop keeps them in ymm0-11 and the step's two weight vectors in ymm12-13. */
static void full_tile_sums(const uint8_t *group, const int32_t *offsets, const int8_t *codes, int64_t n,
                           int32_t sums[QC_MR][16]) {
    const char *panel = (const char *)codes;
    const int32_t *offset = offsets;
    int64_t step;
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
        "movslq (%[offset]), %[step]\n\t"
        "add %[group], %[step]\n\t"
        "vmovdqa (%[panel]), %%ymm12\n\t"
        "vmovdqa 32(%[panel]), %%ymm13\n\t"
        QC_TILE_ROW(0, "ymm0", "ymm1")
        QC_TILE_ROW(16, "ymm2", "ymm3")
        QC_TILE_ROW(32, "ymm4", "ymm5")
        QC_TILE_ROW(48, "ymm6", "ymm7")
        QC_TILE_ROW(64, "ymm8", "ymm9")
        QC_TILE_ROW(80, "ymm10", "ymm11")
        "add $4, %[offset]\n\t"
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
        : [offset] "+r"(offset), [panel] "+r"(panel), [n] "+r"(n), [step] "=&r"(step)
        : [group] "r"(group), [sums] "r"(&sums[0][0]), [ones] "r"(qc_ones)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}
#undef QC_TILE_ROW
#endif

/* y[rows][16 columns of panel p] = scaled (row group at `group`) . (the panel's steps): the int32 sums stay in
 * registers for the whole of K, then become float32 outputs. `cols` (<= 16) columns are stored. */
static inline void micro_kernel(const uint8_t *group, int rows, const packed_weight *w, int64_t p,
                                const float *row_scale, const float *col_scale, const float *bias, int activation,
                                float *y, int64_t ldy, int cols) {
    const int64_t s0 = w->first_step[p], n = w->first_step[p + 1] - s0;
    const int32_t *offsets = w->step_offset + s0;
    const int8_t *codes = w->codes + s0 * QC_STEP_BYTES;
    __m256i c[QC_MR][2];
#if defined(QC_ASM_TILE)
    if (rows == QC_MR && n > 0) {
        int32_t sums[QC_MR][16] __attribute__((aligned(32)));
        full_tile_sums(group, offsets, codes, n, sums);
        for (int r = 0; r < QC_MR; ++r) {
            c[r][0] = _mm256_load_si256((const __m256i *)sums[r]);
            c[r][1] = _mm256_load_si256((const __m256i *)(sums[r] + 8));
        }
    } else
#endif
    {
        const __m256i ones = _mm256_load_si256((const __m256i *)qc_ones);
        for (int r = 0; r < QC_MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
        for (int64_t s = 0; s < n; ++s) {
            const __m256i b0 = _mm256_load_si256((const __m256i *)(codes + s * QC_STEP_BYTES));
            const __m256i b1 = _mm256_load_si256((const __m256i *)(codes + s * QC_STEP_BYTES + 32));
            const uint8_t *step = group + offsets[s];
#define QC_ROW(r)                                                                                          \
    if ((r) < rows) {                                                                                      \
        int32_t four;                                                                                      \
        memcpy(&four, step + (r) * QC_ROW_QUAD_BYTES, sizeof four);                                        \
        const __m256i av = _mm256_set1_epi32(four);                                                        \
        c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones));        \
        c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones));        \
    }
            QC_ROW(0) QC_ROW(1) QC_ROW(2) QC_ROW(3) QC_ROW(4) QC_ROW(5)
#undef QC_ROW
        }
    }
    const int32_t *column_offset = w->column_offset + p * QC_NR;
    const __m256i offset0 = _mm256_loadu_si256((const __m256i *)column_offset);
    const __m256i offset1 = _mm256_loadu_si256((const __m256i *)(column_offset + 8));
    __m256 out[QC_MR][2];
    if (rows < QC_MR) memset(out, 0, sizeof out); /* the activation runs on whole groups of vectors */
    for (int r = 0; r < rows; ++r) {
        const __m256 sx = _mm256_set1_ps(row_scale[r]);
        for (int h = 0; h < 2; ++h) {
            const __m256i exact = _mm256_sub_epi32(c[r][h], h ? offset1 : offset0);
            /* (acc * s_w) * s_x + bias, each step rounded to float32 as in int8_linear_int_mm */
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(exact), _mm256_loadu_ps(col_scale + 8 * h));
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
static inline void multiply_tile(const uint8_t *a, int64_t group_bytes, int64_t M, int64_t g, const packed_weight *w,
                                 int64_t N, int64_t p, const float *row_scale, const float *col_scale,
                                 const float *bias, int activation, float *y) {
    const int64_t m = g * QC_MR, n = p * QC_NR;
    const int rows = (int)(M - m < QC_MR ? M - m : QC_MR);
    const int cols = (int)(N - n < QC_NR ? N - n : QC_NR);
    micro_kernel(a + g * group_bytes, rows, w, p, row_scale + m, col_scale + n, bias ? bias + n : NULL, activation,
                 y + m * N + n, N, cols);
}
#endif

#if defined(__AVX2__)
/* Activation bytes per row block: 3/4 of the L2 cache, so that a block stays there beside a weight panel. On Zen 3
 * (512 KB) 384 KB blocks ran MiniLM's 36 layers ~4% faster than 192 KB ones (2 threads, best of 30), since the
 * weight is read once per block. */
static int64_t activation_block_bytes(void) {
#if defined(_SC_LEVEL2_CACHE_SIZE)
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 >= 131072 && l2 <= (64L << 20)) return (int64_t)l2 / 4 * 3;
#endif
    return QC_A_BLOCK_BYTES;
}

/* y [M, N] = the activation a (row groups of group_bytes; scales row_scale) times one packed weight, scaled, plus
 * bias, through the activation. Returns 0, or 1 when a buffer could not be allocated. */
static int multiply_codes(const uint8_t *a, int64_t group_bytes, const float *row_scale, int64_t M,
                          const void *packed, int64_t N, const float *weight_scale, const float *bias, int activation,
                          float *y, int threads) {
    const packed_weight w = packed_view(packed);
    const int64_t NP = w.panels;
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
        /* Many rows: blocks of row groups whose codes fit in L2, each multiplied by every weight panel in turn (a
         * panel stays in L1/L2 while the block's row groups pass over it); a thread takes a contiguous run of
         * blocks, so the weight is read from L3 once per block and the activation once. */
        const int64_t block_bytes = activation_block_bytes();
        int64_t blocks = (row_groups * group_bytes + block_bytes - 1) / block_bytes;
        blocks = (blocks + threads - 1) / threads * threads;
        const int64_t block_groups = (row_groups + blocks - 1) / blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t g0 = block * block_groups;
            const int64_t g1 = g0 + block_groups < row_groups ? g0 + block_groups : row_groups;
            for (int64_t p = 0; p < NP; ++p)
                for (int64_t g = g0; g < g1; ++g)
                    multiply_tile(a, group_bytes, M, g, &w, N, p, row_scale, col_scale_pad, bias ? bias_pad : NULL,
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
                    multiply_tile(a, group_bytes, M, g, &w, N, p, row_scale, col_scale_pad, bias ? bias_pad : NULL,
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
 * scale is negative, NaN or inf; 5 for an unknown activation; 6 when K > QC_MAX_K. */
int qc_int8_linear_many(const float *x, int64_t M, int64_t K, const float *static_scale, int count,
                        const void *const *packed, const int64_t *N, const float *const *weight_scale,
                        const float *const *bias, const int *activation, float *const *y, int threads) {
#if !defined(__AVX2__)
    (void)x; (void)M; (void)K; (void)static_scale; (void)count; (void)packed; (void)N; (void)weight_scale;
    (void)bias; (void)activation; (void)y; (void)threads;
    return 3;
#else
    for (int i = 0; i < count; ++i)
        if (activation[i] < QC_IDENTITY || activation[i] > QC_SILU) return 5;
    if (K > QC_MAX_K) return 6;
    float fixed_scale = 0.0f;
    if (static_scale) {
        fixed_scale = *static_scale;
        if (!(fixed_scale >= 0.0f) || isinf(fixed_scale)) return 4;
        if (fixed_scale == 0.0f) fixed_scale = 1.0f;
    }
    const int64_t group_bytes = quads_of(K) * QC_QUAD_BYTES, row_groups = (M + QC_MR - 1) / QC_MR;
    uint8_t *a = aligned_buffer((size_t)(row_groups * group_bytes));
    float *row_scale = malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (!a || !row_scale) {
        free(a);
        free(row_scale);
        return 1;
    }
    int bad = 0;
    /* one thread for a few rows (decode steps): waking the others costs more than the work */
#pragma omp parallel for num_threads(threads) schedule(static) reduction(| : bad) if (M * K >= 16384)
    for (int64_t g = 0; g < row_groups; ++g) {
        const int rows = (int)(M - g * QC_MR < QC_MR ? M - g * QC_MR : QC_MR);
        for (int r = 0; r < rows; ++r) {
            const int64_t m = g * QC_MR + r;
            float amax;
            bad |= row_amax(x + m * K, K, &amax);
            float s = static_scale ? fixed_scale : amax / 127.0f;
            if (s == 0.0f) s = 1.0f;
            row_scale[m] = s;
        }
        quantize_group(x + g * QC_MR * K, K, rows, row_scale + g * QC_MR, a + g * group_bytes);
    }
    int status = bad ? 2 : 0;
    for (int i = 0; i < count && status == 0; ++i)
        status = multiply_codes(a, group_bytes, row_scale, M, packed[i], N[i], weight_scale[i], bias[i],
                                activation[i], y[i], threads);
    free(a);
    free(row_scale);
    return status;
#endif
}

/* y [M, N] = int8 linear of x [M, K] float32 against one packed weight: qc_int8_linear_many with one weight. */
int qc_int8_linear(const float *x, int64_t M, int64_t K, const float *static_scale, const void *packed, int64_t N,
                   const float *weight_scale, const float *bias, int activation, float *y, int threads) {
    return qc_int8_linear_many(x, M, K, static_scale, 1, &packed, &N, &weight_scale, &bias, &activation, &y, threads);
}
