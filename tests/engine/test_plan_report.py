"""A plan's verdict and table from given measurements: fits within the GPU memory minus the reserve, says
what to change when it does not, and converts FLOPs per token into tokens/s at the assumed MFU."""

from __future__ import annotations

import pytest

from lfm2_train.engine.flops import FlopsPerToken
from lfm2_train.engine.plan_report import GIB, Plan, markdown_table
from lfm2_train.engine.planner import StepMemory


def _plan(peak_gib: float, **changes) -> Plan:
    memory = StepMemory(params=GIB, grads=GIB, optimizer=2 * GIB, activations=int((peak_gib - 4) * GIB),
                        peak=int(peak_gib * GIB))
    fields = dict(recipe="r", stage="pretrain", preset="tiny", backend="fsdp2", gpus=4, seq_len=1024, rows_per_gpu=2,
                  grad_accum=3, memory=memory, flops=FlopsPerToken(matmul=6e9, attention=1e9, active_params=10**9),
                  params=10**9, gpu_memory_gb=80.0, reserved_gb=5.0, mfu=0.5, peak_tflops=700.0)
    return Plan(**{**fields, **changes})


def test_the_verdict_counts_the_reserve():
    assert _plan(75.0).fits and _plan(75.0).verdict().startswith("fits: 75.0 GiB per rank + 5 reserved")
    tight = _plan(75.5)
    assert not tight.fits and "DOES NOT FIT" in tight.verdict() and "trainer.micro_batch_size" in tight.verdict()
    assert _plan(10.0, memory=None).verdict() == "stage=pretrain does not train: nothing to plan"


def test_throughput_and_the_table():
    plan = _plan(40.0)
    assert plan.tokens_per_step == 2 * 4 * 3 * 1024
    assert plan.tokens_per_s_per_gpu == pytest.approx(0.5 * 700e12 / 7e9)
    assert "at MFU 0.5 of 700 TFLOP/s: 50,000 tokens/s per GPU" in plan.report()
    table = markdown_table([plan, _plan(79.0), _plan(1.0, memory=None, stage="eval")]).splitlines()
    assert len(table) == 5 and "| 40.0 | yes |" in table[2] and "**DOES NOT FIT**" in table[3]
    assert "no training step" in table[4]
