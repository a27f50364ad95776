"""Benchmark (issue 18): end to end at the model's speed, every ratio measured side by side in one run.

    .venv/bin/python benchmarks/bench_prepare.py [--data ../shared/data/ct-organs] [--objects 160] \
        [--int8 M.int8.onnx] [--checkpoint C.pt] [--repeats 3] [--json out.json]

Data: the first ``--objects`` organ objects (every connected component of every label, as
``points-from-labels`` makes them) of a real CT case, its slices resampled to ``--size`` x ``--size``
(bilinear HU, nearest labels; :func:`bench_infer.resize_slice`), held in memory; nothing is written.
Without the shared data, CT_small.dcm's example objects are repeated instead (and say so).

Sections (each a table; ``min`` over ``--repeats`` rounds, the compared paths interleaved in every
round so load from other processes hits them alike):

1. ``Segmenter.prepare`` per step, before (``benchmarks/reference_prepare.py``, the pre-issue-18
   code) and after (``cmdeploy.preprocess``), ms per batch of ``--batch``; the two inputs agree
   (image channel bit for bit, guidance within 2e-7).
2. Confidence map vs the vectorised float64 transcription of Algorithm 1 at 512 x 512
   (``bench_guidance.run``).
3. INT8 end to end for onnxruntime thread settings: model only (``Segmenter.infer`` on prepared
   batches), ``Segmenter.predict_batch`` and :func:`cmdeploy.pipeline.run_pipeline` (prefetch
   thread), objects/s and the share of the model-only rate (target: predict_batch >= 85 %).
4. The fused graph vs NumPy + plain model + paste-back on CPU, both exported here from one checkpoint
   (``--checkpoint``, else the compact config with seeded random weights: the speed does not
   depend on the weights), with float32 and float64 geometry; and the shipped fused model (exported
   before this change) vs the shipped plain model.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import reference_prepare  # noqa: E402
from bench_infer import resize_slice  # noqa: E402

from cmdeploy.geometry import crop_image, crop_transforms  # noqa: E402
from cmdeploy.guidance import validate_points  # noqa: E402
from cmdeploy.preprocess import guidance_channels, prepare_batch, window_normalize  # noqa: E402
from cmdeploy.spec import ModelSpec  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ct-organs"
MODELS = ROOT / "cmdeploy" / "models"
TARGET_SHARE = 0.85
GAP_S = 0.05  # sleep before a timed run, so another session's spinning workers park


@dataclass
class Row:
    """One object of the in-memory series (what :func:`run_pipeline` needs of a points row)."""

    slice_index: int
    label: str
    points: np.ndarray
    line: int = 0


class MemorySeries:
    """A series held in memory: ``slice_hu(k)`` returns the k-th (H, W) float32 HU slice."""

    def __init__(self, slices: list[np.ndarray]) -> None:
        self.slices = slices
        self.shape = slices[0].shape
        self.num_slices = len(slices)
        self.spacing_xy_mm = None

    def slice_hu(self, k: int) -> np.ndarray:
        return self.slices[k]


def load_objects(data: Path, case: str, n: int, size: int) -> tuple[MemorySeries, list[Row], str]:
    """``n`` objects on ``size``^2 slices of a shared case (or CT_small.dcm's repeated)."""
    from cmdeploy.io import open_series

    case_dir = data / case
    slices: list[np.ndarray] = []
    rows: list[Row] = []
    if (case_dir / "image.nii.gz").is_file():
        from cmdeploy.labels_to_points import open_label_volume, points_from_label_slice

        series = open_series(case_dir / "image.nii.gz")
        labels = open_label_volume(case_dir / "labels.nii.gz")
        for k, lab in labels.iter_slices():
            if not lab.any():
                continue
            found = points_from_label_slice(resize_slice(lab, size, nearest=True), slice_index=len(slices))
            if not found:
                continue
            slices.append(resize_slice(series.slice_hu(k), size, nearest=False))
            rows.extend(Row(r.slice_index, r.label, np.asarray(r.points, np.float32)) for r in found)
            if len(rows) >= n:
                break
        source = f"{case} (real CT), {len(slices)} slices resampled to {size}x{size}"
    else:
        from pydicom.data import get_testdata_file

        from cmdeploy.points_csv import read_points_csv

        ser = open_series(get_testdata_file("CT_small.dcm"))
        base = read_points_csv(ROOT / "examples" / "ct_small_points.csv", ser)
        img = ser.slice_hu(0).astype(np.float32)
        while len(rows) < n:
            slices.append(img)
            rows.extend(Row(len(slices) - 1, r.label, np.asarray(r.points, np.float32)) for r in base)
        source = "CT_small.dcm example objects repeated (no shared data)"
    return MemorySeries(slices), rows[:n], source


# --------------------------------------------------------------------------- 1. prepare steps
STEPS = ("validate + transforms", "crop sampling", "windowing", "guidance (CM)", "packing")


def steps_before(slices: list[np.ndarray], pts: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Seconds per step of the pre-issue-18 per-object path on one batch, in STEPS order."""
    r = reference_prepare
    s = spec.input_size
    out = np.empty((len(pts), spec.num_channels, s, s), np.float32)
    acc = np.zeros(len(STEPS))
    from cmdeploy.geometry import crop_transform

    for i, (img, p) in enumerate(zip(slices, pts, strict=True)):
        t0 = time.perf_counter()
        q = validate_points(p)[0]
        t = crop_transform(q, s, spec.target_size)
        t1 = time.perf_counter()
        crop = r.crop_image_2d(img, t.matrix, s, spec.pad_hu)
        t2 = time.perf_counter()
        image = r.window_normalize(crop, spec)
        t3 = time.perf_counter()
        guide = r.confidence_map(t.to_crop(q)[None], (s, s))
        t4 = time.perf_counter()
        out[i] = np.concatenate([image[None], guide], axis=0)
        t5 = time.perf_counter()
        acc += np.diff([t0, t1, t2, t3, t4, t5])
    return acc


def steps_after(slices: list[np.ndarray], pts: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Seconds per step of :func:`cmdeploy.preprocess.prepare_batch`'s stages on one batch."""
    s = spec.input_size
    t0 = time.perf_counter()
    out = np.empty((len(pts), spec.num_channels, s, s), np.float32)
    q = validate_points(np.asarray(pts, np.float64))
    transforms = crop_transforms(q, s, spec.target_size)
    t1 = time.perf_counter()
    for i, (img, t) in enumerate(zip(slices, transforms, strict=True)):
        crop_image(img, t, fill=spec.pad_hu, out=out[i, 0])
    t2 = time.perf_counter()
    for i in range(len(pts)):
        window_normalize(out[i, 0], spec, out=out[i, 0])
    t3 = time.perf_counter()
    mats = np.stack([t.matrix for t in transforms])
    crop_pts = q @ np.swapaxes(mats[:, :, :2], 1, 2) + mats[:, None, :, 2]
    guidance_channels(crop_pts, spec, out=out[:, 1:])
    t4 = time.perf_counter()
    return np.diff([t0, t1, t2, t3, t4, t4])  # packing: written in place


def bench_steps(series: MemorySeries, rows: list[Row], spec: ModelSpec, batch: int, repeats: int) -> dict:
    slices = [series.slice_hu(r.slice_index) for r in rows]
    pts = np.stack([r.points for r in rows])
    chunks = [(slices[a : a + batch], pts[a : a + batch]) for a in range(0, len(rows), batch)]
    before, after, whole_b, whole_a = [], [], [], []
    for _ in range(repeats + 1):  # the first round warms up
        before.append(sum(steps_before(s, p, spec) for s, p in chunks) / len(chunks))
        after.append(sum(steps_after(s, p, spec) for s, p in chunks) / len(chunks))
        t0 = time.perf_counter()
        for s, p in chunks:
            reference_prepare.prepare_batch(s, p, spec)
        t1 = time.perf_counter()
        for s, p in chunks:
            prepare_batch(s, p, spec)
        t2 = time.perf_counter()
        whole_b.append((t1 - t0) / len(chunks))
        whole_a.append((t2 - t1) / len(chunks))
    ref = reference_prepare.prepare_batch(*chunks[0], spec)
    new, _ = prepare_batch(*chunks[0], spec)
    b, a = np.min(before[1:], axis=0), np.min(after[1:], axis=0)
    return {
        "batch": batch,
        "steps_ms_before": dict(zip(STEPS, (b * 1e3).round(3).tolist(), strict=True)),
        "steps_ms_after": dict(zip(STEPS, (a * 1e3).round(3).tolist(), strict=True)),
        "prepare_batch_ms_before": min(whole_b[1:]) * 1e3,
        "prepare_batch_ms_after": min(whole_a[1:]) * 1e3,
        "image_channel_identical": bool(np.array_equal(ref[:, 0], new[:, 0])),
        "guidance_max_abs_diff": float(np.abs(ref[:, 1:] - new[:, 1:]).max()),
    }


def print_steps(r: dict) -> None:
    print(f"\n1. prepare per step, ms per batch of {r['batch']} (min over rounds)")
    print(f"   {'step':24s} {'before':>9s} {'after':>9s} {'speed-up':>9s}")
    for k in STEPS:
        b, a = r["steps_ms_before"][k], r["steps_ms_after"][k]
        print(f"   {k:24s} {b:9.2f} {a:9.2f} {b / a if a > 0 else float('inf'):8.1f}x")
    b, a = r["prepare_batch_ms_before"], r["prepare_batch_ms_after"]
    print(f"   {'prepare_batch (whole)':24s} {b:9.2f} {a:9.2f} {b / a:8.1f}x")
    print(f"   inputs agree: image channel identical {r['image_channel_identical']}, guidance max |diff| "
          f"{r['guidance_max_abs_diff']:.1e}")


# ------------------------------------------------------------------------------- 3. end to end
def bench_end_to_end(model: Path, series: MemorySeries, rows: list[Row], batch: int, repeats: int,
                     settings: list[tuple[int | None, bool | None]]) -> list[dict]:
    from cmdeploy import Segmenter
    from cmdeploy.pipeline import run_pipeline

    slices = [series.slice_hu(r.slice_index) for r in rows]
    pts = np.stack([r.points for r in rows])
    out = []
    for threads, spinning in settings:
        seg = Segmenter.load(model, threads=threads, spinning=spinning, batch_size=batch)
        starts = range(0, len(rows), batch)
        prepared = [seg.prepare(slices[a : a + batch], pts[a : a + batch]) for a in starts]
        seg.infer(prepared[0])
        seg.predict_batch(slices[:batch], pts[:batch])
        times: dict[str, list[float]] = {"model": [], "predict_batch": [], "predict_batch_sequential": [],
                                          "pipeline": []}
        for _ in range(repeats):
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            for p in prepared:
                seg.infer(p)
            times["model"].append(time.perf_counter() - t0)
            for key, overlap in (("predict_batch", True), ("predict_batch_sequential", False)):
                seg.overlap = overlap
                time.sleep(GAP_S)
                t0 = time.perf_counter()
                seg.predict_batch(slices, pts)
                times[key].append(time.perf_counter() - t0)
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            run_pipeline(seg, series, rows, batch_size=batch)
            times["pipeline"].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        out.append({
            "threads": threads, "spinning": spinning, "objects": len(rows),
            **{f"{k}_objects_per_s": len(rows) / v for k, v in best.items()},
            **{f"{k}_s": v for k, v in best.items()},
        })
    ref = out[0]["model_objects_per_s"]
    for r in out:
        r["predict_batch_share"] = r["predict_batch_objects_per_s"] / r["model_objects_per_s"]
        r["predict_batch_sequential_share"] = (
            r["predict_batch_sequential_objects_per_s"] / r["model_objects_per_s"])
        r["pipeline_share"] = r["pipeline_objects_per_s"] / r["model_objects_per_s"]
        r["predict_batch_share_of_first_model"] = r["predict_batch_objects_per_s"] / ref
        r["pipeline_share_of_first_model"] = r["pipeline_objects_per_s"] / ref
    return out


def print_end_to_end(rows: list[dict], model: str, batch: int) -> None:
    print(f"\n3. {model} end to end, batch {batch}, objects/s (share of the same session's model-only rate; "
          "in brackets: of the first row's)")
    head = f"{'model only':>10s} {'predict_batch':>22s} {'(no overlap)':>12s} {'run_pipeline':>22s}"
    print(f"   {'threads':>7s} {'spinning':>8s} {head}")
    for r in rows:
        th = "auto" if r["threads"] is None else str(r["threads"])
        sp = "on" if r["spinning"] else "off"
        pb = (f"{r['predict_batch_objects_per_s']:6.1f} {r['predict_batch_share'] * 100:4.0f}% "
              f"({r['predict_batch_share_of_first_model'] * 100:3.0f}%)")
        pl = (f"{r['pipeline_objects_per_s']:6.1f} {r['pipeline_share'] * 100:4.0f}% "
              f"({r['pipeline_share_of_first_model'] * 100:3.0f}%)")
        seq = f"{r['predict_batch_sequential_share'] * 100:4.0f}%"
        print(f"   {th:>7s} {sp:>8s} {r['model_objects_per_s']:10.1f} {pb:>22s} {seq:>12s} {pl:>22s}")
    print(f"   target: predict_batch >= {TARGET_SHARE * 100:.0f} % of model only")


# ----------------------------------------------------------------------------- 4. fused graph
def export_pair(checkpoint: Path | None, folder: Path) -> dict[str, Path]:
    """Plain + fused (float32 and float64 geometry) ONNX of one checkpoint, exported into ``folder``."""
    import torch

    from cmdeploy.export.fused import export_fused
    from cmdeploy.export.onnx_export import export_onnx

    if checkpoint is None:
        from cmdeploy.train.checkpoint import Checkpoint
        from cmdeploy.train.model import build_model, make_config

        torch.manual_seed(0)
        spec = ModelSpec.for_input_size(256)
        net = build_model(make_config("compact", spec.num_channels)).eval()
        checkpoint = folder / "compact_random.pt"
        Checkpoint.from_model(net, spec).save(checkpoint)
    out = {"plain": folder / "plain.onnx", "fused f32 geometry": folder / "fused32.onnx",
           "fused f64 geometry": folder / "fused64.onnx"}
    export_onnx(checkpoint, out["plain"], check_parity=False)
    export_fused(checkpoint, out["fused f32 geometry"], check_parity=False, geometry_dtype="float32")
    export_fused(checkpoint, out["fused f64 geometry"], check_parity=False, geometry_dtype="float64")
    return out


def bench_fused(pairs: list[tuple[str, Path, Path]], series: MemorySeries, rows: list[Row], batch: int,
                repeats: int, threads: int | None) -> list[dict]:
    """Per (label, fused, plain): seconds per batch of the fused graph and of NumPy + plain + paste."""
    from cmdeploy import Segmenter

    slices = [series.slice_hu(r.slice_index) for r in rows[:batch]]
    pts = np.stack([r.points for r in rows[:batch]])
    segs = {}
    for _, fused, plain in pairs:
        for p in (fused, plain):
            if p not in segs:
                segs[p] = Segmenter.load(p, threads=threads, batch_size=batch)

    def numpy_path(seg) -> None:
        b = seg.prepare(slices, pts)
        o = seg.infer(b)
        for i in range(len(b)):
            seg.slice_window(b, o, i)

    def full_maps(seg) -> None:
        seg.predict_batch(slices, pts, return_probabilities=True)

    fns = {}
    for label, fused, plain in pairs:
        fb = segs[fused].prepare(slices, pts)
        fns[(label, "fused")] = lambda s=segs[fused], b=fb: s.infer(b)
        fns[(label, "numpy")] = lambda s=segs[plain]: numpy_path(s)
        # the same result both ways: N full-slice float32 probability maps through predict_batch
        fns[(label, "fused_pb")] = lambda s=segs[fused]: full_maps(s)
        fns[(label, "numpy_pb")] = lambda s=segs[plain]: full_maps(s)
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            time.sleep(GAP_S)
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out = []
    for label, _, _ in pairs:
        f, n = min(times[(label, "fused")]), min(times[(label, "numpy")])
        fp, nps = min(times[(label, "fused_pb")]), min(times[(label, "numpy_pb")])
        # the two paths ran back to back in every round: the median of the per-round ratios cancels
        # load that drifts between rounds, which the ratio of the two minima does not
        paired = np.median(np.array(times[(label, "numpy")]) / np.array(times[(label, "fused")]))
        paired_pb = np.median(np.array(times[(label, "numpy_pb")]) / np.array(times[(label, "fused_pb")]))
        out.append({"what": label, "batch": batch, "fused_ms": f * 1e3, "numpy_plain_ms": n * 1e3,
                    "fused_speed_vs_numpy": n / f, "fused_speed_vs_numpy_paired_median": float(paired),
                    "fused_predict_batch_ms": fp * 1e3, "numpy_predict_batch_ms": nps * 1e3,
                    "fused_speed_vs_numpy_predict_batch": nps / fp,
                    "fused_speed_vs_numpy_predict_batch_paired_median": float(paired_pb)})
    return out


def print_fused(rows: list[dict]) -> None:
    print("\n4. fused graph vs NumPy prepare + plain model + paste-back, CPU, ms per batch of "
          f"{rows[0]['batch']}")
    print("   (a) Segmenter.infer of the fused model vs prepare + infer + footprint paste-back of the plain;")
    print("   (b) predict_batch(return_probabilities=True) of each: the same N full-slice maps")
    print("   speed: ratio of the minima over rounds / median of the per-round ratios")
    print(f"   {'what':56s} {'(a) fused':>9s} {'numpy':>8s} {'speed':>12s} {'(b) fused':>9s} {'numpy':>8s} "
          f"{'speed':>12s}")
    for r in rows:
        print(f"   {r['what'][:56]:56s} {r['fused_ms']:9.1f} {r['numpy_plain_ms']:8.1f} "
              f"{r['fused_speed_vs_numpy']:5.2f}/{r['fused_speed_vs_numpy_paired_median']:4.2f}x "
              f"{r['fused_predict_batch_ms']:9.1f} {r['numpy_predict_batch_ms']:8.1f} "
              f"{r['fused_speed_vs_numpy_predict_batch']:5.2f}/"
              f"{r['fused_speed_vs_numpy_predict_batch_paired_median']:4.2f}x")
    print("   target: fused speed >= 1.0x on CPU")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ct-organs root")
    ap.add_argument("--case", default="thorax_1p5mm")
    ap.add_argument("--objects", type=int, default=160)
    ap.add_argument("--size", type=int, default=512, help="slice side after resampling, pixels")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per measurement (min is kept)")
    ap.add_argument("--int8", type=Path, default=MODELS / "cmdeploy-default.int8.onnx")
    ap.add_argument("--plain", type=Path, default=MODELS / "cmdeploy-default.onnx")
    ap.add_argument("--fused", type=Path, default=MODELS / "cmdeploy-default.fused.onnx",
                    help="a fused model exported earlier, timed against --plain (skipped if missing)")
    ap.add_argument("--checkpoint", type=Path, help="export plain + fused from this checkpoint "
                    "(default: compact config, random weights)")
    ap.add_argument("--threads", default="auto:off,auto:on,1:off",
                    help="onnxruntime settings for section 3, 'threads:spinning' comma-separated "
                    "(threads: auto or N; spinning: on or off; the first is the default session)")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip (1,2,3,4)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    skip = set(args.skip.split(","))

    series, rows, source = load_objects(args.data, args.case, args.objects, args.size)
    print(f"data: {len(rows)} objects on {source}")
    result: dict = {"data": source, "objects": len(rows)}
    spec = ModelSpec()
    if "1" not in skip:
        from cmdeploy import Segmenter

        spec = Segmenter.load(args.int8).spec
        result["prepare_steps"] = bench_steps(series, rows, spec, args.batch, args.repeats)
        print_steps(result["prepare_steps"])
    if "2" not in skip:
        import bench_guidance

        result["confidence_map"] = bench_guidance.run(512, args.batch, 10 * args.repeats)
        print("\n2. ", end="")
        bench_guidance.print_table(result["confidence_map"])
    if "3" not in skip:
        settings = []
        for item in args.threads.split(","):
            th, sp = item.split(":")
            spin = {"on": True, "off": False}[sp]
            settings.append((None if th == "auto" else int(th), spin))
        result["end_to_end"] = bench_end_to_end(args.int8, series, rows, args.batch, args.repeats, settings)
        print_end_to_end(result["end_to_end"], args.int8.name, args.batch)
    if "4" not in skip:
        with tempfile.TemporaryDirectory(prefix="cmdeploy-bench-fused-") as tmp:
            exported = export_pair(args.checkpoint, Path(tmp))
            pairs = [(f"{k}, exported now (vs its plain model)", v, exported["plain"])
                     for k, v in exported.items() if k != "plain"]
            if args.fused.is_file() and args.plain.is_file():
                pairs.append((f"{args.fused.name} (shipped, older graph) vs {args.plain.name}", args.fused,
                              args.plain))
            result["fused"] = bench_fused(pairs, series, rows, args.batch, args.repeats, None)
        print_fused(result["fused"])
    from cmdeploy.evaluation.timing import machine_info

    result["machine"] = machine_info()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
