"""The no-learning floor: Dice of the filled bounding box of each object's extreme points.

Uses the same object definition as training and ``cmdeploy evaluate`` (8-connected, >= 25 px per label
per axial slice, LPS slices). Usage: ``python benchmarks/bbox_floor.py ../shared/data/ct-organs thorax_1p5mm``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cmdeploy.evaluation.metrics import dice
from cmdeploy.io import open_series
from cmdeploy.labels_to_points import DEFAULT_CONNECTIVITY, DEFAULT_MIN_SIZE, connected_components


def bbox_floor(labels_path: Path) -> dict[int, list[float]]:
    """Per label id, the Dice of the filled bounding box of every object."""
    labels = open_series(labels_path)
    per: dict[int, list[float]] = {}
    for k in range(labels.num_slices):
        s = labels.slice_hu(k).astype(np.int32)
        for lab in np.unique(s[s > 0]):
            comp, n = connected_components(s == lab, connectivity=DEFAULT_CONNECTIVITY)
            sizes = np.bincount(comp.ravel(), minlength=n + 1)
            for c in np.nonzero(sizes[1:] >= DEFAULT_MIN_SIZE)[0] + 1:
                m = comp == c
                ys, xs = np.nonzero(m)
                box = np.zeros_like(m)
                box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
                per.setdefault(int(lab), []).append(dice(box, m))
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path, help="ct-organs root")
    ap.add_argument("cases", nargs="+")
    args = ap.parse_args()
    names = json.loads((args.data / "labels.json").read_text())
    for case in args.cases:
        per = bbox_floor(args.data / case / "labels.nii.gz")
        print(f"\n{case}: filled bounding box Dice %, mean ± std over objects")
        print("| label | n | Dice % |\n| --- | --- | --- |")
        for lab, v in sorted(per.items()):
            mean, std = 100 * np.mean(v), 100 * np.std(v)
            print(f"| {names.get(str(lab), lab)} | {len(v)} | {mean:.2f} ± {std:.2f} |")
        allv = [x for v in per.values() for x in v]
        print(f"| mean over objects | {len(allv)} | {100 * np.mean(allv):.2f} |")
        print(f"| mean over labels | {len(per)} | {100 * np.mean([np.mean(v) for v in per.values()]):.2f} |")


if __name__ == "__main__":
    main()
