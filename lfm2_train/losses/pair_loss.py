"""The preference loss as the trainer calls it: (model, pair batch) -> (summed per-pair loss, pairs, metric
sums), and the per-pair means of the same numbers over a few batches (the end-of-run pair metrics)."""

from __future__ import annotations

import torch

from .preference import PreferenceLoss, pair_logps, pair_logps_split


class PairLoss:
    """loss_fn for the trainer: (model, pair batch) -> (sum of per-pair losses, pairs, metric sums)."""

    def __init__(self, loss: PreferenceLoss) -> None:
        self.loss = loss

    def __call__(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        ref = batch.get("ref_logps")
        if self.loss.ld_alpha is None:
            logps, lengths = pair_logps(model, batch)  # (B, 2) each
            tails = ref_tails = None
        else:  # LD-DPO: ref_logps is (B, 2, 2) [total, tail] (`data/ld_reference.py`)
            logps, lengths, tails = pair_logps_split(model, batch)
            ref, ref_tails = (ref[..., 0], ref[..., 1].to(logps.dtype)) if ref is not None else (None, None)
        per_pair, metrics = self.loss(logps, ref.to(logps.dtype) if ref is not None else None, lengths, tails,
                                      ref_tails)
        return per_pair.sum(), torch.tensor(per_pair.shape[0]), metrics


@torch.no_grad()
def pair_metrics(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], loss: PairLoss) -> dict[str, float]:
    """Per-pair means of the loss and its metrics over `batches` (eval mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        total, count, metrics = loss(model, {k: v.to(device) for k, v in batch.items()})
        sums["loss"] = sums.get("loss", 0.0) + float(total)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += int(count)
    model.train(was_training)
    return {k: v / max(n, 1) for k, v in sums.items()}
