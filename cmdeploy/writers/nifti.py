"""NIfTI output: a label volume aligned voxel for voxel with the input, and a CT volume from DICOM.

Layout: masks are first stacked in slice layout, an ``(X, Y, Z) = (W, H, N)`` array with
``vol[:, :, k].T`` = slice ``k`` (:func:`label_volume`), so mask pixel ``[y, x]`` of slice ``k`` is
``vol[x, y, k]``. :func:`output_grid` then puts that array on the grid the file is written on.
Voxel values are the label values of :func:`cmdeploy.writers.label_values` (0 = background; uint8,
uint16 beyond 255 labels); where two objects of one slice overlap, the later object wins.

Geometry by input kind:

* ``nifti``: the reader shows LPS-reoriented slices (:mod:`cmdeploy.io.nifti`), so the slice-layout
  array is mapped back with the exact inverse (:meth:`~cmdeploy.io.nifti.LpsOrientation.to_stored`)
  onto the input's **own** voxel grid and written with the input's own affine and qform/sform codes
  (when the file can still be read; else code 1, scanner): the labels overlay the input voxel for
  voxel in any viewer, whatever its storage order.
* ``dicom-series`` / ``dicom-file``: :func:`dicom_affine` from ImagePositionPatient (IPP),
  ImageOrientationPatient (IOP), PixelSpacing and the slice positions. DICOM patient coordinates
  are LPS (x to the patient's Left, y to Posterior, z to Superior); NIfTI's are RAS, so the LPS
  affine is multiplied by ``diag(-1, -1, 1, 1)``. qform and sform code 1 (scanner).
* ``png`` / ``npy``: no geometry; the affine is ``diag(sx, sy, 1)`` (1 mm where unknown) with
  qform/sform code 0 (unknown).

nibabel is imported inside the functions; without it they raise :class:`InputError` naming the
``nifti`` extra.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.writers import SegmentedObject, check_objects, label_dtype, label_values
from cmdeploy.writers.atomic import atomic_path

if TYPE_CHECKING:
    from cmdeploy.io.series import Series

NIFTI_EXTRA_HINT = "pip install 'cmdeploy[nifti]'"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# relative deviation of a slice position from the uniform grid above which a warning is issued
SLICE_SPACING_RTOL = 0.01
_NIFTI_INTENT_LABEL = "label"


def _nibabel() -> Any:
    try:
        import nibabel
    except ImportError:
        raise InputError(f"writing NIfTI output needs nibabel: {NIFTI_EXTRA_HINT}") from None
    return nibabel


def dicom_affine(
    positions_mm: np.ndarray,
    orientation: np.ndarray,
    spacing_xy_mm: tuple[float, float] | None,
    *,
    slice_spacing_mm: float | None = None,
) -> np.ndarray:
    """(4, 4) voxel ``(i, j, k)`` -> RAS mm affine of a DICOM series in cmdeploy's slice order.

    ``i`` = column (x), ``j`` = row (y), ``k`` = slice index. In LPS:
    ``P(i, j, k) = IPP_0 + i * sx * row_cos + j * sy * col_cos + k * step`` with ``row_cos =
    IOP[:3]`` (direction of increasing column), ``col_cos = IOP[3:]``, ``(sx, sy)`` =
    ``spacing_xy_mm`` = (PixelSpacing[1], PixelSpacing[0]) and ``step = (IPP_{N-1} - IPP_0) / (N -
    1)`` (a sheared affine for tilted gantries). One slice: ``step = normal * slice_spacing_mm``
    (1 mm when None). Returns ``diag(-1, -1, 1, 1) @ affine_LPS``. Warns when the slices are not
    evenly spaced (the affine then describes their mean spacing).
    """
    pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1, 3)
    iop = np.asarray(orientation, dtype=np.float64).reshape(6)
    sx, sy = spacing_xy_mm if spacing_xy_mm is not None else (1.0, 1.0)
    row_cos, col_cos = iop[:3], iop[3:]
    n = pos.shape[0]
    if n == 0:
        raise ValueError("no slice positions")
    if n > 1:
        step = (pos[-1] - pos[0]) / (n - 1)
        grid = pos[0] + np.arange(n)[:, None] * step
        dev = np.abs(pos - grid).max()
        if dev > SLICE_SPACING_RTOL * np.linalg.norm(step) + 1e-3:
            warnings.warn(
                f"slices are not evenly spaced (up to {dev:.2f} mm off a uniform "
                f"{np.linalg.norm(step):.2f} mm grid); the NIfTI affine uses the mean spacing",
                stacklevel=2,
            )
    else:
        normal = np.cross(row_cos, col_cos)
        normal /= np.linalg.norm(normal)
        step = normal * (slice_spacing_mm if slice_spacing_mm else 1.0)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * sx
    lps[:3, 1] = col_cos * sy
    lps[:3, 2] = step
    lps[:3, 3] = pos[0]
    return LPS_TO_RAS @ lps


def _dicom_slice_spacing(series: Series) -> float | None:
    """SpacingBetweenSlices or SliceThickness of the first file (one-slice inputs), else None."""
    if not series.files:
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True)
        for key in ("SpacingBetweenSlices", "SliceThickness"):
            value = ds.get(key)
            if value is not None and float(value) > 0:
                return float(value)
    except Exception:  # unreadable or malformed: fall back to 1 mm
        return None
    return None


def series_geometry(series: Series) -> tuple[np.ndarray, int, int]:
    """(affine (4, 4) RAS, qform code, sform code) for a Series (see the module docstring).

    The affine applies to the array :func:`output_grid` returns (for NIfTI: the input's original
    affine and stored grid).
    """
    if series.kind == "nifti":
        if series.affine is None:
            raise ValueError(f"NIfTI series '{series.path}' has no affine")
        codes = (1, 1)
        try:
            hdr = _nibabel().load(str(series.path)).header
            q, s = int(hdr["qform_code"]), int(hdr["sform_code"])
            if q or s:
                codes = (q, s)
        except Exception:  # input moved or unreadable: keep the affine, code "scanner"
            pass
        return np.asarray(series.affine, dtype=np.float64), codes[0], codes[1]
    if series.kind in ("dicom-series", "dicom-file"):
        if series.positions_mm is None or series.orientation is None:
            raise InputError(
                f"'{series.path}': ImagePositionPatient/ImageOrientationPatient missing; "
                "cannot place the NIfTI output in patient space"
            )
        if series.spacing_xy_mm is None:
            warnings.warn("DICOM input has no PixelSpacing; the NIfTI affine assumes 1 mm", stacklevel=2)
        spacing = _dicom_slice_spacing(series) if series.num_slices == 1 else None
        aff = dicom_affine(
            series.positions_mm, series.orientation, series.spacing_xy_mm, slice_spacing_mm=spacing
        )
        return aff, 1, 1
    sx, sy = series.spacing_xy_mm if series.spacing_xy_mm is not None else (1.0, 1.0)
    return np.diag([sx, sy, 1.0, 1.0]), 0, 0


def output_grid(series: Series, slice_volume: np.ndarray) -> np.ndarray:
    """Map a slice-layout ``(W, H, N)`` array (``vol[:, :, k].T`` = slice k) onto the output grid.

    NIfTI input: the input's stored ``(X, Y, Z)`` grid (inverse of the reader's LPS reorientation).
    Other kinds: unchanged (their affine from :func:`series_geometry` is written for this layout).
    """
    vol = np.asarray(slice_volume)
    expected = (series.width, series.height, series.num_slices)
    if vol.shape[:3] != expected:
        raise ValueError(f"volume {vol.shape} does not match the series' slice layout {expected}")
    if series.kind != "nifti":
        return vol
    from cmdeploy.io.nifti import series_orientation

    return np.ascontiguousarray(series_orientation(series).to_stored(vol))


def label_volume(
    objects: Sequence[SegmentedObject],
    num_slices: int,
    shape: tuple[int, int],
    values: Mapping[str, int] | None = None,
) -> np.ndarray:
    """(X, Y, Z) = (W, H, N) label volume in slice layout (``vol[:, :, k].T`` is slice ``k``)."""
    masks = check_objects(objects, num_slices, shape)
    values = dict(values) if values is not None else label_values(objects)
    h, w = shape
    vol = np.zeros((w, h, num_slices), dtype=label_dtype(max(values.values(), default=0)))
    for obj, mc in zip(objects, masks, strict=True):
        label = str(obj.label)
        if label not in values:
            raise ValueError(f"label {label!r} has no value in `values`")
        vol[:, :, int(obj.slice_index)].T[mc.window][mc.crop] = values[label]  # views all the way
    return vol


def write_nifti_volume(
    path: str | Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    qform_code: int = 1,
    sform_code: int = 1,
    intent: str | None = None,
) -> Path:
    """Write an (X, Y, Z) array as NIfTI-1 (``.nii`` or ``.nii.gz``) atomically; returns ``path``."""
    nib = _nibabel()
    target = Path(path)
    if not target.name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI output '{target}' must end with .nii or .nii.gz")
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=int(qform_code))
    img.set_sform(affine, code=int(sform_code))
    img.header.set_xyzt_units("mm")
    img.header.set_slope_inter(1.0, 0.0)
    if intent is not None:
        img.header.set_intent(intent)
    with atomic_path(target) as tmp:
        nib.save(img, str(tmp))
    return target


def write_nifti_labels(
    path: str | Path,
    series: Series,
    objects: Sequence[SegmentedObject],
    *,
    values: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Write the objects' label volume aligned to ``series``; returns the label -> value map used.

    The volume is on :func:`output_grid` (NIfTI input: the input's own stored grid, a 2-D input
    giving ``Z = 1``) with the geometry of :func:`series_geometry`. NIfTI intent "label".
    """
    values = dict(values) if values is not None else label_values(objects)
    vol = output_grid(series, label_volume(objects, series.num_slices, series.shape, values))
    if series.kind == "nifti" and series.volume_shape is not None:
        if vol.shape != tuple(series.volume_shape):  # guards the axis convention against reader changes
            raise ValueError(f"label volume {vol.shape} does not match the input grid {series.volume_shape}")
    affine, qcode, scode = series_geometry(series)
    write_nifti_volume(path, vol, affine, qform_code=qcode, sform_code=scode, intent=_NIFTI_INTENT_LABEL)
    return values
