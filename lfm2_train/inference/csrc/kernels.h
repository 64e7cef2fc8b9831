/* Shared definitions of the decode kernels (decode.c, int8_gemv.c, bf16_gemv.c, cpu.c).
 *
 * ISA levels: the whole library is built for x86-64 with AVX2 + FMA + F16C (every CPU with AVX2 that torch
 * runs its AVX2 kernels on). Functions for wider instruction sets carry `LFM2_TARGET_AVX512` and are only
 * called when `lfm2_cpu_features()` says the CPU has them, so one library runs on AVX2-only CPUs too. A
 * compiler too old for those targets compiles them out (`LFM2_HAVE_AVX512` is 0), and the feature bits say
 * so. The caller (native.py) picks the variant per kernel: `isa` arguments are LFM2_ISA_* values.
 */
#ifndef LFM2_KERNELS_H
#define LFM2_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define LFM2_ROWS 8 /* weight rows per group: the unit of work of every matrix-vector kernel */
/* Rows of fewer bytes are read one after another, longer ones LFM2_ROWS side by side (decode.c's top). */
#define LFM2_SEQUENTIAL_BELOW 4096

/* Feature bits of lfm2_cpu_features(): what this CPU has AND this build can use. */
enum {
    LFM2_FEAT_AVX2 = 1,        /* AVX2 + FMA + F16C: the baseline of every x86 kernel */
    LFM2_FEAT_AVX512 = 2,      /* AVX512 F, BW, VL and VNNI: the 512-bit integer dot products */
    LFM2_FEAT_AVX512_BF16 = 4, /* AVX512_BF16 on top of LFM2_FEAT_AVX512: vdpbf16ps */
    LFM2_FEAT_NEON_DOTPROD = 8 /* aarch64 with the dot-product extension (vdotq_s32) */
};

/* The `isa` argument of the integer kernels: a level within the build's architecture (0 = its baseline). */
enum { LFM2_ISA_AVX2 = 0, LFM2_ISA_AVX512 = 1, LFM2_ISA_NEON = 0, LFM2_ISA_NEON_DOTPROD = 1 };

/* Which code a build contains: x86-64 intrinsics, aarch64 NEON for the integer kernels (plain C for the
 * rest), or plain C only (any other CPU, or -DLFM2_PORTABLE, which tests use to check that code on x86). */
#if defined(__x86_64__) && !defined(LFM2_PORTABLE)
#define LFM2_X86 1
#define LFM2_NEON 0
#elif defined(__aarch64__) && !defined(LFM2_PORTABLE)
#define LFM2_X86 0
#define LFM2_NEON 1
#else
#define LFM2_X86 0
#define LFM2_NEON 0
#endif

/* lfm2_build_arch(): what the library was built as. */
enum { LFM2_ARCH_X86 = 0, LFM2_ARCH_NEON = 1, LFM2_ARCH_PORTABLE = 2 };

#if LFM2_X86
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define LFM2_HAVE_AVX512 1
#define LFM2_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define LFM2_TARGET_AVX512_BF16 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16,avx2,fma,f16c")))
#else
#define LFM2_HAVE_AVX512 0
#endif
#else
#define LFM2_HAVE_AVX512 0
#endif

/* A 64-byte aligned scratch buffer of at least `bytes`, owned by the calling thread and reused by its
 * next call (contents undefined). The kernels quantize or convert the activations into it once per call,
 * before their parallel loop; the OpenMP workers only read it. Returns NULL when out of memory. */
void *lfm2_workspace(size_t bytes);

/* float -> bf16 bits, round to nearest even (what torch's .to(torch.bfloat16) does); NaN stays NaN. */
static inline uint16_t lfm2_float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE fp16 bits -> float, exactly (subnormals included): fp16 scales and the fp16 KV cache. */
static inline float lfm2_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: man * 2^-24, normalised */
        uint32_t e = 0;
        while (!(man & 0x400)) man <<= 1, e++;
        bits = sign | ((113 - e) << 23) | ((man & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}


int lfm2_cpu_features(void);
int lfm2_build_arch(void);

#endif
