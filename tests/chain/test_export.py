"""The chain's export job: the HF directory, checked by loading it, and GGUF files beside it on request."""

from __future__ import annotations

import gguf
import torch

from lfm2_train.chain.export import export_model
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


def test_export_writes_hf_and_gguf(tmp_path):
    src = tmp_path / "final"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(src)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(src)
    out = tmp_path / "export"
    summary = export_model(src, out, check_transformers=False, gguf=["q8_0"])
    assert summary["final"] == str(out / "model") and (out / "model" / "model.safetensors").is_file()
    path = out / "model-q8_0.gguf"
    assert summary["gguf"]["q8_0"]["path"] == str(path)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "lfm2"
    assert reader.get_field("general.name").contents() == "model"
    assert export_model(src, tmp_path / "plain", check_transformers=False).get("gguf") is None
