"""Real inputs for parity checks, and the numbers that compare two models' outputs on them.

Parity inputs are (HU slice, extreme points) pairs from real CT:

* pydicom's bundled ``CT_small.dcm`` (128 x 128 slice through a vertebra and the aorta) with
  hand-placed point sets (:data:`CT_SMALL_POINT_SETS`): the spinal canal, the vertebra, the aorta
  touching the top border, a rib at the left border and a tiny bright spot (4 px);
* when ``../shared/data/ct-organs`` exists: a few labelled objects of its two volumes, points
  from the label masks (:func:`shared_data_cases`). Read in place, never copied into the repository.

Points are (4, 2) left, right, top, bottom, each (x = column, y = row) in slice pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmdeploy.geometry import CropTransform, crop_transform

# hand-placed on CT_small.dcm (checked on a windowed rendering)
CT_SMALL_POINT_SETS: dict[str, list[list[float]]] = {
    "spinal_canal": [[48, 52], [70, 50], [58, 41], [59, 61]],
    "vertebra": [[34, 62], [84, 60], [58, 2], [60, 80]],
    "aorta_top_border": [[74, 10], [109, 6], [92, 0], [90, 27]],
    "rib_left_border": [[0, 64], [26, 64], [16, 58], [20, 76]],
    "tiny_spot": [[57, 93], [61, 93], [59, 91], [59, 95]],
    "subpixel_tilted": [[40.3, 88.7], [79.6, 86.2], [61.2, 81.4], [58.8, 99.1]],
}

SHARED_DATA_ENV = "CMDEPLOY_CT_ORGANS"


class ParityError(RuntimeError):
    """Two models (or a model and its reference) disagree beyond the tolerances."""


@dataclass(frozen=True)
class ParityCase:
    """One object: an (H, W) float32 HU slice and its (4, 2) extreme points (x, y)."""

    name: str
    slice_hu: np.ndarray
    points: np.ndarray


@dataclass(frozen=True)
class ParityReport:
    """Agreement of a test output with a reference output on the same inputs.

    Attributes:
        quantity: what was compared (``"logit"`` or ``"probability"``).
        max_abs: max |test - reference| over all compared values.
        mean_abs: mean |test - reference|.
        mask_mismatch: fraction of compared pixels whose masks (above threshold) differ.
        dice: Dice of the two masks (all items pooled); 1.0 when both are empty.
        n_items: objects compared.
        n_values: values compared.
        foreground: fraction of compared pixels in the reference mask (a check on all-empty or
            all-full masks is weak).
    """

    quantity: str
    max_abs: float
    mean_abs: float
    mask_mismatch: float
    dice: float
    n_items: int
    n_values: int
    foreground: float = 0.0

    @property
    def mask_agreement(self) -> float:
        """Fraction of compared pixels with identical masks."""
        return 1.0 - self.mask_mismatch

    def summary(self) -> str:
        return (
            f"{self.n_items} objects, {self.n_values} values: max |d{self.quantity}| = "
            f"{self.max_abs:.3g}, mean = {self.mean_abs:.3g}; masks differ on "
            f"{100 * self.mask_mismatch:.4f} % of pixels; mask Dice {self.dice:.5f} "
            f"(reference foreground {100 * self.foreground:.1f} %)"
        )

    def check(
        self,
        *,
        atol: float | None = None,
        max_mask_mismatch: float | None = None,
        min_dice: float | None = None,
        what: str = "parity",
    ) -> None:
        """Raise :class:`ParityError` listing every tolerance that is exceeded."""
        problems = []
        if atol is not None and not self.max_abs <= atol:
            problems.append(f"max |d{self.quantity}| {self.max_abs:.3g} > {atol:g}")
        if max_mask_mismatch is not None and not self.mask_mismatch <= max_mask_mismatch:
            problems.append(
                f"masks differ on {100 * self.mask_mismatch:.4f} % of pixels "
                f"> {100 * max_mask_mismatch:g} %"
            )
        if min_dice is not None and not self.dice >= min_dice:
            problems.append(f"mask Dice {self.dice:.5f} < {min_dice:g}")
        if problems:
            raise ParityError(f"{what} check failed: " + "; ".join(problems) + f" ({self.summary()})")

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "quantity": self.quantity,
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "mask_mismatch": self.mask_mismatch,
            "mask_agreement": self.mask_agreement,
            "dice": self.dice,
            "n_items": self.n_items,
            "n_values": self.n_values,
            "foreground": self.foreground,
        }


def compare_outputs(
    reference: Sequence[np.ndarray] | np.ndarray,
    test: Sequence[np.ndarray] | np.ndarray,
    threshold: float,
    *,
    quantity: str = "probability",
    regions: Sequence[np.ndarray] | None = None,
) -> ParityReport:
    """Compare per-item arrays; masks are ``value > threshold``.

    Args:
        reference, test: N arrays each (shapes may differ between items, not between the two).
        threshold: mask threshold in the units of ``quantity`` (a logit threshold for logits).
        quantity: label used in messages.
        regions: optional N boolean arrays restricting which values are compared (e.g. each
            object's crop footprint in its slice).
    """
    if len(reference) != len(test):
        raise ValueError(f"reference has {len(reference)} items, test has {len(test)}")
    max_abs, abs_sum, n, diff_px, inter, total, fg = 0.0, 0.0, 0, 0, 0, 0, 0
    thr = np.float32(threshold)
    for i, (r, t) in enumerate(zip(reference, test, strict=True)):
        r = np.asarray(r, dtype=np.float32)
        t = np.asarray(t, dtype=np.float32)
        if r.shape != t.shape:
            raise ValueError(f"item {i}: reference shape {r.shape} != test shape {t.shape}")
        if regions is not None:
            sel = np.asarray(regions[i], dtype=bool)
            r, t = r[sel], t[sel]
        if r.size == 0:
            continue
        d = np.abs(t.astype(np.float64) - r)
        if not np.all(np.isfinite(d)):
            max_abs = float("inf")
        else:
            max_abs = max(max_abs, float(d.max()))
        abs_sum += float(np.nansum(d))
        n += r.size
        mr, mt = r > thr, t > thr
        diff_px += int(np.count_nonzero(mr != mt))
        inter += int(np.count_nonzero(mr & mt))
        fg += int(np.count_nonzero(mr))
        total += int(np.count_nonzero(mr)) + int(np.count_nonzero(mt))
    return ParityReport(
        quantity=quantity,
        max_abs=max_abs,
        mean_abs=abs_sum / max(n, 1),
        mask_mismatch=diff_px / max(n, 1),
        dice=2.0 * inter / total if total else 1.0,
        n_items=len(reference),
        n_values=n,
        foreground=fg / max(n, 1),
    )


def crop_footprint(transform: CropTransform, slice_shape: tuple[int, int]) -> np.ndarray:
    """Boolean (H, W): slice pixels whose crop coordinates lie inside ``[0, S-1]^2``.

    These are the pixels :func:`cmdeploy.geometry.paste_back` fills; all others are 0 there.
    """
    h, w = slice_shape
    m = transform.matrix
    s1 = transform.crop_size - 1
    xs = np.arange(w, dtype=np.float64)[None, :]
    ys = np.arange(h, dtype=np.float64)[:, None]
    us = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    vs = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    return (us >= 0) & (us <= s1) & (vs >= 0) & (vs <= s1)


def footprints(cases: Iterable[ParityCase], crop_size: int, target_size: float) -> list[np.ndarray]:
    """:func:`crop_footprint` of every case under the inference crop of a model."""
    return [
        crop_footprint(crop_transform(c.points, crop_size, target_size), c.slice_hu.shape)
        for c in cases
    ]


# ------------------------------------------------------------------------------ inputs
def ct_small_path() -> Path:
    """Path of pydicom's bundled ``CT_small.dcm``."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    if path is None:  # pragma: no cover - ships with pydicom
        raise FileNotFoundError("pydicom's test file CT_small.dcm is missing")
    return Path(path)


def read_slice(path: str | Path, index: int = 0) -> np.ndarray:
    """One (H, W) float32 HU slice from a DICOM file or a ``.npy`` array.

    DICOM: ``pixel_array`` (rows = y, columns = x) with RescaleSlope/Intercept applied. NPY: an
    (H, W) array, or slice ``index`` of an (N, H, W) array.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path} not found")
    if path.suffix.lower() == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim == 3:
            if not 0 <= index < arr.shape[0]:
                raise ValueError(f"{path}: slice index {index} outside 0..{arr.shape[0] - 1}")
            arr = arr[index]
        if arr.ndim != 2:
            raise ValueError(f"{path}: expected an (H, W) or (N, H, W) HU array, got {arr.shape}")
        return np.asarray(arr, dtype=np.float32)
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types
        raise ValueError(f"{path}: not a readable DICOM image ({exc})") from exc
    if pixels.ndim != 2:
        raise ValueError(f"{path}: expected one 2-D slice, got pixel data of shape {pixels.shape}")
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return (pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


def ct_small_cases(names: Iterable[str] | None = None) -> list[ParityCase]:
    """CT_small.dcm with the point sets of :data:`CT_SMALL_POINT_SETS` (all, or ``names``)."""
    img = read_slice(ct_small_path())
    keys = list(CT_SMALL_POINT_SETS) if names is None else list(names)
    return [
        ParityCase(f"CT_small:{k}", img, np.asarray(CT_SMALL_POINT_SETS[k], dtype=np.float32))
        for k in keys
    ]


def shared_data_dir() -> Path | None:
    """``../shared/data/ct-organs`` beside the repository (or ``$CMDEPLOY_CT_ORGANS``), if present."""
    env = os.environ.get(SHARED_DATA_ENV)
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs")
    for c in candidates:
        if (c / "abdomen_3mm" / "image.nii.gz").is_file():
            return c
    return None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy comes with the train extra
        return mask
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def shared_data_cases(
    root: str | Path | None = None,
    *,
    slices_per_case: int = 2,
    objects_per_slice: int = 3,
    min_pixels: int = 12,
) -> list[ParityCase]:
    """Labelled objects from the shared ct-organs volumes ([] when the folder is absent).

    Per volume, ``slices_per_case`` axial slices evenly inside the labelled range; per slice the
    largest connected component of its ``objects_per_slice`` largest labels (at least
    ``min_pixels`` pixels), extreme points from :func:`cmdeploy.guidance.extreme_points`. Slices
    are read with :func:`cmdeploy.io.read_nifti` (cmdeploy's LPS display frame, as the runtime).
    """
    base = Path(root) if root is not None else shared_data_dir()
    if base is None or not base.is_dir():
        return []
    from cmdeploy.guidance import extreme_points
    from cmdeploy.io import read_nifti

    cases: list[ParityCase] = []
    for case_dir in sorted(p for p in base.iterdir() if (p / "labels.nii.gz").is_file()):
        image = read_nifti(case_dir / "image.nii.gz")
        labels = read_nifti(case_dir / "labels.nii.gz")
        zs = [k for k, lab in labels.iter_slices() if (lab > 0).any()]
        if not zs:
            continue
        picks = np.linspace(zs[0], zs[-1], slices_per_case + 2)[1:-1].round().astype(int)
        for k in picks:
            hu = image.slice_hu(int(k))
            lab = np.rint(labels.slice_hu(int(k))).astype(np.int32)
            ids, counts = np.unique(lab[lab > 0], return_counts=True)
            taken = 0
            for j in np.argsort(-counts):
                if counts[j] < min_pixels or taken >= objects_per_slice:
                    break
                mask = _largest_component(lab == ids[j])
                if mask.sum() < min_pixels:
                    continue
                pts = extreme_points(mask)
                cases.append(ParityCase(f"{case_dir.name}:z{k}:label{int(ids[j])}", hu, pts))
                taken += 1
    return cases


def default_cases(*, include_shared: bool = True) -> list[ParityCase]:
    """CT_small point sets, plus shared-data objects when that folder exists."""
    cases = ct_small_cases()
    if include_shared:
        cases += shared_data_cases()
    return cases


__all__ = [
    "CT_SMALL_POINT_SETS",
    "ParityCase",
    "ParityError",
    "ParityReport",
    "compare_outputs",
    "crop_footprint",
    "ct_small_cases",
    "ct_small_path",
    "default_cases",
    "footprints",
    "read_slice",
    "shared_data_cases",
    "shared_data_dir",
]
