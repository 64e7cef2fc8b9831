"""The exported GGUF file run by llama.cpp (through llama-cpp-python, the optional `deploy` extra): same
token ids for a chat prompt, logits within 1e-3 of ours in f32, the same greedy continuation. Skipped where
llama-cpp-python is not installed; docs/DEPLOY.md records a run.

llama.cpp keeps its KV cache in f16 by default, which alone moves these logits by ~5e-3; the comparison
uses an f32 cache (`type_k` / `type_v`) so that it measures the file, not that runtime setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lfm2_train.export import export_gguf
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.tokenizer import LFM2Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")

MESSAGES = [{"role": "user", "content": "What is 12 + 7? Answer with the number."}]
GREEDY_TOKENS = 12


def ours_greedy(model: LFM2ForCausalLM, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


def test_f32_logits_and_greedy_tokens_match(model_dir, tmp_path):
    path = tmp_path / "m-f32.gguf"
    export_gguf(model_dir, path, "f32")
    model = LFM2ForCausalLM.from_pretrained(model_dir).eval()
    tok = LFM2Tokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, n_threads=1,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # the embedded tokenizer agrees

    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()  # (T, V)
    diff = float(np.abs(theirs - ref).max())
    assert diff <= 1e-3, f"llama.cpp f32 logits differ from ours by {diff:.2e}"
    try:
        assert llama_greedy(llm, ids, GREEDY_TOKENS) == ours_greedy(model, ids, GREEDY_TOKENS)
    finally:
        llm.close()
