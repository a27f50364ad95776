"""FP32 vs INT8 (QDQ) onnxruntime latency, side by side in one process.

    .venv/bin/python benchmarks/bench_int8.py                       # compact config, random weights
    .venv/bin/python benchmarks/bench_int8.py --checkpoint best.pt  # a trained model (+ Dice)
    .venv/bin/python benchmarks/bench_int8.py --fp32 m.onnx --int8 m.int8.onnx --json

Without ``--int8`` the FP32 model is quantized here (CPU recipe: uint8 activations, int8
per-channel weights, graph rewrites), calibrated on real crops: the shared ct-organs calibration
case when present, else CT_small.dcm. ``--naive`` also times a plain per-channel QDQ without the
graph rewrites. Each session uses ``--threads`` intra-op threads (default 2, this project's CPU
machines); after ``--warmup`` runs per model, the models run in turn (round-robin, so load from
other processes hits them alike) ``--repeats`` times per batch size, each run after a
``--gap-ms`` pause so the other session's spinning worker threads have parked; medians and
minima are reported. Inputs are real preprocessed crops. Dice (FP32 and INT8, on the held-out case) is
reported when the shared data exists and the model is not a random-weight one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs"


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def time_models(
    sessions: dict[str, ort.InferenceSession],
    x: np.ndarray,
    *,
    repeats: int,
    warmup: int,
    gap_s: float = 0.05,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per run of each session on ``x``, measured round-robin after
    ``warmup`` runs each.

    Each session owns a thread pool whose workers spin for a while after a run; on a 2-core
    machine the previous session's spinning worker steals a core from the next run (measured:
    FP32 +20 %, INT8 +45 % at batch 16). ``gap_s`` of sleep before every timed run lets them park,
    as they would between calls of a real single-session service.
    """
    for s in sessions.values():
        name = s.get_inputs()[0].name
        for _ in range(warmup):
            s.run(None, {name: x})
    wall: dict[str, list[float]] = {k: [] for k in sessions}
    cpu: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(repeats):
        for k, s in sessions.items():
            feeds = {s.get_inputs()[0].name: x}
            time.sleep(gap_s)
            c, t = time.process_time(), time.perf_counter()
            s.run(None, feeds)
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


def random_compact(folder: Path) -> Path:
    """The compact config (ResNet-18 width 24, 256 px) with seeded random weights, exported."""
    import torch

    from cmdeploy.export.onnx_export import export_onnx
    from cmdeploy.spec import ModelSpec
    from cmdeploy.train.checkpoint import Checkpoint
    from cmdeploy.train.model import build_model, make_config

    torch.manual_seed(0)
    spec = ModelSpec.for_input_size(256)
    net = build_model(make_config("compact", spec.num_channels)).eval()
    Checkpoint.from_model(net, spec).save(folder / "compact_random.pt")
    export_onnx(folder / "compact_random.pt", folder / "compact_random.onnx", check_parity=False)
    return folder / "compact_random.onnx"


def load_data(num_calib: int, num_eval: int, seed: int):  # -> DataSplit
    from cmdeploy.calibration.slices import load_split

    if (SHARED / "abdomen_3mm" / "image.nii.gz").is_file():
        return load_split(SHARED, num_calib=num_calib, num_eval=num_eval, seed=seed)
    from pydicom.data import get_testdata_file

    return load_split(get_testdata_file("CT_small.dcm"), num_calib=num_calib, num_eval=num_eval, seed=seed)


def quantize_here(fp32: Path, out: Path, split, method: str, rewrites: bool) -> None:
    from cmdeploy.calibration.quantize import Recipe, calibrate_ranges, prepare, quantize, save_model

    recipe = Recipe("cpu", method, graph_rewrites=rewrites)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare(fp32, recipe, tmp)
        ranges = calibrate_ranges(prepared, split.calibration, recipe)
        save_model(quantize(prepared, ranges, recipe), out)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fp32", type=Path, help="plain FP32 ONNX (default: compact config, random weights)")
    ap.add_argument("--checkpoint", type=Path, help="export this checkpoint as the FP32 model")
    ap.add_argument("--int8", type=Path, help="INT8 ONNX (default: quantized here)")
    ap.add_argument("--method", default="minmax", choices=["minmax", "entropy", "percentile"])
    ap.add_argument("--naive", action="store_true", help="also time a QDQ model without graph rewrites")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch size")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--gap-ms", type=float, default=50.0, help="sleep before each timed run (see time_models)"
    )
    ap.add_argument("--calib-slices", type=int, default=64)
    ap.add_argument("--eval-objects", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    from cmdeploy.calibration.gate import evaluate_dice
    from cmdeploy.calibration.graph import check_plain
    from cmdeploy.calibration.quantize import load_model
    from cmdeploy.calibration.reader import prepare_objects

    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp_s:
        tmp = Path(tmp_s)
        trained = args.fp32 is not None or args.checkpoint is not None
        if args.checkpoint is not None:
            from cmdeploy.export.onnx_export import export_onnx

            fp32 = tmp / "fp32.onnx"
            export_onnx(args.checkpoint, fp32)
        elif args.fp32 is not None:
            fp32 = args.fp32
        else:
            log("building the compact config with random weights")
            fp32 = random_compact(tmp)
        spec = check_plain(load_model(fp32))
        split = load_data(args.calib_slices, args.eval_objects, args.seed)
        models = {"fp32": fp32}
        if args.int8 is not None:
            models["int8"] = args.int8
        else:
            log(f"quantizing ({args.method}, {len(split.calibration)} calibration objects)")
            models["int8"] = tmp / "int8.onnx"
            quantize_here(fp32, models["int8"], split, args.method, rewrites=True)
        if args.naive:
            models["int8_naive"] = tmp / "int8_naive.onnx"
            quantize_here(fp32, models["int8_naive"], split, args.method, rewrites=False)
        sessions = {k: session(p, args.threads) for k, p in models.items()}
        crops = prepare_objects(split.calibration, spec)
        result: dict = {
            "machine": {
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "load_average_before": os.getloadavg()[0],
                "onnxruntime": ort.__version__,
                "threads": args.threads,
            },
            "model_bytes": {k: Path(p).stat().st_size for k, p in models.items()},
            "input_size": spec.input_size,
            "random_weights": not trained,
            "latency_ms": {},
        }
        for b in args.batches:
            x = np.ascontiguousarray(np.resize(crops, (b, *crops.shape[1:])))
            log(f"timing batch {b}: {args.repeats} round-robin runs per model")
            times, cpu = time_models(
                sessions, x, repeats=args.repeats, warmup=args.warmup, gap_s=args.gap_ms / 1e3
            )
            entry = {}
            for k, t in times.items():
                entry[k] = {
                    "median": 1e3 * float(np.median(t)),
                    "min": 1e3 * float(np.min(t)),
                    "cpu_median": 1e3 * float(np.median(cpu[k])),
                }
            for k in times:
                if k != "fp32":
                    entry[f"speedup_{k}"] = {
                        "median": entry["fp32"]["median"] / entry[k]["median"],
                        "min": entry["fp32"]["min"] / entry[k]["min"],
                    }
            result["latency_ms"][str(b)] = entry
        result["machine"]["load_average_after"] = os.getloadavg()[0]
        if trained and (SHARED / "abdomen_3mm" / "image.nii.gz").is_file():
            log(f"Dice on {len(split.evaluation)} held-out objects of {', '.join(split.eval_cases)}")
            result["dice"] = {
                k: float(100 * evaluate_dice(s, split.evaluation, spec).mean()) for k, s in sessions.items()
            }
            result["dice_cases"] = split.eval_cases
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        m = result["machine"]
        print(
            f"{m['cores']} cores, onnxruntime {m['onnxruntime']}, {m['threads']} threads; load average "
            f"{m['load_average_before']:.2f} -> {m['load_average_after']:.2f} (other processes slow "
            "both models; compare medians measured together)"
        )
        print("model sizes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in result["model_bytes"].items()))
        for b, entry in result["latency_ms"].items():
            parts = [
                f"{k} {v['median']:.1f} ms (min {v['min']:.1f}, cpu {v['cpu_median']:.1f})"
                for k, v in entry.items()
                if not k.startswith("speedup")
            ]
            ups = [
                f"{k[8:]} x{v['median']:.2f} (min-ratio x{v['min']:.2f})"
                for k, v in entry.items()
                if k.startswith("speedup")
            ]
            print(f"batch {b}: " + ", ".join(parts) + " | speedup " + ", ".join(ups))
        if "dice" in result:
            print("Dice %: " + ", ".join(f"{k} {v:.2f}" for k, v in result["dice"].items()))
    return result


if __name__ == "__main__":
    main()
