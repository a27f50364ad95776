"""The runtime preprocessing as it was before issue 18, frozen for side-by-side benchmarks.

Reference only (``benchmarks/bench_prepare.py`` times it next to :mod:`cmdeploy.preprocess` in one
run, and checks that the two agree). Never import it from ``cmdeploy``. Per object: validate the
points, build the crop transform, sample the crop through 2-D coordinate arrays
(:func:`cmdeploy.geometry.sample_bilinear`), window, confidence map with whole-batch float32
temporaries, then concatenate and copy into the batch.
"""

from __future__ import annotations

import numpy as np

from cmdeploy.geometry import crop_transform, invert_affine, sample_bilinear
from cmdeploy.guidance import cross_centre, validate_points
from cmdeploy.spec import ModelSpec

_MIN_SIGMA = 1.0
_TIE_EPS = 1e-3


def crop_image_2d(image: np.ndarray, matrix: np.ndarray, size: int, fill: float) -> np.ndarray:
    """The old ``warp_affine``: every crop pixel's slice coordinates as 2-D arrays, then gathers."""
    inv = invert_affine(matrix)
    us = np.arange(size, dtype=np.float64)[None, :]
    vs = np.arange(size, dtype=np.float64)[:, None]
    xs = inv[0, 0] * us + inv[0, 1] * vs + inv[0, 2]
    ys = inv[1, 0] * us + inv[1, 1] * vs + inv[1, 2]
    return sample_bilinear(image, xs, ys, fill=fill)


def window_normalize(hu: np.ndarray, spec: ModelSpec) -> np.ndarray:
    lo, hi = spec.window
    v = (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return (v - np.float32(spec.norm_mean)) / np.float32(spec.norm_std)


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


def confidence_map(points: np.ndarray, shape: tuple[int, int], *, variant: str = "paper",
                   tau: float | None = None) -> np.ndarray:
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
    single = np.ndim(points) == 2
    pts = validate_points(points)
    h, w = shape
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


def prepare_one(slice_hu: np.ndarray, points: np.ndarray, spec: ModelSpec) -> tuple[np.ndarray, np.ndarray]:
    """The old per-object path: (C, S, S) float32 input and the crop matrix (paper CM only)."""
    pts = validate_points(points)[0]
    t = crop_transform(pts, spec.input_size, spec.target_size)
    image = window_normalize(crop_image_2d(slice_hu, t.matrix, spec.input_size, spec.pad_hu), spec)
    guide = confidence_map(t.to_crop(pts)[None], (spec.input_size, spec.input_size))
    return np.concatenate([image[None], guide], axis=0), t.matrix


def prepare_batch(slices_hu: list[np.ndarray], points: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """The old ``prepare_batch``: :func:`prepare_one` per object, copied into the batch."""
    s = spec.input_size
    out = np.empty((len(points), spec.num_channels, s, s), dtype=np.float32)
    for i, (img, pts) in enumerate(zip(slices_hu, points, strict=True)):
        out[i], _ = prepare_one(img, pts, spec)
    return out
