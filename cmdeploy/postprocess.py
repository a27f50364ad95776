"""Mask post-processing from the clicks: keep what the four points delimit, fill holes.

An object given by four extreme points is one connected region spanning both segments (left–right
and top–bottom). :func:`keep_clicked_components` keeps the 8-connected components of a predicted
mask that touch either segment (rasterised at one sample per pixel); when none does (clicks far off
a thin object), the mask is returned unchanged rather than emptied. :func:`fill_holes` fills
background regions that do not reach the mask's bounding-box border (4-connected background).

Coordinates: points are ``(x, y)`` = (column, row) pixels, ``left, right, top, bottom``.
Both functions work inside the mask's bounding box, so their cost scales with the object, not the
slice.
"""

from __future__ import annotations

import numpy as np

from cmdeploy.labels_to_points import connected_components
from cmdeploy.spec import POSTPROCESS_MODES


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _segment_pixels(p: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer (x, y) pixels along the segment p -> q, at least one sample per pixel."""
    n = int(np.ceil(np.abs(q - p).max())) + 1
    t = np.linspace(0.0, 1.0, n)
    pts = p[None, :] + t[:, None] * (q - p)[None, :]
    r = np.rint(pts).astype(np.int64)
    return r[:, 0], r[:, 1]


def keep_clicked_components(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 8-connected components of bool (H, W) ``mask`` that touch a segment of the points.

    ``points``: (4, 2) left, right, top, bottom (x, y). Returns a new bool (H, W) mask; unchanged
    when no component touches a segment.
    """
    m = np.asarray(mask, dtype=bool)
    box = _bbox(m)
    if box is None:
        return m.copy()
    y0, y1, x0, x1 = box
    comp, n = connected_components(m[y0:y1, x0:x1].astype(np.uint8), connectivity=8)
    if n <= 1:
        return m.copy()
    p = np.asarray(points, dtype=np.float64)
    xs_a, ys_a = _segment_pixels(p[0], p[1])
    xs_b, ys_b = _segment_pixels(p[2], p[3])
    xs = np.concatenate([xs_a, xs_b]) - x0
    ys = np.concatenate([ys_a, ys_b]) - y0
    inside = (xs >= 0) & (xs < x1 - x0) & (ys >= 0) & (ys < y1 - y0)
    touched = np.unique(comp[ys[inside], xs[inside]])
    touched = touched[touched > 0]
    if touched.size == 0:
        return m.copy()
    out = np.zeros_like(m)
    out[y0:y1, x0:x1] = np.isin(comp, touched)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Bool (H, W) ``mask`` with every enclosed background region (4-connected) set to True."""
    m = np.asarray(mask, dtype=bool)
    box = _bbox(m)
    if box is None:
        return m.copy()
    y0, y1, x0, x1 = box
    crop = np.pad(m[y0:y1, x0:x1], 1)  # a background ring joins everything outside
    bg, _ = connected_components((~crop).astype(np.uint8), connectivity=4)
    outside = bg[0, 0]
    filled = crop | ((bg != outside) & (bg > 0))
    out = m.copy()
    out[y0:y1, x0:x1] = filled[1:-1, 1:-1]
    return out


def postprocess_mask(mask: np.ndarray, points: np.ndarray, mode: str) -> np.ndarray:
    """Apply a post-processing ``mode``: ``"none"`` (identity) or ``"clicked"`` (keep the
    components the clicks delimit, then fill holes)."""
    if mode == "none":
        return mask
    if mode == "clicked":
        return fill_holes(keep_clicked_components(mask, points))
    raise ValueError(f"postprocess mode must be one of {POSTPROCESS_MODES}, got {mode!r}")
