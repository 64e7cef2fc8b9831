"""The matrix products of the fast CPU path: `gemv` (decode; native C kernel) and `gemm` (prefill; oneDNN).

`gemv` and `decode_attention` run `csrc/decode.c`, compiled on first use and cached; callers fall back to torch
ops without it.

Why a compiled kernel: batch-1 decode streams every weight once per token, and the matrix-vector product
torch reaches on CPU (MKL's GEMV) runs well below the memory bandwidth on some machines (see the C file and
docs/BENCHMARKS.md). The kernel is plain C with AVX2/FMA and OpenMP, built with the system C compiler
the way DeepSpeed builds its ops: once per source/flags/compiler, into a cache directory, atomically.
It is loaded with ctypes after torch, so it shares torch's OpenMP runtime and thread count.

Nothing here is required: without a C compiler, on a CPU without AVX2/FMA, or with `LFM2_NATIVE_KERNELS=0`,
`available()` is False, `unavailable_reason()` says why, and callers use torch ops (same results within
fp32 rounding).

Environment:
    LFM2_NATIVE_KERNELS=0      never build or load the kernels
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

SOURCE = Path(__file__).resolve().parent / "csrc" / "decode.c"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-fPIC", "-shared", "-std=c11")
LDLIBS = ("-lm",)
ENV_SWITCH = "LFM2_NATIVE_KERNELS"
ENV_CACHE = "LFM2_KERNEL_CACHE"

_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p
_SIGNATURES = {
    "lfm2_gemv_f32": [_PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_gemv_bf16": [_PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_gemv_i8": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_decode_attention_f32": [_PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 6, ctypes.c_float],
    "lfm2_decode_attention_bf16": [_PTR, _PTR, _PTR, _PTR, _PTR, *[_I64] * 6, ctypes.c_float],
    "lfm2_rms_norm_f32": [_PTR, _PTR, _PTR, _I64, _I64, ctypes.c_float],
    "lfm2_conv_step_f32": [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64],
    "lfm2_max_threads": [],
}


class NativeKernelError(RuntimeError):
    """The native kernels were required (`kernels=native`) but cannot be built or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "lfm2_train" / "kernels")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_reason() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the kernels are x86-64 AVX2 code; this machine is {platform.machine()}"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return f"the CPU lacks AVX2/FMA (torch reports capability {capability})"
    return None


def _build(cc: str) -> Path:
    """Compile `SOURCE` once per (source, flags, compiler); concurrent builders race harmlessly."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(CFLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"lfm2_decode-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    try:
        cmd = [cc, *CFLAGS, str(SOURCE), "-o", tmp, *LDLIBS]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise OSError(f"`{cc} {' '.join(CFLAGS)} {SOURCE.name}` failed:\n{proc.stderr.strip()[-2000:]}")
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
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
        lib.lfm2_max_threads.restype = ctypes.c_int
    except (OSError, AttributeError) as err:
        _reason = f"building or loading {SOURCE.name} failed: {err}"
        return None
    return lib


def available() -> bool:
    """True when the kernels are built and loaded (builds them on the first call, a second or two)."""
    lib = _library()
    if lib is None:
        log.info("native CPU kernels unavailable (%s); using torch ops", _reason)
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


_WEIGHT_FN = {torch.float32: "lfm2_gemv_f32", torch.bfloat16: "lfm2_gemv_bf16", torch.int8: "lfm2_gemv_i8"}


class Gemv:
    """A weight checked once for the native matrix-vector kernel; each call then only runs the product.

    `weight` (N, K) contiguous fp32, bf16 or int8 (int8 requires an fp32 `scale` of shape (N,)). Calling it
    with x (M, K) returns `x @ weight.T` (times `scale` per output for int8) as (M, N) fp32, accumulated in
    fp32; x is converted to contiguous fp32 first (it is small). Decode calls this ~60 times per token, so
    the per-call work is kept to a shape check.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor | None = None) -> None:
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
        self._fn = getattr(lib, _WEIGHT_FN[weight.dtype])
        self._operands = (weight.data_ptr(),) if scale is None else (weight.data_ptr(), scale.data_ptr())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.K:
            raise ValueError(f"gemv x must be (M, {self.K}), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            x = x.float()
        if not x.is_contiguous():
            x = x.contiguous()
        M = x.shape[0]
        y = torch.empty(M, self.N, dtype=torch.float32)
        if M == 0 or self.N == 0:
            return y.zero_()
        self._fn(x.data_ptr(), *self._operands, y.data_ptr(), M, self.N, self.K)
        return y


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


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of one query token per row over the first `length` cached positions.

    q (B, H, D); keys / values: the whole preallocated cache (B, G, L, D), contiguous, fp32 or bf16;
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
    if keys.dtype != values.dtype or keys.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"decode_attention cache dtype must be fp32 or bf16, got {keys.dtype} / {values.dtype}")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("decode_attention needs contiguous caches (pass the preallocated buffers, not slices)")
    q = q.to(torch.float32).contiguous()
    mask = None
    if valid is not None:
        if valid.shape != (B, length):
            raise ValueError(f"decode_attention valid must be (B, length) = ({B}, {length}), got {tuple(valid.shape)}")
        mask = valid.to(torch.uint8).contiguous()
    out = torch.empty(B, H, D, dtype=torch.float32)
    fn = lib.lfm2_decode_attention_f32 if keys.dtype == torch.float32 else lib.lfm2_decode_attention_bf16
    fn(q.data_ptr(), keys.data_ptr(), values.data_ptr(), mask.data_ptr() if mask is not None else None,
       out.data_ptr(), B, H, G, L, length, D, scale)
    return out


def gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for many rows: oneDNN's fp32 GEMM where torch has it, else `F.linear` (MKL).

    Why not always `F.linear`: on the benchmark machine (AMD EPYC, AVX2) oneDNN's fp32 GEMM ran 10-40%
    faster than MKL's for every prefill shape of LFM2-350M (docs/BENCHMARKS.md), with the same fp32 result
    up to summation order.
    """
    if x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "")
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)
