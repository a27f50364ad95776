"""Segmentation metrics on 2-D masks: Dice and the 95 % Hausdorff distance in millimetres.

Masks are bool (H, W) arrays indexed ``[y, x]`` (y = row, x = column). ``spacing`` is the pixel
spacing ``(sx, sy)`` in mm (sx between columns, sy between rows, the order of
:attr:`cmdeploy.io.series.Series.spacing_xy_mm`); None means 1 x 1, i.e. distances in pixels.

Definitions:

* **Dice** = ``2 |A & B| / (|A| + |B|)``. Both masks empty: 1.0 (perfect agreement on "nothing");
  exactly one empty: 0.0.
* **Surface** of a mask: its pixels with at least one 4-neighbour outside the mask (outside the
  image counts as outside): ``mask & ~erode(mask)``, erosion by NumPy shifts.
* **Directed surface distances** A -> B: for every surface pixel of A, the Euclidean distance (mm,
  between pixel centres) to the nearest surface pixel of B.
* **HD95** = ``max(P95(d(A -> B)), P95(d(B -> A)))`` (the two directed 95th percentiles, NumPy's
  linear interpolation; the MONAI / Deepmind surface-distance convention). ``percentile=100`` gives
  the classic Hausdorff distance. Both masks empty: 0.0; exactly one empty: ``inf`` (undefined;
  :mod:`cmdeploy.evaluation` reports those objects separately instead of averaging an inf).

Distances come from ``scipy.ndimage.distance_transform_edt(..., sampling=(sy, sx))`` (the ``eval``
extra) on the masks cropped to their joint bounding box plus a one-pixel background border, which
does not change any distance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _as_mask(mask: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) mask, got shape {m.shape}")
    return m.astype(bool, copy=False)


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, r = _as_mask(pred, "pred"), _as_mask(ref, "ref")
    if p.shape != r.shape:
        raise ValueError(f"pred and ref masks differ in shape: {p.shape} vs {r.shape}")
    return p, r


def _spacing_yx(spacing: tuple[float, float] | None) -> tuple[float, float]:
    """(sx, sy) mm -> (sy, sx), checked positive and finite; None -> (1, 1)."""
    if spacing is None:
        return 1.0, 1.0
    sx, sy = (float(v) for v in spacing)
    if not (np.isfinite(sx) and np.isfinite(sy) and sx > 0 and sy > 0):
        raise ValueError(f"spacing must be two positive finite numbers (sx, sy) in mm, got {spacing}")
    return sy, sx


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two bool (H, W) masks in [0, 1]; 1.0 when both are empty."""
    p, r = _pair(pred, ref)
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(r))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & r)) / total


def erode(mask: np.ndarray) -> np.ndarray:
    """4-connected binary erosion of a bool (H, W) mask; pixels outside the image count as False."""
    m = _as_mask(mask, "mask")
    out = np.zeros_like(m)
    out[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return out


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface (boundary) pixels of a bool (H, W) mask: ``mask XOR erode(mask)``."""
    m = _as_mask(mask, "mask")
    return m ^ erode(m)


def _joint_crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to their joint bounding box, padded with one False pixel on every side."""
    rows = np.flatnonzero(a.any(axis=1) | b.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0) | b.any(axis=0))
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return np.pad(a[win], 1), np.pad(b[win], 1)


def surface_distances(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(pred -> ref, ref -> pred)`` in mm, float64 1-D arrays.

    Both masks must be non-empty (``ValueError`` otherwise). ``spacing`` is ``(sx, sy)`` mm.
    """
    p, r = _pair(pred, ref)
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks")
    sy, sx = _spacing_yx(spacing)
    p, r = _joint_crop(p, r)
    sp, sr = surface(p), surface(r)
    from scipy.ndimage import distance_transform_edt

    to_ref = distance_transform_edt(~sr, sampling=(sy, sx))
    to_pred = distance_transform_edt(~sp, sampling=(sy, sx))
    return np.asarray(to_ref[sp], np.float64), np.asarray(to_pred[sr], np.float64)


def hausdorff(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float] | None = None,
    *,
    percentile: float = 95.0,
) -> float:
    """Percentile Hausdorff distance in mm (``percentile=95``: HD95; 100: the Hausdorff distance).

    0.0 when both masks are empty, ``inf`` when exactly one is. ``spacing`` is ``(sx, sy)`` mm.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    p, r = _pair(pred, ref)
    _spacing_yx(spacing)  # validate even when a mask is empty
    pe, re_ = not p.any(), not r.any()
    if pe and re_:
        return 0.0
    if pe or re_:
        return float("inf")
    d_pr, d_rp = surface_distances(p, r, spacing)
    return float(max(np.percentile(d_pr, percentile), np.percentile(d_rp, percentile)))


def hd95(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float] | None = None,
) -> float:
    """95 % Hausdorff distance in mm (see the module docstring for the definition and conventions)."""
    return hausdorff(pred, ref, spacing, percentile=95.0)


@dataclass(frozen=True)
class MaskScores:
    """Scores of one predicted object against its reference.

    Attributes:
        dice: Dice in [0, 1].
        hd95_mm: 95 % Hausdorff distance in mm (pixels when no spacing was given); inf when the
            prediction (or the reference) is empty.
        pred_area_px, ref_area_px: mask sizes in pixels.
    """

    dice: float
    hd95_mm: float
    pred_area_px: int
    ref_area_px: int


def score_masks(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: tuple[float, float] | None = None,
) -> MaskScores:
    """Dice and HD95 of one object, computed on the joint bounding box (fast on big slices)."""
    p, r = _pair(pred, ref)
    if p.any() or r.any():
        p, r = _joint_crop(p, r)
    return MaskScores(
        dice=dice(p, r),
        hd95_mm=hd95(p, r, spacing),
        pred_area_px=int(np.count_nonzero(p)),
        ref_area_px=int(np.count_nonzero(r)),
    )


__all__ = [
    "MaskScores",
    "dice",
    "erode",
    "hausdorff",
    "hd95",
    "score_masks",
    "surface",
    "surface_distances",
]
