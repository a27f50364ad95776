"""Training data: NIfTI cases, per-slice object samples and patient-level splits.

Orientation: every volume is reoriented to **LPS** (``nib.as_closest_canonical`` gives RAS, then
axes 0 and 1 are flipped; the runtime's :func:`cmdeploy.io.nifti.lps_orientation` is the one
implementation), so slice ``k`` = ``data[:, :, k].T`` has rows (y) running anterior ->
posterior and columns (x) running patient right -> left, as a DICOM axial image is displayed.
A loaded :class:`Volume` stores the slices as ``(Z, H, W)`` float32 HU (``image[k]`` is slice k)
and the in-plane spacing as ``(x, y)`` = (column, row) millimetres.

A *sample* is one connected component (8-connectivity) of one label on one axial slice with at
least ``min_pixels`` pixels: the unit of the class-agnostic task (four extreme points -> mask).

Cases are found by :func:`cmdeploy.io.cases.find_cases` (the layouts are listed there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io.cases import Case as _Case
from cmdeploy.io.cases import find_cases as _find_cases
from cmdeploy.labels_to_points import DEFAULT_MIN_SIZE, label_components


class Case(_Case):
    """One patient (:class:`cmdeploy.io.cases.Case`) that can load itself as a :class:`Volume`."""

    def load(self) -> Volume:
        """Read and reorient both volumes (see the module docstring)."""
        return load_volume(self)


@dataclass
class Volume:
    """A loaded case. ``image`` (Z, H, W) float32 HU, ``labels`` (Z, H, W) integer ids, LPS slices."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    spacing_xy: tuple[float, float]
    label_names: dict[int, str]

    def label_name(self, label: int) -> str:
        return self.label_names.get(int(label), f"label_{int(label)}")


@dataclass(frozen=True)
class Sample:
    """One connected object on one slice.

    ``bbox`` = (y0, y1, x0, x1), half-open slice-pixel bounds of the component; ``mask`` is the
    component's boolean mask inside that box.
    """

    volume: int
    case: str
    slice_index: int
    label: int
    label_name: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def num_pixels(self) -> int:
        return int(self.mask.sum())

    def full_mask(self, shape: tuple[int, int]) -> np.ndarray:
        """The component as a boolean (H, W) slice mask."""
        out = np.zeros(shape, dtype=bool)
        y0, y1, x0, x1 = self.bbox
        out[y0:y1, x0:x1] = self.mask
        return out

    def pixel_coords(self) -> np.ndarray:
        """(P, 2) float64 slice coordinates (x, y) of the component's pixel centres."""
        ys, xs = np.nonzero(self.mask)
        return np.stack([xs + self.bbox[2], ys + self.bbox[0]], axis=1).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# loading


def load_volume(case: Case) -> Volume:
    """Load ``case`` as a :class:`Volume` (LPS, slices ``(Z, H, W)``); raises ``InputError``.

    The reorientation is the runtime's (:func:`cmdeploy.io.nifti.read_lps_volume`), so training
    slices are exactly the slices ``cmdeploy infer`` reads from the same file.
    """
    from cmdeploy.io.nifti import read_lps_volume

    try:
        image, spacing, img = read_lps_volume(case.image_path)
        labels, _, lab = read_lps_volume(case.label_path)
    except InputError as exc:
        raise InputError(f"case {case.name!r}: cannot read NIfTI pair: {exc}") from exc
    if image.shape != labels.shape or len(img.shape) != 3 or len(lab.shape) != 3:
        raise InputError(
            f"case {case.name!r}: image shape {img.shape} and label shape {lab.shape} differ "
            "(need the same 3-D grid)"
        )
    image = np.asarray(image, dtype=np.float32)
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        labels = np.rint(labels)
    labels = labels.astype(np.int16 if labels.max() < 2**15 else np.int32)
    return Volume(
        name=case.name,
        image=np.ascontiguousarray(image.transpose(2, 1, 0)),
        labels=np.ascontiguousarray(labels.transpose(2, 1, 0)),
        spacing_xy=spacing if spacing is not None else (1.0, 1.0),
        label_names=dict(case.label_names),
    )


def find_cases(path: str | Path) -> list[Case]:
    """The cases under ``path`` (:func:`cmdeploy.io.cases.find_cases`), sorted by name."""
    return [Case(c.name, c.image, c.labels, c.names_file, c.default_names) for c in _find_cases(path)]


def find_cases_in(paths: str | Path | Sequence[str | Path]) -> list[Case]:
    """:func:`find_cases` of one or several data folders, concatenated in the order given.

    Case names must be unique across the folders (``InputError`` names a duplicate).
    """
    roots = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not roots:
        raise InputError("no data folder given")
    cases: list[Case] = []
    seen: dict[str, Path] = {}
    for root in roots:
        for c in find_cases(root):
            if c.name in seen:
                raise InputError(f"case name {c.name!r} is in both {seen[c.name]} and {root}")
            seen[c.name] = Path(root)
            cases.append(c)
    return cases


# ---------------------------------------------------------------------------------------------
# samples


def slice_samples(
    labels_2d: np.ndarray, *, volume: int, case: str, slice_index: int,
    label_names: dict[int, str], min_pixels: int = DEFAULT_MIN_SIZE,
) -> list[Sample]:
    """Samples of one (H, W) label slice: its :func:`cmdeploy.labels_to_points.label_components`.

    Ordered by label id, then raster order of each component's first pixel (the order of
    ``scipy.ndimage.label`` per label, which earlier versions used: sample order, and so seeded
    training, is unchanged). Single pixels are never samples.
    """
    comps = label_components(labels_2d, min_size=min_pixels)
    out: list[Sample] = []
    for cp in sorted(comps, key=lambda c: (c.label_id, c.first_pixel)):
        y0, y1, x0, x1 = cp.bbox
        out.append(
            Sample(
                volume=volume,
                case=case,
                slice_index=slice_index,
                label=cp.label_id,
                label_name=label_names.get(cp.label_id, f"label_{cp.label_id}"),
                bbox=(y0, y1 + 1, x0, x1 + 1),
                mask=cp.crop,
            )
        )
    return out


def build_samples(volumes: Sequence[Volume], *, min_pixels: int = DEFAULT_MIN_SIZE) -> list[Sample]:
    """All samples of ``volumes`` (volume index = position in the sequence)."""
    out: list[Sample] = []
    for vi, vol in enumerate(volumes):
        for k in np.nonzero(vol.labels.reshape(vol.labels.shape[0], -1).any(axis=1))[0]:
            out.extend(
                slice_samples(
                    vol.labels[k], volume=vi, case=vol.name, slice_index=int(k),
                    label_names=vol.label_names, min_pixels=min_pixels,
                )
            )
    return out


# ---------------------------------------------------------------------------------------------
# splits


def split_cases(
    cases: Sequence[Case], fractions: tuple[float, float, float] = (0.6, 0.2, 0.2), seed: int = 0
) -> tuple[list[Case], list[Case], list[Case]]:
    """Patient-level (train, val, test) split, reproducible by ``seed``.

    Counts are rounded so they sum to ``len(cases)``; with >= 2 cases the validation split gets at
    least one case and training keeps at least one.
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    n = len(cases)
    if n == 0:
        raise InputError("no cases to split")
    order = sorted(cases, key=lambda c: c.name)
    perm = np.random.default_rng(seed).permutation(n)
    shuffled = [order[i] for i in perm]
    f = np.asarray(fractions, dtype=np.float64) / sum(fractions)
    n_val = int(round(f[1] * n))
    n_test = int(round(f[2] * n))
    if n >= 2 and f[1] > 0:
        n_val = max(n_val, 1)
    n_train = n - n_val - n_test
    if n_train < 1:
        n_test = max(n - n_val - 1, 0)
        n_val = n - 1 - n_test
        n_train = 1
    return (
        shuffled[:n_train],
        shuffled[n_train : n_train + n_val],
        shuffled[n_train + n_val :],
    )


def select_cases(cases: Sequence[Case], names: Sequence[str], *, what: str) -> list[Case]:
    """The cases named in ``names`` (in that order); ``InputError`` names any unknown one."""
    by_name = {c.name: c for c in cases}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InputError(f"{what}: unknown case name(s) {unknown}; available: {sorted(by_name)}")
    return [by_name[n] for n in names]


def check_disjoint(**splits: Sequence[Case]) -> None:
    """Raise ``InputError`` if one case appears in two splits."""
    seen: dict[str, str] = {}
    for split, cases in splits.items():
        for c in cases:
            if c.name in seen and seen[c.name] != split:
                raise InputError(f"case {c.name!r} is in both the {seen[c.name]} and {split} splits")
            seen[c.name] = split


# ---------------------------------------------------------------------------------------------
# data sets (map-style; torch's DataLoader collates the numpy arrays)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The per-sample generator: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


class TrainDataset:
    """Augmented training examples; items are keyed by ``(epoch, index)`` for determinism.

    ``dataset[(epoch, i)]`` (or ``dataset[i]`` for epoch 0) returns the dict of
    :func:`cmdeploy.train.augment.training_sample` without ``matrix``, plus ``index``.
    """

    def __init__(self, volumes, samples, spec, augment=None, seed: int = 0) -> None:
        from cmdeploy.train.augment import AugmentConfig

        self.volumes = list(volumes)
        self.samples = list(samples)
        self.spec = spec
        self.augment = augment if augment is not None else AugmentConfig()
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> dict[str, np.ndarray]:
        from cmdeploy.train.augment import training_sample

        epoch, index = key if isinstance(key, tuple) else (0, key)
        smp = self.samples[index]
        vol = self.volumes[smp.volume]
        y0, _, x0, _ = smp.bbox
        out = training_sample(
            vol.image[smp.slice_index], smp.mask, (x0, y0), self.spec, self.augment,
            sample_rng(self.seed, epoch, index), spacing_xy=vol.spacing_xy,
        )
        out.pop("matrix")
        out["index"] = np.int64(index)
        return out


class ValDataset:
    """Validation inputs built exactly as at run time (:func:`cmdeploy.preprocess.prepare_one`).

    Extreme points come from the full-slice component mask without jitter; ``spec.target_size``
    is the zoom target. Items: ``input`` (C, S, S), ``matrix`` (2, 3) slice -> crop, ``index``.
    """

    def __init__(self, volumes, samples, spec) -> None:
        self.volumes = list(volumes)
        self.samples = list(samples)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.samples)

    def slice_shape(self, index: int) -> tuple[int, int]:
        return self.volumes[self.samples[index].volume].image.shape[1:]

    def points(self, index: int) -> np.ndarray:
        from cmdeploy.guidance import extreme_points

        smp = self.samples[index]
        return extreme_points(smp.full_mask(self.slice_shape(index)))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        from cmdeploy.preprocess import prepare_one

        smp = self.samples[index]
        vol = self.volumes[smp.volume]
        inp, t = prepare_one(vol.image[smp.slice_index], self.points(index), self.spec)
        return {"input": inp, "matrix": t.matrix, "index": np.int64(index)}
