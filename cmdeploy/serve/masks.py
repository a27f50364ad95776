"""Masks on the wire: row-major run-length codes and the outer contour polygon.

RLE: the (H, W) bool mask flattened row by row (``[y, x]``, C order) as alternating run lengths,
starting with a run of background (possibly 0): ``[0-run, 1-run, 0-run, ...]``; the runs sum to
H * W. Contour: the outer boundary of the largest 8-connected piece, as pixel centres ``[x, y]``
traced clockwise on screen (y down), the polygon CVAT and the page draw.
"""

from __future__ import annotations

import numpy as np

from cmdeploy.errors import InputError

# Moore neighbourhood, clockwise on screen starting west: (dy, dx)
_NEIGHBOURS: tuple[tuple[int, int], ...] = (
    (0, -1),
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
    (1, 0),
    (1, -1),
)
_DIRECTION = {d: i for i, d in enumerate(_NEIGHBOURS)}


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Run lengths of a bool (H, W) mask in row-major order, background first."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def rle_to_mask(rle: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`; :class:`InputError` when the runs do not fill ``shape``."""
    runs = np.asarray(rle, dtype=np.int64)
    h, w = shape
    if runs.ndim != 1 or (runs < 0).any() or int(runs.sum()) != h * w:
        raise InputError(f"mask RLE must be non-negative run lengths summing to {h} x {w} = {h * w}")
    values = np.arange(runs.size) % 2 == 1
    return np.repeat(values, runs).reshape(h, w)


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected piece of ``mask`` (pixel count; ties: the raster-first piece)."""
    from scipy import ndimage

    comp, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel(), minlength=n + 1)
    sizes[0] = 0
    return comp == int(np.argmax(sizes))


def _step(padded: np.ndarray, cur: tuple[int, int], back: int) -> tuple[tuple[int, int], int] | None:
    """One Moore-tracing step: the next boundary pixel clockwise from the background neighbour
    ``back`` of ``cur``, and the direction (from the new pixel) of the background pixel checked
    just before it. None for an isolated pixel."""
    for i in range(1, 9):
        d = (back + i) % 8
        ny, nx = cur[0] + _NEIGHBOURS[d][0], cur[1] + _NEIGHBOURS[d][1]
        if padded[ny, nx]:
            pd = _NEIGHBOURS[(d + 7) % 8]
            prev = (cur[0] + pd[0], cur[1] + pd[1])
            return (ny, nx), _DIRECTION[(prev[0] - ny, prev[1] - nx)]
    return None


def _trace(padded: np.ndarray) -> list[tuple[int, int]]:
    """Moore-neighbour trace (``(y, x)`` in ``padded``) of the piece holding the raster-first pixel,
    stopped when the walk would repeat its first step (so one-pixel necks are walked on both sides)."""
    ys, xs = np.nonzero(padded)  # row-major: the first one is raster-first, its west is background
    start = (int(ys[0]), int(xs[0]))
    first = _step(padded, start, 0)
    if first is None:
        return [start]
    contour = [start]
    cur, back = first
    for _ in range(4 * ys.size + 8):
        if cur == start and _step(padded, cur, back) == first:
            break
        contour.append(cur)
        nxt = _step(padded, cur, back)
        assert nxt is not None
        cur, back = nxt
    return contour


def outer_contour(mask: np.ndarray) -> list[list[int]]:
    """Outer boundary pixels ``[[x, y], ...]`` of the mask's largest 8-connected piece.

    The pieces are labelled (``scipy.ndimage``) on the mask's bounding box, then the largest is
    traced by Moore-neighbour tracing in O(perimeter) steps. An empty mask gives ``[]``; one pixel
    gives one point.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return []
    ys, xs = np.nonzero(m)
    y0, x0 = int(ys.min()), int(xs.min())
    box = m[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1]
    contour = _trace(np.pad(_largest_piece(box), 1))
    return [[x - 1 + x0, y - 1 + y0] for y, x in contour]
