"""Fast CPU inference path (`FastLFM2`) vs `transformers`' `Lfm2ForCausalLM`, same weights and dtype; plus the
memory-bandwidth bound of decode and the architecture claim (LFM2 vs an all-attention model of similar size).

Batch 1, random weights saved once and loaded by every side. Modes (`--modes`): fp32 and bf16 (each against
transformers in the same dtype) and the quantized modes of the fast path, int8 (weight-only), w8a8 and q4_0
(fp32 activations; no transformers counterpart); `MODE@avx2` caps that mode's kernels at AVX2
(LFM2_KERNEL_ISA), to compare instruction sets side by side. Every mode is built first, then per repetition
and context T all of them run one after another, in an order that rotates per repetition: prefill = one pass
over a T-token prompt into a fresh cache/state (logits of the last position; tokens/s = T / time); decode =
N greedy single-token steps after it. `--kernels` picks the fast path's decode kernels (`auto`: the native
kernels of `inference/native.py` when they build here; `torch`: torch ops, to measure what they add).

Bandwidth bound: decode only reads weights, so the limit of a mode = read bandwidth / weight bytes read per
token, with the read bandwidth measured here as `src.amax()` over 512 MiB (best of 5; the fastest read-only
reduction torch has here); "fast / limit" is the fraction of it that decode reaches. Copy bandwidth
(`dst.copy_(src)`, read + write bytes counted, STREAM's convention) is reported too, and was the denominator
of earlier runs: a copy also pays for write-allocate traffic, so it reads lower (18 against 35-40 GB/s on
the benchmark machine) and "fast / limit" against it can exceed 100%.

Greedy agreement (`--agree-model DIR`, instead of the speed runs): on a trained checkpoint, each mode decodes
the fp32 fast path's greedy streams teacher-forced and counts the steps whose argmax matches.

Architecture (`--arch`): each model runs in its own subprocess through the fast path (so both get the same
kernels): LFM2-350M vs the Qwen3-0.6B shape with LFM2's 65,536-token vocabulary (28 layers, all GQA attention
with QK-norm, d 1024, 16/8 heads of 128, SwiGLU 3072, tied; 506M parameters) and the same shape cut to 18
layers (350M parameters, matching LFM2-350M). Reported: decode tok/s after a T-token prompt, KV/conv state
bytes at T + N tokens, and the peak RSS of inference (VmHWM reset after building the model).

    PYTHONPATH=. python bench/bench_fast_decode.py            # default: every mode at 2048, arch
    PYTHONPATH=. python bench/bench_fast_decode.py --quick    # tiny preset smoke test (seconds)
    PYTHONPATH=. python bench/bench_fast_decode.py --no-arch --no-hf --contexts 256 \
        --modes fp32 bf16 bf16@avx2 w8a8 w8a8@avx2 q4_0 q4_0@avx2 int8 --reps 3   # kernels side by side
    PYTHONPATH=. python bench/bench_fast_decode.py --agree-model outputs/chain-tiny/13-export/model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_inference import machine_info, run_hf  # noqa: E402

from lfm2_train.inference import native, pages  # noqa: E402
from lfm2_train.inference.fast import FastLFM2  # noqa: E402
from lfm2_train.inference.quant import QUANT_MODES  # noqa: E402
from lfm2_train.model import ATTENTION, LFM2Config, LFM2ForCausalLM, get_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = (*DTYPES, *QUANT_MODES)
AGREE_PROMPTS = ["12 + 7 =", "The fox jumps over", "def add(a, b):", "Once upon a time", "Question: what is"]
DEFAULT_OUT = Path("bench/results/fast_decode.json")
QUICK_OUT = Path("bench/results/fast_decode_quick.json")
RunResult = tuple[float, float, list[int]]


# ---------------------------------------------------------------------------------------------- pieces
def read_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """GB/s of `src.amax()` over `mib` MiB of fp32 (best of `reps`): a read-only stream, from huge-page-advised
    memory as the fast path keeps its weights (`inference.pages`; 4 KiB pages read measurably slower)."""
    src = pages.empty((mib * 2**20 // 4,), torch.float32).fill_(1.0)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        src.amax()
        best = min(best, time.perf_counter() - t0)
    return src.numel() * 4 / best / 1e9


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """GB/s of `dst.copy_(src)` counting read + write bytes (best of `reps`)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.zeros_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


@torch.inference_mode()
def run_fast(fast: FastLFM2, ids: torch.Tensor, new_tokens: int) -> RunResult:
    T = ids.shape[1]
    t0 = time.perf_counter()
    state = fast.new_state(1, T + new_tokens + 1)
    logits = fast.prefill(state, ids)
    t1 = time.perf_counter()
    nxt = logits.argmax(-1)
    tokens = [int(nxt)]
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        nxt = fast.decode(state, nxt).argmax(-1)
        tokens.append(int(nxt))
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, tokens


def hf_runner(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> RunResult:
    pre, dec, tokens, _ = run_hf(model, ids, new_tokens)
    return pre, dec, tokens


def qwen3_shape(num_layers: int, vocab: int = 65536) -> LFM2Config:
    """All-attention Qwen3-0.6B shape in our own code: every layer GQA with QK-norm, no short convs."""
    return LFM2Config(vocab_size=vocab, hidden_size=1024, num_hidden_layers=num_layers,
                      layer_types=[ATTENTION] * num_layers, num_attention_heads=16, num_key_value_heads=8,
                      head_dim=128, intermediate_size=3072, block_auto_adjust_ff_dim=False,
                      max_position_embeddings=40960)


ARCHS = {"lfm2-350m": lambda: get_preset("lfm2-350m"), "qwen3-0.6b-shape": lambda: qwen3_shape(28),
         "qwen3-shape-18L": lambda: qwen3_shape(18)}


# ---------------------------------------------------------------------------------------------- arch worker
def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def arch_worker(arch: str, dtype: str, context: int, new_tokens: int, threads: int, kernels: str
                ) -> dict[str, object]:
    """Runs in a subprocess: build `arch` (random init), fast path in `dtype`, prefill + greedy decode."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = LFM2ForCausalLM(ARCHS[arch]()).eval()
    params = model.num_parameters()
    fast = FastLFM2.from_model(model, dtype=DTYPES[dtype], kernels=kernels)
    del model
    gc.collect()
    try:  # reset the peak-RSS mark: what follows is inference only (weights resident + state + activations)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    ids = torch.randint(0, fast.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(1))
    state = fast.new_state(1, context + new_tokens + 1)
    state_bytes = state.nbytes
    del state
    pre, dec, _ = run_fast(fast, ids, new_tokens)
    return {"arch": arch, "params": params, "dtype": dtype, "context": context, "new_tokens": new_tokens,
            "prefill_tok_s": context / pre, "decode_tok_s": new_tokens / dec, "state_bytes": state_bytes,
            "weight_bytes": fast.weight_bytes_per_token, "peak_rss_mib": _vm_hwm_mib()}


def run_arch(args: argparse.Namespace, archs: list[str]) -> list[dict[str, object]]:
    runs: dict[str, list[dict[str, object]]] = {a: [] for a in archs}
    for rep in range(args.reps):
        for arch in (archs if rep % 2 == 0 else archs[::-1]):
            cmd = [sys.executable, __file__, "--arch-worker", arch, "--arch-dtype", args.arch_dtype,
                   "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                   "--contexts", str(args.contexts[-1]), "--kernels", args.kernels]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
            res = json.loads(out.stdout.strip().splitlines()[-1])
            runs[arch].append(res)
            print(f"arch rep {rep + 1}/{args.reps} {arch:18s} {res['params'] / 1e6:6.1f}M decode "
                  f"{res['decode_tok_s']:6.2f} tok/s state {res['state_bytes'] / 2**20:7.1f} MiB "
                  f"peak RSS {res['peak_rss_mib']:7.0f} MiB", flush=True)
    rows = []
    for rs in runs.values():
        row = dict(rs[0])
        for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mib"):
            row[key] = statistics.median(r[key] for r in rs)  # type: ignore[misc]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- main bench
def parse_mode(spec: str) -> tuple[str, str | None]:
    """`w8a8` or `w8a8@avx2` -> (mode, ISA cap or None)."""
    mode, _, isa = spec.partition("@")
    if mode not in MODES or (isa and isa not in native.ALL_ISAS):
        raise argparse.ArgumentTypeError(f"mode must be one of {MODES}, optionally @{'|'.join(native.ALL_ISAS)}; "
                                         f"got {spec!r}")
    return mode, isa or None


def build_fast(model_dir: str, spec: str, kernels: str) -> FastLFM2:
    """The fast path of the saved model in mode `spec` (float modes load that dtype; quantized modes fp32)."""
    mode, isa = parse_mode(spec)
    dtype = DTYPES.get(mode, torch.float32)
    ours = LFM2ForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    with torch.no_grad():  # private memory: the fp32 fast path shares these tensors, which from_pretrained
        for p in ours.parameters():  # maps from the file (page cache, dropped and re-read under memory pressure)
            p.data = p.data.clone()
    before = os.environ.get(native.ENV_ISA)
    if isa:
        os.environ[native.ENV_ISA] = isa  # read when each kernel object is created
    try:
        return FastLFM2.from_model(ours, quant=None if mode in DTYPES else mode, kernels=kernels)
    finally:
        if before is None:
            os.environ.pop(native.ENV_ISA, None)
        else:
            os.environ[native.ENV_ISA] = before


def kernel_isas(fast: FastLFM2) -> str:
    """The ISA variants the decode projections of `fast` run (e.g. "avx512"), or "torch"."""
    found = set()
    for lin in [fast.head, *(lin for layer in fast.layers for lin in layer.linears())]:
        gemv = getattr(lin, "gemv", None)
        found.add(getattr(gemv, "isa", "avx2") if gemv is not None else "torch")
    return "+".join(sorted(found))


def bench(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    info["loadavg_start"] = os.getloadavg()
    info["kernels"] = args.kernels
    info["native_kernels"] = "available" if native.available() else f"unavailable: {native.unavailable_reason()}"
    if native.available():
        info["kernel_isas"] = list(native.isas())
    print(f"kernels={args.kernels}; native kernels {info['native_kernels']}", flush=True)
    copy_bw = copy_bandwidth()
    bw = read_bandwidth()
    print(f"read bandwidth {bw:.1f} GB/s; copy bandwidth {copy_bw:.1f} GB/s (read + write)", flush=True)
    from transformers import AutoModelForCausalLM

    gen = torch.Generator().manual_seed(1234)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        torch.manual_seed(0)
        LFM2ForCausalLM(get_preset(args.preset)).save_pretrained(tmpdir)
        vocab = get_preset(args.preset).vocab_size
        prompts = {T: torch.randint(0, vocab, (1, T), generator=gen) for T in args.contexts}
        # Every mode is built first and the runs interleave (the order rotates per repetition), so that
        # background load hits all modes alike and their ratios are measured side by side.
        impls: dict[str, Callable[[torch.Tensor, int], RunResult]] = {}
        fasts: dict[str, FastLFM2] = {}
        for spec in args.modes:
            fasts[spec] = fast = build_fast(tmpdir, spec, args.kernels)
            impls[spec] = lambda ids, n, f=fast: run_fast(f, ids, n)
            mode = parse_mode(spec)[0]
            if mode in DTYPES and args.hf and f"hf-{mode}" not in impls:
                hf = AutoModelForCausalLM.from_pretrained(tmpdir, dtype=DTYPES[mode]).eval()
                impls[f"hf-{mode}"] = lambda ids, n, m=hf: hf_runner(m, ids, n)
            gc.collect()
        warm = prompts[args.contexts[0]][:, :32]
        for run in impls.values():
            run(warm, 2)
        raw: dict[tuple[int, str], list[RunResult]] = {}
        names = list(impls)
        for rep in range(args.reps):
            for k, T in enumerate(args.contexts):
                shift = (rep + k) % len(names)
                for impl in names[shift:] + names[:shift]:
                    res = impls[impl](prompts[T], args.new_tokens)
                    raw.setdefault((T, impl), []).append(res)
                    print(f"rep {rep + 1}/{args.reps} T={T:5d} {impl:12s} prefill {res[0]:7.2f}s "
                          f"({T / res[0]:7.1f} tok/s) decode {res[1]:6.2f}s "
                          f"({args.new_tokens / res[1]:6.2f} tok/s)", flush=True)
        for spec, fast in fasts.items():
            mode = parse_mode(spec)[0]
            hf_name = f"hf-{mode}" if f"hf-{mode}" in impls else None
            for T in args.contexts:
                row: dict[str, object] = {"mode": spec, "context": T, "new_tokens": args.new_tokens,
                                          "kernel_isa": kernel_isas(fast),
                                          "weight_bytes_per_token": fast.weight_bytes_per_token}
                for label, impl in (("fast", spec), ("hf", hf_name)):
                    if impl is None:
                        continue
                    runs = raw[(T, impl)]
                    row[f"{label}_prefill_s"] = [r[0] for r in runs]
                    row[f"{label}_decode_s"] = [r[1] for r in runs]
                    row[f"{label}_prefill_tok_s"] = T / statistics.median(r[0] for r in runs)
                    row[f"{label}_decode_tok_s"] = args.new_tokens / statistics.median(r[1] for r in runs)
                limit = bw * 1e9 / fast.weight_bytes_per_token
                row["bandwidth_limit_tok_s"] = limit
                row["fast_decode_frac_of_limit"] = row["fast_decode_tok_s"] / limit  # type: ignore[operator]
                if hf_name is not None:
                    row["prefill_ratio"] = row["fast_prefill_tok_s"] / row["hf_prefill_tok_s"]  # type: ignore
                    row["decode_ratio"] = row["fast_decode_tok_s"] / row["hf_decode_tok_s"]  # type: ignore
                    pairs = list(zip(raw[(T, spec)], raw[(T, hf_name)], strict=True))
                    row["prefill_ratio_paired"] = statistics.median(h[0] / f[0] for f, h in pairs)
                    row["decode_ratio_paired"] = statistics.median(h[1] / f[1] for f, h in pairs)
                    a, b = raw[(T, spec)][0][2], raw[(T, hf_name)][0][2]
                    row["greedy_agree"] = f"{sum(x == y for x, y in zip(a, b, strict=True))}/{len(a)}"
                rows.append(row)
        del fasts, impls
        gc.collect()
    arch_rows = run_arch(args, list(ARCHS)) if args.arch else []
    info["loadavg_end"] = os.getloadavg()
    return {"machine": info, "read_bandwidth_gb_s": bw, "copy_bandwidth_gb_s": copy_bw,
            "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "arch": arch_rows}


# ---------------------------------------------------------------------------------------------- agreement
@torch.inference_mode()
def greedy_agreement(model_dir: Path, specs: list[str], steps: int, prompts: list[str], kernels: str
                     ) -> dict[str, object]:
    """Teacher-forced greedy agreement of each mode with fp32 on a trained checkpoint.

    The fp32 fast path decodes `steps` greedy tokens after each prompt; every other mode decodes the same
    streams (fed the fp32 tokens, so one disagreement does not derail the rest) and counts the steps whose
    argmax equals fp32's.
    """
    from lfm2_train.tokenizer import LFM2Tokenizer

    tok = LFM2Tokenizer.from_pretrained(model_dir)
    ids = [tok.encode(p) for p in prompts]

    def stream(fast: FastLFM2, prompt: list[int], forced: list[int] | None) -> list[int]:
        state = fast.new_state(1, len(prompt) + steps + 1)
        logits = fast.prefill(state, torch.tensor([prompt]))
        out: list[int] = []
        for t in range(steps):
            out.append(int(logits.argmax(-1)))
            logits = fast.decode(state, torch.tensor([forced[t] if forced is not None else out[-1]]))
        return out

    reference = build_fast(str(model_dir), "fp32", kernels)
    streams = [stream(reference, p, None) for p in ids]
    result: dict[str, object] = {"model": str(model_dir), "steps": steps, "prompts": prompts, "modes": {}}
    for spec in specs:
        fast = build_fast(str(model_dir), spec, kernels)
        agree = sum(a == b for p, s in zip(ids, streams) for a, b in zip(stream(fast, p, s), s))
        result["modes"][spec] = {"agree": agree, "total": steps * len(ids)}  # type: ignore[index]
        print(f"{spec:10s} greedy agreement with fp32: {agree}/{steps * len(ids)} "
              f"({agree / (steps * len(ids)):.1%})", flush=True)
    return result


def markdown(result: dict[str, object]) -> str:
    m = result["machine"]
    bw, copy_bw = result["read_bandwidth_gb_s"], result["copy_bandwidth_gb_s"]
    lines = [
        f"{m['cpu']} ({', '.join(m['isa'])}), {m['logical_cpus']} logical CPUs, {m['threads']} threads; torch "
        f"{m['torch']}, transformers {m['transformers']}; {m['date']}; load average at start "
        f"{m['loadavg_start'][0]:.2f}, at end {m['loadavg_end'][0]:.2f}. Read bandwidth {bw:.1f} GB/s (copy "
        f"{copy_bw:.1f}). "
        f"Fast path kernels: {m['kernels']} (native {m['native_kernels']}).",
        "",
        "| mode | kernels | context | fast prefill tok/s | HF prefill tok/s | ratio (paired) | fast decode tok/s "
        "| HF decode tok/s | ratio (paired) | weights GB/token | bandwidth limit tok/s | fast / limit "
        "| greedy agree |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        hf = "hf_prefill_tok_s" in r
        lines.append(
            f"| {r['mode']} | {r['kernel_isa']} | {r['context']} | {r['fast_prefill_tok_s']:.1f} | "
            + (f"{r['hf_prefill_tok_s']:.1f} | {r['prefill_ratio']:.2f} ({r['prefill_ratio_paired']:.2f}) | "
               if hf else "– | – | ")
            + f"{r['fast_decode_tok_s']:.2f} | "
            + (f"{r['hf_decode_tok_s']:.2f} | {r['decode_ratio']:.2f} ({r['decode_ratio_paired']:.2f}) | "
               if hf else "– | – | ")
            + f"{r['weight_bytes_per_token'] / 1e9:.3f} | {r['bandwidth_limit_tok_s']:.1f} | "
            f"{r['fast_decode_frac_of_limit']:.0%} | {r.get('greedy_agree', '–')} |"
        )
    if result["arch"]:
        lines += ["", "| model | params | decode tok/s | prefill tok/s | KV/conv state MiB | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in result["arch"]:
            lines.append(f"| {r['arch']} ({r['dtype']}, context {r['context']}) | {r['params'] / 1e6:.1f}M "
                         f"| {r['decode_tok_s']:.2f} | {r['prefill_tok_s']:.1f} | {r['state_bytes'] / 2**20:.1f} "
                         f"| {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lfm2-350m")
    p.add_argument("--contexts", type=int, nargs="+", default=[2048], help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy decode steps after the prefill")
    p.add_argument("--modes", nargs="+", default=None, metavar="MODE[@ISA]",
                   help=f"modes to run, of {MODES}, optionally @avx2 / @avx512 (default: all)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                   help="float modes when --modes is not given")
    p.add_argument("--no-int8", dest="int8", action="store_false",
                   help="without --modes: skip the quantized modes (int8, w8a8, q4_0)")
    p.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers (fast path modes only)")
    p.add_argument("--agree-model", type=Path, default=None,
                   help="a trained checkpoint: measure greedy agreement of each mode with fp32, no timing")
    p.add_argument("--agree-steps", type=int, default=64)
    p.add_argument("--no-arch", dest="arch", action="store_false", help="skip the architecture comparison")
    p.add_argument("--arch-dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reps", type=int, default=1, help="repetitions (medians reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kernels", choices=["auto", "native", "torch"], default="auto",
                   help="the fast path's decode kernels (FastLFM2.from_model(kernels=...))")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="smoke test: tiny preset, short prompts, no arch")
    p.add_argument("--arch-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.modes is None:
        args.modes = list(args.dtypes) + (list(QUANT_MODES) if args.int8 else [])
    for spec in args.modes:
        try:
            parse_mode(spec)
        except argparse.ArgumentTypeError as err:
            p.error(str(err))
    if args.quick:
        args.preset, args.contexts, args.new_tokens, args.arch = "tiny", [48], 8, False
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.new_tokens < 1 or args.reps < 1 or min(args.contexts) < 1:
        p.error("--new-tokens, --reps and --contexts must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, object] | None:
    args = parse_args(argv)
    if args.arch_worker:
        print(json.dumps(arch_worker(args.arch_worker, args.arch_dtype, args.contexts[-1], args.new_tokens,
                                     args.threads, args.kernels)))
        return None
    t0 = time.perf_counter()
    if args.agree_model is not None:
        torch.set_num_threads(args.threads)
        specs = [s for s in args.modes if s != "fp32"]
        result = greedy_agreement(args.agree_model, specs, args.agree_steps, AGREE_PROMPTS, args.kernels)
        out = args.out.with_name("fast_decode_agreement.json") if args.out == DEFAULT_OUT else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
        return result
    result = bench(args)
    result["wall_s"] = time.perf_counter() - t0
    print()
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
