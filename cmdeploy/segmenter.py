"""The embeddable predictor: :class:`Segmenter` (cf. segment-anything's ``SamPredictor``).

    >>> from cmdeploy import Segmenter
    >>> seg = Segmenter.load()                      # embedded default, or a .onnx / .engine path
    >>> mask = seg.predict(slice_hu, points)        # (H, W) HU, (4, 2) -> bool (H, W)
    >>> probs = seg.predict(slice_hu, points, return_probabilities=True)  # float32 (H, W)

Points are (4, 2) in the order left, right, top, bottom, each ``(x, y)`` with x = column and y = row
of the slice in pixels (pixel centres at integers). Slices are 2-D Hounsfield-unit arrays indexed
``[y, x]``.

Two model layouts are recognised from the model's inputs:

* **plain**: one input ``(N, C, S, S)`` (named ``input``) -> ``logits`` ``(N, 1, S, S)``. Cropping,
  windowing and guidance happen in NumPy (:func:`cmdeploy.preprocess.prepare_batch`); the sigmoid of
  the logits is pasted back into the slice (0 outside the crop's footprint).
* **fused**: inputs ``slices`` ``(B, H, W)`` float32 HU and ``points`` ``(B, 4, 2)`` ->
  ``probabilities`` ``(B, H, W)``; preprocessing runs inside the model. Items are grouped by slice
  shape, one model call per shape and chunk.

The threshold (``probability > spec.threshold``) comes from the model's :class:`ModelSpec`.
``tta="flip"`` averages each object's probabilities with those of its left-right mirror image (the
crop and its guidance mirrored about the crop's centre column for plain models, the slice and points
mirrored for fused ones): twice the model time, off by default (measured in docs/model-card.md).
The three stages (:meth:`Segmenter.prepare`, :meth:`Segmenter.infer`,
:meth:`Segmenter.slice_probabilities`) are public so that :mod:`cmdeploy.pipeline` can overlap
preprocessing with inference.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmdeploy.backends.base import Runner, batch_chunks, run_batched
from cmdeploy.errors import InputError, ModelError
from cmdeploy.geometry import CropTransform, paste_window
from cmdeploy.guidance import validate_points
from cmdeploy.hashing import file_sha256
from cmdeploy.preprocess import prepare_batch, sigmoid
from cmdeploy.spec import ModelSpec

Backend = Literal["auto", "onnxruntime", "tensorrt"]
BACKENDS = ("auto", "onnxruntime", "tensorrt")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
FUSED_INPUTS = ("slices", "points")
# predict_batch prepares the next batch while the model runs (measured in benchmarks/bench_prepare.py)
OVERLAP_DEFAULT = True
# onnxruntime intra-op workers sleep when idle instead of spinning (measured there too)
SPINNING_DEFAULT = False
# how far (pixels) a point may lie outside the pixel-centre grid [0, W-1] x [0, H-1]
POINT_MARGIN = 0.5
# test-time augmentation: none, or the mean with the left-right mirror image
TTA_MODES = ("none", "flip")


def check_slice(slice_hu: Any, *, name: str = "slice") -> np.ndarray:
    """A finite, numeric 2-D (H, W) slice as float32; :class:`InputError` otherwise."""
    if not (isinstance(slice_hu, (np.ndarray, list, tuple)) or hasattr(slice_hu, "__array__")):
        raise InputError(
            f"{name} must be a 2-D (H, W) NumPy array of HU, got {type(slice_hu).__name__}"
        )
    try:
        arr = np.asarray(slice_hu)
    except (ValueError, TypeError):
        raise InputError(f"{name} must be a 2-D (H, W) array of HU (ragged or not numeric)") from None
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D (H, W) array of HU, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise InputError(
            f"{name} must be numeric HU (integer or float), got dtype {arr.dtype}"
            + (" (a mask, not an image?)" if arr.dtype.kind == "b" else "")
        )
    if min(arr.shape) < 2:
        raise InputError(f"{name} must be at least 2 x 2 pixels, got shape {arr.shape}")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or inf")
    return arr


def check_points(points: Any, shape: tuple[int, int], *, name: str = "points") -> np.ndarray:
    """Validated (4, 2) float32 extreme points inside an (H, W) slice; :class:`InputError` otherwise.

    Order left, right, top, bottom, each (x = column, y = row); see
    :func:`cmdeploy.guidance.validate_points`. Points may lie at most 0.5 px outside the pixel grid.
    """
    if not (isinstance(points, (np.ndarray, list, tuple)) or hasattr(points, "__array__")):
        raise InputError(
            f"{name} must be a (4, 2) array (left, right, top, bottom; each (x, y)), "
            f"got {type(points).__name__}"
        )
    try:
        arr = np.asarray(points)
    except (ValueError, TypeError):
        raise InputError(f"{name} must be a (4, 2) array of numbers (ragged or not numeric)") from None
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{name} must be integer or float pixel coordinates, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise InputError(
            f"{name} must have shape (4, 2) (left, right, top, bottom; each (x, y)), "
            f"got shape {arr.shape}"
        )
    try:
        pts = validate_points(points, name=name)[0]
    except ValueError as exc:
        raise InputError(str(exc)) from None
    h, w = shape
    m = POINT_MARGIN
    outside = (pts[:, 0] < -m) | (pts[:, 0] > w - 1 + m) | (pts[:, 1] < -m) | (pts[:, 1] > h - 1 + m)
    if outside.any():
        which = [("left", "right", "top", "bottom")[i] for i in np.nonzero(outside)[0]]
        raise InputError(
            f"{name}: {', '.join(which)} point(s) lie outside the {h} x {w} slice "
            f"(x must be in [0, {w - 1}], y in [0, {h - 1}]): {pts.tolist()}"
        )
    return pts.astype(np.float32)


def mirror_points(points: np.ndarray, width: int) -> np.ndarray:
    """(N, 4, 2) extreme points of the left-right mirror image of slices ``width`` px wide:
    ``x -> width - 1 - x``, and the left and right points swap places."""
    out = np.asarray(points, np.float32)[:, [1, 0, 2, 3]].copy()
    out[:, :, 0] = np.float32(width - 1) - out[:, :, 0]
    return out


@dataclass
class PreparedBatch:
    """Model-ready inputs of N objects (from :meth:`Segmenter.prepare`).

    Attributes:
        slice_shapes: (H, W) of each object's slice.
        inputs: plain models: (N, C, S, S) float32 network input.
        transforms: plain models: the crop transform of each object.
        slices: fused models: each object's (H, W) float32 HU slice (references, not copies).
        points: (N, 4, 2) float32 extreme points in slice pixels.
    """

    slice_shapes: list[tuple[int, int]]
    points: np.ndarray
    inputs: np.ndarray | None = None
    transforms: list[CropTransform] = field(default_factory=list)
    slices: list[np.ndarray] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.slice_shapes)


class Segmenter:
    """Extreme-point segmentation with one loaded model; build with :meth:`Segmenter.load`.

    Attributes:
        spec: the model's :class:`~cmdeploy.spec.ModelSpec`.
        backend: ``"onnxruntime"`` or ``"tensorrt"``.
        model_path: the model file.
        fused: True when the model does its own preprocessing (inputs ``slices``, ``points``).
        batch_size: most objects per model call.
        tta: ``"none"`` or ``"flip"`` (mean of the object's and its mirror image's probabilities).
        overlap: :meth:`predict_batch` prepares batch k+1 in a worker thread while the model runs
            batch k (when there is more than one batch); see ``docs/results.md`` for the measured
            effect on a 2-core machine.
    """

    overlap: bool = OVERLAP_DEFAULT

    def __init__(
        self,
        runner: Runner,
        spec: ModelSpec,
        *,
        model_path: Path,
        backend: str,
        batch_size: int = 16,
        tta: str = "none",
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        if tta not in TTA_MODES:
            raise InputError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        self.tta = tta
        self._runner = runner
        self.spec = spec
        self.model_path = Path(model_path)
        self.backend = backend
        self.batch_size = int(batch_size)
        names = list(runner.input_names)
        self.fused = sorted(names) == sorted(FUSED_INPUTS)
        outs = list(runner.output_names)
        if self.fused:
            self._output = "probabilities" if "probabilities" in outs else outs[0]
        else:
            if len(names) != 1:
                raise ModelError(
                    f"{self.model_path.name}: expected one input (N, C, S, S) or the fused inputs "
                    f"{list(FUSED_INPUTS)}, got inputs {names}"
                )
            self._input = names[0]
            self._output = "logits" if "logits" in outs else outs[0]
            self._check_plain_shape()

    def _check_plain_shape(self) -> None:
        shape = self._runner.input_shapes.get(self._input)
        if not shape or len(shape) != 4:
            return
        _, c, h, w = shape
        want = (self.spec.num_channels, self.spec.input_size, self.spec.input_size)
        got = (c, h, w)
        if any(g is not None and g > 0 and g != x for g, x in zip(got, want, strict=True)):
            raise ModelError(
                f"{self.model_path.name}: input {self._input!r} has shape {shape}, but its spec "
                f"asks for (N, {want[0]}, {want[1]}, {want[2]}) (channels {self.spec.channels})"
            )

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        *,
        backend: Backend = "auto",
        threads: int | None = None,
        batch_size: int = 16,
        device: str = "cpu",
        spinning: bool | None = SPINNING_DEFAULT,
        tta: str = "none",
    ) -> Segmenter:
        """Load a model and its :class:`ModelSpec`.

        Args:
            path: ``.onnx`` model or TensorRT ``.engine``/``.plan`` (with its JSON sidecar); None =
                the embedded default (:func:`cmdeploy.models.default_model_path`).
            backend: ``"auto"`` (by file suffix), ``"onnxruntime"`` or ``"tensorrt"``.
            threads: onnxruntime intra-op threads (None = one per core).
            batch_size: most objects per model call.
            device: onnxruntime device, ``"cpu"`` or ``"cuda"``.
            spinning: onnxruntime's idle worker threads busy-wait (None = onnxruntime's own default,
                on). Off by default: on 2 cores the spinning workers took the core the overlapped
                preparation needs, and slowed the model itself when other jobs ran
                (``benchmarks/bench_prepare.py``, ``docs/results.md``).
            tta: ``"none"`` or ``"flip"``: also segment the left-right mirror image and average the
                probabilities (twice the model time).

        Raises :class:`ModelError` when the model cannot be loaded or carries no cmdeploy spec.
        """
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise InputError(f"threads must be None (one per core) or an integer >= 1, got {threads!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise InputError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if device not in ("cpu", "cuda"):
            raise InputError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if tta not in TTA_MODES:
            raise InputError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        if path is None:
            from cmdeploy.models import default_model_path

            path = default_model_path()
        if not isinstance(path, (str, Path)):
            raise InputError(f"path must be a str or Path to a model file, got {type(path).__name__}")
        path = Path(path)
        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not path.is_file():
            raise InputError(f"model file {path} not found")
        if backend == "auto":
            backend = "tensorrt" if path.suffix.lower() in ENGINE_SUFFIXES else "onnxruntime"
        if backend == "tensorrt":
            from cmdeploy.backends.tensorrt import TensorRTRunner

            runner: Runner = TensorRTRunner(path)
            spec = runner.spec
        else:
            if path.suffix.lower() in ENGINE_SUFFIXES:
                raise ModelError(f"{path.name} is a TensorRT engine; use backend 'tensorrt'")
            from cmdeploy.backends.onnxruntime import OnnxRuntimeRunner

            runner = OnnxRuntimeRunner(path, threads=threads, device=device, spinning=spinning)
            try:
                spec = ModelSpec.from_metadata(runner.metadata)
            except (ValueError, TypeError) as exc:
                raise ModelError(f"{path.name}: cannot read its model spec: {exc}") from exc
        return cls(runner, spec, model_path=path, backend=backend, batch_size=batch_size, tta=tta)

    @cached_property
    def model_sha256(self) -> str:
        """Hex SHA-256 of the model file (computed on first use)."""
        return file_sha256(self.model_path)

    @property
    def threshold(self) -> float:
        """Probability above which a pixel is foreground (from the spec)."""
        return self.spec.threshold

    def to_mask(self, probs: np.ndarray, points: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
        """The mask of one object: ``probs > threshold``, then the spec's post-processing.

        ``probs`` covers the slice window whose top-left pixel is ``origin`` = (x0, y0); ``points``
        (4, 2) are in slice coordinates (x, y). Every way in (``predict``, the pipeline, servers)
        turns probabilities into masks here.
        """
        mask = probs > np.float32(self.threshold)
        if self.spec.postprocess == "none" or not mask.any():
            return mask
        from cmdeploy.postprocess import postprocess_mask

        local = np.asarray(points, np.float64) - np.asarray(origin, np.float64)
        return postprocess_mask(mask, local, self.spec.postprocess)

    def __repr__(self) -> str:
        kind = "fused" if self.fused else "plain"
        return (
            f"Segmenter({self.model_path.name!r}, backend={self.backend!r}, {kind}, "
            f"input_size={self.spec.input_size}, guidance={self.spec.guidance!r}, "
            f"batch_size={self.batch_size}" + (f", tta={self.tta!r})" if self.tta != "none" else ")")
        )

    # ------------------------------------------------------------------------------ stages
    def prepare(self, slices: Sequence[np.ndarray], points: np.ndarray) -> PreparedBatch:
        """Stage 1: model inputs for already validated float32 slices and (N, 4, 2) points.

        ``slices[i]`` is the slice of object ``i`` (the same array may repeat). Plain models get
        the crop/window/guidance tensor; fused models only stack references.
        """
        pts = np.asarray(points, dtype=np.float32).reshape(-1, 4, 2)
        shapes = [tuple(s.shape) for s in slices]
        if self.fused:
            return PreparedBatch(slice_shapes=shapes, points=pts, slices=list(slices))
        inputs, transforms = prepare_batch(slices, pts, self.spec)
        return PreparedBatch(slice_shapes=shapes, points=pts, inputs=inputs, transforms=transforms)

    def infer(self, batch: PreparedBatch) -> list[np.ndarray] | np.ndarray:
        """Stage 2: run the model. Plain: (N, S, S) float32 crop probabilities; fused: a list of
        N (H, W) float32 slice probabilities."""
        if len(batch) == 0:
            s = self.spec.input_size
            return [] if self.fused else np.zeros((0, s, s), np.float32)
        return self._infer_fused(batch) if self.fused else self._infer_plain(batch)

    def slice_probabilities(
        self, batch: PreparedBatch, output: list[np.ndarray] | np.ndarray, i: int
    ) -> np.ndarray:
        """Stage 3: object ``i``'s probabilities in its slice, float32 (H, W), 0 outside the crop."""
        if self.fused:
            return output[i]
        full = np.zeros(batch.slice_shapes[i], dtype=np.float32)
        probs, window = self.slice_window(batch, output, i)
        full[window] = probs
        return full

    def slice_window(
        self, batch: PreparedBatch, output: list[np.ndarray] | np.ndarray, i: int
    ) -> tuple[np.ndarray, tuple[slice, slice]]:
        """Like :meth:`slice_probabilities`, but only over the crop's footprint in the slice.

        Returns ``(probs, (rows, cols))``: ``full[rows, cols] == probs`` and ``full`` is 0 outside
        the window (plain models; fused models return the whole slice). The window may be empty.
        """
        h, w = batch.slice_shapes[i]
        if self.fused:
            return output[i], (slice(0, h), slice(0, w))
        return paste_window(np.asarray(output[i], np.float32), batch.transforms[i], (h, w))

    def _infer_plain(self, batch: PreparedBatch) -> np.ndarray:
        x = batch.inputs
        assert x is not None
        n = len(x)
        s = self.spec.input_size
        if self.tta == "flip":  # the mirror of a crop is the crop of the mirror, about column (S-1)/2
            x = np.concatenate([x, x[..., ::-1]])
        logits = np.asarray(self._run({self._input: x}))
        if logits.ndim != 4 or logits.shape[1] != 1 or logits.shape[2:] != (s, s) or len(logits) != len(x):
            raise ModelError(
                f"{self.model_path.name}: output {self._output!r} has shape {logits.shape}, "
                f"expected (N, 1, {s}, {s})"
            )
        probs = sigmoid(logits[:, 0])
        if self.tta == "flip":
            probs = (probs[:n] + probs[n:, :, ::-1]) * np.float32(0.5)
        return probs

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """The model's output for any number of items, ``batch_size`` (within its range) per call."""
        return run_batched(self._runner, feeds, batch_size=self.batch_size)[self._output]

    def _infer_fused(self, batch: PreparedBatch) -> list[np.ndarray]:
        result: list[np.ndarray | None] = [None] * len(batch)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(batch.slice_shapes):
            groups.setdefault(shape, []).append(i)
        for shape, idx in groups.items():
            slices = np.stack([batch.slices[i] for i in idx]).astype(np.float32, copy=False)
            points = batch.points[idx]
            if self.tta == "flip":
                slices, points = np.concatenate([slices, slices[:, :, ::-1]]), np.concatenate(
                    [points, mirror_points(points, shape[1])]
                )
            probs = np.asarray(self._run({"slices": slices, "points": points}), np.float32)
            if probs.shape != (len(slices), *shape):
                raise ModelError(
                    f"{self.model_path.name}: output {self._output!r} has shape {probs.shape}, "
                    f"expected (B, {shape[0]}, {shape[1]})"
                )
            if self.tta == "flip":
                k = len(idx)
                probs = (probs[:k] + probs[k:, :, ::-1]) * np.float32(0.5)
            for j, i in enumerate(idx):
                result[i] = probs[j]
        return result  # type: ignore[return-value]

    def _prepared_batches(self, slices: list[np.ndarray], pts: np.ndarray) -> Iterator[PreparedBatch]:
        """:meth:`prepare` of each ``batch_size`` chunk in order; with :attr:`overlap` and more than
        one chunk, chunk k+1 is prepared in one worker thread while the caller runs chunk k."""
        chunks = list(batch_chunks(len(pts), self.batch_size))
        if not self.overlap or len(chunks) < 2:
            for a, b in chunks:
                yield self.prepare(slices[a:b], pts[a:b])
            return
        with ThreadPoolExecutor(1, thread_name_prefix="cmdeploy-prepare") as pool:
            a, b = chunks[0]
            nxt = pool.submit(self.prepare, slices[a:b], pts[a:b])
            for k in range(len(chunks)):
                batch = nxt.result()
                if k + 1 < len(chunks):
                    a, b = chunks[k + 1]
                    nxt = pool.submit(self.prepare, slices[a:b], pts[a:b])
                yield batch

    # --------------------------------------------------------------------------- predictors
    def predict(
        self, slice_hu: np.ndarray, points: np.ndarray, *, return_probabilities: bool = False
    ) -> np.ndarray:
        """Segment one object.

        Args:
            slice_hu: (H, W) slice in HU, indexed ``[y, x]``.
            points: (4, 2) extreme points left, right, top, bottom, each ``(x, y)`` in pixels.
            return_probabilities: return float32 probabilities in [0, 1] instead of the mask.

        Returns:
            bool (H, W) mask (``probability > spec.threshold``), or float32 (H, W) probabilities.
        """
        return self.predict_batch([slice_hu], [points], return_probabilities=return_probabilities)[0]

    def predict_batch(
        self,
        slices: Sequence[np.ndarray] | np.ndarray,
        points: Sequence[np.ndarray] | np.ndarray,
        *,
        return_probabilities: bool = False,
    ) -> list[np.ndarray]:
        """Segment N objects; ``batch_size`` of them per model call.

        Args:
            slices: N (H_i, W_i) HU slices (a list or an (N, H, W) array); a single (H, W) array is
                used for every object.
            points: (N, 4, 2) extreme points or a list of N (4, 2) arrays; ``points[i]`` lies on
                ``slices[i]``.
            return_probabilities: return float32 probabilities instead of bool masks.

        Returns:
            a list of N bool (or float32) (H_i, W_i) arrays, in input order.

        Raises :class:`InputError` for anything else (generators, bool or complex arrays, a single
        object's (4, 2) points: use :meth:`predict` for one object).
        """
        for what, value in (("slices", slices), ("points", points)):
            if not isinstance(value, (np.ndarray, list, tuple)):
                raise InputError(
                    f"predict_batch: {what} must be a list or a NumPy array, got {type(value).__name__} "
                    "(materialise generators with list(...))"
                )
        if np.ndim(points) == 2 and np.shape(points) == (4, 2):
            raise InputError(
                "predict_batch expects a list of slices and (N, 4, 2) points, one (4, 2) set per "
                "object; got a single (4, 2) set: use predict(slice_hu, points) for one object, or "
                "predict_batch([slice_hu], [points])"
            )
        pts_list = [points[i] for i in range(len(points))]
        if isinstance(slices, np.ndarray) and slices.ndim == 2:
            checked = check_slice(slices)
            slice_list = [checked] * len(pts_list)
        else:
            if isinstance(slices, np.ndarray) and slices.ndim != 3:
                raise InputError(f"slices must be (H, W), (N, H, W) or a list, got shape {slices.shape}")
            if len(slices) != len(pts_list):
                raise InputError(f"got {len(slices)} slices but {len(pts_list)} point sets")
            # validate each distinct slice object once (objects often share a slice); the cache
            # holds the originals too, so their ids cannot be reused while it lives
            cache: dict[int, tuple[Any, np.ndarray]] = {}
            slice_list = []
            for i, s in enumerate(slices):
                if id(s) not in cache:
                    cache[id(s)] = (s, check_slice(s, name=f"slice {i}"))
                slice_list.append(cache[id(s)][1])
        checked_pts = [
            check_points(p, s.shape, name=f"points {i}")
            for i, (p, s) in enumerate(zip(pts_list, slice_list, strict=True))
        ]
        pts = np.stack(checked_pts) if checked_pts else np.zeros((0, 4, 2), np.float32)

        results: list[np.ndarray] = []
        for batch in self._prepared_batches(slice_list, pts):
            out = self.infer(batch)
            for i in range(len(batch)):
                probs, window = self.slice_window(batch, out, i)
                if return_probabilities:
                    full = probs if self.fused else np.zeros(batch.slice_shapes[i], np.float32)
                else:  # threshold (and post-process) only the crop's footprint
                    origin = (window[1].start or 0, window[0].start or 0)
                    probs = self.to_mask(probs, batch.points[i], origin)
                    full = np.zeros(batch.slice_shapes[i], bool)
                if full is not probs:
                    full[window] = probs
                results.append(full)
        return results
