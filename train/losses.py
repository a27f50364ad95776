"""Losses for the one-logit foreground map."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def balanced_bce_with_logits(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy (DEXTR style), a mean over pixels.

    Positives are weighted by ``negatives / positives`` of the batch; normalising by the total
    weight gives ``0.5 * (mean BCE over positive pixels + mean BCE over negative pixels)``. A batch
    without positives (or negatives) falls back to the plain mean. Computed in float32.
    """
    x = logits.float()
    t = target.float()
    bce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    n_pos = t.sum()
    n_neg = t.numel() - n_pos
    if n_pos < 0.5 or n_neg < 0.5:
        return bce.mean()
    return 0.5 * ((bce * t).sum() / n_pos + (bce * (1.0 - t)).sum() / n_neg)


def dice_score(pred: torch.Tensor | object, target: torch.Tensor | object) -> float:
    """Dice of two boolean arrays (numpy or torch); 1.0 when both are empty."""
    inter = float((pred & target).sum())
    total = float(pred.sum()) + float(target.sum())
    return 1.0 if total == 0 else 2.0 * inter / total
