"""bench/gpu_check.py at toy size on the CPU: every check runs and the table is pasteable markdown."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_model_checks_run_at_toy_size_and_print_a_table(capsys):
    code = _module().main(["--device", "cpu", "--tiny", "--only", "throughput,packing,kd"])
    out = capsys.readouterr().out
    assert code == 0
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| check | result | detail |"
    assert all(line.count("|") == 4 for line in table)  # no stray pipes inside a cell
    assert any("packed == unpacked (sdpa" in line and "| ok |" in line for line in table)
    assert any("tok/s" in line for line in table) and any("KD step" in line for line in table)


def test_a_failing_check_becomes_a_failed_row_not_a_crash(capsys, monkeypatch):
    module = _module()

    def broken(*_args):
        raise RuntimeError("no | such | thing")

    monkeypatch.setattr(module, "check_packing", broken)
    assert module.main(["--device", "cpu", "--tiny", "--only", "packing"]) == 1
    assert "| packing | FAILED | RuntimeError: no / such / thing |" in capsys.readouterr().out


@pytest.mark.slow
def test_the_script_runs_every_check_including_training_through_a_forced_process_group(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| train ddp, 1 rank, gloo group forced on | ok |" in out.stdout
    assert "| train fsdp2, 1 rank, gloo group forced on | ok |" in out.stdout
