"""Peak resident memory of a streaming merge of three LFM2-350M-sized checkpoints.

Writes three random checkpoints with the `lfm2-350m` preset's exact tensor names and shapes (float32 on
disk by default, ~1.42 GB each; `--dtype bfloat16` for ~0.71 GB) into a temporary directory, tensor by
tensor, then runs one merge (`ties`, density 0.5, the two fine-tunes against the base by default) in a
child process and reads the child's peak RSS from `getrusage(RUSAGE_CHILDREN).ru_maxrss`. A second child
that only imports the package gives the fixed interpreter + torch cost. Target: peak RSS / size of one
checkpoint <= 1.5.

    PYTHONPATH=. python bench/bench_merge.py                       # 350M, fp32 on disk, ties
    PYTHONPATH=. python bench/bench_merge.py --method dare_ties --dtype bfloat16
    PYTHONPATH=. python bench/bench_merge.py --quick               # tiny preset smoke run
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHILD = """
import json, sys, time
from lfm2_train.merge import merge_checkpoints, parse_merge_config
config, out = json.loads(sys.argv[1]), sys.argv[2]
start = time.perf_counter()
summary = merge_checkpoints(parse_merge_config(config), out, hash_inputs=True)
summary["wall_s"] = round(time.perf_counter() - start, 2)
summary["vmhwm_kib"] = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
print(json.dumps(summary))
"""
IMPORT_ONLY = "import lfm2_train.merge, lfm2_train.model, safetensors"
WRITER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from bench.bench_merge import write_random_checkpoint
print(json.dumps(write_random_checkpoint(*json.loads(sys.argv[2]))))
"""


def write_random_checkpoint(path: str, preset: str, dtype_name: str, seed: int) -> int:
    """A checkpoint with the preset's tensors, written one tensor at a time; returns its weight bytes."""
    import torch

    from lfm2_train.merge.checks import expected_tensors
    from lfm2_train.merge.streaming import ShardedWriter
    from lfm2_train.model import get_preset

    dtype = getattr(torch, dtype_name)
    path = Path(path)
    config = get_preset(preset)
    shapes = expected_tensors(config)
    plan = [(k, s, torch.float32 if k.endswith("expert_bias") else dtype) for k, s in shapes.items()]
    writer = ShardedWriter(path, plan, max_shard_bytes=5 * 10**9)
    gen = torch.Generator().manual_seed(seed)
    for key, shape, dt in plan:
        writer.write(key, (torch.randn(shape, generator=gen) * 0.02).to(dt))
    files = writer.close()
    config.save(path, dtype=str(dtype).removeprefix("torch."))
    return sum(f.stat().st_size for f in files)


def run_child(code: str, *args: str) -> tuple[str, float]:
    """Run `code` in a fresh interpreter; -> (stdout, that child's peak RSS in MiB from wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode:
            raise RuntimeError(f"child failed:\n{err.read()[-4000:]}")
        return out.read(), usage.ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="lfm2-350m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--method", default="ties")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny preset smoke run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "merge.json"))
    args = ap.parse_args()
    if args.quick:
        args.preset = "tiny"
    work = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        sizes = [int(run_child(WRITER, str(REPO), json.dumps([str(work / f"m{i}"), args.preset, args.dtype, i]))[0])
                 for i in range(3)]
        print(f"wrote 3 x {sizes[0] / 1e9:.3f} GB ({args.dtype}) in {time.perf_counter() - t0:.1f}s", flush=True)
        params = {"weight": 1.0, "density": args.density}
        if args.method in ("linear", "model_stock", "slerp"):
            params = {"weight": 1.0} if args.method == "linear" else {}
        config = {"merge_method": args.method, "base_model": str(work / "m0"),
                  "models": [{"model": str(work / f"m{i}"), "parameters": params} for i in (1, 2)]}
        if args.method == "slerp":
            config = {"merge_method": "slerp", "base_model": str(work / "m0"), "parameters": {"t": 0.5},
                      "models": [str(work / "m0"), str(work / "m1")]}
        _, import_rss = run_child(IMPORT_ONLY)
        out, peak = run_child(CHILD, json.dumps(config), str(work / "merged"))
        summary = json.loads(out.strip().splitlines()[-1])
        ckpt_mib = sizes[0] / 2**20
        result = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0], "preset": args.preset,
            "dtype_on_disk": args.dtype, "method": args.method, "density": args.density,
            "checkpoint_mib": round(ckpt_mib, 1), "peak_rss_mib": round(peak, 1),
            "import_only_rss_mib": round(import_rss, 1), "peak_over_checkpoint": round(peak / ckpt_mib, 3),
            "child_vmhwm_mib": round(summary["vmhwm_kib"] / 1024, 1), "parent_rss_mib": round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "merge_wall_s": summary["wall_s"], "tensors": summary["tensors"],
        }
        print(json.dumps(result, indent=2))
        print(f"\npeak RSS {peak:.0f} MiB / checkpoint {ckpt_mib:.0f} MiB = {peak / ckpt_mib:.2f}x "
              f"(import alone {import_rss:.0f} MiB); target <= 1.5x")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
