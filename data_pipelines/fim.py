"""Document → token ids, with fill-in-the-middle (FIM) for code: the per-document work of the tokenize job.

Layouts (ids of the LFM2 special tokens; every document ends with the separator ``<|endoftext|>``):

    plain  text <|endoftext|>
    PSM    <|fim_pre|> prefix <|fim_suf|> suffix <|fim_mid|> middle <|endoftext|>
    SPM    <|fim_pre|> <|fim_suf|> suffix <|fim_mid|> prefix middle <|endoftext|>

SPM is the variant of Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"
(arXiv:2207.14255, appendix D), as implemented in bigcode-project/Megatron-LM (``permute``, "SPM (variant
2 from FIM paper)") for SantaCoder/StarCoder: both sentinels first, so PSM and SPM share the token that
starts an infill prompt, and prefix + middle is one contiguous stretch of text the model continues.

The split is on characters: two cut points drawn uniformly from ``0..len(text)`` and sorted give
``prefix = text[:a]``, ``middle = text[a:b]``, ``suffix = text[b:]``; each part is tokenized on its own
(so no token straddles a cut). Every random draw comes from a hash of ``(seed, source, epoch, row)``:
whether a document is FIM'd, in which mode and where it is cut is a property of the document, not of the
worker that happened to process it, which is what makes the output independent of the worker count and
lets an interrupted job resume byte for byte.

This module imports only numpy and tokenizers, so worker processes start quickly.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

SEPARATOR = "<|endoftext|>"
FIM_PRE, FIM_MID, FIM_SUF = "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>"
PSM_LAYOUT = f"{FIM_PRE} prefix {FIM_SUF} suffix {FIM_MID} middle {SEPARATOR}"
SPM_LAYOUT = f"{FIM_PRE} {FIM_SUF} suffix {FIM_MID} prefix middle {SEPARATOR}"

# Per-document outcome codes (EncodedBatch.modes).
SKIPPED, PLAIN, PSM, SPM = -1, 0, 1, 2


def document_uniforms(seed: int, source: str, epoch: int, row: int) -> tuple[float, float, float, float]:
    """Four independent U[0, 1) draws that belong to one document (blake2b of its identity)."""
    digest = hashlib.blake2b(f"{seed}\x1f{source}\x1f{epoch}\x1f{row}".encode(), digest_size=32).digest()
    a, b, c, d = np.frombuffer(digest, dtype="<u8").tolist()
    return a / 2**64, b / 2**64, c / 2**64, d / 2**64


def fim_split(text: str, u_a: float, u_b: float) -> tuple[str, str, str]:
    """(prefix, middle, suffix) at two cut points uniform over ``0..len(text)`` (empty parts allowed)."""
    n = len(text)
    a, b = sorted((min(int(u_a * (n + 1)), n), min(int(u_b * (n + 1)), n)))
    return text[:a], text[a:b], text[b:]


def fim_mode(u_fim: float, u_spm: float, rate: float, spm_rate: float) -> int:
    """PLAIN, PSM or SPM for a document with draws ``u_fim``, ``u_spm``."""
    if u_fim >= rate:
        return PLAIN
    return SPM if u_spm < spm_rate else PSM


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a worker needs to encode documents; small and picklable (the tokenizer travels as JSON)."""

    tokenizer_json: str
    dtype: str  # numpy dtype name of the token ids
    separator_id: int
    fim_ids: tuple[int, int, int] | None  # (pre, mid, suf); None when no source uses FIM
    fim_rate: float = 0.0
    spm_rate: float = 0.5
    seed: int = 0
    parse_special_tokens: bool = False  # False: "<|endoftext|>" inside a document is plain text
    single_thread: bool = False  # True in pool workers: one process per core, no nested Rust threads


@dataclass
class EncodedBatch:
    """Consecutive rows of one source: document i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray
    offsets: np.ndarray  # int64, len = rows + 1; a skipped (empty/null) row has length 0
    modes: np.ndarray  # int8 per row: SKIPPED, PLAIN, PSM, SPM


class DocumentEncoder:
    """Turns rows of text into separator-terminated token ids, FIM'd where the document's draws say so."""

    def __init__(self, spec: EncoderSpec) -> None:
        if spec.single_thread:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by tokenizers at every batch call
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        self._tok = Tokenizer.from_str(spec.tokenizer_json)
        # Raw text may contain special-token strings ("<|endoftext|>" in a web page); they must stay text,
        # or the data would hold separators and FIM sentinels the job did not put there.
        self._tok.encode_special_tokens = not spec.parse_special_tokens

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, texts: list[str | None], source: str, fim: bool, epoch: int, first_row: int) -> EncodedBatch:
        """Encode rows ``first_row, first_row + 1, …`` of ``source`` in epoch ``epoch``."""
        spec = self.spec
        modes = np.zeros(len(texts), dtype=np.int8)
        pieces: list[str] = []
        for i, text in enumerate(texts):
            if not text:
                modes[i] = SKIPPED
                continue
            if fim and spec.fim_rate > 0:
                u_fim, u_spm, u_a, u_b = document_uniforms(spec.seed, source, epoch, first_row + i)
                modes[i] = fim_mode(u_fim, u_spm, spec.fim_rate, spec.spm_rate)
                if modes[i] != PLAIN:
                    pieces.extend(fim_split(text, u_a, u_b))
                    continue
            pieces.append(text)
        ids = self._encode_many(pieces)
        sep = spec.separator_id
        flat: list[int] = []
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        k = 0
        for i, mode in enumerate(modes.tolist()):
            if mode == PLAIN:
                flat += ids[k]
                flat.append(sep)
                k += 1
            elif mode != SKIPPED:
                pre, mid, suf = spec.fim_ids  # type: ignore[misc]
                prefix, middle, suffix = ids[k], ids[k + 1], ids[k + 2]
                k += 3
                if mode == PSM:
                    flat.append(pre)
                    flat += prefix
                    flat.append(suf)
                    flat += suffix
                    flat.append(mid)
                    flat += middle
                else:
                    flat += (pre, suf)
                    flat += suffix
                    flat.append(mid)
                    flat += prefix
                    flat += middle
                flat.append(sep)
            offsets[i + 1] = len(flat)
        return EncodedBatch(tokens=np.array(flat, dtype=self.dtype), offsets=offsets, modes=modes)


# ------------------------------------------------------------------------------------------ pool workers
_WORKER: DocumentEncoder | None = None


def init_worker(spec: EncoderSpec) -> None:
    """Pool initializer: build the encoder once per process."""
    global _WORKER
    _WORKER = DocumentEncoder(spec)


def encode_in_worker(texts: list[str | None], source: str, fim: bool, epoch: int, first_row: int) -> EncodedBatch:
    """Pool task: one batch of rows (see :meth:`DocumentEncoder.encode`)."""
    assert _WORKER is not None, "init_worker was not called in this process"
    return _WORKER.encode(texts, source, fim, epoch, first_row)
