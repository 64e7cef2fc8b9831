"""`stage=preference`: length-normalised direct alignment on (prompt, chosen, rejected) pairs.

    python -m lfm2_train recipe=preference model.init_from=<sft run>/final stage.dataset=pairs.jsonl

The policy starts from `model.init_from` (the SFT checkpoint), which is also pi_ref unless
`stage.reference` names another directory. pi_ref's log-probs of every pair are computed once and
cached on disk (`data/ref_logps.py`); a run whose data, tokenizer and reference weights match a cache
never builds the reference model. Each step scores the chosen and the rejected response of every pair
with the policy (right-padded rows; log-probs summed over completion tokens only) and applies the
configured weighted sum of losses (`losses/preference.py`). The loss is a mean over pairs; logged
metrics are per-pair means: implicit rewards of chosen / rejected, their margin, pairwise accuracy,
each term's loss. `data.seq_len` bounds prompt + response (longer pairs are skipped), and
`data.val_fraction` / `data.val_max_documents` / `data.seed` hold out validation pairs.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..data.chat_sources import open_preference
from ..data.ld_reference import ld_reference_logps
from ..data.packed import split_documents
from ..data.pair_batches import pair_batches
from ..data.preference import PairStream
from ..data.ref_logps import reference_logps
from ..engine.distributed import Runtime, builds_on_meta
from ..engine.model_setup import build_model, lora_enabled, setup_lora
from ..engine.trainer import Trainer, TrainJob
from ..losses.pair_loss import PairLoss, pair_metrics
from ..losses.preference import PreferenceLoss
from ..model.lora import disable_adapters
from ..tokenizer import resolve_tokenizer


def _steps(epochs: float | None, n_train: int, pairs_per_step: int, max_steps: int) -> int:
    if epochs is None:
        return max_steps
    if epochs <= 0:
        raise ValueError(f"stage.epochs={epochs} must be > 0 (or null to let trainer.max_steps decide)")
    steps = math.floor(epochs * n_train / pairs_per_step)
    if steps < 1:
        raise ValueError(f"stage.epochs={epochs} over {n_train} training pairs is less than one step of "
                         f"{pairs_per_step} pairs; add pairs or epochs, or lower trainer.micro_batch_size")
    return steps


def build_job(cfg: DictConfig, runtime: Runtime) -> tuple[TrainJob, PairLoss, list[dict[str, torch.Tensor]]]:
    """-> (the job, its loss, a few training batches for the final pair metrics)."""
    stage, data_cfg, t = cfg.stage, cfg.data, cfg.trainer
    loss = PreferenceLoss.from_config(
        OmegaConf.to_container(stage.losses, resolve=True), stage.beta, stage.label_smoothing, stage.margin,
        conventions=stage.conventions, nll_reduction=stage.nll_reduction, ld_alpha=stage.ld_alpha,
        f_divergence_type=stage.f_divergence_type, f_alpha_divergence_coef=stage.f_alpha_divergence_coef,
        discopop_tau=stage.discopop_tau)
    reference = stage.reference or cfg.model.init_from
    if loss.needs_reference and not reference:
        raise ValueError("stage=preference needs pi_ref: set model.init_from (the SFT checkpoint, also the "
                         "default reference) or stage.reference=<HF directory>; only simpo is reference-free")
    tokenizer = resolve_tokenizer(stage, cfg.model.init_from)
    pairs = open_preference(stage, data_cfg, tokenizer, runtime)  # chat shards: data.path, or stage.dataset cached
    if runtime.is_main:
        print(f"preference: {pairs.describe()}")
    data_hash = pairs.data_hash()

    # LoRA: the policy is the frozen init_from plus adapters, so pi_ref = init_from is the policy with its
    # adapters disabled — reference log-probs (on a cache miss) come from it, never from a second copy.
    model, lora, base_as_reference = None, None, False
    if lora_enabled(cfg.model):
        model = build_model(cfg.model)
        lora = setup_lora(model, cfg.model, runtime.device, cfg.seed)
        model.to(runtime.device)
        base_as_reference = not stage.reference or str(stage.reference) == str(cfg.model.init_from)

    ref_values, ref_info = None, {"status": "not needed (reference-free loss)"}
    if loss.needs_reference:
        ref_model = model if base_as_reference else None
        variant = cfg.model.lora.quantize if ref_model is not None and cfg.model.lora.quantize != "none" else None
        with disable_adapters(model) if ref_model is not None else nullcontext():
            ref_values, ref_info = reference_logps(
                pairs.pairs, data_hash=data_hash, tokenizer_fingerprint=tokenizer.fingerprint(), reference=reference,
                pad_id=tokenizer.pad_token_id, directory=stage.ref_cache, overwrite=stage.ref_cache_overwrite,
                batch_pairs=stage.ref_batch_pairs, device=runtime.device, is_main=runtime.is_main,
                barrier=runtime.barrier, model=ref_model, reference_variant=variant)
            if runtime.is_main:
                print(f"preference: reference log-probs {ref_info['status']} ({ref_info['directory']})")
            if loss.ld_alpha is not None:
                ref_values = ld_reference_logps(pairs.pairs, ref_values, stage, reference, tokenizer, runtime,
                                           model=ref_model, reference_variant=variant)

    if model is None:
        model = build_model(cfg.model, meta=builds_on_meta(cfg))
    if data_cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"data.seq_len={data_cfg.seq_len} exceeds the model's max_position_embeddings="
                         f"{model.config.max_position_embeddings}")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}")
    train, val = split_documents(len(pairs), data_cfg.val_fraction, data_cfg.val_max_documents, data_cfg.seed)
    pairs_per_step = t.micro_batch_size * runtime.world_size * t.grad_accum
    steps = _steps(stage.epochs, len(train), pairs_per_step, t.max_steps)
    if steps != t.max_steps:
        if runtime.is_main:
            print(f"preference: stage.epochs={stage.epochs} over {len(train)} pairs -> trainer.max_steps={steps}")
        cfg.trainer.max_steps = steps

    pad = tokenizer.pad_token_id
    stream = PairStream([pairs.pairs[i] for i in train], pad, ref_values, seed=data_cfg.seed, index=train)
    val_batches = pair_batches(pairs, val, pad, ref_values, t.micro_batch_size, t.eval_batches or None) \
        if len(val) and t.eval_batches else []
    train_probe = pair_batches(pairs, train, pad, ref_values, t.micro_batch_size, max(len(val_batches), 4))
    pair_loss = PairLoss(loss)
    inputs: dict[str, Any] = {
        "dataset": pairs.source, "dataset_sha256": pairs.fingerprint, "pairs_hash": data_hash,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "init_from": cfg.model.init_from,
        "preset": cfg.model.preset, "reference": str(reference) if loss.needs_reference else None,
        "reference_weights_sha256": ref_info.get("key", {}).get("reference_weights_sha256"),
        "ref_cache": ref_info.get("directory"), "rows": pairs.n_rows, "skipped": dict(sorted(pairs.skipped.items())),
        "train_pairs": int(len(train)), "val_pairs": int(len(val)), "epochs": stage.epochs,
        "losses": [{"name": term.name, "weight": term.weight, "length_normalize": term.normalised}
                   for term in loss.terms],
        "beta": loss.beta, "label_smoothing": loss.label_smoothing, "margin": loss.margin,
        "conventions": loss.conventions, "nll_reduction": loss.nll_reduction, "ld_alpha": loss.ld_alpha,
        "f_divergence_type": loss.f_divergence_type, "f_alpha_divergence_coef": loss.f_alpha_divergence_coef,
        "discopop_tau": loss.discopop_tau,
        "lora": lora.to_peft_dict() if lora else None, "chat_shards": pairs.shards,
    }
    job = TrainJob(model=model, train=stream, loss_fn=pair_loss, val_batches=val_batches, tokenizer=tokenizer,
                   inputs=inputs, lora=lora)
    job.inputs["ref_cache_status"] = ref_info["status"]
    return job, pair_loss, train_probe


def run(cfg: DictConfig) -> dict[str, Any]:
    runtime = Runtime.from_env(cfg.distributed)
    job, pair_loss, train_probe = build_job(cfg, runtime)
    trainer = Trainer(cfg, job, runtime)
    summary = trainer.fit()
    summary["skipped"] = job.inputs["skipped"]
    summary["ref_cache"] = {"directory": job.inputs["ref_cache"], "status": job.inputs["ref_cache_status"]}
    if summary["status"] == "finished":
        model = trainer.backend.model  # every rank runs these forwards (collective under DDP / FSDP)
        summary["train_pairs"] = pair_metrics(model, train_probe, pair_loss)
        if job.val_batches:
            summary["val_pairs"] = pair_metrics(model, job.val_batches, pair_loss)
    if runtime.is_main:
        (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        val = summary.get("val_pairs", {})
        print(f"\npreference: {summary['status']} at step {summary['steps']} ({summary['seconds']}s); train loss "
              f"{summary.get('loss')}, val pairwise accuracy {val.get('accuracy')}, val reward margin "
              f"{val.get('reward_margin')}; output {Path(cfg.output_dir)}")
    return summary
