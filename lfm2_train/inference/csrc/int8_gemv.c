/* Matrix-vector products on int8 activations: W8A8 (int8 weights, one scale per output row) and q4_0
 * (4-bit weights in blocks of 32, one fp16 scale per block), for batch-1 decode.
 *
 * Why: decode streams every weight once per token, so its speed is bytes per weight over the memory
 * bandwidth, as long as the arithmetic per weight keeps up. Widening int8 weights to fp32 for an FMA (the
 * weight-only int8 kernel in decode.c) costs three instructions per 8 weights and ran at a third of the
 * bandwidth; integer dot products on quantized activations take one instruction per 64 weights
 * (AVX512-VNNI vpdpbusd) or four per 32 (AVX2 vpmaddubsw + vpmaddwd), and then bytes decide again.
 *
 * Activations are quantized once per call (per row of x) into a per-thread workspace, exactly as the torch
 * reference in quant.py does: d = amax / 127 (fp32), q = round-half-even(x / d) clamped to [-127, 127]
 * (an all-zero row gives d = 0 and q = 0). W8A8 uses one d per row of x; q4_0 one per block of 32 (as
 * llama.cpp's q8_0), which costs nothing extra there because q4_0 scales every block anyway.
 *
 * W8A8: y[m, n] = (float)(sum_k q[m, k] w[n, k]) * d[m] * scale[n]. The integer sum is exact in int32 for
 * K < 133,000 (|q w| <= 127 * 127). AVX512-VNNI multiplies unsigned by signed bytes, so it reads
 * q + 128 and subtracts 128 * wsum[n] (the row sums of W, precomputed); the wrap-around of int32 cancels.
 * AVX2 uses the sign trick: vpmaddubsw(|q|, sign(w, q)) -- |q| <= 127 keeps each pair of products below
 * 2 * 127 * 127 = 32258, so its int16 saturation never happens. The result is bit-identical to the torch
 * reference on every path.
 *
 * q4_0: weight w = d_block * (nibble - 8), nibble in [0, 15] (llama.cpp's q4_0 values). Layout, made for
 * this kernel (quant.pack_q4_0): rows in groups of 8 (N padded to a multiple of 8 with zero rows), K in
 * blocks of 32 (padded with zero weights); `packed` (N/8, K/32, 8, 16) bytes, byte j of a row's block
 * holding element j in its low nibble and element 16 + j in its high nibble; `scales` (N/8, K/32, 8) fp16.
 * One 64-byte load is then one block of 4 rows, read against the 32 activations of that block broadcast
 * to each 16-byte lane, and every 8-row group is one sequential stream. The nibbles are the unsigned
 * operand; the -8 is folded into the starting value of each int32 lane, -8 * (the 8 activations that
 * lane sums), computed once per call. Per block the int32 lanes are converted to fp32 and accumulated with
 * weight scale * activation scale (fp32), so q4_0 matches a float64 evaluation to fp32 rounding.
 *
 * Threads: OpenMP over 8-row groups, as decode.c. Entry points return 0, or -1 when the workspace cannot be
 * allocated. `isa` picks the row kernel within the build's architecture (the caller checks
 * lfm2_cpu_features()): x86-64 LFM2_ISA_AVX2 / LFM2_ISA_AVX512; aarch64 LFM2_ISA_NEON (vmull + vpadal,
 * every ARMv8 CPU) / LFM2_ISA_NEON_DOTPROD (vdotq_s32: signed x signed, so no offset and no sign trick);
 * other CPUs (and -DLFM2_PORTABLE) one plain C kernel. Every variant computes the same int32 block sums.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

#if LFM2_X86
#include <immintrin.h>
#elif LFM2_NEON
#include <arm_neon.h>
#endif

/* ------------------------------------------------------------------------------------------ quantizers */
static inline int8_t round_clamp1(float v, float div) {
    v = nearbyintf(v / div); /* the default rounding mode: half to even, as torch.round */
    return (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
}

#if LFM2_X86
static inline float hmax256(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static float absmax(const float *x, int64_t K) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t K8 = K & ~(int64_t)7;
    __m256 m = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    float a = hmax256(m);
    for (int64_t k = K8; k < K; k++) a = fmaxf(a, fabsf(x[k]));
    return a;
}

static inline __m256i round_clamp8(__m256 v, __m256 div) {
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    v = _mm256_round_ps(_mm256_div_ps(v, div), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(v, lo), hi));
}

static void quantize_values(const float *x, int64_t K, float div, int8_t *q) {
    const __m256 dv = _mm256_set1_ps(div);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i a = round_clamp8(_mm256_loadu_ps(x + k), dv), b = round_clamp8(_mm256_loadu_ps(x + k + 8), dv);
        const __m256i c = round_clamp8(_mm256_loadu_ps(x + k + 16), dv);
        const __m256i e = round_clamp8(_mm256_loadu_ps(x + k + 24), dv);
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, e));
        _mm256_storeu_si256((__m256i *)(q + k), _mm256_permutevar8x32_epi32(bytes, order));
    }
    for (; k < K; k++) q[k] = round_clamp1(x[k], div);
}
#elif LFM2_NEON
static float absmax(const float *x, int64_t K) {
    const int64_t K4 = K & ~(int64_t)3;
    float32x4_t m = vdupq_n_f32(0.0f);
    for (int64_t k = 0; k < K4; k += 4) m = vmaxq_f32(m, vabsq_f32(vld1q_f32(x + k)));
    float a = vmaxvq_f32(m);
    for (int64_t k = K4; k < K; k++) a = fmaxf(a, fabsf(x[k]));
    return a;
}

static void quantize_values(const float *x, int64_t K, float div, int8_t *q) {
    const float32x4_t dv = vdupq_n_f32(div), lo = vdupq_n_f32(-127.0f), hi = vdupq_n_f32(127.0f);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) { /* vdivq: IEEE division; vrndnq: round half to even */
        const float32x4_t a = vminq_f32(vmaxq_f32(vrndnq_f32(vdivq_f32(vld1q_f32(x + k), dv)), lo), hi);
        const float32x4_t b = vminq_f32(vmaxq_f32(vrndnq_f32(vdivq_f32(vld1q_f32(x + k + 4), dv)), lo), hi);
        const int16x8_t h = vcombine_s16(vmovn_s32(vcvtq_s32_f32(a)), vmovn_s32(vcvtq_s32_f32(b)));
        vst1_s8(q + k, vmovn_s16(h));
    }
    for (; k < K; k++) q[k] = round_clamp1(x[k], div);
}
#else
static float absmax(const float *x, int64_t K) {
    float a = 0.0f;
    for (int64_t k = 0; k < K; k++) a = fmaxf(a, fabsf(x[k]));
    return a;
}

static void quantize_values(const float *x, int64_t K, float div, int8_t *q) {
    for (int64_t k = 0; k < K; k++) q[k] = round_clamp1(x[k], div);
}
#endif

/* q[0..K) = round(x / d) with d = amax / 127; returns d (0 for an all-zero row, then q = 0). */
static float quantize_row(const float *x, int64_t K, int8_t *q) {
    const float d = absmax(x, K) / 127.0f;
    quantize_values(x, K, d > 0.0f ? d : 1.0f, q);
    return d;
}

/* q4_0's activations: per block of 32 (the last one zero-padded), d[b] and q as quantize_row, and the
 * starting value of each int32 lane of the dot product, bias[4b + l] = -8 * (q[32b + 4l .. + 4] +
 * q[32b + 16 + 4l .. + 4]): the lanes sum those 8 products, and the weights are stored as value + 8.
 * (Kernels that do not split a block into these lanes add the four starts together.) */
static void quantize_blocks(const float *x, int64_t K, int64_t nb, int8_t *q, float *d, int32_t *bias) {
    for (int64_t b = 0; b < nb; b++) {
        float block[32];
        const int64_t n = K - 32 * b < 32 ? K - 32 * b : 32;
        memcpy(block, x + 32 * b, (size_t)n * sizeof(float));
        memset(block + n, 0, (size_t)(32 - n) * sizeof(float));
        d[b] = quantize_row(block, 32, q + 32 * b);
        const int8_t *qb = q + 32 * b;
        for (int l = 0; l < 4; l++) {
            int32_t s = 0;
            for (int i = 0; i < 4; i++) s += qb[4 * l + i] + qb[16 + 4 * l + i];
            bias[4 * b + l] = -8 * s;
        }
    }
}

/* IEEE half -> float, exact (subnormals included); the q4_0 scales are stored as fp16. */
/* ------------------------------------------------------------------------------------ W8A8 row kernels */
/* out[r] = sum_k q[k] * rows[r][k] for 8 rows read side by side (the caller aliases missing rows to a real
 * one); kernels with an `offset` return sum_k (q[k] + offset) * rows[r][k] instead, and the driver
 * subtracts offset * wsum. Rows shorter than LFM2_SEQUENTIAL_BELOW bytes are read one at a time instead
 * (w8a8_row_fn; see decode.c's top for why): on one core, K = 1024, 17 against 9 GB/s. */
typedef void (*w8a8_fn)(const int8_t *q, const int8_t *const *rows, int64_t K, int32_t *out);
typedef int32_t (*w8a8_row_fn)(const int8_t *q, const int8_t *w, int64_t K);

static inline int32_t dot_tail(const int8_t *q, const int8_t *w, int64_t k, int64_t K) {
    int32_t t = 0;
    for (; k < K; k++) t += (int32_t)q[k] * w[k];
    return t;
}

#if LFM2_X86
static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static void w8a8_rows_avx2(const int8_t *q, const int8_t *const *rows, int64_t K, int32_t *out) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m256i s = _mm256_loadu_si256((const __m256i *)(q + k));
        const __m256i a = _mm256_abs_epi8(s);
#pragma GCC unroll 8
        for (int r = 0; r < LFM2_ROWS; r++) {
            const __m256i w = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(rows[r] + k)), s);
            acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), ones));
        }
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = hsum_epi32(acc[r]) + dot_tail(q, rows[r], k, K);
}

static inline __m256i madd_signed(__m256i acc, const int8_t *q, const int8_t *w) {
    const __m256i s = _mm256_loadu_si256((const __m256i *)q), ones = _mm256_set1_epi16(1);
    const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(s), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)w), s));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
}

static int32_t w8a8_row_avx2(const int8_t *q, const int8_t *w, int64_t K) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        a0 = madd_signed(a0, q + k, w + k);
        a1 = madd_signed(a1, q + k + 32, w + k + 32);
        a2 = madd_signed(a2, q + k + 64, w + k + 64);
        a3 = madd_signed(a3, q + k + 96, w + k + 96);
    }
    for (; k + 32 <= K; k += 32) a0 = madd_signed(a0, q + k, w + k);
    return hsum_epi32(_mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3))) + dot_tail(q, w, k, K);
}

#if LFM2_HAVE_AVX512
/* Returns sum_k (q[k] + 128) * w[k]; q is zero-padded to a multiple of 64. */
LFM2_TARGET_AVX512 static void w8a8_rows_avx512(const int8_t *q, const int8_t *const *rows, int64_t K,
                                                int32_t *out) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q + k), flip);
#pragma GCC unroll 8
        for (int r = 0; r < LFM2_ROWS; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], u, _mm512_loadu_si512(rows[r] + k));
    }
    if (k < K) { /* masked weight loads: nothing past the row is read */
        const __mmask64 m = ((__mmask64)1 << (K - k)) - 1; /* K - k < 64 here */
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q + k), flip);
        for (int r = 0; r < LFM2_ROWS; r++)
            acc[r] = _mm512_dpbusd_epi32(acc[r], u, _mm512_maskz_loadu_epi8(m, rows[r] + k));
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = _mm512_reduce_add_epi32(acc[r]);
}

LFM2_TARGET_AVX512 static inline __m512i dpbusd_at(__m512i acc, const int8_t *q, const int8_t *w) {
    const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q), _mm512_set1_epi8((char)0x80));
    return _mm512_dpbusd_epi32(acc, u, _mm512_loadu_si512(w));
}

/* Returns sum_k (q[k] + 128) * w[k], one row; q is zero-padded to a multiple of 64. */
LFM2_TARGET_AVX512 static int32_t w8a8_row_avx512(const int8_t *q, const int8_t *w, int64_t K) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 256 <= K; k += 256) {
        a0 = dpbusd_at(a0, q + k, w + k);
        a1 = dpbusd_at(a1, q + k + 64, w + k + 64);
        a2 = dpbusd_at(a2, q + k + 128, w + k + 128);
        a3 = dpbusd_at(a3, q + k + 192, w + k + 192);
    }
    for (; k + 64 <= K; k += 64) a0 = dpbusd_at(a0, q + k, w + k);
    if (k < K) {
        const __mmask64 m = ((__mmask64)1 << (K - k)) - 1; /* K - k < 64 here */
        const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q + k), _mm512_set1_epi8((char)0x80));
        a1 = _mm512_dpbusd_epi32(a1, u, _mm512_maskz_loadu_epi8(m, w + k));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)));
}
#endif
#elif LFM2_NEON
static void w8a8_rows_neon(const int8_t *q, const int8_t *const *rows, int64_t K, int32_t *out) {
    int32x4_t acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = vdupq_n_s32(0);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const int8x16_t x = vld1q_s8(q + k);
        for (int r = 0; r < LFM2_ROWS; r++) { /* two products per int16 lane: <= 2 * 127 * 127 */
            const int8x16_t w = vld1q_s8(rows[r] + k);
            const int16x8_t p = vmlal_high_s8(vmull_s8(vget_low_s8(x), vget_low_s8(w)), x, w);
            acc[r] = vpadalq_s16(acc[r], p);
        }
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = vaddvq_s32(acc[r]) + dot_tail(q, rows[r], k, K);
}

__attribute__((target("arch=armv8.2-a+dotprod"))) static void w8a8_rows_dotprod(const int8_t *q,
                                                                               const int8_t *const *rows,
                                                                               int64_t K, int32_t *out) {
    int32x4_t acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = vdupq_n_s32(0);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const int8x16_t x = vld1q_s8(q + k);
        for (int r = 0; r < LFM2_ROWS; r++) acc[r] = vdotq_s32(acc[r], x, vld1q_s8(rows[r] + k));
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = vaddvq_s32(acc[r]) + dot_tail(q, rows[r], k, K);
}
#else
static void w8a8_rows_generic(const int8_t *q, const int8_t *const *rows, int64_t K, int32_t *out) {
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = dot_tail(q, rows[r], 0, K);
}
#endif

/* The kernel for `isa`; *row the single-row kernel for short rows (NULL: use the 8-row one throughout). */
static w8a8_fn pick_w8a8(int isa, int *offset, w8a8_row_fn *row) {
    *offset = 0;
    *row = NULL;
#if LFM2_X86
#if LFM2_HAVE_AVX512
    if (isa == LFM2_ISA_AVX512) return *offset = 128, *row = w8a8_row_avx512, w8a8_rows_avx512;
#endif
    (void)isa;
    *row = w8a8_row_avx2;
    return w8a8_rows_avx2;
#elif LFM2_NEON
    return isa == LFM2_ISA_NEON_DOTPROD ? w8a8_rows_dotprod : w8a8_rows_neon;
#else
    (void)isa;
    return w8a8_rows_generic;
#endif
}

/* ------------------------------------------------------------------------------------ q4_0 row kernels */
/* out[r] for the 8 rows of one group: `p` and `s` point at the group's packed blocks and scales. */
typedef void (*q4_fn)(const int8_t *q, const float *d, const int32_t *bias, const uint8_t *p, const uint16_t *s,
                      int64_t nb, float *out);

#if LFM2_X86
static void q4_rows_avx2(const int8_t *q, const float *d, const int32_t *bias, const uint8_t *p,
                         const uint16_t *s, int64_t nb, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4]; /* acc[i]: lanes 0-3 row 2i, lanes 4-7 row 2i + 1 */
    __m256i spread[4];
    for (int i = 0; i < 4; i++) {
        acc[i] = _mm256_setzero_ps();
        spread[i] = _mm256_setr_epi32(2 * i, 2 * i, 2 * i, 2 * i, 2 * i + 1, 2 * i + 1, 2 * i + 1, 2 * i + 1);
    }
    for (int64_t b = 0; b < nb; b++, p += 128, s += 8) {
        const __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 32 * b)));
        const __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q + 32 * b + 16)));
        const __m256i start = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(bias + 4 * b)));
        const __m256 scale = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s)), _mm256_set1_ps(d[b]));
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 32 * i));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            /* each pair of products <= 2 * 15 * 127, two of them 7620: no int16 saturation */
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
            const __m256i lanes = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), start);
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lanes), _mm256_permutevar8x32_ps(scale, spread[i]), acc[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        float t[8];
        _mm256_storeu_ps(t, acc[i]);
        out[2 * i] = (t[0] + t[1]) + (t[2] + t[3]);
        out[2 * i + 1] = (t[4] + t[5]) + (t[6] + t[7]);
    }
}

#if LFM2_HAVE_AVX512
LFM2_TARGET_AVX512 static void q4_rows_avx512(const int8_t *q, const float *d, const int32_t *bias, const uint8_t *p,
                                              const uint16_t *s, int64_t nb, float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i spread0 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i spread1 = _mm512_add_epi32(spread0, _mm512_set1_epi32(4));
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(); /* rows 0-3 and 4-7, 4 lanes each */
    for (int64_t b = 0; b < nb; b++, p += 128, s += 8) {
        const __m512i xlo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(q + 32 * b)));
        const __m512i xhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(q + 32 * b + 16)));
        const __m512i start = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(bias + 4 * b)));
        const __m512i v0 = _mm512_loadu_si512(p), v1 = _mm512_loadu_si512(p + 64);
        __m512i i0 = _mm512_dpbusd_epi32(start, _mm512_and_si512(v0, low), xlo);
        i0 = _mm512_dpbusd_epi32(i0, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low), xhi);
        __m512i i1 = _mm512_dpbusd_epi32(start, _mm512_and_si512(v1, low), xlo);
        i1 = _mm512_dpbusd_epi32(i1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low), xhi);
        const __m256 sc = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)s)), _mm256_set1_ps(d[b]));
        const __m512 scale = _mm512_castps256_ps512(sc);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_permutexvar_ps(spread0, scale), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_permutexvar_ps(spread1, scale), acc1);
    }
    float t[32];
    _mm512_storeu_ps(t, acc0);
    _mm512_storeu_ps(t + 16, acc1);
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = (t[4 * r] + t[4 * r + 1]) + (t[4 * r + 2] + t[4 * r + 3]);
}
#endif
#elif LFM2_NEON
/* The per-row scales of one block, weight scale * activation scale, as 8 floats. */
static inline void block_scales(const uint16_t *s, float d, float *out) {
    vst1q_f32(out, vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s))), d));
    vst1q_f32(out + 4, vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + 4))), d));
}

static void q4_rows_neon(const int8_t *q, const float *d, const int32_t *bias, const uint8_t *p, const uint16_t *s,
                         int64_t nb, float *out) {
    const uint8x16_t low = vdupq_n_u8(0x0F);
    float32x4_t acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++, p += 128, s += 8) {
        const int8x16_t xlo = vld1q_s8(q + 32 * b), xhi = vld1q_s8(q + 32 * b + 16);
        const int32x4_t start = vld1q_s32(bias + 4 * b);
        float sc[LFM2_ROWS];
        block_scales(s, d[b], sc);
        for (int r = 0; r < LFM2_ROWS; r++) {
            const uint8x16_t v = vld1q_u8(p + 16 * r);
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low)), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            /* four products per int16 lane: <= 4 * 15 * 127 */
            int16x8_t t = vmlal_high_s8(vmull_s8(vget_low_s8(lo), vget_low_s8(xlo)), lo, xlo);
            t = vmlal_high_s8(vmlal_s8(t, vget_low_s8(hi), vget_low_s8(xhi)), hi, xhi);
            const int32x4_t lanes = vaddq_s32(vpaddlq_s16(t), start); /* only the lanes' total matters */
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(lanes), sc[r]);
        }
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = vaddvq_f32(acc[r]);
}

__attribute__((target("arch=armv8.2-a+dotprod"))) static void q4_rows_dotprod(const int8_t *q, const float *d,
                                                                             const int32_t *bias, const uint8_t *p,
                                                                             const uint16_t *s, int64_t nb,
                                                                             float *out) {
    const uint8x16_t low = vdupq_n_u8(0x0F);
    float32x4_t acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < nb; b++, p += 128, s += 8) {
        const int8x16_t xlo = vld1q_s8(q + 32 * b), xhi = vld1q_s8(q + 32 * b + 16);
        const int32x4_t start = vld1q_s32(bias + 4 * b);
        float sc[LFM2_ROWS];
        block_scales(s, d[b], sc);
        for (int r = 0; r < LFM2_ROWS; r++) {
            const uint8x16_t v = vld1q_u8(p + 16 * r);
            const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(v, low)), hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
            const int32x4_t lanes = vdotq_s32(vdotq_s32(start, lo, xlo), hi, xhi);
            acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(lanes), sc[r]);
        }
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = vaddvq_f32(acc[r]);
}
#else
static void q4_rows_generic(const int8_t *q, const float *d, const int32_t *bias, const uint8_t *p,
                            const uint16_t *s, int64_t nb, float *out) {
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = 0.0f;
    for (int64_t b = 0; b < nb; b++, p += 128, s += 8) {
        const int8_t *x = q + 32 * b;
        const int32_t start = bias[4 * b] + bias[4 * b + 1] + bias[4 * b + 2] + bias[4 * b + 3];
        for (int r = 0; r < LFM2_ROWS; r++) {
            const uint8_t *v = p + 16 * r;
            int32_t t = start;
            for (int j = 0; j < 16; j++) t += (v[j] & 15) * x[j] + (v[j] >> 4) * x[16 + j];
            out[r] += (float)t * (lfm2_half_to_float(s[r]) * d[b]);
        }
    }
}
#endif

static q4_fn pick_q4(int isa) {
#if LFM2_X86
#if LFM2_HAVE_AVX512
    if (isa == LFM2_ISA_AVX512) return q4_rows_avx512;
#endif
    (void)isa;
    return q4_rows_avx2;
#elif LFM2_NEON
    return isa == LFM2_ISA_NEON_DOTPROD ? q4_rows_dotprod : q4_rows_neon;
#else
    (void)isa;
    return q4_rows_generic;
#endif
}

/* ---------------------------------------------------------------------------------------- entry points */
int lfm2_gemv_w8a8(const float *x, const int8_t *w, const float *scale, const int32_t *wsum, float *y, int64_t M,
                   int64_t N, int64_t K, int isa) {
    if (M == 0 || N == 0) return 0;
    const int64_t Kp = (K + 63) & ~(int64_t)63;
    uint8_t *ws = (uint8_t *)lfm2_workspace((size_t)(M * Kp + M * (int64_t)sizeof(float)));
    if (ws == NULL) return -1;
    int8_t *q = (int8_t *)ws;
    float *d = (float *)(ws + M * Kp);
    for (int64_t m = 0; m < M; m++) {
        d[m] = quantize_row(x + m * K, K, q + m * Kp);
        memset(q + m * Kp + K, 0, (size_t)(Kp - K));
    }
    int offset;
    w8a8_row_fn row_fn;
    const w8a8_fn fn = pick_w8a8(isa, &offset, &row_fn);
    if (K >= LFM2_SEQUENTIAL_BELOW) row_fn = NULL;
    const int64_t groups = (N + LFM2_ROWS - 1) / LFM2_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        if (row_fn != NULL) { /* short rows: one at a time, a single sequential stream */
            for (int64_t n = g * LFM2_ROWS; n < (g + 1) * LFM2_ROWS && n < N; n++)
                for (int64_t m = 0; m < M; m++) {
                    const int32_t acc = row_fn(q + m * Kp, w + n * K, K);
                    const int32_t dot = (int32_t)((uint32_t)acc - (uint32_t)offset * (uint32_t)wsum[n]);
                    y[m * N + n] = (float)dot * d[m] * scale[n];
                }
            continue;
        }
        const int8_t *rows[LFM2_ROWS];
        int64_t n[LFM2_ROWS];
        for (int r = 0; r < LFM2_ROWS; r++) {
            const int64_t i = g * LFM2_ROWS + r;
            n[r] = i < N ? i : N - 1; /* past the end: read the last row again, write nothing */
            rows[r] = w + n[r] * K;
        }
        int32_t acc[LFM2_ROWS];
        for (int64_t m = 0; m < M; m++) {
            fn(q + m * Kp, rows, K, acc);
            for (int r = 0; r < LFM2_ROWS && g * LFM2_ROWS + r < N; r++) {
                /* modular int32 arithmetic: the offset's overflow, if any, cancels */
                const int32_t dot = (int32_t)((uint32_t)acc[r] - (uint32_t)offset * (uint32_t)wsum[n[r]]);
                y[m * N + n[r]] = (float)dot * d[m] * scale[n[r]];
            }
        }
    }
    return 0;
}

int lfm2_gemv_q4_0(const float *x, const uint8_t *packed, const uint16_t *scales, float *y, int64_t M, int64_t N,
                   int64_t K, int isa) {
    if (M == 0 || N == 0) return 0;
    const int64_t nb = (K + 31) / 32;
    /* per row of x: q (nb * 32 bytes), then the lane starts (nb * 4 int32), then d (nb floats) */
    const int64_t row_bytes = nb * 32 + nb * 16 + nb * 4;
    uint8_t *ws = (uint8_t *)lfm2_workspace((size_t)(M * row_bytes));
    if (ws == NULL) return -1;
    for (int64_t m = 0; m < M; m++) {
        uint8_t *base = ws + m * row_bytes;
        quantize_blocks(x + m * K, K, nb, (int8_t *)base, (float *)(base + nb * 48), (int32_t *)(base + nb * 32));
    }
    const q4_fn fn = pick_q4(isa);
    const int64_t groups = (N + LFM2_ROWS - 1) / LFM2_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        float out[LFM2_ROWS];
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *base = ws + m * row_bytes;
            fn((const int8_t *)base, (const float *)(base + nb * 48), (const int32_t *)(base + nb * 32),
               packed + g * nb * 128, scales + g * nb * 8, nb, out);
            for (int r = 0; r < LFM2_ROWS && g * LFM2_ROWS + r < N; r++) y[m * N + g * LFM2_ROWS + r] = out[r];
        }
    }
    return 0;
}

/* The float weights of a q4_0 matrix, (N, K), for prefill's GEMM: fp32 (exact: d * (nibble - 8) has at
 * most 15 significant bits) or, with `bf16` set, bf16 rounded to nearest even (the fp32 value's rounding, as
 * torch's .to(torch.bfloat16); half the bytes written for a bf16 GEMM, and no second pass to convert). */
void lfm2_dequantize_q4_0(const uint8_t *packed, const uint16_t *scales, void *out, int64_t N, int64_t K,
                          int bf16) {
    const int64_t nb = (K + 31) / 32;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t g = n / LFM2_ROWS, r = n % LFM2_ROWS;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *bytes = packed + ((g * nb + b) * LFM2_ROWS + r) * 16;
            const float d = lfm2_half_to_float(scales[(g * nb + b) * LFM2_ROWS + r]);
            float v[32];
            for (int j = 0; j < 16; j++) {
                v[j] = d * (float)((bytes[j] & 15) - 8);
                v[16 + j] = d * (float)((bytes[j] >> 4) - 8);
            }
            const int64_t take = K - 32 * b < 32 ? K - 32 * b : 32;
            if (bf16) {
                uint16_t *o = (uint16_t *)out + n * K + 32 * b;
                for (int64_t j = 0; j < take; j++) o[j] = lfm2_float_to_bf16(v[j]);
            } else {
                memcpy((float *)out + n * K + 32 * b, v, (size_t)take * sizeof(float));
            }
        }
    }
}
