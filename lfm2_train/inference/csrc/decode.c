/* Kernels for CPU decode: matrix-vector products, y[m, n] = scale[n] * sum_k x[m, k] * W[n, k], and
 * single-token attention over a preallocated KV cache (at the end of the file).
 *
 * Why our own kernel: batch-1 decode is bound by the bytes of weights streamed from memory, and the BLAS
 * GEMV that torch reaches on CPU (MKL) streams about half of what the memory system delivers on some
 * machines (9-10 of 17-18 GB/s on an AMD EPYC with 2 cores). Reading 8 weight rows side by side, with one
 * FMA chain per row, keeps enough loads in flight to run at the read bandwidth -- for rows of 4 KB and more.
 * Shorter rows (bf16 or int8 at K = 1024, most of LFM2-350M) make eight streams that each end after a few
 * lines, before the hardware prefetcher has caught up: there each row is read on its own, one sequential
 * stream with four FMA chains (measured on one core, bf16 K = 1024: 23 against 11 GB/s; K = 4608: 15
 * against 16 GB/s). kernels.h: LFM2_SEQUENTIAL_BELOW.
 *
 * W is row-major (N, K): the same layout the prefill GEMM uses, so no second copy of the weights exists.
 * Weights are fp32, bf16 (raw uint16) or int8 (with per-row fp32 `scale`); x and y are fp32 and
 * contiguous; accumulation is fp32. For M > 1 rows of x each 8-row weight block is read from memory once
 * and reused from cache for every row of x. Threads: OpenMP over weight blocks (torch's own OpenMP
 * runtime once torch is loaded, so `torch.set_num_threads` applies here too).
 *
 * Build: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared -fPIC (see lfm2_train/inference/native.py). This is the
 * x86-64 code; other CPUs (and builds with -DLFM2_PORTABLE) get decode_generic.c's plain C versions.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#if LFM2_X86
#include <immintrin.h>

#define BLOCK 8 /* weight rows per block: 8 accumulators + x + a load fit AVX2's 16 registers */

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_F16 = 3 };

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* 8 consecutive weights starting at element `i`, widened to fp32. */
static inline __attribute__((always_inline)) __m256 load8(const void *w, int64_t i, int wt) {
    if (wt == W_F32) return _mm256_loadu_ps((const float *)w + i);
    if (wt == W_BF16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    if (wt == W_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + i)));
    __m128i b = _mm_loadl_epi64((const __m128i *)((const int8_t *)w + i));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

static inline __attribute__((always_inline)) float load1(const void *w, int64_t i, int wt) {
    if (wt == W_F32) return ((const float *)w)[i];
    if (wt == W_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    if (wt == W_F16) return _cvtsh_ss(((const uint16_t *)w)[i]);
    return (float)((const int8_t *)w)[i];
}

static inline __attribute__((always_inline)) int64_t elem_size(int wt) {
    return wt == W_F32 ? 4 : (wt == W_BF16 || wt == W_F16) ? 2 : 1;
}

/* out[r] = dot(x, W[row0 + r * stride]) for the BLOCK rows row0, row0 + stride, ...
 * The loop walks one 64-byte line of each of the 8 rows per iteration (software prefetch on top of this was
 * measured and did not help on the benchmark machine). */
static inline __attribute__((always_inline)) void dot_block(const float *x, const void *w, int64_t row0,
                                                            int64_t stride, int64_t K, int wt, float *out) {
    const int64_t line = 64 / elem_size(wt); /* weights per cache line */
    __m256 acc[BLOCK];
    for (int r = 0; r < BLOCK; r++) acc[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + line <= K; k += line) {
        for (int64_t j = k; j < k + line; j += 8) {
            const __m256 xv = _mm256_loadu_ps(x + j);
#pragma GCC unroll 8
            for (int r = 0; r < BLOCK; r++) acc[r] = _mm256_fmadd_ps(load8(w, (row0 + r * stride) * K + j, wt), xv, acc[r]);
        }
    }
    for (; k + 8 <= K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
#pragma GCC unroll 8
        for (int r = 0; r < BLOCK; r++) acc[r] = _mm256_fmadd_ps(load8(w, (row0 + r * stride) * K + k, wt), xv, acc[r]);
    }
    for (int r = 0; r < BLOCK; r++) {
        float s = hsum(acc[r]);
        for (int64_t j = k; j < K; j++) s += load1(w, (row0 + r * stride) * K + j, wt) * x[j];
        out[r] = s;
    }
}

/* One row against x: a single sequential stream, four independent FMA chains. */
static inline __attribute__((always_inline)) float dot_row(const float *x, const void *w, int64_t row, int64_t K,
                                                           int wt) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t base = row * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(load8(w, base + k, wt), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(w, base + k + 8, wt), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w, base + k + 16, wt), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w, base + k + 24, wt), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w, base + k, wt), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += load1(w, base + k, wt) * x[k];
    return s;
}

/* Weight block b (rows b*BLOCK ...) against every row of x: rows of x after the first reuse it from cache.
 * Short rows are read one after another (see the top of the file), long ones 8 side by side. */
static inline __attribute__((always_inline)) void gemv_block(const float *x, const void *w, const float *scale,
                                                             float *y, int64_t M, int64_t N, int64_t K, int64_t b,
                                                             int wt) {
    if (K * elem_size(wt) < LFM2_SEQUENTIAL_BELOW) {
        for (int64_t n = b * BLOCK; n < (b + 1) * BLOCK; n++)
            for (int64_t m = 0; m < M; m++) {
                const float s = dot_row(x + m * K, w, n, K, wt);
                y[m * N + n] = scale ? s * scale[n] : s;
            }
        return;
    }
    float out[BLOCK];
    for (int64_t m = 0; m < M; m++) {
        dot_block(x + m * K, w, b * BLOCK, 1, K, wt, out);
        for (int r = 0; r < BLOCK; r++) {
            const int64_t n = b * BLOCK + r;
            y[m * N + n] = scale ? out[r] * scale[n] : out[r];
        }
    }
}

/* The last N % BLOCK rows, one at a time. */
static inline __attribute__((always_inline)) void gemv_tail(const float *x, const void *w, const float *scale,
                                                            float *y, int64_t M, int64_t N, int64_t K, int wt) {
    for (int64_t n = N / BLOCK * BLOCK; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const float s = dot_row(x + m * K, w, n, K, wt);
            y[m * N + n] = scale ? s * scale[n] : s;
        }
}

/* Each entry point has its own parallel loop: OpenMP outlines a loop body into one function, so a loop
 * shared by the three weight types would test the type on every load instead of compiling it away. */
void lfm2_gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N / BLOCK; b++) gemv_block(x, w, NULL, y, M, N, K, b, W_F32);
    gemv_tail(x, w, NULL, y, M, N, K, W_F32);
}

void lfm2_gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N / BLOCK; b++) gemv_block(x, w, NULL, y, M, N, K, b, W_BF16);
    gemv_tail(x, w, NULL, y, M, N, K, W_BF16);
}

void lfm2_gemv_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N / BLOCK; b++) gemv_block(x, w, scale, y, M, N, K, b, W_I8);
    gemv_tail(x, w, scale, y, M, N, K, W_I8);
}

/* exp of 8 floats (Cephes' polynomial, about 1 ulp); inputs below -87.3 (and -inf) give exactly 0. */
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365478515625f), hi = _mm256_set1_ps(88.3762626647949f);
    const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(pow2n)), keep);
}

static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* Decode attention: one new query token per row, grouped-query heads over a preallocated cache.
 *
 * q (B, H, D) fp32; k, v: the cache, (B, G, L, D) fp32, bf16 or fp16, of which the first S positions are used;
 * valid (B, S) bytes (0 = padding, never attended) or NULL; out (B, H, D) fp32. Query head h reads KV head
 * h / (H / G), as `repeat_interleave` would. One pass over the cache per (row, KV head), 8 positions at a
 * time from 8 segments of it, with an online softmax in fp32 (running max and sum, the output rescaled
 * when the max grows); each block of K and V is read once for all query heads of the group.
 * Why: torch's batched products read a cold cache at a third of the memory bandwidth, and a single stream
 * per thread (8 consecutive positions at a time) was not much better: 1.5 ms against 0.85 ms per layer
 * for eight streams (2049 fp32 positions, 8 KV heads of 64, 2 threads). */
static inline __attribute__((always_inline)) void attend_group(const float *q, const void *k, const void *v,
                                                               const uint8_t *valid, float *out, int64_t H,
                                                               int64_t G, int64_t L, int64_t S, int64_t D,
                                                               float scale, int64_t bg, int wt) {
    const int64_t per = H / G; /* query heads per KV head */
    const int64_t b = bg / G, g = bg % G;
    const int64_t first = (b * G + g) * L; /* cache row of position 0 for this (row, KV head) */
    const float *qh = q + (b * H + g * per) * D;
    float *oh = out + (b * H + g * per) * D;
    float *top = (float *)malloc((size_t)(2 * per) * sizeof(float)); /* running max, then running sum */
    float *total = top + per;
    for (int64_t h = 0; h < per; h++) {
        top[h] = -INFINITY;
        total[h] = 0.0f;
        for (int64_t j = 0; j < D; j++) oh[h * D + j] = 0.0f;
    }
    /* Block i holds positions r * seg + i (r < 8): eight streams through the cache, as the matrix-vector
     * kernel reads eight rows, because one stream per thread left memory idle. The softmax does not care
     * about order. The last S % 8 positions form one more, partial block. */
    const int64_t seg = S / BLOCK;
    for (int64_t i = 0; i <= seg; i++) {
        int64_t pos[BLOCK], n = BLOCK;
        if (i < seg) {
            for (int r = 0; r < BLOCK; r++) pos[r] = r * seg + i;
        } else {
            n = S - BLOCK * seg;
            for (int64_t r = 0; r < n; r++) pos[r] = BLOCK * seg + r;
        }
        if (n == 0) break;
        for (int64_t h = 0; h < per; h++) {
            float p[BLOCK], block_top = -INFINITY, sum = 0.0f;
            if (n == BLOCK) {
                dot_block(qh + h * D, k, first + i, seg, D, wt, p);
                __m256 sc = _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(scale));
                if (valid) { /* padding -> -inf */
                    int32_t keep[BLOCK];
                    for (int r = 0; r < BLOCK; r++) keep[r] = valid[b * S + pos[r]];
                    const __m256i pad = _mm256_cmpeq_epi32(_mm256_loadu_si256((const __m256i *)keep),
                                                           _mm256_setzero_si256());
                    sc = _mm256_blendv_ps(sc, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(pad));
                }
                block_top = hmax(sc);
                if (block_top == -INFINITY) continue; /* every position of the block is padding */
                block_top = block_top > top[h] ? block_top : top[h];
                const __m256 e = exp8(_mm256_sub_ps(sc, _mm256_set1_ps(block_top)));
                _mm256_storeu_ps(p, e);
                sum = hsum(e);
            } else {
                for (int64_t r = 0; r < n; r++) {
                    p[r] = dot_row(qh + h * D, k, first + pos[r], D, wt) * scale;
                    if (valid && !valid[b * S + pos[r]]) p[r] = -INFINITY;
                    block_top = p[r] > block_top ? p[r] : block_top;
                }
                if (block_top == -INFINITY) continue;
                block_top = block_top > top[h] ? block_top : top[h];
                for (int64_t r = 0; r < n; r++) {
                    p[r] = p[r] == -INFINITY ? 0.0f : expf(p[r] - block_top);
                    sum += p[r];
                }
            }
            const float new_top = block_top; /* max over everything seen so far */
            const float rescale = top[h] == -INFINITY ? 0.0f : expf(top[h] - new_top);
            top[h] = new_top;
            total[h] = total[h] * rescale + sum;
            float *o = oh + h * D;
            int64_t j = 0;
            for (; j + 8 <= D; j += 8) {
                __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(o + j), _mm256_set1_ps(rescale));
                for (int64_t r = 0; r < n; r++)
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(p[r]), load8(v, (first + pos[r]) * D + j, wt), acc);
                _mm256_storeu_ps(o + j, acc);
            }
            for (; j < D; j++) {
                float acc = o[j] * rescale;
                for (int64_t r = 0; r < n; r++) acc += p[r] * load1(v, (first + pos[r]) * D + j, wt);
                o[j] = acc;
            }
        }
    }
    for (int64_t h = 0; h < per; h++) {
        const float inv = 1.0f / total[h]; /* > 0: the newest position is never padding */
        for (int64_t j = 0; j < D; j++) oh[h * D + j] *= inv;
    }
    free(top);
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

#endif /* LFM2_X86 */

/* The OpenMP runtime's thread count as this library sees it (tests check it follows torch's). */
int lfm2_max_threads(void) { return omp_get_max_threads(); }

#if LFM2_X86

/* RMSNorm of fp32 rows: y = w * (x / sqrt(mean(x^2) + eps)), statistics in fp32. One call instead of the
 * seven small torch ops it replaces: decode normalises 45 vectors per token (LFM2-350M), and each small
 * op costs tens of microseconds once streaming the weights has evicted the dispatcher from cache. */
void lfm2_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps) {
#pragma omp parallel for schedule(static) if (rows * d > (1 << 16))
    for (int64_t i = 0; i < rows; i++) {
        const float *xr = x + i * d;
        float *yr = y + i * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= d; j += 8) {
            const __m256 v = _mm256_loadu_ps(xr + j);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum(acc);
        for (; j < d; j++) ss += xr[j] * xr[j];
        const float r = 1.0f / sqrtf(ss / (float)d + eps);
        const __m256 rv = _mm256_set1_ps(r);
        for (j = 0; j + 8 <= d; j += 8)
            _mm256_storeu_ps(yr + j, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_mul_ps(_mm256_loadu_ps(xr + j), rv)));
        for (; j < d; j++) yr[j] = w[j] * (xr[j] * r);
    }
}

#endif /* LFM2_X86 */

#if LFM2_X86
/* SwiGLU of fp32 rows: out[b, j] = silu(ab[b, j]) * ab[b, ff + j], ab = [w1 x | w3 x] (B, 2 ff). Vectorised
 * with exp8 (about 1 ulp): per LFM2-350M decode step (16 layers of 4608) the scalar expf loop took 0.25-0.28 ms
 * on the benchmark machine, this 0.04 ms. */
void lfm2_swiglu_f32(const float *ab, float *out, int64_t B, int64_t ff) {
    const __m256 one = _mm256_set1_ps(1.0f);
    for (int64_t b = 0; b < B; b++) {
        const float *a = ab + b * 2 * ff, *g = a + ff;
        float *o = out + b * ff;
        int64_t j = 0;
        for (; j + 8 <= ff; j += 8) {
            const __m256 x = _mm256_loadu_ps(a + j);
            const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(g + j)));
        }
        for (; j < ff; j++) o[j] = a[j] / (1.0f + expf(-a[j])) * g[j];
    }
}
#endif /* LFM2_X86 */

/* One decode step of LFM2's gated short convolution, fp32, after in_proj:
 * bcx (B, 3d) = [b | c | x] of the new token; state (B, k-1, d) the last k-1 gated inputs, oldest first,
 * updated in place; w (k, d) the depthwise taps, oldest first; out (B, d) = c * sum_i taps_i * window_i
 * with window = [state, b * x]. The products are summed oldest first, as torch's sum over the window does.
 * One call instead of nine small torch ops per conv layer (see lfm2_rms_norm_f32 for why that matters). */
void lfm2_conv_step_f32(const float *bcx, float *state, const float *w, float *out, int64_t B, int64_t d,
                        int64_t k) {
    for (int64_t b = 0; b < B; b++) {
        const float *gate_b = bcx + b * 3 * d, *gate_c = gate_b + d, *xin = gate_b + 2 * d;
        float *hist = state + b * (k - 1) * d;
        float *o = out + b * d;
        for (int64_t j = 0; j < d; j++) {
            const float y = gate_b[j] * xin[j];
            float z = 0.0f;
            for (int64_t i = 0; i + 1 < k; i++) z += hist[i * d + j] * w[i * d + j];
            z += y * w[(k - 1) * d + j];
            for (int64_t i = 0; i + 2 < k; i++) hist[i * d + j] = hist[(i + 1) * d + j];
            if (k > 1) hist[(k - 2) * d + j] = y;
            o[j] = gate_c[j] * z;
        }
    }
}
