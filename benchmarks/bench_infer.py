"""Benchmark: the batched inference pipeline on a real DICOM series (issue targets: pipeline overhead
<= 15 % of model time; peak RSS <= 1.5 GB for a 300-slice 512 x 512 series).

Usage::

    .venv/bin/python benchmarks/bench_infer.py --model M.onnx [--model M_int8.onnx] \
        [--case thorax_1p5mm] [--slices 100] [--batch-sizes 1,16] [--rss-slices 300] [--json out.json]

What it does:

1. Builds a ``--slices``-slice DICOM CT series (pydicom, signed 16-bit HU, rescale slope 1,
   intercept 0) from a shared ``ct-organs`` NIfTI case, centred on its labelled slices, plus a points CSV
   of the four extreme points of every connected object (:mod:`cmdeploy.labels_to_points`). Both go
   into a temporary folder under /tmp (removed at the end unless ``--keep``), never into the repo.
2. Runs :func:`cmdeploy.pipeline.run_pipeline` per model, backend and batch size (one untimed warm-up
   run first) and reports slices/s, objects/s and the share of time outside the model,
   ``(total - model) / model`` (target <= 15 %).
3. Peak RSS: builds a ``--rss-slices``-slice series resampled to ``--rss-size`` x ``--rss-size``
   (bilinear image, nearest labels; the case's slices repeated as needed), then runs the pipeline on
   it in a child process and reads ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` (target
   <= 1.5 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ct-organs"
OVERHEAD_TARGET = 0.15
RSS_TARGET_BYTES = 1.5e9
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# ------------------------------------------------------------------------------- data building
def resize_slice(arr: np.ndarray, size: int, *, nearest: bool) -> np.ndarray:
    """(H, W) -> (size, size): nearest neighbour (labels) or bilinear (HU), pixel-centre aligned."""
    h, w = arr.shape
    ys = (np.arange(size) + 0.5) * h / size - 0.5
    xs = (np.arange(size) + 0.5) * w / size - 0.5
    if nearest:
        yi = np.clip(np.rint(ys).astype(np.intp), 0, h - 1)
        xi = np.clip(np.rint(xs).astype(np.intp), 0, w - 1)
        return arr[yi][:, xi]
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0 = np.minimum(np.floor(ys).astype(np.intp), h - 2)
    x0 = np.minimum(np.floor(xs).astype(np.intp), w - 2)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = arr.astype(np.float32)
    top = a[y0][:, x0] * (1 - fx) + a[y0][:, x0 + 1] * fx
    bot = a[y0 + 1][:, x0] * (1 - fx) + a[y0 + 1][:, x0 + 1] * fx
    return (top * (1 - fy) + bot * fy).astype(np.float32)


def write_ct_slice(path: Path, hu: np.ndarray, k: int, uids: dict[str, str],
                   spacing_xy: tuple[float, float], thickness: float) -> None:
    """One synthetic-header CT slice: int16 stored values = HU (rounded), rows = y, columns = x."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.Modality = "CT"
    ds.PatientName = "BENCH^PHANTOM"
    ds.PatientID = "bench"
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0.0, 0.0, float(k) * thickness]
    ds.SliceThickness = thickness
    ds.PixelSpacing = [float(spacing_xy[1]), float(spacing_xy[0])]  # row spacing (y), column spacing (x)
    ds.Rows, ds.Columns = (int(d) for d in hu.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.PixelData = np.clip(np.rint(hu), -32768, 32767).astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def build_series(case_dir: Path, out: Path, n_slices: int, size: int | None) -> dict:
    """Write an ``n_slices`` DICOM series (optionally resampled to ``size``^2) and its points CSV.

    Returns ``{"dicom": folder, "points": csv, "objects": n, "annotated_slices": n, "shape": (H, W)}``.
    """
    from pydicom.uid import generate_uid

    from cmdeploy.io import open_series
    from cmdeploy.io.cases import load_label_names
    from cmdeploy.labels_to_points import open_label_volume, points_from_label_slice
    from cmdeploy.points_csv import write_points_csv

    series = open_series(case_dir / "image.nii.gz")
    labels = open_label_volume(case_dir / "labels.nii.gz")
    names_file = case_dir.parent / "labels.json"
    names = load_label_names(names_file) if names_file.is_file() else None
    labelled = [k for k, lab in labels.iter_slices() if lab.any()]
    if not labelled:
        raise SystemExit(f"{case_dir}: no labelled slice")
    centre = (labelled[0] + labelled[-1]) // 2
    start = max(0, min(centre - n_slices // 2, series.num_slices - n_slices))
    # source slice for every output slice: a window of the volume, repeated (mirrored) if too short
    period = 2 * series.num_slices - 2 if series.num_slices > 1 else 1
    src = []
    for i in range(n_slices):
        j = (start + i) % period
        src.append(j if j < series.num_slices else period - j)
    sx, sy = series.spacing_xy_mm or (1.0, 1.0)
    h, w = series.shape
    if size is not None:
        sx, sy = sx * w / size, sy * h / size
    dicom = out / "dicom"
    dicom.mkdir(parents=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    rows = []
    for i, k in enumerate(src):
        hu, lab = series.slice_hu(k), labels.slice(k)
        if size is not None:
            hu, lab = resize_slice(hu, size, nearest=False), resize_slice(lab, size, nearest=True)
        write_ct_slice(dicom / f"ct_{i:04d}.dcm", hu, i, uids, (sx, sy), 2.0)
        rows.extend(points_from_label_slice(lab, slice_index=i, names=names))
    points = out / "points.csv"
    write_points_csv(points, rows)
    shape = (size, size) if size is not None else (h, w)
    return {"dicom": str(dicom), "points": str(points), "objects": len(rows),
            "annotated_slices": len({r.slice_index for r in rows}), "slices": n_slices, "shape": shape}


# ------------------------------------------------------------------------------------ running
def run_once(model: str, backend: str, dicom: str, points: str, batch: int, threads: int | None) -> dict:
    """One pipeline run; returns its timings and counts."""
    from cmdeploy.io import open_series
    from cmdeploy.pipeline import run_pipeline
    from cmdeploy.points_csv import read_points_csv
    from cmdeploy.segmenter import Segmenter

    seg = Segmenter.load(model, backend=backend, threads=threads, batch_size=batch)
    series = open_series(dicom)
    rows = read_points_csv(points, series)
    t0 = time.perf_counter()
    result = run_pipeline(seg, series, rows, batch_size=batch)
    wall = time.perf_counter() - t0
    t = result.timings
    n_slices = len({r.slice_index for r in rows})
    return {
        "backend": seg.backend,
        "batch": batch,
        "objects": len(rows),
        "annotated_slices": n_slices,
        "wall_s": wall,
        "timings": t.to_dict(),
        "slices_per_s": n_slices / t.total if t.total > 0 else None,
        "objects_per_s": len(rows) / t.total if t.total > 0 else None,
        "overhead_share": t.overhead_share,
    }


def child_main(args: argparse.Namespace) -> int:
    """``--child``: run once and print JSON (the parent measures this process's peak RSS)."""
    r = run_once(args.model[0], args.backend[0], args.child_dicom, args.child_points, args.batch_sizes[0],
                 args.threads)
    r["self_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(r))
    return 0


def measure_rss(model: str, backend: str, built: dict, batch: int, threads: int | None) -> dict:
    """Run the pipeline in a child process; peak RSS from ``getrusage(RUSAGE_CHILDREN)``."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", model, "--backend", backend,
           "--batch-sizes", str(batch), "--child-dicom", built["dicom"], "--child-points", built["points"]]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"RSS child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    return {"peak_rss_bytes": peak, "child": child, "target_bytes": RSS_TARGET_BYTES,
            "meets_target": peak <= RSS_TARGET_BYTES}


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=None, help="ONNX model or engine (repeatable)")
    p.add_argument("--backend", action="append", default=None, help="auto|onnxruntime|tensorrt (repeatable)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ct-organs root")
    p.add_argument("--case", default="thorax_1p5mm", help="case folder under --data")
    p.add_argument("--slices", type=int, default=100, help="slices of the benchmark series")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 16], help="comma-separated, default 1,16")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the best is kept)")
    p.add_argument("--rss-slices", type=int, default=300, help="slices of the peak-RSS series (0 = skip)")
    p.add_argument("--rss-size", type=int, default=512, help="side of the peak-RSS series, pixels")
    p.add_argument("--rss-batch", type=int, default=16, help="batch size of the peak-RSS run")
    p.add_argument("--workdir", type=Path, default=None, help="where to build the series (default /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the built series")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-dicom", help=argparse.SUPPRESS)
    p.add_argument("--child-points", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.backend = args.backend or ["auto"]
    if not args.model:
        from cmdeploy.models import default_model_path

        args.model = [str(default_model_path())]
    if args.child:
        return child_main(args)

    case_dir = args.data / args.case
    if not (case_dir / "image.nii.gz").is_file():
        raise SystemExit(f"no case at {case_dir} (expected image.nii.gz and labels.nii.gz)")
    base = Path(tempfile.mkdtemp(prefix="cmdeploy-bench-infer-", dir=args.workdir or "/tmp"))
    results: dict = {"case": args.case, "workdir": str(base), "runs": [], "rss": None}
    try:
        t0 = time.perf_counter()
        built = build_series(case_dir, base / "series", args.slices, None)
        print(f"built {built['slices']}-slice DICOM series {built['shape']} with {built['objects']} objects "
              f"on {built['annotated_slices']} slices in {time.perf_counter() - t0:.1f} s ({base})")
        results["series"] = built
        from cmdeploy.evaluation.flops import model_precision

        print(f"{'model':28s} {'precision':9s} {'backend':12s} {'batch':>5s} {'slices/s':>9s} "
              f"{'objects/s':>10s} {'model s':>8s} {'total s':>8s} {'overhead':>9s}")
        for model in args.model:
            for backend in args.backend:
                run_once(model, backend, built["dicom"], built["points"], max(args.batch_sizes),
                         args.threads)  # warm-up: page cache, session start-up
                for b in args.batch_sizes:
                    best = min((run_once(model, backend, built["dicom"], built["points"], b, args.threads)
                                for _ in range(max(args.repeats, 1))), key=lambda r: r["timings"]["total"])
                    best["model"] = Path(model).name
                    best["precision"] = model_precision(model)
                    results["runs"].append(best)
                    share = best["overhead_share"]
                    flag = "ok" if share <= OVERHEAD_TARGET else "OVER"
                    print(f"{Path(model).name:28s} {best['precision']:9s} {best['backend']:12s} {b:5d} "
                          f"{best['slices_per_s']:9.1f} {best['objects_per_s']:10.1f} "
                          f"{best['timings']['model']:8.2f} {best['timings']['total']:8.2f} "
                          f"{share * 100:8.1f}% {flag}")
        print(f"overhead = (total - model) / model; target <= {OVERHEAD_TARGET * 100:.0f} %")
        if args.rss_slices > 0:
            t0 = time.perf_counter()
            big = build_series(case_dir, base / "rss", args.rss_slices, args.rss_size)
            print(f"built {big['slices']}-slice {big['shape']} series with {big['objects']} objects in "
                  f"{time.perf_counter() - t0:.1f} s")
            rss = measure_rss(args.model[0], args.backend[0], big, args.rss_batch, args.threads)
            rss["series"] = big
            results["rss"] = rss
            print(f"peak RSS (child, {Path(args.model[0]).name}, batch {args.rss_batch}): "
                  f"{rss['peak_rss_bytes'] / 2**20:.0f} MiB; target <= {RSS_TARGET_BYTES / 1e9:.1f} GB: "
                  f"{'ok' if rss['meets_target'] else 'OVER'}; pipeline {rss['child']['objects_per_s']:.1f} "
                  "objects/s")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    from cmdeploy.evaluation.timing import machine_info

    results["machine"] = machine_info()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
