"""Inference-time options on held-out cases: threshold, click post-processing, flip TTA.

For every object of the given cases (the shared object definition) and each click protocol
(exact, simulated annotator), the model's slice probabilities are computed once (and once more on
the left-right mirrored slice for flip TTA); then mean Dice over objects is reported for every
threshold x post-processing x TTA combination, with the latency each option adds.

    python benchmarks/tune_inference.py --model runs/robust_cm/model.onnx \
        --data ../shared/data/ct-organs --cases thorax_1p5mm \
        --data ../shared/data/ct-tumours --cases sts_003,sts_008,sts_013,sts_018,sts_023
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cmdeploy import Segmenter
from cmdeploy.annotator import DEFAULT_ANNOTATOR
from cmdeploy.evaluation.metrics import dice
from cmdeploy.postprocess import postprocess_mask

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def _objects(data: list[str], cases: list[str], clicks: str, seed: int):
    from cmdeploy.evaluation import open_case, slice_objects
    from cmdeploy.io.cases import find_cases

    for root, names in zip(data, cases, strict=True):
        for case in find_cases(Path(root), cases=[n for n in names.split(",") if n]):
            oc = open_case(case)
            for k in range(oc.series.num_slices):
                found = slice_objects(
                    oc.labels.slice(k), case=case.name, slice_index=k, names=oc.names, seed=seed,
                    spacing=oc.spacing, clicks=clicks, click_model=DEFAULT_ANNOTATOR,
                )
                if found:
                    image = oc.series.slice_hu(k)
                    for obj, mask in found:
                        yield case.name, image, obj.points, mask


def _mirror(points: np.ndarray, width: int) -> np.ndarray:
    """Points of the left-right mirrored slice: x -> W-1-x, left and right swap roles."""
    m = points.copy()
    m[:, 0] = width - 1 - m[:, 0]
    return m[[1, 0, 2, 3]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--cases", action="append", required=True, help="comma-separated, one per --data")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    seg = Segmenter.load(args.model, threads=args.threads)
    print(f"model {args.model}: stored threshold {seg.threshold}")
    print("| clicks | TTA | post-processing | " + " | ".join(f"t={t}" for t in THRESHOLDS) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in THRESHOLDS) + " |")
    timing: dict[str, float] = {}
    for clicks in ("exact", "annotator"):
        objs = list(_objects(args.data, args.cases, clicks, args.seed))
        images = [o[1] for o in objs]
        pts = np.stack([o[2] for o in objs])
        refs = [o[3] for o in objs]
        t0 = time.perf_counter()
        probs = seg.predict_batch(images, pts, return_probabilities=True)
        timing["model"] = (time.perf_counter() - t0) / len(objs)
        t0 = time.perf_counter()
        mirrored = seg.predict_batch(
            [im[:, ::-1].copy() for im in images],
            np.stack([_mirror(p, im.shape[1]) for p, im in zip(pts, images, strict=True)]),
            return_probabilities=True,
        )
        timing["flip TTA"] = (time.perf_counter() - t0) / len(objs)
        tta = [(a + b[:, ::-1]) / 2 for a, b in zip(probs, mirrored, strict=True)]
        for name, ps in (("off", probs), ("flip", tta)):
            for mode in ("none", "clicked"):
                row = []
                t_pp = 0.0
                for t in THRESHOLDS:
                    d = []
                    for p, q, ref in zip(ps, pts, refs, strict=True):
                        m = p > np.float32(t)
                        t1 = time.perf_counter()
                        m = postprocess_mask(m, q, mode)
                        t_pp += time.perf_counter() - t1
                        d.append(dice(m, ref))
                    row.append(f"{100 * np.mean(d):.2f}")
                timing[f"post-processing {mode}"] = t_pp / (len(objs) * len(THRESHOLDS))
                print(f"| {clicks} ({len(objs)} objects) | {name} | {mode} | " + " | ".join(row) + " |")
    print()
    for k, v in timing.items():
        print(f"{k}: {1000 * v:.2f} ms per object")


if __name__ == "__main__":
    main()
