"""What a person running stages by hand meets: a cluster recipe started without a launcher, a model whose
tokenizer differs from the bundled data's, data tokenized for another vocabulary, random weights, runs that
are never silent."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize

from lfm2_train.config import register_configs
from lfm2_train.data.format import DataFormatError
from lfm2_train.engine import trainer as trainer_module
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import train_bpe_tokenizer

QUIET = ["logger=disabled", "trainer.progress_bar=false"]


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[*QUIET, f"output_dir={out}", *overrides])


def test_a_ddp_recipe_without_a_launcher_runs_as_one_process(tmp_path, tiny_dataset, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    summary = run_stage(_cfg(tmp_path, "stage=pretrain", "distributed=ddp", f"data.path={tiny_dataset}",
                             "trainer.max_steps=2", "data.seq_len=32", "trainer.micro_batch_size=2"))
    assert summary["status"] == "finished"
    assert "distributed=ddp needs a launcher (torchrun, launch/*.sh); started as one process" in capsys.readouterr().out


def test_without_a_progress_bar_every_logged_step_prints_and_step_one_always_logs(tmp_path, tiny_dataset, capsys):
    run_stage(_cfg(tmp_path, "stage=pretrain", f"data.path={tiny_dataset}", "trainer.max_steps=4",
                   "trainer.log_every=3", "data.seq_len=32", "trainer.eval_every=0"))
    out = capsys.readouterr().out
    assert "pretrain step 1/4: loss" in out and "pretrain step 3/4: loss" in out
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 4]


def test_generate_without_weights_warns_that_they_are_random(tmp_path, capsys):
    run_stage(_cfg(tmp_path, "stage=generate", "stage.max_new_tokens=2", "stage.save_checkpoint=false"))
    assert "warning: model.init_from is not set: these are the random weights of the 'tiny' preset" in \
        capsys.readouterr().out


def test_data_for_another_vocabulary_is_refused(tmp_path, tiny_dataset):
    with pytest.raises(DataFormatError, match="tokenized with a 512-token vocabulary but the model has 65536"):
        run_stage(_cfg(tmp_path, "stage=pretrain", f"data.path={tiny_dataset}", "model=lfm2-350m",
                       "trainer.max_steps=1", "data.seq_len=32"))


def test_bf16_on_a_cpu_without_native_bf16_warns(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setattr(trainer_module, "cpu_bf16_support", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        run_stage(_cfg(tmp_path, "stage=pretrain", f"data.path={tiny_dataset}", "trainer.precision=bf16",
                       "trainer.max_steps=1", "data.seq_len=32"))
    monkeypatch.setattr(trainer_module, "cpu_bf16_support", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        run_stage(_cfg(tmp_path / "b", "stage=pretrain", f"data.path={tiny_dataset}", "trainer.precision=bf16",
                       "trainer.max_steps=1", "data.seq_len=32"))


@pytest.mark.slow
def test_eval_of_a_model_with_its_own_tokenizer_needs_no_data_path(tmp_path, make_texts, monkeypatch):
    """The bundled corpus is tokenized once with the model's tokenizer instead of failing on a mismatch."""
    monkeypatch.setenv("LFM2_TRAIN_CACHE", str(tmp_path / "cache"))
    tok = train_bpe_tokenizer(make_texts(300, seed=3), vocab_size=320)
    model_dir = tmp_path / "model"
    torch.manual_seed(0)
    config = get_preset("tiny")
    config.vocab_size = 320
    LFM2ForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    result = run_stage(_cfg(tmp_path / "run", "stage=eval", f"model.init_from={model_dir}", "data.seq_len=32",
                            "stage.tasks=[{kind: perplexity, max_documents: 8}]"))
    assert result["tasks"]["val"]["loss"] > 0 and result["tasks"]["val"]["n"] > 0
    (cached,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("bundled-")]
    assert json.loads((cached / "manifest.json").read_text())["tokenizer_fingerprint"] == tok.fingerprint()
