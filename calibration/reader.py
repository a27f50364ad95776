"""The calibration data reader: real preprocessed crops, streamed batch by batch.

:class:`SliceCalibrationReader` is an ``onnxruntime.quantization.CalibrationDataReader``: each
``get_next()`` returns ``{input_name: (B, C, S, S) float32}`` built by
:func:`cmdeploy.preprocess.prepare_batch` - the single preprocessing implementation shared with
training and the runtime - from real (slice, extreme points) objects
(:class:`~cmdeploy.calibration.slices.SliceObject`). Batches are prepared on demand, so a large
calibration set never sits in memory as network inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from cmdeploy.calibration.slices import SliceObject
from cmdeploy.preprocess import prepare_batch
from cmdeploy.spec import ModelSpec

DEFAULT_BATCH = 8


def prepare_objects(objects: Sequence[SliceObject], spec: ModelSpec) -> np.ndarray:
    """Network inputs (N, C, S, S) float32 of ``objects`` (crop transforms dropped)."""
    x, _ = prepare_batch([o.slice_hu for o in objects], [o.points for o in objects], spec)
    return x


class SliceCalibrationReader(CalibrationDataReader):
    """Streams ``prepare_batch`` inputs of ``objects``, ``batch_size`` objects per call.

    Args:
        objects: the calibration objects (slice, points), in order.
        spec: the model's :class:`ModelSpec` (crop size, guidance, window, normalisation).
        input_name: the model's input name.
        batch_size: objects per batch (the last batch may be smaller).

    ``set_range(start, end)`` restricts the reader to batches ``[start, end)`` (ORT's
    ``CalibStridedMinMax`` protocol); ``rewind()`` starts over.
    """

    def __init__(
        self,
        objects: Sequence[SliceObject],
        spec: ModelSpec,
        *,
        input_name: str = "input",
        batch_size: int = DEFAULT_BATCH,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not objects:
            raise ValueError("calibration needs at least one object")
        self.objects = list(objects)
        self.spec = spec
        self.input_name = input_name
        self.batch_size = batch_size
        self._start, self._end = 0, self.num_batches
        self._next = 0

    @property
    def num_batches(self) -> int:
        return -(-len(self.objects) // self.batch_size)

    def __len__(self) -> int:
        return self._end - self._start

    def batch(self, index: int) -> np.ndarray:
        """The (B, C, S, S) float32 input of batch ``index``."""
        a = index * self.batch_size
        return prepare_objects(self.objects[a : a + self.batch_size], self.spec)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        x = self.batch(self._next)
        self._next += 1
        return {self.input_name: x}

    def rewind(self) -> None:
        self._next = self._start

    def set_range(self, start_index: int, end_index: int) -> None:
        self._start = max(0, int(start_index))
        self._end = min(self.num_batches, int(end_index))
        self._next = self._start


class _OneBatch(CalibrationDataReader):
    """A reader yielding a single prepared batch (feeds a calibrator chunk by chunk)."""

    def __init__(self, feeds: dict[str, np.ndarray]) -> None:
        self._feeds: dict[str, np.ndarray] | None = feeds

    def get_next(self) -> dict[str, np.ndarray] | None:
        feeds, self._feeds = self._feeds, None
        return feeds


__all__ = ["DEFAULT_BATCH", "SliceCalibrationReader", "prepare_objects"]
