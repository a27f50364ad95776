"""Benchmark: cmdeploy.guidance.confidence_map (vectorised NumPy, float32) against a literal float64
per-pixel transcription of the paper's Algorithm 1 (``benchmarks/literal_algorithm1.py``).

Usage::

    .venv/bin/python benchmarks/bench_guidance.py [--size 512] [--batch 16] [--json out.json]

Prints a table of timings and the speed-up, and asserts that the two agree to 1e-5 on the same grid.
The literal version runs once on the full grid; if a 64 x 64 probe predicts more than
``--literal-budget`` seconds for that, it runs on a 128 x 128 grid instead and its time is scaled per
pixel (labelled ``scaled`` in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from literal_algorithm1 import confidence_map_literal  # noqa: E402

from cmdeploy.guidance import confidence_map, gaussian_heatmap  # noqa: E402

TOLERANCE = 1e-5


def object_points(size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Off-grid extreme points of an object filling about half of a ``size`` x ``size`` crop."""
    base = np.array([[140.3, 270.8], [371.6, 240.2], [262.9, 131.4], [231.7, 389.5]]) * (size / 512)
    if rng is not None:
        base = base + rng.uniform(-0.08, 0.08, size=base.shape) * size
        base[[0, 1]] = base[[0, 1]][np.argsort(base[[0, 1], 0])]
        base[[2, 3]] = base[[2, 3]][np.argsort(base[[2, 3], 1])]
    return base


def time_calls(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run(size: int, batch: int, repeats: int, literal_budget: float) -> dict:
    shape = (size, size)
    pts = object_points(size)
    rng = np.random.default_rng(0)
    batch_pts = np.stack([object_points(size, rng) for _ in range(batch)])

    single = time_calls(lambda: confidence_map(pts, shape), repeats)
    batched = time_calls(lambda: confidence_map(batch_pts, shape), max(3, repeats // 4))
    gauss = time_calls(lambda: gaussian_heatmap(pts, shape, sigma=10.0), repeats)

    t0 = time.perf_counter()
    confidence_map_literal(object_points(64), (64, 64))
    predicted = (time.perf_counter() - t0) * (size * size) / (64 * 64)
    lit_size = size if predicted <= literal_budget else min(size, 128)
    lit_pts = object_points(lit_size)
    t0 = time.perf_counter()
    reference = np.array(confidence_map_literal(lit_pts, (lit_size, lit_size)))
    lit_time = time.perf_counter() - t0
    lit_scaled = lit_time * (size * size) / (lit_size * lit_size)

    ours = confidence_map(lit_pts, (lit_size, lit_size)).astype(np.float64)
    max_diff = float(np.abs(ours - reference).max())

    numpy_single = statistics.median(single)
    numpy_batch = statistics.median(batched)
    return {
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "numpy_single_s": numpy_single,
        "numpy_single_min_s": min(single),
        "numpy_batch_s": numpy_batch,
        "numpy_batch_per_map_s": numpy_batch / batch,
        "gaussian_single_s": statistics.median(gauss),
        "literal_grid": lit_size,
        "literal_s": lit_time,
        "literal_scaled_s": lit_scaled,
        "literal_scaled": lit_size != size,
        "speedup_single": lit_scaled / numpy_single,
        "speedup_batch_per_map": lit_scaled / (numpy_batch / batch),
        "max_abs_diff": max_diff,
        "tolerance": TOLERANCE,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }


def print_table(r: dict) -> None:
    s = r["size"]
    lit_label = f"literal Algorithm 1, float64 loops ({r['literal_grid']}x{r['literal_grid']}"
    lit_label += ", scaled per pixel)" if r["literal_scaled"] else ")"
    rows = [
        (f"confidence_map NumPy f32, 1 map {s}x{s} (median)", r["numpy_single_s"], 1),
        (f"confidence_map NumPy f32, batch {r['batch']} x {s}x{s}", r["numpy_batch_s"], r["batch"]),
        (f"gaussian_heatmap NumPy f32, 1 map {s}x{s}", r["gaussian_single_s"], 1),
        (lit_label, r["literal_s"], 1),
    ]
    print(f"{'what':62s} {'total ms':>11s} {'ms / map':>10s}")
    for name, t, n in rows:
        print(f"{name:62s} {t * 1e3:11.2f} {t * 1e3 / n:10.2f}")
    if r["literal_scaled"]:
        print(f"{'literal, scaled to ' + str(s) + 'x' + str(s):62s} {r['literal_scaled_s'] * 1e3:11.2f}")
    print(
        f"speed-up vs literal: {r['speedup_single']:.0f}x (single map), "
        f"{r['speedup_batch_per_map']:.0f}x (per map in a batch of {r['batch']})"
    )
    print(
        f"max |NumPy - literal| on {r['literal_grid']}x{r['literal_grid']}: {r['max_abs_diff']:.2e} "
        f"(tolerance {r['tolerance']:.0e})"
    )
    print(f"python {r['python']}, numpy {r['numpy']}, {r['machine']}, {r['cpus']} CPUs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="grid side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the batched NumPy call")
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of the NumPy calls")
    parser.add_argument(
        "--literal-budget",
        type=float,
        default=60.0,
        help="seconds allowed for the literal run on the full grid",
    )
    parser.add_argument(
        "--json", type=Path, help="also write the results as JSON to this file ('-' = stdout)"
    )
    args = parser.parse_args(argv)
    result = run(args.size, args.batch, args.repeats, args.literal_budget)
    print_table(result)
    if args.json is not None:
        text = json.dumps(result, indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    assert result["max_abs_diff"] <= TOLERANCE, (
        f"confidence_map differs from the literal Algorithm 1 by {result['max_abs_diff']:.3g} > {TOLERANCE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
