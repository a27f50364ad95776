"""NIfTI CT reader (.nii / .nii.gz) -> :class:`~cmdeploy.io.series.Series` (kind "nifti").

Slice ``k`` is ``img.dataobj[:, :, k].T`` as float32 HU (scl_slope/scl_inter applied by nibabel):
rows (y) = NIfTI axis 1 (j), columns (x) = NIfTI axis 0 (i). So point ``(x, y)`` on slice ``k`` is
voxel ``(i, j, k) = (x, y, k)``. ``spacing_xy_mm = (zooms[0], zooms[1])``. A 2-D image is one slice;
a 4-D image is accepted only with a single volume (shape ``(X, Y, Z, 1)``). nibabel is imported
here, not at module import (``pip install 'cmdeploy[nifti]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io.series import Series

NIFTI_EXTRA_HINT = "pip install 'cmdeploy[nifti]'"


def load_nifti(path: str | Path) -> Any:
    """``nibabel.load(path)`` with clear InputErrors (nibabel missing, unreadable file)."""
    p = Path(path)
    try:
        import nibabel as nib
    except ImportError:
        raise InputError(f"reading NIfTI '{p}' needs nibabel: {NIFTI_EXTRA_HINT}") from None
    try:
        # keep .gz open: sequential slice reads then decompress once, not from the start each time
        return nib.load(str(p), keep_file_open=True if p.name.lower().endswith(".gz") else None)
    except Exception as exc:
        raise InputError(f"'{p}': cannot read as NIfTI ({type(exc).__name__}: {exc})") from None


def nifti_volume_shape(img: Any, path: Path) -> tuple[int, int, int]:
    """The (X, Y, Z) grid of ``img``: 2-D images get Z = 1; 4-D only with one volume."""
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 2:
        shape = (*shape, 1)
    elif len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(
            f"'{path}': NIfTI data has shape {tuple(img.shape)}; expected (X, Y, Z) "
            "(or (X, Y) / (X, Y, Z, 1))"
        )
    return shape  # type: ignore[return-value]


def nifti_slice(img: Any, k: int, path: Path) -> np.ndarray:
    """Raw (not cast) slice ``k`` of ``img`` as ``dataobj[:, :, k].T``: rows = j, columns = i."""
    try:
        ndim = len(img.shape)
        if ndim == 2:
            data = np.asanyarray(img.dataobj[:, :])
        elif ndim == 3:
            data = np.asanyarray(img.dataobj[:, :, k])
        else:
            data = np.asanyarray(img.dataobj[:, :, k, 0])
    except Exception as exc:
        raise InputError(
            f"'{path}': cannot read slice {k} ({type(exc).__name__}: {exc})"
        ) from None
    return data.T


def read_nifti(path: str | Path) -> Series:
    """Open a NIfTI CT volume as a Series; see the module docstring for the axes."""
    p = Path(path)
    img = load_nifti(p)
    shape = nifti_volume_shape(img, p)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf" or dtype.names is not None:
        raise InputError(f"'{p}': NIfTI data type {dtype} is not a real-valued scalar image")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:2])
    spacing = zooms if len(zooms) == 2 and all(z > 0 and np.isfinite(z) for z in zooms) else None

    def loader(k: int) -> np.ndarray:
        arr = nifti_slice(img, k, p).astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"'{p}': slice {k} contains NaN or inf")
        return arr

    return Series(
        kind="nifti",
        path=p,
        num_slices=shape[2],
        shape=(shape[1], shape[0]),
        spacing_xy_mm=spacing,  # type: ignore[arg-type]
        slice_uids=(None,) * shape[2],
        loader=loader,
        affine=np.asarray(img.affine, dtype=np.float64),
        volume_shape=shape,
    )
