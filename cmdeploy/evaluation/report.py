"""Tables of an evaluation: CSV rows and the Markdown report."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from cmdeploy.evaluation.run import Evaluation
from cmdeploy.evaluation.stats import (
    SIZE_EDGES,
    label_stats,
    size_stats,
    summarize,
    worst,
)


def object_rows(ev: Evaluation) -> Iterator[dict[str, Any]]:
    """One flat dict per object: identity, reference size, points, then each model's scores."""
    unit = ev.distance_unit
    for i, o in enumerate(ev.objects):
        row: dict[str, Any] = {
            "case": o.case,
            "slice_index": o.slice_index,
            "label": o.label,
            "label_id": o.label_id,
            "piece": o.piece,
            "area_px": o.area_px,
            "area_mm2": None if o.area_mm2 is None else round(o.area_mm2, 3),
        }
        for name, (x, y) in zip(("left", "right", "top", "bottom"), o.points.tolist(), strict=True):
            row[f"{name}_x"] = round(x, 3)
            row[f"{name}_y"] = round(y, 3)
        for model, run in ev.runs.items():
            s = run.scores[i]
            row[f"{model}:dice"] = round(s.dice, 6)
            row[f"{model}:hd95_{unit}"] = round(s.hd95_mm, 4) if np.isfinite(s.hd95_mm) else "inf"
            row[f"{model}:pred_area_px"] = s.pred_area_px
        yield row


# ------------------------------------------------------------------------------------- reporting
def _r(x: float, nd: int = 6) -> float | None:
    return None if not np.isfinite(x) else round(float(x), nd)


def results_rows(
    ev: Evaluation, *, by_size: bool = False, edges: Sequence[float] = SIZE_EDGES
) -> list[dict[str, Any]]:
    """Flat rows for ``results.csv``: per model, one row per label, the two overall rows
    (``mean over labels`` = the headline, ``mean over objects``), and size bins when ``by_size``.

    Dice is a fraction in [0, 1]; HD95 in :attr:`Evaluation.distance_unit`.
    """
    unit = ev.distance_unit
    rows: list[dict[str, Any]] = []

    def add(model: str, group: str, name: str, n: int, dm: float, ds: float, hm: float, hs: float,
            empty: int) -> None:
        rows.append({
            "model": model, "group": group, "name": name, "n": n,
            "dice_mean": _r(dm), "dice_std": _r(ds),
            f"hd95_mean_{unit}": _r(hm, 4), f"hd95_std_{unit}": _r(hs, 4), "n_empty_pred": empty,
        })

    for model in ev.runs:
        for s in label_stats(ev, model):
            add(model, "label", s.name, s.n, s.dice_mean, s.dice_std, s.hd95_mean, s.hd95_std, s.n_empty)
        sm = summarize(ev, model)
        add(model, "overall", "mean over labels", sm.n_labels, sm.dice_label_mean, float("nan"),
            sm.hd95_label_mean, float("nan"), sm.n_empty)
        add(model, "overall", "mean over objects", sm.n_objects, sm.dice_object_mean, sm.dice_object_std,
            sm.hd95_object_mean, sm.hd95_object_std, sm.n_empty)
        if by_size:
            for s in size_stats(ev, model, edges):
                add(model, "size", s.name, s.n, s.dice_mean, s.dice_std, s.hd95_mean, s.hd95_std, s.n_empty)
    return rows


def fmt_pm(mean: float, std: float, scale: float = 1.0, nd: int = 2) -> str:
    """``"94.00 ± 3.10"`` (``"-"`` when undefined); ``scale`` 100 turns Dice into percent."""
    if not np.isfinite(mean):
        return "-"
    if not np.isfinite(std):
        return f"{mean * scale:.{nd}f}"
    return f"{mean * scale:.{nd}f} ± {std * scale:.{nd}f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_table(ev: Evaluation) -> tuple[list[str], list[list[str]]]:
    """Side-by-side per-label table: ``label, n``, then ``Dice % / HD95`` per model, then the two
    overall rows (headline first)."""
    unit = ev.distance_unit
    header = ["label", "n"]
    for m in ev.runs:
        header += [f"{m} Dice %", f"{m} HD95 {unit}"]
    per = {m: label_stats(ev, m) for m in ev.runs}
    rows = []
    for i, label in enumerate(ev.labels()):
        r = [label, str(per[next(iter(per))][i].n)]
        for m in ev.runs:
            s = per[m][i]
            hd = fmt_pm(s.hd95_mean, s.hd95_std, nd=1) + (f" ({s.n_empty} empty)" if s.n_empty else "")
            r += [fmt_pm(s.dice_mean, s.dice_std, 100.0), hd]
        rows.append(r)
    sums = {m: summarize(ev, m) for m in ev.runs}
    r1 = ["**mean over labels** (headline)", str(len(ev.labels()))]
    r2 = ["mean over objects", str(len(ev.objects))]
    for m in ev.runs:
        s = sums[m]
        r1 += [f"**{fmt_pm(s.dice_label_mean, float('nan'), 100.0)}**",
               fmt_pm(s.hd95_label_mean, float("nan"), nd=1)]
        r2 += [fmt_pm(s.dice_object_mean, s.dice_object_std, 100.0),
               fmt_pm(s.hd95_object_mean, s.hd95_object_std, nd=1)]
    rows += [r1, r2]
    return header, rows


def size_table(ev: Evaluation, edges: Sequence[float] = SIZE_EDGES) -> tuple[list[str], list[list[str]]]:
    """Per size bin: ``n``, then Dice % and HD95 per model."""
    unit = ev.distance_unit
    header = [f"object area ({ev.area_unit})", "n"]
    for m in ev.runs:
        header += [f"{m} Dice %", f"{m} HD95 {unit}"]
    per = {m: size_stats(ev, m, edges) for m in ev.runs}
    first = per[next(iter(per))]
    rows = []
    for i, s0 in enumerate(first):
        r = [s0.name.rsplit(" ", 1)[0], str(s0.n)]
        for m in ev.runs:
            s = per[m][i]
            r += [fmt_pm(s.dice_mean, s.dice_std, 100.0), fmt_pm(s.hd95_mean, s.hd95_std, nd=1)]
        rows.append(r)
    return header, rows


def worst_table(ev: Evaluation, model: str, n: int = 12) -> tuple[list[str], list[list[str]]]:
    """The ``n`` lowest-Dice objects of one model."""
    unit = ev.distance_unit
    run = ev.runs[model]
    header = ["case", "slice", "label", "piece", f"area ({ev.area_unit})", "Dice %", f"HD95 {unit}",
              "pred px"]
    areas = ev.areas()
    rows = []
    for i in worst(ev, model, n):
        o, s = ev.objects[i], run.scores[i]
        rows.append([
            o.case, str(o.slice_index), o.label, str(o.piece), f"{areas[i]:.0f}",
            f"{s.dice * 100:.2f}", f"{s.hd95_mm:.1f}" if np.isfinite(s.hd95_mm) else "inf",
            str(s.pred_area_px),
        ])
    return header, rows


def markdown_report(
    ev: Evaluation, *, by_size: bool = False, edges: Sequence[float] = SIZE_EDGES, n_worst: int = 12
) -> str:
    """``results.md``: settings, the side-by-side table, size bins (optional) and worst cases."""
    st = ev.settings
    parts = [
        "# cmdeploy evaluate",
        "",
        f"- cases: {', '.join(c.name for c in ev.cases)}; objects: {len(ev.objects)} "
        f"(connected components >= {st.get('min_size_px')} px, {st.get('connectivity')}-connected)",
        f"- labels: {', '.join(ev.labels()) or '-'}",
        (
            f"- clicks: simulated annotator {st['click_model']} (seed {st.get('seed')})"
            if st.get("clicks") == "annotator"
            else f"- extreme points from the reference masks, jitter {st.get('jitter_px', 0):g} px "
            f"(seed {st.get('seed')})"
        ),
        "- models: " + "; ".join(f"{m} ({r.path.name}, {r.backend})" for m, r in ev.runs.items()),
        "- Dice in %, mean ± std (ddof 0) over objects; HD95 = max of the two directed 95th "
        f"percentile surface distances, in {ev.distance_unit}, over objects with a non-empty prediction.",
        "- **Headline: mean over labels of the per-label mean Dice** (as the paper's Table 1); the "
        "mean over all objects is given as well.",
        "",
        "## Per label",
        "",
        _md_table(*comparison_table(ev)),
    ]
    if by_size:
        parts += ["", "## By object size", "", _md_table(*size_table(ev, edges))]
    for m in ev.runs:
        parts += ["", f"## Worst {min(n_worst, len(ev.objects))} objects: {m}", "",
                  _md_table(*worst_table(ev, m, n_worst))]
    return "\n".join(parts) + "\n"
