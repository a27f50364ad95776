"""Extreme points from a label volume: one points-CSV row per connected object per slice.

Label volumes are read like CT (see :mod:`cmdeploy.io.series`): a NIfTI is read reoriented to LPS
by :mod:`cmdeploy.io.nifti`, slice ``k`` = ``data_lps[:, :, k].T`` (rows anterior -> posterior,
columns patient right -> left), so a CSV made from a label NIfTI matches the image NIfTI read by
``infer`` whatever either file's storage order; a ``.npy`` is ``(H, W)`` or ``(N, H, W)`` with
slice ``k`` = ``arr[k]``. Values are integer label ids, 0 = background.

On every slice, each label id is split into connected components (8-connectivity by default:
pixels touching by an edge or a corner; 4 uses edges only), components smaller than ``min_size``
pixels (default 25) are dropped, and so are components whose four extreme points coincide (one
pixel). ``DEFAULT_MIN_SIZE``/``DEFAULT_CONNECTIVITY`` are the one definition of an object shared by
training, evaluation and ``points-from-labels``. The
extreme points come from :func:`cmdeploy.guidance.extreme_points`. Names come from an optional
id -> name map (default: the id as text). The largest component of a label on a slice is named
``name``, the others ``name#2``, ``name#3``, ... in decreasing size, because the points CSV allows
one (slice, label) pair per row; ``infer`` merges ``#k`` pieces back into ``name``.

:func:`label_components` is the one enumeration of objects (used by ``points-from-labels``,
evaluation and calibration). Connected components are computed in pure NumPy (no scipy): a
vectorised union-find over the edges between equal neighbouring pixels (hook every root to the
smaller root across an edge, then pointer-jump to full compression; repeat until no edge joins two
trees).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmdeploy.annotator import ClickModel, annotator_points
from cmdeploy.errors import InputError
from cmdeploy.guidance import extreme_points
from cmdeploy.points_csv import PointsRow, piece_label

DEFAULT_MIN_SIZE = 25  # pixels; one definition of "an object" for training, evaluation and CSVs
DEFAULT_CONNECTIVITY = 8


def _edges(labels: np.ndarray, connectivity: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat index pairs (u, v) of neighbouring pixels with the same non-zero label."""
    h, w = labels.shape
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    shifts = [(slice(None), slice(None, -1), slice(None), slice(1, None)),  # right
              (slice(None, -1), slice(None), slice(1, None), slice(None))]  # down
    if connectivity == 8:
        shifts += [(slice(None, -1), slice(None, -1), slice(1, None), slice(1, None)),  # down-right
                   (slice(None, -1), slice(1, None), slice(1, None), slice(None, -1))]  # down-left
    us, vs = [], []
    for ay, ax, by, bx in shifts:
        a, b = labels[ay, ax], labels[by, bx]
        same = (a == b) & (a != 0)
        us.append(idx[ay, ax][same])
        vs.append(idx[by, bx][same])
    return np.concatenate(us), np.concatenate(vs)


def connected_components(labels: np.ndarray, *, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Label the connected regions of equal non-zero values in a 2-D integer array.

    Returns ``(components, n)``: int32 (H, W) with 0 on background and 1..n numbered in raster
    order of each component's first pixel (like ``scipy.ndimage.label`` per value).
    ``connectivity`` is 4 (edge neighbours) or 8 (edges and corners).
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {lab.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = lab.shape
    parent = np.arange(h * w, dtype=np.int64)
    u, v = _edges(lab, connectivity)
    while u.size:
        ru, rv = parent[u], parent[v]
        cross = ru != rv
        if not cross.any():
            break
        u, v, ru, rv = u[cross], v[cross], ru[cross], rv[cross]  # settled edges never split
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))  # roots hook to smaller
        while True:  # pointer jumping: every pixel points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    fg = lab.ravel() != 0
    roots = parent[fg]
    uniq, inv = np.unique(roots, return_inverse=True)  # roots are the smallest index = first pixel
    comp = np.zeros(h * w, dtype=np.int32)
    comp[fg] = inv.astype(np.int32) + 1
    return comp.reshape(h, w), int(uniq.size)


@dataclass(frozen=True, eq=False)
class Component:
    """One object: a connected component of one label id on one (H, W) slice.

    Attributes:
        label_id: its value in the label slice.
        piece: 1 for the label's largest component on the slice, 2 for the next, ... (ties: raster
            order of the first pixel).
        area_px: size in pixels.
        first_pixel: flat raster index ``y * W + x`` of its first pixel (sort key for raster order).
        bbox: ``(y0, y1, x0, x1)`` inclusive bounding box in slice pixels.
        crop: bool ``(y1 - y0 + 1, x1 - x0 + 1)`` mask of the component inside ``bbox``.
        shape: ``(H, W)`` of the slice.
    """

    label_id: int
    piece: int
    area_px: int
    first_pixel: int
    bbox: tuple[int, int, int, int]
    crop: np.ndarray
    shape: tuple[int, int]

    def mask(self) -> np.ndarray:
        """The component as a bool (H, W) slice mask."""
        out = np.zeros(self.shape, dtype=bool)
        y0, y1, x0, x1 = self.bbox
        out[y0 : y1 + 1, x0 : x1 + 1] = self.crop
        return out


def label_components(
    labels: np.ndarray,
    *,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = DEFAULT_CONNECTIVITY,
    label_ids: Collection[int] | None = None,
) -> list[Component]:
    """The objects of one (H, W) integer label slice (0 = background): the one definition.

    Each label id (only ``label_ids`` when given) is split into ``connectivity``-connected
    components; components under ``min_size`` pixels and single pixels (no extent) are dropped.
    Ordered by label id, then size (largest first), then raster order of the first pixel, i.e. by
    ``(label_id, piece)``.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"label slice must be 2-D (H, W), got shape {lab.shape}")
    if label_ids is not None:
        lab = np.where(np.isin(lab, np.fromiter(label_ids, dtype=np.int64)), lab, 0)
    if not lab.any():
        return []
    comp, n = connected_components(lab, connectivity=connectivity)
    h, w = lab.shape
    ys, xs = np.nonzero(comp)
    c = comp[ys, xs]
    sizes = np.bincount(c, minlength=n + 1)
    big = np.iinfo(np.int64).max
    ymin, xmin, first = np.full(n + 1, big), np.full(n + 1, big), np.full(n + 1, big)
    ymax, xmax = np.full(n + 1, -1), np.full(n + 1, -1)
    np.minimum.at(ymin, c, ys)
    np.minimum.at(xmin, c, xs)
    np.maximum.at(ymax, c, ys)
    np.maximum.at(xmax, c, xs)
    np.minimum.at(first, c, ys.astype(np.int64) * w + xs)
    comp_label = np.zeros(n + 1, dtype=np.int64)
    comp_label[c] = lab[ys, xs]
    ids = np.arange(1, n + 1)
    keep = ids[sizes[1:] >= max(int(min_size), 2)]  # a single pixel has no extent
    keep = keep[np.lexsort((keep, -sizes[keep], comp_label[keep]))]  # ids are in raster order
    out: list[Component] = []
    piece: dict[int, int] = {}
    for k in keep:
        y0, y1, x0, x1 = int(ymin[k]), int(ymax[k]), int(xmin[k]), int(xmax[k])
        lid = int(comp_label[k])
        piece[lid] = piece.get(lid, 0) + 1
        out.append(
            Component(
                label_id=lid, piece=piece[lid], area_px=int(sizes[k]), first_pixel=int(first[k]),
                bbox=(y0, y1, x0, x1), crop=comp[y0 : y1 + 1, x0 : x1 + 1] == k, shape=(h, w),
            )
        )
    return out


def points_from_label_slice(
    labels: np.ndarray,
    *,
    slice_index: int = 0,
    names: Mapping[int, str] | None = None,
    label_ids: Collection[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = DEFAULT_CONNECTIVITY,
    simulate: ClickModel | None = None,
    spacing_xy: tuple[float, float] | None = None,
    seed: int = 0,
) -> list[PointsRow]:
    """Rows for every object (:func:`label_components`) of one (H, W) label slice, in its order.

    ``simulate``: draw each object's points from the simulated annotator (:mod:`cmdeploy.annotator`,
    hand error in mm through ``spacing_xy``) with a generator seeded by ``(seed, slice, label id,
    piece)``, instead of the exact extreme points. Objects one pixel wide or high (a zero-width or
    zero-height box of extreme points) are left out: the points CSV refuses them, as they have no
    real extent.
    """
    rows: list[PointsRow] = []
    for cp in label_components(labels, min_size=min_size, connectivity=connectivity, label_ids=label_ids):
        y0, y1, x0, x1 = cp.bbox
        if y0 == y1 or x0 == x1:
            continue
        if simulate is not None:
            rng = np.random.default_rng([int(seed), int(slice_index), cp.label_id, cp.piece])
            pts = annotator_points(cp.mask(), spacing_xy, simulate, rng)
        else:
            pts = extreme_points(cp.crop) + np.array([x0, y0], dtype=np.float32)
        name = names.get(cp.label_id, str(cp.label_id)) if names is not None else str(cp.label_id)
        rows.append(PointsRow(int(slice_index), piece_label(name, cp.piece), pts.astype(np.float32)))
    return rows


def points_from_label_volume(
    slices: np.ndarray | Iterable[tuple[int, np.ndarray]],
    *,
    names: Mapping[int, str] | None = None,
    label_ids: Collection[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = DEFAULT_CONNECTIVITY,
    on_slice: Callable[[int], None] | None = None,
    simulate: ClickModel | None = None,
    spacing_xy: tuple[float, float] | None = None,
    seed: int = 0,
) -> list[PointsRow]:
    """Rows for every kept component on every slice.

    ``slices`` is an (N, H, W) integer array (slice k = ``slices[k]``) or an iterable of
    ``(slice_index, (H, W) array)`` such as :meth:`LabelVolume.iter_slices`. ``on_slice(k)`` is
    called after each slice (for progress bars). ``simulate``, ``spacing_xy``, ``seed``: see
    :func:`points_from_label_slice`.
    """
    if isinstance(slices, np.ndarray):
        if slices.ndim != 3:
            raise ValueError(f"label volume must be (N, H, W), got shape {slices.shape}")
        items: Iterable[tuple[int, np.ndarray]] = enumerate(slices)
    else:
        items = slices
    rows: list[PointsRow] = []
    for k, lab in items:
        rows.extend(
            points_from_label_slice(
                lab, slice_index=k, names=names, label_ids=label_ids,
                min_size=min_size, connectivity=connectivity, simulate=simulate,
                spacing_xy=spacing_xy, seed=seed,
            )
        )
        if on_slice is not None:
            on_slice(k)
    return rows


@dataclass(frozen=True, eq=False)
class LabelVolume:
    """A lazily read label volume: ``num_slices`` slices of ``shape`` (H, W) integer ids.

    ``spacing_xy_mm``: (column, row) pixel spacing in mm, None when unknown (``.npy``).
    """

    path: Path
    num_slices: int
    shape: tuple[int, int]
    loader: Callable[[int], np.ndarray] = field(repr=False)
    spacing_xy_mm: tuple[float, float] | None = None

    def __len__(self) -> int:
        return self.num_slices

    def slice(self, k: int) -> np.ndarray:
        """Slice k as int64 (H, W) ids; InputError for non-integer or negative values."""
        raw = np.asarray(self.loader(int(k)))
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
                raise InputError(f"'{self.path}': slice {k} has non-integer label values")
        elif raw.dtype.kind not in "biu":
            raise InputError(f"'{self.path}': label data type {raw.dtype} is not integer")
        out = raw.astype(np.int64)
        if out.size and out.min() < 0:
            raise InputError(f"'{self.path}': slice {k} has negative label values")
        return out

    def iter_slices(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(k, (H, W) int64 ids)`` for every slice."""
        for k in range(self.num_slices):
            yield k, self.slice(k)


def open_label_volume(path: str | Path) -> LabelVolume:
    """Open a NIfTI (.nii/.nii.gz) or .npy label volume with the same slice convention as CT."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"label volume '{p}' does not exist or is not a file")
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        from cmdeploy.io.nifti import nifti_slice, open_nifti

        img, orientation = open_nifti(p)
        x, y, z = orientation.shape
        return LabelVolume(
            p, z, (y, x), lambda k: nifti_slice(img, orientation, k, p),
            orientation.spacing_xy_mm(img.affine),
        )
    if name.endswith(".npy"):
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputError(f"'{p}': cannot read as .npy ({type(exc).__name__})") from None
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or min(arr.shape) < 1:
            raise InputError(f"'{p}': label array shape {arr.shape} is not (H, W) or (N, H, W)")
        vol = arr
        return LabelVolume(p, int(vol.shape[0]), (int(vol.shape[1]), int(vol.shape[2])),
                           lambda k: vol[k])
    raise InputError(f"label volume '{p}': expected a .nii, .nii.gz or .npy file")


def resolve_label_ids(selection: Iterable[str], names: Mapping[int, str] | None) -> set[int]:
    """Turn label names or numeric ids (e.g. from ``--labels liver,52``) into ids."""
    by_name = {v.lower(): k for k, v in (names or {}).items()}
    ids: set[int] = set()
    unknown = []
    for item in (s.strip() for s in selection):
        if not item:
            continue
        if item.lower() in by_name:
            ids.add(by_name[item.lower()])
        elif item.isdigit():
            ids.add(int(item))
        else:
            unknown.append(item)
    if unknown:
        where = "the names file" if names else "no names file given (use ids or --names)"
        raise InputError(f"unknown label(s) {', '.join(map(repr, unknown))}: not in {where}")
    return ids
