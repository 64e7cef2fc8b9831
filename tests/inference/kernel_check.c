/* A self-contained check of the native kernels (lfm2_train/inference/csrc) against references written here in
 * scalar C, for builds that the Python tests cannot load: the aarch64 NEON build, compiled with a cross
 * compiler and run under qemu by test_portable.py. Also builds and runs natively (x86, plain C).
 *
 * Checked, for every ISA level the build has (argv[1]: how many): W8A8 bit-identical to its definition;
 * q4_0 within fp32 rounding of a double evaluation of the same integers; q4_0 dequantization exact; the float
 * matrix-vector products, RMSNorm and decode attention within fp32 rounding of double references.
 * Prints one line per failure and "ok" at the end; exit status 1 on any failure.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int lfm2_gemv_w8a8(const float *, const int8_t *, const float *, const int32_t *, float *, int64_t, int64_t, int64_t,
                   int);
int lfm2_gemv_q4_0(const float *, const uint8_t *, const uint16_t *, float *, int64_t, int64_t, int64_t, int);
void lfm2_dequantize_q4_0(const uint8_t *, const uint16_t *, void *, int64_t, int64_t, int);
void lfm2_gemv_f32(const float *, const float *, float *, int64_t, int64_t, int64_t);
void lfm2_gemv_bf16(const float *, const uint16_t *, float *, int64_t, int64_t, int64_t);
void lfm2_gemv_i8(const float *, const int8_t *, const float *, float *, int64_t, int64_t, int64_t);
void lfm2_rms_norm_f32(const float *, const float *, float *, int64_t, int64_t, float);
void lfm2_decode_attention_f32(const float *, const float *, const float *, const uint8_t *, float *, int64_t,
                               int64_t, int64_t, int64_t, int64_t, int64_t, float);
int lfm2_build_arch(void);
int lfm2_cpu_features(void);

static int failures;
static uint64_t state = 88172645463325252ull;

static float uniform(void) { /* xorshift64: the same numbers on every platform */
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return (float)((state >> 11) * (1.0 / 9007199254740992.0)) * 2.0f - 1.0f;
}

static void fail(const char *what, int64_t N, int64_t K, int isa, double got, double want) {
    if (failures++ < 20) printf("FAIL %s N=%lld K=%lld isa=%d: got %.9g want %.9g\n", what, (long long)N,
                                (long long)K, isa, got, want);
}

static int8_t round_clamp(float v, float div) {
    v = nearbyintf(v / div);
    return (int8_t)(v < -127.0f ? -127.0f : v > 127.0f ? 127.0f : v);
}

/* q = round(x / d), d = amax / 127, exactly as the kernels (and quant.py) define it */
static float quantize(const float *x, int64_t K, int8_t *q) {
    float a = 0.0f;
    for (int64_t k = 0; k < K; k++) a = fmaxf(a, fabsf(x[k]));
    const float d = a / 127.0f;
    for (int64_t k = 0; k < K; k++) q[k] = round_clamp(x[k], d > 0.0f ? d : 1.0f);
    return d;
}

static uint16_t float_to_half(float f) { /* normal range only, round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000;
    if ((u & 0x7FFFFFFF) == 0) return (uint16_t)sign;
    int32_t exp = (int32_t)((u >> 23) & 0xFF) - 127 + 15;
    uint32_t man = u & 0x7FFFFF, half = (man >> 13), rest = man & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) half++;
    if (half == 0x400) half = 0, exp++;
    return (uint16_t)(sign | ((uint32_t)exp << 10) | half);
}

static float half_to_float(uint16_t h) { /* normal range only */
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    const uint32_t bits = exp == 0 && man == 0 ? sign : sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void check_w8a8(int64_t M, int64_t N, int64_t K, int isa) {
    float *x = malloc(sizeof(float) * M * K), *scale = malloc(sizeof(float) * N), *y = malloc(sizeof(float) * M * N);
    int8_t *w = malloc(N * K), *q = malloc(K + 1);
    int32_t *wsum = calloc(N, sizeof(int32_t));
    for (int64_t i = 0; i < M * K; i++) x[i] = uniform() * (i % 7 == 0 ? 10.0f : 1.0f);
    for (int64_t n = 0; n < N; n++) {
        scale[n] = 0.001f * (1.0f + (float)n);
        for (int64_t k = 0; k < K; k++) w[n * K + k] = (int8_t)(uniform() * 127.0f), wsum[n] += w[n * K + k];
    }
    if (lfm2_gemv_w8a8(x, w, scale, wsum, y, M, N, K, isa) != 0) fail("w8a8 workspace", N, K, isa, 0, 0);
    for (int64_t m = 0; m < M; m++) {
        const float d = quantize(x + m * K, K, q);
        for (int64_t n = 0; n < N; n++) {
            int32_t dot = 0;
            for (int64_t k = 0; k < K; k++) dot += (int32_t)q[k] * w[n * K + k];
            const float want = (float)dot * d * scale[n];
            if (y[m * N + n] != want) fail("w8a8", N, K, isa, y[m * N + n], want);
        }
    }
    free(x), free(scale), free(y), free(w), free(q), free(wsum);
}

static void check_q4(int64_t M, int64_t N, int64_t K, int isa) {
    const int64_t nb = (K + 31) / 32, G = (N + 7) / 8;
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N);
    float *deq = malloc(sizeof(float) * N * K);
    uint8_t *packed = calloc(G * nb * 128, 1);
    uint16_t *scales = calloc(G * nb * 8, sizeof(uint16_t));
    int8_t *vals = malloc(G * 8 * nb * 32), *q = malloc(32);
    for (int64_t i = 0; i < M * K; i++) x[i] = uniform() * (i % 5 == 0 ? 4.0f : 1.0f);
    for (int64_t n = 0; n < G * 8; n++)
        for (int64_t b = 0; b < nb; b++) {
            const float s = 0.01f + 0.001f * (float)((n + b) % 17);
            scales[((n / 8) * nb + b) * 8 + n % 8] = float_to_half(n < N ? s : 0.0f);
            for (int j = 0; j < 32; j++) {
                int v = n < N && 32 * b + j < K ? (int)floorf((uniform() + 1.0f) * 8.0f) - 8 : 0;
                v = v < -8 ? -8 : v > 7 ? 7 : v;
                vals[(n * nb + b) * 32 + j] = (int8_t)v;
                uint8_t *byte = packed + (((n / 8) * nb + b) * 8 + n % 8) * 16 + (j & 15);
                *byte |= (uint8_t)((v + 8) << (j < 16 ? 0 : 4));
            }
        }
    lfm2_dequantize_q4_0(packed, scales, deq, N, K, 0);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            const float want = half_to_float(scales[((n / 8) * nb + k / 32) * 8 + n % 8]) * vals[(n * nb + k / 32) * 32 + k % 32];
            if (deq[n * K + k] != want) fail("q4_0 dequantize", N, K, isa, deq[n * K + k], want);
        }
    if (lfm2_gemv_q4_0(x, packed, scales, y, M, N, K, isa) != 0) fail("q4_0 workspace", N, K, isa, 0, 0);
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double want = 0.0, mag = 0.0;
            for (int64_t b = 0; b < nb; b++) {
                float block[32] = {0};
                for (int j = 0; j < 32 && 32 * b + j < K; j++) block[j] = x[m * K + 32 * b + j];
                const float d = quantize(block, 32, q);
                const double s = (double)half_to_float(scales[((n / 8) * nb + b) * 8 + n % 8]) * d;
                for (int j = 0; j < 32; j++) {
                    want += s * q[j] * vals[(n * nb + b) * 32 + j];
                    mag += fabs(s * q[j] * vals[(n * nb + b) * 32 + j]);
                }
            }
            if (fabs(y[m * N + n] - want) > (nb + 8) * ldexp(mag, -23) + 1e-30)
                fail("q4_0", N, K, isa, y[m * N + n], want);
        }
    free(x), free(y), free(deq), free(packed), free(scales), free(vals), free(q);
}

static void check_float(int64_t M, int64_t N, int64_t K) {
    float *x = malloc(sizeof(float) * M * K), *w = malloc(sizeof(float) * N * K), *y = malloc(sizeof(float) * M * N);
    float *scale = malloc(sizeof(float) * N);
    uint16_t *wb = malloc(2 * N * K);
    int8_t *wi = malloc(N * K);
    for (int64_t i = 0; i < M * K; i++) x[i] = uniform();
    for (int64_t i = 0; i < N * K; i++) {
        w[i] = uniform();
        uint32_t u;
        memcpy(&u, &w[i], 4);
        wb[i] = (uint16_t)(u >> 16);
        wi[i] = (int8_t)(uniform() * 127.0f);
    }
    for (int64_t n = 0; n < N; n++) scale[n] = 0.5f + (float)n;
    for (int kind = 0; kind < 3; kind++) {
        if (kind == 0) lfm2_gemv_f32(x, w, y, M, N, K);
        if (kind == 1) lfm2_gemv_bf16(x, wb, y, M, N, K);
        if (kind == 2) lfm2_gemv_i8(x, wi, scale, y, M, N, K);
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) {
                double want = 0.0, mag = 0.0;
                for (int64_t k = 0; k < K; k++) {
                    uint32_t u = (uint32_t)wb[n * K + k] << 16;
                    float wv = w[n * K + k];
                    if (kind == 1) memcpy(&wv, &u, 4);
                    if (kind == 2) wv = (float)wi[n * K + k] * scale[n];
                    want += (double)x[m * K + k] * wv;
                    mag += fabs((double)x[m * K + k] * wv);
                }
                if (fabs(y[m * N + n] - want) > 4 * sqrt((double)K + 1) * ldexp(mag, -23) + 1e-30)
                    fail(kind == 0 ? "gemv f32" : kind == 1 ? "gemv bf16" : "gemv i8", N, K, -1, y[m * N + n], want);
            }
    }
    lfm2_rms_norm_f32(x, w, y, M, K, 1e-5f); /* uses y as (M, K): N >= K here */
    for (int64_t m = 0; m < M; m++) {
        double ss = 0.0;
        for (int64_t k = 0; k < K; k++) ss += (double)x[m * K + k] * x[m * K + k];
        const double r = 1.0 / sqrt(ss / K + 1e-5);
        for (int64_t k = 0; k < K; k++)
            if (fabs(y[m * K + k] - w[k] * x[m * K + k] * r) > 1e-5 * (1 + fabs(w[k] * x[m * K + k] * r)))
                fail("rms_norm", M, K, -1, y[m * K + k], w[k] * x[m * K + k] * r);
    }
    free(x), free(w), free(y), free(scale), free(wb), free(wi);
}

static void check_attention(void) {
    enum { B = 2, H = 4, G = 2, L = 21, S = 19, D = 12 };
    float q[B * H * D], k[B * G * L * D], v[B * G * L * D], out[B * H * D];
    uint8_t valid[B * S];
    for (int i = 0; i < B * H * D; i++) q[i] = uniform();
    for (int i = 0; i < B * G * L * D; i++) k[i] = 2 * uniform(), v[i] = uniform();
    for (int i = 0; i < B * S; i++) valid[i] = !(i < 5 || i == S + 3); /* row 0: left padding; row 1: a hole */
    lfm2_decode_attention_f32(q, k, v, valid, out, B, H, G, L, S, D, 0.3f);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const int g = h / (H / G);
            double p[S], top = -INFINITY, total = 0.0;
            for (int s = 0; s < S; s++) {
                double dot = 0.0;
                for (int j = 0; j < D; j++) dot += (double)q[(b * H + h) * D + j] * k[((b * G + g) * L + s) * D + j];
                p[s] = valid[b * S + s] ? dot * 0.3 : -INFINITY;
                top = p[s] > top ? p[s] : top;
            }
            for (int s = 0; s < S; s++) total += p[s] = exp(p[s] - top);
            for (int j = 0; j < D; j++) {
                double want = 0.0;
                for (int s = 0; s < S; s++) want += p[s] / total * v[((b * G + g) * L + s) * D + j];
                if (fabs(out[(b * H + h) * D + j] - want) > 1e-5) fail("attention", b, h, -1, out[(b * H + h) * D + j], want);
            }
        }
}

int main(int argc, char **argv) {
    const int levels = argc > 1 ? atoi(argv[1]) : 1;
    printf("build %d, features %d, checking %d ISA level(s)\n", lfm2_build_arch(), lfm2_cpu_features(), levels);
    const int64_t Ns[] = {1, 3, 8, 9, 17}, Ks[] = {1, 15, 16, 33, 64, 100, 520};
    for (int isa = 0; isa < levels; isa++)
        for (int i = 0; i < 5; i++)
            for (int j = 0; j < 7; j++)
                for (int64_t M = 1; M <= 3; M += 2) check_w8a8(M, Ns[i], Ks[j], isa), check_q4(M, Ns[i], Ks[j], isa);
    check_w8a8(1, 3, 8192, levels - 1);
    for (int i = 0; i < 5; i++) check_float(2, Ns[i] + 600, Ks[i + 2]);
    check_attention();
    printf(failures ? "%d failures\n" : "ok\n", failures);
    return failures != 0;
}
