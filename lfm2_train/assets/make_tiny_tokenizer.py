"""Rebuild ``lfm2_train/assets/tokenizer_tiny/``: a 512-token byte-level BPE with LFM2's special tokens.

The tiny tokenizer lets tests and smoke runs build real data shards and models without any download.
Training is deterministic, so rerunning this script reproduces the committed files byte for byte:

    python lfm2_train/assets/make_tiny_tokenizer.py
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # runnable as a plain script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from lfm2_train.tokenizer import tiny_tokenizer_path, train_bpe_tokenizer  # noqa: E402

VOCAB_SIZE = 512

# Written for this file. A mix of plain English, chat-like turns and Python, so that frequent English
# words and code indentation both get merges.
ENGLISH = """\
The river ran quietly past the old mill, and the miller's daughter counted the boats as they went by.
In the morning the fields were white with frost; by noon the sun had turned them green and gold again.
A small model can learn a great deal when the data is clean and the training is long enough.
She opened the window, listened to the rain, and decided that the letter could wait until tomorrow.
Every good experiment starts with a question, a guess, and a careful plan for checking the answer.
The library was closed on Sundays, so the students met in the park and read their notes aloud.
When the wind changes, the sailors trim the sails and the ship turns slowly toward the harbour.
Numbers such as 3, 17, 42, 256 and 1024 appear often in programs, tables and written reports.
He said that the bridge would be finished by the end of the summer, but nobody believed him.
The teacher asked the class to write a short story about a journey, a friend, and a surprise.
Light travels faster than sound, which is why we see the lightning before we hear the thunder.
The cat slept in the warm corner of the kitchen while the bread was baking in the oven.
Good tools are simple to use, easy to test, and hard to use the wrong way.
If the first attempt fails, read the error message slowly; it usually tells you what went wrong.
The mountain path was steep and narrow, and the travellers stopped often to look at the valley below.
A language model predicts the next token from the tokens that came before it in the sequence.
The market was full of voices, colours and the smell of fresh fruit, bread and coffee.
They planted apple trees along the road, and twenty years later the whole village shared the harvest.
Café, naïve, über, señor and résumé are words that carry accents; 東京 and 北京 are city names.
User: What is the capital of France?
Assistant: The capital of France is Paris.
User: Can you write a function that adds two numbers?
Assistant: Sure. Here is a short Python function that returns the sum of its two arguments.
System: You are a helpful assistant. Answer briefly and truthfully.
User: How many days are there in a week?
Assistant: There are seven days in a week.
"""

CODE = '''\
def add(a: int, b: int) -> int:
    """Return the sum of two integers."""
    return a + b


def mean(values: list[float]) -> float:
    if not values:
        raise ValueError("mean of an empty list")
    return sum(values) / len(values)


class Counter:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def update(self, words: list[str]) -> None:
        for word in words:
            self.counts[word] = self.counts.get(word, 0) + 1

    def most_common(self, n: int = 10) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: kv[1], reverse=True)[:n]


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f]


def fibonacci(n: int) -> list[int]:
    result = [0, 1]
    while len(result) < n:
        result.append(result[-1] + result[-2])
    return result[:n]


if __name__ == "__main__":
    counter = Counter()
    counter.update("the quick brown fox jumps over the lazy dog".split())
    print(counter.most_common(3))
    print(fibonacci(10), mean([1.0, 2.0, 3.0]), add(2, 3))
'''


def corpus() -> list[str]:
    """Training texts, one per paragraph/line group, in a fixed order (order matters for determinism)."""
    return ENGLISH.splitlines(keepends=True) + CODE.split("\n\n\n")


def main() -> Path:
    tok = train_bpe_tokenizer(corpus(), vocab_size=VOCAB_SIZE)
    out = tok.save_pretrained(tiny_tokenizer_path())
    print(f"wrote {out} (vocab {tok.vocab_size}, fingerprint {tok.fingerprint()[:16]})")
    return out


if __name__ == "__main__":
    main()
