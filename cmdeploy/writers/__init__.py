"""Output writers: label NIfTI, DICOM SEG, PNG overlays and ``report.json``, all written atomically.

Every writer takes a sequence of segmented objects: anything with the attributes of
:class:`ObjectMask` (``slice_index``, ``label``, ``mask`` and optionally ``points``), one per object per
slice, in the frame of the input :class:`~cmdeploy.io.series.Series`: ``mask`` is a bool ``(H, W)``
array indexed ``[y, x]`` (y = row, x = column) and ``slice_index`` is the Series' 0-based slice
index.

Modules (import the one you need; the heavy optional libraries load inside the functions):

* :mod:`cmdeploy.writers.atomic` - temp-name-then-rename writes and :class:`OutputDir`, which
  refuses to overwrite and never leaves partial outputs.
* :mod:`cmdeploy.writers.nifti` - label volume aligned to the input (nibabel, ``nifti`` extra).
* :mod:`cmdeploy.writers.dicom_seg` - DICOM Segmentation referencing the source series
  (highdicom, ``dicom`` extra).
* :mod:`cmdeploy.writers.png_overlay` - windowed slice with coloured masks and extreme points;
  guidance-map overlays (Pillow).
* :mod:`cmdeploy.writers.report` - ``report.json`` without patient identifiers.
* :mod:`cmdeploy.writers.snomed` - SNOMED CT codes for organ labels (used by the SEG writer).

Label values: distinct labels are numbered 1, 2, ... in order of first appearance
(:func:`label_values`); the same numbers are the NIfTI voxel values and the DICOM segment numbers.

Memory: writers hold each object's mask cut to its bounding box (:class:`MaskCrop`, from
:func:`check_objects`), never a full-slice mask per object; an object that offers ``mask_crop()``
(the pipeline's merged objects do) is never expanded to its full slice at all. A 4096 x 4096 slice
costs 16 MB per full bool mask; a crop costs its box.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


class SegmentedObject(Protocol):
    """What the writers read from one result (the pipeline's result type satisfies it)."""

    slice_index: int
    label: str
    mask: np.ndarray


@dataclass(frozen=True, eq=False)
class ObjectMask:
    """One segmented object on one slice.

    Attributes:
        slice_index: 0-based slice index in the input Series.
        label: object label (e.g. ``"heart"``); free text from the points CSV.
        mask: bool (H, W), ``[y, x]``.
        points: optional float (4, 2) extreme points left, right, top, bottom, each ``(x, y)``.
    """

    slice_index: int
    label: str
    mask: np.ndarray
    points: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class MaskCrop:
    """An object's mask cut to its bounding box.

    ``crop`` is bool (h, w), ``[y, x]``, and covers slice rows ``y0 .. y0 + h - 1`` and columns
    ``x0 .. x0 + w - 1``; everything outside is background. An empty mask has an empty crop.
    """

    crop: np.ndarray
    y0: int
    x0: int

    @property
    def window(self) -> tuple[slice, slice]:
        """``(rows, columns)`` of the crop in the slice: ``full[window] == crop``."""
        h, w = self.crop.shape
        return slice(self.y0, self.y0 + h), slice(self.x0, self.x0 + w)

    @property
    def area(self) -> int:
        """Foreground pixels."""
        return int(np.count_nonzero(self.crop))

    def full(self, shape: tuple[int, int]) -> np.ndarray:
        """The bool (H, W) slice mask (allocates H x W)."""
        out = np.zeros(shape, dtype=bool)
        out[self.window] = self.crop
        return out

    @classmethod
    def from_mask(cls, mask: np.ndarray) -> MaskCrop:
        """Crop a bool (H, W) mask to its bounding box."""
        m = np.asarray(mask, dtype=bool)
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        if rows.size == 0:
            return cls(np.zeros((0, 0), dtype=bool), 0, 0)
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        return cls(m[y0:y1, x0:x1].copy(), y0, x0)


def object_points(obj: Any) -> np.ndarray | None:
    """The object's (4, 2) float64 extreme points ``(x, y)``, or None when it has none."""
    pts = getattr(obj, "points", None)
    if pts is None:
        return None
    arr = np.asarray(pts, dtype=np.float64)
    if arr.shape != (4, 2):
        raise ValueError(f"object points must have shape (4, 2), got {arr.shape}")
    return arr


def object_crop(obj: Any, shape: tuple[int, int], *, what: str = "object") -> MaskCrop:
    """``obj``'s mask as a :class:`MaskCrop`: from ``obj.mask_crop()`` when it has one (no
    full-slice array), else cropped from ``obj.mask``; ``ValueError`` when it does not fit
    ``shape`` = (H, W)."""
    h, w = (int(shape[0]), int(shape[1]))
    make = getattr(obj, "mask_crop", None)
    if callable(make):
        mc = make()
        ch, cw = mc.crop.shape
        if mc.y0 < 0 or mc.x0 < 0 or mc.y0 + ch > h or mc.x0 + cw > w:
            raise ValueError(f"{what}: mask crop lies outside the {h} x {w} slice")
        return mc
    mask = np.asarray(obj.mask)
    if mask.shape != (h, w):
        raise ValueError(f"{what}: mask shape {mask.shape} != slice shape {(h, w)} (H, W)")
    return MaskCrop.from_mask(mask)


def check_objects(
    objects: Sequence[SegmentedObject], num_slices: int | None, shape: tuple[int, int]
) -> list[MaskCrop]:
    """Validate objects against a Series of ``num_slices`` slices of ``shape`` = (H, W).

    ``num_slices`` None skips the slice-index check (objects of one slice).
    Returns each object's mask cut to its bounding box (:class:`MaskCrop`). Raises ``ValueError``
    naming the first bad object (its position in ``objects``, slice index and label).
    """
    crops = []
    for i, obj in enumerate(objects):
        k = int(obj.slice_index)
        what = f"object {i} (slice {k}, label {str(obj.label)!r})"
        if num_slices is not None and not 0 <= k < num_slices:
            raise ValueError(f"{what}: slice index outside 0..{num_slices - 1}")
        if not str(obj.label).strip():
            raise ValueError(f"{what}: empty label")
        crops.append(object_crop(obj, shape, what=what))
    return crops


def label_values(objects: Iterable[SegmentedObject]) -> dict[str, int]:
    """Map each distinct label to 1, 2, ... in order of first appearance."""
    values: dict[str, int] = {}
    for obj in objects:
        values.setdefault(str(obj.label), len(values) + 1)
    return values


def label_dtype(num_labels: int) -> np.dtype:
    """uint8 for up to 255 labels, uint16 up to 65535."""
    if num_labels <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if num_labels <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    raise ValueError(f"too many distinct labels for a label map: {num_labels} (max 65535)")


def objects_by_slice(objects: Iterable[SegmentedObject]) -> dict[int, list[SegmentedObject]]:
    """Group objects by slice index (ascending), keeping their order within a slice."""
    groups: dict[int, list[SegmentedObject]] = {}
    for obj in objects:
        groups.setdefault(int(obj.slice_index), []).append(obj)
    return dict(sorted(groups.items()))


def overlay_name(slice_index: int) -> str:
    """Default file name of the PNG overlay of one slice: ``slice_0012.png``."""
    return f"slice_{int(slice_index):04d}.png"


__all__ = [
    "MaskCrop",
    "ObjectMask",
    "SegmentedObject",
    "check_objects",
    "label_dtype",
    "label_values",
    "object_crop",
    "object_points",
    "objects_by_slice",
    "overlay_name",
]
