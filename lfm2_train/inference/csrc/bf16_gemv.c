/* bf16 matrix-vector product with AVX512_BF16 (vdpbf16ps): y[m, n] = sum_k bf16(x[m, k]) * W[n, k].
 *
 * Why: widening bf16 weights to fp32 (decode.c's AVX2 kernel) costs a load-convert, a shift and an FMA per 8
 * weights and ran at under half of the memory bandwidth; vdpbf16ps multiplies 32 bf16 pairs into 16 fp32
 * sums in one instruction, so reading the weights is all that is left.
 *
 * Rounding: x (fp32) is rounded to bf16 once per call (round to nearest even, |x - bf16(x)| <= 2^-8 |x|;
 * exact when x came from bf16 -- native.Gemv sends only bf16 activations here); the products of two bf16
 * are exact in fp32 and are accumulated in fp32 (the instruction flushes denormal inputs and results to
 * zero). So |y - x.W| <= (2^-8 + K 2^-24) sum_k |x_k W_nk|, and the 2^-8 term is 0 for bf16 activations.
 * W is (N, K) row-major bf16 (raw uint16), as the AVX2 kernel reads it; rows of 4 KB and more are read 8
 * side by side, shorter ones one after another (see decode.c's top).
 */
#include "kernels.h"

#if LFM2_X86 && LFM2_HAVE_AVX512
#include <immintrin.h>

LFM2_TARGET_AVX512_BF16 static void dot_rows(const uint16_t *xb, const uint16_t *const *rows, int64_t K,
                                             float *out) {
    __m512 acc[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) acc[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
#pragma GCC unroll 8
        for (int r = 0; r < LFM2_ROWS; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512(rows[r] + k), xv);
    }
    if (k < K) { /* masked weight loads: nothing past the row is read; xb is zero-padded */
        const __mmask32 m = (__mmask32)((1ULL << (K - k)) - 1);
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + k);
        for (int r = 0; r < LFM2_ROWS; r++)
            acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_maskz_loadu_epi16(m, rows[r] + k), xv);
    }
    for (int r = 0; r < LFM2_ROWS; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}

LFM2_TARGET_AVX512_BF16 static inline __m512 dp_at(__m512 acc, const uint16_t *w, const uint16_t *xb) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(xb));
}

/* One row, a single sequential stream with four accumulators. */
LFM2_TARGET_AVX512_BF16 static float dot_row(const uint16_t *xb, const uint16_t *w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 128 <= K; k += 128) {
        a0 = dp_at(a0, w + k, xb + k);
        a1 = dp_at(a1, w + k + 32, xb + k + 32);
        a2 = dp_at(a2, w + k + 64, xb + k + 64);
        a3 = dp_at(a3, w + k + 96, xb + k + 96);
    }
    for (; k + 32 <= K; k += 32) a0 = dp_at(a0, w + k, xb + k);
    if (k < K) {
        const __mmask32 m = (__mmask32)((1ULL << (K - k)) - 1);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + k), (__m512bh)_mm512_loadu_si512(xb + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

/* x (M, K) fp32 -> bf16, each row zero-padded to a multiple of 32. */
LFM2_TARGET_AVX512_BF16 static void to_bf16(const float *x, int64_t K, int64_t Kp, uint16_t *xb) {
    for (int64_t k = 0; k < Kp; k += 32) {
        const int64_t n = K - k;
        const __mmask16 lo = n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
        const __mmask16 hi = n >= 32 ? (__mmask16)0xFFFF : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
        const __m512 a = _mm512_maskz_loadu_ps(lo, x + k), b = _mm512_maskz_loadu_ps(hi, x + k + 16);
        _mm512_storeu_si512(xb + k, (__m512i)_mm512_cvtne2ps_pbh(b, a)); /* low half from a */
    }
}

int lfm2_gemv_bf16_avx512(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
    if (M == 0 || N == 0) return 0;
    const int64_t Kp = (K + 31) & ~(int64_t)31;
    uint16_t *xb = (uint16_t *)lfm2_workspace((size_t)(M * Kp) * sizeof(uint16_t) + 64);
    if (xb == NULL) return -1;
    for (int64_t m = 0; m < M; m++) to_bf16(x + m * K, K, Kp, xb + m * Kp);
    const int64_t groups = (N + LFM2_ROWS - 1) / LFM2_ROWS;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        if (K * 2 < LFM2_SEQUENTIAL_BELOW) {
            for (int64_t n = g * LFM2_ROWS; n < (g + 1) * LFM2_ROWS && n < N; n++)
                for (int64_t m = 0; m < M; m++) y[m * N + n] = dot_row(xb + m * Kp, w + n * K, K);
            continue;
        }
        const uint16_t *rows[LFM2_ROWS];
        for (int r = 0; r < LFM2_ROWS; r++) {
            const int64_t i = g * LFM2_ROWS + r;
            rows[r] = w + (i < N ? i : N - 1) * K; /* past the end: read the last row again, write nothing */
        }
        float out[LFM2_ROWS];
        for (int64_t m = 0; m < M; m++) {
            dot_rows(xb + m * Kp, rows, K, out);
            for (int r = 0; r < LFM2_ROWS && g * LFM2_ROWS + r < N; r++) y[m * N + g * LFM2_ROWS + r] = out[r];
        }
    }
    return 0;
}
#endif
