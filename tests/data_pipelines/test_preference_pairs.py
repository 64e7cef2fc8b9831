"""Semi-online pair builder: pool rules, drop reasons, the three judges, and a run on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from data_pipelines.judges import LLMJudge, RewardModelJudge, VerifierJudge, build_judge, parse_score
from data_pipelines.preference_pairs import Candidate, PreferencePairsConfig, build_pairs, choose_pair, run
from lfm2_train.data.preference import load_preference_pairs
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

USER = [{"role": "user", "content": "What is 2 + 3?"}]


class FixedJudge:
    """Scores responses from a dict (text -> score)."""

    def __init__(self, table):
        self.table = table

    def score(self, prompts, responses, rows):
        return [self.table.get(r) for r in responses]

    def describe(self):
        return {"kind": "fixed"}


def test_pool_rules_for_chosen_and_rejected():
    pool = [Candidate("a", "sample", True, 1.0), Candidate("b", "reference", True, 1.0),
            Candidate("c", "sample", False, 2.0), Candidate("d", "sample", True, 0.0),
            Candidate("e", "sample", True, 0.0)]
    chosen, rejected = choose_pair(pool)
    assert chosen.text == "a"  # unfinished "c" scores best but cannot be chosen; sample beats reference on a tie
    assert rejected.text == "d"  # earliest of the tied worst
    assert choose_pair([Candidate("a", "sample", True, 1.0)]) is None
    assert choose_pair([Candidate("a", "sample", False, 1.0), Candidate("b", "sample", False, 0.0)]) is None
    assert choose_pair([Candidate("a", "reference", True, 1.0), Candidate("b", "sample", False, 0.0)])[0].text == "a"


def test_build_pairs_counts_every_drop_reason():
    cfg = OmegaConf.structured(PreferencePairsConfig(model="m", output_dir="o", min_margin=0.5, min_score=0.5))
    rows = [{"prompt": USER, "references": [f"ref{i}"], "answer": 5} for i in range(7)] + \
           [{"prompt": [], "references": [], "answer": 0}]
    samples = [
        [Candidate("good", "sample"), Candidate("bad", "sample")],  # kept: good (1.0) vs bad (0.0)
        [Candidate("same", "sample"), Candidate("same", "sample")],  # duplicate; 1.0 vs ref 0.9: low margin
        [Candidate("x", "sample"), Candidate("y", "sample")],  # all 0.5: no margin
        [Candidate("close", "sample"), Candidate("x", "sample")],  # 0.7 vs ref 0.4: low margin
        [Candidate("low", "sample"), Candidate("lower", "sample")],  # best is ref 0.45 < min_score
        [Candidate("", "sample"), Candidate("unscored", "sample")],  # empty + unscored + unscored ref
        [Candidate("ref6", "sample"), Candidate("ref6", "sample")],  # every sample equals the reference
        [],  # no prompt
    ]
    table = {"good": 1.0, "bad": 0.0, "ref0": 0.5, "same": 1.0, "ref1": 0.9, "x": 0.5, "y": 0.5, "ref2": 0.5,
             "close": 0.7, "ref3": 0.4, "low": 0.4, "lower": -1.0, "ref4": 0.45, "ref6": 1.0}
    out, stats = build_pairs(rows, samples, FixedJudge(table), cfg)
    assert [r["prompt_index"] for r in out] == [0]
    assert out[0]["chosen"][0]["content"] == "good" and out[0]["rejected"][0]["content"] == "bad"
    assert out[0]["chosen_source"] == "sample" and out[0]["answer"] == 5 and out[0]["prompt"] == USER
    assert stats["dropped"] == {"bad_prompt": 1, "no_candidates": 1, "one_candidate": 1, "no_margin": 1,
                                "low_margin": 2, "low_score": 1}
    assert stats["duplicate_candidates"] == 3 and stats["empty_samples"] == 1 and stats["kept"] == 1
    assert stats["unscored_candidates"] == 2


def test_verifier_and_llm_judges():
    v = build_judge(OmegaConf.structured(PreferencePairsConfig(model="m", output_dir="o")).judge)
    assert isinstance(v, VerifierJudge)
    assert v.score([USER, USER], ["Answer: 5", "Answer: 6"], [{"answer": 5}, {"answer": 5}]) == [1.0, 0.0]
    with pytest.raises(KeyError, match="answer_key"):
        v.score([USER], ["5"], [{"solution": 5}])
    with pytest.raises(ValueError, match="module:function"):
        VerifierJudge("no_colon")
    with pytest.raises(ValueError, match="cannot be imported"):
        VerifierJudge("lfm2_train.tasks.arithmetic:nope")

    assert parse_score("I think... Score: 7.5 overall") == 7.5
    assert parse_score("Score: -2") == -2.0 and parse_score("no number here") is None
    seen = []

    def fake_generate(texts):
        seen.extend(texts)
        return ["Score: 9" if "Answer: 5" in t else "Score: 1" if "Answer: 6" in t else "dunno" for t in texts]

    judge = LLMJudge(fake_generate, template="Q={question} A={response} R={answer}")
    scores = judge.score([USER] * 3, ["Answer: 5", "Answer: 6", "hmm"], [{"answer": 5}] * 3)
    assert scores == [9.0, 1.0, None] and judge.describe()["unparsed"] == 1
    assert seen[0] == "Q=What is 2 + 3? A=Answer: 5 R=5"
    with pytest.raises(KeyError, match="available fields"):
        LLMJudge(fake_generate, template="{nope}").score([USER], ["x"], [{}])
    with pytest.raises(ValueError, match="judge.path"):
        build_judge(OmegaConf.create({"kind": "llm", "path": None}))


@pytest.mark.slow  # importing transformers' model classes alone takes ~10-20 s on a busy CI machine
def test_reward_model_judge_on_a_tiny_random_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    judge = RewardModelJudge(str(tmp_path / "rm"), batch_size=2)
    responses = ["Answer: 5", "Answer: 6", "a much longer answer: 5"]
    scores = judge.score([USER] * 3, responses, [{}] * 3)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores) and len(set(scores)) == 3
    alone = judge.score([USER], [responses[2]], [{}])  # padding in a batch does not change a score
    assert alone[0] == pytest.approx(scores[2], abs=1e-5)
    assert "<|im_start|>assistant" in judge.text(USER, "x")

    config.num_labels = 2
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    tok.save_pretrained(tmp_path / "cls")
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardModelJudge(str(tmp_path / "cls"))


def test_run_on_a_tiny_checkpoint_writes_loadable_pairs(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "ckpt"
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(ckpt)
    tok = LFM2Tokenizer.from_pretrained(tiny_tokenizer_path())
    tok.save_pretrained(ckpt)
    cfg = {"model": str(ckpt), "output_dir": str(tmp_path / "pairs"), "bundled_rows": 6, "n": 3,
           "max_new_tokens": 6, "batch_size": 4, "seed": 1}
    stats = run(cfg)
    # random weights never solve arithmetic: every pair is reference (1.0) vs a sample (0.0)
    assert stats["prompts"] == 6 and stats["samples"] == 18 and stats["kept"] == 6
    assert stats["sample_score_mean"] == 0.0 and stats["chosen_from_reference"] == 6
    lines = (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert all(r["score_chosen"] == 1.0 and r["score_rejected"] == 0.0 for r in rows)
    assert json.loads((tmp_path / "pairs" / "stats.json").read_text())["kept"] == 6
    pairs = load_preference_pairs(tmp_path / "pairs" / "pairs.jsonl", tok, max_length=256,
                                  cache_dir=str(tmp_path / "hf"))
    assert len(pairs) == 6 and not pairs.skipped
    with pytest.raises(FileExistsError, match="overwrite"):
        run(cfg)
    run({**cfg, "overwrite": True})
    assert (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines() == lines  # seeded: reproducible
