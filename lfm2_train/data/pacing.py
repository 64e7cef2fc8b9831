"""Curriculum pacing: how much of an easy -> hard document order a trainer may read at each point of training.

The offline job `data_pipelines.curriculum` writes an order (a permutation of global document indices,
easiest first) and a `PacingConfig` into `order/<name>.json`. At run time the trainer asks one of two
questions, both answered by pure functions here so that a resumed run reproduces the exact same stream:

* `admitted_fraction(progress, cfg)` — the competence c(p) of Platanios et al. (2019), "Competence-based
  Curriculum Learning for Neural Machine Translation": the share of the order (easiest first) that is
  admitted at training progress p in [0, 1].
* `paced_indices(order, n_samples, cfg, seed)` — the deterministic sequence of global document indices
  to read, one per sample.

The rule of `paced_indices` (exact, so other code may rely on it): let N = len(order) and, at sample i,
A(i) = ceil(admitted_fraction(i / n_samples) * N) clamped to [1, N] (the admitted prefix, nondecreasing).

1. *New documents first, in order.* Keep a pointer P (documents of the order read so far, starting at 0).
   If P < A(i), sample i is `order[P]` and P += 1.
2. *Revisits when the admitted prefix is exhausted* (P == A(i)). Revisits are read from "passes": pass j
   is a permutation of `order[:A]`, with A the admitted count at the sample that starts the pass, drawn by
   `np.random.default_rng([seed, j]).permutation(A)`. Revisits walk the current pass; when it is used up,
   pass j + 1 starts. A pass is interrupted (not restarted) while the prefix grows and new documents are
   read first.

Consequences: with kind "none" (A = N) the first N samples are exactly `order`, and later samples are
seeded reshuffles of it (epochs); no document is ever read twice while an admitted document is unread; a
document only enters the stream once admitted. Because A(i) >= i for any schedule that reaches 1 at or
before the end of training, pacing never reorders a single pass over the data: in one epoch the trainer
reads the order as is (and with n_samples < N it reads only the easiest n_samples documents). Pacing
shapes multi-epoch training: the easiest documents are admitted first and so revisited most often.

Everything is computed chunk by chunk with numpy (no per-sample Python loop), and any window
[start, stop) can be produced without materializing earlier samples, so a run resumes from any index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PACING_KINDS = ("none", "linear", "root", "step")
_CHUNK = 1 << 20  # samples per vectorized chunk (tests shrink it to exercise chunk boundaries)
_EPS = 1e-6  # tolerance under ceil(): 0.1 * 10 must admit 1 document, not 2


@dataclass
class PacingConfig:
    """How fast the admitted prefix of the easy -> hard order grows.

    kind: "none" (everything admitted from the start), "linear", "root" (Platanios et al. 2019) or "step".
    start_fraction: c0 in (0, 1], the share admitted at progress 0.
    full_at: progress in (0, 1] at which everything is admitted (T in the paper, as a share of training).
    steps: for kind "step" only, [progress, fraction] pairs: from that progress on, that fraction is
        admitted (start_fraction before the first pair, 1 from full_at on). Progress strictly increasing
        inside (0, full_at), fractions nondecreasing in [start_fraction, 1].
    """

    kind: str = "none"
    start_fraction: float = 0.1
    full_at: float = 1.0
    steps: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject schedules that would admit nothing, shrink, or never finish, before any sample is drawn."""
        if self.kind not in PACING_KINDS:
            raise ValueError(f"pacing kind {self.kind!r} is unknown; choose one of {list(PACING_KINDS)}")
        if not (0.0 < self.start_fraction <= 1.0):
            raise ValueError(f"pacing start_fraction={self.start_fraction} must be in (0, 1]")
        if not (0.0 < self.full_at <= 1.0):
            raise ValueError(f"pacing full_at={self.full_at} must be in (0, 1]")
        steps = [list(map(float, s)) for s in self.steps]
        if self.kind != "step":
            if steps:
                raise ValueError(f"pacing steps are only used with kind 'step', not {self.kind!r}")
            return
        prev_p, prev_f = 0.0, self.start_fraction
        for s in steps:
            if len(s) != 2:
                raise ValueError(f"pacing step {s} must be a [progress, fraction] pair")
            p, f = s
            if not (prev_p < p < self.full_at):
                raise ValueError(f"pacing step progress {p} must increase strictly inside (0, full_at={self.full_at})")
            if not (prev_f <= f <= 1.0):
                raise ValueError(f"pacing step fraction {f} must be nondecreasing within [start_fraction, 1]")
            prev_p, prev_f = p, f
        self.steps = steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | PacingConfig | None) -> PacingConfig:
        """Build from a dict, a DictConfig (Hydra) or an order's meta["pacing"]; None means kind "none"."""
        if data is None:
            return cls()
        if isinstance(data, PacingConfig):
            return data
        if not isinstance(data, dict):  # DictConfig: resolve to plain containers first
            from omegaconf import OmegaConf

            data = OmegaConf.to_container(data, resolve=True)  # type: ignore[assignment]
        unknown = set(data) - {"kind", "start_fraction", "full_at", "steps"}
        if unknown:
            raise ValueError(f"unknown pacing keys {sorted(unknown)}")
        return cls(**{k: (list(map(list, v)) if k == "steps" else v) for k, v in data.items()})


def _fraction(progress: np.ndarray, cfg: PacingConfig) -> np.ndarray:
    """Vectorized competence; `progress` already validated and clipped to [0, 1]."""
    if cfg.kind == "none":
        return np.ones_like(progress)
    c0, t = cfg.start_fraction, cfg.full_at
    x = np.minimum(progress / t, 1.0)
    if cfg.kind == "linear":
        out = c0 + (1.0 - c0) * x
    elif cfg.kind == "root":
        out = np.sqrt(c0 * c0 + (1.0 - c0 * c0) * x)
    else:  # step
        out = np.full_like(progress, c0)
        for p, f in cfg.steps:
            out = np.where(progress >= p, f, out)
        out = np.where(progress >= t, 1.0, out)
    return np.clip(out, c0, 1.0)


def admitted_fraction(progress: float, cfg: PacingConfig) -> float:
    """Share in (0, 1] of the easy -> hard order admitted at training progress p (nondecreasing in p).

    linear: min(1, c0 + (1 - c0) p / full_at); root: min(1, sqrt(c0^2 + (1 - c0^2) p / full_at));
    step: piecewise constant (see `PacingConfig`); none: 1. Progress above 1 counts as 1 (a few extra
    steps after the planned end must not fail); negative or NaN progress is a caller bug and raises.
    """
    p = float(progress)
    if not p >= 0.0:
        raise ValueError(f"training progress must be >= 0, got {progress}")
    return float(_fraction(np.array([min(p, 1.0)]), cfg)[0])


def admitted_counts(n_docs: int, n_samples: int, cfg: PacingConfig, start: int = 0,
                    stop: int | None = None) -> np.ndarray:
    """A(i) for samples i in [start, stop): documents of the order admitted at sample i, in [1, n_docs]."""
    stop = n_samples if stop is None else stop
    progress = np.arange(start, stop, dtype=np.float64) / max(n_samples, 1)
    counts = np.ceil(_fraction(np.minimum(progress, 1.0), cfg) * n_docs - _EPS)
    return np.clip(counts, 1, n_docs).astype(np.int64)


@dataclass
class _State:
    """Where the walk stands before sample `i`: everything `paced_indices` needs to continue."""

    i: int = 0
    pointer: int = 0  # documents of the order read as new so far
    pass_id: int = -1  # current revisit pass (-1: none started)
    pass_size: int = 0
    pass_pos: int = 0  # revisits already taken from the current pass


def _pass_perm(order: np.ndarray, size: int, seed: int, pass_id: int) -> np.ndarray:
    return order[np.random.default_rng([seed, pass_id]).permutation(size)]


def _walk(order: np.ndarray, n_samples: int, cfg: PacingConfig, seed: int, start: int,
          stop: int) -> Iterator[np.ndarray]:
    """Yield the samples of [start, stop) chunk by chunk; earlier chunks only advance the counters."""
    n_docs = len(order)
    st = _State()
    perm: np.ndarray | None = None  # materialized permutation of the current pass (only when emitting)
    while st.i < stop:
        lo, hi = st.i, min(stop, st.i + _CHUNK)
        emit = hi > start
        a = admitted_counts(n_docs, n_samples, cfg, lo, hi)
        k = np.arange(lo, hi, dtype=np.int64)
        # P(k+1) = min(P(k) + 1, A(k)), unrolled: P(k+1) = k + min(P(lo) + 1 - lo, cummin_{m<=k}(A(m) - m)).
        after = k + np.minimum(st.pointer + 1 - lo, np.minimum.accumulate(a - k))
        before = np.concatenate([[st.pointer], after[:-1]])
        is_new = after > before
        out = np.empty(hi - lo, dtype=np.int64) if emit else None
        if out is not None:
            out[is_new] = order[before[is_new]]
        revisit_at = np.flatnonzero(~is_new)  # chunk positions of revisits, in sample order
        taken = 0
        while taken < len(revisit_at):
            if st.pass_id < 0 or st.pass_pos == st.pass_size:
                st.pass_id += 1
                st.pass_size = int(a[revisit_at[taken]])
                st.pass_pos = 0
                perm = None
            n = min(st.pass_size - st.pass_pos, len(revisit_at) - taken)
            if out is not None:
                if perm is None:
                    perm = _pass_perm(order, st.pass_size, seed, st.pass_id)
                out[revisit_at[taken:taken + n]] = perm[st.pass_pos:st.pass_pos + n]
            st.pass_pos += n
            taken += n
        st.pointer = int(after[-1])
        st.i = hi
        if out is not None:
            yield out[max(start - lo, 0):]


def paced_indices(order: Sequence[int] | np.ndarray, n_samples: int, cfg: PacingConfig, seed: int = 0, *,
                  start: int = 0, stop: int | None = None) -> np.ndarray:
    """Global document indices for samples [start, stop) of an n_samples-long paced run (see module doc).

    A pure function of (order, n_samples, cfg, seed): a run resumed at sample `start` reads exactly what
    the uninterrupted run would have. `stop` defaults to n_samples; the window costs O(stop) arithmetic
    but only O(stop - start + len(order)) memory.
    """
    order = np.asarray(order, dtype=np.int64)
    stop = n_samples if stop is None else stop
    if len(order) == 0:
        raise ValueError("cannot pace an empty order")
    if n_samples < 0 or not (0 <= start <= stop <= n_samples):
        raise ValueError(f"need 0 <= start ({start}) <= stop ({stop}) <= n_samples ({n_samples})")
    if start == stop:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(list(_walk(order, n_samples, cfg, seed, start, stop)))


def pacing_summary(n_docs: int, n_samples: int, cfg: PacingConfig) -> dict[str, Any]:
    """Numbers worth logging at the start of a run: admitted share at a few progress points."""
    points = [0.0, 0.25, 0.5, 0.75, 1.0]
    return {"kind": cfg.kind, "n_docs": n_docs, "n_samples": n_samples,
            "admitted": {str(p): math.ceil(admitted_fraction(p, cfg) * n_docs - _EPS) for p in points}}
