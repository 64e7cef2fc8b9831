"""Checkpoint save time at ~100M parameters on 2 FSDP2 ranks (CPU, gloo): sharded DCP vs the former full gather.

Former save (what the trainer did before DCP): gather the full model and the full optimizer state onto rank 0,
write the model as a Hugging Face directory and the optimizer as one `optimizer.pt`, hash every byte, rename.
DCP save: every rank writes its own shards; the manifest hashes the small files and records the sizes of the
large ones, which a background thread hashes after the rename. Also timed: DCP with that hashing waited for
(as if it were synchronous), and the blocking part of an asynchronous save (`trainer.async_checkpoint`).

    PYTHONPATH=. python bench/bench_checkpoint.py             # ~100M parameters, 3 repetitions (medians)
    PYTHONPATH=. python bench/bench_checkpoint.py --quick     # tiny model, 1 repetition (seconds)

Run without a launcher, the script starts itself under `torch.distributed.run` with `--nproc` processes.
Results: printed, and written to bench/results/checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lfm2_train.engine.checkpoint import CheckpointManager, _hash_tree
from lfm2_train.engine.distributed import Runtime, TorchBackend
from lfm2_train.engine.meta_init import build_on_meta
from lfm2_train.model import LFM2Config, get_preset
from lfm2_train.model.config import ATTENTION, CONV
from lfm2_train.model.hf_io import write_checkpoint

RESULTS = Path(__file__).parent / "results" / "checkpoint.json"


def model_config(quick: bool) -> LFM2Config:
    if quick:
        return get_preset("tiny")
    # LFM2-350M's width and vocabulary with 2 of its 16 layers: ~100M parameters, 67M of them the embedding.
    return get_preset("lfm2_350m").replace(num_hidden_layers=2, layer_types=[CONV, ATTENTION])


def timed(runtime: Runtime, fn: Any) -> float:
    runtime.barrier()
    start = time.perf_counter()
    fn()
    runtime.barrier()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: a temporary directory)")
    args = ap.parse_args()
    if "RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
               __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))

    cfg = OmegaConf.create({"distributed": {"backend": "fsdp2", "dist_backend": "gloo"},
                            "trainer": {"activation_checkpointing": False, "compile": False, "precision": "fp32"},
                            "optim": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                                      "no_decay": ["norm", "embedding", "bias"]}})
    runtime = Runtime.from_env(cfg.distributed)
    torch.manual_seed(0)
    config = model_config(args.quick)
    backend = TorchBackend(build_on_meta(config), cfg, runtime)
    n_params = backend.raw.num_parameters()
    ids = torch.randint(0, config.vocab_size, (1, 16))
    backend.model(ids).float().mean().backward()  # one step, so the optimizer state exists
    backend.step()
    backend.zero_grad()

    root = Path(args.dir or tempfile.gettempdir()) / "bench_checkpoint"
    if runtime.is_main:
        shutil.rmtree(root, ignore_errors=True)
    runtime.barrier()
    mgr = CheckpointManager(root / "ckpt", keep_last=1)
    step = iter(range(1, 1000))

    def former() -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = backend.full_model_state()
        optim = get_optimizer_state_dict(backend.model, backend.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if runtime.is_main:
            out = root / "former"
            shutil.rmtree(out, ignore_errors=True)
            (out / "tmp").mkdir(parents=True)
            write_checkpoint(state, config, out / "tmp" / "model")
            torch.save(optim, out / "tmp" / "optimizer.pt")
            (out / "tmp" / "checksums.json").write_text(json.dumps(_hash_tree(out / "tmp")))
            os.replace(out / "tmp", out / "step")

    def dcp(wait_for_hashes: bool = False, asynchronous: bool = False) -> Any:
        s = next(step)
        own = str(mgr.save(s, lambda d: None, commit=False)) if runtime.is_main else None
        tmp = Path(runtime.broadcast_object(own))
        future = backend.save(tmp, None, asynchronous=asynchronous, process_group=group)
        if future is not None:
            return future, s
        runtime.barrier()
        if runtime.is_main:
            mgr.commit(s)
            if wait_for_hashes:
                mgr.wait()
        return None

    group = dist.new_group(backend="gloo")
    rows: dict[str, list[float]] = {"former full gather + full hash": [], "dcp (hash deferred)": [],
                                    "dcp + hash waited for": [], "background hash (off the critical path)": [],
                                    "dcp async: blocking part": [], "dcp async: until committed": []}
    for _ in range(args.reps):
        rows["former full gather + full hash"].append(timed(runtime, former))
        rows["dcp (hash deferred)"].append(timed(runtime, dcp))
        rows["background hash (off the critical path)"].append(timed(runtime, mgr.wait))
        rows["dcp + hash waited for"].append(timed(runtime, lambda: dcp(wait_for_hashes=True)))
        runtime.barrier()
        start = time.perf_counter()
        future, s = dcp(asynchronous=True)
        rows["dcp async: blocking part"].append(time.perf_counter() - start)
        future.result()
        if runtime.is_main:
            mgr.commit(s)
        runtime.barrier()
        rows["dcp async: until committed"].append(time.perf_counter() - start)
        mgr.wait()
    if runtime.is_main:
        sizes = {name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 2**20
                 for name, p in (("former", root / "former" / "step"), ("dcp", mgr.step_dirs()[-1][1]))}
        result = {"parameters": n_params, "world_size": runtime.world_size, "reps": args.reps,
                  "checkpoint_MiB": {k: round(v, 1) for k, v in sizes.items()},
                  "seconds_median": {k: round(statistics.median(v), 3) for k, v in rows.items()},
                  "seconds_all": {k: [round(x, 3) for x in v] for k, v in rows.items()}}
        print(json.dumps(result, indent=2))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2))
        shutil.rmtree(root, ignore_errors=True)
    runtime.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
