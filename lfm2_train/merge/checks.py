"""Compatibility checks run before a merge writes anything: architecture, vocabulary, tensor sets.

Merging is element-wise, so inputs must agree on every config field that decides a tensor's shape
or meaning (a different vocabulary with the same size would average unrelated token rows). Errors
name the field, the two directories, and the first tensor the difference reaches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.config import LFM2Config
from ..model.hf_io import CheckpointError, to_disk_tensors
from ..model.lfm2 import LFM2ForCausalLM
from .streaming import CheckpointSource


class MergeCompatibilityError(CheckpointError):
    """Inputs that cannot be merged: different architecture, vocabulary, shapes, or a missing tensor."""


# Fields that change a tensor's shape or what its rows mean. `head_size` / `ff_dim` are the built widths.
SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_size",
                "ff_dim", "conv_L_cache", "conv_bias", "tie_word_embeddings", "num_experts",
                "moe_intermediate_size", "use_expert_bias")
DEPTH_FIELDS = ("num_hidden_layers", "layer_types", "num_dense_layers")
# Fields that do not change shapes: differences are reported, the output takes the reference's value.
SOFT_FIELDS = ("rope_theta", "norm_eps", "max_position_embeddings", "num_experts_per_tok", "routed_scaling_factor",
               "norm_topk_prob", "bos_token_id", "eos_token_id", "pad_token_id")


def expected_tensors(config: LFM2Config) -> dict[str, tuple[int, ...]]:
    """On-disk tensor names and shapes a checkpoint with this config holds (tied head omitted)."""
    with torch.device("meta"):
        state = LFM2ForCausalLM(config).state_dict()
    return {key: tuple(t.shape) for key, t in to_disk_tensors(state, config)}


def check_tensor_set(source: CheckpointSource) -> None:
    """The checkpoint holds exactly the tensors its config.json implies, with those shapes."""
    expected = expected_tensors(source.config)
    for key, shape in expected.items():
        if key not in source.entries:
            raise MergeCompatibilityError(f"tensor {key} is missing from {source.path} (its config.json implies it); "
                                          "refusing to merge without it")
        if source.entries[key].shape != shape:
            raise MergeCompatibilityError(f"{source.path}: tensor {key} has shape {source.entries[key].shape}, "
                                          f"its config.json implies {shape}")
    unexpected = sorted(set(source.entries) - set(expected))
    if unexpected:
        raise MergeCompatibilityError(f"{source.path} holds tensor(s) its config.json does not describe: "
                                      f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")


def _first_difference(a: LFM2Config, b: LFM2Config) -> str:
    ea, eb = expected_tensors(a), expected_tensors(b)
    for key in [*ea, *(k for k in eb if k not in ea)]:
        if ea.get(key) != eb.get(key):
            return f"; first mismatching tensor {key}: {ea.get(key, 'absent')} vs {eb.get(key, 'absent')}"
    return ""


def check_configs(reference: CheckpointSource, others: list[CheckpointSource], same_depth: bool) -> list[str]:
    """Raise on a shape-changing difference; return notes for differences that do not change shapes."""
    notes: list[str] = []
    fields = SHAPE_FIELDS + (DEPTH_FIELDS if same_depth else ())
    for other in others:
        for name in fields:
            va, vb = getattr(reference.config, name), getattr(other.config, name)
            if va != vb:
                raise MergeCompatibilityError(
                    f"cannot merge {other.path} into {reference.path}: {name} differs ({vb!r} vs {va!r})"
                    f"{_first_difference(reference.config, other.config)}")
        for name in SOFT_FIELDS:
            va, vb = getattr(reference.config, name), getattr(other.config, name)
            if va != vb:
                notes.append(f"{name} differs: {other.path} has {vb!r}, the output keeps {va!r} from {reference.path}")
    return notes


def tokenizer_fingerprint(path: Path) -> str | None:
    if not (path / "tokenizer.json").is_file():
        return None
    from ..tokenizer import LFM2Tokenizer

    return LFM2Tokenizer.from_pretrained(path).fingerprint()


def check_tokenizers(paths: list[Path]) -> tuple[dict[str, str | None], list[str]]:
    """Every input that ships a tokenizer must ship the same vocabulary (fingerprint over vocab, merges and
    special tokens). Inputs without one are noted, and trusted on their vocab_size alone."""
    prints = {str(p): tokenizer_fingerprint(p) for p in paths}
    known = {p: fp for p, fp in prints.items() if fp is not None}
    notes = [f"{p} has no tokenizer.json: only its vocab_size was checked" for p, fp in prints.items() if fp is None]
    if known:
        ref_path, ref = next(iter(known.items()))
        for p, fp in known.items():
            if fp != ref:
                raise MergeCompatibilityError(
                    f"cannot merge {p} with {ref_path}: their tokenizers differ (fingerprints {fp[:12]} vs "
                    f"{ref[:12]}), so row i of model.embed_tokens.weight is a different token in each; "
                    "first mismatching tensor model.embed_tokens.weight")
    return prints, notes
