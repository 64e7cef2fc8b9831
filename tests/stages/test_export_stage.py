"""`stage=export` through Hydra: a GGUF file and a Hugging Face directory, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from hydra import compose, initialize
from hydra.errors import ConfigCompositionException

from lfm2_train.config import register_configs
from lfm2_train.model import LFM2ForCausalLM, get_preset
from lfm2_train.stages import run_stage
from lfm2_train.tokenizer import LFM2Tokenizer, tiny_tokenizer_path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("src") / "tiny"
    torch.manual_seed(0)
    LFM2ForCausalLM(get_preset("tiny")).save_pretrained(path)
    LFM2Tokenizer.from_pretrained(tiny_tokenizer_path()).save_pretrained(path)
    return path


def _cfg(out: Path, *overrides: str):
    register_configs()
    with initialize(version_base="1.3", config_path=None):
        return compose(config_name="lfm2_train", overrides=["stage=export", "logger=disabled",
                                                            f"output_dir={out}", *overrides])


def test_gguf(checkpoint, tmp_path):
    summary = run_stage(_cfg(tmp_path, "stage.format=gguf", "stage.dtype=q8_0", f"stage.source={checkpoint}"))
    path = tmp_path / "model-q8_0.gguf"
    assert summary["path"] == str(path) and summary["architecture"] == "lfm2"
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.file_type").contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert json.loads((tmp_path / "summary.json").read_text())["sha256"] == summary["sha256"]
    # model.init_from is the default source; f16 the default GGUF type; stage.output names the file
    summary = run_stage(_cfg(tmp_path / "b", "stage.format=gguf", f"model.init_from={checkpoint}",
                             f"stage.output={tmp_path / 'x.gguf'}", "stage.model_name=my-lfm2"))
    reader = gguf.GGUFReader(tmp_path / "x.gguf")
    assert summary["dtype"] == "f16" and reader.get_field("general.name").contents() == "my-lfm2"
    # stage.output_dtype: the output projection (tied: token_embd) in its own type
    summary = run_stage(_cfg(tmp_path / "c", "stage.format=gguf", "stage.dtype=q4_0", "stage.output_dtype=q8_0",
                             f"stage.source={checkpoint}"))
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(summary["path"]).tensors}
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0


def test_hf_recast(checkpoint, tmp_path):
    summary = run_stage(_cfg(tmp_path, f"stage.source={checkpoint}", "stage.dtype=bfloat16",
                             "stage.check_transformers=false"))
    final = Path(summary["final"])
    assert final == tmp_path / "model" and (final / "tokenizer.json").is_file()
    reloaded = LFM2ForCausalLM.from_pretrained(final, dtype=None)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    original = LFM2ForCausalLM.from_pretrained(checkpoint).state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key].to(value.dtype)), key


def test_refusals(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="stage.format='onnx'"):
        run_stage(_cfg(tmp_path, "stage.format=onnx", f"stage.source={checkpoint}"))
    with pytest.raises(ValueError, match="needs a model directory"):
        run_stage(_cfg(tmp_path, "stage.format=gguf"))
    with pytest.raises(ValueError, match="q3_k"):
        run_stage(_cfg(tmp_path, "stage.format=gguf", "stage.dtype=q3_k", f"stage.source={checkpoint}"))
    with pytest.raises(ValueError, match="stage.output_dtype='q6_k'"):
        run_stage(_cfg(tmp_path, "stage.format=gguf", "stage.output_dtype=q6_k", f"stage.source={checkpoint}"))
    with pytest.raises(ValueError, match="int8"):
        run_stage(_cfg(tmp_path, "stage.dtype=int8", f"stage.source={checkpoint}"))
    with pytest.raises(ConfigCompositionException):
        _cfg(tmp_path, "stage.formt=gguf")
