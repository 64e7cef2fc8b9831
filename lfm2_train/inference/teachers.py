"""A teacher for distillation: a checkpoint run over token rows whose top-K log-probs the cache stores, and
the checks that refuse a teacher whose ids, vocabulary or positions do not fit the student's data.

Two adapters share one interface (`topk(input_ids, doc_ids, emit, k)`): our model, which packs several
documents per row (`doc_ids` keep attention and the conv inside each), and any `transformers` causal LM, one
window per row, right-padded. Both end in `topk_head`, which computes the fp32 logits chunk by chunk, so the
(tokens, vocab) logits never exist at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.format import DataFormatError, Manifest
from ..losses.head import default_chunk_size
from ..model import LFM2ForCausalLM
from ..model.hf_io import read_config
from ..tokenizer import LFM2Tokenizer

TEACHER_FORMATS = ("auto", "lfm2", "transformers")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LFM2_MODEL_TYPES = ("lfm2", "lfm2_moe")
_HF_ATTN = {"sdpa": "sdpa", "eager": "eager", "flash_attn": "flash_attention_2"}


def topk_head(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, bias: torch.Tensor | None = None,
              scale: float | None = None, softcap: float | None = None, chunk_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (n, d), head weight (V, d) -> top-K ids (n, K) long and log-probs (n, K) fp32, on the CPU.

    Logits are computed in fp32 (outside autocast) one chunk of positions at a time, so a chunk's (chunk, V)
    buffer is the only vocabulary-sized tensor alive; log-probs are exact log-softmax over the full vocab.
    """
    n = hidden.shape[0]
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    ids = torch.empty((n, k), dtype=torch.long)
    lp = torch.empty((n, k), dtype=torch.float32)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        w = weight.float()
        b = bias.float() if bias is not None else None
        for s in range(0, n, chunk):
            logits = F.linear(hidden[s:s + chunk].float(), w, b)
            if scale is not None:
                logits = logits * scale
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            vals, top = torch.topk(logits, k, dim=-1)
            ids[s:s + chunk] = top.cpu()
            lp[s:s + chunk] = (vals - lse).cpu()
            del logits
    return ids, lp


# ---------------------------------------------------------------------------------------------- teachers
class LFM2Teacher:
    """Our model: several documents per row (`doc_ids` keep attention and the conv inside each document)."""

    packs_documents = True

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device, attn_implementation: str) -> None:
        self.model = LFM2ForCausalLM.from_pretrained(path, dtype=dtype, device=device,
                                                     attn_implementation=attn_implementation).eval()
        self.device = device
        self.vocab_size = self.model.config.vocab_size
        self.num_parameters = self.model.num_parameters()

    def topk(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, emit: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        emit = emit.to(self.device)
        return self.model(input_ids.to(self.device), doc_ids=doc_ids.to(self.device),
                          head_fn=lambda h, w: topk_head(h[emit], w, k))


class TransformersTeacher:
    """Any `transformers` causal LM: one window per row, right-padded (causal, so padding is never seen).

    The backbone's last hidden state goes through our chunked top-K head with the model's own output
    embedding (bias, `logit_scale` and `final_logit_softcapping` applied when the config has them).
    """

    packs_documents = False

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device, attn_implementation: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=_HF_ATTN.get(attn_implementation, attn_implementation)
        ).to(device).eval()
        self.device = device
        self.decoder = self.model.get_decoder()
        self.head = self.model.get_output_embeddings()
        if not isinstance(self.head, torch.nn.Linear):
            raise ValueError(f"teacher {path}: output embedding is {type(self.head).__name__}, not a Linear; "
                             "the top-K head cannot be computed chunk-wise for it")
        config = self.model.config.get_text_config()
        self.vocab_size = int(self.head.weight.shape[0])
        self.model_type = str(self.model.config.model_type)
        self.num_parameters = int(sum(p.numel() for p in self.model.parameters()))
        scale = getattr(config, "logit_scale", None)
        self.scale = float(scale) if isinstance(scale, (int, float)) and scale != 1 else None
        cap = getattr(config, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None

    def topk(self, input_ids: torch.Tensor, doc_ids: torch.Tensor, emit: torch.Tensor, k: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (doc_ids >= 0).long().to(self.device)
        h = self.decoder(input_ids=input_ids.to(self.device), attention_mask=mask).last_hidden_state
        return topk_head(h[emit.to(self.device)], self.head.weight, k, bias=self.head.bias, scale=self.scale,
                         softcap=self.softcap)


Teacher = LFM2Teacher | TransformersTeacher


def compute_autocast(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """The context each teacher forward runs in: none in fp32, autocast to `dtype` otherwise."""
    def autocast() -> AbstractContextManager:
        if dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


# ---------------------------------------------------------------------------------------------- checks
def teacher_format(path: Path, requested: str) -> tuple[str, str]:
    """(format, config.json model_type): `auto` picks our loader for lfm2 / lfm2_moe, transformers otherwise."""
    if requested not in TEACHER_FORMATS:
        raise ValueError(f"stage.teacher_format={requested!r}; choose one of {TEACHER_FORMATS}")
    if not path.is_dir():
        raise FileNotFoundError(f"stage.teacher={path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"stage.teacher={path} has no config.json: not a Hugging Face checkpoint directory")
    model_type = str(json.loads(config_file.read_text()).get("model_type"))
    if requested == "auto":
        return ("lfm2" if model_type in LFM2_MODEL_TYPES else "transformers"), model_type
    return requested, model_type


def teacher_geometry(path: Path, fmt: str) -> tuple[int, int | None]:
    """(vocab_size, max positions or None) from config.json alone, so refusals come before the weights load."""
    if fmt == "lfm2":
        config = read_config(path)
        return config.vocab_size, config.max_position_embeddings
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path).get_text_config()
    return int(config.vocab_size), getattr(config, "max_position_embeddings", None)


def check_teacher_tokenizer(teacher: Path, fmt: str, tokenizer_dir: Path, tokenizer: LFM2Tokenizer) -> None:
    """Refuse a teacher whose token ids mean something else: its top-K ids would be garbage to the student.

    Our loader's fingerprint (vocab + merges + special tokens) decides when it can read the teacher's
    tokenizer.json; a transformers teacher whose tokenizer only `AutoTokenizer` reads is compared by
    vocabulary and special tokens instead.
    """
    where = f"teacher {teacher} and the dataset/student tokenizer {tokenizer_dir}"
    if (teacher / "tokenizer.json").is_file():
        try:
            theirs = LFM2Tokenizer.from_pretrained(teacher, required_special_tokens=None).fingerprint()
        except Exception as err:  # noqa: BLE001 - any unreadable tokenizer.json falls through to AutoTokenizer
            if fmt != "transformers":
                raise DataFormatError(f"cannot read the tokenizer of teacher {teacher}: {err}") from None
        else:
            if theirs != tokenizer.fingerprint():
                raise DataFormatError(f"{where} differ (fingerprint {theirs[:12]}… != "
                                      f"{tokenizer.fingerprint()[:12]}…): distillation needs identical token ids")
            return
    elif fmt != "transformers":
        raise FileNotFoundError(f"teacher {teacher} has no tokenizer.json: copy the tokenizer it was trained with")
    from transformers import AutoTokenizer

    try:
        a = AutoTokenizer.from_pretrained(teacher)
    except Exception as err:  # noqa: BLE001
        raise DataFormatError(f"teacher {teacher} has no tokenizer transformers can load ({err})") from None
    b = AutoTokenizer.from_pretrained(tokenizer_dir)

    def special(t: Any) -> dict[str, int]:
        return {tok.content: i for i, tok in t.added_tokens_decoder.items() if tok.special}

    if a.get_vocab() != b.get_vocab() or special(a) != special(b):
        raise DataFormatError(f"{where} differ (vocabulary or special tokens): distillation needs identical ids")


def check_teacher_vocab(teacher: Path, vocab: int, manifest: Manifest, tokenizer: LFM2Tokenizer,
                        dataset_dir: Path) -> None:
    """The cache's vocab_size is the student's: a teacher with another head size cannot be distilled from."""
    if vocab != manifest.vocab_size:
        raise DataFormatError(f"teacher {teacher} has vocab_size {vocab}, dataset {dataset_dir} "
                              f"(and so the student) {manifest.vocab_size}: a cache needs them equal")
    if vocab < tokenizer.vocab_size:
        raise DataFormatError(f"teacher {teacher} has vocab_size {vocab} < the tokenizer's {tokenizer.vocab_size}")
