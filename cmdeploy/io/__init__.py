"""CT inputs: :func:`open_series` opens a DICOM folder/file, NIfTI, PNG or NPY as a lazy
:class:`Series` of float32 HU slices indexed ``[y, x]`` (see :mod:`cmdeploy.io.series` for the
slice order and axes of every source kind).
"""

from __future__ import annotations

from pathlib import Path

from cmdeploy.errors import InputError
from cmdeploy.io.dicom_series import read_dicom_file, read_dicom_series
from cmdeploy.io.images import read_npy, read_png
from cmdeploy.io.nifti import read_nifti
from cmdeploy.io.series import Series, SourceKind

__all__ = [
    "Series",
    "SourceKind",
    "open_series",
    "read_dicom_file",
    "read_dicom_series",
    "read_nifti",
    "read_npy",
    "read_png",
]


def open_series(path: str | Path, *, series_uid: str | None = None, allow_gaps: bool = False) -> Series:
    """Open a CT input as a lazily read :class:`Series`.

    ``path`` is a folder (a DICOM series, scanned recursively), a ``.nii``/``.nii.gz`` NIfTI, a
    16-bit ``.png`` (HU + 1024), a ``.npy`` of HU, or any other file read as one DICOM slice.
    ``series_uid`` picks one series when a folder holds several (DICOM only); ``allow_gaps``
    accepts a DICOM series with a gap in its slice positions (refused by default).
    Raises :class:`~cmdeploy.errors.InputError` naming the file and the problem.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"input '{p}' does not exist")
    if p.is_dir():
        return read_dicom_series(p, series_uid=series_uid, allow_gaps=allow_gaps)
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz", ".png", ".npy")) and series_uid is not None:
        raise InputError(f"'{p}': series_uid applies to DICOM inputs only")
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(p)
    if name.endswith(".png"):
        return read_png(p)
    if name.endswith(".npy"):
        return read_npy(p)
    return read_dicom_file(p, series_uid=series_uid)
