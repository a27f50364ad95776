"""Batched segmentation of many objects of one :class:`~cmdeploy.io.series.Series`.

:func:`run_pipeline` takes validated points rows (``slice_index``, ``label``, ``points`` (4, 2)
left/right/top/bottom, each ``(x = column, y = row)``), and:

1. orders the objects by slice (stable, so CSV order within a slice) and cuts them into batches of
   ``batch_size``;
2. in one background thread, reads each needed slice once (only the slices of the batch being
   prepared and the one before it are kept) and prepares the next batch (crop, window, guidance)
   while the main thread runs the model on the current one; a bounded queue (``prefetch`` batches)
   keeps memory flat;
3. pastes every object's probabilities back into its slice and merges them into a per-slice
   ``uint16`` label map: objects with the same label on one slice are OR-ed, ``name#k`` pieces
   count as ``name``, and where different labels overlap the pixel goes to the label with the
   higher probability (first come on ties).

The result is sparse (one (H, W) map per annotated slice), so memory grows with the annotated
slices, not the series length.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from cmdeploy.backends.base import batch_chunks
from cmdeploy.errors import InputError, ModelError
from cmdeploy.points_csv import MAX_LABELS, base_label
from cmdeploy.segmenter import PreparedBatch, Segmenter, check_points, check_slice
from cmdeploy.writers import MaskCrop


class ObjectRow(Protocol):
    """What the pipeline needs of a points row (e.g. :class:`cmdeploy.points_csv.PointsRow`)."""

    slice_index: int
    label: str
    points: np.ndarray


class IncompleteRunError(ModelError):
    """The model failed part-way (e.g. a Triton server went away): ``pending`` holds the input
    positions of the rows that have no result, ``lines`` their CSV lines (0 when unknown)."""

    def __init__(self, cause: BaseException, pending: list[int], lines: list[int], total: int) -> None:
        self.pending = pending
        self.lines = lines
        self.total = total
        shown = [str(n) for n in lines[:20] if n] or [str(i + 1) for i in pending[:20]]
        what = "CSV lines" if any(lines) else "rows"
        more = f" and {len(pending) - 20} more" if len(pending) > 20 else ""
        super().__init__(
            f"{len(pending)} of {total} object(s) not done ({what} {', '.join(shown)}{more}): {cause}"
        )


@dataclass(frozen=True)
class ObjectResult:
    """The outcome for one input row.

    Attributes:
        row: position of the row in the input sequence.
        line: the CSV line of the row (0 when unknown).
        label: the label as given (may carry ``#k``); ``base_label`` without the suffix.
        slice_index: 0-based slice.
        area_px: pixels in the object's own mask (before overlap with other labels is resolved).
        area_mm2: ``area_px`` times the pixel area, None when the series has no pixel spacing.
        prob_mean: mean probability inside the mask (NaN when the mask is empty).
        prob_max: largest probability anywhere on the slice for this object.
    """

    row: int
    line: int
    label: str
    base_label: str
    slice_index: int
    area_px: int
    area_mm2: float | None
    prob_mean: float
    prob_max: float

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["prob_mean"] = None if np.isnan(self.prob_mean) else round(self.prob_mean, 6)
        d["prob_max"] = round(self.prob_max, 6)
        return d


@dataclass
class Timings:
    """Wall-clock seconds per stage. ``read`` and ``preprocess`` run in the background thread and
    overlap ``model``; ``stall`` is time the model thread waited for a batch."""

    read: float = 0.0
    preprocess: float = 0.0
    model: float = 0.0
    postprocess: float = 0.0
    stall: float = 0.0
    total: float = 0.0

    @property
    def overhead_share(self) -> float:
        """Everything but the model as a share of model time: ``(total - model) / model``."""
        return (self.total - self.model) / self.model if self.model > 0 else float("nan")

    def to_dict(self) -> dict[str, float]:
        """Seconds per stage, plus ``overhead_share`` when the model ran."""
        d = {k: round(v, 6) for k, v in self.__dict__.items()}
        if self.model > 0:
            d["overhead_share"] = round(self.overhead_share, 6)
        return d


@dataclass(frozen=True, eq=False)
class LabelMask:  # not slotted: cached_property needs an instance __dict__
    """One base label on one slice after merging, in the writers' object shape.

    ``mask`` (bool (H, W), ``[y, x]``) is computed from the label map on access; writers use
    :meth:`mask_crop` (the mask cut to its bounding box, computed once) so that no full-slice mask
    per object is ever held. ``points`` are the extreme points of the label's first object on that
    slice.
    """

    slice_index: int
    label: str
    value: int
    label_map: np.ndarray = field(repr=False)
    points: np.ndarray | None = None

    @property
    def mask(self) -> np.ndarray:
        return self.label_map == self.value

    @cached_property
    def _crop(self) -> MaskCrop:
        lm = self.label_map
        rows = np.flatnonzero((lm == self.value).any(axis=1))
        if rows.size == 0:
            return MaskCrop(np.zeros((0, 0), dtype=bool), 0, 0)
        band = lm[rows[0] : rows[-1] + 1] == self.value  # only the rows holding the label
        cols = np.flatnonzero(band.any(axis=0))
        crop = band[:, cols[0] : cols[-1] + 1].copy()
        return MaskCrop(crop, int(rows[0]), int(cols[0]))

    def mask_crop(self) -> MaskCrop:
        """The mask cut to its bounding box (:class:`cmdeploy.writers.MaskCrop`)."""
        return self._crop


@dataclass
class PipelineResult:
    """Label maps and per-object results of one series.

    Attributes:
        shape: (H, W) of every slice; num_slices: slices in the series.
        label_maps: sparse label map: slice index -> uint16 (H, W), 0 = background, only for
            annotated slices.
        label_values: base label -> value in the label maps (1, 2, ... in order of first appearance).
        objects: one :class:`ObjectResult` per input row, in input order.
        spacing_xy_mm: pixel spacing (x, y) in mm, or None.
        timings: stage timings.
    """

    shape: tuple[int, int]
    num_slices: int
    label_maps: dict[int, np.ndarray]
    label_values: dict[str, int]
    objects: list[ObjectResult]
    spacing_xy_mm: tuple[float, float] | None = None
    timings: Timings = field(default_factory=Timings)

    @property
    def annotated_slices(self) -> list[int]:
        return sorted(self.label_maps)

    def dense(self) -> np.ndarray:
        """The full uint16 (Z, H, W) label volume (zeros on slices without objects)."""
        out = np.zeros((self.num_slices, *self.shape), dtype=np.uint16)
        for k, m in self.label_maps.items():
            out[k] = m
        return out

    def mask(self, label: str, slice_index: int) -> np.ndarray:
        """bool (H, W) pixels of base label ``label`` on a slice (all False when absent)."""
        m = self.label_maps.get(int(slice_index))
        value = self.label_values.get(base_label(label))
        if m is None or value is None:
            return np.zeros(self.shape, dtype=bool)
        return m == value

    def label_masks(self, rows: Sequence[ObjectRow] | None = None) -> list[LabelMask]:
        """Merged objects for the writers: one :class:`LabelMask` per (slice, base label) that has
        pixels, by slice then label value. ``rows`` (the input rows) supply extreme points."""
        first_points: dict[tuple[int, str], np.ndarray] = {}
        for obj in self.objects:
            key = (obj.slice_index, obj.base_label)
            if rows is not None and key not in first_points:
                first_points[key] = np.asarray(rows[obj.row].points, dtype=np.float32)
        out = []
        for k in self.annotated_slices:
            lm = self.label_maps[k]
            present = set(np.unique(lm).tolist())
            for name, value in self.label_values.items():
                if value in present:
                    out.append(LabelMask(k, name, value, lm, first_points.get((k, name))))
        return out

    def label_summary(self) -> list[dict[str, Any]]:
        """Per base label: value, slices it appears on, area in pixels and mm^2 (after merging)."""
        px_area = None if self.spacing_xy_mm is None else float(np.prod(self.spacing_xy_mm))
        out = []
        for name, value in self.label_values.items():
            slices, area = [], 0
            for k in self.annotated_slices:
                n = int(np.count_nonzero(self.label_maps[k] == value))
                if n:
                    slices.append(k)
                    area += n
            out.append(
                {
                    "label": name,
                    "value": value,
                    "slices": slices,
                    "area_px": area,
                    "area_mm2": None if px_area is None else area * px_area,
                }
            )
        return out


@dataclass
class _Batch:
    rows: list[int]  # positions in the input sequence
    prepared: PreparedBatch


class _SliceMerger:
    """Accumulates one slice's objects into its label map; drops the score map when done."""

    def __init__(self, shape: tuple[int, int], pending: int) -> None:
        self.labels = np.zeros(shape, dtype=np.uint16)
        self.best = np.zeros(shape, dtype=np.float32)
        self.pending = pending

    def add(self, mask: np.ndarray, probs: np.ndarray, window: tuple[slice, slice], value: int) -> None:
        """Merge one object: ``mask``/``probs`` cover ``labels[window]``."""
        best = self.best[window]
        take = mask & (probs > best)
        self.labels[window][take] = value
        best[take] = probs[take]
        self.pending -= 1


def _prefetch(
    batches: Sequence[list[int]],
    rows: Sequence[ObjectRow],
    points: np.ndarray,
    series: Any,
    seg: Segmenter,
    timings: Timings,
    out: queue.Queue,
    stop: threading.Event,
) -> None:
    """Producer thread: read slices (once each) and prepare batches in order into ``out``."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        cache: dict[int, np.ndarray] = {}
        for idx in batches:
            t0 = time.perf_counter()
            needed = sorted({int(rows[i].slice_index) for i in idx})
            cache = {k: cache[k] if k in cache else _read(series, k) for k in needed}
            t1 = time.perf_counter()
            prepared = seg.prepare([cache[int(rows[i].slice_index)] for i in idx], points[idx])
            t2 = time.perf_counter()
            timings.read += t1 - t0
            timings.preprocess += t2 - t1
            if not put(_Batch(idx, prepared)):
                return
        put(None)
    except BaseException as exc:  # handed to the consumer, which re-raises it
        put(exc)


def _read(series: Any, k: int) -> np.ndarray:
    return check_slice(series.slice_hu(k), name=f"slice {k} of the series")


def run_pipeline(
    segmenter: Segmenter,
    series: Any,
    rows: Sequence[ObjectRow],
    *,
    batch_size: int | None = None,
    prefetch: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PipelineResult:
    """Segment every row's object on its slice of ``series``.

    Args:
        segmenter: a loaded :class:`~cmdeploy.segmenter.Segmenter`.
        series: a :class:`~cmdeploy.io.series.Series` (``shape``, ``num_slices``,
            ``spacing_xy_mm``, ``slice_hu(k)``).
        rows: objects (``slice_index``, ``label``, ``points`` (4, 2)), e.g. from
            :func:`cmdeploy.points_csv.read_points_csv`.
        batch_size: objects per model call (default: the segmenter's).
        prefetch: prepared batches that may wait in the queue (1 or 2 is plenty).
        progress: called with the number of objects finished after every batch.

    Raises :class:`InputError` for a bad row (slice out of range, bad points) before any inference.
    """
    t_start = time.perf_counter()
    size = int(batch_size or segmenter.batch_size)
    if size < 1:
        raise InputError(f"batch_size must be >= 1, got {size}")
    shape = tuple(int(d) for d in series.shape)
    n_slices = int(series.num_slices)
    spacing = getattr(series, "spacing_xy_mm", None)

    # validate everything up front
    problems = []
    points = np.zeros((len(rows), 4, 2), dtype=np.float32)
    label_values: dict[str, int] = {}
    for i, r in enumerate(rows):
        where = f"row {i + 1}" + (f" (line {r.line})" if getattr(r, "line", 0) else "")
        k = int(r.slice_index)
        if not 0 <= k < n_slices:
            problems.append(f"{where}: slice_index {k} outside 0..{n_slices - 1}")
        name = base_label(str(r.label))
        if not name:
            problems.append(f"{where}: empty label")
        else:
            label_values.setdefault(name, len(label_values) + 1)
        try:
            points[i] = check_points(r.points, shape, name="points")
        except InputError as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise InputError(f"{len(problems)} invalid object(s):\n  " + "\n  ".join(problems))
    if len(label_values) > MAX_LABELS:
        raise InputError(f"{len(label_values)} distinct labels; at most {MAX_LABELS} fit a uint16 map")

    order = sorted(range(len(rows)), key=lambda i: int(rows[i].slice_index))
    pending: dict[int, int] = {}
    for r in rows:
        pending[int(r.slice_index)] = pending.get(int(r.slice_index), 0) + 1

    timings = Timings()
    q: queue.Queue = queue.Queue(maxsize=max(1, int(prefetch)))
    stop = threading.Event()
    batches = [order[a:b] for a, b in batch_chunks(len(order), size)]
    producer = threading.Thread(
        target=_prefetch,
        args=(batches, rows, points, series, segmenter, timings, q, stop),
        name="cmdeploy-prefetch",
        daemon=True,
    )
    px_area = None if spacing is None else float(spacing[0]) * float(spacing[1])
    mergers: dict[int, _SliceMerger] = {}
    label_maps: dict[int, np.ndarray] = {}
    results: list[ObjectResult | None] = [None] * len(rows)
    done = 0
    producer.start()
    try:
        while True:
            t0 = time.perf_counter()
            item = q.get()
            t1 = time.perf_counter()
            timings.stall += t1 - t0
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            try:
                output = segmenter.infer(item.prepared)
            except ModelError as exc:
                pending_rows = [i for i in order if results[i] is None]
                lines = [int(getattr(rows[i], "line", 0) or 0) for i in pending_rows]
                raise IncompleteRunError(exc, pending_rows, lines, len(rows)) from exc
            t2 = time.perf_counter()
            for j, i in enumerate(item.rows):
                r = rows[i]
                k = int(r.slice_index)
                probs, window = segmenter.slice_window(item.prepared, output, j)
                origin = (window[1].start or 0, window[0].start or 0)
                mask = segmenter.to_mask(probs, item.prepared.points[j], origin)
                area = int(np.count_nonzero(mask))
                name = base_label(str(r.label))
                merger = mergers.get(k) or mergers.setdefault(k, _SliceMerger(shape, pending[k]))
                merger.add(mask, probs, window, label_values[name])
                if merger.pending == 0:
                    label_maps[k] = merger.labels
                    del mergers[k]
                results[i] = ObjectResult(
                    row=i,
                    line=int(getattr(r, "line", 0) or 0),
                    label=str(r.label),
                    base_label=name,
                    slice_index=k,
                    area_px=area,
                    area_mm2=None if px_area is None else area * px_area,
                    prob_mean=float(probs[mask].mean()) if area else float("nan"),
                    prob_max=float(probs.max()) if probs.size else 0.0,
                )
            timings.model += t2 - t1
            timings.postprocess += time.perf_counter() - t2
            done += len(item.rows)
            if progress is not None:
                progress(done)
    finally:
        stop.set()
        producer.join()
    timings.total = time.perf_counter() - t_start
    return PipelineResult(
        shape=shape,  # type: ignore[arg-type]
        num_slices=n_slices,
        label_maps=dict(sorted(label_maps.items())),
        label_values=label_values,
        objects=[r for r in results if r is not None],
        spacing_xy_mm=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        timings=timings,
    )
