"""TensorRT-target INT8 recipes side by side: Dice drop on held-out objects and the TensorRT lint.

Compares the recipe of issue 16 (float biases, per-tensor MatMul weights: what TensorRT can build)
with the one before it (onnxruntime's defaults: INT32 biases, per-channel MatMul weights along
axis 1), for each range method, on the same calibration/held-out split. onnxruntime runs the Q/DQ
graphs, so this measures the quantization, not TensorRT.

    python benchmarks/trt_int8_recipes.py --model cmdeploy/models/cmdeploy-default.onnx \
        --data ../shared/data/ct-organs --methods minmax entropy percentile
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

RECIPES = {
    "issue 16 (float biases, per-tensor MatMul weights)": {},
    "before (INT32 biases, per-channel MatMul weights)": {
        "quantize_bias": True,
        "per_tensor_matmul_weights": False,
    },
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["minmax", "entropy", "percentile"])
    ap.add_argument("--num", type=int, default=64, help="calibration and held-out objects each")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    q = importlib.import_module("cmdeploy.calibration.quantize")
    from cmdeploy.calibration.gate import calibrate_model
    from cmdeploy.calibration.slices import load_split
    from cmdeploy.export.trt_lint import lint_model

    split = load_split(args.data, num_calib=args.num, num_eval=args.num, seed=0)
    print("| ranges | recipe | FP32 | INT8 | drop | lint errors | lint warnings | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in args.methods:
        for name, patch in RECIPES.items():
            saved = {k: getattr(q.Recipe, k) for k in patch}
            try:
                for k, v in patch.items():
                    setattr(q.Recipe, k, property(lambda self, v=v: v))
                t0 = time.perf_counter()
                r = calibrate_model(
                    args.model,
                    split,
                    None,
                    recipe=q.Recipe("tensorrt", method),
                    max_drop=100.0,
                    threads=args.threads,
                )
            finally:
                for k, v in saved.items():
                    setattr(q.Recipe, k, v)
            lint = lint_model(r.model)
            drop = r.report.fp32_mean - r.report.int8_mean
            print(
                f"| {method} | {name} | {r.report.fp32_mean:.2f} | {r.report.int8_mean:.2f} | "
                f"{drop:.2f} | {', '.join(sorted(lint.error_codes())) or '-'} | "
                f"{len(lint.warnings)} | {time.perf_counter() - t0:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
