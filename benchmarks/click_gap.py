"""Where imprecise clicks cost Dice: the exact − annotator gap per object-size quartile.

Reads the ``objects.csv`` of two ``cmdeploy evaluate`` runs of the same model and objects, one with
``--clicks exact`` and one with ``--clicks annotator``, and prints, per quartile of the reference
area (pixels), the mean Dice of each and their gap (points), plus the median predicted / reference
area (does the mask shrink or grow with imprecise clicks?).

    python benchmarks/click_gap.py runs/x_exact/objects.csv runs/x_annotator/objects.csv [--model NAME]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np


def load(path: Path, model: str) -> dict[str, np.ndarray]:
    """An evaluate ``objects.csv``: object keys, reference area, Dice, predicted area (pixels)."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or f"{model}:dice" not in rows[0]:
        raise ValueError(f"{path}: no rows or no '{model}:dice' column (pass --model)")
    return {
        "key": np.array([f"{r['case']}/{r['slice_index']}/{r['label']}/{r['piece']}" for r in rows]),
        "area": np.array([float(r["area_px"]) for r in rows]),
        "dice": np.array([float(r[f"{model}:dice"]) for r in rows]),
        "pred": np.array([float(r[f"{model}:pred_area_px"]) for r in rows]),
    }


def size_quartile_table(exact: dict[str, np.ndarray], annot: dict[str, np.ndarray]) -> list[str]:
    """Markdown rows: quartile of reference area, n, exact Dice %, annotator Dice %, gap, area ratios."""
    if not np.array_equal(exact["key"], annot["key"]):
        raise ValueError("the two runs do not list the same objects in the same order")
    edges = np.quantile(exact["area"], [0.0, 0.25, 0.5, 0.75, 1.0])
    q = np.clip(np.searchsorted(edges, exact["area"], side="right") - 1, 0, 3)
    lines = [
        "| reference area (px) | n | exact Dice % | annotator Dice % | gap "
        "| pred/ref area, exact | annotator |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = [(f"{edges[i]:.0f}–{edges[i + 1]:.0f}", q == i) for i in range(4)]
    for name, m in groups + [("all", np.ones_like(q, dtype=bool))]:
        e, a = 100 * exact["dice"][m].mean(), 100 * annot["dice"][m].mean()
        re = np.median(exact["pred"][m] / exact["area"][m])
        ra = np.median(annot["pred"][m] / annot["area"][m])
        lines.append(f"| {name} | {int(m.sum())} | {e:.2f} | {a:.2f} | {e - a:.2f} | {re:.3f} | {ra:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exact", type=Path, help="objects.csv of the --clicks exact run")
    p.add_argument("annotator", type=Path, help="objects.csv of the --clicks annotator run")
    p.add_argument("--model", default="model", help="model name in the column headers (default: model)")
    args = p.parse_args(argv)
    for path in (args.exact, args.annotator):
        if not path.is_file():
            print(f"error: {path} is not a file", file=sys.stderr)
            return 2
    try:
        table = size_quartile_table(load(args.exact, args.model), load(args.annotator, args.model))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
