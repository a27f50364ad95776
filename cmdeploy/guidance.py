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
import threading
from dataclasses import dataclass
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


@dataclass(frozen=True)
class SegmentFrame:
    """Per-object constants of one segment S = (p, q), for the squared scaled distance ``d_S**2``.

    All (N,) float64; the per-pixel arithmetic casts them to float32 (:func:`segment_sq_distance`).

    Attributes:
        px, py: the start point p (pixels).
        ux, uy: unit vector p -> q (``(1, 0)`` for a zero-length segment).
        length: ``|q - p|`` (pixels).
        t_c: position of the centre ``c`` along S, measured from p (pixels).
        k_p, k_q, k_tie: ``1 / sigma**2`` on p's side of c, on q's side and level with c
            (pixels^-2).
    """

    px: np.ndarray
    py: np.ndarray
    ux: np.ndarray
    uy: np.ndarray
    length: np.ndarray
    t_c: np.ndarray
    k_p: np.ndarray
    k_q: np.ndarray
    k_tie: np.ndarray


def segment_frame(p: np.ndarray, q: np.ndarray, c: np.ndarray, sigma_mode: str) -> SegmentFrame:
    """:class:`SegmentFrame` of segments (p, q) with centres c, each (N, 2) float64 (x, y) pixels.

    ``sigma_mode`` ``"side"``: the paper's side-dependent sigma (``|c - p|`` before c along S,
    ``|c - q|`` after it, their mean level with c); ``"half"``: half the segment length everywhere.
    Every sigma is clamped to >= 1 pixel.
    """
    d = q - p
    length = np.sqrt(d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1])
    has = length > 0
    safe = np.where(has, length, 1.0)
    ux = np.where(has, d[:, 0] / safe, 1.0)  # degenerate: any direction
    uy = np.where(has, d[:, 1] / safe, 0.0)
    t_c = (c[:, 0] - p[:, 0]) * ux + (c[:, 1] - p[:, 1]) * uy
    if sigma_mode == "half":
        half = np.maximum(length / 2.0, _MIN_SIGMA)
        k = 1.0 / (half * half)
        return SegmentFrame(p[:, 0], p[:, 1], ux, uy, length, t_c, k, k, k)
    sig_p = np.maximum(np.linalg.norm(c - p, axis=1), _MIN_SIGMA)
    sig_q = np.maximum(np.linalg.norm(c - q, axis=1), _MIN_SIGMA)
    tie = (sig_p + sig_q) / 2.0
    return SegmentFrame(
        p[:, 0], p[:, 1], ux, uy, length, t_c,
        1.0 / (sig_p * sig_p), 1.0 / (sig_q * sig_q), 1.0 / (tie * tie),
    )


def _axis_terms(fr: SegmentFrame, i: int, w: int, h: int) -> tuple[np.ndarray, ...]:
    """float32 1-D terms of object ``i``: along = ``ay[y] + ax[x]``, perp = ``by[y] - bx[x]``."""
    ux, uy = np.float32(fr.ux[i]), np.float32(fr.uy[i])
    rx = np.arange(w, dtype=np.float32) - np.float32(fr.px[i])
    ry = np.arange(h, dtype=np.float32) - np.float32(fr.py[i])
    return rx * ux, ry * uy, rx * uy, ry * ux


def _level_pixels(
    fr: SegmentFrame, i: int, ax: np.ndarray, ay: np.ndarray, lo: np.float32, hi: np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels whose float32 ``along = ay[y] + ax[x]`` lies in ``[lo, hi]``.

    ``hi - lo`` is 2e-3 px, so these pixels hug the line ``along = t_c`` (perpendicular to S through
    c) within 1.5e-3 px: at most one per row (per column for a steep S), the pixel nearest the line.
    Only that candidate is tested, with exactly the float32 sum of the dense map.
    """
    h, w = ay.size, ax.size
    ux, uy, t = float(fr.ux[i]), float(fr.uy[i]), float(fr.t_c[i])
    if abs(ux) >= abs(uy):  # the line crosses every row once: the nearest column per row
        x_star = fr.px[i] + (t - ay.astype(np.float64)) / ux
        cols = np.rint(np.clip(x_star, -1, w)).astype(np.intp)
        rows = np.arange(h)
    else:
        y_star = fr.py[i] + (t - ax.astype(np.float64)) / uy
        rows = np.rint(np.clip(y_star, -1, h)).astype(np.intp)
        cols = np.arange(w)
    ok = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    rows, cols = rows[ok], cols[ok]
    along = ay[rows] + ax[cols]
    level = ~(along < lo) & ~(along > hi)
    return rows[level], cols[level]


def _side_band(fr: SegmentFrame, i: int, h: int, w: int) -> tuple[bool, int, int, bool]:
    """Where p's side of c lies: ``(by_columns, start, stop, p_first)``.

    The line ``along = t_c`` splits the grid; away from it by more than a pixel the side is certain.
    With ``by_columns`` (a shallow S) columns ``[0, start)`` lie wholly on one side, columns
    ``[stop, W)`` on the other, and only the band ``[start, stop)`` needs a per-pixel test; rows
    otherwise. ``p_first``: the low columns (rows) are on p's side.
    """
    ux, uy, t = float(fr.ux[i]), float(fr.uy[i]), float(fr.t_c[i])
    by_columns = abs(ux) >= abs(uy)
    n, m = (w, h) if by_columns else (h, w)
    u_main, u_other = (ux, uy) if by_columns else (uy, ux)
    origin = fr.px[i] if by_columns else fr.py[i]
    other0 = fr.py[i] if by_columns else fr.px[i]
    # along = (main - origin) * u_main + (other - other0) * u_other = t at main = ...
    ends = origin + (t - (np.array([0.0, m - 1.0]) - other0) * u_other) / u_main
    start = int(np.clip(np.floor(ends.min()) - 1, 0, n))
    stop = int(np.clip(np.ceil(ends.max()) + 2, start, n))
    return by_columns, start, stop, u_main > 0


def segment_sq_distance(
    fr: SegmentFrame, i: int, out: np.ndarray, along: np.ndarray, tmp: np.ndarray
) -> np.ndarray:
    """``out[y, x] = d_S(x, y)**2 = (dist((x, y), S) / sigma_S(x, y))**2`` of object ``i``, float32.

    ``out``, ``along`` and ``tmp`` are (H, W) float32 buffers (``along`` and ``tmp`` are scratch).
    The per-pixel work is a few float32 passes: ``along`` and ``perp`` (position along S from p,
    and across it) as outer sums of 1-D terms, ``dist**2 = perp**2 + (along - clip(along, 0,
    |S|))**2``, times ``1 / sigma**2`` of the pixel's side of c: ``along < t_c - 1e-3`` is p's
    side, ``along > t_c + 1e-3`` q's side, the level pixels between use the tie sigma. Only a band
    of columns (rows) around the line ``along = t_c`` is tested per pixel (:func:`_side_band`), the
    level pixels sparsely (:func:`_level_pixels`). ``cmdeploy.export.fused`` repeats these
    operations densely.
    """
    h, w = out.shape
    ax, ay, bx, by = _axis_terms(fr, i, w, h)
    np.add(ay[:, None], ax[None, :], out=along)
    np.subtract(by[:, None], bx[None, :], out=out)
    np.multiply(out, out, out=out)
    np.clip(along, np.float32(0.0), np.float32(fr.length[i]), out=tmp)
    np.subtract(along, tmp, out=tmp)
    np.multiply(tmp, tmp, out=tmp)
    np.add(out, tmp, out=out)
    k_p, k_q, k_tie = np.float32(fr.k_p[i]), np.float32(fr.k_q[i]), np.float32(fr.k_tie[i])
    if k_p == k_q == k_tie:
        return np.multiply(out, k_p, out=out)
    lo = np.float32(fr.t_c[i] - _TIE_EPS)
    hi = np.float32(fr.t_c[i] + _TIE_EPS)
    rows, cols = _level_pixels(fr, i, ax, ay, lo, hi)
    level = out[rows, cols] * k_tie
    by_columns, start, stop, p_first = _side_band(fr, i, h, w)
    k_low, k_high = (k_p, k_q) if p_first else (k_q, k_p)

    def part(a: int, b: int) -> tuple[slice, slice]:
        return (slice(None), slice(a, b)) if by_columns else (slice(a, b), slice(None))

    low, band, high = part(0, start), part(start, stop), part(stop, None)
    np.multiply(out[low], k_low, out=out[low])
    np.multiply(out[high], k_high, out=out[high])
    if stop > start:
        np.multiply(out[band], np.where(along[band] < lo, k_p, k_q), out=out[band])
    out[rows, cols] = level
    return out


_SCRATCH = threading.local()
_SCRATCH_MAX_PIXELS = 1024 * 1024


def _scratch(h: int, w: int) -> list[np.ndarray]:
    """Three (H, W) float32 work buffers, kept per thread for the last shape asked for.

    Fresh multi-megabyte arrays cost a page fault per 4 KiB on first touch, which on small VMs
    took longer than computing the map; reusing them keeps every pass in warm memory.
    """
    if h * w > _SCRATCH_MAX_PIXELS:  # not kept: a thread would hold 12+ MB for one odd call
        return [np.empty((h, w), np.float32) for _ in range(3)]
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or bufs[0].shape != (h, w):
        bufs = [np.empty((h, w), np.float32) for _ in range(3)]
        _SCRATCH.bufs = bufs
    return bufs


def confidence_map(
    points: np.ndarray | list,
    shape: tuple[int, int],
    *,
    variant: Variant = "paper",
    tau: float | None = None,
    out: np.ndarray | None = None,
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
        out: optional float32 array to write into, (N, H, W) (or (H, W) for one point set); each
            ``out[i]`` must be C-contiguous (e.g. ``x[:, 1]`` of an (N, C, H, W) network input).

    Returns:
        float32 (H, W) for one point set or (N, H, W) for a batch (``out`` when given). For
        ``"paper"``: 1 on both segments, in (0, 1] everywhere.

    Cost: with ``a = d_A**2`` and ``b = d_B**2`` (:func:`segment_sq_distance`), the paper's
    ``d1 * d2 = min(d_A, d_B) * sqrt(d_A**2 + d_B**2) = sqrt(min(a, b) * (a + b))``: one square
    root and one division per pixel; maps are made one at a time in reused float32 buffers.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    single = np.ndim(points) == 2
    pts = validate_points(points)
    h, w = _validate_shape(shape)
    n = len(pts)
    result = np.empty((n, h, w), dtype=np.float32) if out is None else (out[None] if out.ndim == 2 else out)
    if result.shape != (n, h, w) or result.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {(n, h, w)}, got {result.dtype} {result.shape}")
    c = cross_centre(pts)
    sigma_mode = "half" if variant == "authors" else "side"
    frame_a = segment_frame(pts[:, 0], pts[:, 1], c, sigma_mode)
    frame_b = segment_frame(pts[:, 2], pts[:, 3], c, sigma_mode)
    a, b, tmp = _scratch(h, w)
    one = np.float32(1.0)
    for i in range(n):
        dst = result[i]
        if not dst.flags.c_contiguous:
            raise ValueError("out[i] must be C-contiguous")
        segment_sq_distance(frame_a, i, a, dst, tmp)  # dst is scratch until the end
        segment_sq_distance(frame_b, i, b, dst, tmp)
        if variant == "paper":  # f = 1 / (1 + sqrt(min(a, b) * (a + b)))
            np.minimum(a, b, out=dst)
            np.add(a, b, out=a)
            np.multiply(dst, a, out=dst)
            np.sqrt(dst, out=dst)
            np.add(dst, one, out=dst)
            np.divide(one, dst, out=dst)
        elif variant == "authors":  # f = 1 / (1 + tau * min(d_A, d_B) * (d_A + d_B)), min-max scaled
            t = np.float32(7.0 if tau is None else tau)
            np.sqrt(a, out=a)
            np.sqrt(b, out=b)
            np.minimum(a, b, out=dst)
            np.add(a, b, out=a)
            np.multiply(dst, t, out=dst)
            np.multiply(dst, a, out=dst)
            np.add(dst, one, out=dst)
            np.divide(one, dst, out=dst)
            lo, hi = dst.min(), dst.max()
            np.subtract(dst, lo, out=dst)
            np.divide(dst, hi - lo if hi > lo else one, out=dst)
        else:  # binary regions: max(d_A, d_B) <= tau or sqrt(d_A**2 + d_B**2) <= tau
            t = np.float32(1.0 if tau is None else tau)
            (np.maximum if variant == "chebyshev" else np.add)(a, b, out=a)
            np.sqrt(a, out=a)
            dst[...] = a <= t
    if out is not None:
        return out
    return result[0] if single else result


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
