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


def object_points(obj: Any) -> np.ndarray | None:
    """The object's (4, 2) float64 extreme points ``(x, y)``, or None when it has none."""
    pts = getattr(obj, "points", None)
    if pts is None:
        return None
    arr = np.asarray(pts, dtype=np.float64)
    if arr.shape != (4, 2):
        raise ValueError(f"object points must have shape (4, 2), got {arr.shape}")
    return arr


def check_objects(
    objects: Sequence[SegmentedObject], num_slices: int | None, shape: tuple[int, int]
) -> list[np.ndarray]:
    """Validate objects against a Series of ``num_slices`` slices of ``shape`` = (H, W).

    ``num_slices`` None skips the slice-index check (objects of one slice).
    Returns the masks as bool arrays. Raises ``ValueError`` naming the first bad object (its
    position in ``objects``, slice index and label).
    """
    masks = []
    for i, obj in enumerate(objects):
        k = int(obj.slice_index)
        what = f"object {i} (slice {k}, label {str(obj.label)!r})"
        if num_slices is not None and not 0 <= k < num_slices:
            raise ValueError(f"{what}: slice index outside 0..{num_slices - 1}")
        if not str(obj.label).strip():
            raise ValueError(f"{what}: empty label")
        mask = np.asarray(obj.mask)
        if mask.shape != tuple(shape):
            raise ValueError(f"{what}: mask shape {mask.shape} != slice shape {tuple(shape)} (H, W)")
        masks.append(mask.astype(bool, copy=False))
    return masks


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
    "ObjectMask",
    "SegmentedObject",
    "check_objects",
    "label_dtype",
    "label_values",
    "object_points",
    "objects_by_slice",
    "overlay_name",
]
