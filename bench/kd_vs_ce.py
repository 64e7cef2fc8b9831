"""Does distillation help? Pretrain a larger tiny teacher on the bundled corpus, cache its top-K, then train
the same small student twice with the same seed, data and steps: CE only vs CE + lambda * KD. Prints both
validation losses (plain CE on the same held-out documents).

    python bench/kd_vs_ce.py                       # defaults below, ~10 min on 2 cores
    python bench/kd_vs_ce.py --teacher-steps 60 --student-steps 40    # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hydra import compose, initialize  # noqa: E402

from lfm2_train.config import register_configs  # noqa: E402
from lfm2_train.stages import run_stage  # noqa: E402


def stage(out: Path, *overrides: str) -> dict:
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[f"output_dir={out}", "logger=disabled", "threads=1",
                                                           "trainer.progress_bar=false", *overrides])
    return run_stage(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/kd_vs_ce")
    p.add_argument("--teacher-steps", type=int, default=400)
    p.add_argument("--student-steps", type=int, default=200)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=1.0)
    args = p.parse_args()
    out = Path(args.out)
    common = ["data.seq_len=256", "trainer.micro_batch_size=8", "trainer.eval_batches=16", "trainer.checkpoint_every=0"]
    t0 = time.time()
    teacher = stage(out / "teacher", *common, f"trainer.max_steps={args.teacher_steps}",
                    f"trainer.eval_every={args.teacher_steps}", "+model.overrides.hidden_size=128",
                    "+model.overrides.intermediate_size=384")
    stage(out / "cache", "stage=cache_teacher", f"stage.teacher={teacher['final']}", f"stage.k={args.k}",
          "stage.progress_bar=false")
    student = [*common, f"trainer.max_steps={args.student_steps}", f"trainer.eval_every={args.student_steps}"]
    ce = stage(out / "student_ce", *student)
    kd = stage(out / "student_kd", "stage=distill", f"stage.teacher_cache={out / 'cache' / 'teacher_cache'}",
               f"stage.k={args.k}", f"stage.kd.temperature={args.temperature}", f"stage.kd.kd_weight={args.kd_weight}",
               *student)
    result = {"teacher_val": teacher["val_loss"], "student_ce_val": ce["val_loss"], "student_kd_val": kd["val_loss"],
              "teacher_steps": args.teacher_steps, "student_steps": args.student_steps, "k": args.k,
              "temperature": args.temperature, "kd_weight": args.kd_weight,
              "minutes": round((time.time() - t0) / 60, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
