"""Launcher wiring: each script with DRY_RUN=1 prints the exact command; the SLURM script's signal forwarding
and requeue decision run for real against stand-in `srun` / `scontrol` executables."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
OVERRIDES = ["recipe=lfm2-350m/pretrain", "data.path=/data/my mix", "'stage.prompts=[a, b]'", "+trainer.x=1"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in (
        "NPROC", "NPROC_PER_NODE", "NNODES", "MASTER_ADDR", "MASTER_PORT", "RUN_DIR", "HOSTFILE", "NUM_GPUS",
        "RDZV_ID", "NODE_RANK", "RDZV_BACKEND", "TORCHRUN", "DEEPSPEED", "INCLUDE", "EXCLUDE")}
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    env["PATH"] = f"{fake}:{env['PATH']}"
    env["FAKE_LOG"] = str(tmp_path)
    env.update(extra)
    return env


def _fake(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def _dry(script: str, tmp_path: Path, *args: str, **env: str) -> list[list[str]]:
    """The commands a launcher prints with DRY_RUN=1 (comment lines dropped), split like a shell would."""
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=_env(tmp_path, DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line and not line.startswith("#")]


def _fails(script: str, tmp_path: Path, *args: str, **env: str) -> str:
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env=_env(tmp_path, DRY_RUN="1", **env),
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode != 0 and not proc.stdout.strip(), proc.stdout
    return proc.stderr


def _opt(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def _passed_through(cmd: list[str]) -> list[str]:
    i = cmd.index("lfm2_train")
    assert cmd[i - 1] in ("-m", "--module")
    return cmd[i + 1:]


def test_torchrun_single(tmp_path):
    (cmd,) = _dry("torchrun_single.sh", tmp_path, *OVERRIDES, NPROC="4")
    assert cmd[:2] == ["torchrun", "--standalone"] and _opt(cmd, "--nproc_per_node") == "4"
    args = _passed_through(cmd)
    assert args[:4] == OVERRIDES  # quoting and spaces survive
    assert len(args) == 5 and args[4].startswith("hydra.run.dir=outputs/launch/")  # one dir for every rank
    (cmd,) = _dry("torchrun_single.sh", tmp_path, "stage=sft", "output_dir=/runs/a", NPROC="2",
                  TORCHRUN="python -m torch.distributed.run")
    assert cmd[:4] == ["python", "-m", "torch.distributed.run", "--standalone"]
    assert _passed_through(cmd) == ["stage=sft", "output_dir=/runs/a"]  # an explicit dir is kept, not doubled
    (cmd,) = _dry("torchrun_single.sh", tmp_path, "stage=sft", NPROC="2", RUN_DIR="/runs/b")
    assert _passed_through(cmd)[-1] == "hydra.run.dir=/runs/b"
    assert "NPROC=two" in _fails("torchrun_single.sh", tmp_path, NPROC="two")


def test_torchrun_multinode_c10d(tmp_path):
    (cmd,) = _dry("torchrun_multinode.sh", tmp_path, *OVERRIDES, NNODES="4", NPROC_PER_NODE="8",
                  MASTER_ADDR="node0", MASTER_PORT="29611", RDZV_ID="pt1", RUN_DIR="/shared/runs/pt1")
    assert cmd[0] == "torchrun" and _opt(cmd, "--nnodes") == "4" and _opt(cmd, "--nproc_per_node") == "8"
    assert _opt(cmd, "--rdzv_backend") == "c10d" and _opt(cmd, "--rdzv_endpoint") == "node0:29611"
    assert _opt(cmd, "--rdzv_id") == "pt1" and "--node_rank" not in cmd
    assert _passed_through(cmd) == [*OVERRIDES, "hydra.run.dir=/shared/runs/pt1"]
    (cmd,) = _dry("torchrun_multinode.sh", tmp_path, "hydra.run.dir=/shared/x", NNODES="2:4", NPROC_PER_NODE="1",
                  MASTER_ADDR="h", SLURM_JOB_ID="77")
    assert _opt(cmd, "--nnodes") == "2:4" and _opt(cmd, "--rdzv_id") == "77"
    assert _opt(cmd, "--rdzv_endpoint") == "h:29500" and _passed_through(cmd) == ["hydra.run.dir=/shared/x"]


def test_torchrun_multinode_static_and_refusals(tmp_path):
    (cmd,) = _dry("torchrun_multinode.sh", tmp_path, "stage=pretrain", NNODES="2", NPROC_PER_NODE="8",
                  MASTER_ADDR="node0", RDZV_BACKEND="static", NODE_RANK="1", RUN_DIR="/r")
    assert _opt(cmd, "--node_rank") == "1" and _opt(cmd, "--master_addr") == "node0" and "--rdzv_backend" not in cmd
    base = {"NNODES": "2", "NPROC_PER_NODE": "8", "MASTER_ADDR": "node0", "RUN_DIR": "/r"}
    assert "NNODES" in _fails("torchrun_multinode.sh", tmp_path, **{**base, "NNODES": ""})
    assert "MASTER_ADDR" in _fails("torchrun_multinode.sh", tmp_path, **{**base, "MASTER_ADDR": ""})
    assert "RUN_DIR" in _fails("torchrun_multinode.sh", tmp_path, **{**base, "RUN_DIR": ""})
    assert "NODE_RANK" in _fails("torchrun_multinode.sh", tmp_path, RDZV_BACKEND="static", **base)


def test_deepspeed_hostfile_and_single_node(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two nodes\nworker-0 slots=8\n\nworker-1 slots=8  # spare\n")
    proc = subprocess.run(["bash", str(LAUNCH / "deepspeed.sh"), *OVERRIDES, "distributed=zero3"],
                          env=_env(tmp_path, DRY_RUN="1", HOSTFILE=str(hostfile), RUN_DIR="/shared/r"),
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "# hostfile" in proc.stdout and "2 hosts, 16 slots" in proc.stdout
    (cmd,) = [shlex.split(line) for line in proc.stdout.splitlines() if not line.startswith("#")]
    assert cmd[0] == "deepspeed" and _opt(cmd, "--hostfile") == str(hostfile)
    assert _opt(cmd, "--master_addr") == "worker-0" and _opt(cmd, "--master_port") == "29500"
    assert "--no_local_rank" in cmd and cmd[cmd.index("lfm2_train") - 1] == "--module"
    assert _passed_through(cmd) == [*OVERRIDES, "distributed=zero3", "hydra.run.dir=/shared/r"]
    (cmd,) = _dry("deepspeed.sh", tmp_path, "distributed=zero2", NUM_GPUS="4", INCLUDE="localhost:0,1")
    assert _opt(cmd, "--num_gpus") == "4" and "--hostfile" not in cmd and _opt(cmd, "--include") == "localhost:0,1"
    (tmp_path / "hostfile").write_text("a slots=2\n")  # ./hostfile is picked up by default
    (cmd,) = _dry("deepspeed.sh", tmp_path, "distributed=zero2")
    assert _opt(cmd, "--hostfile") == "hostfile"
    hostfile.write_text("worker-0 slots=8\nworker-1 8\n")
    assert "line 2" in _fails("deepspeed.sh", tmp_path, HOSTFILE=str(hostfile))
    assert "does not exist" in _fails("deepspeed.sh", tmp_path, HOSTFILE=str(tmp_path / "nope"))


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[03-04]",
         "SLURM_GPUS_PER_NODE": "h100:8", "SLURM_JOB_NAME": "pt"}
SCONTROL = ('echo "$@" >> "$FAKE_LOG/scontrol.log"\n'
            'if [ "$1 $2" = "show hostnames" ]; then printf "gpu03\\ngpu04\\n"; fi\n')


def test_slurm_dry_run_wiring(tmp_path):
    _fake(tmp_path, "scontrol", SCONTROL)
    srun, per_node = _dry("slurm.sbatch", tmp_path, *OVERRIDES, REPO=str(REPO), **SLURM)
    assert srun[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[3] == str(LAUNCH / "torchrun_multinode.sh")
    run_dir = f"{REPO}/outputs/slurm/pt-4242"  # stable across requeues: the job id does not change
    assert srun[4:] == [*OVERRIDES, "trainer.resume=auto", f"hydra.run.dir={run_dir}"]
    assert per_node[0] == "torchrun" and _opt(per_node, "--nnodes") == "2" and _opt(per_node, "--nproc_per_node") == "8"
    assert _opt(per_node, "--rdzv_endpoint") == "gpu03:29742" and _opt(per_node, "--rdzv_id") == "4242"
    assert _passed_through(per_node) == srun[4:]
    srun, _ = _dry("slurm.sbatch", tmp_path, "trainer.resume=never", "output_dir=/o", REPO=str(REPO),
                   MASTER_ADDR="x", MASTER_PORT="1", **SLURM)
    assert srun[4:] == ["trainer.resume=never", "output_dir=/o"]
    head = (LAUNCH / "slurm.sbatch").read_text().split("\n#\n")[0]
    for directive in ("--signal=B:USR1@", "--requeue", "--open-mode=append", "--ntasks-per-node=1"):
        assert f"#SBATCH {directive}" in head
    assert "not inside a SLURM job" in _fails("slurm.sbatch", tmp_path, REPO=str(REPO))


# A stand-in for `srun <torchrun_multinode.sh> ...`: records its args; on SIGTERM writes the trainer's
# summary.json with FAKE_STATUS (what the real trainer does after checkpointing) and exits 0.
FAKE_SRUN = """echo "$@" > "$FAKE_LOG/srun.args"
run_dir=""; for a in "$@"; do case $a in hydra.run.dir=*) run_dir=${a#hydra.run.dir=};; esac; done
on_term() { echo TERM >> "$FAKE_LOG/srun.signals"; mkdir -p "$run_dir"
  printf '{"status": "%s"}' "$FAKE_STATUS" > "$run_dir/summary.json"; kill "$sleeper" 2>/dev/null; exit 0; }
trap on_term TERM
if [ -n "${FAKE_EXIT:-}" ]; then mkdir -p "$run_dir"; printf '{"status": "%s"}' "$FAKE_STATUS" > "$run_dir/summary.json"
  exit "$FAKE_EXIT"; fi
sleep 30 & sleeper=$!
touch "$FAKE_LOG/srun.started"
wait "$sleeper"
"""


def _slurm_run(tmp_path: Path, send: signal.Signals | None, **env: str) -> tuple[int, str, str]:
    _fake(tmp_path, "scontrol", SCONTROL)
    _fake(tmp_path, "srun", FAKE_SRUN)
    full = _env(tmp_path, REPO=str(REPO), RUN_DIR=str(tmp_path / "run"), **{**SLURM, **env})
    proc = subprocess.Popen(["bash", str(LAUNCH / "slurm.sbatch"), "stage=pretrain"], env=full, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if send is not None:
        deadline = time.monotonic() + 20
        while not (tmp_path / "srun.started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "fake srun did not start"
            time.sleep(0.05)
        proc.send_signal(send)
    out, _ = proc.communicate(timeout=30)
    log = (tmp_path / "scontrol.log").read_text() if (tmp_path / "scontrol.log").exists() else ""
    return proc.returncode, out, log


def test_slurm_time_limit_signal_checkpoints_then_requeues(tmp_path):
    code, out, log = _slurm_run(tmp_path, signal.SIGUSR1, FAKE_STATUS="interrupted")
    assert code == 0, out
    assert (tmp_path / "srun.signals").read_text().split() == ["TERM"]  # forwarded to the step
    assert "requeue 4242" in log
    assert f"hydra.run.dir={tmp_path / 'run'}" in (tmp_path / "srun.args").read_text()


def test_slurm_no_requeue_when_finished_failed_or_capped(tmp_path):
    (tmp_path / "a").mkdir()
    code, out, log = _slurm_run(tmp_path / "a", None, FAKE_EXIT="0", FAKE_STATUS="finished")
    assert code == 0 and "requeue" not in log, out
    (tmp_path / "b").mkdir()
    code, out, log = _slurm_run(tmp_path / "b", None, FAKE_EXIT="3", FAKE_STATUS="failed")
    assert code == 3 and "requeue" not in log, out  # a crash is not requeued (it would crash again)
    (tmp_path / "c").mkdir()
    code, out, log = _slurm_run(tmp_path / "c", signal.SIGUSR1, FAKE_STATUS="finished")
    assert code == 0 and "requeue" not in log, out  # the run ended in the same step the signal came
    (tmp_path / "d").mkdir()
    code, out, log = _slurm_run(tmp_path / "d", signal.SIGUSR1, FAKE_STATUS="interrupted", SLURM_RESTART_COUNT="5",
                                MAX_REQUEUES="5")
    assert code == 1 and "requeue" not in log and "MAX_REQUEUES=5" in out


@pytest.mark.parametrize("requeue_on_term", ["0", "1"])
def test_slurm_sigterm_checkpoints_and_requeues_only_when_asked(tmp_path, requeue_on_term):
    code, out, log = _slurm_run(tmp_path, signal.SIGTERM, FAKE_STATUS="interrupted", REQUEUE_ON_TERM=requeue_on_term)
    assert (tmp_path / "srun.signals").read_text().split() == ["TERM"], out
    assert ("requeue 4242" in log) == (requeue_on_term == "1")
    assert code == (0 if requeue_on_term == "1" else 75), out  # not requeued: "interrupted, re-run to continue"


@pytest.mark.slow
def test_torchrun_single_really_trains_two_ranks_into_one_run_dir(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    env = _env(tmp_path, NPROC="2", RUN_DIR=str(run_dir), PYTHONPATH=str(REPO), WANDB_MODE="disabled",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(LAUNCH / "torchrun_single.sh"), "stage=pretrain", "distributed=ddp",
                           f"data.path={tiny_dataset}", "logger=disabled", "trainer.progress_bar=false",
                           "trainer.max_steps=2", "trainer.micro_batch_size=2", "data.seq_len=32",
                           "trainer.eval_every=0"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"status": "finished"' in (run_dir / "summary.json").read_text()
    assert (run_dir / "final" / "config.json").is_file()
    assert not (tmp_path / "outputs").exists()  # no per-rank timestamped run directories
