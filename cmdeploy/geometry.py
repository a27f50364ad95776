"""Crop geometry: slice <-> network-crop affine transforms, shared by training and inference.

Coordinates are ``(x, y)`` = (column, row) with pixel centres at integers, in float64. A
:class:`CropTransform` holds a 2x3 matrix ``M`` mapping a slice point to crop coordinates:
``[u, v]^T = M @ [x, y, 1]^T``. The crop is ``S x S`` pixels.

The inference crop (paper sec. 3.2): the bounding box of the extreme points, longer side
``b = max(w, h)``, zoom ``z = b_m / b`` so the box becomes ``b_m`` crop pixels, centred in the crop.
Training draws ``b_m`` from a range and may add rotation, flip and scale about the crop centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MIN_EXTENT = 1.0  # pixels: a box side below this is treated as 1 px (avoids infinite zoom)


@dataclass(frozen=True)
class CropTransform:
    """Affine map from slice pixel coordinates to crop pixel coordinates.

    Attributes:
        matrix: (2, 3) float64, slice ``(x, y, 1)`` -> crop ``(u, v)``.
        crop_size: side ``S`` of the square crop, pixels.
    """

    matrix: np.ndarray
    crop_size: int

    @property
    def inverse(self) -> np.ndarray:
        """(2, 3) float64 matrix mapping crop ``(u, v, 1)`` -> slice ``(x, y)``."""
        return invert_affine(self.matrix)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Map (..., 2) slice points ``(x, y)`` into crop coordinates ``(u, v)``."""
        return apply_affine(self.matrix, points)

    def to_slice(self, points: np.ndarray) -> np.ndarray:
        """Map (..., 2) crop points ``(u, v)`` back to slice coordinates ``(x, y)``."""
        return apply_affine(self.inverse, points)


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine to (..., 2) points; returns float64 (..., 2)."""
    pts = np.asarray(points, dtype=np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Exact inverse of a (2, 3) affine map (raises ``ValueError`` when singular)."""
    m = np.asarray(matrix, dtype=np.float64)
    a = m[:, :2]
    det = np.linalg.det(a)
    if abs(det) < 1e-12:
        raise ValueError(f"affine matrix is singular (det={det:.3g})")
    a_inv = np.linalg.inv(a)
    return np.concatenate([a_inv, -a_inv @ m[:, 2:3]], axis=1)


def compose_affine(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """(2, 3) matrix of ``outer(inner(p))``."""
    o = np.vstack([np.asarray(outer, np.float64), [0.0, 0.0, 1.0]])
    i = np.vstack([np.asarray(inner, np.float64), [0.0, 0.0, 1.0]])
    return (o @ i)[:2]


def bounding_box(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre (x, y) and size (w, h) of the points' bounding box; points (4, 2) or (N, 4, 2)."""
    pts = np.asarray(points, dtype=np.float64)
    lo = pts.min(axis=-2)
    hi = pts.max(axis=-2)
    return (lo + hi) / 2.0, hi - lo


def zoom_factor(points: np.ndarray, target_size: float) -> float:
    """Zoom ``z = target_size / max(w, h)`` of one point set's bounding box (side >= 1 px)."""
    _, size = bounding_box(points)
    return float(target_size / max(float(size.max()), _MIN_EXTENT))


def crop_transform(
    points: np.ndarray,
    crop_size: int,
    target_size: float,
    *,
    rotation_deg: float = 0.0,
    flip: bool = False,
    scale: float = 1.0,
) -> CropTransform:
    """Crop transform for one object.

    Args:
        points: (4, 2) extreme points (x, y) in slice pixels.
        crop_size: side ``S`` of the crop, pixels.
        target_size: ``b_m``: crop pixels that the longer bounding-box side is zoomed to.
        rotation_deg: counter-clockwise rotation (as seen on screen, y down) about the crop centre.
        flip: mirror left-right about the crop centre.
        scale: extra zoom factor (augmentation), 1 = none.

    The bounding-box centre maps to the crop centre ``((S - 1) / 2, (S - 1) / 2)``.
    """
    centre, _ = bounding_box(points)
    z = zoom_factor(points, target_size) * float(scale)
    half = (crop_size - 1) / 2.0
    theta = np.deg2rad(rotation_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    # rows are image axes with y pointing down: a screen-CCW rotation is (x, y) -> (x c + y s, -x s + y c)
    lin = z * np.array([[cos, sin], [-sin, cos]])
    if flip:
        lin = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ lin
    offset = np.array([half, half]) - lin @ centre
    return CropTransform(np.concatenate([lin, offset[:, None]], axis=1), int(crop_size))


def sample_bilinear(
    image: np.ndarray, xs: np.ndarray, ys: np.ndarray, fill: float = 0.0
) -> np.ndarray:
    """Bilinear samples of a 2-D ``image`` at float coordinates (x = column, y = row).

    Points outside ``[0, W-1] x [0, H-1]`` get ``fill``. Returns float32 of ``xs.shape``.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    inside = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
    xc = np.clip(xs, 0, w - 1)
    yc = np.clip(ys, 0, h - 1)
    x0 = np.minimum(np.floor(xc).astype(np.intp), max(w - 2, 0))
    y0 = np.minimum(np.floor(yc).astype(np.intp), max(h - 2, 0))
    x1 = np.minimum(x0 + 1, w - 1)
    y1 = np.minimum(y0 + 1, h - 1)
    fx = (xc - x0).astype(np.float32)
    fy = (yc - y0).astype(np.float32)
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bot = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    out = top * (1 - fy) + bot * fy
    return np.where(inside, out, np.float32(fill)).astype(np.float32, copy=False)


def warp_affine(
    image: np.ndarray,
    matrix: np.ndarray,
    out_shape: tuple[int, int],
    *,
    fill: float = 0.0,
    order: int = 1,
) -> np.ndarray:
    """Resample ``image`` into an ``out_shape`` (H', W') grid through the forward map ``matrix``.

    ``matrix`` (2, 3) maps source ``(x, y)`` to destination ``(u, v)``; every destination pixel is
    sampled at the inverse image of its centre. ``order`` 1 = bilinear, 0 = nearest. Returns float32.
    """
    inv = invert_affine(matrix)
    oh, ow = out_shape
    us = np.arange(ow, dtype=np.float64)[None, :]
    vs = np.arange(oh, dtype=np.float64)[:, None]
    xs = inv[0, 0] * us + inv[0, 1] * vs + inv[0, 2]
    ys = inv[1, 0] * us + inv[1, 1] * vs + inv[1, 2]
    if order == 0:
        xs, ys = np.rint(xs), np.rint(ys)
    elif order != 1:
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    return sample_bilinear(image, xs, ys, fill=fill)


def crop_image(image: np.ndarray, transform: CropTransform, *, fill: float = 0.0) -> np.ndarray:
    """The (S, S) float32 crop of a slice under ``transform`` (bilinear)."""
    s = transform.crop_size
    return warp_affine(image, transform.matrix, (s, s), fill=fill)


def paste_back(
    crop_values: np.ndarray, transform: CropTransform, slice_shape: tuple[int, int]
) -> np.ndarray:
    """Inverse of :func:`crop_image`: map an (S, S) crop-space map into the full slice.

    Every slice pixel whose image under ``transform`` lies inside the crop gets the bilinear sample
    of ``crop_values`` there; pixels outside the crop's footprint are 0. Only the footprint's
    bounding box is computed. Returns float32 (H, W).
    """
    h, w = slice_shape
    s = transform.crop_size
    if crop_values.shape != (s, s):
        raise ValueError(f"crop_values must be ({s}, {s}), got {crop_values.shape}")
    out = np.zeros((h, w), dtype=np.float32)
    corners = transform.to_slice(np.array([[0, 0], [s - 1, 0], [0, s - 1], [s - 1, s - 1]]))
    x_lo = max(int(np.floor(corners[:, 0].min())), 0)
    x_hi = min(int(np.ceil(corners[:, 0].max())), w - 1)
    y_lo = max(int(np.floor(corners[:, 1].min())), 0)
    y_hi = min(int(np.ceil(corners[:, 1].max())), h - 1)
    if x_lo > x_hi or y_lo > y_hi:
        return out
    m = transform.matrix
    xs = np.arange(x_lo, x_hi + 1, dtype=np.float64)[None, :]
    ys = np.arange(y_lo, y_hi + 1, dtype=np.float64)[:, None]
    us = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    vs = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    out[y_lo : y_hi + 1, x_lo : x_hi + 1] = sample_bilinear(crop_values, us, vs, fill=0.0)
    return out
