"""Reference objects of a label slice: one connected component of one label = one object.

Components come from :func:`cmdeploy.labels_to_points.label_components` (by default
8-connectivity; components under ``min_size`` pixels and single pixels are dropped): the one
definition of an object shared with ``points-from-labels`` and training. ``piece`` 1 is the
largest component of a label on a slice, 2 the next, ... Extreme points come from
:func:`cmdeploy.guidance.extreme_points` on the component (with ``jitter`` > 0: uniform click noise
of up to ``jitter`` pixels per coordinate, from a generator seeded by ``(seed, case, slice, label
id, piece)``, so an object's points do not depend on which other cases or labels are selected).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cmdeploy.annotator import DEFAULT_ANNOTATOR, ClickModel, object_clicks
from cmdeploy.guidance import extreme_points
from cmdeploy.labels_to_points import DEFAULT_CONNECTIVITY, DEFAULT_MIN_SIZE, label_components


@dataclass(frozen=True, eq=False)
class EvalObject:
    """One reference object (a connected component of one label on one slice).

    Attributes:
        case: case name; slice_index: 0-based slice.
        label: label name (the id as text without a names file); label_id: its value in the labels.
        piece: 1 for the label's largest component on the slice, 2 for the next, ...
        points: float32 (4, 2) extreme points left, right, top, bottom, each (x, y), jitter applied.
        area_px: reference area in pixels; area_mm2: in mm^2 (None without pixel spacing).
        bbox: (y0, y1, x0, x1) inclusive bounding box of the reference component.
    """

    case: str
    slice_index: int
    label: str
    label_id: int
    piece: int
    points: np.ndarray
    area_px: int
    area_mm2: float | None
    bbox: tuple[int, int, int, int]


def _object_rng(seed: int, case: str, slice_index: int, label_id: int, piece: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(case.encode()), slice_index, label_id, piece])


def slice_objects(
    labels: np.ndarray,
    *,
    case: str = "",
    slice_index: int = 0,
    names: Mapping[int, str] | None = None,
    label_ids: set[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = DEFAULT_CONNECTIVITY,
    jitter: float = 0.0,
    seed: int = 0,
    spacing: tuple[float, float] | None = None,
    clicks: str = "exact",
    click_model: ClickModel = DEFAULT_ANNOTATOR,
) -> list[tuple[EvalObject, np.ndarray]]:
    """The objects of one (H, W) label slice with their bool (H, W) reference masks.

    Ordered by label id, then size (largest first). See the module docstring for the rules.
    ``clicks="annotator"`` draws the points from :mod:`cmdeploy.annotator` with ``click_model``
    (hand error in mm through ``spacing``, 1 mm per pixel when None) instead of the exact extremes.
    """
    px_area = None if spacing is None else float(spacing[0]) * float(spacing[1])
    out: list[tuple[EvalObject, np.ndarray]] = []
    for cp in label_components(labels, min_size=min_size, connectivity=connectivity, label_ids=label_ids):
        lid, area = cp.label_id, cp.area_px
        mask = cp.mask()
        if clicks == "annotator":
            rng = _object_rng(seed, case, slice_index, lid, cp.piece)
            pts = object_clicks(mask, "annotator", spacing_xy=spacing, model=click_model, rng=rng)
        else:
            rng = _object_rng(seed, case, slice_index, lid, cp.piece) if jitter > 0 else None
            pts = extreme_points(mask, jitter=float(jitter), rng=rng)
        obj = EvalObject(
            case=case,
            slice_index=int(slice_index),
            label=names.get(lid, str(lid)) if names is not None else str(lid),
            label_id=lid,
            piece=cp.piece,
            points=pts,
            area_px=area,
            area_mm2=None if px_area is None else area * px_area,
            bbox=cp.bbox,
        )
        out.append((obj, mask))
    return out
