"""Semi-online preference pairs: sample from the model, judge, pair the best with the worst.

    python -m data_pipelines.preference_pairs model=outputs/sft/final output_dir=data/pairs n=5 temperature=1.0 \
        judge.kind=verifier judge.verifier=lfm2_train.tasks.arithmetic:verify min_margin=0.5

For each prompt: sample `n` responses from `model` (temperature sampling, seeded), add the prompt's
reference answer(s) to the pool, score every candidate with the judge (`judges.py`), take the best as
chosen and the worst as rejected, and keep the pair unless the score margin is below `min_margin`
(equal scores are never a pair) or the best score is below `min_score`. Every drop is counted by reason
(`DROP_REASONS`); `one_candidate` is a pool with one distinct text (all samples equal the reference).

Pool rules: empty responses are dropped; duplicate texts are scored once; a sample that hit
`max_new_tokens` without ending its turn may be *rejected* but never *chosen* (it would teach the model
not to stop). Ties for best prefer a sample over a reference answer (on-policy data is the point), then
the earlier one; ties for worst take the earlier sample.

Prompts come from a `datasets`-loadable file with a `messages` column (the prompt turns, optionally ending
in the reference assistant turn) or a `prompt` column (text or messages), plus the judge's answer column;
reference answers are the final assistant turn and/or `reference_field` (text or list of texts). With no
`prompts`, the bundled chat arithmetic task is generated from a seed.

Writes `<output_dir>/pairs.jsonl` (TRL conversational rows: prompt / chosen / rejected, plus the scores and
where each response came from, loadable by `stage=preference`) and `<output_dir>/stats.json` (counts kept and
dropped per reason, the mean judge score of the samples — the model's accuracy for a 0/1 verifier).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from lfm2_train.artifacts import write_text_atomic

from ._job import DataJob, without
from .judges import Judge, JudgeConfig, build_judge
from .scoring import as_config

DROP_REASONS = ("bad_prompt", "no_candidates", "one_candidate", "no_margin", "low_margin", "low_score")


@dataclass
class PreferencePairsConfig:
    model: str = MISSING  # checkpoint to sample from (the SFT output), with its tokenizer
    output_dir: str = MISSING  # directory for pairs.jsonl + stats.json
    prompts: str | None = None  # datasets-loadable prompts; None = the bundled chat arithmetic task
    split: str = "train"
    messages_field: str = "messages"  # or a `prompt` column (text or messages) when this one is absent
    reference_field: str | None = None  # extra reference answers (text or list of texts)
    bundled_rows: int = 256  # prompts=None: problems generated from bundled_seed
    bundled_seed: int = 1
    bundled_levels: list[int] | None = None  # prompts=None: task levels (tasks.arithmetic.LEVELS); None = all
    max_prompts: int | None = None
    n: int = 5  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    seed: int = 0
    batch_size: int = 16  # prompts per generate call (each repeated n times)
    include_reference: bool = True  # add the reference answer(s) to the pool
    min_margin: float = 0.0  # drop pairs whose chosen - rejected score is below this (equal scores always drop)
    min_score: float | None = None  # drop pairs whose chosen score is below this
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    device: str = "cpu"
    threads: int | None = None
    overwrite: bool = False
    cache_dir: str | None = None  # datasets cache for loading prompt files


@dataclass
class Candidate:
    text: str
    source: str  # sample | reference
    finished: bool = True
    score: float | None = None


def prompt_rows(cfg: DictConfig) -> tuple[list[dict[str, Any]], str]:
    """Rows with `prompt` (messages), `references` (texts) and the original columns; and the source name."""
    from lfm2_train.data.chat import normalize_messages
    from lfm2_train.data.chat_dataset import load_chat_rows

    levels = list(cfg.bundled_levels) if cfg.bundled_levels is not None else None
    data = load_chat_rows(cfg.prompts, split=cfg.split, bundled_n=cfg.bundled_rows, bundled_seed=cfg.bundled_seed,
                          bundled_levels=levels, cache_dir=cfg.cache_dir)
    rows = data.rows[: cfg.max_prompts] if cfg.max_prompts else data.rows
    out = []
    for row in rows:
        raw = row.get(cfg.messages_field) if cfg.messages_field in row else row.get("prompt")
        refs: list[str] = []
        try:
            msgs = [{"role": "user", "content": raw}] if isinstance(raw, str) else normalize_messages(raw)
        except ValueError:
            msgs = []
        if msgs and msgs[-1].get("role") == "assistant":
            refs.append(str(msgs[-1].get("content") or ""))
            msgs = msgs[:-1]
        extra = row.get(cfg.reference_field) if cfg.reference_field else None
        refs += [extra] if isinstance(extra, str) else list(extra or [])
        out.append({**row, "prompt": msgs, "references": [r for r in refs if r and r.strip()]})
    return out, data.source


def choose_pair(pool: Sequence[Candidate]) -> tuple[Candidate, Candidate] | None:
    """(chosen, rejected) by the pool rules in the module docstring; None when nothing can be chosen."""
    scored = [(i, c) for i, c in enumerate(pool) if c.score is not None]
    eligible = [(i, c) for i, c in scored if c.finished]
    if not eligible or len(scored) < 2:
        return None
    best = max(eligible, key=lambda ic: (ic[1].score, ic[1].source == "sample", -ic[0]))[1]
    worst = min(scored, key=lambda ic: (ic[1].score, ic[1].source != "sample", ic[0]))[1]
    return best, worst


def sample_responses(model: Any, tokenizer: Any, prompts: Sequence[list[dict[str, Any]]], cfg: DictConfig
                     ) -> list[list[Candidate]]:
    """`cfg.n` sampled responses per prompt (seeded per batch, so a run is reproducible)."""
    from lfm2_train.evaluation.arithmetic import stop_ids
    from lfm2_train.inference import SamplingConfig, generate

    stops = stop_ids(tokenizer, model)
    out: list[list[Candidate]] = []
    for b, s in enumerate(range(0, len(prompts), cfg.batch_size)):
        chunk = prompts[s:s + cfg.batch_size]
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True) for p in chunk]
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k, stop_token_ids=stops, seed=cfg.seed * 1_000_003 + b)
        gen = generate(model, [p for p in ids for _ in range(cfg.n)], sampling)
        for i in range(len(chunk)):
            cands = []
            for j in range(i * cfg.n, (i + 1) * cfg.n):
                text = tokenizer.decode(gen.tokens[j], skip_special_tokens=True).strip()
                cands.append(Candidate(text, "sample", gen.finish_reasons[j] == "stop"))
            out.append(cands)
    return out


def build_pairs(rows: Sequence[Mapping[str, Any]], samples: Sequence[Sequence[Candidate]], judge: Judge,
                cfg: DictConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge every pool and pair best with worst -> (output rows, stats)."""
    dropped: Counter = Counter()
    counts: Counter = Counter()
    pools: list[list[Candidate]] = []
    for row, cands in zip(rows, samples):
        pool, seen = [], set()
        refs = [Candidate(r, "reference") for r in row["references"]] if cfg.include_reference else []
        for c in [*cands, *refs]:
            if not c.text.strip():
                counts["empty_samples"] += 1
                continue
            if c.text in seen:
                counts["duplicate_candidates"] += 1
                continue
            seen.add(c.text)
            pool.append(c)
        counts["unfinished_samples"] += sum(not c.finished for c in cands)
        pools.append(pool)
    flat = [(i, c) for i, pool in enumerate(pools) for c in pool]
    scores = judge.score([rows[i]["prompt"] for i, _ in flat], [c.text for _, c in flat], [rows[i] for i, _ in flat])
    for (_, c), s in zip(flat, scores):
        c.score = s
    counts["unscored_candidates"] = sum(s is None for s in scores)
    sample_scores = [c.score for _, c in flat if c.source == "sample" and c.score is not None]

    out = []
    for i, (row, pool) in enumerate(zip(rows, pools)):
        if not row["prompt"]:
            dropped["bad_prompt"] += 1
            continue
        pair = choose_pair(pool)
        if pair is None:
            n_scored = sum(c.score is not None for c in pool)
            dropped["one_candidate" if n_scored == 1 else "no_candidates"] += 1
            continue
        chosen, rejected = pair
        margin = chosen.score - rejected.score
        if margin <= 0:
            dropped["no_margin"] += 1
        elif margin < cfg.min_margin:
            dropped["low_margin"] += 1
        elif cfg.min_score is not None and chosen.score < cfg.min_score:
            dropped["low_score"] += 1
        else:
            extra = {k: v for k, v in row.items() if k not in ("prompt", "references", cfg.messages_field, "chosen",
                                                                  "rejected")}
            out.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen.text}],
                        "rejected": [{"role": "assistant", "content": rejected.text}],
                        "score_chosen": chosen.score, "score_rejected": rejected.score,
                        "chosen_source": chosen.source, "rejected_source": rejected.source, "prompt_index": i,
                        **extra})
    stats = {"prompts": len(rows), "samples": sum(len(c) for c in samples), "kept": len(out),
             "dropped": {k: dropped.get(k, 0) for k in DROP_REASONS}, **dict(sorted(counts.items())),
             "sample_score_mean": sum(sample_scores) / len(sample_scores) if sample_scores else None,
             "chosen_from_reference": sum(r["chosen_source"] == "reference" for r in out),
             "judge": judge.describe()}
    return out, stats


def run(cfg: PreferencePairsConfig | DictConfig | Mapping[str, Any], judge: Judge | None = None) -> dict[str, Any]:
    """Build the pairs; `judge` overrides `cfg.judge` (a ready object, e.g. in tests). Returns the stats."""
    import torch

    from lfm2_train.data.ref_logps import reference_weights_sha256
    from lfm2_train.model import LFM2ForCausalLM
    from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path

    cfg = as_config(cfg, PreferencePairsConfig)
    if cfg.n < 1:
        raise ValueError(f"n={cfg.n}: sample at least one response per prompt")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.output_dir)
    if (out_dir / "pairs.jsonl").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out_dir / 'pairs.jsonl'} exists; pass overwrite=true to replace it")
    started = time.perf_counter()
    model_dir = Path(cfg.model)
    model = LFM2ForCausalLM.from_pretrained(model_dir, device=cfg.device).eval()
    tok_dir = model_dir if (model_dir / "tokenizer.json").is_file() else tiny_tokenizer_path()
    tokenizer = LFM2Tokenizer.from_pretrained(tok_dir)
    rows, source = prompt_rows(cfg)
    if not rows:
        raise ValueError(f"{source}: no prompts")
    judge = judge or build_judge(cfg.judge, cfg.device)
    usable = [r for r in rows if r["prompt"]]
    samples = iter(sample_responses(model, tokenizer, [r["prompt"] for r in usable], cfg))
    all_samples = [next(samples) if r["prompt"] else [] for r in rows]
    pairs, stats = build_pairs(rows, all_samples, judge, cfg)
    if not pairs:
        raise ValueError(f"no pair survived (dropped: {stats['dropped']}); lower min_margin / min_score, sample "
                         "more responses (n) or check the judge")
    out_dir.mkdir(parents=True, exist_ok=True)
    stats.update(source=source, model=str(model_dir), model_weights_sha256=reference_weights_sha256(model_dir),
                 config=OmegaConf.to_container(cfg, resolve=True), seconds=round(time.perf_counter() - started, 2),
                 output=str(out_dir / "pairs.jsonl"))
    write_text_atomic(out_dir / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    write_text_atomic(out_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    return stats


JOB = DataJob("preference_pairs", PreferencePairsConfig, run, summary=without("config"))
register_configs, main = JOB.register_configs, JOB.main

if __name__ == "__main__":
    main()
