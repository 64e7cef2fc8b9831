"""The kernels other CPUs run: the plain C build (`LFM2_KERNEL_PORTABLE=1`, what any CPU but x86-64 / aarch64
gets, and aarch64's float kernels) loaded here and compared with float64 / torch, and the aarch64 NEON
build checked by `kernel_check.c` under qemu when a cross compiler and qemu are installed
(Debian: gcc-aarch64-linux-gnu qemu-user-static)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lfm2_train.inference import generate, native, quant
from lfm2_train.inference.fast import FastLFM2
from lfm2_train.model import LFM2ForCausalLM, get_preset

CHECK = Path(__file__).resolve().parent / "kernel_check.c"
has_cc = pytest.mark.skipif(native._compiler() is None, reason="no C compiler")


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The plain C build, loaded in place of the native one for the test; the native one afterwards."""
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "kernels"))
    monkeypatch.setenv(native.ENV_PORTABLE, "1")
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    monkeypatch.delenv(native.ENV_ISA, raising=False)
    native._library.cache_clear()
    if not native.available():
        pytest.skip(f"portable build: {native.unavailable_reason()}")
    yield
    monkeypatch.undo()
    native._library.cache_clear()


@has_cc
def test_portable_build_kernels_match_references(portable: None) -> None:
    assert native.build_arch() == "portable" and native.isas() == ("generic",)
    assert native.kernel_isa("avx512") == "generic"  # another architecture's level caps nothing
    g = torch.Generator().manual_seed(0)
    for N, K in [(1, 1), (9, 33), (17, 100), (40, 520)]:
        x, w = torch.randn(3, K, generator=g), torch.randn(N, K, generator=g) * 0.1
        mag = x.double().abs() @ w.double().abs().t()
        for weight in (w, w.bfloat16()):
            got = native.gemv(x, weight).double()
            assert bool(((got - x.double() @ weight.double().t()).abs() <= 4 * K**0.5 * 2**-23 * mag * 2 + 1e-30).all())
        q, scale = quant.quantize_rowwise(w)
        w8a8 = native.GemvW8A8(q, scale)
        assert w8a8.isa == "generic"
        torch.testing.assert_close(w8a8(x), quant.w8a8_matmul(x, q, scale), rtol=0, atol=0)
        native_q4, torch_q4 = quant.Q4Linear(w, use_native=True), quant.Q4Linear(w)
        assert torch.equal(native_q4.dequantize(), torch_q4.dequantize())
        torch.testing.assert_close(native_q4(x), torch_q4(x), rtol=1e-5, atol=1e-5)
    # fp16 scales in the subnormal range convert exactly
    packed, scales = quant.pack_q4_0(torch.full((8, 1, 32), 7, dtype=torch.int8), torch.full((8, 1), 3e-6))
    values, d = quant.unpack_q4_0(packed, scales)
    assert float(d[0, 0]) != 0 and abs(float(d[0, 0])) < 2**-14  # an fp16 subnormal
    assert torch.equal(native.dequantize_q4_0(packed, scales, 32, 0, 8), (values.float() * d[..., None]).flatten(1))


@has_cc
def test_portable_build_decodes_the_reference_tokens(portable: None) -> None:
    """Attention, RMSNorm and conv step of the plain C build, end to end: fp32 greedy tokens equal."""
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny").replace(initializer_range=0.2)).eval()
    prompts = [[5, 9, 3, 7, 1], [4], [8, 2, 6]]
    fast = FastLFM2.from_model(model, kernels="native")
    assert fast.step is not None  # the whole decode step in one call of the plain C build
    assert generate(fast, prompts, max_new_tokens=12).tokens == generate(model, prompts, max_new_tokens=12).tokens
    for mode in ("w8a8", "q4_0"):  # quantized projections and the fp16 KV cache through the step
        fused = FastLFM2.from_model(model, quant=mode, kernels="native")
        layered = FastLFM2.from_model(model, quant=mode, kernels="native", fused=False)
        assert generate(fused, prompts, max_new_tokens=8).tokens == generate(layered, prompts, max_new_tokens=8).tokens


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=300)


@pytest.mark.slow
@has_cc
def test_kernel_check_program_passes_natively(tmp_path: Path) -> None:
    """The C check compiled for this machine (x86: every ISA level the CPU has); the Python tests cover the
    same kernels here, so this mainly keeps the check program itself honest."""
    if not native.available():
        pytest.skip(f"native kernels: {native.unavailable_reason()}")
    exe = tmp_path / "check"
    flags = [f for f in native._cflags() if f not in ("-shared", "-fPIC")]  # an executable, not a library
    build = _run([str(native._compiler()), *flags, str(CHECK), *map(str, native.SOURCES), "-o", str(exe),
                  *native.LDLIBS])
    assert build.returncode == 0, build.stderr
    run = _run([str(exe), str(len(native.isas()))])
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-gcc") and shutil.which("qemu-aarch64-static")),
                    reason="no aarch64 cross compiler / qemu-aarch64-static")
def test_neon_kernels_under_qemu(tmp_path: Path) -> None:
    """The aarch64 build (NEON integer kernels with and without vdotq_s32, plain C float kernels)."""
    exe = tmp_path / "check-aarch64"
    build = _run(["aarch64-linux-gnu-gcc", "-O3", "-fopenmp", "-std=c11", "-Wall", "-Werror", str(CHECK),
                  *map(str, native.SOURCES), "-o", str(exe), "-lm"])
    assert build.returncode == 0, build.stderr
    run = _run(["qemu-aarch64-static", "-L", "/usr/aarch64-linux-gnu", str(exe), "2"])  # qemu's CPU has dotprod
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert run.stdout.startswith("build 1, features 8")  # the NEON build, dot-product extension seen
