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
term can turn it on with `length_normalize=true`. A loss is a weighted sum of terms. Everything returns
per-pair values; callers sum over pairs and normalise by the number of pairs of the global batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..data.packed import IGNORE_INDEX
from .head import _acc_dtype, default_chunk_size

LOSSES = ("dpo", "ln_dpo", "apo_zero", "ln_apo_zero", "ipo", "hinge", "simpo", "nll")
_ALWAYS_NORMALISED = ("ln_dpo", "ln_apo_zero", "simpo")
_REFERENCE_FREE = ("simpo", "nll")


# ------------------------------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LossTerm:
    """One term of the weighted sum. `length_normalize=None` takes the name's default (on for ln_* and simpo)."""

    name: str
    weight: float = 1.0
    length_normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.name not in LOSSES:
            raise ValueError(f"preference loss {self.name!r} is unknown; choose from {LOSSES}")
        if self.name in _ALWAYS_NORMALISED and self.length_normalize is False:
            raise ValueError(f"preference loss {self.name!r} is length-normalised by definition; "
                             "drop length_normalize=false or use the un-normalised variant")

    @property
    def normalised(self) -> bool:
        return bool(self.length_normalize) or self.name in _ALWAYS_NORMALISED

    @property
    def uses_reference(self) -> bool:
        return self.name not in _REFERENCE_FREE

    @property
    def label(self) -> str:
        """Metric name: the loss name, with `ln_` added when normalisation was switched on explicitly."""
        return f"ln_{self.name}" if self.normalised and not self.name.startswith("ln_") and self.name != "simpo" \
            else self.name

    @property
    def reward_like(self) -> bool:
        """Whether this term's r is an implicit reward (nll's is a scaled log-likelihood)."""
        return self.name != "nll"


@dataclass(frozen=True)
class PreferenceLoss:
    """beta (reward scale), label smoothing (dpo, simpo), margin (SimPO's target reward margin gamma)."""

    terms: tuple[LossTerm, ...] = (LossTerm("ln_dpo"),)
    beta: float = 5.0
    label_smoothing: float = 0.0
    margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("stage.losses is empty: give at least one {name, weight} term")
        if self.beta <= 0:
            raise ValueError(f"stage.beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"stage.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @classmethod
    def from_config(cls, terms: Iterable[Mapping[str, Any]], beta: float, label_smoothing: float = 0.0,
                    margin: float = 0.0) -> PreferenceLoss:
        parsed = []
        for i, term in enumerate(terms):
            unknown = set(term) - {"name", "weight", "length_normalize"}
            if unknown or "name" not in term:
                raise ValueError(f"stage.losses[{i}] = {dict(term)}: expected keys name, weight, length_normalize")
            parsed.append(LossTerm(str(term["name"]), float(term.get("weight", 1.0)), term.get("length_normalize")))
        return cls(tuple(parsed), float(beta), float(label_smoothing), float(margin))

    @property
    def needs_reference(self) -> bool:
        return any(t.uses_reference for t in self.terms)

    def __call__(self, policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """policy / reference summed completion log-probs (B, 2) [chosen, rejected]; lengths (B, 2) tokens.

        -> (per-pair loss (B,), {metric: sum over pairs}). Reward metrics use the first reward term's reward.
        """
        if self.needs_reference and reference is None:
            raise ValueError("these preference losses need reference log-probs (only simpo and nll are reference-free)")
        if policy.shape != lengths.shape or policy.dim() != 2 or policy.shape[1] != 2:
            raise ValueError(f"policy log-probs {tuple(policy.shape)} and lengths {tuple(lengths.shape)} must both "
                             "be (pairs, 2)")
        if bool((lengths <= 0).any()):
            raise ValueError("every chosen and rejected response needs at least one completion token")
        total = torch.zeros(policy.shape[0], dtype=policy.dtype, device=policy.device)
        metrics: dict[str, torch.Tensor] = {}
        first_rewards = None
        for term in self.terms:
            r = rewards(term, policy, reference, lengths, self.beta)  # (B, 2)
            if first_rewards is None and term.reward_like:
                first_rewards = r
            value = term_loss(term.name, r, self.beta, self.label_smoothing, self.margin)  # (B,)
            total = total + term.weight * value
            key = f"loss_{term.label}"
            metrics[key] = metrics.get(key, 0.0) + value.detach().sum()
        r = (first_rewards if first_rewards is not None else r).detach()
        metrics.update(reward_chosen=r[:, 0].sum(), reward_rejected=r[:, 1].sum(),
                       reward_margin=(r[:, 0] - r[:, 1]).sum(), accuracy=(r[:, 0] > r[:, 1]).to(r.dtype).sum())
        return total, metrics


# ------------------------------------------------------------------------------------------ the losses
def rewards(term: LossTerm, policy: torch.Tensor, reference: torch.Tensor | None, lengths: torch.Tensor,
            beta: float) -> torch.Tensor:
    """Implicit rewards (B, 2) of one term: beta * log-ratio (or log-prob for simpo), / |y| when normalised."""
    u = policy - reference if term.uses_reference else policy
    if term.normalised:
        u = u / lengths.to(u.dtype)
    return beta * u


def term_loss(name: str, r: torch.Tensor, beta: float, label_smoothing: float = 0.0, margin: float = 0.0
              ) -> torch.Tensor:
    """Per-pair loss (B,) of one named loss on rewards r (B, 2) = [r_w, r_l]."""
    d = r[:, 0] - r[:, 1]
    eps = label_smoothing
    if name in ("dpo", "ln_dpo"):
        return -(1 - eps) * F.logsigmoid(d) - eps * F.logsigmoid(-d)
    if name in ("apo_zero", "ln_apo_zero"):
        return 1 - torch.sigmoid(r[:, 0]) + torch.sigmoid(r[:, 1])
    if name == "ipo":
        return (d / beta - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return torch.relu(1 - d)
    if name == "simpo":
        z = d - margin
        return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    if name == "nll":
        return -r[:, 0] / beta
    raise ValueError(f"preference loss {name!r} is unknown; choose from {LOSSES}")


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
    if hidden.shape[:2] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    R, T = targets.shape
    flat = targets.reshape(-1)
    keep = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # only completion positions need logits
    h = hidden.reshape(R * T, -1).index_select(0, keep)  # (n, d)
    tgt = flat.index_select(0, keep)
    rows = keep // T
    chunk = chunk_size or default_chunk_size(head_weight.shape[0])
    lengths = (targets != IGNORE_INDEX).sum(1)
    if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
        return _SequenceLogps.apply(h, head_weight, tgt, rows, R, chunk), lengths
    return _SequenceLogps.forward(_NoCtx(), h, head_weight, tgt, rows, R, chunk), lengths


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
