"""TensorRT parity and latency of the shipped models, on a machine with an NVIDIA GPU and TensorRT.

Run it with ``scripts/trt_check.sh`` (inside NVIDIA's NGC TensorRT container, see README) or
directly: ``python benchmarks/trt_parity.py [--out out/trt_check] [--data ../shared/data/ct-organs]``.

For each shipped model (``cmdeploy/models/*.onnx``):

1. the TensorRT-compatibility lint (:mod:`cmdeploy.export.trt_lint`); a model with errors is not
   built, and the table says why (the CPU-target INT8 model always lands here);
2. engines: FP32 and FP16 (via :func:`cmdeploy.export.fp16.convert_to_fp16`) of the plain and the
   fused model, INT8 of a TensorRT-target Q/DQ model calibrated here from the plain one
   (``Recipe("tensorrt", "entropy")``, real slices: ``--data`` or CT_small.dcm), all strongly
   typed;
3. parity: Polygraphy's ``Comparator`` runs onnxruntime (CPU, the FP32 ONNX: the reference) and
   the engine (``TrtRunner``) on the same feeds built from real slices
   (:func:`cmdeploy.export.parity.default_cases`: CT_small.dcm objects, plus shared-data objects
   when present), and ``Comparator.compare_accuracy`` gives its verdict on the raw outputs; the
   table adds max |d probability| and mask agreement on the sigmoid, and cmdeploy's own
   ``verify_models`` (Segmenter + TensorRTRunner, pasted back into the slice);
4. latency: Polygraphy's per-iteration runtime, median, for a batch of 8 objects.

Prints one table and writes ``<out>/trt_parity.json``. Exit 1 when an engine that was built
fails parity, 2 when TensorRT or a GPU is missing.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "cmdeploy" / "models"
BATCH = 8
# tolerances on raw outputs (logits or probabilities) for Polygraphy's verdict, per precision
ATOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": 1.0}
RTOL = {"fp32": 1e-3, "fp16": 5e-2, "int8": 0.5}
MIN_MASK_AGREEMENT = {"fp32": 0.999, "fp16": 0.995, "int8": 0.98}


def feeds_for(model_path: Path, cases: list) -> list[dict[str, np.ndarray]]:
    """Batches of BATCH objects as the model takes them: plain crops or fused slices + points."""
    import onnx

    from cmdeploy.preprocess import prepare_batch
    from cmdeploy.spec import ModelSpec

    model = onnx.load(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    spec = ModelSpec.from_metadata(meta)
    names = [i.name for i in model.graph.input]
    feeds = []
    if "slices" in names:  # fused: one batch per slice shape
        groups: dict[tuple, list] = {}
        for c in cases:
            groups.setdefault(c.slice_hu.shape, []).append(c)
        for group in groups.values():
            for a in range(0, len(group), BATCH):
                part = group[a : a + BATCH]
                feeds.append(
                    {
                        "slices": np.stack([c.slice_hu for c in part]).astype(np.float32),
                        "points": np.stack([c.points for c in part]).astype(np.float32),
                    }
                )
        return feeds
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)
    return [{names[0]: x[a : a + BATCH]} for a in range(0, len(x), BATCH)]


def compare(reference_onnx: Path, engine: Path, feeds: list, precision: str, threshold: float) -> dict:
    """Polygraphy Comparator: onnxruntime CPU (reference) vs the engine on ``feeds``."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    ort_runner = OnnxrtRunner(
        SessionFromOnnx(str(reference_onnx), providers=["CPUExecutionProvider"]), name="onnxruntime"
    )
    trt_runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine))), name="tensorrt")
    results = Comparator.run([ort_runner, trt_runner], data_loader=feeds, warm_up=2)
    verdict = Comparator.compare_accuracy(
        results, compare_func=CompareFunc.simple(atol=ATOL[precision], rtol=RTOL[precision])
    )
    ref_iters, trt_iters = results["onnxruntime"], results["tensorrt"]
    diffs, agree, total = [], 0, 0
    for r, t in zip(ref_iters, trt_iters, strict=True):
        name = next(iter(r))
        a, b = np.asarray(r[name], np.float64), np.asarray(t[name], np.float64)
        if name == "logits":
            a, b = 1 / (1 + np.exp(-a)), 1 / (1 + np.exp(-b))
        diffs.append(np.abs(a - b).ravel())
        agree += int(((a > threshold) == (b > threshold)).sum())
        total += a.size
    d = np.concatenate(diffs)
    return {
        "polygraphy_pass": bool(verdict),
        "max_abs_prob": float(d.max()),
        "mean_abs_prob": float(d.mean()),
        "mask_agreement": agree / max(total, 1),
        "ort_ms": 1e3 * float(np.median([it.runtime for it in ref_iters])),
        "trt_ms": 1e3 * float(np.median([it.runtime for it in trt_iters])),
    }


def calibrate_for_tensorrt(plain: Path, out: Path, data: Path | None) -> tuple[Path | None, str]:
    """TensorRT-target Q/DQ model of ``plain`` (symmetric int8, float biases); (path, note)."""
    from cmdeploy.calibration.gate import calibrate_model
    from cmdeploy.calibration.quantize import Recipe
    from cmdeploy.calibration.slices import load_split
    from cmdeploy.export.parity import ct_small_path

    source = data if data is not None and data.exists() else ct_small_path()
    split = load_split(source, num_calib=64, num_eval=64, seed=0)
    # entropy ranges: 1.6 Dice points below FP32 vs 2.1 for MinMax on the shipped model (64 held-out
    # thorax objects, docs/results.md); the gate is informational here, parity is what is checked
    result = calibrate_model(plain, split, out, recipe=Recipe("tensorrt", "entropy"), max_drop=100.0)
    rows = [ln.strip() for ln in result.report.table().splitlines() if ln.strip().startswith("all")]
    return result.output, f"calibrated on {source.name} (entropy); held-out Dice {rows[-1] if rows else '?'}"


def _table_row(r: dict) -> str:
    def f(key: str, fmt: str, scale: float = 1.0) -> str:
        return format(scale * r[key], fmt) if key in r else "-"

    return (
        f"{r['model'][:38]:38s} {r['precision']:5s} {f('engine_mb', '6.2f'):>6s} "
        f"{f('build_s', '8.1f'):>8s} {f('max_abs_prob', '8.4f'):>8s} {f('mean_abs_prob', '9.2e'):>9s} "
        f"{f('mask_agreement', '8.3f', 100):>8s} {f('cmdeploy_mask_agreement', '10.3f', 100):>10s} "
        f"{str(r.get('polygraphy_pass', '-')):>10s} {f('ort_ms', '8.2f'):>8s} {f('trt_ms', '8.2f'):>8s}  "
        f"{r['status']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "trt_check")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ct-organs")
    ap.add_argument("--models", type=Path, default=MODELS)
    args = ap.parse_args(argv)
    try:
        import tensorrt as trt

        from cmdeploy.backends.tensorrt import cuda_device_info

        gpu, cc = cuda_device_info(0)
    except Exception as exc:  # no TensorRT, no driver, no GPU
        print(f"needs TensorRT and an NVIDIA GPU: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    import onnx

    from cmdeploy.export.fp16 import convert_to_fp16, fp16_node_prefixes
    from cmdeploy.export.parity import default_cases
    from cmdeploy.export.tensorrt_build import build_engine
    from cmdeploy.export.trt_lint import lint_file
    from cmdeploy.export.verify import verify_models
    from cmdeploy.spec import ModelSpec

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    cases = default_cases()
    print(f"TensorRT {trt.__version__} on {gpu} (sm {cc}); {len(cases)} real objects; {platform.platform()}")
    rows: list[dict] = []
    jobs: list[tuple[str, Path, Path, str]] = []  # (label, reference FP32 ONNX, engine ONNX, precision)
    for path in sorted(args.models.glob("*.onnx")):
        report = lint_file(path)
        print(report.summary())
        if not report.ok:
            rows.append({"model": path.name, "precision": "-", "status": "lint: " + ", ".join(
                sorted(report.error_codes()))})
            continue
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if meta.get("cmdeploy.precision") == "int8":
            jobs.append((path.name, path, path, "int8"))  # a TensorRT-target Q/DQ model
            continue
        jobs.append((path.name, path, path, "fp32"))
        model = onnx.load(str(path))
        fp16 = out / f"{path.stem}.fp16.onnx"
        onnx.save(convert_to_fp16(model, node_prefixes=fp16_node_prefixes(model)), fp16)
        jobs.append((path.name, path, fp16, "fp16"))
        if meta.get("cmdeploy.graph") == "plain":
            q, note = calibrate_for_tensorrt(path, out / f"{path.stem}.int8-trt.onnx", args.data)
            print(note)
            if q is None:
                rows.append({"model": path.name, "precision": "int8", "status": "gate refused: " + note})
            else:
                jobs.append((path.name + " (calibrated here)", path, q, "int8"))
    failed = False
    for label, reference, source, precision in jobs:
        engine = out / f"{source.stem}.{precision}.plan"
        row: dict = {"model": label, "precision": precision}
        try:
            t0 = time.perf_counter()
            build_engine(source, engine, precision=precision, max_batch=32, timing_cache=out / "timing.cache")
            row["build_s"] = time.perf_counter() - t0
            row["engine_mb"] = engine.stat().st_size / 1e6
            ref_model = onnx.load(str(reference), load_external_data=False)
            threshold = ModelSpec.from_metadata({p.key: p.value for p in ref_model.metadata_props}).threshold
            row.update(compare(reference, engine, feeds_for(reference, cases), precision, threshold))
            check = verify_models(reference, engine, cases, atol=1.0, min_mask_agreement=0.0)
            row["cmdeploy_mask_agreement"] = check.report.mask_agreement
            row["status"] = "ok" if (
                row["mask_agreement"] >= MIN_MASK_AGREEMENT[precision]
                and check.report.mask_agreement >= MIN_MASK_AGREEMENT[precision]
            ) else "PARITY FAIL"
        except Exception as exc:  # report and go on with the other engines
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        failed |= row["status"] != "ok"
        rows.append(row)

    head = (f"{'model':38s} {'prec':5s} {'MB':>6s} {'build s':>8s} {'max|dp|':>8s} {'mean|dp|':>9s} "
            f"{'mask %':>8s} {'pipeline %':>10s} {'polygraphy':>10s} {'ORT ms':>8s} {'TRT ms':>8s}  status")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(_table_row(r))
    print(f"\nlatency: median per batch of {BATCH} objects (ORT: CPU, FP32 reference ONNX)")
    (out / "trt_parity.json").write_text(
        json.dumps({"tensorrt": trt.__version__, "gpu": gpu, "compute_capability": cc, "rows": rows},
                   indent=1, default=str)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
