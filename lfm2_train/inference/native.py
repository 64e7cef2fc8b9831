"""The matrix products of the fast CPU path: `gemv` (decode; native C kernels) and `gemm` (prefill; oneDNN).

The kernels (`csrc/*.c`) are compiled on first use and cached; callers fall back to torch ops without them.
`csrc/decode_step.c` sequences them into a whole decode step (driven by `decode_step.py`).

Why compiled kernels: batch-1 decode streams every weight once per token, and the matrix-vector product
torch reaches on CPU (MKL's GEMV) runs well below the memory bandwidth on some machines (see the C files and
docs/BENCHMARKS.md). The kernels are plain C with intrinsics and OpenMP, built with the system C compiler
the way DeepSpeed builds its ops: once per source/flags/compiler, into a cache directory, atomically.
The library is loaded with ctypes after torch, so it shares torch's OpenMP runtime and thread count.

ISA dispatch: on x86-64 the library is built for AVX2 + FMA + F16C; kernels for wider instruction sets
(AVX512 with VNNI for the int8 products, AVX512_BF16 for bf16) are compiled into the same library with
per-function target attributes and used only where `cpu_features()` reports them, so one build runs on
AVX2-only CPUs. On aarch64 the integer kernels are NEON (with vdotq_s32 where the CPU has the dot-product
extension) and the float ones plain C; any other CPU gets plain C throughout (`csrc/decode_generic.c`).
Each kernel object picks its variant when it is created (`kernel_isa`), capped by `LFM2_KERNEL_ISA`.

Nothing here is required: without a C compiler (or OpenMP: Apple's clang), on an x86 CPU without AVX2/FMA,
or with `LFM2_NATIVE_KERNELS=0`, `available()` is False, `unavailable_reason()` says why (logged once), and
callers use torch ops (same results within fp32 rounding; bit-identical for w8a8).

Environment:
    LFM2_NATIVE_KERNELS=0      never build or load the kernels
    LFM2_KERNEL_ISA=avx2       the widest instruction set the kernels may use (x86: avx2 | avx512; aarch64:
                               neon | dotprod; default: the widest this CPU has) -- tests force avx2
    LFM2_KERNEL_PORTABLE=1     build the plain C kernels only, as on CPUs other than x86-64 / aarch64 (tests
                               check that code on x86 this way)
    LFM2_KERNEL_CACHE=DIR      where built libraries live (default ~/.cache/lfm2_train/kernels)
    CC=...                     the C compiler (default: cc, gcc or clang, first found)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(sorted(CSRC.glob("*.c")))
HEADERS = tuple(sorted(CSRC.glob("*.h")))
CFLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c11")
X86_FLAGS = ("-mavx2", "-mfma", "-mf16c")
LDLIBS = ("-lm",)
ENV_SWITCH = "LFM2_NATIVE_KERNELS"
ENV_CACHE = "LFM2_KERNEL_CACHE"
ENV_ISA = "LFM2_KERNEL_ISA"
ENV_PORTABLE = "LFM2_KERNEL_PORTABLE"
# Instruction-set levels per kind of build (lfm2_build_arch()), narrowest first: the values of `isa`
# arguments and LFM2_KERNEL_ISA; a level's index is what the C entry points take.
ISA_LEVELS = {"x86": ("avx2", "avx512"), "neon": ("neon", "dotprod"), "portable": ("generic",)}
ALL_ISAS = tuple(name for levels in ISA_LEVELS.values() for name in levels)
_ARCHES = ("x86", "neon", "portable")  # lfm2_build_arch() values
# lfm2_cpu_features() bits (csrc/kernels.h)
FEAT_AVX2, FEAT_AVX512, FEAT_AVX512_BF16, FEAT_NEON_DOTPROD = 1, 2, 4, 8

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_INT = ctypes.c_int
_SIGNATURES = {
    "lfm2_gemv_f32": [_PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_gemv_bf16": [_PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_gemv_i8": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_decode_attention_f32": [_PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 6, ctypes.c_float],
    "lfm2_decode_attention_bf16": [_PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 6, ctypes.c_float],
    "lfm2_decode_attention_f16": [_PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 6, ctypes.c_float],
    "lfm2_rms_norm_f32": [_PTR, _PTR, _PTR, _I64, _I64, ctypes.c_float],
    "lfm2_conv_step_f32": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_max_threads": [],
    "lfm2_cpu_features": [],
    "lfm2_build_arch": [],
    "lfm2_gemv_w8a8": [_PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT],
    "lfm2_gemv_q4_0": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _INT],
    "lfm2_dequantize_q4_0": [_PTR, _PTR, _PTR, _I64, _I64, _INT],
    "lfm2_decode_step": [_PTR, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _PTR, _PTR],
    "lfm2_round_half": [_PTR, _PTR, _I64, _INT],
    "lfm2_swiglu_f32": [_PTR, _PTR, _I64, _I64],
}
# Present only when the compiler can target AVX512 (csrc/kernels.h: LFM2_HAVE_AVX512).
_OPTIONAL = {"lfm2_gemv_bf16_avx512": [_PTR, _PTR, _PTR, _I64, _I64, _I64]}
_RETURNS_INT = ("lfm2_max_threads", "lfm2_cpu_features", "lfm2_build_arch", "lfm2_gemv_w8a8", "lfm2_gemv_q4_0",
                "lfm2_gemv_bf16_avx512", "lfm2_decode_step")


class NativeKernelError(RuntimeError):
    """The native kernels were required (`kernels=native`) but cannot be built or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "lfm2_train" / "kernels")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _portable() -> bool:
    return os.environ.get(ENV_PORTABLE, "0").strip().lower() in ("1", "true", "on", "yes")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def _cflags() -> tuple[str, ...]:
    """x86-64: the AVX2 baseline; plain C builds: -DLFM2_PORTABLE; aarch64: the compiler's default ARMv8."""
    if _portable():
        return (*CFLAGS, "-DLFM2_PORTABLE")
    return (*CFLAGS, *X86_FLAGS) if _is_x86() else CFLAGS


def _cpu_reason() -> str | None:
    """Why this CPU cannot run the build `_cflags` makes (x86-64 needs AVX2/FMA), or None."""
    if not _is_x86() or _portable():
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports capability {capability})"
    return None


def _build(cc: str) -> Path:
    """Compile `SOURCES` once per (sources, flags, compiler); concurrent builders race harmlessly."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    flags = _cflags()
    text = b"".join(p.name.encode() + p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(text + " ".join(flags).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"lfm2_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        cmd = [cc, *flags, *map(str, SOURCES), "-o", tmp, *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            names = " ".join(p.name for p in SOURCES)
            raise OSError(f"`{cc} {' '.join(flags)} {names}` failed:\n{proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a reader sees no library or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_reason: str | None = None


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        _reason = f"disabled by {ENV_SWITCH}={os.environ[ENV_SWITCH]}"
        return None
    _reason = _cpu_reason()
    if _reason is not None:
        return None
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found (set CC, or install gcc/clang)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
        for name, argtypes in [*_SIGNATURES.items(), *_OPTIONAL.items()]:
            if name in _SIGNATURES or hasattr(lib, name):
                fn = getattr(lib, name)
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int if name in _RETURNS_INT else None
    except (OSError, AttributeError) as err:
        _reason = f"building or loading {' '.join(p.name for p in SOURCES)} failed: {err}"
        return None
    if _ARCHES[lib.lfm2_build_arch()] == "x86" and not lib.lfm2_cpu_features() & FEAT_AVX2:
        _reason = "the CPU lacks AVX2/FMA (the kernels' baseline)"
        return None
    return lib


@functools.cache
def _log_unavailable(reason: str | None) -> None:
    log.warning("native CPU kernels unavailable (%s); using torch ops", reason)


def available() -> bool:
    """True when the kernels are built and loaded (builds them on the first call, a second or two)."""
    lib = _library()
    if lib is None and os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no"):
        _log_unavailable(_reason)  # once per reason; not when switched off on purpose
    return lib is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or has not been asked yet)."""
    _library()
    return _reason


def require() -> ctypes.CDLL:
    """The loaded library, or `NativeKernelError` saying why there is none."""
    lib = _library()
    if lib is None:
        raise NativeKernelError(f"native CPU kernels are unavailable: {_reason}")
    return lib


def max_threads() -> int:
    """OpenMP threads the kernels will use (follows `torch.set_num_threads`)."""
    return int(require().lfm2_max_threads())


def cpu_features() -> int:
    """FEAT_* bits: what this CPU has and this build of the kernels can use."""
    return int(require().lfm2_cpu_features())


def build_arch() -> str:
    """What the loaded library was built as: "x86", "neon" (aarch64) or "portable" (plain C)."""
    return _ARCHES[int(require().lfm2_build_arch())]


def isas() -> tuple[str, ...]:
    """The ISA levels the kernels can run here, narrowest first (e.g. ("avx2", "avx512"))."""
    levels, feats = ISA_LEVELS[build_arch()], cpu_features()
    extended = feats & FEAT_AVX512 if levels[0] == "avx2" else feats & FEAT_NEON_DOTPROD if levels[0] == "neon" else 0
    return levels if extended else levels[:1]


def kernel_isa(requested: str | None = None) -> str:
    """The ISA level a new kernel object uses: `requested`, else LFM2_KERNEL_ISA, else the widest, and never
    wider than this CPU has (the setting is a cap, so one configuration runs on every machine; a level of
    another architecture caps nothing)."""
    want = requested if requested is not None else (os.environ.get(ENV_ISA) or "").strip().lower() or None
    if want is not None and want not in ALL_ISAS:
        raise ValueError(f"{ENV_ISA} / isa must be one of {ALL_ISAS}, got {want!r}")
    here = isas()
    return want if want in here else here[-1]


def _isa_code(isa: str) -> int:
    return ISA_LEVELS[build_arch()].index(isa)


_WEIGHT_FN = {torch.float32: "lfm2_gemv_f32", torch.bfloat16: "lfm2_gemv_bf16", torch.int8: "lfm2_gemv_i8"}


def _check_matrix(name: str, t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"{name} must be a contiguous CPU {dtype} tensor of shape {shape}, got {t.dtype} "
                         f"{tuple(t.shape)}")


def _as_rows(x: torch.Tensor, K: int) -> torch.Tensor:
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"gemv x must be (M, {K}), got {tuple(x.shape)}")
    if x.dtype != torch.float32:
        x = x.float()
    return x if x.is_contiguous() else x.contiguous()


def _checked(rc: int | None) -> None:
    if rc:
        raise MemoryError("native gemv: allocating its activation workspace failed")


class Gemv:
    """A weight checked once for the native matrix-vector kernel; each call then only runs the product.

    `weight` (N, K) contiguous fp32, bf16 or int8 (int8 requires an fp32 `scale` of shape (N,)). Calling it
    with x (M, K) returns `x @ weight.T` (times `scale` per output for int8) as (M, N) fp32, accumulated in
    fp32; x is converted to contiguous fp32 first (it is small). Decode calls this ~60 times per token, so
    the per-call work is kept to a shape check.

    bf16 weights times bf16 activations (the bf16 fast path) use vdpbf16ps on a CPU with AVX512_BF16 (and
    `isa` avx512): products of two bf16 are exact in fp32, so this loses nothing (csrc/bf16_gemv.c). fp32
    activations always take the kernel that widens each weight to fp32, keeping x at fp32 precision.
    `self.isa` says which variant bf16 activations get.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None, isa: str | None = None) -> None:
        lib = require()
        if weight.dtype not in _WEIGHT_FN:
            raise TypeError(f"gemv weight dtype must be one of {sorted(map(str, _WEIGHT_FN))}, got {weight.dtype}")
        if weight.dim() != 2 or not weight.is_contiguous() or weight.device.type != "cpu":
            raise ValueError(f"gemv weight must be a contiguous 2-D CPU tensor, got {tuple(weight.shape)}")
        if (weight.dtype == torch.int8) != (scale is not None):
            raise ValueError("gemv takes a per-row scale for int8 weights and only for them")
        self.N, self.K = weight.shape
        if scale is not None and (scale.shape != (self.N,) or scale.dtype != torch.float32
                                  or not scale.is_contiguous()):
            raise ValueError(f"gemv scale must be contiguous fp32 of shape ({self.N},), got {tuple(scale.shape)}")
        self.weight, self.scale = weight, scale  # held: the kernel reads their memory
        self.isa = isas()[0]
        self._fn = self._bf16_fn = getattr(lib, _WEIGHT_FN[weight.dtype])
        if (weight.dtype == torch.bfloat16 and kernel_isa(isa) == "avx512"
                and cpu_features() & FEAT_AVX512_BF16 and hasattr(lib, "lfm2_gemv_bf16_avx512")):
            self.isa, self._bf16_fn = "avx512", lib.lfm2_gemv_bf16_avx512
        self._operands = (weight.data_ptr(),) if scale is None else (weight.data_ptr(), scale.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fn = self._bf16_fn if x.dtype == torch.bfloat16 else self._fn
        x = _as_rows(x, self.K)
        M = x.shape[0]
        y = torch.empty(M, self.N, dtype=torch.float32)
        if M == 0 or self.N == 0:
            return y.zero_()
        _checked(fn(x.data_ptr(), *self._operands, y.data_ptr(), M, self.N, self.K))
        return y


class GemvW8A8:
    """W8A8 matrix-vector product (csrc/int8_gemv.c): x (M, K) float -> (M, N) fp32, bit-identical to
    `quant.w8a8_matmul` (x quantized per row to int8, exact int32 sums, then * d[m] * scale[n]).

    `q` (N, K) int8 in [-127, 127] (the AVX2 sign trick needs -128 absent), `scale` (N,) fp32.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, isa: str | None = None) -> None:
        lib = require()
        if q.dim() != 2:
            raise ValueError(f"w8a8 weight must be 2-D, got {tuple(q.shape)}")
        self.N, self.K = q.shape
        _check_matrix("w8a8 weight", q, torch.int8, (self.N, self.K))
        _check_matrix("w8a8 scale", scale, torch.float32, (self.N,))
        if q.numel() and int(q.min()) == -128:
            raise ValueError("w8a8 weights must lie in [-127, 127] (quant.quantize_rowwise's range)")
        self.q, self.scale = q, scale
        self.wsum = q.sum(dim=1, dtype=torch.int32).contiguous()  # row sums: VNNI reads x + 128
        self.isa = kernel_isa(isa)
        self._isa_code = _isa_code(self.isa)
        self._fn = lib.lfm2_gemv_w8a8

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_rows(x, self.K)
        y = torch.empty(x.shape[0], self.N, dtype=torch.float32)
        _checked(self._fn(x.data_ptr(), self.q.data_ptr(), self.scale.data_ptr(), self.wsum.data_ptr(),
                          y.data_ptr(), x.shape[0], self.N, self.K, self._isa_code))
        return y


def _q4_shapes(N: int, K: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    groups, nb = -(-N // 8), -(-K // 32)
    return (groups, nb, 8, 16), (groups, nb, 8)


class GemvQ4:
    """q4_0 matrix-vector product (csrc/int8_gemv.c): x (M, K) float -> (M, N) fp32, x quantized per block
    of 32 to int8 (as `quant.quantize_activation_blocks`), int32 sums per block, fp32 across blocks.

    `packed` / `scales`: `quant.pack_q4_0`'s layout for an (N, K) weight (any N, K; padded inside).
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, N: int, K: int, isa: str | None = None) -> None:
        lib = require()
        pshape, sshape = _q4_shapes(N, K)
        _check_matrix("q4_0 packed weight", packed, torch.uint8, pshape)
        _check_matrix("q4_0 scales", scales, torch.float16, sshape)
        self.N, self.K = N, K
        self.packed, self.scales = packed, scales
        self.isa = kernel_isa(isa)
        self._isa_code = _isa_code(self.isa)
        self._fn = lib.lfm2_gemv_q4_0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_rows(x, self.K)
        y = torch.empty(x.shape[0], self.N, dtype=torch.float32)
        _checked(self._fn(x.data_ptr(), self.packed.data_ptr(), self.scales.data_ptr(), y.data_ptr(),
                          x.shape[0], self.N, self.K, self._isa_code))
        return y


def dequantize_q4_0(packed: torch.Tensor, scales: torch.Tensor, K: int, start: int, stop: int,
                    out: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weights (stop - start, K) of rows [start, stop) of a packed q4_0 matrix; `start` a multiple of 8.

    fp32: exact (d * (q - 8) fits fp32); bf16: that value rounded to nearest even, as `.to(torch.bfloat16)`
    would (for a bf16 prefill GEMM: half the bytes written, no conversion pass). One pass over the packed
    bytes. `out`: a contiguous tensor of that shape and dtype to write into (a reused buffer saves
    page-faulting fresh memory per call); its dtype wins over `dtype`.
    """
    lib = require()
    groups, nb = packed.shape[:2]
    if start % 8 or not 0 <= start <= stop <= groups * 8 or packed.shape != _q4_shapes(groups * 8, K)[0] \
            or scales.shape != _q4_shapes(groups * 8, K)[1] or not (packed.is_contiguous() and scales.is_contiguous()):
        raise ValueError(f"dequantize_q4_0: rows [{start}, {stop}) of packed {tuple(packed.shape)} / scales "
                         f"{tuple(scales.shape)} with K={K}")
    if out is None:
        out = torch.empty(stop - start, K, dtype=dtype)
    if out.shape != (stop - start, K) or out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
        raise ValueError(f"dequantize_q4_0 out must be contiguous fp32 or bf16 ({stop - start}, {K}), got "
                         f"{out.dtype} {tuple(out.shape)}")
    if out.numel():
        g = start // 8
        lib.lfm2_dequantize_q4_0(packed.data_ptr() + g * nb * 128, scales.data_ptr() + g * nb * 16,
                                 out.data_ptr(), stop - start, K, int(out.dtype == torch.bfloat16))
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """One-off `Gemv(weight, scale)(x)`: (M, K) -> (M, N) fp32."""
    return Gemv(weight, scale)(x)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of fp32 `x` with fp32 `weight` (d,): `w * (x * rsqrt(mean(x²) + eps))`.

    The same function as the model's RMSNorm in fp32, up to the summation order of mean(x²).
    """
    lib = require()
    d = x.shape[-1]
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or weight.shape != (d,):
        raise ValueError(f"rms_norm takes fp32 x (..., {d}) and an fp32 weight ({d},); got {x.dtype} "
                         f"{tuple(x.shape)} and {weight.dtype} {tuple(weight.shape)}")
    if not x.is_contiguous():
        x = x.contiguous()
    if not weight.is_contiguous():
        weight = weight.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        lib.lfm2_rms_norm_f32(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // d, d, eps)
    return y


def conv_step(bcx: torch.Tensor, state: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """One decode step of the gated short convolution in fp32; updates `state` in place.

    bcx (B, 3d): in_proj output [B | C | x] of one new token per row; state (B, k-1, d) contiguous, oldest
    first; taps (k, d) contiguous, oldest first. Returns C * conv([state, B*x]) as (B, d).
    """
    lib = require()
    B, three_d = bcx.shape
    k, d = taps.shape
    if three_d != 3 * d or state.shape != (B, k - 1, d):
        raise ValueError(f"conv_step shapes: bcx (B, 3d) = {tuple(bcx.shape)}, state (B, k-1, d) = "
                         f"{tuple(state.shape)}, taps (k, d) = {tuple(taps.shape)}")
    if not all(t.dtype == torch.float32 for t in (bcx, state, taps)):
        raise ValueError("conv_step is fp32 only")
    if not (state.is_contiguous() and taps.is_contiguous()):
        raise ValueError("conv_step needs a contiguous state and taps (the state is updated in place)")
    bcx = bcx.contiguous()
    out = torch.empty(B, d, dtype=torch.float32)
    lib.lfm2_conv_step_f32(bcx.data_ptr(), state.data_ptr(), taps.data_ptr(), out.data_ptr(), B, d, k)
    return out


_ATTENTION_FN = {torch.float32: "lfm2_decode_attention_f32", torch.bfloat16: "lfm2_decode_attention_bf16",
                 torch.float16: "lfm2_decode_attention_f16"}


def round_half(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 x rounded to bf16 or fp16 by the kernels' own conversion (what the decode step writes into a 16-bit
    KV cache); tests hold it to torch's `.to(dtype)`."""
    codes = {torch.bfloat16: 1, torch.float16: 2}
    if x.dtype != torch.float32 or dtype not in codes:
        raise ValueError(f"round_half takes fp32 x and bf16 / fp16, got {x.dtype} -> {dtype}")
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    require().lfm2_round_half(x.data_ptr(), out.data_ptr(), x.numel(), codes[dtype])
    return out


def swiglu(ab: torch.Tensor) -> torch.Tensor:
    """SwiGLU of fp32 rows as the decode step computes it: ab (B, 2 ff) = [w1 x | w3 x] -> silu(w1 x) * w3 x."""
    if ab.dtype != torch.float32 or ab.dim() != 2 or ab.shape[1] % 2:
        raise ValueError(f"swiglu takes fp32 (B, 2 ff), got {ab.dtype} {tuple(ab.shape)}")
    ab = ab.contiguous()
    out = torch.empty(ab.shape[0], ab.shape[1] // 2, dtype=torch.float32)
    require().lfm2_swiglu_f32(ab.data_ptr(), out.data_ptr(), ab.shape[0], ab.shape[1] // 2)
    return out


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one query token per row over the first `length` cached positions.

    q (B, H, D); keys / values: the whole preallocated cache (B, G, L, D), contiguous, fp32, bf16 or fp16;
    valid (B, length) bool (False = padding) or None. Query head h uses KV head h // (H // G).
    Returns (B, H, D) fp32 (softmax and sums in fp32).
    """
    lib = require()
    B, H, D = q.shape
    if keys.shape != values.shape or keys.dim() != 4 or keys.shape[0] != B or keys.shape[3] != D:
        raise ValueError(f"decode_attention cache must be (B={B}, G, L, D={D}) for keys and values, got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    G, L = keys.shape[1], keys.shape[2]
    if H % G or not 0 < length <= L:
        raise ValueError(f"decode_attention needs H ({H}) divisible by G ({G}) and 0 < length ({length}) <= {L}")
    if keys.dtype != values.dtype or keys.dtype not in _ATTENTION_FN:
        raise TypeError(f"decode_attention cache dtype must be fp32, bf16 or fp16, got {keys.dtype} / {values.dtype}")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("decode_attention needs contiguous caches (pass the preallocated buffers, not slices)")
    q = q.to(torch.float32).contiguous()
    mask = None
    if valid is not None:
        if valid.shape != (B, length):
            raise ValueError(f"decode_attention valid must be (B, length) = ({B}, {length}), got {tuple(valid.shape)}")
        mask = valid.to(torch.uint8).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    fn = getattr(lib, _ATTENTION_FN[keys.dtype])
    fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), mask.data_ptr() if mask is not None else None,
       out.data_ptr(), B, H, G, L, length, D, scale)
    return out


@functools.cache
def bf16_gemm_in_hardware() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512_BF16 or AMX), so oneDNN's bf16 GEMM is the
    fast one: measured on an AMD EPYC with AVX512_BF16, 354 GF/s for bf16 against ~120 GF/s for fp32 at
    LFM2-350M's prefill shapes. Without it oneDNN emulates bf16 and the fp32 GEMM on upcast operands wins."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return bool(torch.backends.mkldnn.is_available() and cpu is not None
                and any(getattr(cpu, name, lambda: False)() for name in checks))


def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for many rows: oneDNN's fp32 GEMM where torch has it, else `F.linear` (MKL).

    Why not always `F.linear`: on the benchmark machine (AMD EPYC) oneDNN's fp32 GEMM is the faster of the two
    for LFM2-350M's prefill shapes (its share of a prefill: docs/BENCHMARKS.md, "Fast CPU inference path"),
    with the same fp32 result up to summation order.
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
