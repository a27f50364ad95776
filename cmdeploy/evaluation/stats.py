"""Aggregates of an :class:`~cmdeploy.evaluation.run.Evaluation`.

Per label: the mean and standard deviation (ddof 0) over its objects. The **headline** Dice is the
mean over labels of the per-label means (as in the paper's Table 1), so large, frequent organs do
not drown small ones; the mean over all objects is reported next to it. HD95 is in mm (pixels when
a case has no pixel spacing); objects with an empty prediction have no HD95 (inf): HD95 means are
over the others and the count of empty predictions is reported (their Dice, 0, is included in
every Dice mean).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.evaluation.run import Evaluation

# object-size bin edges, in mm^2 (or pixels when a case has no spacing); the last bin is open
SIZE_EDGES: tuple[float, ...] = (0.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())


@dataclass(frozen=True)
class GroupStats:
    """Mean and std (ddof 0) of Dice and HD95 over a group of objects (a label or a size bin).

    ``hd95_*`` are over the ``n - n_empty`` objects with a non-empty prediction.
    """

    name: str
    n: int
    dice_mean: float
    dice_std: float
    hd95_mean: float
    hd95_std: float
    n_empty: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def group_stats(name: str, dice: np.ndarray, hd: np.ndarray) -> GroupStats:
    """Stats of one group from its Dice and HD95 values (inf HD95 = empty prediction)."""
    finite = hd[np.isfinite(hd)]
    dm, ds = _mean_std(dice)
    hm, hs = _mean_std(finite)
    return GroupStats(name, int(dice.size), dm, ds, hm, hs, int(dice.size - finite.size))


def label_stats(ev: Evaluation, model: str) -> list[GroupStats]:
    """Per-label stats of one model, in :meth:`Evaluation.labels` order."""
    run = ev.runs[model]
    d, h = run.dice(), run.hd95()
    labels = np.array([o.label for o in ev.objects], dtype=object)
    return [group_stats(lab, d[labels == lab], h[labels == lab]) for lab in ev.labels()]


@dataclass(frozen=True)
class Summary:
    """Overall numbers of one model.

    Attributes:
        dice_label_mean: **the headline**: mean over labels of each label's mean Dice.
        hd95_label_mean: mean over labels of each label's mean HD95 (labels with any finite value).
        dice_object_mean, dice_object_std, hd95_object_mean, hd95_object_std: over all objects.
        n_objects, n_labels, n_empty: counts (n_empty = objects with an empty prediction).
        seconds: time in the model (predict_batch); objects_per_s accordingly.
    """

    model: str
    dice_label_mean: float
    hd95_label_mean: float
    dice_object_mean: float
    dice_object_std: float
    hd95_object_mean: float
    hd95_object_std: float
    n_objects: int
    n_labels: int
    n_empty: int
    seconds: float
    objects_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(ev: Evaluation, model: str) -> Summary:
    """Headline (mean over labels) and object-mean Dice/HD95 of one model."""
    per = label_stats(ev, model)
    run = ev.runs[model]
    all_d = run.dice()
    g = group_stats("all", all_d, run.hd95())
    label_hd = np.array([s.hd95_mean for s in per], dtype=np.float64)
    label_hd = label_hd[np.isfinite(label_hd)]
    return Summary(
        model=model,
        dice_label_mean=float(np.mean([s.dice_mean for s in per])) if per else float("nan"),
        hd95_label_mean=float(label_hd.mean()) if label_hd.size else float("nan"),
        dice_object_mean=g.dice_mean,
        dice_object_std=g.dice_std,
        hd95_object_mean=g.hd95_mean,
        hd95_object_std=g.hd95_std,
        n_objects=g.n,
        n_labels=len(per),
        n_empty=g.n_empty,
        seconds=run.seconds,
        objects_per_s=g.n / run.seconds if run.seconds > 0 else float("nan"),
    )


def size_bin_names(edges: Sequence[float], unit: str) -> list[str]:
    """``["<100 mm2", "100-300 mm2", ..., ">=10000 mm2"]`` for bin edges starting at 0."""
    e = [float(x) for x in edges]
    out = []
    for i, lo in enumerate(e):
        if i == len(e) - 1:
            out.append(f">={lo:g} {unit}")
        elif lo <= 0:
            out.append(f"<{e[i + 1]:g} {unit}")
        else:
            out.append(f"{lo:g}-{e[i + 1]:g} {unit}")
    return out


def size_bins(ev: Evaluation, edges: Sequence[float] = SIZE_EDGES) -> np.ndarray:
    """Bin index of every object by reference area (:attr:`Evaluation.area_unit`)."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 1 or np.any(np.diff(e) <= 0):
        raise InputError(f"size bin edges must be increasing, got {list(edges)}")
    return np.clip(np.searchsorted(e, ev.areas(), side="right") - 1, 0, e.size - 1)


def size_stats(ev: Evaluation, model: str, edges: Sequence[float] = SIZE_EDGES) -> list[GroupStats]:
    """Stats of one model per object-size bin (empty bins have n = 0)."""
    run = ev.runs[model]
    d, h = run.dice(), run.hd95()
    b = size_bins(ev, edges)
    names = size_bin_names(edges, ev.area_unit)
    return [group_stats(names[i], d[b == i], h[b == i]) for i in range(len(names))]


def worst(ev: Evaluation, model: str, n: int = 12) -> list[int]:
    """Indices of the ``n`` objects with the lowest Dice (ties: larger HD95 first)."""
    run = ev.runs[model]
    d, h = run.dice(), run.hd95()
    order = np.lexsort((-np.nan_to_num(h, posinf=np.finfo(np.float64).max), d))
    return [int(i) for i in order[: max(int(n), 0)]]
