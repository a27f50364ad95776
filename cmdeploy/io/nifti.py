"""NIfTI CT reader (.nii / .nii.gz) -> :class:`~cmdeploy.io.series.Series` (kind "nifti").

**Slice convention (the one place that defines it; training uses it too):** every NIfTI is read
as if reoriented to **LPS** (what ``nib.as_closest_canonical(img)`` followed by flipping axes 0 and
1 gives): LPS voxel ``(p, q, s)`` has ``p`` increasing towards the patient's Left, ``q`` towards
Posterior, ``s`` towards Superior. Slice ``k`` is ``data_lps[:, :, k].T`` as float32 HU
(scl_slope/scl_inter applied by nibabel), so rows (y) run anterior -> posterior, columns (x) run
patient right -> left and slice 0 is the most inferior: exactly how a DICOM axial image is
displayed and how :mod:`cmdeploy.io.dicom_series` orders slices.

The mapping from the stored voxel grid to LPS is :func:`lps_orientation` (nibabel's
``io_orientation`` of the file's affine, the closest axis-aligned orientation, then
``ornt_transform`` to LPS). It may flip and permute any axes, so a volume stored sagittally or
coronally is **fully reoriented** to axial slices, not refused. Reading stays lazy: slice ``k``
reads one plane of the stored array (the stored axis that maps to S/I, at the matching index),
then flips/transposes it in memory. :meth:`LpsOrientation.to_stored` is the exact inverse, used
by the NIfTI writer to put labels back on the input's own grid and affine.

Spacing: ``spacing_xy_mm`` = (column, row) mm = lengths of the affine columns of the stored axes
that become LPS axes 0 and 1. A 2-D image is one slice (third axis of length 1); a 4-D image is
accepted only with a single volume (shape ``(X, Y, Z, 1)``). nibabel is imported here, not at
module import (``pip install 'cmdeploy[nifti]'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io.series import Series

NIFTI_EXTRA_HINT = "pip install 'cmdeploy[nifti]'"
LPS_AXCODES = ("L", "P", "S")


def _nibabel(path: Path) -> Any:
    try:
        import nibabel
    except ImportError:
        raise InputError(f"reading NIfTI '{path}' needs nibabel: {NIFTI_EXTRA_HINT}") from None
    return nibabel


@dataclass(frozen=True, eq=False)
class LpsOrientation:
    """How a stored NIfTI voxel grid maps onto cmdeploy's LPS slice frame.

    Attributes:
        stored_shape: the stored grid ``(X, Y, Z)`` = (i, j, k) (2-D images: ``Z = 1``).
        ornt: (3, 2) nibabel orientation transform stored -> LPS: stored axis ``a`` becomes LPS
            axis ``ornt[a, 0]``, reversed when ``ornt[a, 1] == -1`` (``apply_orientation``).
    """

    stored_shape: tuple[int, int, int]
    ornt: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """The LPS grid ``(X, Y, Z)``: slices are ``(H, W) = (Y, X)``, ``Z`` of them."""
        out = [0, 0, 0]
        for a, (ax, _) in enumerate(self.ornt):
            out[int(ax)] = self.stored_shape[a]
        return out[0], out[1], out[2]

    @property
    def is_identity(self) -> bool:
        """True when the file is already stored LPS (no flip, no permutation)."""
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))

    def _stored_axis(self, lps_axis: int) -> int:
        return int(np.nonzero(self.ornt[:, 0] == lps_axis)[0][0])

    def slice_plane(self, k: int) -> tuple[int, int]:
        """``(stored axis, stored index)`` of the plane that holds LPS slice ``k``."""
        a = self._stored_axis(2)
        n = self.stored_shape[a]
        if not 0 <= k < n:
            raise IndexError(f"slice index {k} outside 0..{n - 1}")
        return a, (k if self.ornt[a, 1] > 0 else n - 1 - k)

    def to_lps(self, stored: np.ndarray) -> np.ndarray:
        """Stored-order array (first 3 axes spatial) -> LPS order (a view: flips and a transpose)."""
        from nibabel.orientations import apply_orientation

        return apply_orientation(np.asanyarray(stored), self.ornt)

    @property
    def inverse(self) -> np.ndarray:
        """(3, 2) orientation transform LPS -> stored: LPS axis ``ornt[a, 0]`` goes back to ``a``."""
        inv = np.empty_like(self.ornt)
        for a, (ax, flip) in enumerate(self.ornt):
            inv[int(ax)] = (a, flip)
        return inv

    def to_stored(self, lps: np.ndarray) -> np.ndarray:
        """LPS-order ``(X, Y, Z)`` array -> the stored grid (exact inverse of :meth:`to_lps`)."""
        from nibabel.orientations import apply_orientation

        arr = np.asanyarray(lps)
        if tuple(arr.shape[:3]) != self.shape:
            raise ValueError(f"LPS array shape {arr.shape[:3]} does not match the LPS grid {self.shape}")
        return apply_orientation(arr, self.inverse)

    def lps_affine(self, affine: np.ndarray) -> np.ndarray:
        """The (4, 4) voxel -> RAS+ mm affine of the LPS-ordered array."""
        from nibabel.orientations import inv_ornt_aff

        return np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(self.ornt, self.stored_shape)

    def spacing_xy_mm(self, affine: np.ndarray) -> tuple[float, float] | None:
        """(column, row) spacing in mm of the LPS slices; None when not positive and finite."""
        norms = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
        sx, sy = float(norms[self._stored_axis(0)]), float(norms[self._stored_axis(1)])
        ok = all(np.isfinite(v) and v > 0 for v in (sx, sy))
        return (sx, sy) if ok else None


def lps_orientation(
    affine: np.ndarray, stored_shape: tuple[int, ...], *, source: str | Path = "NIfTI"
) -> LpsOrientation:
    """The stored -> LPS mapping of a NIfTI with this (4, 4) voxel -> RAS+ affine and grid.

    ``stored_shape`` is ``(X, Y, Z)`` (a 2-D shape gets ``Z = 1``; extra trailing axes are
    ignored). Same result as training's ``as_closest_canonical`` + flip of axes 0 and 1. Raises
    InputError (naming ``source``) when the affine is not finite or leaves an axis without a
    direction (e.g. a zero column).
    """
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    aff = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in stored_shape)
    shape = (shape + (1, 1, 1))[:3] if len(shape) < 3 else shape[:3]
    if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
        raise InputError(f"'{source}': NIfTI affine is not a finite 4x4 matrix")
    try:
        ornt = io_orientation(aff)
    except Exception as exc:
        raise InputError(f"'{source}': cannot orient the NIfTI affine ({exc})") from None
    if np.isnan(ornt).any():
        raise InputError(
            f"'{source}': the NIfTI affine gives no direction for voxel axis "
            f"{int(np.nonzero(np.isnan(ornt[:, 0]))[0][0])} (degenerate affine); cannot orient it to LPS"
        )
    return LpsOrientation(shape, ornt_transform(ornt, axcodes2ornt(LPS_AXCODES)).astype(np.int64))  # type: ignore[arg-type]


def load_nifti(path: str | Path) -> Any:
    """``nibabel.load(path)`` with clear InputErrors (nibabel missing, unreadable file)."""
    p = Path(path)
    nib = _nibabel(p)
    try:
        # keep .gz open: sequential slice reads then decompress once, not from the start each time
        return nib.load(str(p), keep_file_open=True if p.name.lower().endswith(".gz") else None)
    except Exception as exc:
        raise InputError(f"'{p}': cannot read as NIfTI ({type(exc).__name__}: {exc})") from None


def nifti_volume_shape(img: Any, path: Path) -> tuple[int, int, int]:
    """The stored (X, Y, Z) grid of ``img``: 2-D images get Z = 1; 4-D only with one volume."""
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


def open_nifti(path: str | Path) -> tuple[Any, LpsOrientation]:
    """Load a NIfTI (lazily: header and proxy only) and its :func:`lps_orientation`."""
    p = Path(path)
    img = load_nifti(p)
    return img, lps_orientation(img.affine, nifti_volume_shape(img, p), source=p)


def nifti_slice(img: Any, orientation: LpsOrientation, k: int, path: Path) -> np.ndarray:
    """Raw (not cast) LPS slice ``k`` of ``img``, ``data_lps[:, :, k].T`` (rows = A->P, cols = R->L).

    Reads only the stored plane holding the slice (``img.dataobj`` slicing), then flips/transposes.
    """
    try:
        axis, idx = orientation.slice_plane(int(k))
        ndim = len(img.shape)
        if ndim == 2:
            block = np.asanyarray(img.dataobj[:, :])[:, :, None]
        else:
            index: list[Any] = [slice(None)] * 3
            index[axis] = slice(idx, idx + 1)
            if ndim == 4:
                index.append(0)
            block = np.asanyarray(img.dataobj[tuple(index)])
    except Exception as exc:
        raise InputError(f"'{path}': cannot read slice {k} ({type(exc).__name__}: {exc})") from None
    return orientation.to_lps(block)[:, :, 0].T


def read_lps_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float] | None, Any]:
    """Whole volume in LPS order ``(X, Y, Z)`` (a view of the stored data, scaling applied).

    Returns ``(data_lps, spacing_xy_mm, img)``; slice ``k`` is ``data_lps[:, :, k].T``. For
    training, which reads whole volumes; the runtime reads slice by slice with :func:`read_nifti`.
    """
    p = Path(path)
    img, orientation = open_nifti(p)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"'{p}': cannot read NIfTI data ({type(exc).__name__}: {exc})") from None
    data = data.reshape(orientation.stored_shape)
    return orientation.to_lps(data), orientation.spacing_xy_mm(img.affine), img


def read_nifti(path: str | Path) -> Series:
    """Open a NIfTI CT volume as a Series of LPS slices; see the module docstring for the axes."""
    p = Path(path)
    img, orientation = open_nifti(p)
    dtype = np.dtype(img.get_data_dtype())
    if dtype.kind not in "biuf" or dtype.names is not None:
        raise InputError(f"'{p}': NIfTI data type {dtype} is not a real-valued scalar image")
    x, y, z = orientation.shape

    def loader(k: int) -> np.ndarray:
        arr = nifti_slice(img, orientation, k, p).astype(np.float32)
        if not np.all(np.isfinite(arr)):
            raise InputError(f"'{p}': slice {k} contains NaN or inf")
        return arr

    return Series(
        kind="nifti",
        path=p,
        num_slices=z,
        shape=(y, x),
        spacing_xy_mm=orientation.spacing_xy_mm(img.affine),
        slice_uids=(None,) * z,
        loader=loader,
        affine=np.asarray(img.affine, dtype=np.float64),
        volume_shape=orientation.stored_shape,
    )


def series_orientation(series: Series) -> LpsOrientation:
    """The :class:`LpsOrientation` of a NIfTI Series (from its original affine and stored grid)."""
    if series.kind != "nifti" or series.affine is None or series.volume_shape is None:
        raise ValueError(f"'{series.path}' is not a NIfTI series with an affine and stored grid")
    return lps_orientation(series.affine, series.volume_shape, source=series.path)
