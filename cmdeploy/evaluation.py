"""Evaluate models against reference label volumes: Dice and HD95 for every object on every slice.

Data layout (the ``ct-organs`` layout):

* a root folder of cases, ``<root>/<case>/image.nii.gz`` + ``<root>/<case>/labels.nii.gz``, with an
  id -> name map ``<root>/labels.json`` (or ``<case>/labels.json``);
* or one case folder holding ``image.*`` + ``labels.*``;
* or one image file plus its label volume given separately.

``image``/``labels`` may be ``.nii.gz``, ``.nii`` or ``.npy``; images are read with
:func:`cmdeploy.io.open_series`, labels with :func:`cmdeploy.labels_to_points.open_label_volume`
(same slice convention, so slice ``k`` of both are the same pixels, ``[y, x]``).

Objects: on every slice, each selected label id is split into connected components
(:func:`~cmdeploy.labels_to_points.label_components`; by default 8-connectivity, i.e. edges
and corners); components under ``min_size`` pixels (default 25) and single pixels are dropped. This
is the one definition of an object shared with ``points-from-labels`` and training
(``DEFAULT_MIN_SIZE``/``DEFAULT_CONNECTIVITY`` in :mod:`cmdeploy.labels_to_points`). Each kept
component is one object: its reference mask is the component, its four extreme points come from
:func:`cmdeploy.guidance.extreme_points` on that mask (with ``jitter`` > 0: uniform click noise of
up to ``jitter`` pixels per coordinate, from a generator seeded by ``(seed, case, slice, label id,
piece)``, so the points of an object do not depend on which other cases or labels are selected).
``piece`` 1 is the largest component of a label on a slice, 2 the next, ...

Every model segments the same objects from the same points (batched, :meth:`Segmenter.predict_batch`);
each predicted mask is scored against its component alone (:func:`cmdeploy.metrics.score_masks`).

Aggregates (:func:`label_stats`, :func:`summarize`): per label, the mean and standard deviation
(ddof 0) over its objects. The **headline** Dice is the mean over labels of the per-label means
(as in the paper's Table 1), so large, frequent organs do not drown small ones; the mean over all
objects is reported next to it. HD95 is in mm (pixels when a case has no pixel spacing); objects
with an empty prediction have no HD95 (inf): HD95 means are over the others and the count of empty
predictions is reported (their Dice, 0, is included in every Dice mean).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy.annotator import CLICK_PROTOCOLS, DEFAULT_ANNOTATOR, ClickModel, object_clicks
from cmdeploy.errors import InputError
from cmdeploy.guidance import extreme_points
from cmdeploy.labels_to_points import (
    DEFAULT_CONNECTIVITY,
    DEFAULT_MIN_SIZE,
    label_components,
    load_label_names,
    open_label_volume,
    resolve_label_ids,
)
from cmdeploy.metrics import MaskScores, score_masks

if TYPE_CHECKING:
    from cmdeploy.io.series import Series
    from cmdeploy.labels_to_points import LabelVolume
    from cmdeploy.segmenter import Segmenter

IMAGE_NAMES = ("image.nii.gz", "image.nii", "image.npy")
LABEL_NAMES = ("labels.nii.gz", "labels.nii", "labels.npy")
NAMES_FILE = "labels.json"
# object-size bin edges, in mm^2 (or pixels when a case has no spacing); the last bin is open
SIZE_EDGES: tuple[float, ...] = (0.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)


# ----------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One image + label volume pair.

    Attributes:
        name: case name (its folder name, or the image file name without extension).
        image: CT volume path; labels: label volume path on the same grid.
        names_file: JSON id -> name map, or None (labels are then named by their ids).
    """

    name: str
    image: Path
    labels: Path
    names_file: Path | None = None


def _first(folder: Path, candidates: Sequence[str]) -> Path | None:
    for name in candidates:
        p = folder / name
        if p.is_file():
            return p
    return None


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".npy"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _names_near(*folders: Path) -> Path | None:
    for f in folders:
        p = f / NAMES_FILE
        if p.is_file():
            return p
    return None


def find_cases(
    data: str | Path,
    *,
    cases: Sequence[str] | None = None,
    reference: str | Path | None = None,
    names_file: str | Path | None = None,
) -> list[Case]:
    """The cases under ``data`` (see the module docstring for the layouts).

    Args:
        data: a root of case folders, one case folder, or an image file (then ``reference`` is its
            label volume).
        cases: keep only these case names (in this order); unknown names are an error.
        reference: label volume for an image-file ``data``.
        names_file: id -> name JSON overriding the ``labels.json`` found next to the data.

    Raises :class:`InputError` when nothing usable is found.
    """
    root = Path(data)
    names = Path(names_file) if names_file is not None else None
    if names is not None and not names.is_file():
        raise InputError(f"label names file '{names}' does not exist")
    if not root.exists():
        raise InputError(f"--data '{root}' does not exist")
    if root.is_file():
        if reference is None:
            raise InputError(f"--data '{root}' is an image file: give its label volume with --reference")
        ref = Path(reference)
        if not ref.is_file():
            raise InputError(f"reference label volume '{ref}' does not exist")
        found = [Case(_stem(root), root, ref, names or _names_near(root.parent))]
    else:
        if reference is not None:
            raise InputError("--reference applies only when --data is an image file")
        image, labels = _first(root, IMAGE_NAMES), _first(root, LABEL_NAMES)
        if image is not None and labels is not None:
            found = [Case(root.name, image, labels, names or _names_near(root, root.parent))]
        else:
            found = []
            for sub in sorted(p for p in root.iterdir() if p.is_dir()):
                image, labels = _first(sub, IMAGE_NAMES), _first(sub, LABEL_NAMES)
                if image is not None and labels is not None:
                    found.append(Case(sub.name, image, labels, names or _names_near(sub, root)))
        if not found:
            raise InputError(
                f"--data '{root}': no case found; expected {IMAGE_NAMES[0]} + {LABEL_NAMES[0]} in it "
                "or in its sub-folders"
            )
    if cases:
        by_name = {c.name: c for c in found}
        unknown = [c for c in cases if c not in by_name]
        if unknown:
            raise InputError(
                f"unknown case(s) {', '.join(map(repr, unknown))}; available: {', '.join(sorted(by_name))}"
            )
        found = [by_name[c] for c in dict.fromkeys(cases)]
    return found


@dataclass
class OpenCase:
    """A case opened for reading: the CT series, the label volume and the label names."""

    case: Case
    series: Series
    labels: LabelVolume
    names: dict[int, str] | None

    @property
    def spacing(self) -> tuple[float, float] | None:
        return self.series.spacing_xy_mm


def open_case(case: Case) -> OpenCase:
    """Open a case's image and labels and check they share the slice grid."""
    from cmdeploy.io import open_series

    series = open_series(case.image)
    labels = open_label_volume(case.labels)
    if tuple(labels.shape) != tuple(series.shape) or labels.num_slices != series.num_slices:
        raise InputError(
            f"case {case.name!r}: labels '{case.labels.name}' have {labels.num_slices} slices of "
            f"{labels.shape}, the image has {series.num_slices} slices of {series.shape} (rows, columns)"
        )
    names = load_label_names(case.names_file) if case.names_file is not None else None
    return OpenCase(case, series, labels, names)


# --------------------------------------------------------------------------------------- objects
@dataclass(frozen=True, eq=False)
class EvalObject:
    """One reference object (a connected component of one label on one slice).

    Attributes:
        case: case name; slice_index: 0-based slice.
        label: label name (the id as text without a names file); label_id: its value in the labels.
        piece: 1 for the label's largest component on the slice, 2 for the next, ...
        points: float32 (4, 2) extreme points left, right, top, bottom, each (x, y), jitter applied.
        area_px: reference area in pixels; area_mm2: in mm^2 (None without pixel spacing).
        bbox: (y0, y1, x0, x1) inclusive bounding box of the reference component.
    """

    case: str
    slice_index: int
    label: str
    label_id: int
    piece: int
    points: np.ndarray
    area_px: int
    area_mm2: float | None
    bbox: tuple[int, int, int, int]


def _object_rng(seed: int, case: str, slice_index: int, label_id: int, piece: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(case.encode()), slice_index, label_id, piece])


def slice_objects(
    labels: np.ndarray,
    *,
    case: str = "",
    slice_index: int = 0,
    names: Mapping[int, str] | None = None,
    label_ids: set[int] | None = None,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = DEFAULT_CONNECTIVITY,
    jitter: float = 0.0,
    seed: int = 0,
    spacing: tuple[float, float] | None = None,
    clicks: str = "exact",
    click_model: ClickModel = DEFAULT_ANNOTATOR,
) -> list[tuple[EvalObject, np.ndarray]]:
    """The objects of one (H, W) label slice with their bool (H, W) reference masks.

    Ordered by label id, then size (largest first). See the module docstring for the rules.
    ``clicks="annotator"`` draws the points from :mod:`cmdeploy.annotator` with ``click_model``
    (hand error in mm through ``spacing``, 1 mm per pixel when None) instead of the exact extremes.
    """
    px_area = None if spacing is None else float(spacing[0]) * float(spacing[1])
    out: list[tuple[EvalObject, np.ndarray]] = []
    for cp in label_components(labels, min_size=min_size, connectivity=connectivity, label_ids=label_ids):
        lid, area = cp.label_id, cp.area_px
        mask = cp.mask()
        if clicks == "annotator":
            rng = _object_rng(seed, case, slice_index, lid, cp.piece)
            pts = object_clicks(mask, "annotator", spacing_xy=spacing, model=click_model, rng=rng)
        else:
            rng = _object_rng(seed, case, slice_index, lid, cp.piece) if jitter > 0 else None
            pts = extreme_points(mask, jitter=float(jitter), rng=rng)
        obj = EvalObject(
            case=case,
            slice_index=int(slice_index),
            label=names.get(lid, str(lid)) if names is not None else str(lid),
            label_id=lid,
            piece=cp.piece,
            points=pts,
            area_px=area,
            area_mm2=None if px_area is None else area * px_area,
            bbox=cp.bbox,
        )
        out.append((obj, mask))
    return out


# ------------------------------------------------------------------------------------ evaluation
@dataclass
class ModelRun:
    """One model's scores, aligned with :attr:`Evaluation.objects`.

    ``seconds`` is the wall time spent in :meth:`Segmenter.predict_batch` (prepare + model + paste
    back), not the metric computation.
    """

    name: str
    path: Path
    backend: str
    scores: list[MaskScores] = field(default_factory=list)
    seconds: float = 0.0

    def dice(self) -> np.ndarray:
        return np.array([s.dice for s in self.scores], dtype=np.float64)

    def hd95(self) -> np.ndarray:
        return np.array([s.hd95_mm for s in self.scores], dtype=np.float64)


@dataclass
class Evaluation:
    """Everything :func:`evaluate` measured.

    Attributes:
        cases: the evaluated cases; objects: every reference object, in case/slice/label order.
        runs: model name -> :class:`ModelRun` (in the order the models were given).
        distance_unit: ``"mm"``, or ``"px"`` when some case has no pixel spacing.
        settings: jitter, seed, min_size, connectivity, labels.
    """

    cases: list[Case]
    objects: list[EvalObject]
    runs: dict[str, ModelRun]
    distance_unit: str = "mm"
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        return list(self.runs)

    @property
    def area_unit(self) -> str:
        return "mm2" if self.distance_unit == "mm" else "px"

    def areas(self) -> np.ndarray:
        """Reference area of every object in :attr:`area_unit`."""
        if self.distance_unit == "mm":
            return np.array([o.area_mm2 for o in self.objects], dtype=np.float64)
        return np.array([o.area_px for o in self.objects], dtype=np.float64)

    def labels(self) -> list[str]:
        """Label names in order of their label id (first appearance on ties)."""
        first: dict[str, int] = {}
        for o in self.objects:
            first.setdefault(o.label, o.label_id)
        return sorted(first, key=lambda name: (first[name], name))


def model_names(paths: Sequence[str | Path]) -> list[str]:
    """Display names for models: file names without extension; where two share a name, their
    folder is prefixed (``runs/cm/model.onnx`` -> ``cm/model``); still-equal names get ``#2``, ``#3``."""
    stems = [Path(p).stem for p in paths]
    bases = [
        f"{Path(p).parent.name}/{stem}" if stems.count(stem) > 1 and Path(p).parent.name else stem
        for p, stem in zip(paths, stems, strict=True)
    ]
    names: list[str] = []
    for base in bases:
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.append(name)
    return names


def _score(
    runs: Sequence[tuple[ModelRun, Segmenter]],
    pending: list[tuple[EvalObject, np.ndarray, np.ndarray]],
    spacing: tuple[float, float] | None,
) -> None:
    slices = [s for _, _, s in pending]
    points = np.stack([o.points for o, _, _ in pending])
    for run, seg in runs:
        t0 = time.perf_counter()
        preds = seg.predict_batch(slices, points)
        run.seconds += time.perf_counter() - t0
        for (_, ref, _), pred in zip(pending, preds, strict=True):
            run.scores.append(score_masks(pred, ref, spacing))


def evaluate(
    segmenters: Sequence[Segmenter],
    cases: Sequence[Case],
    *,
    names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    jitter: float = 0.0,
    seed: int = 0,
    min_size: int = DEFAULT_MIN_SIZE,
    connectivity: int = DEFAULT_CONNECTIVITY,
    chunk: int = 64,
    clicks: str = "exact",
    click_model: ClickModel = DEFAULT_ANNOTATOR,
    progress: Callable[[str, int, int], None] | None = None,
) -> Evaluation:
    """Segment every reference object of ``cases`` with every model and score it.

    Args:
        segmenters: loaded models; all see the same objects and points.
        cases: from :func:`find_cases`.
        names: display name per model (default :func:`model_names` of their paths).
        labels: label names or ids to evaluate (default: every label present).
        jitter: click noise in pixels (uniform in [-jitter, jitter] per coordinate), 0 = exact.
        seed: seed of the jitter and of the simulated annotator.
        clicks: ``"exact"`` (extreme pixels, plus ``jitter``) or ``"annotator"``
            (:mod:`cmdeploy.annotator` with ``click_model``; ``jitter`` must then be 0).
        min_size: smallest component kept, pixels (default 25); connectivity: 4 or 8 (default 8).
        chunk: objects per :meth:`Segmenter.predict_batch` call (each model batches inside it).
        progress: ``progress(case_name, slices_done, num_slices)`` after every slice.
    """
    if not segmenters:
        raise InputError("give at least one model")
    if jitter < 0:
        raise InputError(f"--jitter must be >= 0 pixels, got {jitter}")
    if connectivity not in (4, 8):
        raise InputError(f"--connectivity must be 4 or 8, got {connectivity}")
    if clicks not in CLICK_PROTOCOLS:
        raise InputError(f"--clicks must be one of {', '.join(CLICK_PROTOCOLS)}, got {clicks!r}")
    if clicks == "annotator" and jitter > 0:
        raise InputError("--jitter applies to exact clicks; the annotator has its own hand error")
    names = list(names) if names is not None else model_names([s.model_path for s in segmenters])
    if len(names) != len(segmenters) or len(set(names)) != len(names):
        raise InputError(f"need one distinct name per model, got {names}")
    opened = [open_case(c) for c in cases]
    unit = "mm" if all(o.spacing is not None for o in opened) else "px"
    selections = [
        resolve_label_ids(labels, o.names) if labels else None for o in opened
    ]  # every name checked before any inference
    runs = {
        n: ModelRun(n, Path(s.model_path), str(s.backend)) for n, s in zip(names, segmenters, strict=True)
    }
    pairs = [(runs[n], s) for n, s in zip(names, segmenters, strict=True)]
    objects: list[EvalObject] = []
    for oc, ids in zip(opened, selections, strict=True):
        spacing = oc.spacing if unit == "mm" else None
        pending: list[tuple[EvalObject, np.ndarray, np.ndarray]] = []
        n_slices = oc.series.num_slices
        for k in range(n_slices):
            found = slice_objects(
                oc.labels.slice(k), case=oc.case.name, slice_index=k, names=oc.names, label_ids=ids,
                min_size=min_size, connectivity=connectivity, jitter=jitter, seed=seed,
                spacing=oc.spacing, clicks=clicks, click_model=click_model,
            )
            if found:
                image = oc.series.slice_hu(k)
                for obj, mask in found:
                    objects.append(obj)
                    pending.append((obj, mask, image))
            if len(pending) >= chunk or (k == n_slices - 1 and pending):
                _score(pairs, pending, spacing)
                pending = []
            if progress is not None:
                progress(oc.case.name, k + 1, n_slices)
    return Evaluation(
        cases=list(cases),
        objects=objects,
        runs=runs,
        distance_unit=unit,
        settings={
            "jitter_px": float(jitter),
            "clicks": clicks,
            "click_model": click_model.to_dict() if clicks == "annotator" else None,
            "seed": int(seed),
            "min_size_px": int(min_size),
            "connectivity": int(connectivity),
            "labels": list(labels) if labels else None,
        },
    )


def reconstruct(
    ev: Evaluation, index: int, segmenter: Segmenter | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(slice_hu, reference_mask, predicted_mask)`` of object ``index`` (for figures).

    Re-reads the slice and recomputes the component; the prediction (None without ``segmenter``)
    is rerun from the stored points, so it equals the scored one.
    """
    obj = ev.objects[index]
    case = next(c for c in ev.cases if c.name == obj.case)
    oc = open_case(case)
    found = slice_objects(
        oc.labels.slice(obj.slice_index), names=None, label_ids={obj.label_id},
        min_size=int(ev.settings.get("min_size_px", DEFAULT_MIN_SIZE)),
        connectivity=int(ev.settings.get("connectivity", DEFAULT_CONNECTIVITY)),
    )
    ref = next(m for o, m in found if o.piece == obj.piece)
    image = oc.series.slice_hu(obj.slice_index)
    pred = None if segmenter is None else segmenter.predict(image, obj.points)
    return image, ref, pred


# ------------------------------------------------------------------------------------ aggregates
def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())


@dataclass(frozen=True)
class GroupStats:
    """Mean and std (ddof 0) of Dice and HD95 over a group of objects (a label or a size bin).

    ``hd95_*`` are over the ``n - n_empty`` objects with a non-empty prediction.
    """

    name: str
    n: int
    dice_mean: float
    dice_std: float
    hd95_mean: float
    hd95_std: float
    n_empty: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def group_stats(name: str, dice: np.ndarray, hd: np.ndarray) -> GroupStats:
    """Stats of one group from its Dice and HD95 values (inf HD95 = empty prediction)."""
    finite = hd[np.isfinite(hd)]
    dm, ds = _mean_std(dice)
    hm, hs = _mean_std(finite)
    return GroupStats(name, int(dice.size), dm, ds, hm, hs, int(dice.size - finite.size))


def label_stats(ev: Evaluation, model: str) -> list[GroupStats]:
    """Per-label stats of one model, in :meth:`Evaluation.labels` order."""
    run = ev.runs[model]
    d, h = run.dice(), run.hd95()
    labels = np.array([o.label for o in ev.objects], dtype=object)
    return [group_stats(lab, d[labels == lab], h[labels == lab]) for lab in ev.labels()]


@dataclass(frozen=True)
class Summary:
    """Overall numbers of one model.

    Attributes:
        dice_label_mean: **the headline**: mean over labels of each label's mean Dice.
        hd95_label_mean: mean over labels of each label's mean HD95 (labels with any finite value).
        dice_object_mean, dice_object_std, hd95_object_mean, hd95_object_std: over all objects.
        n_objects, n_labels, n_empty: counts (n_empty = objects with an empty prediction).
        seconds: time in the model (predict_batch); objects_per_s accordingly.
    """

    model: str
    dice_label_mean: float
    hd95_label_mean: float
    dice_object_mean: float
    dice_object_std: float
    hd95_object_mean: float
    hd95_object_std: float
    n_objects: int
    n_labels: int
    n_empty: int
    seconds: float
    objects_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(ev: Evaluation, model: str) -> Summary:
    """Headline (mean over labels) and object-mean Dice/HD95 of one model."""
    per = label_stats(ev, model)
    run = ev.runs[model]
    all_d = run.dice()
    g = group_stats("all", all_d, run.hd95())
    label_hd = np.array([s.hd95_mean for s in per], dtype=np.float64)
    label_hd = label_hd[np.isfinite(label_hd)]
    return Summary(
        model=model,
        dice_label_mean=float(np.mean([s.dice_mean for s in per])) if per else float("nan"),
        hd95_label_mean=float(label_hd.mean()) if label_hd.size else float("nan"),
        dice_object_mean=g.dice_mean,
        dice_object_std=g.dice_std,
        hd95_object_mean=g.hd95_mean,
        hd95_object_std=g.hd95_std,
        n_objects=g.n,
        n_labels=len(per),
        n_empty=g.n_empty,
        seconds=run.seconds,
        objects_per_s=g.n / run.seconds if run.seconds > 0 else float("nan"),
    )


def size_bin_names(edges: Sequence[float], unit: str) -> list[str]:
    """``["<100 mm2", "100-300 mm2", ..., ">=10000 mm2"]`` for bin edges starting at 0."""
    e = [float(x) for x in edges]
    out = []
    for i, lo in enumerate(e):
        if i == len(e) - 1:
            out.append(f">={lo:g} {unit}")
        elif lo <= 0:
            out.append(f"<{e[i + 1]:g} {unit}")
        else:
            out.append(f"{lo:g}-{e[i + 1]:g} {unit}")
    return out


def size_bins(ev: Evaluation, edges: Sequence[float] = SIZE_EDGES) -> np.ndarray:
    """Bin index of every object by reference area (:attr:`Evaluation.area_unit`)."""
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 1 or np.any(np.diff(e) <= 0):
        raise InputError(f"size bin edges must be increasing, got {list(edges)}")
    return np.clip(np.searchsorted(e, ev.areas(), side="right") - 1, 0, e.size - 1)


def size_stats(ev: Evaluation, model: str, edges: Sequence[float] = SIZE_EDGES) -> list[GroupStats]:
    """Stats of one model per object-size bin (empty bins have n = 0)."""
    run = ev.runs[model]
    d, h = run.dice(), run.hd95()
    b = size_bins(ev, edges)
    names = size_bin_names(edges, ev.area_unit)
    return [group_stats(names[i], d[b == i], h[b == i]) for i in range(len(names))]


def worst(ev: Evaluation, model: str, n: int = 12) -> list[int]:
    """Indices of the ``n`` objects with the lowest Dice (ties: larger HD95 first)."""
    run = ev.runs[model]
    d, h = run.dice(), run.hd95()
    order = np.lexsort((-np.nan_to_num(h, posinf=np.finfo(np.float64).max), d))
    return [int(i) for i in order[: max(int(n), 0)]]


def object_rows(ev: Evaluation) -> Iterator[dict[str, Any]]:
    """One flat dict per object: identity, reference size, points, then each model's scores."""
    unit = ev.distance_unit
    for i, o in enumerate(ev.objects):
        row: dict[str, Any] = {
            "case": o.case,
            "slice_index": o.slice_index,
            "label": o.label,
            "label_id": o.label_id,
            "piece": o.piece,
            "area_px": o.area_px,
            "area_mm2": None if o.area_mm2 is None else round(o.area_mm2, 3),
        }
        for name, (x, y) in zip(("left", "right", "top", "bottom"), o.points.tolist(), strict=True):
            row[f"{name}_x"] = round(x, 3)
            row[f"{name}_y"] = round(y, 3)
        for model, run in ev.runs.items():
            s = run.scores[i]
            row[f"{model}:dice"] = round(s.dice, 6)
            row[f"{model}:hd95_{unit}"] = round(s.hd95_mm, 4) if np.isfinite(s.hd95_mm) else "inf"
            row[f"{model}:pred_area_px"] = s.pred_area_px
        yield row


# ------------------------------------------------------------------------------------- reporting
def _r(x: float, nd: int = 6) -> float | None:
    return None if not np.isfinite(x) else round(float(x), nd)


def results_rows(
    ev: Evaluation, *, by_size: bool = False, edges: Sequence[float] = SIZE_EDGES
) -> list[dict[str, Any]]:
    """Flat rows for ``results.csv``: per model, one row per label, the two overall rows
    (``mean over labels`` = the headline, ``mean over objects``), and size bins when ``by_size``.

    Dice is a fraction in [0, 1]; HD95 in :attr:`Evaluation.distance_unit`.
    """
    unit = ev.distance_unit
    rows: list[dict[str, Any]] = []

    def add(model: str, group: str, name: str, n: int, dm: float, ds: float, hm: float, hs: float,
            empty: int) -> None:
        rows.append({
            "model": model, "group": group, "name": name, "n": n,
            "dice_mean": _r(dm), "dice_std": _r(ds),
            f"hd95_mean_{unit}": _r(hm, 4), f"hd95_std_{unit}": _r(hs, 4), "n_empty_pred": empty,
        })

    for model in ev.runs:
        for s in label_stats(ev, model):
            add(model, "label", s.name, s.n, s.dice_mean, s.dice_std, s.hd95_mean, s.hd95_std, s.n_empty)
        sm = summarize(ev, model)
        add(model, "overall", "mean over labels", sm.n_labels, sm.dice_label_mean, float("nan"),
            sm.hd95_label_mean, float("nan"), sm.n_empty)
        add(model, "overall", "mean over objects", sm.n_objects, sm.dice_object_mean, sm.dice_object_std,
            sm.hd95_object_mean, sm.hd95_object_std, sm.n_empty)
        if by_size:
            for s in size_stats(ev, model, edges):
                add(model, "size", s.name, s.n, s.dice_mean, s.dice_std, s.hd95_mean, s.hd95_std, s.n_empty)
    return rows


def fmt_pm(mean: float, std: float, scale: float = 1.0, nd: int = 2) -> str:
    """``"94.00 ± 3.10"`` (``"-"`` when undefined); ``scale`` 100 turns Dice into percent."""
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(std):
        return f"{mean * scale:.{nd}f}"
    return f"{mean * scale:.{nd}f} ± {std * scale:.{nd}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_table(ev: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Side-by-side per-label table: ``label, n``, then ``Dice % / HD95`` per model, then the two
    overall rows (headline first)."""
    unit = ev.distance_unit
    header = ["label", "n"]
    for m in ev.runs:
        header += [f"{m} Dice %", f"{m} HD95 {unit}"]
    per = {m: label_stats(ev, m) for m in ev.runs}
    rows = []
    for i, label in enumerate(ev.labels()):
        r = [label, str(per[next(iter(per))][i].n)]
        for m in ev.runs:
            s = per[m][i]
            hd = fmt_pm(s.hd95_mean, s.hd95_std, nd=1) + (f" ({s.n_empty} empty)" if s.n_empty else "")
            r += [fmt_pm(s.dice_mean, s.dice_std, 100.0), hd]
        rows.append(r)
    sums = {m: summarize(ev, m) for m in ev.runs}
    r1 = ["**mean over labels** (headline)", str(len(ev.labels()))]
    r2 = ["mean over objects", str(len(ev.objects))]
    for m in ev.runs:
        s = sums[m]
        r1 += [f"**{fmt_pm(s.dice_label_mean, float('nan'), 100.0)}**",
               fmt_pm(s.hd95_label_mean, float("nan"), nd=1)]
        r2 += [fmt_pm(s.dice_object_mean, s.dice_object_std, 100.0),
               fmt_pm(s.hd95_object_mean, s.hd95_object_std, nd=1)]
    rows += [r1, r2]
    return header, rows


def size_table(ev: Evaluation, edges: Sequence[float] = SIZE_EDGES) -> tuple[list[str], list[list[str]]]:
    """Per size bin: ``n``, then Dice % and HD95 per model."""
    unit = ev.distance_unit
    header = [f"object area ({ev.area_unit})", "n"]
    for m in ev.runs:
        header += [f"{m} Dice %", f"{m} HD95 {unit}"]
    per = {m: size_stats(ev, m, edges) for m in ev.runs}
    first = per[next(iter(per))]
    rows = []
    for i, s0 in enumerate(first):
        r = [s0.name.rsplit(" ", 1)[0], str(s0.n)]
        for m in ev.runs:
            s = per[m][i]
            r += [fmt_pm(s.dice_mean, s.dice_std, 100.0), fmt_pm(s.hd95_mean, s.hd95_std, nd=1)]
        rows.append(r)
    return header, rows


def worst_table(ev: Evaluation, model: str, n: int = 12) -> tuple[list[str], list[list[str]]]:
    """The ``n`` lowest-Dice objects of one model."""
    unit = ev.distance_unit
    run = ev.runs[model]
    header = ["case", "slice", "label", "piece", f"area ({ev.area_unit})", "Dice %", f"HD95 {unit}",
              "pred px"]
    areas = ev.areas()
    rows = []
    for i in worst(ev, model, n):
        o, s = ev.objects[i], run.scores[i]
        rows.append([
            o.case, str(o.slice_index), o.label, str(o.piece), f"{areas[i]:.0f}",
            f"{s.dice * 100:.2f}", f"{s.hd95_mm:.1f}" if np.isfinite(s.hd95_mm) else "inf",
            str(s.pred_area_px),
        ])
    return header, rows


def markdown_report(
    ev: Evaluation, *, by_size: bool = False, edges: Sequence[float] = SIZE_EDGES, n_worst: int = 12
) -> str:
    """``results.md``: settings, the side-by-side table, size bins (optional) and worst cases."""
    st = ev.settings
    parts = [
        "# cmdeploy evaluate",
        "",
        f"- cases: {', '.join(c.name for c in ev.cases)}; objects: {len(ev.objects)} "
        f"(connected components >= {st.get('min_size_px')} px, {st.get('connectivity')}-connected)",
        f"- labels: {', '.join(ev.labels()) or '-'}",
        (
            f"- clicks: simulated annotator {st['click_model']} (seed {st.get('seed')})"
            if st.get("clicks") == "annotator"
            else f"- extreme points from the reference masks, jitter {st.get('jitter_px', 0):g} px "
            f"(seed {st.get('seed')})"
        ),
        "- models: " + "; ".join(f"{m} ({r.path.name}, {r.backend})" for m, r in ev.runs.items()),
        "- Dice in %, mean ± std (ddof 0) over objects; HD95 = max of the two directed 95th "
        f"percentile surface distances, in {ev.distance_unit}, over objects with a non-empty prediction.",
        "- **Headline: mean over labels of the per-label mean Dice** (as the paper's Table 1); the "
        "mean over all objects is given as well.",
        "",
        "## Per label",
        "",
        _md_table(*comparison_table(ev)),
    ]
    if by_size:
        parts += ["", "## By object size", "", _md_table(*size_table(ev, edges))]
    for m in ev.runs:
        parts += ["", f"## Worst {min(n_worst, len(ev.objects))} objects: {m}", "",
                  _md_table(*worst_table(ev, m, n_worst))]
    return "\n".join(parts) + "\n"
