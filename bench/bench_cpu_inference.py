"""CPU inference benchmark: our `LFM2ForCausalLM` vs `transformers`' `Lfm2ForCausalLM`, same weights.

Batch 1, random weights. Both models are timed the same way, interleaved (the order alternates every
repetition) so that background load hits both sides alike; medians over `--reps`:

- prefill: one forward over a T-token prompt with a fresh cache, logits for the last position only
  (ours: `model(ids, cache=model.new_cache(1, T + N), logits_to_keep=1)`, cache allocation included;
  transformers: `model(ids, use_cache=True, logits_to_keep=1)`, which builds its DynamicCache inside);
  tokens/s = T / time;
- decode: after that prefill, a manual greedy loop of N single-token forwards reusing the cache;
  tokens/s = N / time.

In fp32 the greedy tokens of both models must agree for the first `--check-steps` decode steps (an
AssertionError otherwise); in bf16 a divergence is only reported.

    PYTHONPATH=. python bench/bench_cpu_inference.py                 # full run (several minutes)
    PYTHONPATH=. python bench/bench_cpu_inference.py --quick         # tiny preset smoke test (seconds)
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lfm2_train.model import LFM2ForCausalLM, get_preset

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_OUT = Path("bench/results/cpu_inference.json")
QUICK_OUT = Path("bench/results/cpu_inference_quick.json")

# One run: (prefill seconds, decode seconds, greedy tokens (1 + N), last-position prefill logits).
RunResult = tuple[float, float, list[int], torch.Tensor]


# ---------------------------------------------------------------------------------------------- machine
def machine_info(threads: int) -> dict[str, object]:
    import transformers

    cpu = family = model = None
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and cpu is None:
                cpu = value
            elif key == "cpu family" and family is None:
                family = value
            elif key == "model" and model is None:
                model = value
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    known = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "asimddp")
    isa = [f for f in known if f in flags]
    return {
        "cpu": cpu or platform.processor() or "unknown",
        "cpu_family_model": f"{family}/{model}" if family else None,
        "isa": isa,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------------- runners
@torch.inference_mode()
def run_ours(model: LFM2ForCausalLM, ids: torch.Tensor, new_tokens: int) -> RunResult:
    T = ids.shape[1]
    t0 = time.perf_counter()
    cache = model.new_cache(1, T + new_tokens)
    logits = model(ids, cache=cache, logits_to_keep=1)
    t1 = time.perf_counter()
    prefill_logits = logits[0, -1].float().clone()
    nxt = logits[:, -1].argmax(-1)
    tokens = [nxt]
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(nxt[:, None], cache=cache)
        nxt = logits[:, -1].argmax(-1)
        tokens.append(nxt)
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, torch.cat(tokens).tolist(), prefill_logits


def hf_cache_names(model: torch.nn.Module) -> tuple[str, str]:
    """(forward kwarg, output attribute) for the cache: `cache` in transformers >= 5.2x, else `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return ("cache", "cache") if "cache" in params else ("past_key_values", "past_key_values")


@torch.inference_mode()
def run_hf(model: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> RunResult:
    kwarg, attr = hf_cache_names(model)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    prefill_logits = out.logits[0, -1].float().clone()
    cache = getattr(out, attr)
    nxt = out.logits[:, -1].argmax(-1)
    tokens = [nxt]
    t2 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt[:, None], use_cache=True, **{kwarg: cache})
        cache = getattr(out, attr)
        nxt = out.logits[:, -1].argmax(-1)
        tokens.append(nxt)
    t3 = time.perf_counter()
    return t1 - t0, t3 - t2, torch.cat(tokens).tolist(), prefill_logits


# ---------------------------------------------------------------------------------------------- bench
def load_models(preset: str, dtypes: list[str], tmpdir: str) -> dict[str, dict[str, torch.nn.Module]]:
    """Random fp32 weights saved once; ours and transformers' both load that directory in each dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset(preset)).save_pretrained(tmpdir)
    models: dict[str, dict[str, torch.nn.Module]] = {}
    for name in dtypes:
        dtype = DTYPES[name]
        ours = LFM2ForCausalLM.from_pretrained(tmpdir, dtype=dtype).eval()
        hf = AutoModelForCausalLM.from_pretrained(tmpdir, dtype=dtype).eval()
        models[name] = {"ours": ours, "hf": hf}
    return models


def bench(args: argparse.Namespace) -> dict[str, object]:
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    runners: dict[str, Callable[..., RunResult]] = {"ours": run_ours, "hf": run_hf}
    with tempfile.TemporaryDirectory() as tmpdir:
        t_load = time.perf_counter()
        models = load_models(args.preset, args.dtypes, tmpdir)
        print(f"loaded {args.preset} ({len(args.dtypes)} dtypes x 2 models) in {time.perf_counter() - t_load:.1f}s",
              flush=True)
    any_hf = next(iter(models.values()))["hf"]
    info["hf_attn_implementation"] = getattr(any_hf.config, "_attn_implementation", None)
    info["hf_cache_kwarg"] = hf_cache_names(any_hf)[0]
    vocab = next(iter(models.values()))["ours"].config.vocab_size

    gen = torch.Generator().manual_seed(1234)
    prompts = {T: torch.randint(0, vocab, (1, T), generator=gen) for T in args.sizes}

    # Warm-up: a short prompt and a few decode steps per model (kernel selection, allocator).
    warm = torch.randint(0, vocab, (1, min(64, min(args.sizes))), generator=gen)
    for name in args.dtypes:
        for impl in ("ours", "hf"):
            runners[impl](models[name][impl], warm, min(4, args.new_tokens))

    raw: dict[tuple[str, int, str], list[RunResult]] = {}
    slot = 0
    for rep in range(args.reps):
        for name in args.dtypes:
            for T in args.sizes:
                order = ("ours", "hf") if slot % 2 == 0 else ("hf", "ours")
                slot += 1
                for impl in order:
                    res = runners[impl](models[name][impl], prompts[T], args.new_tokens)
                    if raw.get((name, T, impl)):  # keep the first run's tokens/logits only
                        res = (res[0], res[1], [], torch.empty(0))
                    raw.setdefault((name, T, impl), []).append(res)
                    print(f"rep {rep + 1}/{args.reps} {name:4s} T={T:5d} {impl:4s} prefill {res[0]:7.3f}s "
                          f"({T / res[0]:8.1f} tok/s)  decode {res[1]:7.3f}s "
                          f"({args.new_tokens / res[1]:6.1f} tok/s)", flush=True)

    rows = []
    for name in args.dtypes:
        for T in args.sizes:
            row: dict[str, object] = {"dtype": name, "prompt": T, "new_tokens": args.new_tokens}
            for impl in ("ours", "hf"):
                runs = raw[(name, T, impl)]
                pre, dec = [r[0] for r in runs], [r[1] for r in runs]
                row[f"{impl}_prefill_s"], row[f"{impl}_decode_s"] = pre, dec
                row[f"{impl}_prefill_tok_s"] = T / statistics.median(pre)
                row[f"{impl}_decode_tok_s"] = args.new_tokens / statistics.median(dec)
            row["prefill_ratio"] = row["ours_prefill_tok_s"] / row["hf_prefill_tok_s"]
            row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
            # Paired: ours and HF of the same repetition ran back to back, so their ratio cancels slow load
            # swings that the ratio of medians does not (a busy phase can hit ours in one rep, HF in another).
            for phase, idx in (("prefill", 0), ("decode", 1)):
                pairs = zip(raw[(name, T, "ours")], raw[(name, T, "hf")], strict=True)
                row[f"{phase}_ratio_paired"] = statistics.median(h[idx] / o[idx] for o, h in pairs)

            ours_first, hf_first = raw[(name, T, "ours")][0], raw[(name, T, "hf")][0]
            n = min(args.check_steps + 1, len(ours_first[2]))
            agree = sum(1 for a, b in zip(ours_first[2][:n], hf_first[2][:n], strict=True) if a == b)
            first_diff = next((i for i in range(n) if ours_first[2][i] != hf_first[2][i]), None)
            row["tokens_checked"], row["tokens_agree"], row["first_divergence"] = n, agree, first_diff
            row["prefill_logits_max_abs_diff"] = float((ours_first[3] - hf_first[3]).abs().max())
            if first_diff is not None:
                msg = (f"{name} T={T}: greedy tokens diverge at step {first_diff} of {n} "
                       f"(prefill logits max |diff| {row['prefill_logits_max_abs_diff']:.3g})")
                if name == "fp32":
                    raise AssertionError(msg)
                print(f"WARNING: {msg}", flush=True)
            rows.append(row)
    return {"machine": info, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows}


def markdown(result: dict[str, object]) -> str:
    m = result["machine"]
    a = result["args"]
    lines = [
        f"Machine: {m['cpu']} (family/model {m['cpu_family_model']}, ISA {', '.join(m['isa']) or '?'}), "
        f"{m['logical_cpus']} logical CPUs, {m['threads']} torch threads; torch {m['torch']} "
        f"({m['torch_cpu_capability']}), transformers {m['transformers']} "
        f"(attn {m['hf_attn_implementation']}); {m['date']}.",
        f"Preset {a['preset']}, batch 1, random weights, {a['new_tokens']} greedy decode tokens, "
        f"median of {a['reps']} interleaved reps. Ratio = ours / transformers tok/s (> 1: ours faster), of the "
        "medians; paired = median over reps of the ratio within a rep (ours and HF back to back).",
        "",
        "| dtype | prompt | ours prefill tok/s | HF prefill tok/s | ratio | paired | ours decode tok/s "
        "| HF decode tok/s | ratio | paired | greedy agree |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['dtype']} | {r['prompt']} | {r['ours_prefill_tok_s']:.1f} | {r['hf_prefill_tok_s']:.1f} "
            f"| {r['prefill_ratio']:.2f} | {r['prefill_ratio_paired']:.2f} | {r['ours_decode_tok_s']:.2f} "
            f"| {r['hf_decode_tok_s']:.2f} | {r['decode_ratio']:.2f} | {r['decode_ratio_paired']:.2f} "
            f"| {r['tokens_agree']}/{r['tokens_checked']} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="lfm2-350m")
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 2048], help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps after the prefill")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    p.add_argument("--reps", type=int, default=3, help="repetitions per configuration (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--check-steps", type=int, default=16, help="decode steps whose greedy tokens must agree")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON results file (default {DEFAULT_OUT}; {QUICK_OUT} with --quick)")
    p.add_argument("--quick", action="store_true", help="smoke test: tiny preset, short prompts, 1 rep")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.sizes, args.new_tokens, args.reps = "tiny", [16, 48], 8, 1
        args.check_steps = min(args.check_steps, args.new_tokens)
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.new_tokens < 1 or args.reps < 1 or min(args.sizes) < 1:
        p.error("--new-tokens, --reps and --sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    result = bench(args)
    table = markdown(result)
    print()
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
