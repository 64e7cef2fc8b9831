"""validation_loss against the trainer's own validation; arithmetic accuracy on a hand-checked model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.data.format import DataFormatError
from lfm2_train.engine.distributed import Runtime
from lfm2_train.engine.job import build_job
from lfm2_train.engine.trainer import Trainer
from lfm2_train.evaluation import arithmetic_accuracy, make_runner, validation_loss
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tasks import make_problems


def test_validation_loss_equals_the_trainers_validation(tmp_path, tiny_dataset):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        cfg = compose(config_name="lfm2_train", overrides=[
            "stage=pretrain", "logger=disabled", "trainer.progress_bar=false", f"output_dir={tmp_path}",
            f"data.path={tiny_dataset}", "data.seq_len=32", "trainer.micro_batch_size=4",
            "trainer.eval_batches=10000"])
    job = build_job(cfg, Runtime())
    expected = Trainer(cfg, job).evaluate()
    job.model.train()
    got = validation_loss(job.model, tiny_dataset, seq_len=32, batch_size=4)
    assert got["loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]))
    assert job.model.training  # the caller's mode is restored
    # 400 documents, 2% held out = 8 documents; every token but the first of each is labelled.
    assert got["tokens"] > 8 * 10
    # A random model is close to uniform over the 512-token vocabulary.
    assert abs(got["loss"] - math.log(512)) < 0.1


def test_validation_loss_refuses_bad_input(tmp_path, tiny_dataset, make_dataset):
    model = LFM2ForCausalLM(get_preset("tiny"))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        validation_loss(model, tiny_dataset, seq_len=4096)
    one = make_dataset(tmp_path / "one", ["just one document"])
    with pytest.raises(DataFormatError, match="held-out"):
        validation_loss(model, one)


def test_arithmetic_accuracy_on_a_model_that_always_answers_4(tokenizer, bigram):
    # After any token the model says "4", after "4" it ends the turn: every response is "4".
    four = tokenizer.token_to_id("4")
    model = bigram({four: tokenizer.eos_token_id}, default=four)
    problems = make_problems(40, seed=3, levels=(0, 1))
    expected = sum(p.answer == 4 for p in problems)
    assert 0 < expected < 40  # the check means something
    got = arithmetic_accuracy(model, tokenizer, n=40, seed=3, levels=(0, 1), batch_size=7)
    assert got == {"accuracy": expected / 40, "n": 40, "correct": expected}


def test_generation_stops_at_end_of_turn_and_respects_the_token_limit(tokenizer, bigram):
    four = tokenizer.token_to_id("4")
    runner = make_runner(bigram({four: tokenizer.eos_token_id}, default=four))
    prompts = [[1, 6, 98], [1, 6, 98, 96, 279, 212]]  # different lengths: left padding
    assert runner.generate(prompts, 8, [tokenizer.eos_token_id]) == [[four, 7], [four, 7]]
    loop = make_runner(bigram({}, default=four))  # never stops
    assert loop.generate(prompts, 3, [tokenizer.eos_token_id]) == [[four] * 3] * 2


def test_loglikelihood_matches_a_full_forward_and_handles_padding():
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny")).eval()
    runner = make_runner(model, batch_size=3)
    requests = [([1, 40, 41, 42], [43, 44]), ([1, 50], [51]), ([1, 60, 61, 62, 63, 64, 65], [66, 67, 68]),
                ([1, 9], [10, 11, 12, 13])]
    got = runner.loglikelihood(requests)
    for (ctx, cont), (ll, greedy) in zip(requests, got):
        full = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(full).float()[0, :-1], -1)  # (T-1, V)
        targets = torch.tensor(ctx + cont)[1:]
        per_token = logp.gather(-1, targets[:, None])[:, 0]
        assert ll == pytest.approx(float(per_token[-len(cont):].sum()), abs=1e-4)
        assert greedy == bool((logp[-len(cont):].argmax(-1) == targets[-len(cont):]).all())
    with pytest.raises(ValueError, match="continuation is empty"):
        runner.loglikelihood([([1], [])])


def test_fast_runner_generates_the_reference_runners_tokens():
    torch.manual_seed(0)
    model = LFM2ForCausalLM(get_preset("tiny").replace(initializer_range=0.2)).eval()
    prompts = [[1, 5, 9, 13], [1, 7], [1, 2, 3, 4, 5, 6, 7, 8]]
    ref = make_runner(model, "reference", batch_size=2).generate(prompts, 12, stop_token_ids=[7])
    fast = make_runner(model, "fast", batch_size=2).generate(prompts, 12, stop_token_ids=[7])
    assert fast == ref and any(len(x) > 1 for x in ref)
