"""Latency and memory of one candidate on this machine, measured in a fresh subprocess.

A subprocess per candidate makes the peak RSS (`ru_maxrss`) that candidate's own, and keeps one
candidate's allocator state and thread pools from colouring the next one's timings.

Per context length: time-to-first-token (prefill of the prompt + the first greedy token), prefill
tokens/s, and the per-token decode latency (p50 / p95 over every decode step of every repeat). The
timing loop drives the model's preallocated inference cache directly (what `inference.generate` does);
`time_generation` is the one function to point at the fast CPU path once it exists.

    python -m lfm2_train.search.measure < spec.json    # prints one JSON line
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

DTYPES = ("float32", "bfloat16")


def machine_description() -> str:
    """The CPU model and logical CPU count the measurements were taken on (recorded with the results)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs"


def _status_mb(key: str) -> float | None:
    """`VmRSS` / `VmHWM` of this process from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart the RSS high-water mark at the current RSS (Linux >= 4.0), so the peak that follows is the
    model's and the inference's, not the imports'."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    # VmHWM belongs to this process image; ru_maxrss can carry the parent's high-water mark across
    # fork + exec (a large parent would make every candidate look the same).
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy for one number."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def time_generation(model: Any, prompt: Any, decode_tokens: int) -> tuple[float, list[float]]:
    """(seconds to the first token, seconds of each following decode step) for one greedy generation."""
    import torch

    from ..inference.fast import FastLFM2

    if isinstance(model, FastLFM2):  # the deployment path: preallocated state, fused projections
        state = model.new_state(prompt.shape[0], prompt.shape[1] + decode_tokens + 1)
        with torch.inference_mode():
            start = time.perf_counter()
            nxt = model.prefill(state, prompt).argmax(-1)  # (B,)
            ttft = time.perf_counter() - start
            steps = []
            for _ in range(decode_tokens):
                start = time.perf_counter()
                nxt = model.decode(state, nxt).argmax(-1)
                steps.append(time.perf_counter() - start)
        return ttft, steps

    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + decode_tokens + 1)
    with torch.inference_mode():
        start = time.perf_counter()
        nxt = model(prompt, cache=cache, logits_to_keep=1)[:, -1].argmax(-1)
        ttft = time.perf_counter() - start
        steps = []
        for _ in range(decode_tokens):
            start = time.perf_counter()
            nxt = model(nxt[:, None], cache=cache)[:, -1].argmax(-1)
            steps.append(time.perf_counter() - start)
    return ttft, steps


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run in the measuring process: build the model from `spec["config"]` and time it."""
    import torch

    from ..model import LFM2Config, LFM2ForCausalLM

    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(int(spec.get("seed", 0)))
    peak_before = _peak_rss_mb()  # after the imports: the interpreter + torch baseline
    rss_before = _status_mb("VmRSS") or peak_before
    reset = _reset_peak_rss()
    config = LFM2Config.from_dict(spec["config"], source="search candidate")
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model = LFM2ForCausalLM(config).to(dtype).eval()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if spec.get("runtime", "fast") == "fast":
        from ..inference.fast import FastLFM2

        model = FastLFM2.from_model(model)  # the training model is dropped: only the deployed copy is measured
        gc.collect()
        reset = _reset_peak_rss() and reset
    batch = int(spec.get("batch_size", 1))
    decode_tokens = int(spec["decode_tokens"])
    repeats = int(spec.get("repeats", 2))
    out: dict[str, Any] = {"contexts": {}}
    gen = torch.Generator().manual_seed(0)
    # Warm-up: first calls pay for lazy initialisation (kernels, allocator) that a server pays once.
    time_generation(model, torch.randint(3, config.vocab_size, (batch, 16), generator=gen), 4)
    for ctx in spec["contexts"]:
        if ctx + decode_tokens + 1 > config.max_position_embeddings:
            raise ValueError(f"context {ctx} + {decode_tokens} decode tokens exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        ttfts, steps = [], []
        for _ in range(repeats):
            prompt = torch.randint(3, config.vocab_size, (batch, ctx), generator=gen)
            ttft, s = time_generation(model, prompt, decode_tokens)
            ttfts.append(ttft)
            steps.extend(s)
        ttft = _percentile(ttfts, 50)
        out["contexts"][str(ctx)] = {
            "ttft_ms": 1000 * ttft, "prefill_tok_s": batch * ctx / ttft,
            "decode_p50_ms": 1000 * _percentile(steps, 50), "decode_p95_ms": 1000 * _percentile(steps, 95),
        }
    peak_after = _peak_rss_mb()
    peak = max(peak_before, peak_after)
    out.update(peak_rss_mb=peak, rss_delta_mb=(peak_after if reset else peak) - rss_before,
               weights_mb=weights_mb, runtime=spec.get("runtime", "fast"),
               threads=torch.get_num_threads())
    return out


@dataclass
class MeasureError(RuntimeError):
    reason: str

    def __str__(self) -> str:
        return self.reason


def measure_in_subprocess(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run `measure(spec)` in a fresh interpreter; a crash or timeout becomes a `MeasureError` naming it."""
    env = dict(os.environ)
    threads = str(spec.get("threads", 1))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    try:
        proc = subprocess.run([sys.executable, "-m", "lfm2_train.search.measure"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise MeasureError(f"measurement timed out after {timeout_s:.0f}s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise MeasureError(f"measurement failed (exit {proc.returncode}): {tail[0]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise MeasureError("measurement printed no result")
    return json.loads(lines[-1])


def main() -> None:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(measure(spec)))


if __name__ == "__main__":
    main()
