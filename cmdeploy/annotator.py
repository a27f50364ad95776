"""The simulated annotator: four clicks as a person makes them, from an object's pixels.

One definition, used by training (augmentation), validation, ``cmdeploy evaluate --clicks annotator``
and ``cmdeploy points-from-labels --simulate``.

A person does not hit the extreme pixel. For each of the four extremes (left, right, top, bottom):

1. **Flat-extreme ambiguity.** The click lands on the object's outline *as seen from that side*
   (for ``left``: the left-most pixel of every row) anywhere within ``tolerance_px`` pixels of the
   extreme coordinate, drawn uniformly among those outline pixels. Where the boundary is flat at the
   extreme (a vertebral body's front, the liver's dome) that is anywhere along the flat part; where it
   is pointed it is next to the tip.
2. **Hand error.** The point then moves by an offset drawn uniformly from a disc of radius
   ``jitter_mm`` millimetres (physical units, so it means the same at 0.7 mm and 3 mm spacing),
   converted to pixels with the slice's spacing ``(x, y)``.
3. The point is clipped into the slice, and each pair is kept ordered (left x <= right x, top y <=
   bottom y) by swapping when the noise crossed them over.

Coordinates are ``(x, y)`` = (column, row) pixels with centres at integers. The same rule works on a
float point cloud (training rotates the object first): outline rows/columns are the cloud's
coordinates rounded to the nearest integer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cmdeploy.guidance import extreme_points

CLICK_PROTOCOLS = ("exact", "annotator")


@dataclass(frozen=True)
class ClickModel:
    """Parameters of the simulated annotator.

    Attributes:
        tolerance_px: band, in pixels from the extreme coordinate, in which the click may land on
            the outline (0 = only outline pixels at the extreme coordinate itself).
        jitter_mm: radius of the uniform disc of hand error, millimetres (0 = none).
    """

    tolerance_px: float = 3.0
    jitter_mm: float = 3.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.tolerance_px) and self.tolerance_px >= 0):
            raise ValueError(f"tolerance_px must be >= 0, got {self.tolerance_px}")
        if not (np.isfinite(self.jitter_mm) and self.jitter_mm >= 0):
            raise ValueError(f"jitter_mm must be >= 0, got {self.jitter_mm}")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


#: The protocol of the accuracy targets: t = 3 px, hand error up to 3 mm.
DEFAULT_ANNOTATOR = ClickModel(tolerance_px=3.0, jitter_mm=3.0)


def _outline_pick(
    along: np.ndarray, across: np.ndarray, lowest: bool, tolerance: float, rng: np.random.Generator
) -> tuple[float, float]:
    """One outline point seen from one side: ``(along, across)`` coordinates of the pick.

    ``along`` is the coordinate that is extreme (x for left/right), ``across`` the other one. For
    every integer ``round(across)`` line the outline point is the one with the lowest (``lowest``) or
    highest ``along``; candidates are those within ``tolerance`` of the global extreme.
    """
    key = np.rint(across).astype(np.int64)
    sign = 1.0 if lowest else -1.0
    order = np.lexsort((sign * along, key))  # by line, then best-first along the line
    k_sorted = key[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = k_sorted[1:] != k_sorted[:-1]
    idx = order[first]  # the outline point of every line
    vals = sign * along[idx]
    cand = idx[vals <= vals.min() + tolerance + 1e-9]
    pick = cand[rng.integers(cand.size)]
    return float(along[pick]), float(across[pick])


def simulate_clicks(
    coords: np.ndarray,
    spacing_xy: tuple[float, float] | None,
    model: ClickModel,
    rng: np.random.Generator,
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """Simulated clicks (4, 2) float64 ``left, right, top, bottom`` of a point cloud.

    Args:
        coords: (P, 2) pixel-centre coordinates ``(x, y)`` of the object (P >= 1).
        spacing_xy: pixel spacing ``(x, y)`` in mm; None = 1 mm.
        model: tolerance band and hand-error radius.
        rng: the generator (one per object for reproducibility).
        shape: ``(H, W)`` of the slice to clip into; None = no clipping.
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or c.shape[0] < 1:
        raise ValueError(f"coords must be (P, 2) with P >= 1, got shape {c.shape}")
    xs, ys = c[:, 0], c[:, 1]
    t = float(model.tolerance_px)
    lx, ly = _outline_pick(xs, ys, True, t, rng)
    rx, ry = _outline_pick(xs, ys, False, t, rng)
    ty, tx = _outline_pick(ys, xs, True, t, rng)
    by, bx = _outline_pick(ys, xs, False, t, rng)
    pts = np.array([[lx, ly], [rx, ry], [tx, ty], [bx, by]], dtype=np.float64)
    if model.jitter_mm > 0:
        sx, sy = (1.0, 1.0) if spacing_xy is None else (float(spacing_xy[0]), float(spacing_xy[1]))
        radius = model.jitter_mm * np.sqrt(rng.random(4))
        angle = rng.uniform(0.0, 2.0 * np.pi, 4)
        pts[:, 0] += radius * np.cos(angle) / sx
        pts[:, 1] += radius * np.sin(angle) / sy
    if shape is not None:
        h, w = shape
        pts[:, 0] = np.clip(pts[:, 0], 0, w - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, h - 1)
    if pts[0, 0] > pts[1, 0]:
        pts[[0, 1]] = pts[[1, 0]]
    if pts[2, 1] > pts[3, 1]:
        pts[[2, 3]] = pts[[3, 2]]
    return pts


def annotator_points(
    mask: np.ndarray,
    spacing_xy: tuple[float, float] | None,
    model: ClickModel,
    rng: np.random.Generator,
) -> np.ndarray:
    """Simulated clicks (4, 2) float32 on a boolean (H, W) slice mask, clipped into the slice."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("mask is empty: no clicks")
    coords = np.stack([xs, ys], axis=1)
    return simulate_clicks(coords, spacing_xy, model, rng, shape=m.shape).astype(np.float32)


def object_clicks(
    mask: np.ndarray,
    protocol: str,
    *,
    spacing_xy: tuple[float, float] | None = None,
    model: ClickModel = DEFAULT_ANNOTATOR,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The four points of an object under a click ``protocol``: ``"exact"`` or ``"annotator"``.

    ``exact`` is :func:`cmdeploy.guidance.extreme_points` (deterministic); ``annotator`` is
    :func:`annotator_points` with ``model`` and ``rng`` (required).
    """
    if protocol == "exact":
        return extreme_points(mask)
    if protocol == "annotator":
        if rng is None:
            raise ValueError("the annotator protocol needs a random generator")
        return annotator_points(mask, spacing_xy, model, rng)
    raise ValueError(f"click protocol must be one of {CLICK_PROTOCOLS}, got {protocol!r}")
