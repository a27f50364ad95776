"""Real CT objects for INT8 calibration and the accuracy gate: (slice, mask, extreme points).

Sources (:func:`load_source`):

* **labelled NIfTI cases** - any layout of :mod:`cmdeploy.io.cases` (e.g. ct-organs'
  ``<root>/<case>/image.nii.gz`` + ``labels.nii.gz``) or one such case folder. Volumes are read in
  the LPS frame of :func:`cmdeploy.io.nifti.read_lps_volume` (the one NIfTI convention of training
  and runtime): rows (y) run anterior -> posterior, columns (x) patient right -> left. An object is
  one 8-connected component of one label on one axial slice with at least ``min_pixels`` pixels;
  its reference mask is that component.
* **unlabelled CT** (a DICOM folder or file, or a NIfTI/NPY volume, via
  :func:`cmdeploy.io.open_series`): objects are the 8-connected components of ``HU >= 200`` (bone
  and contrast-filled vessels) - real anatomy with a real extent, good for calibration ranges;
  their masks are a threshold pseudo-reference.

Extreme points come from :func:`cmdeploy.guidance.extreme_points` (left, right, top, bottom, each
``(x = column, y = row)`` in slice pixels). Objects are drawn at random with a seed; the same
source, seed and count always give the same objects. Only torch-free code: numpy, nibabel
(NIfTI) and the cmdeploy runtime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.guidance import extreme_points
from cmdeploy.io.cases import discover_cases
from cmdeploy.io.nifti import read_lps_volume
from cmdeploy.labels_to_points import DEFAULT_MIN_SIZE, label_components

DEFAULT_MIN_PIXELS = DEFAULT_MIN_SIZE  # the shared definition of an object
THRESHOLD_HU = 200.0  # unlabelled CT: objects are connected regions at or above this


@dataclass(frozen=True, eq=False)
class SliceObject:
    """One object on one slice.

    Attributes:
        source: ``"<case>:z<k>:label<id>#<n>"`` (no patient identifiers).
        case: the case (volume) it comes from.
        slice_index: axial slice index k.
        label: label id (0 for threshold objects of unlabelled CT).
        slice_hu: (H, W) float32 HU, indexed ``[y, x]`` (shared between objects of a slice).
        mask: (H, W) bool reference mask of the object.
        points: (4, 2) float32 extreme points left, right, top, bottom, each (x, y).
    """

    source: str
    case: str
    slice_index: int
    label: int
    slice_hu: np.ndarray
    mask: np.ndarray
    points: np.ndarray


@dataclass(frozen=True, eq=False)
class CaseVolume:
    """A loaded volume: ``image`` (Z, H, W) float32 HU; ``labels`` (Z, H, W) int ids or None."""

    name: str
    image: np.ndarray
    labels: np.ndarray | None

    @property
    def labelled(self) -> bool:
        return self.labels is not None


# ------------------------------------------------------------------------------ reading
def _load_lps(path: Path) -> np.ndarray:
    """A 3-D NIfTI as a (Z, H, W) array of LPS slices: the runtime's one NIfTI convention."""
    data, _, _ = read_lps_volume(path)
    return np.ascontiguousarray(data.transpose(2, 1, 0))


def load_case(name: str, image_path: Path, label_path: Path) -> CaseVolume:
    """Load a labelled NIfTI case (both volumes on the same grid) in LPS slice order."""
    image = _load_lps(image_path).astype(np.float32, copy=False)
    labels = _load_lps(label_path)
    if image.shape != labels.shape:
        raise InputError(
            f"case {name!r}: image shape {image.shape} and label shape {labels.shape} differ "
            "(need the same grid)"
        )
    if labels.dtype.kind == "f":
        labels = np.rint(labels)
    return CaseVolume(name, image, labels.astype(np.int32))


def load_unlabelled(path: str | Path) -> CaseVolume:
    """A CT series without labels (DICOM folder/file, NIfTI, NPY) as a CaseVolume.

    The case name is the source kind (``"dicom-series"``, ``"nifti"``, ...), never the path, which
    may hold patient identifiers.
    """
    from cmdeploy.io import open_series

    series = open_series(path)
    image = series.read_slices(range(series.num_slices))
    return CaseVolume(series.kind, image, None)


# ------------------------------------------------------------------------------ objects
def slice_objects(case: CaseVolume, k: int, *, min_pixels: int = DEFAULT_MIN_PIXELS) -> list[SliceObject]:
    """Every object of slice ``k`` (labelled: per label component; else HU-threshold components).

    Objects are :func:`cmdeploy.labels_to_points.label_components`, here in raster order of their
    first pixel (the order fixed calibration sets and fingerprints were drawn in).
    """
    hu = case.image[k]
    lab = case.labels[k] if case.labels is not None else (hu >= THRESHOLD_HU).astype(np.int32)
    out = []
    seen: dict[int, int] = {}
    for cp in sorted(label_components(lab, min_size=min_pixels), key=lambda c: c.first_pixel):
        label = cp.label_id if case.labels is not None else 0
        mask = cp.mask()
        seen[label] = seen.get(label, 0) + 1  # numbered in raster order of the first pixel
        out.append(
            SliceObject(
                source=f"{case.name}:z{k}:label{label}#{seen[label]}",
                case=case.name,
                slice_index=int(k),
                label=label,
                slice_hu=hu,
                mask=mask,
                points=extreme_points(mask),
            )
        )
    return out


def candidate_slices(case: CaseVolume) -> np.ndarray:
    """Slice indices that can hold objects (labelled: any label; else any pixel >= threshold)."""
    z = case.image.shape[0]
    src = case.labels if case.labels is not None else case.image >= THRESHOLD_HU
    return np.nonzero(np.asarray(src).reshape(z, -1).any(axis=1))[0]


def all_objects(cases: Sequence[CaseVolume], *, min_pixels: int = DEFAULT_MIN_PIXELS) -> list[SliceObject]:
    """Every object of every candidate slice of ``cases``, in (case, slice, component) order."""
    pool: list[SliceObject] = []
    for case in cases:
        for k in candidate_slices(case):
            pool.extend(slice_objects(case, int(k), min_pixels=min_pixels))
    return pool


def draw(pool: Sequence[SliceObject], n: int, *, seed: int = 0) -> list[SliceObject]:
    """``n`` objects of ``pool`` drawn without replacement (seeded), kept in pool order."""
    if n < 1:
        raise ValueError(f"number of objects must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(pool), size=min(n, len(pool)), replace=False))
    return [pool[i] for i in pick]


def sample_objects(
    cases: Sequence[CaseVolume], n: int, *, seed: int = 0, min_pixels: int = DEFAULT_MIN_PIXELS
) -> list[SliceObject]:
    """``n`` objects drawn without replacement (seeded) from all objects of ``cases``.

    Fewer than ``n`` objects -> all of them. The same cases, ``n`` and seed give the same objects.
    """
    pool = all_objects(cases, min_pixels=min_pixels)
    if not pool:
        names = ", ".join(c.name for c in cases)
        raise InputError(f"no objects with >= {min_pixels} pixels found in {names}")
    return draw(pool, n, seed=seed)


def split_one(
    case: CaseVolume,
    num_calib: int,
    num_eval: int,
    *,
    seed: int = 0,
    min_pixels: int = DEFAULT_MIN_PIXELS,
) -> tuple[list[SliceObject], list[SliceObject], str]:
    """Calibration and evaluation objects from one volume: even slices vs odd slices, or - when
    the objects sit on a single slice - alternate objects. Returns (calib, eval, note)."""
    pool = all_objects([case], min_pixels=min_pixels)
    if len(pool) < 2:
        raise InputError(
            f"{case.name}: need at least 2 objects with >= {min_pixels} pixels, found {len(pool)}"
        )
    even = [o for o in pool if o.slice_index % 2 == 0]
    odd = [o for o in pool if o.slice_index % 2 == 1]
    if even and odd:
        how = "even slices calibrate, odd slices evaluate"
    else:
        even, odd = pool[0::2], pool[1::2]
        how = "alternate objects of one slice calibrate / evaluate"
    return draw(even, num_calib, seed=seed), draw(odd, num_eval, seed=seed), f"{how} (same patient)"


def fingerprint(objects: Sequence[SliceObject]) -> str:
    """SHA-256 over the objects' sources, points, masks and slice data (cache keys)."""
    h = hashlib.sha256()
    seen_slices: set[int] = set()
    for o in objects:
        h.update(o.source.encode())
        h.update(np.ascontiguousarray(o.points, dtype=np.float32).tobytes())
        h.update(np.packbits(o.mask).tobytes())
        if id(o.slice_hu) not in seen_slices:
            seen_slices.add(id(o.slice_hu))
            h.update(np.ascontiguousarray(o.slice_hu, dtype=np.float32).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------ CLI-level selection
@dataclass(frozen=True)
class DataSplit:
    """Calibration and evaluation objects and where they came from."""

    calibration: list[SliceObject]
    evaluation: list[SliceObject]
    calib_cases: list[str]
    eval_cases: list[str]
    note: str = ""


def _split_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    return names or None


def load_split(
    path: str | Path,
    *,
    num_calib: int,
    num_eval: int,
    seed: int = 0,
    calib_cases: str | None = None,
    eval_cases: str | None = None,
    min_pixels: int = DEFAULT_MIN_PIXELS,
) -> DataSplit:
    """Calibration and held-out evaluation objects from ``path``.

    Labelled NIfTI cases: ``calib_cases`` / ``eval_cases`` are comma-separated case names; by
    default the last case (sorted by name) is held out for evaluation and the others calibrate.
    The two sets must not share a case (patient-level hold-out). With a single case or unlabelled
    CT, :func:`split_one` splits by slice parity (noted in :attr:`DataSplit.note`).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"--data '{p}' does not exist")
    cases = {c.name: (c.image, c.labels) for c in discover_cases(p)}
    if not cases:
        if calib_cases or eval_cases:
            raise InputError(f"--data '{p}' is not a folder of labelled NIfTI cases; --*-cases need one")
        vol = load_unlabelled(p)
        calib, held, how = split_one(vol, num_calib, num_eval, seed=seed, min_pixels=min_pixels)
        note = f"unlabelled CT: objects are HU >= {THRESHOLD_HU:g} regions (pseudo-reference); {how}"
        return DataSplit(calib, held, [vol.name], [vol.name], note=note)
    names = list(cases)
    calib, held = _split_names(calib_cases), _split_names(eval_cases)
    for what, sel in (("--calib-cases", calib), ("--eval-cases", held)):
        unknown = sorted(set(sel or ()) - set(names))
        if unknown:
            raise InputError(f"{what}: unknown case(s) {unknown}; cases in '{p}': {names}")
    if calib and held and set(calib) & set(held):
        raise InputError(
            f"--calib-cases and --eval-cases share {sorted(set(calib) & set(held))}: the gate needs "
            "held-out cases (a different patient)"
        )
    if len(names) == 1 and not (calib and held):
        vol = load_case(names[0], *cases[names[0]])
        c_objs, e_objs, how = split_one(vol, num_calib, num_eval, seed=seed, min_pixels=min_pixels)
        return DataSplit(c_objs, e_objs, names, names, note=f"one case: {how}")
    if held is None:
        held = [n for n in names if n not in (calib or [])][-1:]
    if calib is None:
        calib = [n for n in names if n not in held]
    if not calib or not held:
        raise InputError("need at least one calibration case and one evaluation case")
    loaded = {n: load_case(n, *cases[n]) for n in dict.fromkeys(calib + held)}
    return DataSplit(
        sample_objects([loaded[n] for n in calib], num_calib, seed=seed, min_pixels=min_pixels),
        sample_objects([loaded[n] for n in held], num_eval, seed=seed, min_pixels=min_pixels),
        calib,
        held,
    )


__all__ = [
    "DEFAULT_MIN_PIXELS",
    "THRESHOLD_HU",
    "CaseVolume",
    "DataSplit",
    "SliceObject",
    "all_objects",
    "candidate_slices",
    "draw",
    "fingerprint",
    "load_case",
    "load_split",
    "load_unlabelled",
    "sample_objects",
    "slice_objects",
    "split_one",
]
