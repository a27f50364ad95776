"""Accepted objects per series, propagation to the next slice, and export.

An object is one accepted mask on one slice with its label and the four extreme points it was
segmented from (left, right, top, bottom; ``(x, y)``, x = column, y = row). Objects live in memory
for the life of the server; export writes them (all or nothing, each file to a temp name then
renamed, so a failed export leaves the previous files intact) into
``<output>/<series folder>/``: ``seg.dcm`` (DICOM SEG, DICOM input and highdicom only),
``labels.nii.gz`` (label map on the input's grid) and ``points.csv`` (the points CSV
``cmdeploy infer`` reads back to the same masks; a label that occurs twice on a slice is written
``label``, ``label#2``, ..., which ``infer`` merges back into ``label``).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.guidance import extreme_points
from cmdeploy.serve.catalog import CatalogEntry

FORMATS = ("dicom-seg", "nifti", "csv")
FILE_NAMES = {"dicom-seg": "seg.dcm", "nifti": "labels.nii.gz", "csv": "points.csv"}


@dataclass(eq=False)
class AcceptedObject:
    """One accepted object (``mask`` bool (H, W), ``points`` float32 (4, 2))."""

    id: int
    slice_index: int
    label: str
    points: np.ndarray
    mask: np.ndarray

    @property
    def area_px(self) -> int:
        return int(self.mask.sum())


def check_label(label: str) -> str:
    """A label as stored: stripped, 1-64 printable characters, no ``#`` (the CSV's piece marker)."""
    text = str(label).strip()
    if not 1 <= len(text) <= 64 or not text.isprintable() or "#" in text or "," in text:
        raise InputError("label must be 1-64 printable characters without '#' or ','")
    return text


def propagation_points(mask: np.ndarray) -> np.ndarray:
    """The four extreme points (left, right, top, bottom) of an accepted mask, proposed for the
    neighbouring slice: :func:`cmdeploy.guidance.extreme_points`, the runtime's one definition."""
    if not np.asarray(mask).any():
        raise InputError("the object's mask is empty: nothing to propagate")
    return extreme_points(mask)


class ObjectStore:
    """Accepted objects of every series, thread-safe; ids are unique per server."""

    def __init__(self) -> None:
        self._objects: dict[str, dict[int, AcceptedObject]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def list(self, sid: str, slice_index: int | None = None) -> list[AcceptedObject]:
        with self._lock:
            objs = list(self._objects.get(sid, {}).values())
        return [o for o in objs if slice_index is None or o.slice_index == slice_index]

    def get(self, sid: str, oid: int) -> AcceptedObject:
        with self._lock:
            return self._objects.get(sid, {})[oid]

    def put(self, sid: str, obj: AcceptedObject) -> AcceptedObject:
        """Add ``obj`` (``id`` 0 gives it a new id) or replace the object with its id."""
        with self._lock:
            if obj.id == 0:
                obj.id = next(self._ids)
            elif obj.id not in self._objects.get(sid, {}):
                raise KeyError(obj.id)
            self._objects.setdefault(sid, {})[obj.id] = obj
        return obj

    def delete(self, sid: str, oid: int) -> None:
        with self._lock:
            del self._objects.get(sid, {})[oid]

    def labels(self) -> list[str]:
        """Every label used so far (all series), most recent first."""
        with self._lock:
            objs = sorted((o for per in self._objects.values() for o in per.values()), key=lambda o: -o.id)
        return list(dict.fromkeys(o.label for o in objs))


def csv_rows(objects: list[AcceptedObject]):
    """Points-CSV rows of the objects in slice order; repeated (slice, label) become ``label#k``."""
    from cmdeploy.points_csv import PointsRow

    rows, seen = [], {}
    for o in sorted(objects, key=lambda o: (o.slice_index, o.id)):
        k = seen[(o.slice_index, o.label)] = seen.get((o.slice_index, o.label), 0) + 1
        name = o.label if k == 1 else f"{o.label}#{k}"
        rows.append(PointsRow(o.slice_index, name, np.asarray(o.points, np.float32)))
    return rows


def export_formats(entry: CatalogEntry, requested: list[str] | None) -> list[str]:
    """The formats to write: ``requested`` checked, or every one that applies to this series."""
    import importlib.util

    is_dicom = entry.series.kind.startswith("dicom")
    has_hd = importlib.util.find_spec("highdicom") is not None
    has_nib = importlib.util.find_spec("nibabel") is not None
    if requested is None:
        return [
            f for f in FORMATS if (f != "dicom-seg" or (is_dicom and has_hd)) and (f != "nifti" or has_nib)
        ]
    out = []
    for f in requested:
        if f not in FORMATS:
            raise InputError(f"unknown export format {f!r}; choose from {', '.join(FORMATS)}")
        if f == "dicom-seg" and not is_dicom:
            raise InputError("a DICOM SEG needs a DICOM series")
        if f == "dicom-seg" and not has_hd:
            raise InputError("a DICOM SEG needs highdicom: pip install 'cmdeploy[dicom]'")
        if f == "nifti" and not has_nib:
            raise InputError("a NIfTI export needs nibabel: pip install 'cmdeploy[nifti]'")
        if f not in out:
            out.append(f)
    return out


def export(
    entry: CatalogEntry, objects: list[AcceptedObject], output: Path, formats: list[str]
) -> list[Path]:
    """Write the objects of one series in ``formats`` under ``output``; all files or none.

    Returns the written paths. Raises :class:`InputError` when there is nothing to write.
    """
    from cmdeploy.points_csv import write_points_csv
    from cmdeploy.writers import ObjectMask, label_values
    from cmdeploy.writers.atomic import OutputDir

    objects = [o for o in objects if o.mask.any()]
    if not objects:
        raise InputError("no accepted objects with a non-empty mask to export")
    masks = [
        ObjectMask(o.slice_index, o.label, o.mask, o.points) for o in sorted(objects, key=lambda o: o.id)
    ]
    values = label_values(masks)
    out = OutputDir(Path(output) / entry.slug, overwrite=True)
    with out:
        if "dicom-seg" in formats:
            from cmdeploy.writers.dicom_seg import write_dicom_seg

            with out.stage(FILE_NAMES["dicom-seg"]) as tmp:
                write_dicom_seg(tmp, entry.series, masks, values=values)
        if "nifti" in formats:
            from cmdeploy.writers.nifti import write_nifti_labels

            with out.stage(FILE_NAMES["nifti"]) as tmp:
                write_nifti_labels(tmp, entry.series, masks, values=values)
        if "csv" in formats:
            with out.stage(FILE_NAMES["csv"]) as tmp:
                write_points_csv(tmp, csv_rows(objects))
    return list(out.written)
