"""One shared :class:`~cmdeploy.Segmenter` for every request: :class:`MicroBatcher`.

Request threads call :meth:`MicroBatcher.submit` and block on the returned future. One worker
thread takes the first waiting request, gathers whatever else arrives within ``max_wait_ms`` (or
until ``max_batch`` requests), and runs them as one ``Segmenter.predict_batch`` call, so several
annotators clicking at once share model calls instead of queueing one by one. Results are the
float32 (H, W) probabilities of ``predict_batch(..., return_probabilities=True)``; callers turn
them into the mask with ``segmenter.to_mask(probabilities, points)``, exactly ``predict``'s.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchResult:
    """One request's answer: probabilities (H, W) float32, the model call's wall time in ms
    (shared by the whole batch) and how many requests that call held."""

    probabilities: np.ndarray
    model_ms: float
    batch_size: int


@dataclass
class _Job:
    slice_hu: np.ndarray
    points: np.ndarray
    future: Future


class MicroBatcher:
    """Gather concurrent segment requests into ``predict_batch`` calls on one Segmenter."""

    def __init__(self, segmenter, *, max_wait_ms: float = 2.0, max_batch: int = 16) -> None:
        self.segmenter = segmenter
        self.max_wait_s = max(float(max_wait_ms), 0.0) / 1000.0
        self.max_batch = max(int(max_batch), 1)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="cmdeploy-batcher", daemon=True)
        self._worker.start()

    def submit(self, slice_hu: np.ndarray, points: np.ndarray) -> Future:
        """Queue one object: (H, W) HU slice and (4, 2) points left, right, top, bottom, (x, y).

        The future holds a :class:`BatchResult`, or the exception ``predict_batch`` raised
        (e.g. :class:`~cmdeploy.errors.InputError` for points outside the slice).
        """
        fut: Future = Future()
        self._queue.put(_Job(slice_hu, np.asarray(points, np.float32), fut))
        return fut

    def predict(self, slice_hu: np.ndarray, points: np.ndarray, timeout: float | None = 60.0) -> BatchResult:
        """:meth:`submit` and wait for the answer."""
        return self.submit(slice_hu, points).result(timeout=timeout)

    def close(self) -> None:
        """Stop the worker after the requests already queued."""
        self._queue.put(None)
        self._worker.join(timeout=10)

    def _gather(self, first: _Job) -> tuple[list[_Job], bool]:
        jobs, stop = [first], False
        deadline = time.perf_counter() + self.max_wait_s
        while len(jobs) < self.max_batch:
            try:
                left = deadline - time.perf_counter()
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                stop = True
                break
            jobs.append(job)
        return jobs, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, stop = self._gather(first)
            self._process(jobs)
            if stop:
                return

    def _process(self, jobs: list[_Job]) -> None:
        t0 = time.perf_counter()
        try:
            probs = self.segmenter.predict_batch(
                [j.slice_hu for j in jobs], [j.points for j in jobs], return_probabilities=True
            )
        except Exception:  # one bad item must not fail its neighbours: retry them one by one
            if len(jobs) > 1:
                for j in jobs:
                    self._process([j])
                return
            import sys

            jobs[0].future.set_exception(sys.exc_info()[1])  # type: ignore[arg-type]
            return
        ms = (time.perf_counter() - t0) * 1000.0
        for j, p in zip(jobs, probs, strict=True):
            j.future.set_result(BatchResult(p, ms, len(jobs)))
