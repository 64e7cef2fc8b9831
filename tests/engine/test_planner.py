"""The memory planner: fake-tensor peaks against a real run of the same step, sharding seen by the fake
process group, MoE and preference batches plannable without data."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from lfm2_train.engine.planner import StepMemory, measure_step
from lfm2_train.model import get_preset
from lfm2_train.model.config import LFM2Config


def _cfg(stage: str = "pretrain", backend: str = "none", precision: str = "fp32", accum: int = 1,
         rows: int = 2, seq: int = 128):
    return OmegaConf.create({
        "stage": {"name": stage, "k": 8, "kd": {"method": "decoupled", "temperature": 2.0, "weight": "teacher_mass",
                                                "weight_value": 1.0, "tau_squared": True, "kd_weight": 1.0}},
        "data": {"seq_len": seq},
        "trainer": {"micro_batch_size": rows, "grad_accum": accum, "precision": precision,
                    "activation_checkpointing": False, "compile": False, "compile_backend": "inductor"},
        "distributed": {"backend": backend, "zero_stage": 2, "dist_backend": None, "deepspeed_config": {}},
        "optim": {"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "no_decay": ["norm"],
                  "grad_clip": 1.0},
    })


def _model(**changes) -> LFM2Config:
    base = get_preset("tiny").to_dict()
    base.update({"hidden_size": 128, "intermediate_size": 384, **changes})
    return LFM2Config.from_dict(base)


def test_fake_peak_is_within_ten_percent_of_the_real_peak():
    """The same step on real tensors (a few hundred MB) and on fake ones: the planner's numbers hold."""
    cfg, model = _cfg(rows=4, seq=256, accum=2), _model(vocab_size=4096)
    real = measure_step(cfg, model, 1, fake=False)
    fake = measure_step(cfg, model, 1, fake=True)
    assert real.peak > 20 * 2**20
    assert fake.peak == pytest.approx(real.peak, rel=0.10)
    assert fake.optimizer == real.optimizer and fake.params == real.params


def test_fsdp2_shards_parameters_and_optimizer_state_over_the_fake_world():
    model = _model()
    n_bytes = 4 * _param_count(model)
    one = measure_step(_cfg(backend="fsdp2"), model, 1)
    four = measure_step(_cfg(backend="fsdp2"), model, 4)
    assert one.optimizer == pytest.approx(2 * n_bytes, rel=0.02)  # AdamW: two fp32 moments
    assert four.optimizer == pytest.approx(one.optimizer / 4, rel=0.05)  # sharded (plus padding)
    assert four.peak < one.peak


def test_ddp_counts_one_flat_copy_of_the_gradients_for_its_buckets():
    model = _model()
    plain = measure_step(_cfg(backend="none"), model, 1)
    ddp = measure_step(_cfg(backend="ddp"), model, 8)
    n_bytes = 4 * _param_count(model)
    assert ddp.grads - plain.grads == n_bytes and ddp.peak - plain.peak == n_bytes


def test_moe_distill_and_preference_steps_plan_without_data():
    moe = LFM2Config.from_dict(get_preset("tiny-moe").to_dict())
    for stage in ("distill", "preference"):
        m = measure_step(_cfg(stage=stage, backend="fsdp2", precision="bf16", accum=2), moe, 2)
        assert isinstance(m, StepMemory) and m.activations > 0 and m.peak == (
            m.params + m.grads + m.optimizer + m.activations)


def test_stages_that_do_not_train_and_deepspeed_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="does not train"):
        measure_step(_cfg(stage="eval"), _model(), 1)
    with pytest.raises(ValueError, match="fsdp2"):
        measure_step(_cfg(backend="deepspeed"), _model(), 2)


def _param_count(config: LFM2Config) -> int:
    from lfm2_train.model import LFM2ForCausalLM

    return LFM2ForCausalLM(config).num_parameters()


def test_moe_fake_peak_with_balanced_batched_experts_is_within_ten_percent_of_real_routing():
    """The planner's balanced, batched experts hold the same tensors as the real per-expert loop."""
    base = get_preset("tiny-moe").to_dict()
    base.update({"vocab_size": 2048, "hidden_size": 128, "moe_intermediate_size": 128})
    moe = LFM2Config.from_dict(base)
    cfg = _cfg(rows=4, seq=256, accum=2)
    real = measure_step(cfg, moe, 1, fake=False)
    fake = measure_step(cfg, moe, 1, fake=True)
    assert fake.peak == pytest.approx(real.peak, rel=0.10)
