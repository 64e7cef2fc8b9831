"""Direct-alignment preference losses (LFM2 report, section 5) and the per-sequence log-probs they need.

Every loss here is a function of the implicit reward of a response y to a prompt x,

    u(x, y) = log pi(y|x) - log pi_ref(y|x)          (SimPO: u = log pi(y|x), no reference)
    r(x, y) = beta * u(x, y)                          (plain)
    r(x, y) = beta * u(x, y) / |y|                    (length-normalised; |y| = completion tokens)

computed for the chosen (w) and rejected (l) response of each pair, with d = r_w - r_l:

    dpo        -(1 - eps) log sigma(d) - eps log sigma(-d)          (eps = label smoothing, "cDPO")
    apo_zero   1 - sigma(r_w) + sigma(r_l)                          (APO-zero; the report writes
               -sigma(r_w) + sigma(r_l) "up to constants": the +1 makes the loss lie in [0, 2] and is
               0 at a perfect separation; gradients are identical)
    ipo        (d / beta - 1 / (2 beta))^2                          (on the log-ratio difference, as in IPO)
    hinge      max(0, 1 - d)                                        (SLiC)
    simpo      -(1 - eps) log sigma(d - gamma) - eps log sigma(-(d - gamma))   (reference-free,
               always length-normalised, gamma = `margin`)
    nll        -log pi(y_w|x) (/ |y_w| when normalised): the chosen response's cross-entropy, reference-free
               and independent of beta; added to a DPO term it is "DPO + NLL" (RPO / iterative RPO), which
               keeps the chosen likelihood from falling with the rejected one

`ln_dpo` / `ln_apo_zero` are dpo / apo_zero with length normalisation on (the report's objective); any
term can turn it on with `length_normalize=true`. TRL's other losses (robust, exo_pair, nca_pair, bco_pair,
sppo_hard, aot, aot_unpaired, apo_down, discopop, and the names sigmoid / sigmoid_norm / sft for dpo /
ln_dpo / nll), its f-divergence scores and LD-DPO's `ld_alpha` are in `preference_terms.py`; `PreferenceLoss`
documents the two conventions that differ from TRL's under the same name and the `trl_compatible` preset.
A loss is a weighted sum of terms. Everything returns per-pair values; callers sum over pairs and normalise
by the number of pairs of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .head import _acc_dtype, default_chunk_size
from .labels import IGNORE_INDEX
from .preference_terms import (
    ALIASES,
    ALL_LOSSES,
    ALWAYS_NORMALISED,
    DPO_FAMILY,
    F_DIVERGENCE_OK,
    F_DIVERGENCES,
    LOSSES,
    REFERENCE_FREE,
    SORTING,
    TRL_LOSSES,
    base_name,
    f_divergence_scores,
    ld_weighted,
    term_loss,
)

__all__ = ["ALIASES", "ALL_LOSSES", "CONVENTIONS", "LOSSES", "NLL_REDUCTIONS", "TRL_LOSSES", "LossTerm",
           "PreferenceLoss", "pair_logps", "pair_logps_split", "rewards", "sequence_logps", "term_loss"]

CONVENTIONS = ("native", "trl_compatible")
NLL_REDUCTIONS = ("pair", "token")


# ------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LossTerm:
    """One term of the weighted sum. `length_normalize=None` takes the name's default (on for ln_*, sigmoid_norm
    and simpo; for ipo it is the conventions' choice: off natively, on under trl_compatible)."""

    name: str
    weight: float = 1.0
    length_normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in ALL_LOSSES:
            raise ValueError(f"preference loss {self.name!r} is unknown; choose from {ALL_LOSSES}")
        if self.base in ALWAYS_NORMALISED and self.length_normalize is False:
            raise ValueError(f"preference loss {self.name!r} is length-normalised by definition; "
                             "drop length_normalize=false or use the un-normalised variant")

    @property
    def base(self) -> str:
        """The loss this name computes (TRL's sigmoid / sigmoid_norm / sft are dpo / ln_dpo / nll)."""
        return base_name(self.name)

    @property
    def normalised(self) -> bool:
        return bool(self.length_normalize) or self.base in ALWAYS_NORMALISED

    @property
    def uses_reference(self) -> bool:
        return self.base not in REFERENCE_FREE

    @property
    def label(self) -> str:
        """Metric name: the loss name, with `ln_` added when normalisation was switched on explicitly."""
        implicit = self.name.startswith("ln_") or self.name in ("simpo", "sigmoid_norm")
        return f"ln_{self.name}" if self.normalised and not implicit else self.name

    @property
    def reward_like(self) -> bool:
        """Whether this term's r is an implicit reward (nll's is a scaled log-likelihood)."""
        return self.base != "nll"


@dataclass(frozen=True)
class PreferenceLoss:
    """A weighted sum of preference terms and the parameters they share.

    beta (reward scale), label_smoothing (cDPO for dpo / simpo; eps of robust, exo_pair, aot*), margin
    (SimPO's gamma, TRL's `simpo_gamma`), and TRL's `ld_alpha`, `f_divergence_type`, `f_alpha_divergence_coef`,
    `discopop_tau`. Two conventions differ between this project and TRL under the same name, and each is a
    setting: IPO summed or token-averaged (the ipo term's `length_normalize`) and the NLL's reduction
    (`nll_reduction`: `pair`, the mean over pairs of each chosen response's NLL, or `token`, the chosen tokens'
    mean over the call's pairs). `conventions="trl_compatible"` picks TRL's side of every such choice left
    unset, and makes the DPO losses ignore label_smoothing as TRL 1.16's `sigmoid` does, so that each TRL name
    gives TRL's numbers; "native" (the default) keeps this project's.
    """

    terms: tuple[LossTerm, ...] = (LossTerm("ln_dpo"),)
    beta: float = 5.0
    label_smoothing: float = 0.0
    margin: float = 0.0
    conventions: str = "native"
    nll_reduction: str | None = None  # None = the conventions' choice (native: pair, trl_compatible: token)
    ld_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("stage.losses is empty: give at least one {name, weight} term")
        if self.beta <= 0:
            raise ValueError(f"stage.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.conventions not in CONVENTIONS:
            raise ValueError(f"stage.conventions={self.conventions!r}; choose from {CONVENTIONS}")
        trl = self.conventions == "trl_compatible"
        reduction = self.nll_reduction or ("token" if trl else "pair")
        if reduction not in NLL_REDUCTIONS:
            raise ValueError(f"stage.nll_reduction={self.nll_reduction!r}; choose from {NLL_REDUCTIONS} (or null)")
        object.__setattr__(self, "nll_reduction", reduction)
        if trl:  # TRL's IPO is token-averaged; an explicit length_normalize still wins
            object.__setattr__(self, "terms", tuple(
                LossTerm(t.name, t.weight, True) if t.base == "ipo" and t.length_normalize is None else t
                for t in self.terms))
        for t in self.terms:
            if t.base == "nll" and reduction == "token" and t.length_normalize:
                raise ValueError(f"{t.name} with nll_reduction=token is already a per-token mean; drop "
                                 "length_normalize=true or set stage.nll_reduction=pair")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"stage.ld_alpha must be in [0, 1] (or null), got {self.ld_alpha}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"stage.f_divergence_type={self.f_divergence_type!r}; choose from {F_DIVERGENCES}")
        if self.f_divergence_type != "reverse_kl":
            bad = [t.name for t in self.terms if t.base not in F_DIVERGENCE_OK]
            if bad:
                raise ValueError(f"f_divergence_type={self.f_divergence_type!r} only applies to losses of the "
                                 f"chosen-rejected reward difference; {bad} have no f-divergence form")
        if self.discopop_tau <= 0:
            raise ValueError(f"stage.discopop_tau must be > 0, got {self.discopop_tau}")
        if any(t.base == "exo_pair" for t in self.terms) and self.label_smoothing == 0.0:
            raise ValueError("exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")

    @classmethod
    def from_config(cls, terms: Iterable[Mapping[str, Any]], beta: float, label_smoothing: float = 0.0,
                    margin: float = 0.0, **options: Any) -> PreferenceLoss:
        """`options`: conventions, nll_reduction, ld_alpha, f_divergence_type, f_alpha_divergence_coef,
        discopop_tau (None leaves a field at its default)."""
        parsed = []
        for i, term in enumerate(terms):
            unknown = set(term) - {"name", "weight", "length_normalize"}
            if unknown or "name" not in term:
                raise ValueError(f"stage.losses[{i}] = {dict(term)}: expected keys name, weight, length_normalize")
            parsed.append(LossTerm(str(term["name"]), float(term.get("weight", 1.0)), term.get("length_normalize")))
        known = {"conventions", "nll_reduction", "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef",
                 "discopop_tau"}
        if set(options) - known:
            raise TypeError(f"unknown preference loss options {sorted(set(options) - known)}")
        kept = {k: v for k, v in options.items() if v is not None}
        return cls(tuple(parsed), float(beta), float(label_smoothing), float(margin), **kept)

    @property
    def needs_reference(self) -> bool:
        return any(t.uses_reference for t in self.terms)

    def __call__(self, policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor,
                 policy_tail: torch.Tensor | None = None, reference_tail: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """policy / reference summed completion log-probs (B, 2) [chosen, rejected]; lengths (B, 2) tokens;
        with `ld_alpha`, policy_tail / reference_tail (B, 2): the summed log-probs of the tokens past the
        shorter response's length (`pair_logps_split`).

        -> (per-pair loss (B,), {metric: sum over pairs}). Reward metrics use the first reward term's reward.
        The sorting losses (aot, aot_unpaired) and nll_reduction=token couple the pairs of one call: pass a
        whole micro-batch, as TRL does with its per-device batch.
        """
        if self.needs_reference and reference is None:
            raise ValueError("these preference losses need reference log-probs (only simpo and nll / sft are "
                             "reference-free)")
        if policy.shape != lengths.shape or policy.dim() != 2 or policy.shape[1] != 2:
            raise ValueError(f"policy log-probs {tuple(policy.shape)} and lengths {tuple(lengths.shape)} must both "
                             "be (pairs, 2)")
        if bool((lengths <= 0).any()):
            raise ValueError("every chosen and rejected response needs at least one completion token")
        raw_policy = policy
        if self.ld_alpha is not None:
            if policy_tail is None or (reference is not None and reference_tail is None):
                raise ValueError("ld_alpha needs the tail log-probs past the shared length (pair_logps_split)")
            policy = ld_weighted(policy, policy_tail, self.ld_alpha)
            if reference is not None:
                reference = ld_weighted(reference, reference_tail, self.ld_alpha)
        total = torch.zeros(policy.shape[0], dtype=policy.dtype, device=policy.device)
        metrics: dict[str, torch.Tensor] = {}
        first_rewards = None
        trl = self.conventions == "trl_compatible"
        for term in self.terms:
            if term.base == "nll":  # the raw log-probs: TRL's sft ignores ld_alpha and the f-divergence
                r = rewards(term, raw_policy, None, lengths, self.beta)
                if self.nll_reduction == "token":
                    value = -raw_policy[:, 0] * (policy.shape[0] / lengths[:, 0].sum().to(policy.dtype))
                else:
                    value = term_loss(term.name, r, self.beta)
            else:
                r = rewards(term, policy, reference, lengths, self.beta, self.f_divergence_type,
                            self.f_alpha_divergence_coef)  # (B, 2)
                eps = 0.0 if trl and term.base in DPO_FAMILY else self.label_smoothing
                sides = {}
                if term.base in SORTING:
                    scale = self.beta / lengths.to(policy.dtype) if term.normalised else self.beta
                    sides = {"policy": policy * scale, "reference": reference * scale}
                value = term_loss(term.name, r, self.beta, eps, self.margin, discopop_tau=self.discopop_tau,
                                  **sides)  # (B,)
            if first_rewards is None and term.reward_like:
                first_rewards = r
            total = total + term.weight * value
            key = f"loss_{term.label}"
            metrics[key] = metrics.get(key, 0.0) + value.detach().sum()
        r = (first_rewards if first_rewards is not None else r).detach()
        metrics.update(reward_chosen=r[:, 0].sum(), reward_rejected=r[:, 1].sum(),
                       reward_margin=(r[:, 0] - r[:, 1]).sum(), accuracy=(r[:, 0] > r[:, 1]).to(r.dtype).sum())
        return total, metrics


# ------------------------------------------------------------------------------------------ the losses
def rewards(term: LossTerm, policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor,
            beta: float, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
            ) -> torch.Tensor:
    """Implicit rewards (B, 2) of one term: beta * the f-divergence score of the log-ratio (the log-prob for
    reference-free terms), / |y| when normalised (TRL normalises the score, after f', the same way)."""
    if term.uses_reference:
        u = f_divergence_scores(policy - reference, f_divergence_type, f_alpha_divergence_coef)
    else:
        u = policy
    if term.normalised:
        u = u / lengths.to(u.dtype)
    return beta * u


# ------------------------------------------------------------------------------------------ log-probs
class _SequenceLogps(torch.autograd.Function):
    """Per-row sums of log softmax(h W^T)[target], chunk by chunk; the backward recomputes each chunk's logits.

    Only one fp32 (chunk, V) buffer is alive at a time in either direction, and nothing of the logits is
    kept between forward and backward (the cost: one extra head matmul, as with activation checkpointing).
    """

    @staticmethod
    def forward(ctx, h, weight, targets, rows, n_rows, chunk):  # type: ignore[override]
        acc = _acc_dtype(h)
        out = torch.zeros(n_rows, dtype=acc, device=h.device)
        for s in range(0, h.shape[0], chunk):
            logits = F.linear(h[s:s + chunk], weight).to(acc)  # (n, V)
            lp = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
            out.index_add_(0, rows[s:s + chunk], lp)
        ctx.save_for_backward(h, weight, targets, rows)
        ctx.chunk = chunk
        device = h.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        h, weight, targets, rows = ctx.saved_tensors
        acc = _acc_dtype(h)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        g_rows = grad_out.to(acc)[rows]  # (n,) d loss / d log p(token)
        device, enabled, dtype = ctx.autocast
        w_acc = weight.to(acc)
        for s in range(0, h.shape[0], ctx.chunk):
            hc = h[s:s + ctx.chunk]
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                logits = F.linear(hc, weight)
            g = -torch.softmax(logits.to(acc), dim=-1)  # (n, V): d log p[target] / d logits = onehot - p
            g.scatter_add_(1, targets[s:s + ctx.chunk, None], torch.ones_like(g[:, :1]))
            g.mul_(g_rows[s:s + ctx.chunk, None])
            if need_h:
                grad_h[s:s + ctx.chunk] = (g @ w_acc).to(h.dtype)
            if need_w:
                grad_w.addmm_(g.t(), hc.to(acc))
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None


def sequence_logps(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                   chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (R, T, d), head (V, d), targets (R, T) (the next token, IGNORE_INDEX off the completion)
    -> (summed log-probs (R,) in fp32 or wider, completion lengths (R,)). Differentiable in hidden and head."""
    sums, lengths = _bucketed_logps(hidden, head_weight, targets, chunk_size)
    return sums, lengths


def sequence_logps_split(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                         shared: torch.Tensor, chunk_size: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Like `sequence_logps`, plus each row's tail: the summed log-probs of its completion tokens after the
    first `shared[row]` (R,) ones (LD-DPO's verbose part) -> (sums (R,), lengths (R,), tails (R,))."""
    sums, lengths = _bucketed_logps(hidden, head_weight, targets, chunk_size, shared)
    R = targets.shape[0]
    return sums[:R] + sums[R:], lengths, sums[R:]


def _bucketed_logps(hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int | None, shared: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sums of completion log-probs; with `shared`, rows R..2R-1 hold the tokens past `shared[row]`
    and rows 0..R-1 the first `shared[row]` (one pass over the head either way)."""
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    R, T = targets.shape
    flat = targets.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # only completion positions need logits
    h = hidden.reshape(R * T, -1).index_select(0, keep)  # (n, d)
    tgt = flat.index_select(0, keep)
    rows = keep // T
    lengths = (targets != IGNORE_INDEX).sum(1)
    n_rows = R
    if shared is not None:  # keep is row-major, so a token's place in its completion is its rank in the row
        starts = torch.cumsum(lengths, 0) - lengths
        place = torch.arange(keep.numel(), device=keep.device) - starts[rows]
        rows = rows + R * (place >= shared.to(rows.device)[rows]).long()
        n_rows = 2 * R
    chunk = chunk_size or default_chunk_size(head_weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        return _SequenceLogps.apply(h, head_weight, tgt, rows, n_rows, chunk), lengths
    return _SequenceLogps.forward(_NoCtx(), h, head_weight, tgt, rows, n_rows, chunk), lengths


class _NoCtx:
    """Stands in for autograd's ctx on the no-grad path (nothing is saved)."""

    def save_for_backward(self, *_: Any) -> None:
        pass


def pair_logps(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score a pair batch (input_ids / doc_ids / targets of shape (B, 2, T)) with `model`
    -> (summed completion log-probs (B, 2), completion lengths (B, 2))."""
    ids = batch["input_ids"]
    B, two, T = ids.shape

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(hidden, weight, batch["targets"].reshape(B * two, T), chunk_size)

    logps, lengths = model(ids.reshape(B * two, T), doc_ids=batch["doc_ids"].reshape(B * two, T), head_fn=head)
    return logps.view(B, two), lengths.view(B, two)


def pair_logps_split(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pair_logps` plus the tails LD-DPO reweights: -> (sums (B, 2), lengths (B, 2), tails (B, 2)), a tail
    being the summed log-probs of a response's tokens past the shorter response's length (0 for the shorter)."""
    ids = batch["input_ids"]
    B, two, T = ids.shape
    targets = batch["targets"].reshape(B * two, T)
    shared = (targets != IGNORE_INDEX).sum(1).view(B, two).min(1).values.repeat_interleave(two)

    def head(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return sequence_logps_split(hidden, weight, targets, shared, chunk_size)

    logps, lengths, tails = model(ids.reshape(B * two, T), doc_ids=batch["doc_ids"].reshape(B * two, T),
                                  head_fn=head)
    return logps.view(B, two), lengths.view(B, two), tails.view(B, two)
