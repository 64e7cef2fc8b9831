from __future__ import annotations

import math

import pytest
import torch

from lfm2_train.engine.optim import LRSchedule, build_optimizer, param_groups
from lfm2_train.model import LFM2ForCausalLM, get_preset


def test_warmup_then_cosine_reaches_min():
    s = LRSchedule(lr=1.0, min_lr=0.1, max_steps=110, schedule="cosine", warmup_steps=10)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1)
    values = [s(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_plateau_then_decay():
    s = LRSchedule(lr=1.0, min_lr=0.0, max_steps=100, schedule="wsd", warmup_steps=0, decay_fraction=0.2)
    assert s(0) == s(79) == 1.0
    assert s(90) == pytest.approx(0.5)
    assert s(100) == pytest.approx(0.0)
    sq = LRSchedule(lr=1.0, min_lr=0.0, max_steps=100, schedule="wsd", decay_fraction=0.2, decay_shape="sqrt")
    assert sq(90) == pytest.approx(1 - math.sqrt(0.5))


def test_decay_schedule_for_midtraining_starts_decaying_at_once():
    s = LRSchedule(lr=1.0, min_lr=0.0, max_steps=10, schedule="decay", decay_shape="linear")
    assert [round(s(i), 3) for i in (0, 5, 10)] == [1.0, 0.5, 0.0]


def test_bad_schedule_names_the_key():
    with pytest.raises(ValueError, match="optim.schedule"):
        LRSchedule(lr=1.0, min_lr=0.0, max_steps=10, schedule="cosin")
    with pytest.raises(ValueError, match="optim.decay_shape"):
        LRSchedule(lr=1.0, min_lr=0.0, max_steps=10, decay_shape="exp")


def test_weight_decay_exclusions():
    model = LFM2ForCausalLM(get_preset("tiny"))
    decay, skip = param_groups(model, 0.1, ["norm", "embedding", "bias"])
    skip_ids = {id(p) for p in skip["params"]}
    assert id(model.model.embed_tokens.weight) in skip_ids  # tied head: same tensor, counted once
    assert id(model.model.embedding_norm.weight) in skip_ids
    assert id(model.model.layers[0].conv.in_proj.weight) not in skip_ids
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(skip["params"]) == n_unique
    all_decay = param_groups(model, 0.1, [])
    assert len(all_decay) == 1
    with pytest.raises(ValueError, match="no_decay"):
        param_groups(model, 0.1, ["norms"])


def test_optimizer_uses_groups():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                            "no_decay": ["norm", "embedding"]})
    opt = build_optimizer(LFM2ForCausalLM(get_preset("tiny")), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
