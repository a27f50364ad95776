"""PNG overlays (Pillow only): a windowed CT slice with coloured masks, contours and extreme points;
and guidance maps (confidence map / Gaussians) drawn over a slice.

Images are RGB uint8 ``(H, W, 3)`` with the slice's own pixel grid: row = y, column = x, one PNG
pixel per slice pixel. The grey level is ``clip(hu, lo, hi)`` scaled linearly to 0..255 over the
window (default [-200, 250] HU, the paper's, or the model spec's window). Masks are filled with
their label's colour at opacity ``alpha`` and outlined by their 4-connected boundary (mask pixels
with a background 4-neighbour; outside the image counts as background). Extreme points
``(x, y)`` are small discs centred on the pixel centre.

Colours: label value ``v`` (see :func:`cmdeploy.writers.label_values`) gets ``PALETTE[(v - 1) %
len(PALETTE)]``; the DICOM SEG writer uses the same colours for its segments.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy.writers import (
    SegmentedObject,
    check_objects,
    label_values,
    object_points,
    objects_by_slice,
    overlay_name,
)
from cmdeploy.writers.atomic import OutputDir, atomic_write_bytes

if TYPE_CHECKING:
    from cmdeploy.io.series import Series
    from cmdeploy.spec import ModelSpec

DEFAULT_WINDOW = (-200.0, 250.0)
# 12 well separated colours (RGB)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)
# "inferno"-like colour map anchors for guidance maps: value -> RGB
_CMAP_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_CMAP_RGB = np.array(
    [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64
)


def color_for_value(value: int) -> tuple[int, int, int]:
    """RGB colour of label value ``value`` (1-based)."""
    return PALETTE[(int(value) - 1) % len(PALETTE)]


def resolve_window(
    window: tuple[float, float] | None = None, spec: ModelSpec | None = None
) -> tuple[float, float]:
    """``window`` if given, else the spec's window, else [-200, 250] HU; checked lo < hi."""
    lo, hi = window if window is not None else (spec.window if spec is not None else DEFAULT_WINDOW)
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise ValueError(f"window must be (low, high) HU with high > low, got {(lo, hi)}")
    return lo, hi


def window_to_uint8(slice_hu: np.ndarray, window: tuple[float, float] = DEFAULT_WINDOW) -> np.ndarray:
    """(H, W) HU -> (H, W) uint8 grey: ``clip(hu, lo, hi)`` mapped linearly to 0..255."""
    arr = np.asarray(slice_hu, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"slice must be a 2-D (H, W) array, got shape {arr.shape}")
    lo, hi = resolve_window(window)
    scaled = (np.clip(arr, lo, hi) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.rint(np.nan_to_num(scaled, nan=0.0)).astype(np.uint8)


def mask_contour(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Boundary of a bool (H, W) mask: ``mask & ~erode(mask)``, ``width`` pixels thick.

    Erosion is 4-connected, by shifting the mask one pixel in each direction (outside = False).
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    inner = m
    for _ in range(max(int(width), 1)):
        e = np.zeros_like(inner)
        e[1:-1, 1:-1] = (
            inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
        )
        inner = e
    return m & ~inner


def _gray_rgb(slice_hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    g = window_to_uint8(slice_hu, window).astype(np.float32)
    return np.repeat(g[:, :, None], 3, axis=2)


def _marker_radius(shape: tuple[int, int]) -> int:
    return max(2, round(min(shape) / 128))


def _draw_points(draw: Any, pts: np.ndarray, color: tuple[int, int, int], r: int) -> None:
    for x, y in pts:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255))


def render_overlay(
    slice_hu: np.ndarray,
    objects: Sequence[SegmentedObject],
    *,
    window: tuple[float, float] | None = None,
    spec: ModelSpec | None = None,
    values: Mapping[str, int] | None = None,
    alpha: float = 0.35,
    contour_width: int = 1,
    draw_points: bool = True,
    draw_labels: bool = True,
    scale: int = 1,
) -> np.ndarray:
    """RGB uint8 (H*scale, W*scale, 3): the windowed slice with each object's mask, contour and
    extreme points.

    ``objects`` are the objects of this slice (their ``slice_index`` is not used); ``values``
    (label -> 1-based value) fixes the colours, default :func:`label_values` of ``objects``. Later
    objects are drawn over earlier ones. ``scale`` > 1 enlarges the pixels (nearest) before the
    points and labels are drawn, so small slices stay readable.
    """
    from PIL import Image, ImageDraw

    arr = np.asarray(slice_hu)
    if arr.ndim != 2:
        raise ValueError(f"slice must be a 2-D (H, W) array, got shape {arr.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = arr.shape
    masks = check_objects(objects, None, (h, w))
    values = dict(values) if values is not None else label_values(objects)
    rgb = _gray_rgb(arr, resolve_window(window, spec))
    a = np.float32(alpha)
    for obj, mc in zip(objects, masks, strict=True):
        if str(obj.label) not in values:
            raise ValueError(f"label {str(obj.label)!r} has no value in `values`")
        color = np.asarray(color_for_value(values[str(obj.label)]), dtype=np.float32)
        sub, crop = rgb[mc.window], mc.crop  # the crop is the mask's bounding box: its edge is contour
        sub[crop] = sub[crop] * (1 - a) + color * a
        sub[mask_contour(crop, contour_width)] = color
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    img = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    if draw_points or draw_labels:
        draw = ImageDraw.Draw(img)
        r = _marker_radius((h * scale, w * scale))
        for obj, mc in zip(objects, masks, strict=True):
            color = color_for_value(values[str(obj.label)])
            pts = object_points(obj)
            if pts is not None:  # pixel centre (x, y) -> centre of its enlarged block
                pts = (np.asarray(pts, dtype=np.float64) + 0.5) * scale - 0.5
            if draw_points and pts is not None:
                _draw_points(draw, pts, color, r)
            if draw_labels:
                if pts is not None:
                    anchor = (float(pts[:, 0].min()), float(pts[:, 1].min()))
                else:
                    if mc.crop.size == 0 or not mc.crop.any():
                        continue
                    anchor = (float(mc.x0) * scale, float(mc.y0) * scale)
                draw.text((anchor[0], max(anchor[1] - 12 - r, 0)), str(obj.label), fill=color)
    return np.asarray(img, dtype=np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 RGB or (H, W) uint8 grey array as PNG."""
    from PIL import Image

    arr = np.asarray(rgb)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"expected uint8 (H, W) or (H, W, 3), got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_series_overlays(
    out: OutputDir | str | Path,
    series: Series,
    objects: Sequence[SegmentedObject],
    *,
    folder: str = "overlays",
    values: Mapping[str, int] | None = None,
    min_side: int = 0,
    **kwargs: Any,
) -> list[Path]:
    """One overlay PNG per annotated slice, ``<folder>/slice_0012.png`` (:func:`overlay_name`).

    ``min_side`` > 0 enlarges small slices by an integer factor until the longer side is at least
    that many pixels (readable labels on e.g. 128 x 128 slices); 0 keeps the slice's own size.

    ``out`` is an :class:`OutputDir` (files are staged, renamed on its commit) or a folder (each
    file written atomically). Slices are read one at a time from ``series``. Colours follow
    ``values`` (default: :func:`label_values` of all ``objects``, so a label keeps its colour on
    every slice). Returns the target paths.
    """
    check_objects(objects, series.num_slices, series.shape)
    values = dict(values) if values is not None else label_values(objects)
    paths = []
    scale = max(1, -(-int(min_side) // max(series.shape))) if min_side > 0 else 1
    for k, objs in objects_by_slice(objects).items():
        data = png_bytes(render_overlay(series.slice_hu(k), objs, values=values, scale=scale, **kwargs))
        name = f"{folder}/{overlay_name(k)}" if folder else overlay_name(k)
        if isinstance(out, OutputDir):
            paths.append(out.write_bytes(name, data))
        else:
            target = Path(out) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            paths.append(atomic_write_bytes(target, data))
    return paths


def colormap(values: np.ndarray) -> np.ndarray:
    """Float values in [0, 1] (any shape) -> float32 RGB 0..255 (shape + (3,)), inferno-like."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    out = np.empty(v.shape + (3,), dtype=np.float32)
    for c in range(3):
        out[..., c] = np.interp(v, _CMAP_STOPS, _CMAP_RGB[:, c])
    return out


def render_guidance_overlay(
    slice_hu: np.ndarray,
    points_list: Sequence[np.ndarray] | np.ndarray,
    maps: Sequence[np.ndarray] | np.ndarray,
    path: str | Path | None = None,
    *,
    window: tuple[float, float] | None = None,
    spec: ModelSpec | None = None,
    alpha: float = 0.7,
) -> np.ndarray:
    """Slice + guidance map colour overlay (for the foundation demo); returns RGB uint8 (H, W, 3).

    ``maps`` is one (H, W) map or (N, H, W) maps in the slice frame with values in [0, 1] (a
    confidence map or extreme-point Gaussians); several maps are combined by their pixel-wise max.
    Each pixel blends grey and the colour map with weight ``alpha * value``, so low guidance stays
    see-through. ``points_list`` holds each object's (4, 2) extreme points (left, right, top,
    bottom; ``(x, y)``): drawn as discs, with the left-right and top-bottom segments as lines.
    Written atomically as PNG to ``path`` unless it is None.
    """
    from PIL import Image, ImageDraw

    arr = np.asarray(slice_hu)
    if arr.ndim != 2:
        raise ValueError(f"slice must be a 2-D (H, W) array, got shape {arr.shape}")
    m = np.asarray(maps, dtype=np.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3 or m.shape[1:] != arr.shape:
        raise ValueError(f"maps must be (H, W) or (N, H, W) with (H, W) = {arr.shape}, got {m.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    pts = np.asarray(points_list, dtype=np.float64).reshape(-1, 4, 2) if len(points_list) else None
    v = np.clip(np.nan_to_num(m.max(axis=0)), 0.0, 1.0)
    wgt = (np.float32(alpha) * v)[:, :, None]
    rgb = _gray_rgb(arr, resolve_window(window, spec)) * (1 - wgt) + colormap(v) * wgt
    img = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB")
    if pts is not None:
        draw = ImageDraw.Draw(img)
        r = _marker_radius(arr.shape)
        for i, p in enumerate(pts):
            color = color_for_value(i + 1)
            draw.line([tuple(p[0]), tuple(p[1])], fill=(255, 255, 255), width=1)
            draw.line([tuple(p[2]), tuple(p[3])], fill=(255, 255, 255), width=1)
            _draw_points(draw, p, color, r)
    out = np.asarray(img, dtype=np.uint8)
    if path is not None:
        atomic_write_bytes(path, png_bytes(out))
    return out
