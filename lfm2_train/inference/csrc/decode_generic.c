/* Plain C versions of decode.c's x86 kernels (float matrix-vector products, decode attention, RMSNorm), for
 * CPUs other than x86-64 (aarch64: next to int8_gemv.c's NEON kernels) and for -DLFM2_PORTABLE builds, with
 * which the tests check this code on x86 too. Same entry points, arguments and results (up to fp32
 * summation order); written so that the compiler vectorizes the inner loops (8 independent partial sums
 * per row, 8 rows side by side, as decode.c reads them).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if !LFM2_X86
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_F16 = 3 };

static inline __attribute__((always_inline)) float load1(const void *w, int64_t i, int wt) {
    if (wt == W_F32) return ((const float *)w)[i];
    if (wt == W_BF16) {
        const uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (wt == W_F16) return lfm2_half_to_float(((const uint16_t *)w)[i]);
    return (float)((const int8_t *)w)[i];
}

/* out[r] = dot(x, row rows[r]) for LFM2_ROWS rows. */
static inline __attribute__((always_inline)) void dot_rows(const float *x, const void *w, const int64_t *rows,
                                                           int64_t K, int wt, float *out) {
    float acc[LFM2_ROWS][8];
    memset(acc, 0, sizeof acc);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int r = 0; r < LFM2_ROWS; r++)
            for (int j = 0; j < 8; j++) acc[r][j] += load1(w, rows[r] * K + k + j, wt) * x[k + j];
    for (int r = 0; r < LFM2_ROWS; r++) {
        float s = ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3])) + ((acc[r][4] + acc[r][5]) + (acc[r][6] + acc[r][7]));
        for (int64_t j = k; j < K; j++) s += load1(w, rows[r] * K + j, wt) * x[j];
        out[r] = s;
    }
}

static inline __attribute__((always_inline)) void gemv_group(const float *x, const void *w, const float *scale,
                                                             float *y, int64_t M, int64_t N, int64_t K, int64_t g,
                                                             int wt) {
    int64_t rows[LFM2_ROWS];
    for (int r = 0; r < LFM2_ROWS; r++) {
        const int64_t i = g * LFM2_ROWS + r;
        rows[r] = i < N ? i : N - 1; /* past the end: read the last row again, write nothing */
    }
    float out[LFM2_ROWS];
    for (int64_t m = 0; m < M; m++) {
        dot_rows(x + m * K, w, rows, K, wt, out);
        for (int r = 0; r < LFM2_ROWS && g * LFM2_ROWS + r < N; r++)
            y[m * N + rows[r]] = scale ? out[r] * scale[rows[r]] : out[r];
    }
}

void lfm2_gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < (N + LFM2_ROWS - 1) / LFM2_ROWS; g++) gemv_group(x, w, NULL, y, M, N, K, g, W_F32);
}

void lfm2_gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < (N + LFM2_ROWS - 1) / LFM2_ROWS; g++) gemv_group(x, w, NULL, y, M, N, K, g, W_BF16);
}

void lfm2_gemv_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < (N + LFM2_ROWS - 1) / LFM2_ROWS; g++) gemv_group(x, w, scale, y, M, N, K, g, W_I8);
}

/* Decode attention with decode.c's contract (see lfm2_decode_attention_f32 there): per (row, KV head) the
 * scores of every query head of the group, then a softmax in fp32 and the weighted sum of the values. */
static inline __attribute__((always_inline)) void attend_group(const float *q, const void *k, const void *v,
                                                               const uint8_t *valid, float *out, int64_t H,
                                                               int64_t G, int64_t L, int64_t S, int64_t D,
                                                               float scale, int64_t bg, int wt) {
    const int64_t per = H / G;
    const int64_t b = bg / G, g = bg % G;
    const int64_t first = (b * G + g) * L;
    float *p = (float *)malloc((size_t)S * sizeof(float));
    if (p == NULL) abort();
    for (int64_t h = 0; h < per; h++) {
        const float *qh = q + (b * H + g * per + h) * D;
        float *oh = out + (b * H + g * per + h) * D;
        float top = -INFINITY;
        for (int64_t s = 0; s < S; s++) {
            if (valid && !valid[b * S + s]) {
                p[s] = -INFINITY;
                continue;
            }
            float acc = 0.0f;
            for (int64_t j = 0; j < D; j++) acc += qh[j] * load1(k, (first + s) * D + j, wt);
            p[s] = acc * scale;
            top = p[s] > top ? p[s] : top;
        }
        float total = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            p[s] = p[s] == -INFINITY ? 0.0f : expf(p[s] - top);
            total += p[s];
        }
        for (int64_t j = 0; j < D; j++) oh[j] = 0.0f;
        for (int64_t s = 0; s < S; s++) {
            if (p[s] == 0.0f) continue;
            for (int64_t j = 0; j < D; j++) oh[j] += p[s] * load1(v, (first + s) * D + j, wt);
        }
        const float inv = 1.0f / total; /* > 0: the newest position is never padding */
        for (int64_t j = 0; j < D; j++) oh[j] *= inv;
    }
    free(p);
}

void lfm2_decode_attention_f32(const float *q, const float *k, const float *v, const uint8_t *valid, float *out,
                               int64_t B, int64_t H, int64_t G, int64_t L, int64_t S, int64_t D, float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t bg = 0; bg < B * G; bg++) attend_group(q, k, v, valid, out, H, G, L, S, D, scale, bg, W_F32);
}

void lfm2_decode_attention_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid,
                                float *out, int64_t B, int64_t H, int64_t G, int64_t L, int64_t S, int64_t D,
                                float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t bg = 0; bg < B * G; bg++) attend_group(q, k, v, valid, out, H, G, L, S, D, scale, bg, W_BF16);
}

void lfm2_decode_attention_f16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid,
                               float *out, int64_t B, int64_t H, int64_t G, int64_t L, int64_t S, int64_t D,
                               float scale) {
#pragma omp parallel for schedule(static)
    for (int64_t bg = 0; bg < B * G; bg++) attend_group(q, k, v, valid, out, H, G, L, S, D, scale, bg, W_F16);
}

/* SwiGLU of fp32 rows (decode.c's contract): out[b, j] = silu(ab[b, j]) * ab[b, ff + j]. */
void lfm2_swiglu_f32(const float *ab, float *out, int64_t B, int64_t ff) {
    for (int64_t b = 0; b < B; b++) {
        const float *a = ab + b * 2 * ff, *g = a + ff;
        float *o = out + b * ff;
        for (int64_t j = 0; j < ff; j++) o[j] = a[j] / (1.0f + expf(-a[j])) * g[j];
    }
}

void lfm2_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (rows * d > (1 << 16))
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * d;
        float *yr = y + i * d;
        float acc[8] = {0};
        int64_t j = 0;
        for (; j + 8 <= d; j += 8)
            for (int l = 0; l < 8; l++) acc[l] += xr[j + l] * xr[j + l];
        float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; j < d; j++) ss += xr[j] * xr[j];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        for (j = 0; j < d; j++) yr[j] = w[j] * (xr[j] * r);
    }
}
#endif /* !LFM2_X86 */
