/* What the CPU can run (for the caller's choice of kernel variant), and the per-thread scratch buffer. */
#include <stdlib.h>

#include "kernels.h"

#if LFM2_NEON && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

int lfm2_build_arch(void) { return LFM2_X86 ? LFM2_ARCH_X86 : LFM2_NEON ? LFM2_ARCH_NEON : LFM2_ARCH_PORTABLE; }

int lfm2_cpu_features(void) {
    int f = 0;
#if LFM2_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= LFM2_FEAT_AVX2;
#if LFM2_HAVE_AVX512
    /* __builtin_cpu_supports also checks that the OS saves the 512-bit state (XCR0). */
    if ((f & LFM2_FEAT_AVX2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")) {
        f |= LFM2_FEAT_AVX512;
        if (__builtin_cpu_supports("avx512bf16")) f |= LFM2_FEAT_AVX512_BF16;
    }
#endif
#elif LFM2_NEON
#if defined(__ARM_FEATURE_DOTPROD)
    f |= LFM2_FEAT_NEON_DOTPROD; /* built for it: the CPU must have it */
#elif defined(__linux__)
    if (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) f |= LFM2_FEAT_NEON_DOTPROD;
#endif
#endif
    return f;
}

static _Thread_local void *scratch;
static _Thread_local size_t scratch_bytes;

void *lfm2_workspace(size_t bytes) {
    if (bytes <= scratch_bytes) return scratch;
    size_t size = (bytes + 4095) & ~(size_t)4095; /* whole pages: aligned_alloc wants a multiple of 64 */
    void *p = aligned_alloc(64, size);
    if (p == NULL) return NULL;
    free(scratch);
    scratch = p;
    scratch_bytes = size;
    return p;
}
