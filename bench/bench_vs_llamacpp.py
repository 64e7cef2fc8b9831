"""Our fast CPU path (`FastLFM2`) vs llama.cpp (llama-cpp-python) on the same weights, mode by mode.

LFM2 is deployed mostly through llama.cpp, so that is the engine a CPU decode path has to be measured
against. One checkpoint (default: the `lfm2-350m` preset, random init, seeded; or `--model DIR`) is exported
with our GGUF exporter (`lfm2_train.export.export_gguf`) to every llama.cpp type a mode needs, and both
engines run batch 1 with the same thread count (`--threads`):

| mode      | ours (`FastLFM2.from_model`)                          | llama.cpp file                   |
|-----------|-------------------------------------------------------|----------------------------------|
| f32       | `dtype=torch.float32`                                 | f32                              |
| bf16      | `dtype=torch.bfloat16`                                | bf16 (*)                         |
| int8      | weight-only int8 (`quant="int8"`, or `int8=True`)     | q8_0                             |
| w8a8      | int8 weights and activations (`quant="w8a8"`)         | q8_0                             |
| q4_0      | 4-bit blocks, 8-bit LM head (`quant="q4_0"`)          | q4_0, q8_0 output (`token_embd`) |
| q4_0-pure | 4-bit everywhere (`quant="q4_0", head_quant="q4_0"`)  | q4_0 throughout (`--pure`)       |

(*) If the llama.cpp build cannot load a bf16 file, the row becomes f16 vs `dtype=torch.float16`.

A mode whose `quant` value the installed fast path does not accept is reported as not available and skipped.

Per mode and prompt length T: prefill = a fresh state / cache and one pass over T random tokens (ours:
`new_state` + `prefill`; llama.cpp: `reset()` + `eval(prompt)`), tokens/s = T / time; decode = `--decode`
single-token steps with greedy argmax over the last logits, tokens/s = steps / time. Each engine runs in its
own worker process, loaded once per mode and warmed up once; the parent then has them run strictly
alternating (ours, theirs, ours, theirs, ...; one computes while the other waits on its pipe) for `--reps`
repetitions; tok/s are medians, ratios both of the medians and paired (`add_ratios`). llama.cpp runs as
llama-cpp-python users get it by default:
`n_batch` = `n_ubatch` = 512 (the prompt goes through in 512-token batches, as our `prefill_chunk` of 512;
llama-cli's default `n_batch` of 2048 splits into the same 512-token ubatches), f16 KV cache, flash
attention off, `logits_all=False` (logits of the last position only, read with `llama_get_logits_ith`).

Greedy agreement: how many of the first `--decode` greedy tokens (the prefill's argmax, then each decode
step's) agree before the first difference, between the two engines and against our fp32 path.
Bandwidth limit: read bandwidth measured here (`bench_fast_decode.read_bandwidth`: a 512 MiB `amax` from
huge-page-advised memory, the read-only stream a decode step is; copy bandwidth is reported too) / weight
bytes one decode step reads; the fraction of it each engine reaches (ours: `FastLFM2.weight_bytes_per_token`;
llama.cpp: the GGUF file's tensor bytes, which a step reads whole, the tied head included).

    pip install -e ".[deploy]"                                     # llama-cpp-python (compiles llama.cpp)
    PYTHONPATH=. python bench/bench_vs_llamacpp.py                 # 350M, prompts 512 and 2048, 3 reps
    PYTHONPATH=. python bench/bench_vs_llamacpp.py --quick         # tiny preset smoke run (seconds)
    PYTHONPATH=. python bench/bench_vs_llamacpp.py --modes f32 q4_0 --prompts 512 --reps 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fast_decode import copy_bandwidth, read_bandwidth, run_fast  # noqa: E402

from lfm2_train.inference import native  # noqa: E402
from lfm2_train.inference.fast import FastLFM2  # noqa: E402
from lfm2_train.model import LFM2ForCausalLM, get_preset  # noqa: E402

DEFAULT_OUT = Path("bench/results/vs_llamacpp.json")
QUICK_OUT = Path("bench/results/vs_llamacpp_quick.json")
INSTALL_HINT = ('llama-cpp-python is not installed, so there is no llama.cpp to compare with; skipping.\n'
                'Install it with `pip install -e ".[deploy]"` (compiles llama.cpp, a few minutes) and rerun.')
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
FLOAT_DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
N_BATCH = 512  # llama-cpp-python's default n_batch and n_ubatch


@dataclass(frozen=True)
class Mode:
    """One row pair: our fast path's setting and the llama.cpp file type it is compared with."""

    name: str
    ours: str  # f32 | bf16 | f16 | int8 | w8a8 | q4_0 | q4_0-pure (fast_kwargs)
    gguf: str  # export dtype (lfm2_train.export.gguf_dtypes())
    output: str | None = None  # the export's output_dtype (the head's type); None = gguf

    @property
    def file_key(self) -> str:
        return self.gguf if self.output in (None, self.gguf) else f"{self.gguf}+{self.output}-output"


MODES = {m.name: m for m in (Mode("f32", "f32", "f32"), Mode("bf16", "bf16", "bf16"), Mode("int8", "int8", "q8_0"),
                             Mode("w8a8", "w8a8", "q8_0"), Mode("q4_0", "q4_0", "q4_0", "q8_0"),
                             Mode("q4_0-pure", "q4_0-pure", "q4_0"))}
F16_MODE = Mode("f16", "f16", "f16")  # stands in for bf16 when the llama.cpp build cannot load a bf16 file


@dataclass
class Run:
    """One timed prefill + greedy decode."""

    prefill_s: float
    decode_s: float
    tokens: list[int]  # greedy: the prefill's argmax, then one per decode step


class Unavailable(Exception):
    """The installed fast path or llama.cpp build cannot run this mode; the row says why."""


# ---------------------------------------------------------------------------------------------- environment
def import_llama_cpp() -> ModuleType | None:
    """llama-cpp-python, or None when it is not installed (the benchmark is then skipped, not failed)."""
    try:
        import llama_cpp
    except ImportError:
        return None
    return llama_cpp


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and ISA flags (Linux /proc/cpuinfo; elsewhere what `platform` knows)."""
    name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and name is None:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return name or platform.processor() or "unknown", flags


def machine_info(threads: int, llama_cpp: ModuleType) -> dict[str, Any]:
    """CPU model and the ISA flags both engines' kernels depend on, thread count and library versions."""
    from importlib.metadata import version

    cpu, flags = cpu_info()
    system_info = llama_cpp.llama_print_system_info()
    return {
        "cpu": cpu,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": system_info.decode() if isinstance(system_info, bytes) else str(system_info),
        "gguf": version("gguf"),
        "native_kernels": "available" if native.available() else f"unavailable: {native.unavailable_reason()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# ---------------------------------------------------------------------------------------------- our side
def fast_kwargs(ours: str) -> dict[str, Any]:
    """`FastLFM2.from_model` keyword arguments for one of our modes; `Unavailable` if this fast path has none.

    Feature-detected from the signature: quantized modes need a `quant=` parameter (weight-only int8 also
    runs through the older `int8=True`); a `quant` value the fast path rejects is caught by `build_fast`.
    """
    if ours in FLOAT_DTYPES:
        return {"dtype": FLOAT_DTYPES[ours]}
    params = inspect.signature(FastLFM2.from_model).parameters
    quant, pure = ours.removesuffix("-pure"), ours.endswith("-pure")
    if pure and "head_quant" not in params:
        raise Unavailable(f"FastLFM2.from_model has no head_quant= parameter for {ours!r}")
    if "quant" in params:
        return {"dtype": torch.float32, "quant": quant, **({"head_quant": quant} if pure else {})}
    if ours == "int8" and "int8" in params:
        return {"dtype": torch.float32, "int8": True}
    raise Unavailable(f"FastLFM2.from_model has no quant= parameter for {ours!r}")


def build_fast(model: LFM2ForCausalLM, ours: str, kernels: str) -> FastLFM2:
    """Our fast path in mode `ours`; `Unavailable` when it rejects the mode's `quant` value."""
    kwargs = fast_kwargs(ours)
    try:
        return FastLFM2.from_model(model, kernels=kernels, **kwargs)
    except (TypeError, ValueError, NotImplementedError) as err:
        if "quant" not in kwargs:
            raise
        raise Unavailable(f"FastLFM2.from_model(quant={ours!r}): {err}") from err


def run_ours(fast: FastLFM2, ids: list[int], steps: int) -> Run:
    """The fast path's timed prefill + greedy decode, exactly as bench_fast_decode.py times it."""
    return Run(*run_fast(fast, torch.tensor([ids]), steps))


# ---------------------------------------------------------------------------------------------- llama.cpp
def load_llama(llama_cpp: ModuleType, path: Path, n_ctx: int, threads: int) -> Any:
    """A llama.cpp context with llama-cpp-python's defaults except the thread counts and the context size."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_BATCH,
                           n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)


def run_theirs(llama_cpp: ModuleType, llm: Any, ids: list[int], steps: int) -> Run:
    n_vocab = llm.n_vocab()

    def argmax() -> int:  # the last output row, read in place (llm.scores is only filled with logits_all)
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).argmax())

    t0 = time.perf_counter()
    llm.reset()
    llm.eval(ids)
    t1 = time.perf_counter()
    tokens = [argmax()]
    t2 = time.perf_counter()
    for _ in range(steps):
        llm.eval([tokens[-1]])
        tokens.append(argmax())
    t3 = time.perf_counter()
    return Run(t1 - t0, t3 - t2, tokens)


# ---------------------------------------------------------------------------------------------- workers
def worker(spec: dict[str, Any]) -> None:
    """One engine in its own process, loaded once, answering `{"ids", "steps"}` lines on stdin with a `Run`.

    Why a process per engine: the two would otherwise share one OpenMP runtime (llama.cpp's CPU backend is
    built with OpenMP, and binds to the libgomp torch has loaded), so one engine's idle threads could spin
    under the other's timing. The parent sends one request at a time: one engine computes while the other
    waits on its pipe.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to stderr: stdout carries the protocol only

    def reply(message: dict[str, Any]) -> None:
        proto.write(json.dumps(message) + "\n")

    threads, llm = spec["threads"], None
    if spec["engine"] == "ours":
        torch.set_num_threads(threads)
        model = LFM2ForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        try:
            fast = build_fast(model, spec["mode"], spec["kernels"])
        except Unavailable as err:
            reply({"unavailable": str(err)})
            return
        ready = {"params": model.num_parameters(), "weight_bytes_per_token": fast.weight_bytes_per_token}
        del model
        gc.collect()

        def run(ids: list[int], steps: int) -> Run:
            return run_ours(fast, ids, steps)
    else:
        llama_cpp = import_llama_cpp()
        assert llama_cpp is not None, "the parent checked that llama-cpp-python imports"
        try:
            llm = load_llama(llama_cpp, Path(spec["gguf"]), spec["n_ctx"], threads)
        except (ValueError, RuntimeError) as err:
            reply({"unavailable": f"llama.cpp cannot load {Path(spec['gguf']).name}: {err}"})
            return
        ready = {}

        def run(ids: list[int], steps: int) -> Run:
            return run_theirs(llama_cpp, llm, ids, steps)
    reply({"ready": True, **ready})
    for line in sys.stdin:
        request = json.loads(line)
        reply(asdict(run(request["ids"], request["steps"])))
    if llm is not None:
        llm.close()


class Engine:
    """The parent's handle on a worker process: `run` sends one request and waits for its `Run`."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec["engine"]
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = self._read()
        if "unavailable" in self.info:
            self.close()
            raise Unavailable(self.info["unavailable"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited with code {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def run(self, ids: list[int], steps: int) -> Run:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"ids": ids, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        return Run(**self._read())

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- pieces
def prefix_agree(a: list[int], b: list[int], n: int) -> int:
    """Leading tokens of `a[:n]` and `b[:n]` that agree before the first difference."""
    return next((i for i, (x, y) in enumerate(zip(a[:n], b[:n])) if x != y), min(n, len(a), len(b)))


def write_checkpoint(out: Path, preset: str, seed: int) -> Path:
    """A random-init checkpoint of `preset` with the bundled tokenizer (a GGUF file must carry one)."""
    from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

    torch.manual_seed(seed)
    LFM2ForCausalLM(get_preset(preset)).save_pretrained(out)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(out)
    gc.collect()
    return out


def export(model_dir: Path, mode: Mode, work: Path, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Export `model_dir` as the mode's file once per run (q8_0 serves two modes)."""
    from lfm2_train.export import export_gguf
    from lfm2_train.tokenizer import tiny_tokenizer_path

    key = mode.file_key
    if key not in files:
        tokenizer = None if (model_dir / "tokenizer.json").is_file() else tiny_tokenizer_path()
        t0 = time.perf_counter()
        summary = export_gguf(model_dir, work / f"model-{key}.gguf", mode.gguf, tokenizer=tokenizer,
                              output_dtype=mode.output)
        summary["export_s"] = time.perf_counter() - t0
        files[key] = summary
        print(f"exported {key}: {summary['bytes'] / 1e6:.1f} MB in {summary['export_s']:.0f}s", flush=True)
    return files[key]


# ---------------------------------------------------------------------------------------------- bench
def add_ratios(row: dict[str, Any]) -> dict[str, Any]:
    """Speed ratios ours / llama.cpp of a row with per-repetition times: of the medians, and paired (the median
    of the per-repetition ratios: each repetition ran the two engines back to back, so a slow spell of the
    machine hits both sides of a pair; on a shared box that is the steadier number)."""
    for part in ("prefill", "decode"):
        ours, theirs = row[f"ours_{part}_s"], row[f"theirs_{part}_s"]
        row[f"{part}_ratio"] = row[f"ours_{part}_tok_s"] / row[f"theirs_{part}_tok_s"]
        row[f"{part}_ratio_paired"] = statistics.median(t / o for o, t in zip(ours, theirs))
    return row


def bench_mode(mode: Mode, ours: Engine, theirs: Engine, prompts: dict[int, list[int]], args: argparse.Namespace,
               reference: dict[int, list[int]] | None, bandwidth: float, gguf_bytes: int) -> list[dict[str, Any]]:
    """Warm both engines up, then time them strictly alternating; one row per prompt length.

    `reference`: our fp32 greedy tokens per prompt length (None: this is the fp32 mode, its own tokens).
    """
    engines = {"ours": ours, "theirs": theirs}
    warm = prompts[min(prompts)][:32]
    for engine in engines.values():
        engine.run(warm, 2)
    raw: dict[tuple[int, str], list[Run]] = {}
    for rep in range(args.reps):
        for T, ids in prompts.items():
            for name, engine in engines.items():
                run = engine.run(ids, args.decode)
                raw.setdefault((T, name), []).append(run)
                print(f"rep {rep + 1}/{args.reps} {mode.name:5s} T={T:5d} {name:6s} prefill {run.prefill_s:7.2f}s "
                      f"({T / run.prefill_s:8.1f} tok/s) decode {run.decode_s:6.2f}s "
                      f"({args.decode / run.decode_s:7.2f} tok/s)", flush=True)
    n = args.decode
    weight_bytes = ours.info["weight_bytes_per_token"]
    rows = []
    for T in prompts:
        row: dict[str, Any] = {"mode": mode.name, "ours": mode.ours, "gguf": mode.file_key, "prompt": T,
                               "decode_steps": n}
        for name in engines:
            runs = raw[(T, name)]
            row[f"{name}_prefill_s"] = [r.prefill_s for r in runs]
            row[f"{name}_decode_s"] = [r.decode_s for r in runs]
            row[f"{name}_prefill_tok_s"] = T / statistics.median(r.prefill_s for r in runs)
            row[f"{name}_decode_tok_s"] = n / statistics.median(r.decode_s for r in runs)
        add_ratios(row)
        ours_tokens, theirs_tokens = raw[(T, "ours")][0].tokens, raw[(T, "theirs")][0].tokens
        ref = reference[T] if reference is not None else ours_tokens
        row["ours_tokens"], row["theirs_tokens"] = ours_tokens, theirs_tokens
        row["greedy_agree"] = prefix_agree(ours_tokens, theirs_tokens, n)
        row["ours_vs_our_fp32"] = prefix_agree(ours_tokens, ref, n)
        row["theirs_vs_our_fp32"] = prefix_agree(theirs_tokens, ref, n)
        row["ours_weight_bytes_per_token"] = weight_bytes
        row["theirs_weight_bytes_per_token"] = gguf_bytes
        row["ours_bandwidth_limit_tok_s"] = bandwidth * 1e9 / weight_bytes
        row["ours_frac_of_limit"] = row["ours_decode_tok_s"] / row["ours_bandwidth_limit_tok_s"]
        row["theirs_frac_of_limit"] = row["theirs_decode_tok_s"] * gguf_bytes / (bandwidth * 1e9)
        rows.append(row)
    return rows


def bench(args: argparse.Namespace, llama_cpp: ModuleType) -> dict[str, Any]:
    from lfm2_train.model.hf_io import read_config

    torch.set_num_threads(args.threads)  # the bandwidth probe; each engine sets its own in its worker
    info = machine_info(args.threads, llama_cpp)
    info["loadavg_start"] = os.getloadavg()
    bandwidth, copy = read_bandwidth(), copy_bandwidth()
    print(f"{info['cpu']}, {args.threads} threads, load average {info['loadavg_start'][0]:.2f}; read bandwidth "
          f"{bandwidth:.1f} GB/s (copy {copy:.1f}); native kernels {info['native_kernels']}", flush=True)
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    params = None
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir = args.model or write_checkpoint(work / f"{args.preset}-seed{args.seed}", args.preset, args.seed)
        gen = torch.Generator().manual_seed(args.seed + 1)
        vocab = read_config(model_dir).vocab_size
        prompts = {T: torch.randint(0, vocab, (T,), generator=gen).tolist() for T in args.prompts}
        base = {"threads": args.threads, "model_dir": str(model_dir), "kernels": args.kernels,
                "n_ctx": max(args.prompts) + args.decode + 8}
        files: dict[str, dict[str, Any]] = {}
        reference: dict[int, list[int]] | None = None  # our fp32 greedy tokens per prompt
        if "f32" not in args.modes:  # an untimed reference pass; otherwise the f32 mode (run first) gives them
            with Engine({**base, "engine": "ours", "mode": "f32"}) as ref:
                reference = {T: ref.run(ids, args.decode).tokens for T, ids in prompts.items()}
        for mode in (m for m in MODES.values() if m.name in args.modes):
            with contextlib.ExitStack() as stack:
                try:
                    ours = stack.enter_context(Engine({**base, "engine": "ours", "mode": mode.ours}))
                except Unavailable as err:
                    skipped[mode.name] = str(err)
                    print(f"{mode.name}: not available ({err})", flush=True)
                    continue
                params = ours.info["params"]
                summary = export(model_dir, mode, work, files)
                try:
                    theirs = stack.enter_context(Engine({**base, "engine": "theirs", "gguf": summary["path"]}))
                except Unavailable as err:
                    if mode.name != "bf16":
                        raise RuntimeError(str(err)) from err
                    print(f"bf16: {err}; comparing f16 instead", flush=True)
                    ours.close()
                    mode = F16_MODE
                    ours = stack.enter_context(Engine({**base, "engine": "ours", "mode": mode.ours}))
                    summary = export(model_dir, mode, work, files)
                    theirs = stack.enter_context(Engine({**base, "engine": "theirs", "gguf": summary["path"]}))
                mode_rows = bench_mode(mode, ours, theirs, prompts, args, reference, bandwidth, summary["bytes"])
            if mode.name == "f32":
                reference = {r["prompt"]: r["ours_tokens"] for r in mode_rows}
            rows += mode_rows
    info["loadavg_end"] = os.getloadavg()
    return {"machine": info, "read_bandwidth_gb_s": bandwidth, "copy_bandwidth_gb_s": copy, "n_batch": N_BATCH,
            "model": str(args.model) if args.model else f"{args.preset} (random init, seed {args.seed})",
            "params": params, "args": {k: str(v) for k, v in vars(args).items()},
            "gguf_files": {k: {"bytes": v["bytes"], "export_s": v["export_s"], "tensor_types": v["tensor_types"]}
                           for k, v in files.items()},
            "rows": rows, "not_available": skipped}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, on in m["cpu_flags"].items() if on) or "none of " + ", ".join(CPU_FLAGS)
    params = f", {result['params'] / 1e6:.1f}M parameters" if result["params"] else ""
    lines = [
        f"{result['model']}{params}. {m['cpu']} ({flags}), "
        f"{m['logical_cpus']} logical CPUs, {m['threads']} threads; {m['date']}; load average "
        f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end. Read bandwidth "
        f"{result['read_bandwidth_gb_s']:.1f} GB/s (copy {result['copy_bandwidth_gb_s']:.1f}). torch {m['torch']}, "
        f"llama-cpp-python {m['llama_cpp_python']} "
        f"(n_batch {result['n_batch']}, f16 KV cache), gguf {m['gguf']}; our native kernels {m['native_kernels']}.",
        "",
        "| mode (ours / llama.cpp) | prompt | prefill tok/s ours | theirs | ratio (paired) | decode tok/s ours "
        "| theirs | ratio (paired) | greedy agree (ours-theirs, ours-fp32, theirs-fp32) "
        "| % of bandwidth limit (ours, theirs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["rows"]:
        n = r["decode_steps"]
        lines.append(
            f"| {r['ours']} / {r['gguf']} | {r['prompt']} | {r['ours_prefill_tok_s']:.1f} | "
            f"{r['theirs_prefill_tok_s']:.1f} | {r['prefill_ratio']:.2f} ({r['prefill_ratio_paired']:.2f}) | "
            f"{r['ours_decode_tok_s']:.2f} | {r['theirs_decode_tok_s']:.2f} | "
            f"{r['decode_ratio']:.2f} ({r['decode_ratio_paired']:.2f}) | {r['greedy_agree']}/{n}, "
            f"{r['ours_vs_our_fp32']}/{n}, {r['theirs_vs_our_fp32']}/{n} | "
            f"{r['ours_frac_of_limit']:.0%}, {r['theirs_frac_of_limit']:.0%} |")
    for name, why in result["not_available"].items():
        lines.append(f"| {name} | – | not available: {why.replace('|', '/')} | | | | | | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF checkpoint directory (default: a random preset)")
    p.add_argument("--preset", default="lfm2-350m", help="preset of the random-init checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (the prompts use seed + 1)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--prompts", type=int, nargs="+", default=[512, 2048], help="prompt lengths")
    p.add_argument("--decode", type=int, default=64, help="greedy decode steps after the prefill")
    p.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for both engines")
    p.add_argument("--kernels", choices=["auto", "native", "torch"], default="auto",
                   help="our decode kernels (FastLFM2.from_model(kernels=...))")
    p.add_argument("--work", type=Path, default=None, help="keep the checkpoint and GGUF files here")
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, prompt 64, 8 steps, 1 rep")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON spec: run as one engine's process
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.prompts, args.decode, args.reps = "tiny", [64], 8, 1
    if args.out is None:
        args.out = QUICK_OUT if args.quick else DEFAULT_OUT
    if args.decode < 1 or args.reps < 1 or args.threads < 1 or min(args.prompts) < 1:
        p.error("--decode, --reps, --threads and --prompts must be positive")
    args.prompts = sorted(set(args.prompts))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    llama_cpp = import_llama_cpp()
    if llama_cpp is None:
        print(INSTALL_HINT)
        return 0
    t0 = time.perf_counter()
    result = bench(args, llama_cpp)
    result["wall_s"] = time.perf_counter() - t0
    print()
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out} ({result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
