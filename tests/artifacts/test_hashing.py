"""Stored digests stay what they were: every hash here is written into manifests and caches on disk, so the
values below (computed by the code these functions replaced) must never change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lfm2_train.artifacts import adapter_sha256, checkpoint_files, checkpoint_sha256, sha256_file, sha256_json
from lfm2_train.data.format import Manifest, ShardInfo
from lfm2_train.data.ref_logps import cache_key, key_digest, reference_weights_sha256


def _checkpoints(root: Path) -> tuple[Path, Path, Path]:
    ckpt = root / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "lfm2", "vocab_size": 512}\n')
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 4099)  # > one 1 MiB read
    (ckpt / "tokenizer.json").write_text("{}")  # not part of a model's identity
    sharded = root / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text('{"model_type": "lfm2"}\n')
    (sharded / "model-00001-of-00002.safetensors").write_bytes(b"a" * 3000)
    (sharded / "model-00002-of-00002.safetensors").write_bytes(b"b" * 5000)
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (sharded / "pytorch_model.bin").write_bytes(b"legacy")
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": "../ckpt", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
        "peft_type": "LORA"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"lora" * 777)
    return ckpt, sharded, adapter


def test_weights_hashes_keep_their_stored_values(tmp_path):
    ckpt, sharded, adapter = _checkpoints(tmp_path)
    assert sha256_file(ckpt / "model.safetensors") == hashlib.sha256((ckpt / "model.safetensors").read_bytes()
                                                                      ).hexdigest()
    # reference log-prob caches (`reference_weights_sha256`) and teacher caches (`weights_sha256` of the job)
    # both stored this digest of a checkpoint directory
    assert checkpoint_sha256(ckpt) == reference_weights_sha256(ckpt) == \
        "30fa0f64eef64a5d657a48ab87876e57ebe7001cb91935daa86a690fc5afea59"
    assert checkpoint_sha256(sharded) == "e833c2343643e55eb20ff382165b47e14a02691a15b66c63617b4257aaaf7c06"
    # a PEFT adapter: alone (merge inputs), and on top of its base (reference caches)
    assert adapter_sha256(adapter) == "6ef0b433d9827bb7bc79c90f46f2b43c78a6cb6ad6744f666f0b05ff102149a6"
    assert reference_weights_sha256(adapter) == \
        "8b7729a396cfacebe40fd91c19034f254c9845fa29a3eb1c55e3bb4dd1d00acd"


def test_checkpoint_identity_ignores_location_and_non_weight_files(tmp_path):
    ckpt, _, _ = _checkpoints(tmp_path)
    before = checkpoint_sha256(ckpt)
    (ckpt / "generation_config.json").write_text("{}")
    moved = ckpt.rename(tmp_path / "elsewhere")
    assert checkpoint_sha256(moved) == before
    assert [p.name for p in checkpoint_files(moved)] == ["config.json", "model.safetensors"]
    (moved / "model.safetensors").write_bytes(b"other weights")
    assert checkpoint_sha256(moved) != before


def test_a_directory_without_weights_has_no_identity(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no weight files"):
        checkpoint_sha256(tmp_path)


def test_settings_digests_keep_their_stored_values():
    # dataset manifest hash: ties scores, orders and teacher caches to their shards
    manifest = Manifest(tokenizer_fingerprint="f" * 64, vocab_size=512, dtype="uint16", separator_id=0,
                        shards=[ShardInfo("shard-00000", 10, 2, "a" * 64, "b" * 64)],
                        sources=[{"name": "x", "weight": 1.0}], fim={"rate": 0.5}, extra={"config_hash": "c" * 64})
    assert manifest.hash() == "078b21a40d9def27932cf59cea578b12f8b86c49b9b3dd3ebfed15be6aa69b15"
    # the reference cache's directory name under $LFM2_TRAIN_CACHE
    assert key_digest(cache_key("d" * 64, "e" * 64, "w" * 64)) == \
        "314a95372d5dbedcf939246d0cb87b54faa2a00814ef991ef195241300d2488b"
    # the tokenize job's config_hash / job_hash
    assert sha256_json({"b": [1, 2.5, None], "a": {"z": "é", "y": True}}) == \
        "e160182953d61573fd075b91a1b80e5c3c9f742c6e2a863bb52b40dc36483a8a"
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
