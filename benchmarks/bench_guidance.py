"""Benchmark: cmdeploy.guidance.confidence_map (NumPy, float32) against a straightforward vectorised
float64 transcription of the paper's Algorithm 1 (``confidence_map_vectorised64`` in
``benchmarks/literal_algorithm1.py``), side by side in one run.

Usage::

    .venv/bin/python benchmarks/bench_guidance.py [--size 512] [--batch 16] [--json out.json]

Prints timings (minimum and median of ``--repeats`` calls, the two implementations interleaved so
that load from other processes hits both alike) and the speed-up (target >= 10x at 512 x 512), and
checks the maps: ``max |ours - float64|`` outside the documented tie band (pixels within 1e-3 px of
the line through c perpendicular to a segment, where sigma switches sides) must be <= 1e-5. The
literal per-pixel loop (``confidence_map_literal``) is run once on a 64 x 64 grid to show that the
vectorised float64 baseline is Algorithm 1 (difference ~1e-16).
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

from literal_algorithm1 import confidence_map_literal, confidence_map_vectorised64  # noqa: E402

from cmdeploy.guidance import confidence_map, cross_centre, gaussian_heatmap  # noqa: E402

TOLERANCE = 1e-5
TARGET_SPEEDUP = 10.0
TIE_BAND_PX = 1e-3


def object_points(size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Off-grid extreme points of an object filling about half of a ``size`` x ``size`` crop."""
    base = np.array([[140.3, 270.8], [371.6, 240.2], [262.9, 131.4], [231.7, 389.5]]) * (size / 512)
    if rng is not None:
        base = base + rng.uniform(-0.08, 0.08, size=base.shape) * size
        base[[0, 1]] = base[[0, 1]][np.argsort(base[[0, 1], 0])]
        base[[2, 3]] = base[[2, 3]][np.argsort(base[[2, 3], 1])]
    return base


def tie_band(points: np.ndarray, shape: tuple[int, int], tol: float = TIE_BAND_PX) -> np.ndarray:
    """bool (H, W): pixels within ``tol`` px of the line through c perpendicular to A or to B."""
    pts = np.asarray(points, np.float64)
    c = cross_centre(pts[None])[0]
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    band = np.zeros(shape, bool)
    for i, j in ((0, 1), (2, 3)):
        d = pts[j] - pts[i]
        n = float(np.hypot(*d))
        if n > 0:
            band |= np.abs((xs - c[0]) * d[0] + (ys - c[1]) * d[1]) / n <= tol
    return band


def time_pair(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, interleaved (one call of each per round) after a warm-up."""
    for fn in fns.values():
        fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def run(size: int, batch: int, repeats: int) -> dict:
    shape = (size, size)
    rng = np.random.default_rng(0)
    pts = object_points(size)
    batch_pts = np.stack([object_points(size, rng) for _ in range(batch)])
    t = time_pair(
        {
            "f64": lambda: confidence_map_vectorised64(pts, shape),
            "ours": lambda: confidence_map(pts, shape),
        },
        repeats,
    )
    tb = time_pair(
        {
            "f64": lambda: [confidence_map_vectorised64(p, shape) for p in batch_pts],
            "ours": lambda: confidence_map(batch_pts, shape),
        },
        max(2, repeats // 4),
    )
    gauss = time_pair({"g": lambda: gaussian_heatmap(pts, shape, sigma=10.0)}, repeats)["g"]

    diffs = []
    for p in [pts, *batch_pts]:
        d = np.abs(confidence_map(p, shape).astype(np.float64) - confidence_map_vectorised64(p, shape))
        diffs.append(float(np.where(tie_band(p, shape), 0.0, d).max()))
    small = object_points(64)
    literal = np.array(confidence_map_literal(small, (64, 64)))
    literal_diff = float(np.abs(literal - confidence_map_vectorised64(small, (64, 64))).max())
    r = {
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "f64_single_min_s": min(t["f64"]),
        "f64_single_median_s": statistics.median(t["f64"]),
        "ours_single_min_s": min(t["ours"]),
        "ours_single_median_s": statistics.median(t["ours"]),
        "f64_batch_min_s": min(tb["f64"]),
        "ours_batch_min_s": min(tb["ours"]),
        "gaussian_single_min_s": min(gauss),
        "max_abs_diff_outside_tie_band": max(diffs),
        "literal_vs_f64_64px": literal_diff,
        "tolerance": TOLERANCE,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    r["speedup_single_min"] = r["f64_single_min_s"] / r["ours_single_min_s"]
    r["speedup_single_median"] = r["f64_single_median_s"] / r["ours_single_median_s"]
    r["speedup_batch_min"] = r["f64_batch_min_s"] / r["ours_batch_min_s"]
    return r


def print_table(r: dict) -> None:
    s, b = r["size"], r["batch"]
    print(f"confidence map {s}x{s}: {'what':44s} {'min ms':>8s} {'median ms':>10s}")
    rows = [
        ("vectorised float64 Algorithm 1, 1 map", r["f64_single_min_s"], r["f64_single_median_s"]),
        ("cmdeploy confidence_map, 1 map", r["ours_single_min_s"], r["ours_single_median_s"]),
        (f"vectorised float64, {b} maps (per map)", r["f64_batch_min_s"] / b, None),
        (f"cmdeploy, batch of {b} (per map)", r["ours_batch_min_s"] / b, None),
        ("gaussian_heatmap (EP), 1 map", r["gaussian_single_min_s"], None),
    ]
    for name, mn, med in rows:
        med_s = f"{med * 1e3:10.2f}" if med is not None else f"{'':10s}"
        print(f"{'':30s} {name:44s} {mn * 1e3:8.2f} {med_s}")
    ok = r["speedup_single_min"] >= TARGET_SPEEDUP
    print(
        f"speed-up vs vectorised float64: {r['speedup_single_min']:.1f}x (min), "
        f"{r['speedup_single_median']:.1f}x (median), {r['speedup_batch_min']:.1f}x per map in a batch of "
        f"{b}; target >= {TARGET_SPEEDUP:.0f}x: {'ok' if ok else 'MISSED'}"
    )
    print(
        f"max |ours - float64| outside the {TIE_BAND_PX:g} px tie band: "
        f"{r['max_abs_diff_outside_tie_band']:.2e} (tolerance {r['tolerance']:.0e}); literal per-pixel "
        f"loop vs vectorised float64 (64x64): {r['literal_vs_f64_64px']:.1e}"
    )
    print(f"python {r['python']}, numpy {r['numpy']}, {r['machine']}, {r['cpus']} CPUs")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="grid side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=16, help="maps in the batched call")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds of the single-map calls")
    parser.add_argument(
        "--json", type=Path, help="also write the results as JSON to this file ('-' = stdout)"
    )
    args = parser.parse_args(argv)
    result = run(args.size, args.batch, args.repeats)
    print_table(result)
    if args.json is not None:
        text = json.dumps(result, indent=2)
        if str(args.json) == "-":
            print(text)
        else:
            args.json.write_text(text + "\n")
    if result["max_abs_diff_outside_tie_band"] > TOLERANCE:
        print(f"FAILED: maps differ by {result['max_abs_diff_outside_tie_band']:.3g} > {TOLERANCE}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
