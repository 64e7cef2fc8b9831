"""The chunked top-K head equals a full log-softmax's top K (with bias, logit scale and soft-capping), and a
teacher directory's format is read from its config.json before any weight loads."""

from __future__ import annotations

import json

import pytest
import torch

from lfm2_train.inference.teachers import teacher_format, topk_head


def test_topk_head_equals_the_full_log_softmax_chunk_by_chunk():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16, generator=g), torch.randn(100, 16, generator=g), torch.randn(100)
    ids, lp = topk_head(hidden, weight, 5, bias=bias, scale=0.5, softcap=3.0, chunk_size=8)
    logits = torch.tanh((hidden @ weight.T + bias) * 0.5 / 3.0) * 3.0
    ref_lp, ref_ids = torch.log_softmax(logits, dim=-1).topk(5)
    assert ids.dtype == torch.long and lp.dtype == torch.float32 and ids.shape == (37, 5)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(lp, ref_lp)


def test_teacher_format_from_config_json(tmp_path):
    for name, model_type in (("ours", "lfm2_moe"), ("llama", "llama")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert teacher_format(tmp_path / "ours", "auto") == ("lfm2", "lfm2_moe")
    assert teacher_format(tmp_path / "llama", "auto") == ("transformers", "llama")
    assert teacher_format(tmp_path / "llama", "lfm2") == ("lfm2", "llama")
    with pytest.raises(ValueError, match="stage.teacher_format='onnx'"):
        teacher_format(tmp_path / "llama", "onnx")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face checkpoint directory"):
        teacher_format(tmp_path, "auto")
