"""Fully supervised 2-D segmentation with :class:`~cmdeploy.train.unet.UNet` (issue 17's study).

One recipe for both arms of the study (ground-truth vs generated labels): the same slices, the same
preprocessing, seed, epochs and optimiser; only the label volume a slice's target comes from
differs.

Slices: every volume is read in LPS (slice ``k`` = ``data[:, :, k].T``, rows = y, columns = x, as
the runtime reads it), windowed to ``window`` HU and scaled to [0, 1], padded at the bottom/right to
a square (image with ``window[0]``, labels with 0), then resized to ``size`` x ``size`` (bilinear;
labels bilinear then > 0.5). Prediction inverts this: logits upsampled to the padded square, the
padding cut off, probability > 0.5.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from cmdeploy.io.nifti import read_lps_volume
from cmdeploy.train.unet import UNet

WINDOW_HU = (-200.0, 250.0)


@dataclass
class SliceVolume:
    """One case as ``(Z, H, W)`` slices: HU image and a binary target (label id > 0 or == ``label``)."""

    name: str
    image: np.ndarray
    target: np.ndarray


def load_case(image: str | Path, labels: str | Path, name: str = "", label: int | None = None) -> SliceVolume:
    """Read an image/label NIfTI pair on one grid as ``(Z, H, W)`` slices (see module docstring)."""
    img, _, _ = read_lps_volume(image)
    lab, _, _ = read_lps_volume(labels)
    if img.shape != lab.shape:
        raise ValueError(f"case {name!r}: image {img.shape} and labels {lab.shape} differ")
    lab = np.asarray(lab)
    target = lab > 0 if label is None else lab == label
    return SliceVolume(
        name,
        np.ascontiguousarray(np.asarray(img, dtype=np.float32).transpose(2, 1, 0)),
        np.ascontiguousarray(target.transpose(2, 1, 0)),
    )


def to_input(slices_hu: np.ndarray, size: int, window: tuple[float, float] = WINDOW_HU) -> torch.Tensor:
    """``(N, H, W)`` HU -> ``(N, 1, size, size)`` float32 in [0, 1] (window, pad to square, resize)."""
    lo, hi = window
    x = np.clip((np.asarray(slices_hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    n, h, w = x.shape
    side = max(h, w)
    padded = np.zeros((n, side, side), dtype=np.float32)
    padded[:, :h, :w] = x
    t = torch.from_numpy(padded)[:, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_target(masks: np.ndarray, size: int) -> torch.Tensor:
    """``(N, H, W)`` bool -> ``(N, 1, size, size)`` float32 {0, 1} on the network grid."""
    m = np.asarray(masks, dtype=np.float32)
    n, h, w = m.shape
    side = max(h, w)
    padded = np.zeros((n, side, side), dtype=np.float32)
    padded[:, :h, :w] = m
    t = F.interpolate(torch.from_numpy(padded)[:, None], size=(size, size), mode="bilinear",
                      align_corners=False, antialias=True)
    return (t > 0.5).float()


def from_logits(logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """``(N, 1, S, S)`` logits -> ``(N, H, W)`` bool masks on the original slice grid."""
    h, w = shape
    side = max(h, w)
    up = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    return (up[:, 0, :h, :w] > 0).numpy()


def select_slices(target: np.ndarray, negatives: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the slices with target pixels, plus ``negatives`` times as many (rounded) drawn
    from the rest; sorted."""
    pos = np.flatnonzero(target.reshape(target.shape[0], -1).any(axis=1))
    rest = np.setdiff1d(np.arange(target.shape[0]), pos)
    k = min(rest.size, int(round(negatives * pos.size)))
    neg = rng.choice(rest, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([pos, neg]).astype(np.int64))


@dataclass
class UNetRecipe:
    """The one recipe of both study arms."""

    size: int = 128
    width: int = 16
    depth: int = 4
    epochs: int = 12
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int | None = None
    extra: dict = field(default_factory=dict)


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    denom = p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3))
    return (1.0 - (2.0 * inter + 1.0) / (denom + 1.0)).mean()


def train_unet(
    x: torch.Tensor, y: torch.Tensor, recipe: UNetRecipe, log: Callable[[str], None] = print
) -> tuple[UNet, list[dict]]:
    """Train a U-Net on ``x`` (N, 1, S, S) inputs and ``y`` (N, 1, S, S) {0, 1} targets.

    Loss: binary cross-entropy + soft Dice; Adam with cosine decay; augmentation: random
    left-right flip. Seeded: the same inputs and recipe give the same network on one machine.
    Returns the network (eval mode) and one history entry per epoch.
    """
    if recipe.threads:
        torch.set_num_threads(int(recipe.threads))
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    net = UNet(in_channels=x.shape[1], width=recipe.width, depth=recipe.depth)
    opt = torch.optim.Adam(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps = recipe.epochs * int(np.ceil(len(x) / recipe.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=recipe.lr, total_steps=max(steps, 1), pct_start=0.1
    )
    history = []
    for epoch in range(recipe.epochs):
        net.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for a in range(0, len(x), recipe.batch_size):
            idx = order[a : a + recipe.batch_size]
            xb, yb = x[idx], y[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            yb = torch.where(flip[:, None, None, None], yb.flip(-1), yb)
            logits = net(xb)
            loss = F.binary_cross_entropy_with_logits(logits, yb) + _dice_loss(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        entry = {"epoch": epoch + 1, "loss": total / len(x), "seconds": time.perf_counter() - t0}
        history.append(entry)
        log(f"  epoch {epoch + 1}/{recipe.epochs}: loss {entry['loss']:.4f}, {entry['seconds']:.1f} s")
    net.eval()
    return net, history


@torch.no_grad()
def predict_volume(net: UNet, image: np.ndarray, size: int, batch: int = 16) -> np.ndarray:
    """bool ``(Z, H, W)`` masks for every slice of an ``(Z, H, W)`` HU volume."""
    net.eval()
    out = np.zeros(image.shape, dtype=bool)
    for a in range(0, image.shape[0], batch):
        x = to_input(image[a : a + batch], size)
        out[a : a + batch] = from_logits(net(x), image.shape[1:])
    return out


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two bool arrays; 1.0 when both are empty."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(pred & ref)) / total


def evaluate_volumes(
    pairs: Sequence[tuple[str, np.ndarray, np.ndarray]],
) -> dict:
    """Dice of predictions vs references: per patient (3-D, every slice) and per object (each
    reference-positive slice, 2-D). ``pairs``: ``(name, pred (Z, H, W), ref (Z, H, W))``."""
    patients, objects = [], []
    for name, pred, ref in pairs:
        patients.append({"case": name, "dice": dice(pred, ref)})
        for k in np.flatnonzero(ref.reshape(ref.shape[0], -1).any(axis=1)):
            objects.append({"case": name, "slice_index": int(k), "dice": dice(pred[k], ref[k])})

    def stats(v: list[float]) -> dict:
        return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} if v else {"n": 0}

    return {
        "over_patients": stats([p["dice"] for p in patients]),
        "over_objects": stats([o["dice"] for o in objects]),
        "patients": patients,
        "objects": objects,
    }
