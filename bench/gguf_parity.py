"""llama.cpp parity of the GGUF export: our model vs the exported file run by llama.cpp, per export dtype.

For each model directory and dtype: export with `lfm2_train.export.export_gguf`, load the file with
llama-cpp-python (the `deploy` extra), and on a chat prompt report the file size, the largest absolute logit
difference over all prompt positions (and relative to the logits' standard deviation), the share of prompt
positions whose top-1 token agrees, and how many of `--new-tokens` greedy tokens agree before the first
divergence. llama.cpp runs with an f32 KV cache so that the numbers measure the file; the largest difference
with llama.cpp's default f16 KV cache is reported beside them. Without `--model`, the two random tiny
models of tests/export (dense and MoE) are used.

    pip install -e .[deploy]       # compiles llama.cpp (minutes)
    PYTHONPATH=. python bench/gguf_parity.py --model outputs/chain-tiny/13-export/model --dtypes f32,q8_0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from lfm2_train.export import export_gguf, gguf_dtypes
from lfm2_train.model import LFM2ForCausalLM
from lfm2_train.tokenizer import LFM2Tokenizer

MESSAGES = [{"role": "user", "content": "What is 12 + 7? Answer with the number."}]


def greedy_ours(model: LFM2ForCausalLM, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids):]


def greedy_llama(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def measure(model_dir: Path, dtype: str, work: Path, new_tokens: int, threads: int) -> dict:
    import llama_cpp

    path = work / f"{model_dir.name}-{dtype}.gguf"
    summary = export_gguf(model_dir, path, dtype)
    model = LFM2ForCausalLM.from_pretrained(model_dir).eval()
    tok = LFM2Tokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].numpy()
    default_kv = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True,
                                 n_threads=threads, verbose=False)  # llama.cpp's default: f16 KV cache
    default_kv.eval(ids)
    diff_f16_kv = float(np.abs(np.array(default_kv.scores[: len(ids)], dtype=np.float32) - ref).max())
    default_kv.close()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=threads,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)
    same_ids = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    diff = float(np.abs(theirs - ref).max())
    ours_tokens, their_tokens = greedy_ours(model, ids, new_tokens), greedy_llama(llm, ids, new_tokens)
    llm.close()
    agree = next((i for i, (a, b) in enumerate(zip(ours_tokens, their_tokens)) if a != b), new_tokens)
    return {"model": model_dir.name, "architecture": summary["architecture"], "dtype": dtype,
            "bytes": summary["bytes"], "prompt_tokens": len(ids), "same_token_ids": same_ids,
            "max_abs_logit_diff": diff, "diff_over_logit_std": diff / float(ref.std()),
            "max_abs_logit_diff_f16_kv": diff_f16_kv,
            "top1_agreement": float((theirs.argmax(-1) == ref.argmax(-1)).mean()),
            "greedy_agree": f"{agree}/{new_tokens}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", type=Path, help="HF model directory (repeatable)")
    parser.add_argument("--dtypes", default=",".join(gguf_dtypes()))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="f32 and q8_0 only, 4 greedy tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.dtypes, args.new_tokens = "f32,q8_0", 4
    import llama_cpp

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = args.model
        if not models:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.export.conftest import write_model_dir

            models = [write_model_dir(work / "tiny-dense"),
                      write_model_dir(work / "tiny-moe", preset="tiny_moe", seed=1)]
        rows = [measure(m, d, work, args.new_tokens, args.threads) for m in models for d in args.dtypes.split(",")]
    print(f"llama-cpp-python {llama_cpp.__version__}")
    print("| model | arch | dtype | bytes | same ids | max abs logit diff | / logit std | f16 KV cache | "
          "top-1 agree | greedy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['architecture']} | {r['dtype']} | {r['bytes']:,} | {r['same_token_ids']} | "
              f"{r['max_abs_logit_diff']:.2e} | {r['diff_over_logit_std']:.2e} | "
              f"{r['max_abs_logit_diff_f16_kv']:.2e} | {r['top1_agreement']:.2f} | "
              f"{r['greedy_agree']} |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
