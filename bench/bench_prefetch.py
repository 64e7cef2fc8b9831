"""Training step time with batches prepared in the step (`trainer.prefetch=0`) vs one step ahead on a
background thread (`trainer.prefetch=1`), through the real pretrain stage and trainer on the CPU.

The dataset is many short documents (packing cost grows with documents per row), the model the tiny preset
(a step of a few tens of ms, so the data work is a visible share of it). Runs alternate between the two
settings so machine noise hits both alike; the report gives the median seconds per step of each and
their ratio (each run's number is the median over its steps of the trainer's own step timer, which starts
before the batch is fetched), the time each step waits for its batch (what prefetching removes), and the
cost of packing one step's batch on its own.

    PYTHONPATH=. python bench/bench_prefetch.py            # 3 repetitions x 40 steps each
    PYTHONPATH=. python bench/bench_prefetch.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("WANDB_MODE", "disabled")

from lfm2_train.data.format import Manifest, ShardReader, write_shard  # noqa: E402
from lfm2_train.data.packed import DocumentStream  # noqa: E402
from lfm2_train.data.prefetch import RankBatches  # noqa: E402
from lfm2_train.stages import run_stage  # noqa: E402
from lfm2_train.stages.plan import compose_training_config  # noqa: E402
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path  # noqa: E402


def write_dataset(out: Path, n_docs: int, mean_len: int, seed: int = 0) -> Path:
    """Random token documents with the bundled tokenizer's vocabulary and fingerprint."""
    out.mkdir(parents=True, exist_ok=True)
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 2 * mean_len, size=n_docs)
    flat = rng.integers(3, tok.vocab_size, size=int(lengths.sum()) + n_docs).astype(np.uint16)
    ends = np.cumsum(lengths + 1)
    flat[ends - 1] = tok.eod_token_id
    shard = write_shard(out, "shard-00000", flat, np.concatenate([[0], ends]))
    Manifest(tok.fingerprint(), tok.vocab_size, "uint16", tok.eod_token_id, [shard]).save(out)
    tok.save_pretrained(out / "tokenizer")
    return out


def packing_seconds(data: Path, rows: int, seq_len: int, batches: int) -> float:
    reader = ShardReader(data)
    stream = DocumentStream(reader, np.random.default_rng(0).permutation(len(reader)), seq_len)
    started = time.perf_counter()
    for _ in range(batches):
        stream.next_batch(rows)
    return (time.perf_counter() - started) / batches


def step_seconds(data: Path, out: Path, prefetch: int, args: argparse.Namespace) -> float:
    cfg = compose_training_config([
        "stage=pretrain", "model=tiny", f"data.path={data}", f"data.seq_len={args.seq_len}",
        "data.verify_hashes=false", "data.val_fraction=0", f"trainer.micro_batch_size={args.rows}",
        f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.checkpoint_every=0",
        "trainer.progress_bar=false", "logger=disabled", "trainer.resume=never", f"trainer.prefetch={prefetch}",
        f"output_dir={out}"])
    waits: list[float] = []
    original = RankBatches.next_batch

    def timed(self: RankBatches, global_rows: int) -> dict:
        started = time.perf_counter()
        try:
            return original(self, global_rows)
        finally:
            waits.append(time.perf_counter() - started)

    RankBatches.next_batch = timed  # the time the step spends waiting for its batch
    try:
        run_stage(cfg)
    finally:
        RankBatches.next_batch = original
    args.waits[prefetch].append(statistics.median(waits[2:]))
    # The trainer times each step from asking for its batch to the optimizer update (its `tok/s`); the
    # first steps warm up allocators and the producer thread, and stage start-up / export are not steps.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_step = [r["tokens"] / r["tok/s"] for r in rows if "tok/s" in r][2:]
    return statistics.median(per_step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--mean-doc-len", type=int, default=24, help="mean document length in tokens")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.reps, args.seq_len = 5, 1, 256
    with tempfile.TemporaryDirectory() as tmp:
        docs = int(1.3 * args.steps * args.rows * args.seq_len / args.mean_doc_len) + 1000
        data = write_dataset(Path(tmp) / "data", docs, args.mean_doc_len)
        pack = packing_seconds(data, args.rows, args.seq_len, min(args.steps, 20))
        times: dict[int, list[float]] = {0: [], 1: []}
        args.waits = {0: [], 1: []}
        for rep in range(args.reps):
            for prefetch in ((0, 1) if rep % 2 == 0 else (1, 0)):
                times[prefetch].append(step_seconds(data, Path(tmp) / f"run-{rep}-{prefetch}", prefetch, args))
    off, on = statistics.median(times[0]), statistics.median(times[1])
    print(f"\n{args.rows} rows x {args.seq_len} tokens per step, documents of ~{args.mean_doc_len} tokens, tiny model, "
          f"{args.steps} steps x {args.reps} repetitions (alternating)")
    print(f"packing one step's batch alone: {pack * 1e3:.1f} ms")
    print(f"step time, prefetch=0: {off * 1e3:.1f} ms (runs {[round(t * 1e3, 1) for t in times[0]]})")
    print(f"step time, prefetch=1: {on * 1e3:.1f} ms (runs {[round(t * 1e3, 1) for t in times[1]]})")
    print(f"prefetch=1 / prefetch=0: {on / off:.3f}")
    w0, w1 = statistics.median(args.waits[0]), statistics.median(args.waits[1])
    print(f"time the step waits for its batch (median per step): prefetch=0 {w0 * 1e3:.2f} ms, "
          f"prefetch=1 {w1 * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
