"""Training throughput: our model + fused chunked LM-head loss vs transformers' Lfm2ForCausalLM, same weights.

Both sides run a plain AdamW loop (forward, loss, backward, clip 1.0, step) on the same random batches;
repetitions alternate between the two so machine noise hits both alike. Reports median tokens/s.

    python bench/bench_train.py                      # hidden 256, 6 layers, vocab 8192 and 65536, seq 512, batch 4
    python bench/bench_train.py --quick              # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lfm2_train.losses import chunked_cross_entropy  # noqa: E402
from lfm2_train.model import LFM2Config, LFM2ForCausalLM  # noqa: E402


def make_config(vocab: int, hidden: int, layers: int) -> LFM2Config:
    attn = {i for i in range(layers) if i % 3 == 2}
    return LFM2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      layer_types=["full_attention" if i in attn else "conv" for i in range(layers)],
                      num_attention_heads=hidden // 64, num_key_value_heads=max(hidden // 128, 1),
                      intermediate_size=4 * hidden, max_position_embeddings=4096)


def ours_step(model, opt, ids):
    loss, n = model(ids, head_fn=lambda h, w: chunked_cross_entropy(h[:, :-1], w, ids[:, 1:]))
    (loss / n).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss / n)


def hf_step(model, opt, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss)


def bench(vocab: int, args) -> dict:
    import transformers

    torch.manual_seed(0)
    cfg = make_config(vocab, args.hidden, args.layers)
    ours = LFM2ForCausalLM(cfg)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    ours.train()
    hf.train()
    opt_o = torch.optim.AdamW(ours.parameters(), lr=1e-4)
    opt_h = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    batches = [torch.randint(0, vocab, (args.batch, args.seq + 1)) for _ in range(args.warmup + args.reps)]
    times = {"ours": [], "hf": []}
    losses = {"ours": [], "hf": []}
    for i, ids in enumerate(batches):
        for name, fn, model, opt in (("ours", ours_step, ours, opt_o), ("hf", hf_step, hf, opt_h)):
            t0 = time.perf_counter()
            losses[name].append(fn(model, opt, ids))
            dt = time.perf_counter() - t0
            if i >= args.warmup:
                times[name].append(dt)
    tokens = args.batch * args.seq
    out = {"vocab": vocab, "tokens_per_step": tokens}
    for name in times:
        out[f"{name}_tok_s"] = tokens / statistics.median(times[name])
    out["ratio"] = out["ours_tok_s"] / out["hf_tok_s"]
    out["first_loss_diff"] = abs(losses["ours"][0] - losses["hf"][0])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocabs", type=int, nargs="+", default=[8192, 65536])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="bench/results/train.json")
    args = p.parse_args()
    if args.quick:
        args.vocabs, args.hidden, args.layers, args.seq, args.batch, args.reps, args.warmup = [512], 64, 3, 32, 2, 1, 1
    torch.set_num_threads(args.threads)
    import transformers

    rows = [bench(v, args) for v in args.vocabs]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = {"date": str(date.today()), "cpu": cpu, "threads": args.threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"{meta['date']} · {cpu} · {args.threads} threads · torch {torch.__version__} · "
          f"transformers {transformers.__version__}")
    print(f"hidden {args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}, fp32, "
          f"median of {args.reps} steps")
    print("| vocab | ours tok/s | transformers tok/s | ours / transformers | first-step loss diff |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['vocab']} | {r['ours_tok_s']:.0f} | {r['hf_tok_s']:.0f} | {r['ratio']:.2f} | "
              f"{r['first_loss_diff']:.1e} |")


if __name__ == "__main__":
    main()
