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


def crop_transforms(points: np.ndarray, crop_size: int, target_size: float) -> list[CropTransform]:
    """Inference crop transforms of (N, 4, 2) point sets at once (no rotation, flip or scale).

    Equal, bit for bit, to ``crop_transform(points[i], crop_size, target_size)`` for every ``i``
    (the same float64 operations, vectorised over objects).
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 4, 2)
    lo = pts.min(axis=1)
    hi = pts.max(axis=1)
    centre = (lo + hi) / 2.0
    z = target_size / np.maximum((hi - lo).max(axis=1), _MIN_EXTENT)
    half = (crop_size - 1) / 2.0
    lin = z[:, None, None] * np.array([[1.0, 0.0], [-0.0, 1.0]])  # crop_transform's, cos 1, sin 0
    offset = half - z[:, None] * centre  # == half - lin @ centre: the other term is a signed zero
    mats = np.concatenate([lin, offset[:, :, None]], axis=2)
    return [CropTransform(m, int(crop_size)) for m in mats]


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


def _axis_taps(coords: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D bilinear taps along an axis of ``n`` pixels, exactly as :func:`sample_bilinear` makes them:
    ``(lo, hi, frac, inside)``."""
    inside = (coords >= 0) & (coords <= n - 1)
    c = np.clip(coords, 0, n - 1)
    lo = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    hi = np.minimum(lo + 1, n - 1)
    return lo, hi, (c - lo).astype(np.float32), inside


def sample_grid(
    image: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    fill: float = 0.0,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Bilinear samples of a 2-D ``image`` on the grid ``ys x xs`` (1-D float coordinates).

    Equal, bit for bit, to ``sample_bilinear(image, xs[None, :], ys[:, None], fill)`` (the same
    float32 operations in the same order: along x first, then along y), but separable: the x
    interpolation runs once per source row the grid touches, then rows are blended, so no 2-D
    coordinate arrays or per-pixel gathers of four neighbours are made. Returns float32
    ``(len(ys), len(xs))``, written into ``out`` when given.
    """
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    x0, x1, fx, in_x = _axis_taps(np.asarray(xs, np.float64), w)
    y0, y1, fy, in_y = _axis_taps(np.asarray(ys, np.float64), h)
    ny, nx = len(y0), len(x0)
    if out is None:
        out = np.empty((ny, nx), dtype=np.float32)
    if ny == 0 or nx == 0:
        return out
    r0, r1 = int(y0.min()), int(y1.max()) + 1
    if r1 - r0 <= 2 * ny:  # zoom >= 1/2: interpolate every touched row once
        rows = img[r0:r1]
        top_idx, bot_idx = y0 - r0, y1 - r0
    else:  # strong minification: only the rows the taps use
        rows = img[np.concatenate([y0, y1])]
        top_idx, bot_idx = np.arange(ny), np.arange(ny, 2 * ny)
    along_x = rows[:, x0]
    along_x *= 1 - fx
    right = rows[:, x1]
    right *= fx
    along_x += right
    np.multiply(along_x[top_idx], (1 - fy)[:, None], out=out)
    bottom = along_x[bot_idx]
    bottom *= fy[:, None]
    out += bottom
    if not in_y.all():
        out[~in_y] = fill
    if not in_x.all():
        out[:, ~in_x] = fill
    return out


def warp_affine(
    image: np.ndarray,
    matrix: np.ndarray,
    out_shape: tuple[int, int],
    *,
    fill: float = 0.0,
    order: int = 1,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Resample ``image`` into an ``out_shape`` (H', W') grid through the forward map ``matrix``.

    ``matrix`` (2, 3) maps source ``(x, y)`` to destination ``(u, v)``; every destination pixel is
    sampled at the inverse image of its centre. ``order`` 1 = bilinear, 0 = nearest. Returns float32
    (written into ``out`` when given). Maps without rotation take the separable
    :func:`sample_grid` (the same values bit for bit).
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (bilinear), got {order}")
    inv = invert_affine(matrix)
    oh, ow = out_shape
    us = np.arange(ow, dtype=np.float64)
    vs = np.arange(oh, dtype=np.float64)
    if inv[0, 1] == 0 and inv[1, 0] == 0:  # no rotation (every inference crop): separable
        xs = inv[0, 0] * us + inv[0, 2]  # == inv[0, 0] * u + 0 * v + inv[0, 2] of the 2-D path
        ys = inv[1, 1] * vs + inv[1, 2]
        if order == 0:
            xs, ys = np.rint(xs), np.rint(ys)
        return sample_grid(image, xs, ys, fill=fill, out=out)
    xs = inv[0, 0] * us[None, :] + inv[0, 1] * vs[:, None] + inv[0, 2]
    ys = inv[1, 0] * us[None, :] + inv[1, 1] * vs[:, None] + inv[1, 2]
    if order == 0:
        xs, ys = np.rint(xs), np.rint(ys)
    result = sample_bilinear(image, xs, ys, fill=fill)
    if out is None:
        return result
    out[...] = result
    return out


def crop_image(
    image: np.ndarray, transform: CropTransform, *, fill: float = 0.0, out: np.ndarray | None = None
) -> np.ndarray:
    """The (S, S) float32 crop of a slice under ``transform`` (bilinear), into ``out`` when given."""
    s = transform.crop_size
    return warp_affine(image, transform.matrix, (s, s), fill=fill, out=out)


def footprint_window(transform: CropTransform, slice_shape: tuple[int, int]) -> tuple[slice, slice]:
    """``(rows, cols)`` of the slice pixels in the bounding box of the crop's footprint (may be empty)."""
    h, w = slice_shape
    s = transform.crop_size
    corners = transform.to_slice(np.array([[0, 0], [s - 1, 0], [0, s - 1], [s - 1, s - 1]], np.float64))
    x_lo = max(int(np.floor(corners[:, 0].min())), 0)
    x_hi = min(int(np.ceil(corners[:, 0].max())), w - 1) + 1
    y_lo = max(int(np.floor(corners[:, 1].min())), 0)
    y_hi = min(int(np.ceil(corners[:, 1].max())), h - 1) + 1
    if x_lo >= x_hi or y_lo >= y_hi:
        return slice(0, 0), slice(0, 0)
    return slice(y_lo, y_hi), slice(x_lo, x_hi)


def paste_window(
    crop_values: np.ndarray, transform: CropTransform, slice_shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """:func:`paste_back` over the footprint window only: ``(values, (rows, cols))`` with
    ``paste_back(...)[rows, cols] == values`` and ``paste_back(...)`` 0 outside the window.

    Each slice pixel in the window gets the bilinear sample of the (S, S) ``crop_values`` at its
    crop coordinates (0 outside the crop); maps without rotation use the separable
    :func:`sample_grid`. Returns float32 values of the window's shape.
    """
    s = transform.crop_size
    if crop_values.shape != (s, s):
        raise ValueError(f"crop_values must be ({s}, {s}), got {crop_values.shape}")
    rows, cols = footprint_window(transform, slice_shape)
    if rows.stop <= rows.start:
        return np.zeros((0, 0), np.float32), (rows, cols)
    m = transform.matrix
    xs = np.arange(cols.start, cols.stop, dtype=np.float64)
    ys = np.arange(rows.start, rows.stop, dtype=np.float64)
    if m[0, 1] == 0 and m[1, 0] == 0:
        values = sample_grid(crop_values, m[0, 0] * xs + m[0, 2], m[1, 1] * ys + m[1, 2])
    else:
        us = m[0, 0] * xs[None, :] + m[0, 1] * ys[:, None] + m[0, 2]
        vs = m[1, 0] * xs[None, :] + m[1, 1] * ys[:, None] + m[1, 2]
        values = sample_bilinear(crop_values, us, vs, fill=0.0)
    return values, (rows, cols)


def paste_back(
    crop_values: np.ndarray, transform: CropTransform, slice_shape: tuple[int, int]
) -> np.ndarray:
    """Inverse of :func:`crop_image`: map an (S, S) crop-space map into the full slice.

    Every slice pixel whose image under ``transform`` lies inside the crop gets the bilinear sample
    of ``crop_values`` there; pixels outside the crop's footprint are 0. Only the footprint's
    bounding box is computed (:func:`paste_window`). Returns float32 (H, W).
    """
    values, window = paste_window(crop_values, transform, slice_shape)
    out = np.zeros(slice_shape, dtype=np.float32)
    out[window] = values
    return out
