"""Tempered, decoupled Top-K distillation (LFM2 report, section 4) and the baselines users compare it to.

The teacher stores, per position, its top-K token ids T and log-probabilities (log-softmax over the full
vocabulary at temperature 1). The chain rule splits the full KL exactly:

    KL(p||q) = KL_Bern(P_T || Q_T) + P_T KL(p(.|T) || q(.|T)) + (1 - P_T) KL(p(.|T^c) || q(.|T^c))

with P_T = sum_{v in T} p(v), Q_T = sum_{v in T} q(v) (q = the student's full softmax). The tail term is
unknowable from a top-K cache and is dropped; the conditional term is tempered at tau within T:

    L_KD = KL_Bern(P_T || Q_T) + w * [tau^2] * KL(p_tau(.|T) || q_tau(.|T))

w is P_T ("teacher_mass", the chain-rule weight), 1 ("one") or a constant. Everything here is per
position and summed; callers normalise by the number of positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .labels import IGNORE_INDEX

KD_METHODS = ("decoupled", "truncated", "tail_bucket")
WEIGHTS = ("teacher_mass", "one", "constant")


@dataclass(frozen=True)
class KDParams:
    method: str = "decoupled"  # decoupled | truncated (naive, renormalised top-K) | tail_bucket (K+1 buckets)
    temperature: float = 1.0
    weight: str = "teacher_mass"  # conditional-term weight w: teacher_mass (P_T) | one | constant
    weight_value: float = 1.0  # w when weight == "constant"
    tau_squared: bool = True  # multiply the tempered term by tau^2 (keeps gradient scale across tau)

    def __post_init__(self) -> None:
        if self.method not in KD_METHODS:
            raise ValueError(f"kd.method={self.method!r}; choose one of {KD_METHODS}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"kd.weight={self.weight!r}; choose one of {WEIGHTS}")
        if self.temperature <= 0:
            raise ValueError(f"kd.temperature must be > 0, got {self.temperature}")


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and near -inf, with finite gradients everywhere.

    Both branches see only inputs where they are finite (the "double where" trick), and x = 0 (a mass
    of exactly 1) is nudged to the smallest negative number, so an unused branch never puts a NaN into
    the gradient.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -0.6931
    a = torch.where(near_zero, x, torch.full_like(x, -0.6931))
    b = torch.where(near_zero, torch.full_like(x, -0.6931), x)
    return torch.where(near_zero, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _xlog_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) with 0 * anything = 0 (so P_T = 1 or 0 is exact, and gradients stay finite)."""
    pos = p > 0
    zero = torch.zeros_like(p)
    return torch.where(pos, p * (torch.where(pos, log_p, zero) - torch.where(pos, log_q, zero)), zero)


def kd_terms(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor,
             params: KDParams) -> dict[str, torch.Tensor]:
    """Per-position terms. student_logits (n, V); teacher_ids (n, K) long; teacher_logprobs (n, K).

    Returns a dict of (n,) tensors: kd, mass (KL_Bern), cond (tempered conditional KL, unweighted),
    p_t and q_t. Computed in the student logits' dtype (fp32 in training, fp64 in the reference tests).
    """
    z = student_logits
    t_lp = teacher_logprobs.to(z.dtype)
    log_q = z - torch.logsumexp(z, dim=-1, keepdim=True)  # (n, V)
    log_q_t = log_q.gather(1, teacher_ids)  # (n, K)
    log_QT = torch.logsumexp(log_q_t, dim=-1)  # (n,)
    log_PT = torch.logsumexp(t_lp, dim=-1)
    PT, QT = log_PT.exp(), log_QT.exp()
    tau = params.temperature

    if params.method == "truncated":
        # Naive: the teacher renormalised over its top-K vs the student's full (tempered) softmax.
        p_tilde_log = torch.log_softmax(t_lp / tau, dim=-1)
        log_q_tau = (z / tau).log_softmax(-1).gather(1, teacher_ids)
        cond = _xlog_ratio(p_tilde_log.exp(), p_tilde_log, log_q_tau).sum(-1)
        kd = cond * (tau * tau if params.tau_squared else 1.0)
        return {"kd": kd, "mass": torch.zeros_like(kd), "cond": cond, "p_t": PT, "q_t": QT}

    # Binary mass term, untempered.
    mass = _xlog_ratio(PT, log_PT, log_QT) + _xlog_ratio(1 - PT, _log1mexp(log_PT), _log1mexp(log_QT))
    if params.method == "tail_bucket":
        # K+1 buckets (top-K tokens + "everything else"), untempered: = mass + P_T * cond at tau 1.
        cond_1 = _xlog_ratio(t_lp.exp(), t_lp, log_q_t).sum(-1)
        kd = cond_1 + _xlog_ratio(1 - PT, _log1mexp(log_PT), _log1mexp(log_QT))
        return {"kd": kd, "mass": mass, "cond": cond_1, "p_t": PT, "q_t": QT}

    # Decoupled: conditional distributions within T, tempered.
    log_p_cond = torch.log_softmax(t_lp / tau, dim=-1)
    log_q_cond = torch.log_softmax(z.gather(1, teacher_ids) / tau, dim=-1)
    cond = _xlog_ratio(log_p_cond.exp(), log_p_cond, log_q_cond).sum(-1)
    if params.weight == "teacher_mass":
        w = PT
    elif params.weight == "one":
        w = torch.ones_like(PT)
    else:
        w = torch.full_like(PT, params.weight_value)
    kd = mass + w * cond * (tau * tau if params.tau_squared else 1.0)
    return {"kd": kd, "mass": mass, "cond": cond, "p_t": PT, "q_t": QT}


def ce_kd_chunk(params: KDParams, kd_weight: float):
    """A `ChunkLoss` for `fused_head_loss`: sum over labelled positions of CE + kd_weight * L_KD.

    Metric sums: ce, kd, mass, cond, p_t, q_t (divide by the token count for means).
    """

    def fn(logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor):
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        lse = torch.logsumexp(logits, dim=-1)
        ce = ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
        terms = kd_terms(logits, teacher_ids.long(), teacher_logprobs, params)
        vf = valid.to(logits.dtype)
        sums = {k: (v * vf).sum() for k, v in terms.items()}
        loss = ce + kd_weight * sums["kd"]
        return loss, {"ce": ce, **sums}

    return fn
