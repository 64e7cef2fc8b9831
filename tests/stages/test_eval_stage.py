"""`stage=eval` end to end on a saved tiny checkpoint: every task kind, the files written, and the numbers
equal to calling the evaluation functions directly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from omegaconf import OmegaConf

from lfm2_train.config import register_configs
from lfm2_train.evaluation import arithmetic_accuracy, make_runner, validation_loss
from lfm2_train.evaluation.tasks import parse_task, run_multiple_choice
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt")
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(out)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(out)
    return out


def _cfg(out: Path, ckpt: Path, data: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=[
            "stage=eval", "logger=disabled", f"output_dir={out}", f"model.init_from={ckpt}", f"data.path={data}",
            "data.seq_len=32", *overrides])


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
def test_eval_stage_runs_every_task_kind(tmp_path, checkpoint, tiny_dataset, capsys):
    gen = _write(tmp_path / "sums.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(5)])
    mc = _write(tmp_path / "pick.jsonl", [{"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
                                          {"prompt": "The fox", "choices": ["jumps", "sleeps"], "label": "jumps"}])
    cfg = _cfg(tmp_path / "run", checkpoint, tiny_dataset, "stage.tasks=[{kind:perplexity},{kind:arithmetic,n:6}]")
    tasks = OmegaConf.to_container(cfg.stage.tasks)
    tasks += [{"kind": "generation", "path": gen, "chat": False, "metric": "numeric"},
              {"kind": "multiple_choice", "path": mc, "name": "pick"}]
    cfg.stage.tasks = tasks
    summary = run_stage(cfg)

    out = tmp_path / "run"
    doc = json.loads((out / "eval_results.json").read_text())
    assert set(doc["tasks"]) == {"val", "arithmetic", "sums", "pick"}
    assert doc["params"] == LFM2ForCausalLM(get_preset("tiny")).num_parameters()
    table = (out / "eval_results.md").read_text()
    assert "| val | perplexity | ppl |" in table and "| pick | multiple_choice | acc_norm |" in table
    assert "| arithmetic | arithmetic | accuracy |" in capsys.readouterr().out
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert sum(s["task"] == "sums" for s in samples) == 5 and sum(s["task"] == "pick" for s in samples) == 2

    # The same numbers as the library functions on the same checkpoint.
    model = LFM2ForCausalLM.from_pretrained(checkpoint)
    tok = LFM2Tokenizer.from_pretrained(checkpoint)
    val = validation_loss(model, tiny_dataset, seq_len=32)
    assert doc["tasks"]["val"]["loss"] == pytest.approx(val["loss"], rel=1e-6)
    assert doc["tasks"]["val"]["n"] == val["tokens"]
    assert doc["tasks"]["arithmetic"]["accuracy"] == arithmetic_accuracy(model, tok, n=6)["accuracy"]
    direct = run_multiple_choice(parse_task({"kind": "multiple_choice", "path": mc}, 0), make_runner(model), tok)
    assert summary["tasks"]["pick"]["acc"] == direct.metrics["acc"]
    assert summary["tasks"]["sums"]["n"] == 5


def test_eval_stage_refuses_bad_tasks_before_loading(tmp_path, checkpoint, tiny_dataset):
    with pytest.raises(ValueError, match=r"stage.tasks\[0\].kind='rouge'"):
        run_stage(_cfg(tmp_path, checkpoint, tiny_dataset, "stage.tasks=[{kind:rouge}]"))
    with pytest.raises(ValueError, match="duplicate names"):
        run_stage(_cfg(tmp_path, checkpoint, tiny_dataset, "stage.tasks=[{kind:arithmetic},{kind:arithmetic}]"))
    with pytest.raises(ValueError, match="stage.dtype"):
        run_stage(_cfg(tmp_path, checkpoint, tiny_dataset, "stage.dtype=int4"))


@pytest.mark.slow
def test_eval_stage_lm_eval_task(tmp_path, checkpoint, tiny_dataset):
    pytest.importorskip("lm_eval")
    mc = _write(tmp_path / "pick.jsonl", [{"prompt": "2 + 2 =", "choices": ["4", "5", "22"], "label": 0},
                                          {"prompt": "The fox", "choices": ["jumps", "sleeps"], "label": 0}])
    (tmp_path / "pick.yaml").write_text(
        f"task: pick_h\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {mc}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{prompt}}\"\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    cfg = _cfg(tmp_path / "run", checkpoint, tiny_dataset)
    cfg.stage.tasks = [{"kind": "lm_eval", "tasks": ["pick_h"], "include_path": str(tmp_path)},
                       {"kind": "multiple_choice", "path": mc}]
    tasks = run_stage(cfg)["tasks"]
    # The harness (target delimiter " ") and our own code (choice_prefix " ") score the same requests.
    assert tasks["lm_eval/pick_h"]["acc"] == tasks["pick"]["acc"]
    assert tasks["lm_eval/pick_h"]["acc_norm"] == tasks["pick"]["acc_norm"]
    assert tasks["lm_eval/pick_h"]["n"] == 2


@pytest.mark.parametrize("quant", ["w8a8", "q4_0"])
def test_eval_stage_generates_with_a_quantized_deployment(tmp_path, checkpoint, tiny_dataset, quant, monkeypatch):
    """stage.quant builds the fast path with quantized weights, and the generation task's responses are the
    ones that quantized path gives when called directly."""
    from lfm2_train.evaluation.tasks import run_generation
    from lfm2_train.inference.fast import FastLFM2

    built = []
    original = FastLFM2.from_model.__func__

    def spy(cls, model, **kw):
        built.append(kw.get("quant"))
        return original(cls, model, **kw)

    monkeypatch.setattr(FastLFM2, "from_model", classmethod(spy))
    gen = _write(tmp_path / "sums.jsonl", [{"prompt": f"{i} + 1 =", "answer": str(i + 1)} for i in range(5)])
    cfg = _cfg(tmp_path / "run", checkpoint, tiny_dataset, "stage.runner=fast", f"stage.quant={quant}")
    cfg.stage.tasks = [{"kind": "generation", "path": gen, "chat": False, "metric": "numeric", "name": "sums"}]
    run_stage(cfg)
    assert built == [quant]
    samples = [json.loads(line) for line in (tmp_path / "run" / "eval_samples.jsonl").read_text().splitlines()]
    model = LFM2ForCausalLM.from_pretrained(checkpoint).eval()
    tok = LFM2Tokenizer.from_pretrained(checkpoint)
    spec = parse_task({"kind": "generation", "path": gen, "chat": False, "metric": "numeric", "name": "sums"}, 0)
    direct = run_generation(spec, make_runner(model, "fast", quant=quant), tok)
    assert len(samples) == 5 and [s["response"] for s in samples] == [s["response"] for s in direct.samples]


def test_eval_stage_refuses_quant_without_the_fast_runner(tmp_path, checkpoint, tiny_dataset):
    cfg = _cfg(tmp_path / "run", checkpoint, tiny_dataset, "stage.quant=w8a8")
    with pytest.raises(ValueError, match="stage.runner=fast"):
        run_stage(cfg)
    with pytest.raises(ValueError, match="stage.quant"):
        run_stage(_cfg(tmp_path / "run2", checkpoint, tiny_dataset, "stage.runner=fast", "stage.quant=int4"))
