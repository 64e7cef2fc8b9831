"""Rebuild ``lfm2_train/assets/corpus/``: a small, offline, deterministic pre-training corpus (about 2 MB).

Four jsonl files, one document per line, each with a ``text`` field:

- ``arithmetic.jsonl``  worksheets of procedurally generated arithmetic (``difficulty``: see below)
- ``structured.jsonl``  key: value records, lists, dates, tables, small JSON objects (``difficulty``)
- ``code.jsonl``        short procedurally generated Python modules, doctest outputs computed by running
                        the code (``difficulty``); the source meant for fill-in-the-middle training
- ``prose.jsonl``       English paragraphs of the Python reference documentation (``pydoc_data.topics``,
                        stdlib, PSF licence); no difficulty, there is no honest one to give

Why generated: tests, smoke runs and curriculum experiments need real-looking text with a *known*
difficulty scale and no download. Every random choice goes through :class:`Rng`, built only on
``random.Random.random()`` — the one part of :mod:`random` whose output Python promises never to change —
so the three generated files should not depend on the Python version (only 3.11 is checked; ``ast``'s
node counts and ``ast.unparse`` are the other version-sensitive parts). ``prose.jsonl`` is a copy of the
interpreter's own documentation, so it changes when the Python version does; ``corpus.json`` records the
version it came from.

    python lfm2_train/assets/make_corpus.py               # rewrite the bundled corpus in place
    python lfm2_train/assets/make_corpus.py --out DIR     # write elsewhere (e.g. to compare)
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import hashlib
import json
import operator
import platform
import random
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

SEED = 20240601
CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
# Documents per generated file; chosen for about 2 MB in total (the budget is 3 MB).
COUNTS = {"arithmetic": 3000, "structured": 1800, "code": 1200}
PROSE_MIN_CHARS = 400  # consecutive paragraphs of one topic are merged until a document has this many

T = TypeVar("T")


class Rng:
    """Version-stable randomness: integers, choices and shuffles derived from ``random()`` alone.

    ``random.Random.randint``/``choice``/``shuffle`` may change between Python versions; ``random()`` with an
    integer seed may not, so the corpus built from it is reproducible everywhere.
    """

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def random(self) -> float:
        return self._r.random()

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + min(int(self._r.random() * (hi - lo + 1)), hi - lo)

    def digits(self, n: int) -> int:
        """Uniform n-digit number (1-digit numbers include 0)."""
        return self.randint(0 if n == 1 else 10 ** (n - 1), 10**n - 1)

    def choice(self, seq: Sequence[T]) -> T:
        return seq[self.randint(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self._r.random() < p

    def sample(self, seq: Sequence[T], k: int) -> list[T]:
        pool = list(seq)
        for i in range(k):
            j = self.randint(i, len(pool) - 1)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


# ------------------------------------------------------------------------------------------- word lists
FIRST = ["Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam", "Maya",
         "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Umar", "Vera", "Wen", "Yusuf", "Zoe"]
LAST = ["Andersen", "Baker", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Hughes", "Ito", "Jensen", "Kowalski",
        "Lopez", "Moreau", "Nakamura", "Okafor", "Petrov", "Rossi", "Silva", "Tanaka", "Weber"]
CITIES = [("Lisbon", "Portugal"), ("Oslo", "Norway"), ("Lagos", "Nigeria"), ("Lima", "Peru"), ("Osaka", "Japan"),
          ("Leeds", "United Kingdom"), ("Lyon", "France"), ("Porto", "Portugal"), ("Quito", "Ecuador"),
          ("Hanoi", "Vietnam"), ("Cairo", "Egypt"), ("Dublin", "Ireland"), ("Krakow", "Poland"),
          ("Austin", "United States"), ("Perth", "Australia"), ("Munich", "Germany"), ("Seville", "Spain"),
          ("Nairobi", "Kenya"), ("Pune", "India"), ("Busan", "South Korea")]
JOBS = ["teacher", "nurse", "engineer", "baker", "pilot", "librarian", "farmer", "chemist", "carpenter", "designer",
        "accountant", "gardener", "translator", "electrician", "journalist"]
ITEMS = [("apple", "apples"), ("pear", "pears"), ("book", "books"), ("pencil", "pencils"), ("marble", "marbles"),
         ("stamp", "stamps"), ("cookie", "cookies"), ("sticker", "stickers"), ("egg", "eggs"), ("card", "cards"),
         ("shell", "shells"), ("coin", "coins"), ("flower", "flowers"), ("ticket", "tickets")]
PRODUCTS = [("notebook", 3.5), ("pen", 1.2), ("mug", 7.0), ("lamp", 24.0), ("chair", 49.0), ("scarf", 15.5),
            ("kettle", 32.0), ("backpack", 41.0), ("umbrella", 12.0), ("candle", 4.25), ("plate", 6.0),
            ("towel", 9.5), ("clock", 18.0), ("battery", 2.75)]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown"]
TASKS = ["water the plants", "call the dentist", "buy bread", "fix the bike", "pay the rent", "read chapter four",
         "clean the kitchen", "send the report", "book the train", "return the library books", "walk the dog",
         "back up the laptop", "renew the passport", "write to grandma", "plan the weekend trip"]
# Spelled out rather than taken from `calendar`, whose names follow the process locale.
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


# ------------------------------------------------------------------------------------------ arithmetic
def _carries(a: int, b: int) -> int:
    """Number of column carries when adding a + b by hand."""
    carry = count = 0
    while a or b:
        carry = 1 if a % 10 + b % 10 + carry >= 10 else 0
        count += carry
        a, b = a // 10, b // 10
    return count


def _borrows(a: int, b: int) -> int:
    """Number of column borrows when subtracting a - b (a >= b) by hand."""
    borrow = count = 0
    while a or b:
        borrow = 1 if a % 10 - b % 10 - borrow < 0 else 0
        count += borrow
        a, b = a // 10, b // 10
    return count


def _ndigits(n: int) -> int:
    return len(str(abs(n)))


# Difficulty of one problem = operations + 0.5 * digits of the largest operand + 0.5 * carries/borrows
# + 1 per multiplication or division (+ 1 for word problems, which also need reading). Worksheets report
# the mean over their problems, so the scale runs from about 1.5 (one-digit sums) to about 12.
def _p_add(r: Rng, d: int) -> tuple[str, float]:
    a, b = r.digits(d), r.digits(r.randint(1, d))
    return f"{a} + {b} = {a + b}", 1 + 0.5 * d + 0.5 * _carries(a, b)


def _p_sub(r: Rng, d: int) -> tuple[str, float]:
    a, b = r.digits(d), r.digits(r.randint(1, d))
    a, b = max(a, b), min(a, b)
    return f"{a} - {b} = {a - b}", 1 + 0.5 * d + 0.5 * _borrows(a, b)


def _p_mul(r: Rng, d: int) -> tuple[str, float]:
    a, b = r.digits(d), r.digits(r.randint(1, min(d, 3)))
    return f"{a} * {b} = {a * b}", 2 + 0.5 * d + 0.5 * _ndigits(b)


def _p_div(r: Rng, d: int) -> tuple[str, float]:
    b = r.randint(2, 9 if d < 3 else 99)
    q = r.digits(d)
    rem = r.randint(0, b - 1) if r.chance(0.4) else 0
    a = b * q + rem
    text = f"{a} / {b} = {q}" + (f" remainder {rem}" if rem else "")
    return text, 2 + 0.5 * _ndigits(a) + 0.5 * _ndigits(b) + (0.5 if rem else 0)


def _p_chain(r: Rng, d: int) -> tuple[str, float]:
    """Several operations with precedence and parentheses, reduced one step at a time."""
    n_ops = r.randint(2, 2 + d // 2)
    nums = [r.digits(r.randint(1, d)) for _ in range(n_ops + 1)]
    ops = [r.choice("+-*") for _ in range(n_ops)]
    expr = str(nums[0])
    for op, n in zip(ops, nums[1:]):
        expr = f"({expr}) {op} {n}" if op == "*" and r.chance(0.5) else f"{expr} {op} {n}"
    steps, cur = [expr], expr
    tree = ast.parse(cur, mode="eval")
    while not isinstance(tree.body, ast.Constant):
        tree = _reduce_one(tree)
        cur = ast.unparse(tree)
        steps.append(cur)
    mults = ops.count("*")
    return " = ".join(steps), n_ops + 0.5 * d + mults


BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _reduce_one(tree: ast.Expression) -> ast.Expression:
    """Evaluate the leftmost innermost binary operation whose operands are both numbers."""

    class Once(ast.NodeTransformer):
        done = False

        def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
            self.generic_visit(node)
            if not self.done and isinstance(node.left, ast.Constant) and isinstance(node.right, ast.Constant):
                self.done = True
                return ast.Constant(BINOPS[type(node.op)](node.left.value, node.right.value))
            return node

    return ast.fix_missing_locations(Once().visit(tree))


def _p_column(r: Rng, d: int) -> tuple[str, float]:
    """Long addition explained column by column, carries spelled out."""
    a, b = r.digits(max(d, 2)), r.digits(max(d, 2))
    lines = [f"Add {a} + {b} column by column:"]
    carry, place, x, y = 0, 0, a, b
    names = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]
    while x or y or carry:
        s = x % 10 + y % 10 + carry
        line = f"{names[place]}: {x % 10} + {y % 10}" + (f" + {carry}" if carry else "") + f" = {s}"
        carry = s // 10
        lines.append(line + (f", write {s % 10} carry {carry}" if carry else f", write {s}"))
        x, y, place = x // 10, y // 10, place + 1
    lines.append(f"So {a} + {b} = {a + b}.")
    return "\n".join(lines), 1 + 0.5 * max(d, 2) + 0.5 * _carries(a, b) + 1


def _p_fraction(r: Rng, d: int) -> tuple[str, float]:
    a, b = Fraction(r.randint(1, 9), r.randint(2, 4 + 2 * d)), Fraction(r.randint(1, 9), r.randint(2, 4 + 2 * d))
    op = r.choice("+-*")
    value = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a} {op} {b} = {value}", 3 + 0.5 * d


def _p_percent(r: Rng, d: int) -> tuple[str, float]:
    p = r.choice([5, 10, 20, 25, 50, 75, 15, 40])
    base = r.digits(d) * 4 or 20
    value = Fraction(p * base, 100)
    shown = str(value.numerator) if value.denominator == 1 else f"{float(value):g}"
    return f"{p}% of {base} = {shown}", 2.5 + 0.5 * d


def _p_word(r: Rng, d: int) -> tuple[str, float]:
    """A one- to three-step story problem with the working shown."""
    who, other = r.sample(FIRST, 2)
    one, many = r.choice(ITEMS)
    start = r.digits(d) + 2
    steps = r.randint(1, 3)
    text = [f"{who} has {start} {many}."]
    work, total = [], start
    for _ in range(steps):
        kind = r.choice(["gain", "lose", "times"] if total < 10**d else ["lose", "lose", "gain"])
        if kind == "gain":
            n = r.digits(r.randint(1, d))
            text.append(f"{other} gives {who} {n} more {many if n != 1 else one}.")
            work.append(f"{total} + {n} = {total + n}")
            total += n
        elif kind == "lose":
            n = r.randint(1, max(1, total - 1))
            text.append(f"{who} gives {n} {many if n != 1 else one} away.")
            work.append(f"{total} - {n} = {total - n}")
            total -= n
        else:
            k = r.randint(2, 4)
            text.append(f"Then the number of {many} {who} has becomes {k} times as large.")
            work.append(f"{total} * {k} = {total * k}")
            total *= k
    text.append(f"How many {many} does {who} have now?")
    return " ".join(text) + "\n" + ". ".join(work) + f". Answer: {total}", 1 + steps + 0.5 * d


ARITHMETIC_KINDS: dict[str, tuple[Callable[[Rng, int], tuple[str, float]], int]] = {
    # kind -> (problem generator, largest digit count used)
    "addition": (_p_add, 6), "subtraction": (_p_sub, 6), "multiplication": (_p_mul, 4),
    "division": (_p_div, 4), "multi_step": (_p_chain, 4), "long_addition": (_p_column, 6),
    "fractions": (_p_fraction, 3), "percent": (_p_percent, 3), "word_problem": (_p_word, 3),
}


def arithmetic_doc(r: Rng) -> dict[str, Any]:
    """A worksheet: 3-8 problems of one kind and one digit count (so the difficulty is homogeneous)."""
    kind = r.choice(sorted(ARITHMETIC_KINDS))
    gen, max_d = ARITHMETIC_KINDS[kind]
    d = r.randint(1, max_d)
    problems = [gen(r, d) for _ in range(r.randint(3, 8) if kind not in ("long_addition", "word_problem") else 2)]
    sep = "\n\n" if kind in ("long_addition", "word_problem") else "\n"
    difficulty = sum(p[1] for p in problems) / len(problems)
    return {"text": sep.join(p[0] for p in problems), "difficulty": round(difficulty, 3), "kind": kind}


# ------------------------------------------------------------------------------------------ structured
def _date(r: Rng) -> dt.date:
    return dt.date(1990, 1, 1) + dt.timedelta(days=r.randint(0, 365 * 40))


def _person(r: Rng) -> dict[str, Any]:
    first, last = r.choice(FIRST), r.choice(LAST)
    city, country = r.choice(CITIES)
    return {"name": f"{first} {last}", "age": r.randint(18, 90), "city": city, "country": country,
            "occupation": r.choice(JOBS), "email": f"{first.lower()}.{last.lower()}@example.org",
            "joined": _date(r).isoformat(), "favourite colour": r.choice(COLORS)}


def _s_record(r: Rng) -> tuple[str, float]:
    person = _person(r)
    keys = r.sample(list(person), r.randint(3, len(person)))
    keys.sort(key=list(person).index)
    lines = [f"{k.capitalize()}: {person[k]}" for k in keys]
    return "\n".join(lines), len(keys) / 4


def _s_list(r: Rng) -> tuple[str, float]:
    if r.chance(0.5):
        chosen = r.sample(ITEMS, r.randint(2, 8))
        lines = ["Shopping list:"]
        for one, many in chosen:
            n = r.randint(1, 12)
            lines.append(f"- {n} {one if n == 1 else many}")
        total = sum(int(line.split()[1]) for line in lines[1:])
        lines.append(f"Items in total: {total}")
        return "\n".join(lines), len(chosen) / 4 + 0.5
    tasks = r.sample(TASKS, r.randint(2, 8))
    lines = [f"To do on {r.choice(WEEKDAYS)}:"] + [f"{i}. {t}" for i, t in enumerate(tasks, 1)]
    return "\n".join(lines), len(tasks) / 4


def _s_dates(r: Rng) -> tuple[str, float]:
    kind = r.randint(0, 2)
    lines = []
    for _ in range(r.randint(2, 6)):
        a = _date(r)
        if kind == 0:
            lines.append(f"{a.isoformat()} was a {WEEKDAYS[a.weekday()]}.")
        elif kind == 1:
            lines.append(f"{a.day} {MONTHS[a.month - 1]} {a.year} = {a.isoformat()} = {a.strftime('%d/%m/%Y')}")
        else:
            b = a + dt.timedelta(days=r.randint(1, 400))
            lines.append(f"From {a.isoformat()} to {b.isoformat()} is {(b - a).days} days.")
    return "\n".join(lines), 1 + kind + len(lines) / 4


def _s_table(r: Rng) -> tuple[str, float]:
    rows = r.sample(PRODUCTS, r.randint(2, 7))
    qty = [r.randint(1, 9) for _ in rows]
    totals = [q * p for q, (_, p) in zip(qty, rows)]
    if r.chance(0.5):
        lines = ["| item | qty | price | total |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {q} | {p:.2f} | {t:.2f} |" for (n, p), q, t in zip(rows, qty, totals)]
        lines.append(f"| **sum** | {sum(qty)} | | {sum(totals):.2f} |")
    else:
        lines = ["item,qty,price,total"] + [f"{n},{q},{p:.2f},{t:.2f}" for (n, p), q, t in zip(rows, qty, totals)]
        lines.append(f"TOTAL,{sum(qty)},,{sum(totals):.2f}")
    return "\n".join(lines), len(rows) * 4 / 6


def _s_json(r: Rng) -> tuple[str, float]:
    person = _person(r)
    obj: dict[str, Any] = {k: person[k] for k in ("name", "age", "city")}
    if r.chance(0.6):
        obj["skills"] = r.sample(JOBS, r.randint(1, 3))
    if r.chance(0.6):
        obj["orders"] = [{"item": n, "qty": r.randint(1, 5), "paid": r.chance(0.7)}
                         for n, _ in r.sample(PRODUCTS, r.randint(1, 3))]
    if r.chance(0.3):
        obj["address"] = {"city": person["city"], "country": person["country"], "zip": f"{r.digits(5)}"}
    text = json.dumps(obj, indent=2 if r.chance(0.5) else None, ensure_ascii=False)
    nodes = text.count(":") + text.count(",") + 1
    return text, nodes / 5


STRUCTURED_KINDS: dict[str, Callable[[Rng], tuple[str, float]]] = {
    "record": _s_record, "list": _s_list, "dates": _s_dates, "table": _s_table, "json": _s_json,
}


def structured_doc(r: Rng) -> dict[str, Any]:
    """One or two structured snippets of one kind. Difficulty grows with the number of fields/rows/nodes."""
    kind = r.choice(sorted(STRUCTURED_KINDS))
    parts = [STRUCTURED_KINDS[kind](r) for _ in range(r.randint(1, 2))]
    difficulty = sum(p[1] for p in parts) / len(parts)
    return {"text": "\n\n".join(p[0] for p in parts), "difficulty": round(difficulty, 3), "kind": kind}


# ------------------------------------------------------------------------------------------------ code
PREDICATES = [("even", "{v} % 2 == 0"), ("odd", "{v} % 2 == 1"), ("positive", "{v} > 0"),
              ("negative", "{v} < 0"), ("above_{k}", "{v} > {k}"), ("multiple_of_{k}", "{v} % {k} == 0")]
SEQ_NAMES = ["values", "numbers", "items", "scores", "data", "xs"]
ITEM_NAMES = {"values": "value", "numbers": "number", "items": "item", "scores": "score", "data": "x", "xs": "x"}


def _c_affine(r: Rng) -> str:
    a, b = r.randint(2, 9), r.randint(-9, 9)
    name = r.choice(["scale", "transform", "affine", "adjust", "linear"])
    arg = r.choice(["x", "n", "value"])
    expr = f"{arg} * {a} + {b}" if b >= 0 else f"{arg} * {a} - {-b}"
    return f'def {name}_{a}_{abs(b)}({arg}: int) -> int:\n    """Return {expr}."""\n    return {expr}\n'


def _c_filter_reduce(r: Rng) -> str:
    pname, cond = r.choice(PREDICATES)
    k = r.randint(2, 7)
    pname, seq = pname.format(k=k), r.choice(SEQ_NAMES)
    v = ITEM_NAMES[seq]
    cond = cond.format(v=v, k=k)
    agg = r.choice(["sum", "count", "max", "collect", "product"])
    init = {"sum": "0", "count": "0", "max": "None", "collect": "[]", "product": "1"}[agg]
    acc = {"sum": "total", "count": "count", "max": "best", "collect": "kept", "product": "result"}[agg]
    update = {"sum": f"{acc} += {v}", "count": f"{acc} += 1", "collect": f"{acc}.append({v})",
              "product": f"{acc} *= {v}", "max": f"if {acc} is None or {v} > {acc}:\n                {acc} = {v}"}[agg]
    ret = {"sum": "int", "count": "int", "max": "int | None", "collect": "list[int]", "product": "int"}[agg]
    fname = {"sum": f"sum_{pname}", "count": f"count_{pname}", "max": f"largest_{pname}",
             "collect": f"keep_{pname}", "product": f"product_{pname}"}[agg]
    doc = f'    """{agg.capitalize()} of the {pname.replace("_", " ")} entries of {seq}."""\n' if r.chance(0.7) else ""
    return (f"def {fname}({seq}: list[int]) -> {ret}:\n{doc}    {acc} = {init}\n    for {v} in {seq}:\n"
            f"        if {cond}:\n            {update}\n    return {acc}\n")


def _c_string(r: Rng) -> str:
    options = [
        'def reverse_words(text: str) -> str:\n    """Reverse the order of the words in text."""\n'
        '    return " ".join(reversed(text.split()))\n',
        'def count_vowels(text: str) -> int:\n    count = 0\n    for ch in text.lower():\n'
        '        if ch in "aeiou":\n            count += 1\n    return count\n',
        'def is_palindrome(text: str) -> bool:\n    cleaned = "".join(ch.lower() for ch in text if ch.isalnum())\n'
        "    return cleaned == cleaned[::-1]\n",
        'def title_case(text: str) -> str:\n    words = []\n    for word in text.split():\n'
        "        words.append(word[:1].upper() + word[1:].lower())\n    return \" \".join(words)\n",
        'def initials(name: str) -> str:\n    return "".join(part[0].upper() + "." for part in name.split())\n',
        f'def repeat_char(ch: str, times: int = {r.randint(2, 5)}) -> str:\n    return ch * times\n',
        'def char_histogram(text: str) -> dict[str, int]:\n    counts: dict[str, int] = {}\n'
        "    for ch in text:\n        counts[ch] = counts.get(ch, 0) + 1\n    return counts\n",
    ]
    return r.choice(options)


def _c_recursive(r: Rng) -> str:
    options = [
        "def factorial(n: int) -> int:\n    if n <= 1:\n        return 1\n    return n * factorial(n - 1)\n",
        "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
        "def gcd(a: int, b: int) -> int:\n    while b:\n        a, b = b, a % b\n    return a\n",
        "def power(base: int, exp: int) -> int:\n    if exp == 0:\n        return 1\n    half = power(base, exp // 2)\n"
        "    return half * half * (base if exp % 2 else 1)\n",
        "def digit_sum(n: int) -> int:\n    total = 0\n    while n > 0:\n        total += n % 10\n        n //= 10\n"
        "    return total\n",
        "def binary_search(items: list[int], target: int) -> int:\n    lo, hi = 0, len(items) - 1\n"
        "    while lo <= hi:\n        mid = (lo + hi) // 2\n        if items[mid] == target:\n            return mid\n"
        "        if items[mid] < target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n"
        "    return -1\n",
    ]
    return r.choice(options)


def _c_branch(r: Rng) -> str:
    lo, hi = r.randint(-10, 0), r.randint(1, 20)
    options = [
        f"def clamp(x: int, lo: int = {lo}, hi: int = {hi}) -> int:\n    if x < lo:\n        return lo\n"
        "    elif x > hi:\n        return hi\n    return x\n",
        "def sign(x: int) -> int:\n    if x > 0:\n        return 1\n    if x < 0:\n        return -1\n    return 0\n",
        f"def grade(score: int) -> str:\n    if score >= {r.randint(85, 95)}:\n        return \"A\"\n"
        f"    elif score >= {r.randint(70, 84)}:\n        return \"B\"\n    elif score >= {r.randint(50, 69)}:\n"
        "        return \"C\"\n    return \"F\"\n",
        f"def fizzbuzz(n: int) -> str:\n    if n % {3 * 5} == 0:\n        return \"FizzBuzz\"\n"
        "    if n % 3 == 0:\n        return \"Fizz\"\n    if n % 5 == 0:\n        return \"Buzz\"\n    return str(n)\n",
    ]
    return r.choice(options)


def _c_class(r: Rng) -> str:
    options = [
        "class Stack:\n    def __init__(self) -> None:\n        self.items: list[int] = []\n\n"
        "    def push(self, item: int) -> None:\n        self.items.append(item)\n\n"
        "    def pop(self) -> int:\n        return self.items.pop()\n\n"
        "    def __len__(self) -> int:\n        return len(self.items)\n",
        f"class Account:\n    def __init__(self, owner: str, balance: int = {r.randint(0, 100)}) -> None:\n"
        "        self.owner = owner\n        self.balance = balance\n\n"
        "    def deposit(self, amount: int) -> int:\n        if amount <= 0:\n"
        '            raise ValueError("amount must be positive")\n        self.balance += amount\n'
        "        return self.balance\n",
        "class Point:\n    def __init__(self, x: float, y: float) -> None:\n        self.x = x\n        self.y = y\n\n"
        "    def distance_to(self, other: \"Point\") -> float:\n"
        "        return ((self.x - other.x) ** 2 + (self.y - other.y) ** 2) ** 0.5\n",
        "class Counter:\n    def __init__(self) -> None:\n        self.counts: dict[str, int] = {}\n\n"
        "    def add(self, key: str) -> None:\n        self.counts[key] = self.counts.get(key, 0) + 1\n\n"
        "    def top(self) -> str:\n        return max(self.counts, key=self.counts.get)\n",
    ]
    return r.choice(options)


CODE_KINDS: list[Callable[[Rng], str]] = [_c_affine, _c_filter_reduce, _c_string, _c_recursive, _c_branch, _c_class]
EXAMPLE_ARGS: dict[str, Callable[[Rng], tuple[Any, ...]]] = {
    "int": lambda r: (r.randint(-20, 30),),
    "list[int]": lambda r: ([r.randint(-9, 20) for _ in range(r.randint(2, 6))],),
    "str": lambda r: (r.choice(["level", "hello world", "Ada Lovelace", "never odd or even", "banana"]),),
}


def _examples(r: Rng, tree: ast.Module) -> str:
    """Doctest-style calls of the module's functions, outputs obtained by actually running them."""
    namespace: dict[str, Any] = {}
    exec(compile(tree, "<generated>", "exec"), namespace)  # our own generated code, nothing external
    lines = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or len(node.args.args) - len(node.args.defaults) != 1:
            continue
        ann = ast.unparse(node.args.args[0].annotation) if node.args.args[0].annotation else "int"
        if ann not in EXAMPLE_ARGS:
            continue
        if node.name in ("fib", "factorial", "power"):
            args: tuple[Any, ...] = (r.randint(0, 12),)
        else:
            args = EXAMPLE_ARGS[ann](r)
        result = namespace[node.name](*args)
        if result is None:  # doctest prints nothing for None
            continue
        lines.append(f">>> {node.name}({', '.join(repr(a) for a in args)})\n{result!r}")
    return "\n".join(lines)


def code_doc(r: Rng) -> dict[str, Any]:
    """One to three generated definitions, about half with a module docstring of (passing) doctest examples.

    Difficulty = AST nodes / 20 (size and nesting), so a one-line affine function is easy and a class with
    control flow is hard.
    """
    parts = [make(r) for make in r.sample(CODE_KINDS, r.randint(1, 3))]  # distinct kinds: no duplicate names
    source = "\n\n".join(parts)
    tree = ast.parse(source)  # every document must be valid Python
    examples = _examples(r, tree) if r.chance(0.5) else ""
    text = f'"""Examples:\n\n{examples}\n"""\n\n\n{source}' if examples else source
    nodes = sum(1 for _ in ast.walk(tree))
    return {"text": text, "difficulty": round(nodes / 20, 3), "kind": "python"}


# ------------------------------------------------------------------------------------------------ prose
def prose_docs() -> list[dict[str, Any]]:
    """Paragraphs of the Python reference docs, merged per topic into documents of >= PROSE_MIN_CHARS."""
    from pydoc_data.topics import topics

    docs = []
    for topic in sorted(topics):
        paragraphs = [p.rstrip() for p in topics[topic].split("\n\n") if p.strip()]
        current: list[str] = []
        for p in paragraphs:
            current.append(p)
            if sum(len(c) for c in current) >= PROSE_MIN_CHARS:
                docs.append({"text": "\n\n".join(current), "topic": topic})
                current = []
        if current:
            docs.append({"text": "\n\n".join(current), "topic": topic})
    return docs


# ------------------------------------------------------------------------------------------------ output
def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    data = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows).encode("utf-8")
    path.write_bytes(data)
    info = {"documents": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    scores = [row["difficulty"] for row in rows if "difficulty" in row]
    if scores:
        info["difficulty"] = [min(scores), max(scores)]
    return info


README = """\
# Bundled corpus

A small corpus (about {mb:.1f} MB) so that tokenizer training, tokenization to shards, curriculum and
end-to-end smoke runs work offline. Regenerate it with `python lfm2_train/assets/make_corpus.py`
(seed {seed}); `corpus.json` lists every file's document count, size and sha256.

| file | documents | size | difficulty | content | licence |
|---|---:|---:|---:|---|---|
{rows}

Every line is a JSON object with a `text` field; the generated files also carry `difficulty` (a float,
higher = harder) and `kind`; `prose.jsonl` carries `topic` instead.

## Difficulty scales

- **arithmetic**: per problem, operations + 0.5 × digits of the largest operand + 0.5 × carries
  or borrows + 1 per multiplication/division (+ 1 for word problems); a worksheet reports the mean of its
  problems (2 worked ones, or 3–8 short ones), which all share one kind and one digit count.
- **structured**: number of fields / 4 (records), items / 4 (lists), rows × columns / 6 (tables),
  JSON nodes / 5, 1–3 + lines / 4 for date facts (weekday < format conversion < day differences).
- **code**: AST nodes of the module / 20.

## Provenance and licences

- `arithmetic.jsonl`, `structured.jsonl`, `code.jsonl`: generated by `make_corpus.py` from word lists
  and templates written for this project; every fact in them (sums, weekdays, day counts, doctest outputs)
  is computed, not copied. Apache-2.0, like the rest of the project. Names are drawn from short lists of
  common first and last names and do not describe real people.
- `prose.jsonl`: paragraphs of the Python reference documentation as shipped with the interpreter in
  `pydoc_data.topics` (here from Python {python}), Copyright © Python Software Foundation, distributed
  under the PSF License Agreement (Version 2); the code examples in the Python documentation are also
  available under the Zero-Clause BSD licence. Regenerating with another Python version changes this file
  (the documentation changes); the other three files use only version-stable randomness (checked on 3.11).
"""

DESCRIPTIONS = {
    "arithmetic": "procedural arithmetic worksheets: sums, differences, products, quotients, multi-step "
                  "expressions, long addition with carries, fractions, percentages, word problems",
    "structured": "key: value records, lists, date facts, markdown/CSV tables, small JSON objects",
    "code": "generated Python functions and classes (for FIM), some with doctest examples",
    "prose": "Python reference documentation, paragraphs merged per topic",
}


def build(out_dir: str | Path = CORPUS_DIR, seed: int = SEED) -> dict[str, Any]:
    """Write the four jsonl files, ``corpus.json`` and ``README.md`` into ``out_dir``; return the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"arithmetic": arithmetic_doc, "structured": structured_doc, "code": code_doc}
    files: dict[str, Any] = {}
    for offset, (name, maker) in enumerate(makers.items()):
        r = Rng(seed + offset)  # one stream per file: changing one generator leaves the others unchanged
        files[name] = {"file": f"{name}.jsonl", **_write_jsonl(out / f"{name}.jsonl", [maker(r) for _ in
                                                                                          range(COUNTS[name])])}
    files["prose"] = {"file": "prose.jsonl", **_write_jsonl(out / "prose.jsonl", prose_docs())}
    python = platform.python_version()
    index = {"seed": seed, "python": python, "files": files}
    (out / "corpus.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    rows = "\n".join(
        f"| `{f['file']}` | {f['documents']} | {f['bytes'] / 1e3:.0f} kB | "
        f"{'{:g}–{:g}'.format(*f['difficulty']) if 'difficulty' in f else '—'} | {DESCRIPTIONS[n]} | "
        f"{'PSF-2.0' if n == 'prose' else 'Apache-2.0'} |" for n, f in files.items())
    mb = sum(f["bytes"] for f in files.values()) / 1e6
    (out / "README.md").write_text(README.format(mb=mb, seed=seed, rows=rows, python=python))
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the bundled corpus.")
    parser.add_argument("--out", type=Path, default=CORPUS_DIR)
    args = parser.parse_args(argv)
    index = build(args.out)
    total = sum(f["bytes"] for f in index["files"].values())
    for name, f in index["files"].items():
        print(f"{name:>11}: {f['documents']:5d} documents, {f['bytes'] / 1e3:7.1f} kB")
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
