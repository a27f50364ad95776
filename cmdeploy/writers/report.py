"""``report.json``: what ran, on what kind of input, and what came out; no patient identifiers.

Contents (:func:`build_report`): cmdeploy/Python/NumPy/onnxruntime versions, the model (path,
sha256, spec), backend, input description (kind, slice count, slice shape ``[H, W]``, pixel spacing
``[sx, sy]`` mm; a DICOM series gets a ``series_id`` drawn at random for each run, so a report
cannot be linked to the SeriesInstanceUID by anyone, even holding the UID), the label -> value
map, one entry per object (label, slice index, area in pixels and mm², extreme points ``[x, y]``),
a timings dict (seconds) and the output file names.

Never written: patient names or IDs, DICOM UIDs, input paths (folder names often carry patient
names), dates from the input. :func:`validate_report` checks the structure and that none of the
DICOM identifier keywords appears as a key.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy import __version__
from cmdeploy.hashing import file_sha256
from cmdeploy.writers import SegmentedObject, label_values, object_points
from cmdeploy.writers.atomic import atomic_write_text

if TYPE_CHECKING:
    from cmdeploy.io.series import Series
    from cmdeploy.spec import ModelSpec

REPORT_FORMAT = "cmdeploy.report"
REPORT_FORMAT_VERSION = 1
# DICOM keywords that must never appear as keys of a report
FORBIDDEN_KEYS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "OtherPatientIDs",
        "AccessionNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "FrameOfReferenceUID",
        "InstitutionName",
        "ReferringPhysicianName",
        "StudyDate",
        "StudyID",
    }
)
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "format_version": int,
    "created_utc": str,
    "cmdeploy_version": str,
    "versions": dict,
    "model": dict,
    "backend": (str, type(None)),
    "input": dict,
    "labels": dict,
    "objects": list,
    "timings_s": dict,
    "outputs": list,
}
_OBJECT_KEYS = ("label", "label_value", "slice_index", "area_px", "area_mm2", "points")


def hash_identifier(value: str) -> str:
    """16 hex digits of SHA-256 of ``"cmdeploy-id:" + value``.

    Not used in reports: the salt is public, so anyone holding the UID can recompute it and link
    the report to the series. Reports use :func:`random_series_id`.
    """
    return hashlib.sha256(f"cmdeploy-id:{value}".encode()).hexdigest()[:16]


def random_series_id() -> str:
    """A fresh random id (16 hex digits) naming the input series within one run's report."""
    return secrets.token_hex(8)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_versions() -> dict[str, str | None]:
    """Versions of Python, NumPy and onnxruntime (None when not installed) and the platform."""
    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": _package_version("onnxruntime"),
        "platform": f"{platform.system()}-{platform.machine()}",
    }


def describe_input(series: Series) -> dict[str, Any]:
    """Kind, slice count, ``[H, W]``, ``[sx, sy]`` mm and a random per-run series id (DICOM); no
    path, no UIDs."""
    return {
        "kind": series.kind,
        "num_slices": int(series.num_slices),
        "shape_hw": [int(series.shape[0]), int(series.shape[1])],
        "spacing_xy_mm": None if series.spacing_xy_mm is None else [float(s) for s in series.spacing_xy_mm],
        "series_id": random_series_id() if series.kind.startswith("dicom") else None,
    }


def describe_objects(
    objects: Sequence[SegmentedObject],
    values: Mapping[str, int],
    spacing_xy_mm: tuple[float, float] | None,
) -> list[dict[str, Any]]:
    """One dict per object: label, label value, slice index, area (px, mm² or None), points."""
    pixel_mm2 = None if spacing_xy_mm is None else float(spacing_xy_mm[0]) * float(spacing_xy_mm[1])
    rows = []
    for obj in objects:
        if str(obj.label) not in values:
            raise ValueError(f"label {str(obj.label)!r} has no value in `values`")
        make = getattr(obj, "mask_crop", None)
        area = make().area if callable(make) else int(np.count_nonzero(obj.mask))
        pts = object_points(obj)
        rows.append(
            {
                "label": str(obj.label),
                "label_value": int(values[str(obj.label)]),
                "slice_index": int(obj.slice_index),
                "area_px": area,
                "area_mm2": None if pixel_mm2 is None else round(area * pixel_mm2, 3),
                "points": None if pts is None else np.round(pts, 2).tolist(),
            }
        )
    return rows


def build_report(
    *,
    objects: Sequence[SegmentedObject],
    series: Series | None = None,
    model_path: str | Path | None = None,
    model_sha256: str | None = None,
    spec: ModelSpec | None = None,
    backend: str | None = None,
    timings: Mapping[str, float] | None = None,
    values: Mapping[str, int] | None = None,
    outputs: Sequence[str | Path] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring).

    ``model_sha256`` is computed from ``model_path`` when not given. ``outputs`` are file names
    (give them relative to the output folder). ``extra`` is stored as is under ``"extra"``: keep
    patient identifiers out of it.
    """
    values = dict(values) if values is not None else label_values(objects)
    model: dict[str, Any] = {"path": None, "sha256": model_sha256, "spec": None}
    if model_path is not None:
        model["path"] = str(model_path)
        if model_sha256 is None and Path(model_path).is_file():
            model["sha256"] = file_sha256(model_path)
    if spec is not None:
        model["spec"] = spec.to_dict()
    report: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_FORMAT_VERSION,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cmdeploy_version": __version__,
        "versions": environment_versions(),
        "model": model,
        "backend": backend,
        "input": describe_input(series) if series is not None else {"kind": None},
        "labels": dict(values),
        "objects": describe_objects(objects, values, series.spacing_xy_mm if series else None),
        "timings_s": {str(k): round(float(v), 6) for k, v in (timings or {}).items()},
        "outputs": [str(o) for o in outputs],
    }
    if extra:
        report["extra"] = dict(extra)
    return report


def json_default(o: Any) -> Any:
    """The ``json.dumps`` fallback of every JSON file cmdeploy writes: NumPy scalars and arrays ->
    numbers and lists, non-finite floats -> null, anything else (paths, ...) -> its ``str``."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def report_json(report: Mapping[str, Any]) -> str:
    """Serialise a report (NumPy scalars/arrays and paths converted; NaN refused)."""
    return json.dumps(report, indent=2, allow_nan=False, default=json_default) + "\n"


def write_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """Validate and write ``report`` as JSON atomically; returns ``path``."""
    problems = validate_report(report)
    if problems:
        raise ValueError("invalid report: " + "; ".join(problems))
    return atomic_write_text(path, report_json(report))


def _forbidden_keys(obj: Any, where: str = "") -> list[str]:
    found = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if str(k) in FORBIDDEN_KEYS:
                found.append(f"{where}/{k}")
            found.extend(_forbidden_keys(v, f"{where}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found.extend(_forbidden_keys(v, f"{where}/{i}"))
    return found


def validate_report(report: Mapping[str, Any]) -> list[str]:
    """Problems with a report's structure (empty list when valid)."""
    problems = []
    for key, typ in _REQUIRED.items():
        if key not in report:
            problems.append(f"missing key {key!r}")
        elif not isinstance(report[key], typ):
            problems.append(f"{key!r} has type {type(report[key]).__name__}")
    for i, obj in enumerate(report.get("objects") or []):
        if not isinstance(obj, Mapping):
            problems.append(f"objects[{i}] is not an object")
            continue
        missing = [k for k in _OBJECT_KEYS if k not in obj]
        if missing:
            problems.append(f"objects[{i}] lacks {missing}")
    problems.extend(f"identifier key {p}" for p in _forbidden_keys(report))
    return problems
