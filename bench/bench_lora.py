"""LoRA vs full fine-tuning: training memory, tokens/s, and the task metric both reach.

Part 1 — the tiny chain's SFT step (chat arithmetic, levels 0-3, from the chain's distilled student): full SFT
with the chain's settings vs LoRA SFT (r=16, alpha=32, every linear layer + the embedding, LR 1e-2), each
trained to the end in its own process; then the chain's task metric (128 seeded problems, greedy) on both.
The student comes from `stage=chain stage.until=student` in `--workdir` (reused when already there).

Part 2 — the `lfm2-350m` preset on CPU (random init; memory does not depend on the values): a few SFT optimizer
steps with a small batch, full vs LoRA, each in its own process.

Memory is what the machine's load does not change: each process reports its peak RSS (VmHWM) and its RSS
after the model was built, and the bytes of training state (trainable parameters + gradients + AdamW's two
moments) are counted exactly. Time on a shared machine is noisy, so tokens/s are reported as the ratio of
runs made back to back in one invocation (`--reps` alternates full / LoRA to spread the noise).

    PYTHONPATH=. python bench/bench_lora.py                        # both parts (~15 min on 2 busy cores)
    PYTHONPATH=. python bench/bench_lora.py --skip-350m --reps 1   # the tiny task only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The tiny chain's SFT step (recipes/chains/tiny.yaml), minus the init_from it gets from the chain.
CHAIN_SFT = ["stage=sft", "stage.bundled_rows=3000", "stage.bundled_levels=[0,1,2,3]", "stage.epochs=4",
             "data.seq_len=128", "trainer.micro_batch_size=16", "optim.lr=5e-3", "optim.min_lr=5e-4",
             "optim.warmup_steps=10", "trainer.log_every=10", "trainer.checkpoint_every=0", "trainer.eval_batches=4",
             "logger=disabled", "trainer.progress_bar=false"]
# r=16 on every linear layer and the token embedding: on the tiny task the embedding adapter doubled LoRA's accuracy
# (0.09 -> 0.21), while r=64 (0.10) and LR 3e-2 (0.09) did not help (2026-12-03, one run each)
LORA = ["model.lora.r=16", "model.lora.lora_alpha=32", "optim.weight_decay=0",
        "model.lora.target_modules=[q_proj,k_proj,v_proj,out_proj,in_proj,w1,w2,w3,embed_tokens]"]
EVAL = {"n": 128, "seed": 12345, "levels": [0, 1, 2, 3]}  # the chain's task metric (stage.eval_problems / eval_seed)
M350 = ["stage=sft", "model=lfm2-350m", "stage.bundled_rows=200", "stage.epochs=null", "data.seq_len=256",
        "trainer.micro_batch_size=2", "trainer.eval_every=0", "trainer.eval_batches=0", "optim.warmup_steps=1",
        "logger=disabled", "trainer.progress_bar=false", "data.val_fraction=0", "trainer.resume=never"]


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith(field))) / 1024


# ---------------------------------------------------------------------------------------------- worker
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a child process: build the SFT job, train (to the end, or `steps` optimizer steps), measure."""
    import torch
    from hydra import compose, initialize

    from lfm2_train.config import register_configs
    from lfm2_train.engine.distributed import Runtime
    from lfm2_train.engine.trainer import Trainer
    from lfm2_train.stages.sft import build_job

    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[*spec["overrides"], f"output_dir={spec['out']}"])
    torch.manual_seed(cfg.seed)
    job = build_job(cfg, Runtime())
    trainer = Trainer(cfg, job, Runtime())
    rss_built = _rss_mb("VmRSS")
    params = {id(p): p for p in job.model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    state_bytes = 4 * trainable * 3  # fp32 gradient + AdamW exp_avg + exp_avg_sq per trainable parameter
    out: dict[str, Any] = {"trainable_params": trainable, "total_params": total, "rss_after_build_mb": rss_built,
                           "train_state_mb": state_bytes / 2**20, "weights_mb": 4 * total / 2**20}
    if spec.get("steps"):
        trainer.backend.model.train()
        times, tokens = [], []
        for _ in range(spec["steps"]):
            tick = time.perf_counter()
            metrics = trainer.train_step()
            trainer.step += 1
            times.append(time.perf_counter() - tick)
            tokens.append(metrics["tokens"] if metrics else 0)
        # the first step pays one-off allocation costs: time the rest
        out.update(steps=spec["steps"], tok_s=sum(tokens[1:]) / sum(times[1:]), step_s=times[1:],
                   loss=metrics["loss"] if metrics else None)
    else:
        summary = trainer.fit()
        out.update(steps=summary["steps"], tokens=summary["tokens"], seconds=summary["seconds"],
                   tok_s=summary["tokens"] / summary["seconds"], loss=summary["loss"], val_loss=summary.get("val_loss"))
        if spec.get("evaluate"):
            from lfm2_train.evaluation import arithmetic_accuracy
            from lfm2_train.model.peft_io import load_model
            from lfm2_train.tokenizer import LFM2Tokenizer

            final = Path(summary["final"])
            model = load_model(final).eval()
            acc = arithmetic_accuracy(model, LFM2Tokenizer.from_pretrained(final), n=EVAL["n"], seed=EVAL["seed"],
                                      levels=tuple(EVAL["levels"]))
            out["accuracy"] = acc["accuracy"]
            out["final_bytes"] = sum(f.stat().st_size for f in final.iterdir()
                                     if f.suffix == ".safetensors")
    out["peak_rss_mb"] = _rss_mb("VmHWM")
    return out


def _child(spec: dict[str, Any], label: str) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    shutil.rmtree(spec["out"], ignore_errors=True)  # a fresh run every time (its outputs are not kept)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"{label}: {json.dumps({k: v for k, v in result.items() if k != 'step_s'})}", flush=True)
    return result


def _base_accuracy(model_dir: Path) -> float:
    from lfm2_train.evaluation import arithmetic_accuracy
    from lfm2_train.model import LFM2ForCausalLM
    from lfm2_train.tokenizer import LFM2Tokenizer

    model = LFM2ForCausalLM.from_pretrained(model_dir).eval()
    return arithmetic_accuracy(model, LFM2Tokenizer.from_pretrained(model_dir), n=EVAL["n"], seed=EVAL["seed"],
                               levels=tuple(EVAL["levels"]))["accuracy"]


def student(workdir: Path) -> Path:
    found = sorted(workdir.glob("*-student/final"))
    if not found:
        env = dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
        subprocess.run([sys.executable, "-m", "lfm2_train", "stage=chain", "stage.until=student",
                        f"stage.workdir={workdir}", "logger=disabled", f"hydra.run.dir={workdir}/hydra"],
                       cwd=REPO, env=env, check=True)
        found = sorted(workdir.glob("*-student/final"))
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="outputs/bench_lora")
    ap.add_argument("--reps", type=int, default=1, help="full / LoRA pairs per part (alternating)")
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--steps-350m", type=int, default=3)
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--skip-350m", action="store_true")
    ap.add_argument("--out", default="bench/results/lora.json")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    workdir = (REPO / args.workdir).resolve()
    report: dict[str, Any] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                              "load_before": os.getloadavg()}
    if not args.skip_tiny:
        base = student(workdir / "chain")
        report["tiny"] = {"base": str(base), "base_accuracy": _base_accuracy(base), "runs": []}
        for rep in range(args.reps):
            for kind in ("full", "lora"):
                lr = [f"optim.lr={args.lora_lr}", f"optim.min_lr={args.lora_lr / 10}"]
                extra = [*LORA, *lr] if kind == "lora" else []
                spec = {"overrides": [*CHAIN_SFT, f"model.init_from={base}", *extra],
                        "out": str(workdir / f"tiny-{kind}-{rep}"), "evaluate": True}
                report["tiny"]["runs"].append({"kind": kind, "rep": rep, **_child(spec, f"tiny {kind} #{rep}")})
    if not args.skip_350m:
        report["350m"] = {"runs": []}
        for rep in range(args.reps):
            for kind in ("full", "lora"):
                spec = {"overrides": [*M350, *(LORA if kind == "lora" else [])],
                        "out": str(workdir / f"350m-{kind}-{rep}"), "steps": args.steps_350m}
                report["350m"]["runs"].append({"kind": kind, "rep": rep, **_child(spec, f"350m {kind} #{rep}")})
    report["load_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
