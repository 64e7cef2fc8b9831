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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..data.chat_sources import open_preference
from ..data.packed import split_documents
from ..data.preference import (
    EncodedPair,
    PairStream,
    PreferencePairs,
    collate_pairs,
    pairs_hash,
)
from ..data.ref_logps import reference_logps
from ..engine.distributed import Runtime, builds_on_meta
from ..engine.trainer import Trainer, TrainJob
from ..losses.preference import PreferenceLoss, pair_logps, pair_logps_split
from ..model.lora import disable_adapters
from .common import build_model, lora_enabled, setup_lora
from .sft import resolve_tokenizer


class PairLoss:
    """loss_fn for the trainer: (model, pair batch) -> (sum of per-pair losses, pairs, metric sums)."""

    def __init__(self, loss: PreferenceLoss) -> None:
        self.loss = loss

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        ref = batch.get("ref_logps")
        if self.loss.ld_alpha is None:
            logps, lengths = pair_logps(model, batch)  # (B, 2) each
            tails = ref_tails = None
        else:  # LD-DPO: ref_logps is (B, 2, 2) [total, tail] (`_ld_reference`)
            logps, lengths, tails = pair_logps_split(model, batch)
            ref, ref_tails = (ref[..., 0], ref[..., 1].to(logps.dtype)) if ref is not None else (None, None)
        per_pair, metrics = self.loss(logps, ref.to(logps.dtype) if ref is not None else None, lengths, tails,
                                      ref_tails)
        return per_pair.sum(), torch.tensor(per_pair.shape[0]), metrics


@torch.no_grad()
def pair_metrics(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], loss: PairLoss) -> dict[str, float]:
    """Per-pair means of the loss and its metrics over `batches` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        total, count, metrics = loss(model, {k: v.to(device) for k, v in batch.items()})
        sums["loss"] = sums.get("loss", 0.0) + float(total)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += int(count)
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}


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


def _batches(pairs: PreferencePairs, index: np.ndarray, pad_id: int, ref: np.ndarray | None, size: int,
             limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(0, len(index), size):
        idx = [int(i) for i in index[s:s + size]]
        out.append(collate_pairs([pairs.pairs[i] for i in idx], pad_id, ref, idx))
        if limit is not None and len(out) >= limit:
            break
    return out


def _ld_reference(pairs: list[EncodedPair], totals: np.ndarray, stage: DictConfig, reference: str, tokenizer: Any,
                  runtime: Runtime, model: torch.nn.Module | None = None,
                  reference_variant: str | None = None) -> np.ndarray:
    """LD-DPO's reference tails: (pairs, 2) totals -> (pairs, 2, 2) [total, tail past the shared length].

    pi_ref is causal, so its log-probs of a response's first k tokens are those of the response cut to k
    tokens: the shared part is one more cached pass over the pairs cut to the shorter response (its own
    content-addressed cache, or `<stage.ref_cache>/ld_shared`), and the tail is total - shared.
    """
    cut = [replace(p, chosen=p.chosen[:k], rejected=p.rejected[:k])
           for p in pairs for k in [min(len(p.chosen), len(p.rejected))]]
    shared, info = reference_logps(
        cut, data_hash=pairs_hash(cut), tokenizer_fingerprint=tokenizer.fingerprint(), reference=reference,
        pad_id=tokenizer.pad_token_id, directory=f"{stage.ref_cache}/ld_shared" if stage.ref_cache else None,
        overwrite=stage.ref_cache_overwrite, batch_pairs=stage.ref_batch_pairs, device=runtime.device,
        is_main=runtime.is_main, barrier=runtime.barrier, model=model, reference_variant=reference_variant)
    if runtime.is_main:
        print(f"preference: reference log-probs of the shared parts (ld_alpha) {info['status']} ({info['directory']})")
    return np.stack([totals, totals - shared], axis=-1)


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
                ref_values = _ld_reference(pairs.pairs, ref_values, stage, reference, tokenizer, runtime,
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
    val_batches = _batches(pairs, val, pad, ref_values, t.micro_batch_size, t.eval_batches or None) \
        if len(val) and t.eval_batches else []
    train_probe = _batches(pairs, train, pad, ref_values, t.micro_batch_size, max(len(val_batches), 4))
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
