"""Answer extraction and matching for generation tasks, and the choice rule for multiple choice."""

from __future__ import annotations

import math
import re
import string

_ANSWER_RE = re.compile(r"Answer:\s*(.+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_text(text: str) -> str:
    """Lower case, no surrounding punctuation, single spaces: "  The Cat. " == "the cat"."""
    text = " ".join(text.lower().split())
    return text.strip(string.punctuation + " ")


def extract_final(text: str) -> str:
    """What follows `Answer:` (up to the end of that line) when present, else the first non-empty line."""
    m = _ANSWER_RE.search(text)
    if m:
        return m.group(1).splitlines()[0].strip()
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def parse_number(text: str) -> float | None:
    """The number after `Answer:` when present, else the last number in the text (1,234 reads as 1234)."""
    m = _ANSWER_RE.search(text)
    scope = m.group(1) if m else text
    found = _NUMBER_RE.findall(scope)
    if not found:
        return None
    pick = found[0] if m else found[-1]
    try:
        return float(pick.replace(",", ""))
    except ValueError:
        return None


def exact_match(response: str, answer: object) -> float:
    """1.0 when the extracted final answer equals the reference after normalisation."""
    return float(normalize_text(extract_final(response)) == normalize_text(str(answer)))


def numeric_match(response: str, answer: object, rel_tol: float = 1e-6) -> float:
    """1.0 when the response's number equals the reference number (relative tolerance `rel_tol`)."""
    got = parse_number(response)
    want = parse_number(str(answer))
    if got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=rel_tol, abs_tol=rel_tol))


def pick_choice(logliks: list[float], lengths: list[int]) -> tuple[int, int]:
    """(argmax of summed log-likelihood, argmax of log-likelihood per unit length); ties -> first."""
    if not logliks or len(logliks) != len(lengths):
        raise ValueError("pick_choice needs one log-likelihood and one length per choice")
    best = max(range(len(logliks)), key=lambda i: (logliks[i], -i))
    norm = [ll / max(n, 1) for ll, n in zip(logliks, lengths)]
    best_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
    return best, best_norm
