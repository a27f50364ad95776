"""Micro-benchmarks of the runtime: model latency and throughput per backend, precision and batch
size, the confidence map in NumPy vs inside a fused graph, and the machine's matmul peak.

Timings are wall-clock (``time.perf_counter``) after ``warmup`` untimed calls; latency is reported as
the 50th and 95th percentile over ``iterations`` calls (ms per call, i.e. per batch), throughput as
``batch * iterations / total time`` (objects/s).

Inputs are synthetic: a ``slice_size`` x ``slice_size`` phantom (air, a body ellipse of 40 HU and an
organ ellipse of 150 HU) with the organ's extreme points, shifted by a pixel or two per object so
that the objects of a batch differ. The peak is the best of ``repeats`` NumPy float32 ``n x n``
matmuls (``2 n^3`` FLOPs) on the same machine with NumPy's BLAS threads.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


# -------------------------------------------------------------------------------------- timing
def time_calls(fn: Callable[[], Any], *, iterations: int, warmup: int = 1) -> np.ndarray:
    """Seconds of ``iterations`` calls of ``fn`` after ``warmup`` untimed calls (float64 array)."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    for _ in range(max(int(warmup), 0)):
        fn()
    out = np.empty(int(iterations), dtype=np.float64)
    for i in range(out.size):
        t0 = time.perf_counter()
        fn()
        out[i] = time.perf_counter() - t0
    return out


@dataclass(frozen=True)
class Latency:
    """Latency of one call (ms) over ``iterations`` calls, and throughput in items/s."""

    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    iterations: int
    items_per_s: float

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def latency(times_s: np.ndarray, items_per_call: int = 1) -> Latency:
    """Percentiles of call times (seconds) as :class:`Latency`."""
    t = np.asarray(times_s, dtype=np.float64) * 1e3
    total = float(t.sum()) / 1e3
    return Latency(
        p50_ms=float(np.percentile(t, 50)),
        p95_ms=float(np.percentile(t, 95)),
        mean_ms=float(t.mean()),
        min_ms=float(t.min()),
        iterations=int(t.size),
        items_per_s=items_per_call * t.size / total if total > 0 else float("inf"),
    )


# ------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else :func:`platform.processor`."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model and core counts, OS, Python, NumPy and onnxruntime versions and providers."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = list(ort.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
    return info


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Measured float32 matmul peak: best of ``repeats`` ``n x n`` NumPy matmuls, GFLOP/s."""
    if n < 1 or repeats < 1:
        raise ValueError(f"n and repeats must be >= 1, got n={n}, repeats={repeats}")
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=out)  # warm up BLAS threads and caches
    best = float(time_calls(lambda: np.matmul(a, b, out=out), iterations=repeats, warmup=0).min())
    return {"n": n, "repeats": repeats, "best_s": best, "gflops": 2.0 * n**3 / best / 1e9}


# ------------------------------------------------------------------------------------- phantom
def phantom(size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """A float32 (size, size) HU phantom and its organ's (4, 2) extreme points (x, y)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size)
    body = ((xx - 0.5) / 0.42) ** 2 + ((yy - 0.5) / 0.32) ** 2 <= 1
    organ = ((xx - 0.58) / 0.12) ** 2 + ((yy - 0.47) / 0.09) ** 2 <= 1
    img = np.full((size, size), -1000.0, np.float32)
    img[body] = 40.0
    img[organ] = 150.0
    from cmdeploy.guidance import extreme_points

    return img, extreme_points(organ)


def batch_points(points: np.ndarray, n: int, shape: tuple[int, int]) -> np.ndarray:
    """``n`` copies of (4, 2) points, each shifted by a different small offset (float32 (n, 4, 2))."""
    offsets = np.stack([np.arange(n) % 3 - 1, (np.arange(n) // 3) % 3 - 1], axis=1).astype(np.float32)
    pts = points[None].astype(np.float32) + offsets[:, None, :]
    pts[..., 0] = np.clip(pts[..., 0], 0, shape[1] - 1)
    pts[..., 1] = np.clip(pts[..., 1], 0, shape[0] - 1)
    return pts


# -------------------------------------------------------------------------------------- benches
def bench_segmenter(
    seg: Any,
    batch_sizes: Sequence[int],
    *,
    iterations: int = 20,
    warmup: int = 3,
    slice_size: int = 512,
) -> list[dict[str, Any]]:
    """Per batch size: model-only latency (:meth:`Segmenter.infer` on a prepared batch) and
    end-to-end latency (:meth:`Segmenter.predict_batch`: checks, preprocessing, model, paste-back)."""
    image, pts = phantom(slice_size)
    rows = []
    for b in batch_sizes:
        points = batch_points(pts, int(b), image.shape)
        slices = [image] * int(b)
        prepared = seg.prepare(slices, points)
        model_t = latency(time_calls(lambda p=prepared: seg.infer(p), iterations=iterations, warmup=warmup),
                          int(b))
        e2e_t = latency(
            time_calls(lambda s=slices, q=points: seg.predict_batch(s, q), iterations=iterations,
                       warmup=min(warmup, 1)),
            int(b),
        )
        rows.append({"batch": int(b), "model": model_t.to_dict(), "end_to_end": e2e_t.to_dict()})
    return rows


def bench_confidence_map(
    sizes: Sequence[int] = (256, 512), batches: Sequence[int] = (1, 16), *, iterations: int = 10,
    warmup: int = 1,
) -> list[dict[str, Any]]:
    """NumPy :func:`cmdeploy.guidance.confidence_map` latency per grid size and batch."""
    from cmdeploy.guidance import confidence_map

    rows = []
    for s in sizes:
        _, pts = phantom(int(s))
        for b in batches:
            points = batch_points(pts, int(b), (int(s), int(s)))
            arg = points[0] if b == 1 else points
            t = latency(
                time_calls(lambda a=arg, n=int(s): confidence_map(a, (n, n)), iterations=iterations,
                           warmup=warmup),
                int(b),
            )
            rows.append({"size": int(s), "batch": int(b), **t.to_dict(),
                         "ms_per_map": round(t.p50_ms / int(b), 4)})
    return rows


def bench_fused_vs_numpy(
    fused: Any,
    plain: Any | None,
    *,
    batch: int = 16,
    iterations: int = 10,
    warmup: int = 2,
    slice_size: int = 512,
) -> list[dict[str, Any]]:
    """The fused graph (preprocessing + model + paste-back inside ONNX) vs the NumPy path.

    Rows: ``fused graph`` (:meth:`Segmenter.infer` of the fused model), ``numpy prepare_batch``
    (crop, window and guidance maps in NumPy, for the fused model's spec) and, when a plain model is
    given, ``numpy prepare + plain model + paste back``.
    """
    from cmdeploy.preprocess import prepare_batch

    image, pts = phantom(slice_size)
    points = batch_points(pts, batch, image.shape)
    slices = [image] * batch
    rows = []
    prepared = fused.prepare(slices, points)
    t = latency(time_calls(lambda: fused.infer(prepared), iterations=iterations, warmup=warmup), batch)
    rows.append({"path": "fused graph", "batch": batch, **t.to_dict()})
    t = latency(time_calls(lambda: prepare_batch(slices, points, fused.spec), iterations=iterations,
                           warmup=1), batch)
    rows.append({"path": "numpy prepare_batch", "batch": batch, **t.to_dict()})
    if plain is not None:
        def numpy_path() -> None:
            p = plain.prepare(slices, points)
            out = plain.infer(p)
            for i in range(len(p)):
                plain.slice_window(p, out, i)

        t = latency(time_calls(numpy_path, iterations=iterations, warmup=warmup), batch)
        rows.append({"path": "numpy prepare + plain model + paste back", "batch": batch, **t.to_dict()})
    return rows


__all__ = [
    "Latency",
    "batch_points",
    "bench_confidence_map",
    "bench_fused_vs_numpy",
    "bench_segmenter",
    "cpu_model",
    "latency",
    "machine_info",
    "matmul_peak",
    "phantom",
    "time_calls",
]
