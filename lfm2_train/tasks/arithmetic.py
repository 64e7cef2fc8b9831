"""Chat arithmetic: the bundled verifiable task the tiny post-training chain is measured on.

Problems are generated from a seed (nothing to download) at graded difficulty, phrased the way the
bundled pre-training corpus writes arithmetic (`47 + 27 = 74`), so a tiny pre-trained model has
something to build on. A response is correct when its extracted answer equals the true one; the
answer is read from `Answer: <n>` when present, else from the last integer in the text.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Any

# (operator, digits of a, digits of b) from easy to hard; the level index is the difficulty.
LEVELS: tuple[tuple[str, int, int], ...] = (
    ("+", 1, 1), ("-", 1, 1), ("*", 1, 1), ("+", 2, 1), ("+", 2, 2), ("-", 2, 2), ("*", 2, 1), ("+", 3, 3),
)
_QUESTIONS = ("What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?")
_ANSWER_RE = re.compile(r"Answer:\s*(-?\d+)")
_INT_RE = re.compile(r"-?\d+")


@dataclass(frozen=True)
class ArithmeticProblem:
    question: str
    answer: int
    difficulty: float  # level index (0 = easiest) + a small carry/borrow term
    solution: str  # the reference assistant response, e.g. "47 + 27 = 74. Answer: 74"

    def messages(self, with_solution: bool = True) -> list[dict[str, str]]:
        """The conversation in `datasets` chat form: a user turn, plus the reference assistant turn."""
        msgs = [{"role": "user", "content": self.question}]
        if with_solution:
            msgs.append({"role": "assistant", "content": self.solution})
        return msgs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def _carries(a: int, b: int) -> int:
    count, carry = 0, 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        count += carry
        a, b = a // 10, b // 10
    return count


def make_problems(n: int, seed: int = 0, levels: tuple[int, ...] | None = None) -> list[ArithmeticProblem]:
    """`n` problems drawn uniformly over `levels` (default: all), reproducible from `seed`."""
    rng = random.Random(seed)
    chosen = tuple(range(len(LEVELS))) if levels is None else levels
    out = []
    for _ in range(n):
        level = rng.choice(chosen)
        op, da, db = LEVELS[level]
        a, b = _operand(rng, da), _operand(rng, db)
        if op == "-" and b > a:
            a, b = b, a
        value = a + b if op == "+" else a - b if op == "-" else a * b
        extra = 0.1 * min(_carries(a, b), 3) if op == "+" else 0.0
        question = rng.choice(_QUESTIONS).format(a=a, op=op, b=b)
        out.append(ArithmeticProblem(question=question, answer=value, difficulty=level + extra,
                                     solution=f"{a} {op} {b} = {value}. Answer: {value}"))
    return out


def sft_conversations(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Rows for an SFT dataset: `messages` plus `answer` and `difficulty` columns."""
    return [{"messages": p.messages(), "answer": p.answer, "difficulty": p.difficulty} for p in make_problems(n, seed)]


def extract_answer(text: str) -> int | None:
    """The integer after `Answer:`, else the last integer in `text`, else None."""
    m = _ANSWER_RE.search(text)
    if m:
        return int(m.group(1))
    ints = _INT_RE.findall(text)
    return int(ints[-1]) if ints else None


def verify(response: str, answer: int) -> float:
    """1.0 when the response's extracted answer equals `answer`, else 0.0 (a judge score)."""
    return float(extract_answer(response) == int(answer))
