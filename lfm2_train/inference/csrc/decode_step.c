/* One whole decode step of an LFM2 decoder stack in one call: every layer's norm, projections, short
 * convolution or attention (with its KV cache write), FFN and residuals, then the final norm.
 *
 * Why: a decode step is the weight stream plus everything around it. Driven from Python, the ~40 small ops per
 * layer around the matrix-vector kernels (norms, rotary, cache writes, casts, residual adds) cost 5-7 ms per
 * token for LFM2-350M -- a quarter of a bf16 step and a third of a q4_0 one (docs/BENCHMARKS.md). Here they
 * are a few microseconds each on activations that stay in cache, and the step makes no Python call.
 *
 * The step only sequences the library's own kernels (the matrix-vector products of decode.c, bf16_gemv.c and
 * int8_gemv.c, RMSNorm, the conv step, decode attention), so it is plain C and builds everywhere they do.
 * Numbers: activations and the residual stream are fp32 throughout; a bf16 projection rounds its input to
 * bf16 (vdpbf16ps) or widens the weights (AVX2), int8 / q4_0 projections quantize their input as their
 * kernels always do; the KV cache holds fp32, bf16 or fp16 (rounded to nearest even when written).
 *
 * Layouts (all contiguous, row-major): h (B, d); the KV caches of attention layer i (B, G, L, D); conv state
 * (B, k-1, d) oldest first; RoPE tables (positions, D), covering every row's position; key_valid (B, L)
 * bytes (0 = padding) or NULL.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

/* How a projection's weights are stored: which kernel multiplies them. */
enum {
    LFM2_LIN_F32 = 0,     /* fp32 (N, K) */
    LFM2_LIN_BF16 = 1,    /* bf16 (N, K), widened to fp32 per weight (any x86 / plain C) */
    LFM2_LIN_BF16_DP = 2, /* bf16 (N, K), input rounded to bf16, vdpbf16ps (AVX512_BF16) */
    LFM2_LIN_I8 = 3,      /* int8 (N, K) with per-row fp32 scales, fp32 input (weight-only) */
    LFM2_LIN_W8A8 = 4,    /* int8 (N, K) in [-127, 127], per-row scales and row sums, int8 input per row */
    LFM2_LIN_Q4_0 = 5     /* q4_0 packed (int8_gemv.c's layout) with fp16 block scales, int8 input per block */
};

enum { LFM2_KV_F32 = 0, LFM2_KV_BF16 = 1, LFM2_KV_F16 = 2 };

typedef struct {
    int64_t kind; /* LFM2_LIN_* */
    int64_t isa;  /* LFM2_ISA_* for the integer kernels */
    int64_t N, K;
    const void *w;
    const float *scale;       /* I8, W8A8: (N,) */
    const int32_t *wsum;      /* W8A8: (N,) row sums */
    const uint16_t *q4scales; /* Q4_0: fp16 block scales */
} lfm2_linear;

typedef struct {
    int64_t attention; /* 1: GQA attention layer, 0: gated short convolution */
    int64_t n_heads, n_kv, head_dim;
    double scale; /* attention: softmax scale */
    const float *operator_norm, *ffn_norm; /* (d,) */
    const float *q_norm, *k_norm;          /* attention: (D,) */
    const float *conv_taps;                /* conv: (k, d), oldest tap first */
    lfm2_linear mix_in;                    /* attention: fused q|k|v ((H + 2G) D, d); conv: in_proj (3d, d) */
    lfm2_linear mix_out;                   /* out_proj (d, H D) or (d, d) */
    lfm2_linear w13;                       /* fused w1|w3 (2 ff, d) */
    lfm2_linear w2;                        /* (d, ff) */
} lfm2_layer;

typedef struct {
    int64_t n_layers, d, conv_k, kv_dtype;
    double eps;
    const lfm2_layer *layers;
    const float *final_norm;          /* (d,) */
    const float *rope_cos, *rope_sin; /* (positions, D): the caller checks they cover every row */
} lfm2_model;

/* The kernels this step sequences (decode.c / decode_generic.c, bf16_gemv.c, int8_gemv.c). */
void lfm2_gemv_f32(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K);
void lfm2_gemv_bf16(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K);
void lfm2_gemv_i8(const float *x, const int8_t *w, const float *scale, float *y, int64_t M, int64_t N, int64_t K);
int lfm2_gemv_w8a8(const float *x, const int8_t *w, const float *scale, const int32_t *wsum, float *y, int64_t M,
                   int64_t N, int64_t K, int isa);
int lfm2_gemv_q4_0(const float *x, const uint8_t *packed, const uint16_t *scales, float *y, int64_t M, int64_t N,
                   int64_t K, int isa);
#if LFM2_X86 && LFM2_HAVE_AVX512
int lfm2_gemv_bf16_avx512(const float *x, const uint16_t *w, float *y, int64_t M, int64_t N, int64_t K);
#endif
void lfm2_rms_norm_f32(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps);
void lfm2_conv_step_f32(const float *bcx, float *state, const float *w, float *out, int64_t B, int64_t d,
                        int64_t k);
void lfm2_swiglu_f32(const float *ab, float *out, int64_t B, int64_t ff);
void lfm2_decode_attention_f32(const float *q, const float *k, const float *v, const uint8_t *valid, float *out,
                               int64_t B, int64_t H, int64_t G, int64_t L, int64_t S, int64_t D, float scale);
void lfm2_decode_attention_bf16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid,
                                float *out, int64_t B, int64_t H, int64_t G, int64_t L, int64_t S, int64_t D,
                                float scale);
void lfm2_decode_attention_f16(const float *q, const uint16_t *k, const uint16_t *v, const uint8_t *valid,
                               float *out, int64_t B, int64_t H, int64_t G, int64_t L, int64_t S, int64_t D,
                               float scale);

/* Error codes (0 = done): the Python side turns them into exceptions. */
enum { LFM2_STEP_OK = 0, LFM2_STEP_NOMEM = -1, LFM2_STEP_BAD_KIND = -2 };

static int linear(const lfm2_linear *l, const float *x, float *y, int64_t M) {
    switch (l->kind) {
    case LFM2_LIN_F32:
        lfm2_gemv_f32(x, (const float *)l->w, y, M, l->N, l->K);
        return 0;
    case LFM2_LIN_BF16:
        lfm2_gemv_bf16(x, (const uint16_t *)l->w, y, M, l->N, l->K);
        return 0;
#if LFM2_X86 && LFM2_HAVE_AVX512
    case LFM2_LIN_BF16_DP:
        return lfm2_gemv_bf16_avx512(x, (const uint16_t *)l->w, y, M, l->N, l->K);
#endif
    case LFM2_LIN_I8:
        lfm2_gemv_i8(x, (const int8_t *)l->w, l->scale, y, M, l->N, l->K);
        return 0;
    case LFM2_LIN_W8A8:
        return lfm2_gemv_w8a8(x, (const int8_t *)l->w, l->scale, l->wsum, y, M, l->N, l->K, (int)l->isa);
    case LFM2_LIN_Q4_0:
        return lfm2_gemv_q4_0(x, (const uint8_t *)l->w, l->q4scales, y, M, l->N, l->K, (int)l->isa);
    default:
        return LFM2_STEP_BAD_KIND;
    }
}

/* float -> fp16 bits, round to nearest even (what torch's .to(torch.float16) does); NaN stays NaN. */
static uint16_t to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00u;             /* NaN */
    if (a >= 0x477FF000u) return sign | 0x7C00u;            /* rounds past 65504: inf */
    if (a < 0x38800000u) {                                  /* below 2^-14: fp16 subnormal (or 0) */
        float m;
        memcpy(&m, &a, sizeof m);
        return sign | (uint16_t)lrintf(m * 16777216.0f);    /* units of 2^-24, nearest even */
    }
    const uint32_t r = a + 0xFFFu + ((a >> 13) & 1u);       /* round the 13 dropped bits to nearest even */
    return sign | (uint16_t)((r - 0x38000000u) >> 13);      /* rebias 127 -> 15 */
}

/* n floats -> bf16 (dtype LFM2_KV_BF16) or fp16 (LFM2_KV_F16) bits; exported for the tests. */
void lfm2_round_half(const float *x, uint16_t *out, int64_t n, int dtype) {
    for (int64_t i = 0; i < n; i++) out[i] = dtype == LFM2_KV_BF16 ? lfm2_float_to_bf16(x[i]) : to_f16(x[i]);
}

static void store_kv(void *cache, int64_t dtype, int64_t at, const float *x, int64_t D) {
    if (dtype == LFM2_KV_F32)
        memcpy((float *)cache + at, x, (size_t)D * sizeof(float));
    else
        lfm2_round_half(x, (uint16_t *)cache + at, D, (int)dtype);
}

/* Half-split RoPE in place on one head x (D,) with the position's cos / sin rows. */
static void rotate(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t j = 0; j < half; j++) {
        const float x1 = x[j], x2 = x[j + half];
        x[j] = x1 * cos[j] - x2 * sin[j];
        x[j + half] = x2 * cos[j + half] + x1 * sin[j + half];
    }
}

/* Scratch of one step, carved from one allocation (floats). */
typedef struct {
    float *x, *mix, *q, *att, *y, *ff;
    uint8_t *valid;
} scratch;

/* Attention layer i on x (B, d) -> y (B, d); writes position P of its caches. */
static int attention(const lfm2_model *m, const lfm2_layer *l, void *kc, void *vc, scratch *s, int64_t B,
                     int64_t L, int64_t P, const int64_t *positions, const uint8_t *valid) {
    const int64_t H = l->n_heads, G = l->n_kv, D = l->head_dim, width = (H + 2 * G) * D;
    const float eps = (float)m->eps;
    int rc = linear(&l->mix_in, s->x, s->mix, B);
    if (rc) return rc;
    for (int64_t b = 0; b < B; b++) {
        float *row = s->mix + b * width, *q = s->q + b * H * D;
        float *k = row + H * D, *v = row + (H + G) * D;
        const float *cos = m->rope_cos + positions[b] * D, *sin = m->rope_sin + positions[b] * D;
        lfm2_rms_norm_f32(row, l->q_norm, q, H, D, eps);
        lfm2_rms_norm_f32(k, l->k_norm, k, G, D, eps);
        for (int64_t h = 0; h < H; h++) rotate(q + h * D, cos, sin, D);
        for (int64_t g = 0; g < G; g++) {
            rotate(k + g * D, cos, sin, D);
            const int64_t at = ((b * G + g) * L + P) * D;
            store_kv(kc, m->kv_dtype, at, k + g * D, D);
            store_kv(vc, m->kv_dtype, at, v + g * D, D);
        }
    }
    const float scale = (float)l->scale;
    const int64_t S = P + 1;
    if (m->kv_dtype == LFM2_KV_F32)
        lfm2_decode_attention_f32(s->q, (const float *)kc, (const float *)vc, valid, s->att, B, H, G, L, S, D, scale);
    else if (m->kv_dtype == LFM2_KV_BF16)
        lfm2_decode_attention_bf16(s->q, (const uint16_t *)kc, (const uint16_t *)vc, valid, s->att, B, H, G, L, S, D,
                                   scale);
    else
        lfm2_decode_attention_f16(s->q, (const uint16_t *)kc, (const uint16_t *)vc, valid, s->att, B, H, G, L, S, D,
                                  scale);
    return linear(&l->mix_out, s->att, s->y, B);
}

static int conv(const lfm2_model *m, const lfm2_layer *l, float *state, scratch *s, int64_t B) {
    int rc = linear(&l->mix_in, s->x, s->mix, B);
    if (rc) return rc;
    lfm2_conv_step_f32(s->mix, state, l->conv_taps, s->att, B, m->d, m->conv_k);
    return linear(&l->mix_out, s->att, s->y, B);
}

static int ffn(const lfm2_layer *l, scratch *s, int64_t B) {
    const int64_t ff = l->w2.K;
    int rc = linear(&l->w13, s->x, s->mix, B);
    if (rc) return rc;
    lfm2_swiglu_f32(s->mix, s->ff, B, ff);
    return linear(&l->w2, s->ff, s->y, B);
}

static void add(float *h, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] += y[i];
}

/* h (B, d): the new tokens' embeddings in, the final-normed hidden states out. keys / values / conv: per
 * layer, its cache (attention) or state (conv), NULL for the other kind. L: the caches' capacity; P: the
 * number of positions already in them (the new token goes to position P); positions (B,): each row's RoPE
 * position; key_valid (B, L) or NULL when no row has padding. */
int lfm2_decode_step(const lfm2_model *m, float *h, int64_t B, void *const *keys, void *const *values,
                     float *const *conv_state, int64_t L, int64_t P, const int64_t *positions,
                     const uint8_t *key_valid) {
    const int64_t d = m->d;
    int64_t widest = 3 * d, heads = d, ff = 0;
    for (int64_t i = 0; i < m->n_layers; i++) {
        const lfm2_layer *l = &m->layers[i];
        const int64_t w = l->attention ? (l->n_heads + 2 * l->n_kv) * l->head_dim : 3 * d;
        widest = w > widest ? w : widest;
        widest = l->w13.N > widest ? l->w13.N : widest;
        heads = l->attention && l->n_heads * l->head_dim > heads ? l->n_heads * l->head_dim : heads;
        ff = l->w2.K > ff ? l->w2.K : ff;
    }
    const int64_t floats = B * (d + widest + heads + heads + d + ff);
    float *buf = (float *)malloc((size_t)floats * sizeof(float) + (size_t)(B * (P + 1)) + 64);
    if (buf == NULL) return LFM2_STEP_NOMEM;
    scratch s;
    s.x = buf;
    s.mix = s.x + B * d;
    s.q = s.mix + B * widest;
    s.att = s.q + B * heads;
    s.y = s.att + B * heads;
    s.ff = s.y + B * d;
    s.valid = NULL;
    if (key_valid != NULL) { /* the attention kernel reads (B, P + 1) */
        s.valid = (uint8_t *)(s.ff + B * ff);
        for (int64_t b = 0; b < B; b++) memcpy(s.valid + b * (P + 1), key_valid + b * L, (size_t)(P + 1));
    }
    const float eps = (float)m->eps;
    int rc = 0;
    for (int64_t i = 0; i < m->n_layers && rc == 0; i++) {
        const lfm2_layer *l = &m->layers[i];
        lfm2_rms_norm_f32(h, l->operator_norm, s.x, B, d, eps);
        rc = l->attention ? attention(m, l, keys[i], values[i], &s, B, L, P, positions, s.valid)
                          : conv(m, l, conv_state[i], &s, B);
        if (rc) break;
        add(h, s.y, B * d);
        lfm2_rms_norm_f32(h, l->ffn_norm, s.x, B, d, eps);
        rc = ffn(l, &s, B);
        if (rc) break;
        add(h, s.y, B * d);
    }
    if (rc == 0) lfm2_rms_norm_f32(h, m->final_norm, h, B, d, eps);
    free(buf);
    return rc;
}
