/* INT8 x INT8 linear layers for x86 CPUs with AVX2 but no INT8 dot-product instruction (no VNNI, no AMX).
 *
 *   y[m, n] = act(float(sum_k q_x[m, k] * q_w[n, k]) * s_w[n] * s_x[m] + bias[n])
 *
 * with q_x = clamp(round_half_even(x / s_x), -127, 127) and s_x = amax / 127 per row (or one static scale), formed
 * exactly as qcompile.numerics.quantize_int8 forms them (IEEE division, not a reciprocal), and the output scaled in
 * the same order as qcompile.lowering.cpu.int8.int8_linear_int_mm (this file is compiled with -ffp-contract=off). act is
 * the identity, or GELU (erf form) or SiLU applied while the tile is still in registers, which saves a separate
 * elementwise pass over the layer's output (MiniLM: [1024, 1536] floats per FFN). Several weights can share one
 * quantization of x (qc_int8_linear_many: q/k/v, gate/up).
 *
 * The integer sum is exact. AVX2's byte multiply-add, vpmaddubsw, multiplies unsigned by signed bytes and adds each
 * pair of products in saturating int16. oneDNN's u8 x s8 kernels feed it shifted activations and take the wrong
 * sums where a pair overflows; this kernel feeds it v = q_w + 128 in [0, 255] (unsigned) against the activation
 * codes q_x in [-127, 127] (signed) and keeps every int16 sum in range from the activation's side, where the risk
 * is known when the row is quantized:
 *
 * - an int16 lane sums products q v of a few codes (below); it stays in range wherever the positive codes among them
 *   add up to at most 128 and the negative ones too (255 * 128 = 32640);
 * - by default a lane sums four codes, k and k + 1 of one group of four k and the same two of the next: the tile
 *   loop adds two steps' vpmaddubsw results in int16 before widening them (vpmaddwd against ones), 1/4 fewer vector
 *   operations than one step at a time. Past the limit: 3.3% of the fours of MiniLM's layer inputs (per-token
 *   scales), 0.8% with SmoothQuant's static scales, 1.1% on SmolLM2-135M, since a row is scaled by its largest value
 *   and most of its codes are small;
 * - a row group whose fours would need too many fixups (below) sums pairs, one step at a time (Gaussian rows,
 *   whose largest value is only ~3 standard deviations out: 20% of fours, 2.5% of pairs past the limit);
 * - the quantization moves the largest codes of a sum past the limit out of the row's codes into a short list
 *   (fixups), which the micro-kernel multiplies by the same weight step after the main loop, on their own;
 * - y_int = sum over k of q_x v - 128 * sum of q_x: the offset is removed once per row.
 *
 * Each product is at most 127 * 255 in magnitude, so the int32 sums are exact for K up to 2^31 / 32385 (QC_MAX_K).
 *
 * Layout: a weight panel holds 16 output columns as K / 4 steps of 64 bytes (two vectors of 8 columns x 4 codes),
 * exactly the INT8 bytes. The activation is stored by groups of 4 rows, [group][k / 4][row][4 codes], so one step's
 * four 32-bit broadcasts lie at fixed distances from one address. The micro-kernel holds a 4 x 16 tile of int32 sums
 * in 8 registers for the whole of K and the weights of two steps in 4, and writes float32 outputs.
 *
 * Speed, measured on Zen 3 (one thread, weights in cache, no fixups): the tile loop runs at ~98 multiply-adds per
 * ns with fours, ~82 with pairs, where a 6 x 16 tile one step at a time ran at ~86 (24 multiply instructions and 12
 * additions per 384 multiply-adds; the vector pipes, not the multipliers, bound it) and an int16 form (vpmaddwd +
 * vpaddd per 16 products) at ~78. MiniLM's 36 layers on their real inputs (sum of per-layer minima, 2 threads):
 * 79.7 ms against 84.1 for the 6 x 16 tile with pairs only; on Gaussian inputs 82.9 against 76.4.
 * Tried before this: keeping the pairs in range from the weight's side (each pair of a 16-column panel's codes
 * stored as is or with its second code negated against four sign variants of the activation, pairs still at risk
 * moved to extra steps): 11.5% extra steps on MiniLM's weights whatever the input, and 4 bytes of activation a code.
 * And an exactly rounded x * (1 / scale) in the quantization, dividing only near halves: slower than vdivps here.
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
#define QC_MR 4                  /* activation rows per micro-kernel call (a row group) */
#define QC_QUAD_BYTES (QC_MR * 4)                      /* a row group's codes of one group of four k */
#define QC_STEP_BYTES (QC_NR * 4)                      /* a panel's codes of one group of four k */
#define QC_OFFSET 128            /* v = 128 + q_w, in [0, 255] */
#define QC_MAX_PAIR 128          /* codes of one sign adding up to <= 128 keep an int16 sum of q * v in range */
#define QC_MAX_K 65536           /* K * 255 * 127 < 2^31 */
#define QC_N_TILE 2              /* panels per task with few rows (32 output columns) */
#define QC_TASKS_PER_THREAD 4    /* row groups per thread from which rows, not columns, are shared out */
#ifndef QC_A_BLOCK_BYTES
#define QC_A_BLOCK_BYTES 196608  /* activation bytes per row block where the L2 size is unknown */
#endif

static void *aligned_buffer(size_t bytes) {
    void *p = NULL;
    return posix_memalign(&p, 64, bytes ? bytes : 64) == 0 ? p : NULL;
}

/* groups of four k, rounded up to an even number: the tile loop takes two at a time */
static int64_t quads_of(int64_t k) { return (k + 7) / 8 * 2; }
static int64_t panels_of(int64_t n) { return (n + QC_NR - 1) / QC_NR; }

/* 1 when this build has the kernel (the compiler targeted a CPU with AVX2), else 0. */
int qc_int8_available(void) {
#if defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* The packed weight: [int64 panels, groups of four k] padded to 64 bytes | uint8 v = 128 + q_w, [panels][K / 4]
 * [16 columns][4 k] (zeros of q_w past N and K). */
typedef struct {
    int64_t panels, quads;
    const uint8_t *codes;
} packed_weight;

#define QC_HEADER_BYTES 64

static packed_weight packed_view(const void *packed) {
    const int64_t *head = packed;
    packed_weight view = {head[0], head[1], (const uint8_t *)packed + QC_HEADER_BYTES};
    return view;
}

/* Bytes of the packed form of an [N, K] int8 weight (what qc_int8_pack_weight writes); -1 when K > QC_MAX_K. */
int64_t qc_int8_packed_bytes(int64_t N, int64_t K) {
    if (K > QC_MAX_K) return -1;
    return QC_HEADER_BYTES + panels_of(N) * quads_of(K) * QC_STEP_BYTES;
}

/* w int8 [N, K] row-major -> the packed form, in `out` of qc_int8_packed_bytes bytes, 64-byte aligned. */
void qc_int8_pack_weight(const int8_t *w, int64_t N, int64_t K, void *out, int threads) {
    const int64_t NP = panels_of(N), KQ = quads_of(K);
    int64_t *head = out;
    memset(out, 0, QC_HEADER_BYTES);
    head[0] = NP;
    head[1] = KQ;
    uint8_t *codes = (uint8_t *)out + QC_HEADER_BYTES;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < NP; ++p)
        for (int64_t q = 0; q < KQ; ++q) {
            uint8_t *step = codes + (p * KQ + q) * QC_STEP_BYTES;
            for (int c = 0; c < QC_NR; ++c)
                for (int t = 0; t < 4; ++t) {
                    const int64_t n = p * QC_NR + c, k = 4 * q + t;
                    step[c * 4 + t] = (uint8_t)(QC_OFFSET + ((n < N && k < K) ? w[n * K + k] : 0));
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

/* Codes of x[k .. k + 16) (zeros past K), q = clamp(round_half_even(x / scale), -127, 127), as 16 int16 in order. */
static inline __m256i codes16(const float *x, int64_t k, int64_t K, __m256 scale) {
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
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
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(b)), 0xD8);
}

/* Codes moved out of the main product: up to four of a row's codes of group of four k `quad` (the others zero),
 * multiplied by that step's weights after the main loop, on their own. */
typedef struct {
    int32_t quad;
    int32_t codes;
} fixup;

/* q: 16 codes from group of four k `quad0` on, and `risky`, all ones in the int32 lanes of its pairs (k even,
 * k + 1) whose products could overflow int16 against some weight: the second code of each such pair moves to the
 * row's fixups (at fixups[*count], one per group of four k) and is zeroed in q. */
static __m256i move_codes_of_pairs(__m256i q, __m256i risky, int64_t quad0, fixup *fixups, int32_t *count) {
    const __m256i second = _mm256_and_si256(risky, _mm256_set1_epi32((int32_t)0xFFFF0000));
    const __m256i moved = _mm256_and_si256(q, second);
    int32_t four[4];
    _mm_storeu_si128((__m128i *)four, _mm_packs_epi16(_mm256_castsi256_si128(moved),
                                                      _mm256_extracti128_si256(moved, 1)));
    const int pairs = _mm256_movemask_ps(_mm256_castsi256_ps(risky));
    for (int j = 0; j < 4; ++j)
        if ((pairs >> (2 * j)) & 3) fixups[(*count)++] = (fixup){(int32_t)(quad0 + j), four[j]};
    return _mm256_andnot_si256(second, q);
}

static uint32_t code_byte(int code, int at) { return (uint32_t)(uint8_t)(int8_t)code << (8 * at); }

/* q: 16 codes from group of four k `quad0` on (quad0 even), of whose four sums of four (see quantize_group) those
 * set in `over` (bits 0, 1, 4, 5: the int32 lane of the sum's first pair) could overflow int16 against some weight:
 * the largest codes of each such sum move to the row's fixups (at fixups[*count], one or two per group of four k)
 * until it cannot, and are zeroed in q. */
static __m256i move_codes_of_fours(__m256i q, int over, int64_t quad0, fixup *fixups, int32_t *count) {
    int16_t c[16], moved[16] = {0};
    _mm256_storeu_si256((__m256i *)c, q);
    int touched = 0; /* groups of four k that lost codes */
    for (int sum = 0; sum < 4; ++sum) {
        if (!((over >> ((sum / 2) * 4 + sum % 2)) & 1)) continue;
        touched |= 3 << (2 * (sum / 2));
        const int first = 8 * (sum / 2) + 2 * (sum % 2), at[4] = {first, first + 1, first + 4, first + 5};
        for (int sign = 1; sign >= -1; sign -= 2)
            for (;;) {
                int total = 0, largest = 0;
                for (int i = 0; i < 4; ++i) {
                    const int v = sign * c[at[i]];
                    total += v > 0 ? v : 0;
                    largest = v > sign * c[at[largest]] ? i : largest;
                }
                if (total <= QC_MAX_PAIR) break;
                moved[at[largest]] = c[at[largest]];
                c[at[largest]] = 0;
            }
    }
    for (int j = 0; j < 4; ++j) {
        if (!((touched >> j) & 1)) continue;
        /* a fixup is one step on its own: the second code of a moved pair that could overflow goes to a second one */
        uint32_t main_codes = 0, apart = 0;
        for (int i = 4 * j; i < 4 * j + 4; i += 2) {
            main_codes |= code_byte(moved[i], i - 4 * j);
            if (abs(moved[i] + moved[i + 1]) > QC_MAX_PAIR) apart |= code_byte(moved[i + 1], i + 1 - 4 * j);
            else main_codes |= code_byte(moved[i + 1], i + 1 - 4 * j);
        }
        if (main_codes) fixups[(*count)++] = (fixup){(int32_t)(quad0 + j), (int32_t)main_codes};
        if (apart) fixups[(*count)++] = (fixup){(int32_t)(quad0 + j), (int32_t)apart};
    }
    return _mm256_loadu_si256((const __m256i *)c);
}

static int32_t sum_lanes(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* Per 16 codes q (as int16), the int32 lanes of its pairs (k even, k + 1) whose positive or negative codes add up
 * to more than QC_MAX_PAIR (*pair_over), and those of its sums of four (a pair and the same pair of the next group
 * of four, 2 lanes on) that do (*four_over; both lanes of a sum set). Returns the sum of the 16 codes in pairs. */
static inline __m256i codes_over(__m256i q, __m256i *pair_over, __m256i *four_over) {
    const __m256i ones = _mm256_set1_epi16(1), zero = _mm256_setzero_si256();
    const __m256i max_pair = _mm256_set1_epi32(QC_MAX_PAIR);
    const __m256i plus = _mm256_madd_epi16(_mm256_max_epi16(q, zero), ones);
    const __m256i minus = _mm256_madd_epi16(_mm256_max_epi16(_mm256_sub_epi16(zero, q), zero), ones);
    *pair_over = _mm256_cmpgt_epi32(_mm256_max_epi32(plus, minus), max_pair);
    const __m256i largest = _mm256_max_epi32(_mm256_add_epi32(plus, _mm256_shuffle_epi32(plus, 0x4E)),
                                             _mm256_add_epi32(minus, _mm256_shuffle_epi32(minus, 0x4E)));
    *four_over = _mm256_cmpgt_epi32(largest, max_pair);
    return _mm256_sub_epi32(plus, minus);
}

static inline int lanes_of(__m256i mask) { return _mm256_movemask_ps(_mm256_castsi256_ps(mask)); }

/* Row r's 16 codes of groups of four k quad0 .. quad0 + 3 (those below KQ) in a row group's layout, as int16. */
static __m256i load_codes16(const int8_t *group, int64_t quad0, int64_t KQ, int r) {
    int32_t four[4] = {0, 0, 0, 0};
    for (int j = 0; j < 4 && quad0 + j < KQ; ++j) memcpy(&four[j], group + (quad0 + j) * QC_QUAD_BYTES + 4 * r, 4);
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)four));
}

static void store_codes16(int8_t *group, int64_t quad0, int64_t KQ, int r, __m256i q) {
    int32_t four[4];
    _mm_storeu_si128((__m128i *)four, _mm_packs_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
    for (int j = 0; j < 4 && quad0 + j < KQ; ++j) memcpy(group + (quad0 + j) * QC_QUAD_BYTES + 4 * r, &four[j], 4);
}

/* A row group of x (`rows` <= 4 rows of K, row scales `scale`) -> its codes in the layout the micro-kernel reads,
 * [K / 4][row][4 codes], rows past `rows` as zeros; per row, 128 * the sum of its codes (row_offset) and the codes
 * moved out of sums that could overflow (fixups, 2 KQ a row; their number in fixup_count). Two rows at a time, so
 * each store writes two rows' 8 adjacent bytes. `flagged`: room for (4 KQ + 15) / 16 chunk indices a row.
 *
 * In the tile loop each int16 lane sums products q v, v in [0, 255]: a pair of codes (k even, k + 1) with one step
 * at a time, or with two (that pair and the same one of the next group of four, added before widening: 1/4 fewer
 * vector operations). Such a sum stays inside int16 where its positive codes add up to at most 128, and its
 * negative ones too. Returns 1 where the row group's sums take fours, 0 where they take pairs. *hint, in: 1 to try
 * fours (the codes to move are only noted until the choice is made), 0 to take pairs at once; out: the choice for
 * the next group, fours unless the fours past the limit outnumber the pairs past it by more than a tenth of the
 * group's groups of four k (each costs a fixup, while fours save ~1/7 of the steps). On real activations (a row
 * scaled by its largest value, most codes small) 1-3% of the fours are past the limit; on Gaussian rows 20%, where
 * fours ran the kernel 1.6x slower than pairs. */
#define QC_PAIR_OVER (1 << 30)

static int quantize_group(const float *x, int64_t K, int rows, const float *scale, int8_t *out, int32_t *row_offset,
                          fixup *fixups, int32_t *fixup_count, int32_t *flagged, int *hint) {
    const int64_t KQ = quads_of(K), chunks = (4 * KQ + 15) / 16;
    const int try_fours = *hint;
    int64_t extra_fixups = 0;
    int32_t flagged_count[QC_MR] = {0}, count[QC_MR] = {0};
    for (int r = 0; r < QC_MR; r += 2) {
        __m256i sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t k = 0; k < 4 * KQ; k += 16) {
            __m128i bytes[2];
            for (int i = 0; i < 2; ++i) {
                const int live = r + i < rows;
                __m256i q = codes16(x + (r + i) * K, k, live ? K : 0, _mm256_set1_ps(live ? scale[r + i] : 1.0f));
                __m256i pair_over, four_over;
                sum[i] = _mm256_add_epi32(sum[i], codes_over(q, &pair_over, &four_over));
                /* the codes that some sums cannot keep are moved once the choice is made: the chunk's index, and
                 * QC_PAIR_OVER where some of its pairs are past the limit too */
                const int fours = lanes_of(four_over) & 0x33, pairs = lanes_of(pair_over);
                extra_fixups += __builtin_popcount(fours) - __builtin_popcount(pairs);
                if (!try_fours) {
                    if (pairs) q = move_codes_of_pairs(q, pair_over, k / 4, fixups + (r + i) * 2 * KQ, &count[r + i]);
                } else if (fours) {
                    flagged[(r + i) * chunks + flagged_count[r + i]++] = (int32_t)(k / 16) | (pairs ? QC_PAIR_OVER : 0);
                }
                bytes[i] = _mm_packs_epi16(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            }
            const __m128i quads01 = _mm_unpacklo_epi32(bytes[0], bytes[1]);
            const __m128i quads23 = _mm_unpackhi_epi32(bytes[0], bytes[1]);
            int8_t *quad = out + (k / 4) * QC_QUAD_BYTES + r * 4;
            const int64_t quads = KQ - k / 4 < 4 ? KQ - k / 4 : 4;
            _mm_storel_epi64((__m128i *)quad, quads01);
            if (quads > 1) _mm_storeh_pd((double *)(quad + QC_QUAD_BYTES), _mm_castsi128_pd(quads01));
            if (quads > 2) _mm_storel_epi64((__m128i *)(quad + 2 * QC_QUAD_BYTES), quads23);
            if (quads > 3) _mm_storeh_pd((double *)(quad + 3 * QC_QUAD_BYTES), _mm_castsi128_pd(quads23));
        }
        for (int i = 0; i < 2; ++i) row_offset[r + i] = QC_OFFSET * sum_lanes(sum[i]);
    }
    *hint = extra_fixups * 10 <= (int64_t)rows * KQ;
    const int fours = try_fours && *hint;
    for (int r = 0; r < QC_MR; ++r) {
        for (int32_t f = 0; f < flagged_count[r]; ++f) {
            const int32_t chunk = flagged[r * chunks + f];
            if (!fours && !(chunk & QC_PAIR_OVER)) continue;
            const int64_t quad0 = 4 * (int64_t)(chunk & ~QC_PAIR_OVER);
            const __m256i q = load_codes16(out, quad0, KQ, r);
            __m256i pair_over, four_over;
            codes_over(q, &pair_over, &four_over);
            if (fours)
                store_codes16(out, quad0, KQ, r, move_codes_of_fours(q, lanes_of(four_over) & 0x33, quad0,
                                                                     fixups + r * 2 * KQ, &count[r]));
            else if (!_mm256_testz_si256(pair_over, pair_over))
                store_codes16(out, quad0, KQ, r, move_codes_of_pairs(q, pair_over, quad0, fixups + r * 2 * KQ,
                                                                     &count[r]));
        }
        fixup_count[r] = count[r];
    }
    return fours;
}

static const int16_t qc_ones[16] __attribute__((aligned(32))) = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

#if defined(__x86_64__) && defined(__GNUC__)
#define QC_ASM_TILE 1
/* One row of the full tile for one step: broadcast the row's four codes (at `disp` from the step's), then per panel
 * vector (ymm8, ymm9) vpmaddubsw, vpmaddwd against ones, vpaddd into the row's two sums. */
#define QC_TILE_ROW_PAIRS(disp, c0, c1)                       \
    "vpbroadcastd " #disp "(%[group]), %%ymm12\n\t"           \
    "vpmaddubsw %%ymm12, %%ymm8, %%ymm14\n\t"                 \
    "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n\t"                \
    "vpaddd %%ymm14, %%" c0 ", %%" c0 "\n\t"                  \
    "vpmaddubsw %%ymm12, %%ymm9, %%ymm15\n\t"                 \
    "vpmaddwd (%[ones]), %%ymm15, %%ymm15\n\t"                \
    "vpaddd %%ymm15, %%" c1 ", %%" c1 "\n\t"

#define QC_ZERO_SUMS                                          \
    "vpxor %%ymm0, %%ymm0, %%ymm0\n\t"                        \
    "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"                        \
    "vpxor %%ymm2, %%ymm2, %%ymm2\n\t"                        \
    "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"                        \
    "vpxor %%ymm4, %%ymm4, %%ymm4\n\t"                        \
    "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"                        \
    "vpxor %%ymm6, %%ymm6, %%ymm6\n\t"                        \
    "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"

#define QC_STORE_SUMS                                         \
    "vmovdqu %%ymm0, (%[sums])\n\t"                           \
    "vmovdqu %%ymm1, 32(%[sums])\n\t"                         \
    "vmovdqu %%ymm2, 64(%[sums])\n\t"                         \
    "vmovdqu %%ymm3, 96(%[sums])\n\t"                         \
    "vmovdqu %%ymm4, 128(%[sums])\n\t"                        \
    "vmovdqu %%ymm5, 160(%[sums])\n\t"                        \
    "vmovdqu %%ymm6, 192(%[sums])\n\t"                        \
    "vmovdqu %%ymm7, 224(%[sums])\n\t"

/* The end of a tile loop: the next steps (`group_bytes` of activation, `panel_bytes` of weight on), then the sums
 * stored; and the loop's operands. */
#define QC_NEXT_STEPS_THEN_STORE(group_bytes, panel_bytes)    \
    "add $" #group_bytes ", %[group]\n\t"                     \
    "add $" #panel_bytes ", %[panel]\n\t"                     \
    "dec %[n]\n\t"                                            \
    "jnz 1b\n\t"                                              \
    QC_STORE_SUMS

#define QC_TILE_OPERANDS                                                                                     \
    : [group] "+r"(group), [panel] "+r"(panel), [n] "+r"(n)                                                  \
    : [sums] "r"(&sums[0][0]), [ones] "r"(qc_ones)                                                           \
    : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", \
      "xmm11", "xmm12", "xmm13", "xmm14", "xmm15"

/* The int32 sums (offset included) of a full tile: a row group (at `group`) times `n` >= 1 steps of a panel (at
 * `codes`), into sums[4][16], one step at a time. Written in assembly because compilers spill some of the
 * registers: these loops keep the 8 sums in ymm0-7. */
static void full_tile_sums_pairs(const int8_t *group, const uint8_t *codes, int64_t n, int32_t sums[QC_MR][16]) {
    const char *panel = (const char *)codes;
    __asm__ volatile(
        QC_ZERO_SUMS
        "1:\n\t"
        "vmovdqa (%[panel]), %%ymm8\n\t"
        "vmovdqa 32(%[panel]), %%ymm9\n\t"
        QC_TILE_ROW_PAIRS(0, "ymm0", "ymm1")
        QC_TILE_ROW_PAIRS(4, "ymm2", "ymm3")
        QC_TILE_ROW_PAIRS(8, "ymm4", "ymm5")
        QC_TILE_ROW_PAIRS(12, "ymm6", "ymm7")
        QC_NEXT_STEPS_THEN_STORE(16, 64)
        QC_TILE_OPERANDS);
}

/* One row of the full tile for two steps: broadcast the row's four codes of each (at `disp` and `disp` + 16), then
 * per panel vector vpmaddubsw against both steps' weights (ymm8-9, ymm10-11), vpaddw, vpmaddwd against ones, vpaddd
 * into the row's two sums. */
#define QC_TILE_ROW(disp, next, c0, c1)                       \
    "vpbroadcastd " #disp "(%[group]), %%ymm12\n\t"           \
    "vpbroadcastd " #next "(%[group]), %%ymm13\n\t"           \
    "vpmaddubsw %%ymm12, %%ymm8, %%ymm14\n\t"                 \
    "vpmaddubsw %%ymm13, %%ymm10, %%ymm15\n\t"                \
    "vpaddw %%ymm15, %%ymm14, %%ymm14\n\t"                    \
    "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n\t"                \
    "vpaddd %%ymm14, %%" c0 ", %%" c0 "\n\t"                  \
    "vpmaddubsw %%ymm12, %%ymm9, %%ymm14\n\t"                 \
    "vpmaddubsw %%ymm13, %%ymm11, %%ymm15\n\t"                \
    "vpaddw %%ymm15, %%ymm14, %%ymm14\n\t"                    \
    "vpmaddwd (%[ones]), %%ymm14, %%ymm14\n\t"                \
    "vpaddd %%ymm14, %%" c1 ", %%" c1 "\n\t"

/* full_tile_sums_pairs two steps at a time (`n` >= 1 pairs of steps), their int16 results added before widening. */
static void full_tile_sums_fours(const int8_t *group, const uint8_t *codes, int64_t n, int32_t sums[QC_MR][16]) {
    const char *panel = (const char *)codes;
    __asm__ volatile(
        QC_ZERO_SUMS
        "1:\n\t"
        "vmovdqa (%[panel]), %%ymm8\n\t"
        "vmovdqa 32(%[panel]), %%ymm9\n\t"
        "vmovdqa 64(%[panel]), %%ymm10\n\t"
        "vmovdqa 96(%[panel]), %%ymm11\n\t"
        QC_TILE_ROW(0, 16, "ymm0", "ymm1")
        QC_TILE_ROW(4, 20, "ymm2", "ymm3")
        QC_TILE_ROW(8, 24, "ymm4", "ymm5")
        QC_TILE_ROW(12, 28, "ymm6", "ymm7")
        QC_NEXT_STEPS_THEN_STORE(32, 128)
        QC_TILE_OPERANDS);
}
#undef QC_TILE_ROW
#undef QC_TILE_ROW_PAIRS
#undef QC_ZERO_SUMS
#undef QC_STORE_SUMS
#undef QC_NEXT_STEPS_THEN_STORE
#undef QC_TILE_OPERANDS
#endif

/* A row group's codes and what goes with them: whether its int16 sums take fours of codes (two steps) or pairs,
 * and per row its scale, 128 * the sum of its codes, and the codes moved out of the main product (fixups, `stride`
 * a row, fixup_count of them). */
typedef struct {
    int fours;
    const int8_t *codes;
    const float *scale;
    const int32_t *offset;
    const fixup *fixups;
    const int32_t *fixup_count;
    int64_t stride;
} row_group;

/* y[rows][16 columns of panel p] = scaled (row group a) . (the panel's steps): the int32 sums stay in registers
 * for the whole of K, then become float32 outputs. `cols` (<= 16) columns are stored. */
static inline void micro_kernel(const row_group *a, int rows, const packed_weight *w, int64_t p,
                                const float *col_scale, const float *bias, int activation, float *y, int64_t ldy,
                                int cols) {
    const int64_t n = w->quads;
    const uint8_t *codes = w->codes + p * n * QC_STEP_BYTES;
    const __m256i ones = _mm256_load_si256((const __m256i *)qc_ones);
    __m256i c[QC_MR][2];
#if defined(QC_ASM_TILE)
    if (rows == QC_MR && n > 0) {
        int32_t sums[QC_MR][16] __attribute__((aligned(32)));
        if (a->fours) full_tile_sums_fours(a->codes, codes, n / 2, sums);
        else full_tile_sums_pairs(a->codes, codes, n, sums);
        for (int r = 0; r < QC_MR; ++r) {
            c[r][0] = _mm256_load_si256((const __m256i *)sums[r]);
            c[r][1] = _mm256_load_si256((const __m256i *)(sums[r] + 8));
        }
    } else
#endif
    {
        for (int r = 0; r < QC_MR; ++r) c[r][0] = c[r][1] = _mm256_setzero_si256();
        /* two steps at a time, their int16 results added before widening where fours were kept in range */
        for (int64_t s = 0; s < n; s += 2) {
            const uint8_t *weights = codes + s * QC_STEP_BYTES;
            const __m256i b0 = _mm256_load_si256((const __m256i *)weights);
            const __m256i b1 = _mm256_load_si256((const __m256i *)(weights + 32));
            const __m256i b2 = _mm256_load_si256((const __m256i *)(weights + 64));
            const __m256i b3 = _mm256_load_si256((const __m256i *)(weights + 96));
            const int8_t *step = a->codes + s * QC_QUAD_BYTES;
            for (int r = 0; r < rows; ++r) {
                int32_t four, next;
                memcpy(&four, step + 4 * r, sizeof four);
                memcpy(&next, step + QC_QUAD_BYTES + 4 * r, sizeof next);
                const __m256i av = _mm256_set1_epi32(four), an = _mm256_set1_epi32(next);
                const __m256i p0 = _mm256_maddubs_epi16(b0, av), p1 = _mm256_maddubs_epi16(b1, av);
                const __m256i p2 = _mm256_maddubs_epi16(b2, an), p3 = _mm256_maddubs_epi16(b3, an);
                if (a->fours) {
                    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(_mm256_add_epi16(p0, p2), ones));
                    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(_mm256_add_epi16(p1, p3), ones));
                } else {
                    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_add_epi32(_mm256_madd_epi16(p0, ones),
                                                                         _mm256_madd_epi16(p2, ones)));
                    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_add_epi32(_mm256_madd_epi16(p1, ones),
                                                                         _mm256_madd_epi16(p3, ones)));
                }
            }
        }
    }
    /* the codes moved out of sums that could overflow, each against its step's weights on its own (summed apart
     * from c, which the compiler keeps in memory here: a chain of additions through memory ran ~4x slower) */
    for (int r = 0; r < rows; ++r) {
        const fixup *f = a->fixups + r * a->stride;
        __m256i f0 = _mm256_setzero_si256(), f1 = _mm256_setzero_si256();
        for (int32_t e = 0; e < a->fixup_count[r]; ++e) {
            const uint8_t *step = codes + (int64_t)f[e].quad * QC_STEP_BYTES;
            const __m256i av = _mm256_set1_epi32(f[e].codes);
            const __m256i b0 = _mm256_load_si256((const __m256i *)step);
            const __m256i b1 = _mm256_load_si256((const __m256i *)(step + 32));
            f0 = _mm256_add_epi32(f0, _mm256_madd_epi16(_mm256_maddubs_epi16(b0, av), ones));
            f1 = _mm256_add_epi32(f1, _mm256_madd_epi16(_mm256_maddubs_epi16(b1, av), ones));
        }
        c[r][0] = _mm256_add_epi32(c[r][0], f0);
        c[r][1] = _mm256_add_epi32(c[r][1], f1);
    }
    __m256 out[QC_MR][2];
    if (rows < QC_MR) memset(out, 0, sizeof out); /* the activation runs on whole groups of vectors */
    for (int r = 0; r < rows; ++r) {
        const __m256 sx = _mm256_set1_ps(a->scale[r]);
        const __m256i offset = _mm256_set1_epi32(a->offset[r]);
        for (int h = 0; h < 2; ++h) {
            const __m256i exact = _mm256_sub_epi32(c[r][h], offset);
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

/* The quantized activation: row groups of group_bytes codes, whether each group's sums take fours, and per row (M
 * rounded up to whole groups) the scale, 128 * the sum of codes, and the fixups (2 quads a row) with their count. */
typedef struct {
    uint8_t *fours;
    int8_t *codes;
    int64_t group_bytes, quads;
    int32_t *flagged; /* quantize_group's */
    float *scale;
    int32_t *offset;
    fixup *fixups;
    int32_t *fixup_count;
} quantized_rows;

/* Row group g (4 rows) times weight panel p (16 columns), into y. */
static inline void multiply_tile(const quantized_rows *x, int64_t M, int64_t g, const packed_weight *w, int64_t N,
                                 int64_t p, const float *col_scale, const float *bias, int activation, float *y) {
    const int64_t m = g * QC_MR, n = p * QC_NR;
    const int rows = (int)(M - m < QC_MR ? M - m : QC_MR);
    const int cols = (int)(N - n < QC_NR ? N - n : QC_NR);
    const row_group a = {x->fours[g], x->codes + g * x->group_bytes, x->scale + m, x->offset + m,
                         x->fixups + m * 2 * x->quads, x->fixup_count + m, 2 * x->quads};
    micro_kernel(&a, rows, w, p, col_scale + n, bias ? bias + n : NULL, activation, y + m * N + n, N, cols);
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

/* y [M, N] = the quantized activation x times one packed weight, scaled, plus bias, through the activation.
 * Returns 0, or 1 when a buffer could not be allocated. */
static int multiply_codes(const quantized_rows *x, int64_t M, const void *packed, int64_t N,
                          const float *weight_scale, const float *bias, int activation, float *y, int threads) {
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
        int64_t blocks = (row_groups * x->group_bytes + block_bytes - 1) / block_bytes;
        blocks = (blocks + threads - 1) / threads * threads;
        const int64_t block_groups = (row_groups + blocks - 1) / blocks;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t block = 0; block < blocks; ++block) {
            const int64_t g0 = block * block_groups;
            const int64_t g1 = g0 + block_groups < row_groups ? g0 + block_groups : row_groups;
            for (int64_t p = 0; p < NP; ++p)
                for (int64_t g = g0; g < g1; ++g)
                    multiply_tile(x, M, g, &w, N, p, col_scale_pad, bias ? bias_pad : NULL, activation, y);
        }
    } else {
        /* Few rows (decode steps): the weight panels are shared out, every thread reads its own part of them. */
        const int64_t n_tasks = (NP + QC_N_TILE - 1) / QC_N_TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t task = 0; task < n_tasks; ++task) {
            const int64_t p1 = (task + 1) * QC_N_TILE < NP ? (task + 1) * QC_N_TILE : NP;
            for (int64_t p = task * QC_N_TILE; p < p1; ++p)
                for (int64_t g = 0; g < row_groups; ++g)
                    multiply_tile(x, M, g, &w, N, p, col_scale_pad, bias ? bias_pad : NULL, activation, y);
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
    const int64_t KQ = quads_of(K), row_groups = (M + QC_MR - 1) / QC_MR, rows = row_groups * QC_MR;
    const int64_t chunks = (4 * KQ + 15) / 16;
    quantized_rows q = {malloc((size_t)(row_groups > 0 ? row_groups : 1)),
                        aligned_buffer((size_t)(row_groups * KQ * QC_QUAD_BYTES)), KQ * QC_QUAD_BYTES, KQ,
                        malloc((size_t)(rows > 0 ? rows * chunks : 1) * sizeof(int32_t)),
                        malloc((size_t)(rows > 0 ? rows : 1) * sizeof(float)),
                        malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int32_t)),
                        /* room for two fixups in every group of four k; pages that none reaches are never touched */
                        malloc((size_t)(rows > 0 ? rows * 2 * KQ : 1) * sizeof(fixup)),
                        malloc((size_t)(rows > 0 ? rows : 1) * sizeof(int32_t))};
    int status = 0;
    if (!q.fours || !q.codes || !q.flagged || !q.scale || !q.offset || !q.fixups || !q.fixup_count) {
        status = 1;
    } else {
        int bad = 0;
        /* one thread for a few rows (decode steps): waking the others costs more than the work */
#pragma omp parallel num_threads(threads) reduction(| : bad) if (M * K >= 16384)
        {
            int hint = 1; /* each row group tries the sums its predecessor chose */
#pragma omp for schedule(static)
            for (int64_t g = 0; g < row_groups; ++g) {
                const int n_rows = (int)(M - g * QC_MR < QC_MR ? M - g * QC_MR : QC_MR);
                float *scale = q.scale + g * QC_MR;
                for (int r = 0; r < n_rows; ++r) {
                    float amax;
                    bad |= row_amax(x + (g * QC_MR + r) * K, K, &amax);
                    float s = static_scale ? fixed_scale : amax / 127.0f;
                    scale[r] = s == 0.0f ? 1.0f : s;
                }
                q.fours[g] = (uint8_t)quantize_group(x + g * QC_MR * K, K, n_rows, scale,
                                                     q.codes + g * q.group_bytes, q.offset + g * QC_MR,
                                                     q.fixups + g * QC_MR * 2 * KQ, q.fixup_count + g * QC_MR,
                                                     q.flagged + g * QC_MR * chunks, &hint);
            }
        }
        status = bad ? 2 : 0;
        for (int i = 0; i < count && status == 0; ++i)
            status = multiply_codes(&q, M, packed[i], N[i], weight_scale[i], bias[i], activation[i], y[i], threads);
    }
    free(q.fours);
    free(q.codes);
    free(q.flagged);
    free(q.scale);
    free(q.offset);
    free(q.fixups);
    free(q.fixup_count);
    return status;
#endif
}

/* y [M, N] = int8 linear of x [M, K] float32 against one packed weight: qc_int8_linear_many with one weight. */
int qc_int8_linear(const float *x, int64_t M, int64_t K, const float *static_scale, const void *packed, int64_t N,
                   const float *weight_scale, const float *bias, int activation, float *y, int threads) {
    return qc_int8_linear_many(x, M, K, static_scale, 1, &packed, &N, &weight_scale, &bias, &activation, &y, threads);
}
