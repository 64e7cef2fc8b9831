"""The GPU checks that CPU tests cannot make, as one run that prints a markdown table for docs/BENCHMARKS.md.

1. NCCL training: a few steps of `stage=pretrain` through the real trainer with the process group forced
   on at one rank (DDP, then FSDP2), so every bookkeeping collective of the trainer goes through NCCL.
2. Throughput: bf16 tokens/s and MFU of the LFM2-350M preset at seq 4096 (sdpa, and flash-attn when it
   imports), AdamW step included; MFU from the model FLOPs of `engine/flops.py`.
3. Packed == unpacked on the GPU: two documents packed in one row give the logits of each run alone.
4. KD step memory at V = 65,536: peak memory of one CE step and one CE + top-32 KD step.

    bash bench/gpu_check.sh                         # on the GPU machine (<= 8 minutes on an H100)
    python bench/gpu_check.py --device cpu --tiny   # every check at toy size on the CPU (gloo), for the tests

Nothing is downloaded: the training run uses the bundled corpus, the other checks random weights.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfm2_train.engine.flops import flops_per_token  # noqa: E402
from lfm2_train.losses import KDParams, ce_kd_chunk, fused_head_loss, lm_loss  # noqa: E402
from lfm2_train.model import LFM2Config, LFM2ForCausalLM, get_preset  # noqa: E402

# Dense bf16 peak TFLOP/s by device-name fragment (the first match wins); --peak-tflops overrides.
PEAKS = (("H200", 989.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
         ("B200", 2250.0), ("4090", 165.0))
Row = tuple[str, str, str]  # (check, result, detail)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for key, p in PEAKS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ 1. training
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_training(device: torch.device, tiny: bool, workdir: Path) -> list[Row]:
    """`stage=pretrain` in this process with a one-rank process group that the trainer must use."""
    import torch.distributed as dist

    from lfm2_train.engine.distributed import Runtime
    from lfm2_train.stages import run_stage
    from lfm2_train.stages.plan import compose_training_config

    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    rows: list[Row] = []
    try:
        for wrapper in ("ddp", "fsdp2"):
            overrides = [f"distributed={wrapper}", f"distributed.dist_backend={backend}", "stage=pretrain",
                         "model=tiny", "trainer.max_steps=4", "trainer.micro_batch_size=4", "data.seq_len=128",
                         "trainer.eval_every=0", "trainer.checkpoint_every=0", "trainer.log_every=1",
                         "trainer.progress_bar=false", "logger=disabled", f"output_dir={workdir / wrapper}",
                         f"trainer.precision={'fp32' if tiny else 'bf16'}"]
            cfg = compose_training_config(overrides)
            started = time.perf_counter()
            # Runtime skips collectives at world size 1; here every one of them must run, through `backend`.
            with mock.patch.object(Runtime, "distributed", property(lambda self: True)):
                summary = run_stage(cfg)
            ok = summary["status"] == "finished" and math.isfinite(summary["loss"])
            rows.append((f"train {wrapper}, 1 rank, {backend} group forced on", "ok" if ok else "FAILED",
                         f"{summary['steps']} steps, loss {summary['loss']:.4f}, "
                         f"{time.perf_counter() - started:.1f} s"))
    finally:
        dist.destroy_process_group()
    return rows


# ------------------------------------------------------------------------------------------------ 2. throughput
def flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _config(preset: str, tiny: bool, attn: str, vocab: int | None = None) -> LFM2Config:
    base = get_preset("tiny" if tiny else preset).to_dict()
    base["attn_implementation"] = attn
    if vocab:
        base["vocab_size"] = vocab
    return LFM2Config.from_dict(base)


def _packed_rows(rows: int, seq: int, vocab: int, device: torch.device, docs_per_row: int = 4) -> dict[str, Any]:
    """Rows of `docs_per_row` equal documents, as the trainer's packed batches look."""
    ids = torch.randint(0, vocab, (rows, seq + 1), device=device)
    doc = (torch.arange(seq, device=device) * docs_per_row // seq).expand(rows, seq).contiguous()
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "doc_ids": doc}


def check_throughput(device: torch.device, tiny: bool, peak: float | None) -> list[Row]:
    rows: list[Row] = []
    seq, batch, steps, warmup = (128, 2, 2, 1) if tiny else (4096, 4, 10, 3)
    backends = ["sdpa"]
    if device.type == "cuda" and flash_available():
        backends.append("flash_attn")
    else:
        rows.append(("bf16 flash_attn", "skipped", "flash-attn does not import (or not on CUDA)"))
    for attn in backends:
        torch.manual_seed(0)
        config = _config("lfm2-350m", tiny, attn)
        model = LFM2ForCausalLM(config).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        data = _packed_rows(batch, seq, config.vocab_size, device)
        for i in range(warmup + steps):
            if i == warmup:
                sync(device)
                started = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss, n = lm_loss(model, data)
            (loss / n).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        tok_s = batch * seq * steps / (time.perf_counter() - started)
        flops = flops_per_token(model, seq).total
        mfu = f"MFU {tok_s * flops / (peak * 1e12):.1%} of {peak:g} TFLOP/s" if peak else "MFU: peak unknown"
        name = "tiny" if tiny else "350M"
        rows.append((f"{name} bf16 {attn}, {batch} x {seq} packed rows", f"{tok_s:,.0f} tok/s",
                     f"{mfu}; {flops / 1e9:.2f} GFLOP/token"))
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ 3. packing
def check_packing(device: torch.device, tiny: bool) -> list[Row]:
    rows: list[Row] = []
    lengths = [37, 91] if tiny else [1000, 3096]
    for attn in ("sdpa", "flash_attn"):
        if attn == "flash_attn" and not (device.type == "cuda" and flash_available()):
            continue
        config = _config("lfm2-350m", tiny, attn)
        torch.manual_seed(0)
        model = LFM2ForCausalLM(config).to(device).eval()
        ids = torch.randint(0, config.vocab_size, (1, sum(lengths)), device=device)
        doc = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(lengths)])[None]
        with torch.no_grad():
            # fp32 weights; flash-attn only runs bf16, so its comparison is made under bf16 autocast
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if attn == "flash_attn" else nullcontext()
            with ctx:
                packed = model(ids, doc_ids=doc).float()
                alone = torch.cat([model(part).float() for part in ids.split(lengths, dim=1)], dim=1)
        diff = (packed - alone).abs().max().item()
        tol = 5e-2 if attn == "flash_attn" else 1e-3
        rows.append((f"packed == unpacked ({attn}, docs {lengths})", "ok" if diff <= tol else "FAILED",
                     f"max abs logit difference {diff:.2e} (tolerance {tol:g})"))
        del model
    return rows


# ------------------------------------------------------------------------------------------------ 4. KD memory
def check_kd_memory(device: torch.device, tiny: bool) -> list[Row]:
    """Peak memory of one training step, CE alone vs CE + decoupled top-32 KD (the KD terms live inside the
    chunked head, so the difference should be the teacher tensors, not a (tokens, V) buffer)."""
    vocab, k = (4096, 8) if tiny else (65536, 32)
    rows_, seq = (2, 128) if tiny else (4, 4096)
    config = _config("lfm2-350m", tiny, "sdpa", vocab=vocab)
    model = LFM2ForCausalLM(config).to(device)
    data = _packed_rows(rows_, seq, vocab, device)
    teacher_ids = torch.randint(0, vocab, (rows_, seq, k), device=device)
    teacher_lp = torch.log_softmax(torch.randn(rows_, seq, k, device=device), -1)
    kd = ce_kd_chunk(KDParams(method="decoupled", temperature=2.0, weight="teacher_mass", weight_value=1.0,
                              tau_squared=True), 1.0)

    def kd_loss(m: torch.nn.Module, b: dict[str, Any]) -> Any:
        head = partial(fused_head_loss, fn=kd, inputs=[b["labels"], teacher_ids, teacher_lp])
        return m(b["input_ids"], doc_ids=b["doc_ids"], head_fn=head)[0], None

    out = [_step_peak(device, model, data, fn) for fn in (lm_loss, kd_loss)]
    detail = (f"V={vocab:,}, K={k}, {rows_} x {seq} tokens, bf16: CE {out[0] / 2**30:.2f} GiB, "
              f"CE + KD {out[1] / 2**30:.2f} GiB (+{(out[1] - out[0]) / 2**20:.0f} MiB)")
    return [("KD step peak memory", f"{out[1] / 2**30:.2f} GiB" if device.type == "cuda" else "measured on CUDA only",
             detail if device.type == "cuda" else f"ran at V={vocab:,}, K={k} (no allocator statistics on CPU)")]


def _step_peak(device: torch.device, model: torch.nn.Module, data: dict[str, Any],
               fn: Callable[..., Any]) -> int:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fn(model, data)[0]
    loss.backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


# ------------------------------------------------------------------------------------------------ report
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def markdown(rows: list[Row], device: torch.device, seconds: float) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"GPU check on {machine(device)}, {stamp}, {seconds:.0f} s (`bash bench/gpu_check.sh`)", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU, for MFU")
    ap.add_argument("--only", default="training,throughput,packing,kd", help="comma-separated subset of checks")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or use --device cpu --tiny", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows: list[Row] = []
    checks: dict[str, Callable[[Path], list[Row]]] = {
        "training": lambda tmp: check_training(device, args.tiny, tmp),
        "throughput": lambda tmp: check_throughput(device, args.tiny, peak_tflops(device, args.peak_tflops)),
        "packing": lambda tmp: check_packing(device, args.tiny),
        "kd": lambda tmp: check_kd_memory(device, args.tiny),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only.split(","):
            try:
                rows += checks[name](Path(tmp))
            except Exception as err:  # noqa: BLE001 - one failed check must not hide the others' numbers
                message = " ".join(str(err).split())[:300].replace("|", "/")
                rows.append((name, "FAILED", f"{type(err).__name__}: {message}"))
                print(traceback.format_exc(), file=sys.stderr)
    print("\n" + markdown(rows, device, time.perf_counter() - started))
    return 1 if any(r[1] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
