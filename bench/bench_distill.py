"""Distillation costs: teacher-cache bytes per token, and the KD loss's peak memory chunked vs naive.

(a) Runs `stage=cache_teacher` (tiny random teacher, defaults K=32 / fp16 / uint16) over a dataset made from
    the bundled corpus and divides the bytes of every file in the cache directory by the token count.
    Also reports the log-prob rounding error of bf16 vs fp16 storage on synthetic peaked distributions.
(b) Forward + backward of CE + L_KD on (positions, hidden) states and a (vocab, hidden) head, fp32, CPU:
    `fused_head_loss(..., ce_kd_chunk(KDParams(), 1.0))` vs a naive version (full `h @ W.T` logits,
    `kd_terms` + cross-entropy, autograd backward). Each variant runs in its own subprocess; peak memory is
    the growth of `ru_maxrss` from just before the loss to after the backward (inputs excluded).

    PYTHONPATH=. python bench/bench_distill.py                  # vocab 65536, hidden 256, 8x2048 positions
    PYTHONPATH=. python bench/bench_distill.py --quick          # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------------------------------------- (a) cache size
def bundled_dataset(out: Path, max_docs: int) -> Path:
    """A token-shard dataset of the bundled corpus (prose, code, structured, arithmetic), tiny tokenizer,
    written by the real tokenize job (first `max_docs // 4` documents of each source, no FIM)."""
    from data_pipelines.tokenize import run

    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in ("prose", "code", "structured", "arithmetic"):
        lines += (REPO / "lfm2_train" / "assets" / "corpus" / f"{name}.jsonl").read_text().splitlines()[: max_docs // 4]
    subset = out.parent / "bench_corpus.jsonl"
    subset.write_text("\n".join(lines) + "\n")
    # One source with weight 1 is read exactly once (docs/DATA.md, "Mixtures").
    run({"sources": [{"name": "bench", "path": str(subset), "weight": 1.0}], "output_dir": str(out),
         "shard_tokens": 32768, "progress": False})
    return out


def cache_size(args: argparse.Namespace) -> dict:
    from hydra import compose, initialize

    from lfm2_train.config import register_configs
    from lfm2_train.model import LFM2ForCausalLM, get_preset
    from lfm2_train.stages import run_stage
    from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

    work = Path(tempfile.mkdtemp(prefix="bench_distill_"))
    try:
        data = bundled_dataset(work / "data", args.cache_docs)
        torch.manual_seed(0)
        LFM2ForCausalLM(get_preset("tiny")).save_pretrained(work / "teacher")
        LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(work / "teacher")
        register_configs()
        with initialize(version_base="1.3", config_path=None):
            cfg = compose(config_name="lfm2_train", overrides=[
                "stage=cache_teacher", f"stage.teacher={work / 'teacher'}", f"data.path={data}",
                f"stage.output={work / 'cache'}", "stage.progress_bar=false"])
        summary = run_stage(cfg)
        files = {f.name: f.stat().st_size for f in (work / "cache").iterdir() if f.is_file()}
        tokens = summary["tokens"]
        k = cfg.stage.k
        return {"tokens": tokens, "shards": summary["shards"], "k": k, "bytes": sum(files.values()),
                "bytes_per_token": sum(files.values()) / tokens,
                "payload_bytes_per_token": sum(v for n, v in files.items() if n.startswith("topk-")) / tokens,
                "limit": 4 * k + 8, "stage_tokens_per_s": summary["tokens_per_s"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def logprob_rounding(vocab: int = 65536, k: int = 32, rows: int = 4096) -> dict:
    """Storage error of bf16 vs fp16 on top-K log-probs of synthetic peaked (LM-like) distributions."""
    from lfm2_train.data.teacher_cache import decode_logprobs, encode_logprobs

    g = torch.Generator().manual_seed(0)
    # Logit scale 3 gives top-1 probabilities of roughly 0.1-0.9 and top-K mass ~0.5-0.99, as LMs do.
    logits = torch.randn(rows, vocab, generator=g) * 3.0
    lp = torch.topk(torch.log_softmax(logits, -1), k).values
    out = {"top1_mean_p": float(lp[:, 0].exp().mean()), "mass_mean": float(lp.exp().sum(-1).mean())}
    for dtype in ("bfloat16", "float16"):
        back = decode_logprobs(encode_logprobs(lp, dtype), dtype)
        out[dtype] = {"max_abs_lp_err": float((back - lp).abs().max()),
                      "mean_abs_lp_err": float((back - lp).abs().mean()),
                      "max_abs_mass_err": float((back.exp().sum(-1) - lp.exp().sum(-1)).abs().max())}
    return out


# ---------------------------------------------------------------------------------------------- (b) KD loss
def _inputs(n: int, hidden: int, vocab: int, k: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(n, hidden, generator=g)).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.05).requires_grad_(True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    base = torch.randint(0, vocab, (n, 1), generator=g)
    t_ids = (base + torch.arange(k) * 977) % vocab  # K distinct ids per row
    t_lp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1) + float(np.log(0.9))  # top-K mass 0.9
    return h, w, labels, t_ids, t_lp


def child(variant: str, n: int, hidden: int, vocab: int, k: int, reps: int) -> dict:
    """One variant in this (fresh) process: peak RSS growth of the first fwd+bwd, best time over reps."""
    import torch.nn.functional as F

    from lfm2_train.losses import KDParams, ce_kd_chunk, fused_head_loss, kd_terms

    h, w, labels, t_ids, t_lp = _inputs(n, hidden, vocab, k)
    params = KDParams()

    def chunked() -> torch.Tensor:
        loss, _ = fused_head_loss(h, w, ce_kd_chunk(params, kd_weight=1.0), [labels, t_ids, t_lp])
        return loss

    def naive() -> torch.Tensor:
        logits = h @ w.t()
        kd = kd_terms(logits, t_ids, t_lp, params)["kd"].sum()
        return F.cross_entropy(logits, labels, reduction="sum") + kd

    fn = chunked if variant == "chunked" else naive
    # Reset the kernel's peak-RSS mark so transients from imports and input creation do not hide the loss's
    # own peak (ru_maxrss is a high-water mark since exec); fall back to the ru_maxrss delta without it.
    reset = _reset_peak_rss()
    base_kib = _status_kib("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, loss, peak_kib, grad_norm = [], None, 0, 0.0
    for rep in range(reps):
        t0 = time.perf_counter()
        loss = fn()
        loss.backward()
        times.append(time.perf_counter() - t0)
        if rep == 0:
            peak_kib = _status_kib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grad_norm = float(h.grad.norm()) + float(w.grad.norm())
        h.grad = w.grad = None
    return {"variant": variant, "positions": n, "peak_mib": (peak_kib - base_kib) / 1024,
            "baseline_mib": base_kib / 1024, "hwm_reset": reset, "seconds": min(times),
            "loss": float(loss.detach()), "grad_norm": grad_norm}


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to /proc/self/clear_refs resets VmHWM (the peak resident set) to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_child(variant: str, args: argparse.Namespace, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--child-positions", str(n), "--hidden", str(args.hidden),
           "--vocab", str(args.vocab), "--k", str(args.k), "--reps", str(args.reps), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{variant} child failed ({res.returncode}): {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def kd_memory(args: argparse.Namespace) -> dict:
    n = args.batch * args.seq
    chunked = run_child("chunked", args, n)
    # The naive loss keeps several (positions, vocab) fp32 buffers; measure it at 1/8 of the positions first
    # and only run the full size when that extrapolates to well inside the free memory.
    probe_n = max(n // 8, 1)
    probe = run_child("naive", args, probe_n)
    predicted = probe["peak_mib"] * n / probe_n
    out = {"positions": n, "chunked": chunked, "naive_probe": probe, "naive_predicted_mib": predicted,
           "mem_available_mib": mem_available_mib()}
    if predicted < 0.75 * out["mem_available_mib"]:
        out["naive"] = run_child("naive", args, n)
    else:
        print(f"naive at {n} positions would need ~{predicted / 1024:.1f} GiB of the "
              f"{out['mem_available_mib'] / 1024:.1f} GiB available: reporting the {probe_n}-position probe "
              "scaled linearly instead")
    naive_peak = out["naive"]["peak_mib"] if "naive" in out else predicted
    out["peak_ratio"] = chunked["peak_mib"] / max(naive_peak, 1e-9)
    if "naive" in out:
        out["loss_rel_diff"] = abs(chunked["loss"] - out["naive"]["loss"]) / abs(out["naive"]["loss"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=65536)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-docs", type=int, default=800)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/results/distill.json")
    p.add_argument("--child", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--child-positions", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.child_positions, args.hidden, args.vocab, args.k, args.reps)))
        return
    if args.quick:
        args.vocab, args.batch, args.seq, args.reps, args.cache_docs = 8192, 2, 256, 1, 80

    cache = cache_size(args)
    rounding = logprob_rounding()
    kd = kd_memory(args)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": cpu,
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": os.getloadavg(), "args": {k: v for k, v in vars(args).items() if not k.startswith("child")}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "cache": cache, "rounding": rounding, "kd": kd}, indent=2))

    print(f"{meta['date']} · {cpu} · {args.threads} threads · torch {torch.__version__}")
    print(f"(a) cache: {cache['tokens']} tokens, K={cache['k']}, 2-byte log-probs, uint16: "
          f"{cache['bytes_per_token']:.2f} B/token on disk "
          f"(shard files alone {cache['payload_bytes_per_token']:.2f}; limit {cache['limit']})")
    for dtype in ("bfloat16", "float16"):
        r = rounding[dtype]
        print(f"    {dtype}: log-prob error max {r['max_abs_lp_err']:.2e} mean {r['mean_abs_lp_err']:.2e}, "
              f"top-K mass error max {r['max_abs_mass_err']:.2e}")
    print(f"(b) KD loss fwd+bwd, vocab {args.vocab}, hidden {args.hidden}, {args.batch}x{args.seq} positions, fp32")
    print("| variant | peak RSS growth MiB | best time s |")
    print("|---|---:|---:|")
    print(f"| fused_head_loss + ce_kd_chunk | {kd['chunked']['peak_mib']:.0f} | {kd['chunked']['seconds']:.2f} |")
    if "naive" in kd:
        print(f"| naive (full logits, autograd) | {kd['naive']['peak_mib']:.0f} | {kd['naive']['seconds']:.2f} |")
    pr = kd["naive_probe"]
    print(f"| naive at {pr['positions']} positions (probe) | {pr['peak_mib']:.0f} | {pr['seconds']:.2f} |")
    print(f"chunked / naive peak = {kd['peak_ratio']:.3f}" + (f"; loss rel diff {kd['loss_rel_diff']:.1e}"
                                                              if "loss_rel_diff" in kd else ""))


if __name__ == "__main__":
    main()
