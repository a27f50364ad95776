"""Guidance maps from four extreme points (Khan et al., MICCAI 2019, eqs. 1-5 and Algorithm 1).

Conventions used throughout cmdeploy:

* A slice is a 2-D array indexed ``[y, x]``: ``x`` = column, ``y`` = row, pixel centres at integers.
* Extreme points come as an array of shape (4, 2) (or (N, 4, 2) for a batch) in the order
  **left, right, top, bottom**, each point ``(x, y)``.
* Segment A joins left -> right, segment B joins top -> bottom.

The default ``variant="paper"`` is the paper exactly as written:

1. ``c`` = intersection of the lines through A and B; the mean of the four points when the lines are
   (near) parallel.
2. For a segment S = (p, q) and a pixel x: ``dist(x, S)`` is the Euclidean distance to the closed
   segment; ``sigma_S(x)`` = ``|c - p|`` for pixels on p's side of c (projection along S before c's),
   ``|c - q|`` on q's side, clamped to >= 1 pixel. Pixels exactly level with c (zero measure) use the
   mean of both (within 1e-3 px), which keeps the map symmetric under flips. ``d_S = dist / sigma_S`` (eq. 3).
3. ``d1 = min(d_A, d_B)``, ``d2 = sqrt(d_A**2 + d_B**2)`` (eq. 4), ``f = 1 / (1 + d1 * d2)`` (eq. 5).

Other variants (keyword ``variant``):

* ``"authors"``: the authors' public code: ``d2 = d_A + d_B`` (L1), ``sigma`` = half the segment length on
  both sides, ``f = 1 / (1 + tau * d1 * d2)`` with ``tau = 7``, then min-max scaled to [0, 1] per map.
* ``"chebyshev"`` / ``"mahalanobis"``: the simpler eq. 1-2 form: a binary region
  ``f = [max(d_A, d_B) <= tau]`` or ``f = [sqrt(d_A**2 + d_B**2) <= tau]`` (``tau = 1`` by default),
  with the paper's side-dependent sigma.
"""

from __future__ import annotations

import itertools
from typing import Literal

import numpy as np

Variant = Literal["paper", "authors", "chebyshev", "mahalanobis"]
VARIANTS: tuple[str, ...] = ("paper", "authors", "chebyshev", "mahalanobis")

_PARALLEL_EPS = 1e-6  # |sin(angle)| below which the two lines count as parallel
_MIN_SIGMA = 1.0  # pixels
_TIE_EPS = 1e-3  # pixels: positions this close to c along a segment count as level with c
# every assignment of four clicks to (left, right, top, bottom): (24, 4) indices into the clicks
_ROLE_PERMUTATIONS = np.array(list(itertools.permutations(range(4))), dtype=np.intp)


def validate_points(points: np.ndarray | list, *, name: str = "points") -> np.ndarray:
    """Check extreme points and return them as float64 (N, 4, 2).

    Raises ``ValueError`` for a wrong shape, NaN/inf, points not in left/right/top/bottom order
    (``left_x <= right_x`` and ``top_y <= bottom_y``), or all four points identical.
    """
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (4, 2):
        raise ValueError(
            f"{name} must have shape (4, 2) or (N, 4, 2) in order left, right, top, bottom, "
            f"each (x, y); got shape {np.shape(points)}"
        )
    if not np.all(np.isfinite(arr)):
        bad = np.unique(np.nonzero(~np.isfinite(arr).all(axis=(1, 2)))[0])
        raise ValueError(f"{name} contain NaN or inf (items {bad.tolist()})")
    left, right, top, bottom = arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]
    order_bad = (left[:, 0] > right[:, 0]) | (top[:, 1] > bottom[:, 1])
    if order_bad.any():
        idx = np.nonzero(order_bad)[0].tolist()
        raise ValueError(
            f"{name} are not in left, right, top, bottom order (need left_x <= right_x and "
            f"top_y <= bottom_y) for items {idx}"
        )
    same = np.all(arr == arr[:, :1], axis=(1, 2))
    if same.any():
        raise ValueError(
            f"{name}: all four points are identical for items {np.nonzero(same)[0].tolist()}; "
            "an object needs a real extent"
        )
    return arr


def _validate_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if len(shape) != 2 or int(shape[0]) < 1 or int(shape[1]) < 1:
        raise ValueError(f"shape must be (H, W) with H, W >= 1; got {shape}")
    return int(shape[0]), int(shape[1])


def cross_centre(points: np.ndarray) -> np.ndarray:
    """Intersection ``c`` of the lines left-right and top-bottom, (N, 2) float64.

    ``points`` is (N, 4, 2). Falls back to the mean of the four points where the lines are parallel
    (or a segment has zero length).
    """
    p_a, q_a, p_b, q_b = points[:, 0], points[:, 1], points[:, 2], points[:, 3]
    d_a = q_a - p_a
    d_b = q_b - p_b
    cross = d_a[:, 0] * d_b[:, 1] - d_a[:, 1] * d_b[:, 0]
    norms = np.linalg.norm(d_a, axis=1) * np.linalg.norm(d_b, axis=1)
    parallel = np.abs(cross) <= _PARALLEL_EPS * np.maximum(norms, 1e-300)
    safe = np.where(parallel, 1.0, cross)
    w = p_b - p_a
    t = (w[:, 0] * d_b[:, 1] - w[:, 1] * d_b[:, 0]) / safe
    centre = p_a + t[:, None] * d_a
    return np.where(parallel[:, None], points.mean(axis=1), centre)


def _segment_terms(
    p: np.ndarray, q: np.ndarray, c: np.ndarray, xs: np.ndarray, ys: np.ndarray, sigma_mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """Distance to segment (p, q) and the per-pixel sigma, both (N, H, W) float32.

    ``p``, ``q``, ``c`` are (N, 2); ``xs`` is (1, 1, W) and ``ys`` (1, H, 1) pixel coordinates.
    """
    f32 = np.float32
    d = q - p
    length = np.linalg.norm(d, axis=1)
    unit = d / np.where(length > 0, length, 1.0)[:, None]
    unit = np.where(length[:, None] > 0, unit, np.array([1.0, 0.0]))  # degenerate: any direction
    ux = unit[:, 0].astype(f32)[:, None, None]
    uy = unit[:, 1].astype(f32)[:, None, None]
    px = p[:, 0].astype(f32)[:, None, None]
    py = p[:, 1].astype(f32)[:, None, None]
    rx = xs - px  # (N, 1, W)
    ry = ys - py  # (N, H, 1)
    along = rx * ux + ry * uy  # (N, H, W): position along S, measured from p
    perp = ry * ux - rx * uy
    length32 = length.astype(f32)[:, None, None]
    beyond = along - np.clip(along, 0.0, length32)
    dist = np.sqrt(perp * perp + beyond * beyond)

    if sigma_mode == "half":
        sigma = np.maximum(length / 2.0, _MIN_SIGMA).astype(f32)[:, None, None]
        return dist, np.broadcast_to(sigma, dist.shape)
    sig_p = np.maximum(np.linalg.norm(c - p, axis=1), _MIN_SIGMA)
    sig_q = np.maximum(np.linalg.norm(c - q, axis=1), _MIN_SIGMA)
    # signed position along S measured from c (pixels): < 0 on p's side, > 0 on q's side
    cx = c[:, 0].astype(f32)[:, None, None]
    cy = c[:, 1].astype(f32)[:, None, None]
    side = (xs - cx) * ux + (ys - cy) * uy
    sp = sig_p.astype(f32)[:, None, None]
    sq = sig_q.astype(f32)[:, None, None]
    tie = ((sig_p + sig_q) / 2.0).astype(f32)[:, None, None]
    sigma = np.where(side < -_TIE_EPS, sp, np.where(side > _TIE_EPS, sq, tie))
    return dist, sigma


def confidence_map(
    points: np.ndarray | list,
    shape: tuple[int, int],
    *,
    variant: Variant = "paper",
    tau: float | None = None,
) -> np.ndarray:
    """Confidence map ``f`` of extreme points on an (H, W) grid.

    Args:
        points: (4, 2) or (N, 4, 2) extreme points, order left, right, top, bottom, each (x, y) in
            pixels (x = column, y = row).
        shape: (H, W) of the output grid.
        variant: ``"paper"`` (default, eqs. 3-5), ``"authors"``, ``"chebyshev"`` or
            ``"mahalanobis"`` (see the module docstring).
        tau: variant parameter: 7.0 for ``"authors"``, 1.0 for the thresholded variants; ignored
            by ``"paper"``.

    Returns:
        float32 (H, W) for one point set or (N, H, W) for a batch. For ``"paper"``: 1 on both
        segments, in (0, 1] everywhere.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    single = np.ndim(points) == 2
    pts = validate_points(points)
    h, w = _validate_shape(shape)
    xs = np.arange(w, dtype=np.float32)[None, None, :]
    ys = np.arange(h, dtype=np.float32)[None, :, None]
    c = cross_centre(pts)
    sigma_mode = "half" if variant == "authors" else "side"
    dist_a, sig_a = _segment_terms(pts[:, 0], pts[:, 1], c, xs, ys, sigma_mode)
    dist_b, sig_b = _segment_terms(pts[:, 2], pts[:, 3], c, xs, ys, sigma_mode)
    d_a = dist_a / sig_a
    d_b = dist_b / sig_b

    if variant == "paper":
        d1 = np.minimum(d_a, d_b)
        d2 = np.sqrt(d_a * d_a + d_b * d_b)
        out = 1.0 / (1.0 + d1 * d2)
    elif variant == "authors":
        t = np.float32(7.0 if tau is None else tau)
        out = 1.0 / (1.0 + t * np.minimum(d_a, d_b) * (d_a + d_b))
        lo = out.min(axis=(1, 2), keepdims=True)
        hi = out.max(axis=(1, 2), keepdims=True)
        out = (out - lo) / np.where(hi > lo, hi - lo, 1.0)
    else:
        t = np.float32(1.0 if tau is None else tau)
        d = np.maximum(d_a, d_b) if variant == "chebyshev" else np.sqrt(d_a * d_a + d_b * d_b)
        out = (d <= t).astype(np.float32)
    out = out.astype(np.float32, copy=False)
    return out[0] if single else out


def gaussian_heatmap(
    points: np.ndarray | list, shape: tuple[int, int], sigma: float = 10.0
) -> np.ndarray:
    """DEXTR's extreme-point cue: pixel-wise max of four Gaussians of std ``sigma`` pixels.

    ``points`` is (4, 2) or (N, 4, 2) (x = column, y = row); returns float32 (H, W) or (N, H, W),
    1 at each point (to rounding) and in (0, 1] elsewhere.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 pixels, got {sigma}")
    single = np.ndim(points) == 2
    pts = validate_points(points).astype(np.float32)
    h, w = _validate_shape(shape)
    xs = np.arange(w, dtype=np.float32)
    ys = np.arange(h, dtype=np.float32)
    inv = np.float32(-0.5 / sigma**2)
    # separable: exp(a*(dx^2 + dy^2)) = exp(a*dx^2) * exp(a*dy^2); max over the four points
    gx = np.exp(inv * (xs[None, None, :] - pts[:, :, 0:1]) ** 2)  # (N, 4, W)
    gy = np.exp(inv * (ys[None, None, :] - pts[:, :, 1:2]) ** 2)  # (N, 4, H)
    out = np.max(gy[:, :, :, None] * gx[:, :, None, :], axis=1)
    return out[0] if single else out


def extreme_points(
    mask: np.ndarray, *, jitter: float = 0.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Extreme points of a binary (H, W) mask: left, right, top, bottom as float32 (4, 2) (x, y).

    Ties are broken deterministically: among the pixels in the extreme column (row), the median of
    their rows (columns), rounded down to a pixel that belongs to the mask. ``jitter`` > 0 adds
    uniform noise in [-jitter, jitter] pixels to every coordinate (an annotator's click error),
    clipped to the slice; the left/right and top/bottom order is kept by sorting each pair.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    ys, xs = np.nonzero(m)
    if ys.size == 0:
        raise ValueError("mask is empty: no extreme points")

    def pick(sel_coords: np.ndarray) -> float:
        s = np.sort(sel_coords)
        return float(s[(s.size - 1) // 2])

    x_min, x_max = xs.min(), xs.max()
    y_min, y_max = ys.min(), ys.max()
    pts = np.array(
        [
            [x_min, pick(ys[xs == x_min])],
            [x_max, pick(ys[xs == x_max])],
            [pick(xs[ys == y_min]), y_min],
            [pick(xs[ys == y_max]), y_max],
        ],
        dtype=np.float64,
    )
    if jitter > 0:
        gen = rng if rng is not None else np.random.default_rng()
        pts = pts + gen.uniform(-jitter, jitter, size=pts.shape)
        h, w = m.shape
        pts[:, 0] = np.clip(pts[:, 0], 0, w - 1)
        pts[:, 1] = np.clip(pts[:, 1], 0, h - 1)
        if pts[0, 0] > pts[1, 0]:
            pts[[0, 1]] = pts[[1, 0]]
        if pts[2, 1] > pts[3, 1]:
            pts[[2, 3]] = pts[[3, 2]]
    return pts.astype(np.float32)


def sort_extreme_points(clicks: np.ndarray | list) -> np.ndarray:
    """Four clicked points in any order -> float32 (4, 2) in the order left, right, top, bottom.

    The one rule used everywhere (the browser server, the CVAT contract): among the 24 ways to
    give the clicks the roles left, right, top, bottom, take the one with the largest
    ``(right_x - left_x) + (bottom_y - top_y)``; ties (a click that is both left-most and
    top-most, say) go to the longer segments ``|right - left|^2 + |bottom - top|^2``, then to the
    lexicographically smallest ``(left, right, top, bottom)`` coordinates. The true extreme points
    of an object always maximise the first key (left/right hold the smallest and largest x of all
    four, top/bottom the smallest and largest y), the result never depends on the click order,
    and it always passes :func:`validate_points`' order check. Points are ``(x, y)``, x = column,
    y = row; ``ValueError`` for anything but four finite points.
    """
    pts = np.asarray(clicks, dtype=np.float64)
    if pts.shape != (4, 2):
        raise ValueError(f"need exactly four clicked points (x, y), got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("clicked points contain NaN or inf")
    cand = pts[_ROLE_PERMUTATIONS]  # (24, 4, 2): left, right, top, bottom
    spread = (cand[:, 1, 0] - cand[:, 0, 0]) + (cand[:, 3, 1] - cand[:, 2, 1])
    length = ((cand[:, 1] - cand[:, 0]) ** 2).sum(-1) + ((cand[:, 3] - cand[:, 2]) ** 2).sum(-1)
    flat = cand.reshape(24, 8)
    # np.lexsort: the last key is the primary one
    order = np.lexsort((*flat.T[::-1], -length, -spread))
    return cand[order[0]].astype(np.float32)
