"""Peak resident memory of streaming merges of three LFM2-350M-sized checkpoints, every method, fp32 and bf16.

Writes three random checkpoints with the `lfm2-350m` preset's exact tensor names and shapes (float32:
~1.42 GB each; bfloat16: ~0.71 GB) into a temporary directory, tensor by tensor, once per dtype; then runs
each merge method (the two others against the first as base where the method takes a base; density 0.5)
in its own child process and reads that child's peak RSS from `os.wait4` (`ru_maxrss`); the parent never
imports torch. A child that only imports the package gives the fixed interpreter + torch cost.
Target: peak RSS / size of one checkpoint <= 1.5 for every method, bf16 included.

    PYTHONPATH=. python bench/bench_merge.py                                  # every method, bf16 and fp32
    PYTHONPATH=. python bench/bench_merge.py --dtypes bfloat16 --methods ties,della
    PYTHONPATH=. python bench/bench_merge.py --quick                          # tiny preset smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
config, out, hash_inputs = json.loads(sys.argv[1]), sys.argv[2], bool(int(sys.argv[3]))
start = time.perf_counter()
summary = merge_checkpoints(parse_merge_config(config), out, hash_inputs=hash_inputs)
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


METHODS = ("linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties",
           "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce", "nearswap",
           "passthrough")


def merge_config(method: str, work: Path, density: float) -> dict:
    """A mergekit configuration for `method` over m0 (base), m1, m2."""
    m = [str(work / f"m{i}") for i in range(3)]
    if method == "passthrough":
        return {"merge_method": method, "models": [m[0]]}
    if method in ("slerp", "nearswap"):
        return {"merge_method": method, "base_model": m[0], "models": m[:2],
                "parameters": {"t": 0.5 if method == "slerp" else 0.01}}
    if method == "karcher":
        return {"merge_method": method, "models": m}
    if method == "linear":
        return {"merge_method": method, "models": [{"model": p, "parameters": {"weight": 1.0}} for p in m]}
    params = {"weight": 1.0}
    if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"):
        params["density"] = density
    config = {"merge_method": method, "base_model": m[0],
              "models": [{"model": p, "parameters": params} for p in m[1:]]}
    if method in ("model_stock", "sce"):
        config["models"] = m[1:]
        config["parameters"] = {"select_topk": density} if method == "sce" else {}
    return config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="lfm2-350m")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated on-disk dtypes")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated merge methods")
    ap.add_argument("--density", type=float, default=0.5)
    ap.add_argument("--hash-inputs", action="store_true", help="sha256 every input file (as the stage does)")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny preset smoke run")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "merge.json"))
    args = ap.parse_args()
    if args.quick:
        args.preset = "tiny"
    _, import_rss = run_child(IMPORT_ONLY)
    results = []
    for dtype in args.dtypes.split(","):
        work = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            sizes = [int(run_child(WRITER, str(REPO), json.dumps([str(work / f"m{i}"), args.preset, dtype, i]))[0])
                     for i in range(3)]
            print(f"wrote 3 x {sizes[0] / 1e9:.3f} GB ({dtype}) in {time.perf_counter() - t0:.1f}s", flush=True)
            ckpt_mib = sizes[0] / 2**20
            for method in args.methods.split(","):
                config = merge_config(method, work, args.density)
                out, peak = run_child(CHILD, json.dumps(config), str(work / "merged"), str(int(args.hash_inputs)))
                shutil.rmtree(work / "merged", ignore_errors=True)
                summary = json.loads(out.strip().splitlines()[-1])
                row = {
                    "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_avg": round(os.getloadavg()[0], 1), "preset": args.preset, "dtype_on_disk": dtype,
                    "method": method, "density": args.density, "checkpoint_mib": round(ckpt_mib, 1),
                    "peak_rss_mib": round(peak, 1), "import_only_rss_mib": round(import_rss, 1),
                    "peak_over_checkpoint": round(peak / ckpt_mib, 3),
                    "child_vmhwm_mib": round(summary["vmhwm_kib"] / 1024, 1),
                    "merge_wall_s": summary["wall_s"], "tensors": summary["tensors"],
                }
                results.append(row)
                print(f"{dtype:9s} {method:17s} peak {peak:7.0f} MiB / checkpoint {ckpt_mib:.0f} MiB = "
                      f"{peak / ckpt_mib:.3f}x  ({summary['wall_s']:.0f} s, load {row['load_avg']})", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nimport alone {import_rss:.0f} MiB; target <= 1.5x")
    print("\n| method | " + " | ".join(f"{d} peak / ckpt" for d in args.dtypes.split(",")) + " |")
    print("|---|" + "---:|" * len(args.dtypes.split(",")))
    for method in args.methods.split(","):
        cells = []
        for d in args.dtypes.split(","):
            r = next((r for r in results if r["method"] == method and r["dtype_on_disk"] == d), None)
            cells.append(f"{r['peak_rss_mib']:.0f} MiB = {r['peak_over_checkpoint']:.2f}x" if r else "-")
        print(f"| {method} | " + " | ".join(cells) + " |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
