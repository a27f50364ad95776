"""A literal, float64, per-pixel transcription of Algorithm 1 of Khan et al. (MICCAI 2019).

Reference only: used by ``benchmarks/bench_guidance.py`` and the tests to check
:func:`cmdeploy.guidance.confidence_map` (``variant="paper"``). It is written the way the paper's
pseudo-code reads, a Python loop over pixels with plain ``float`` (IEEE double) arithmetic, and is
deliberately slow; :func:`confidence_map_vectorised64` is the same algorithm as whole-grid float64
NumPy expressions. Never import either from ``cmdeploy``.

Conventions as in ``cmdeploy.guidance``: points are left, right, top, bottom, each ``(x, y)`` with
``x`` = column and ``y`` = row, pixel centres at integers; segment A = left -> right, segment
B = top -> bottom.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

PARALLEL_EPS = 1e-6  # |sin(angle between A and B)| at or below which the lines count as parallel
MIN_SIGMA = 1.0  # pixels
LEVEL_TOL = 1e-9  # pixels: a pixel this close to the line through c perpendicular to S is level with c


def _intersection(
    p_a: tuple[float, float], q_a: tuple[float, float], p_b: tuple[float, float], q_b: tuple[float, float]
) -> tuple[float, float]:
    """Step 1: ``c`` = intersection of the lines through A and B, or the mean of the four points."""
    dax, day = q_a[0] - p_a[0], q_a[1] - p_a[1]
    dbx, dby = q_b[0] - p_b[0], q_b[1] - p_b[1]
    cross = dax * dby - day * dbx
    norms = math.hypot(dax, day) * math.hypot(dbx, dby)
    if abs(cross) <= PARALLEL_EPS * norms or norms == 0.0:
        xs = (p_a[0], q_a[0], p_b[0], q_b[0])
        ys = (p_a[1], q_a[1], p_b[1], q_b[1])
        return sum(xs) / 4.0, sum(ys) / 4.0
    # p_a + t * d_a = p_b + s * d_b  =>  t = ((p_b - p_a) x d_b) / (d_a x d_b)
    wx, wy = p_b[0] - p_a[0], p_b[1] - p_a[1]
    t = (wx * dby - wy * dbx) / cross
    return p_a[0] + t * dax, p_a[1] + t * day


def _distance_to_segment(x: float, y: float, p: tuple[float, float], q: tuple[float, float]) -> float:
    """Euclidean distance from pixel (x, y) to the closed segment p-q."""
    dx, dy = q[0] - p[0], q[1] - p[1]
    length2 = dx * dx + dy * dy
    if length2 == 0.0:
        return math.hypot(x - p[0], y - p[1])
    t = ((x - p[0]) * dx + (y - p[1]) * dy) / length2
    t = min(max(t, 0.0), 1.0)
    return math.hypot(x - (p[0] + t * dx), y - (p[1] + t * dy))


def _sigma(
    x: float, y: float, p: tuple[float, float], q: tuple[float, float], c: tuple[float, float]
) -> float:
    """Steps 13-16: |c - p| for pixels on p's side of c (measured along S), |c - q| on q's side.

    A pixel level with c (within ``LEVEL_TOL``, a zero-measure set) gets the mean of both, the tie
    rule documented in ``cmdeploy.guidance``. Each sigma is clamped to at least ``MIN_SIGMA`` pixels.
    """
    sig_p = max(math.hypot(c[0] - p[0], c[1] - p[1]), MIN_SIGMA)
    sig_q = max(math.hypot(c[0] - q[0], c[1] - q[1]), MIN_SIGMA)
    dx, dy = q[0] - p[0], q[1] - p[1]
    length = math.hypot(dx, dy)
    if length == 0.0:  # a point: both sides are the same
        return sig_p
    side = ((x - c[0]) * dx + (y - c[1]) * dy) / length  # signed distance along S from c, pixels
    if side < -LEVEL_TOL:
        return sig_p
    if side > LEVEL_TOL:
        return sig_q
    return (sig_p + sig_q) / 2.0


def confidence_map_literal(points: Sequence[Sequence[float]], shape: tuple[int, int]) -> list[list[float]]:
    """Algorithm 1, pixel by pixel: returns the (H, W) map ``f`` as nested lists of floats.

    ``points`` is ``[[left_x, left_y], [right_x, right_y], [top_x, top_y], [bottom_x, bottom_y]]``.
    """
    left, right, top, bottom = (tuple(float(v) for v in pt) for pt in points)
    c = _intersection(left, right, top, bottom)
    h, w = shape
    out = []
    for yi in range(h):
        row = []
        y = float(yi)
        for xi in range(w):
            x = float(xi)
            d_a = _distance_to_segment(x, y, left, right) / _sigma(x, y, left, right, c)  # eq. 3
            d_b = _distance_to_segment(x, y, top, bottom) / _sigma(x, y, top, bottom, c)
            d1 = min(d_a, d_b)  # eq. 4
            d2 = math.sqrt(d_a * d_a + d_b * d_b)
            row.append(1.0 / (1.0 + d1 * d2))  # eq. 5
        out.append(row)
    return out


def confidence_map_vectorised64(points: Sequence[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Algorithm 1 as a straightforward vectorised float64 NumPy transcription: (H, W) float64.

    The same steps as :func:`confidence_map_literal`, each written as one whole-grid array
    expression (projection parameter, nearest point on the segment, ``hypot``, side test and sigma
    by ``np.where``, eqs. 3-5). The baseline of ``benchmarks/bench_guidance.py``.
    """
    pts = [tuple(float(v) for v in pt) for pt in points]
    c = _intersection(*pts)
    h, w = shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    d = []
    for p, q in ((pts[0], pts[1]), (pts[2], pts[3])):
        dx, dy = q[0] - p[0], q[1] - p[1]
        length2 = dx * dx + dy * dy
        if length2 == 0.0:
            dist = np.hypot(xs - p[0], ys - p[1])
            side = np.ones_like(xs)
        else:
            t = np.clip(((xs - p[0]) * dx + (ys - p[1]) * dy) / length2, 0.0, 1.0)
            dist = np.hypot(xs - (p[0] + t * dx), ys - (p[1] + t * dy))
            side = ((xs - c[0]) * dx + (ys - c[1]) * dy) / math.sqrt(length2)
        sig_p = max(math.hypot(c[0] - p[0], c[1] - p[1]), MIN_SIGMA)
        sig_q = max(math.hypot(c[0] - q[0], c[1] - q[1]), MIN_SIGMA)
        sigma = np.where(side < -LEVEL_TOL, sig_p, np.where(side > LEVEL_TOL, sig_q, (sig_p + sig_q) / 2.0))
        d.append(dist / sigma)  # eq. 3
    d_a, d_b = d
    return 1.0 / (1.0 + np.minimum(d_a, d_b) * np.sqrt(d_a * d_a + d_b * d_b))  # eqs. 4-5
