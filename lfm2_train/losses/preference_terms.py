"""The per-pair formulas of every preference loss, the f-divergence scores and the LD-DPO weighting.

`PreferenceLoss` (losses/preference.py) turns log-probs into rewards and sums weighted terms; this module
holds only the arithmetic, so that each formula can be read next to the TRL code it reproduces
(`trl/trainer/dpo_trainer.py` of TRL 1.16, `DPOTrainer._compute_loss`; SimPO and CPO's NLL from
`trl/experimental/cpo/cpo_trainer.py`). Names and parameter names are TRL's wherever TRL has the loss.

Inputs of `term_loss`: r (B, 2) = [r_w, r_l], the rewards beta * s / (|y| when normalised), where s is
the f-divergence score of the log-ratio u = log pi - log pi_ref (s = u for reverse KL, the default);
`policy` / `reference` (B, 2) are beta * log pi and beta * log pi_ref (/ |y| when normalised), which
only the sorting losses `aot` / `aot_unpaired` need. With d = r_w - r_l and eps = label_smoothing:

    sigmoid, sigmoid_norm    TRL's names for dpo, ln_dpo
    robust       (-(1 - eps) log sigma(d) + eps log sigma(-d)) / (1 - 2 eps)    (noise-robust DPO)
    exo_pair     q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps), q_w = sigma(d), q_l = sigma(-d)
                 (EXO, KL(model || label) over the pair; needs eps > 0)
    nca_pair     -log sigma(r_w) - log sigma(-r_w) / 2 - log sigma(-r_l) / 2
    bco_pair     -log sigma(r_w) - log sigma(-r_l)     (TRL 1.16: no running-mean reward shift)
    sppo_hard    (r_w - 1/2)^2 / beta^2 + (r_l + 1/2)^2 / beta^2   (SPPO with hard 1/0 win probabilities)
    aot          cDPO on a = sort_B(p_w - p_l) - sort_B(q_w - q_l)   (p = policy, q = reference rewards)
    aot_unpaired cDPO on a = sort_B(r_w) - sort_B(r_l)
                 (alignment via optimal transport: both sort over the pairs *of the call*, so the loss of
                 one pair depends on the others in its micro-batch, as in TRL)
    apo_down     sigma(r_w) + 1 - sigma(d)            (APO-down: chosen outputs worse than the model's own)
    discopop     (1 - m) (-log sigma(d)) + m exp(-d),  m = sigma(d / tau), tau = discopop_tau
    sft          TRL's name for nll (its default reduction there is the token-level batch mean)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ln_dpo", "apo_zero", "ln_apo_zero", "ipo", "hinge", "simpo", "nll")
# TRL's names that this project did not have; `sigmoid`, `sigmoid_norm` and `sft` are aliases of dpo, ln_dpo, nll
TRL_LOSSES = ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_down", "discopop", "sft")
ALL_LOSSES = LOSSES + TRL_LOSSES
ALIASES = {"sigmoid": "dpo", "sigmoid_norm": "ln_dpo", "sft": "nll"}
ALWAYS_NORMALISED = ("ln_dpo", "ln_apo_zero", "simpo")  # by base name
REFERENCE_FREE = ("simpo", "nll")  # by base name
SORTING = ("aot", "aot_unpaired")
DPO_FAMILY = ("dpo", "ln_dpo")  # base names whose label smoothing is cDPO's (TRL 1.16's sigmoid ignores it)
# TRL: "the f-DPO reparameterization leaves a beta log Z(x) term that only cancels in the chosen-rejected reward
# difference", so only the losses built on d accept another f-divergence (plus the NLL, which ignores it).
F_DIVERGENCE_OK = ("dpo", "ln_dpo", "hinge", "ipo", "exo_pair", "robust", "discopop", "nll")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def base_name(name: str) -> str:
    """The loss a name computes (TRL's aliases resolved)."""
    return ALIASES.get(name, name)


def f_divergence_scores(u: torch.Tensor, kind: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f'(pi / pi_ref) written in the log-ratio u (f-DPO): the score that replaces u in the reward.

    reverse_kl u; forward_kl 1 - exp(-u); js_divergence log 2 + log sigma(u); alpha_divergence
    (exp((alpha - 1) u) - 1) / (alpha - 1), u itself within 1e-6 of alpha = 1 (the KL limit). As in TRL, the
    alpha exponent is clamped at 80 (11 in fp16) and evaluated in at least fp32, so exp stays finite.
    """
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return u
        t = (alpha - 1.0) * u
        wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        clamped = torch.clamp(wide, max=11.0 if t.dtype == torch.float16 else 80.0)
        return (torch.exp(clamped) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"f_divergence_type {kind!r} is unknown; choose from {F_DIVERGENCES}")


def ld_weighted(total: torch.Tensor, tail: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's log-prob: shared + ld_alpha * tail = total - (1 - ld_alpha) * tail.

    `tail` is the summed log-prob of the completion tokens past the shorter response's length (zero for the
    shorter one): the "verbose" part whose weight LD-DPO lowers so that length stops paying.
    """
    return total - (1.0 - ld_alpha) * tail


def _cdpo(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def term_loss(name: str, r: torch.Tensor, beta: float, label_smoothing: float = 0.0, margin: float = 0.0, *,
              discopop_tau: float = 0.05, policy: torch.Tensor | None = None, reference: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Per-pair loss (B,) of one named loss on rewards r (B, 2) = [r_w, r_l] (module doc for the formulas)."""
    name = base_name(name)
    d = r[:, 0] - r[:, 1]
    eps = label_smoothing
    if name in ("dpo", "ln_dpo"):
        return _cdpo(d, eps)
    if name in ("apo_zero", "ln_apo_zero"):
        return 1 - torch.sigmoid(r[:, 0]) + torch.sigmoid(r[:, 1])
    if name == "ipo":
        return (d / beta - 1 / (2 * beta)) ** 2
    if name == "hinge":
        return torch.relu(1 - d)
    if name == "simpo":
        return _cdpo(d - margin, eps)
    if name == "nll":
        return -r[:, 0] / beta
    if name == "robust":
        return (-(1 - eps) * F.logsigmoid(d) + eps * F.logsigmoid(-d)) / (1 - 2 * eps)
    if name == "exo_pair":
        if not 0 < eps < 1:
            raise ValueError("exo_pair needs 0 < label_smoothing < 1 (the EXO paper recommends 1e-3)")
        return (torch.sigmoid(d) * (F.logsigmoid(d) - math.log1p(-eps))
                + torch.sigmoid(-d) * (F.logsigmoid(-d) - math.log(eps)))
    if name == "nca_pair":
        return -F.logsigmoid(r[:, 0]) - 0.5 * F.logsigmoid(-r[:, 0]) - 0.5 * F.logsigmoid(-r[:, 1])
    if name == "bco_pair":
        return -F.logsigmoid(r[:, 0]) - F.logsigmoid(-r[:, 1])
    if name == "sppo_hard":
        return (r[:, 0] / beta - 0.5 / beta) ** 2 + (r[:, 1] / beta + 0.5 / beta) ** 2
    if name == "aot":
        if policy is None or reference is None:
            raise ValueError("aot needs the policy and reference rewards separately")
        a = torch.sort(policy[:, 0] - policy[:, 1], dim=0).values \
            - torch.sort(reference[:, 0] - reference[:, 1], dim=0).values
        return _cdpo(a, eps)
    if name == "aot_unpaired":
        return _cdpo(torch.sort(r[:, 0], dim=0).values - torch.sort(r[:, 1], dim=0).values, eps)
    if name == "apo_down":
        return torch.sigmoid(r[:, 0]) + 1 - torch.sigmoid(d)
    if name == "discopop":
        m = torch.sigmoid(d / discopop_tau)
        return -F.logsigmoid(d) * (1 - m) + torch.exp(-d) * m
    raise ValueError(f"preference loss {name!r} is unknown; choose from {ALL_LOSSES}")
