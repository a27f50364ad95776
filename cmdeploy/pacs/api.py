"""The script-facing PACS API: connect, fetch a series into a temporary folder, segment, send the SEG.

    >>> from cmdeploy import Segmenter
    >>> from cmdeploy.pacs import connect, segment_series
    >>> pacs = connect("dicomweb:http://pacs:8042/dicom-web", timeout=30, retries=3)
    >>> result = segment_series(pacs, study_uid, series_uid, "points.csv",
    ...                         segmenter=Segmenter.load(), send_to=pacs)
    >>> result.sent, result.num_objects, result.timings        # True, 2, {'fetch': 0.41, ...}

Every operation retries transient failures (refused/dropped connections, timeouts, HTTP
429/502/503/504) with exponential back-off, and raises a :class:`~cmdeploy.pacs.errors.PacsError`
subclass (naming the PACS, the operation and its status code; never patient data) otherwise.
Retrieved instances live in a temporary folder that is removed when the work is done, also on
errors and on Ctrl-C (KeyboardInterrupt).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmdeploy.pacs.endpoints import (
    DicomWebEndpoint,
    DimseEndpoint,
    Endpoint,
    PacsOptions,
    parse_endpoint,
)
from cmdeploy.pacs.errors import PacsError
from cmdeploy.pacs.retry import with_retries

if TYPE_CHECKING:
    from cmdeploy.pacs.dicomweb import DicomWebPacs
    from cmdeploy.pacs.dimse import DimsePacs
    from cmdeploy.points_csv import PointsRow
    from cmdeploy.segmenter import Segmenter

    Pacs = DicomWebPacs | DimsePacs

TEMP_PREFIX = "cmdeploy-pacs-"
RetryHook = Callable[[PacsError, int, float], None]


def connect(
    address: str | Endpoint,
    options: PacsOptions | None = None,
    *,
    calling_aet: str | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    backoff: float | None = None,
    session: Any = None,
    headers: dict[str, str] | None = None,
) -> Pacs:
    """A PACS client for ``dicomweb:URL`` or ``dimse:AET@HOST:PORT`` (or a parsed endpoint).

    Keyword arguments override fields of ``options`` (see :class:`PacsOptions`); ``session`` and
    ``headers`` (authentication) apply to DICOMweb only. Nothing is sent until an operation runs.
    """
    ep = parse_endpoint(address) if isinstance(address, str) else address
    base = options or PacsOptions()
    opts = PacsOptions(
        calling_aet=base.calling_aet if calling_aet is None else calling_aet,
        timeout=base.timeout if timeout is None else float(timeout),
        retries=base.retries if retries is None else int(retries),
        backoff=base.backoff if backoff is None else float(backoff),
    )
    if isinstance(ep, DicomWebEndpoint):
        from cmdeploy.pacs.dicomweb import DicomWebPacs

        return DicomWebPacs(ep, opts, session=session, headers=headers)
    if isinstance(ep, DimseEndpoint):
        from cmdeploy.pacs.dimse import DimsePacs

        return DimsePacs(ep, opts)
    raise TypeError(f"not a PACS endpoint: {type(ep).__name__}")


def _retrying(pacs: Pacs, operation: Callable[[], Any], on_retry: RetryHook | None) -> Any:
    opts = pacs.options
    return with_retries(operation, retries=opts.retries, backoff=opts.backoff, on_retry=on_retry)


def check(pacs: Pacs, *, on_retry: RetryHook | None = None) -> None:
    """Check that the PACS answers (DICOMweb: a QIDO-RS query; DIMSE: C-ECHO), with retries."""
    _retrying(pacs, pacs.check, on_retry)


def _empty(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def fetch_series(
    pacs: Pacs,
    study_uid: str,
    series_uid: str,
    folder: str | Path,
    *,
    progress: Callable[[int, int | None], None] | None = None,
    on_retry: RetryHook | None = None,
) -> list[Path]:
    """Retrieve every instance of the series into ``folder`` (emptied before each attempt).

    Returns the written files. ``progress(received, expected)`` after each instance.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def attempt() -> list[Path]:
        _empty(folder)
        return pacs.fetch_series(study_uid, series_uid, folder, progress=progress)

    return _retrying(pacs, attempt, on_retry)


@contextmanager
def temporary_folder(tmp_dir: str | Path | None = None) -> Iterator[Path]:
    """A fresh ``cmdeploy-pacs-*`` folder, removed with everything in it when the block ends
    (normally, on an exception, or on KeyboardInterrupt)."""
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=None if tmp_dir is None else str(tmp_dir)))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def retrieved_series(
    pacs: Pacs,
    study_uid: str,
    series_uid: str,
    *,
    tmp_dir: str | Path | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    on_retry: RetryHook | None = None,
) -> Iterator[Path]:
    """Fetch the series into a temporary folder and yield the folder; it is always removed.

        >>> with retrieved_series(pacs, study_uid, series_uid) as folder:
        ...     series = cmdeploy.io.open_series(folder, series_uid=series_uid)
    """
    with temporary_folder(tmp_dir) as folder:
        fetch_series(pacs, study_uid, series_uid, folder, progress=progress, on_retry=on_retry)
        yield folder


def send(pacs: Pacs, instances: Sequence[Any], *, on_retry: RetryHook | None = None) -> None:
    """Store DICOM instances (pydicom datasets or file paths) on the PACS (STOW-RS or C-STORE)."""
    import pydicom

    datasets = [ds if isinstance(ds, pydicom.Dataset) else pydicom.dcmread(ds) for ds in instances]
    if datasets:
        _retrying(pacs, lambda: pacs.store(datasets), on_retry)


@dataclass
class PacsSegmentation:
    """What :func:`segment_series` did.

    Attributes:
        seg: the DICOM SEG dataset (None when every mask was empty).
        sent: whether it was stored on ``send_to``.
        num_instances: instances retrieved.
        num_objects: objects segmented (rows of the points).
        label_values: label -> segment number.
        areas_px: label -> total mask area in pixels over all slices.
        timings: seconds for ``fetch``, ``segment`` (read slices + model), ``seg`` (build the SEG),
            ``send`` and ``total``.
    """

    seg: Any
    sent: bool
    num_instances: int
    num_objects: int
    label_values: dict[str, int]
    areas_px: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def segment_series(
    source: Pacs,
    study_uid: str,
    series_uid: str,
    points: str | Path | Sequence[PointsRow],
    *,
    segmenter: Segmenter | None = None,
    send_to: Pacs | None = None,
    tmp_dir: str | Path | None = None,
    on_retry: RetryHook | None = None,
) -> PacsSegmentation:
    """Fetch a series, segment the objects of ``points`` with ``segmenter``, build one DICOM SEG
    referencing the series and (if ``send_to`` is given) store it there.

    ``points`` is a points CSV (rows keyed by ``slice_index`` and/or ``sop_instance_uid``, as for
    ``cmdeploy infer``) or :class:`~cmdeploy.points_csv.PointsRow` objects. Segmentation runs the
    same batched pipeline over :class:`~cmdeploy.Segmenter` as ``cmdeploy infer``, so the masks
    equal those of the CLI on the same series. Raises :class:`~cmdeploy.errors.InputError` for bad
    points or a series cmdeploy cannot read, :class:`PacsError` for PACS failures.
    """
    from cmdeploy.io import open_series
    from cmdeploy.pipeline import run_pipeline
    from cmdeploy.points_csv import read_points_csv
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.writers.dicom_seg import build_dicom_seg

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    seg_model = segmenter if segmenter is not None else Segmenter.load()
    with retrieved_series(source, study_uid, series_uid, tmp_dir=tmp_dir, on_retry=on_retry) as folder:
        t1 = time.perf_counter()
        timings["fetch"] = t1 - t0
        n_instances = sum(1 for _ in folder.iterdir())
        series = open_series(folder, series_uid=series_uid)
        rows = read_points_csv(points, series) if isinstance(points, str | Path) else list(points)
        result = run_pipeline(seg_model, series, rows)
        t2 = time.perf_counter()
        timings["segment"] = t2 - t1
        objects = result.label_masks(rows)
        seg = build_dicom_seg(series, objects, values=result.label_values) if objects else None
        timings["seg"] = time.perf_counter() - t2
    areas: dict[str, int] = {}
    for o in objects:
        areas[str(o.label)] = areas.get(str(o.label), 0) + int(o.mask.sum())
    sent = False
    if seg is not None and send_to is not None:
        t3 = time.perf_counter()
        send(send_to, [seg], on_retry=on_retry)
        timings["send"] = time.perf_counter() - t3
        sent = True
    timings["total"] = time.perf_counter() - t0
    return PacsSegmentation(
        seg=seg,
        sent=sent,
        num_instances=n_instances,
        num_objects=len(rows),
        label_values=dict(result.label_values),
        areas_px=areas,
        timings=timings,
    )


__all__ = [
    "PacsSegmentation",
    "check",
    "connect",
    "fetch_series",
    "retrieved_series",
    "segment_series",
    "send",
    "temporary_folder",
]
