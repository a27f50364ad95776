"""The evaluation run: every model segments the same reference objects from the same points.

Each case is opened (:func:`open_case`: the CT with :func:`cmdeploy.io.open_series`, the labels
with :func:`cmdeploy.labels_to_points.open_label_volume`, same slice convention, so slice ``k`` of
both are the same pixels, ``[y, x]``); its objects (:func:`cmdeploy.evaluation.objects.slice_objects`)
are segmented in batches (:meth:`Segmenter.predict_batch`) and each predicted mask is scored against
its component alone (:func:`cmdeploy.evaluation.metrics.score_masks`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmdeploy.annotator import CLICK_PROTOCOLS, DEFAULT_ANNOTATOR, ClickModel
from cmdeploy.errors import InputError
from cmdeploy.evaluation.metrics import MaskScores, score_masks
from cmdeploy.evaluation.objects import EvalObject, slice_objects
from cmdeploy.io.cases import Case
from cmdeploy.labels_to_points import (
    DEFAULT_CONNECTIVITY,
    DEFAULT_MIN_SIZE,
    open_label_volume,
    resolve_label_ids,
)

if TYPE_CHECKING:
    from cmdeploy.io.series import Series
    from cmdeploy.labels_to_points import LabelVolume
    from cmdeploy.segmenter import Segmenter


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
    names = case.label_names or None
    return OpenCase(case, series, labels, names)


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
