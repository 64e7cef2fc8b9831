"""`stage=generate`: complete prompts with a checkpoint (or a random-weight preset for a smoke run)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..engine.model_setup import DTYPES, build_model
from ..hints import chain_command
from ..inference import SamplingConfig, generate
from ..tokenizer import checkpoint_tokenizer


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = cfg.stage
    if stage.dtype not in DTYPES:
        raise ValueError(f"stage.dtype={stage.dtype!r}; choose one of {sorted(DTYPES)}")
    model = build_model(cfg.model).to(DTYPES[stage.dtype]).eval()
    tokenizer = checkpoint_tokenizer(stage, cfg.model.init_from, model.config.vocab_size)
    if not cfg.model.init_from:
        hint = chain_command("generate")
        print(f"warning: model.init_from is not set: these are the random weights of the {cfg.model.preset!r} "
              f"preset, so the text is noise" + (f". A trained model: {hint}" if hint else ""))
    if stage.chat:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in stage.prompts]
    else:
        prompts = [[tokenizer.bos_token_id, *tokenizer.encode(p)] for p in stage.prompts]
    stops = {model.config.eos_token_id, tokenizer.eos_token_id}
    if tokenizer.eod_token_id is not None:
        stops.add(tokenizer.eod_token_id)
    sampling = SamplingConfig(
        max_new_tokens=stage.max_new_tokens, temperature=stage.temperature, top_k=stage.top_k,
        top_p=stage.top_p, min_p=stage.min_p, repetition_penalty=stage.repetition_penalty,
        stop_token_ids=sorted(stops), seed=cfg.seed,
    )
    start = time.perf_counter()
    out = generate(model, prompts, sampling)
    elapsed = time.perf_counter() - start
    n_new = sum(len(t) for t in out.tokens)

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for text, ids, reason in zip(stage.prompts, out.tokens, out.finish_reasons):
        completion = tokenizer.decode(ids, skip_special_tokens=True)
        records.append({"prompt": text, "completion": completion, "tokens": ids, "finish_reason": reason})
        print(f"\n>>> {text}\n{completion}\n[{len(ids)} tokens, {reason}]")
    with open(out_dir / "generations.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    if not cfg.model.init_from and stage.save_checkpoint:
        # A random-weight preset is still a valid Hugging Face checkpoint: keep it for later stages.
        model.save_pretrained(out_dir / "checkpoint")
        tokenizer.save_pretrained(out_dir / "checkpoint")
    summary = {"prompts": len(prompts), "new_tokens": n_new, "seconds": round(elapsed, 3),
               "tokens_per_s": round(n_new / max(elapsed, 1e-9), 1), "output_dir": str(out_dir)}
    print(f"\n{n_new} tokens in {elapsed:.2f}s ({summary['tokens_per_s']} tok/s); outputs in {out_dir}")
    return summary
