"""The volume model every reader returns: :class:`Series`, a lazily read stack of 2-D CT slices.

Coordinate convention (the same for every source kind):

* A slice is a float32 array of Hounsfield units, shape ``(H, W)``, indexed ``[y, x]``:
  ``y`` = row, ``x`` = column, pixel centres at integers. Extreme points and masks use this frame.
* ``slice_index`` is 0-based.

Per source kind:

* ``"dicom-series"`` (a folder): slice = ``ds.pixel_array`` (rows = y, columns = x) converted with
  that file's RescaleSlope/RescaleIntercept. Slices are sorted by position along the slice normal,
  ``ImagePositionPatient . (row_cosines x column_cosines)`` from ImageOrientationPatient, ascending
  (for the usual axial orientation ``[1,0,0, 0,1,0]`` that is feet -> head, slice 0 most inferior).
* ``"dicom-file"``: one file, one slice (``slice_index`` 0), converted the same way.
* ``"nifti"``: the volume is read as reoriented to **LPS** (the training loader's frame, defined
  once in :func:`cmdeploy.io.nifti.lps_orientation`): slice ``k`` is ``data_lps[:, :, k].T``, rows
  (y) running anterior -> posterior, columns (x) patient right -> left, slice 0 most inferior, the
  same picture as a DICOM axial slice, whatever the file's storage order (RAS, LPS, permuted axes).
  ``spacing_xy_mm`` is the voxel size along the LPS x and y axes. ``affine`` and
  ``volume_shape`` stay those of the original file; writers map back with
  :func:`cmdeploy.io.nifti.series_orientation`.
* ``"png"``: one 16-bit greyscale slice whose stored values are ``HU + 1024`` (so 0 = -1024 HU);
  8-bit and colour PNGs are refused. No spacing.
* ``"npy"``: float or integer HU, shape ``(H, W)`` (one slice) or ``(N, H, W)`` (slice k =
  ``arr[k]``). Memory-mapped; no spacing.

Slices are read on demand (:meth:`Series.slice_hu`, :meth:`Series.iter_slices`); a Series never
holds the whole volume, so reading 10 annotated slices of a 300-slice series reads 10 slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np

from cmdeploy.errors import InputError

SourceKind = Literal["dicom-series", "dicom-file", "nifti", "png", "npy"]


@dataclass(frozen=True, eq=False)
class Series:
    """A stack of 2-D CT slices read lazily from one source (see the module docstring).

    Attributes:
        kind: where the slices come from: "dicom-series", "dicom-file", "nifti", "png" or "npy".
        path: the file or folder that was opened.
        num_slices: number of slices N.
        shape: ``(H, W)`` = (rows, columns) of every slice.
        spacing_xy_mm: pixel spacing ``(sx, sy)`` in mm: sx between columns (x), sy between rows
            (y); None when the source has none (PNG, NPY, DICOM without PixelSpacing).
        slice_uids: SOPInstanceUID of each slice (DICOM), None elsewhere; length N.
        loader: ``loader(k) -> (H, W)`` array for slice k (use :meth:`slice_hu` instead).
        files: DICOM: the source file of each slice, in slice order (the SEG writer rereads them).
        positions_mm: DICOM: (N, 3) ImagePositionPatient of each slice, in slice order.
        orientation: DICOM: (6,) ImageOrientationPatient shared by all slices.
        series_uid: DICOM: SeriesInstanceUID (for writers; never put it in a message or log).
        affine: NIfTI: the (4, 4) voxel -> RAS+ mm affine of the original file (stored grid).
        volume_shape: NIfTI: the stored data shape ``(X, Y, Z)`` (i, j, k) of the file, not the
            LPS grid of the slices (``shape`` is that one's ``(Y, X)``).
    """

    kind: SourceKind
    path: Path
    num_slices: int
    shape: tuple[int, int]
    spacing_xy_mm: tuple[float, float] | None
    slice_uids: tuple[str | None, ...] = field(repr=False)
    loader: Callable[[int], np.ndarray] = field(repr=False)
    files: tuple[Path, ...] = field(default=(), repr=False)
    positions_mm: np.ndarray | None = field(default=None, repr=False)
    orientation: np.ndarray | None = field(default=None, repr=False)
    series_uid: str | None = field(default=None, repr=False)
    affine: np.ndarray | None = field(default=None, repr=False)
    volume_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.slice_uids) != self.num_slices:
            raise ValueError("slice_uids must have one entry per slice")
        if self.files and len(self.files) != self.num_slices:
            raise ValueError("files must have one entry per slice")

    def __len__(self) -> int:
        return self.num_slices

    @property
    def height(self) -> int:
        """Rows per slice (the y extent)."""
        return self.shape[0]

    @property
    def width(self) -> int:
        """Columns per slice (the x extent)."""
        return self.shape[1]

    @property
    def slice_normal(self) -> np.ndarray | None:
        """DICOM: unit normal ``row_cosines x column_cosines`` the slices are sorted along."""
        if self.orientation is None:
            return None
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)

    def slice_hu(self, index: int) -> np.ndarray:
        """Slice ``index`` (0-based) as a C-contiguous float32 (H, W) array of HU, ``[y, x]``.

        Raises IndexError for an index outside ``[0, N)`` and InputError when the slice's data
        cannot be read or does not have the series' shape.
        """
        k = int(index)
        if not 0 <= k < self.num_slices:
            raise IndexError(f"slice index {k} outside 0..{self.num_slices - 1} of '{self.path}'")
        arr = np.ascontiguousarray(self.loader(k), dtype=np.float32)
        if arr.shape != self.shape:
            where = self.files[k] if self.files else self.path
            raise InputError(
                f"'{where}': slice {k} has shape {arr.shape}, expected {self.shape} (rows, columns)"
            )
        return arr

    def iter_slices(self, indices: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(slice_index, float32 (H, W) HU)`` one slice at a time (all slices by default)."""
        for k in range(self.num_slices) if indices is None else indices:
            yield int(k), self.slice_hu(k)

    def read_slices(self, indices: Iterable[int]) -> np.ndarray:
        """The given slices stacked as float32 (len(indices), H, W) HU."""
        idx = [int(k) for k in indices]
        out = np.empty((len(idx), *self.shape), dtype=np.float32)
        for i, k in enumerate(idx):
            out[i] = self.slice_hu(k)
        return out

    @cached_property
    def _uid_to_index(self) -> dict[str, int]:
        return {uid: k for k, uid in enumerate(self.slice_uids) if uid}

    def slice_index_for_uid(self, uid: str) -> int | None:
        """The 0-based slice index whose SOPInstanceUID is ``uid``; None when no slice has it."""
        return self._uid_to_index.get(str(uid).strip())
