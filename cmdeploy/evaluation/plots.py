"""Figures of an evaluation as PNG bytes (matplotlib, the ``eval`` extra; imported when drawing)."""

from __future__ import annotations

from typing import Any

GRID_COLUMNS = 4


def _figure_png(fig) -> bytes:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def scatter_png(ev) -> bytes:
    """Dice vs reference object area (log x), one panel per model, coloured by label."""
    import numpy as np
    from matplotlib.figure import Figure

    models = list(ev.runs)
    fig = Figure(figsize=(5.5 * len(models), 4.2))
    areas = np.maximum(ev.areas(), 1e-3)
    labels = np.array([o.label for o in ev.objects], dtype=object)
    for j, m in enumerate(models):
        ax = fig.add_subplot(1, len(models), j + 1)
        d = ev.runs[m].dice()
        for lab in ev.labels():
            sel = labels == lab
            ax.scatter(areas[sel], d[sel], s=9, alpha=0.6, label=f"{lab} ({int(sel.sum())})")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"reference object area ({'mm²' if ev.area_unit == 'mm2' else 'px'})")
        ax.set_ylabel("Dice")
        ax.set_title(m)
        ax.grid(True, alpha=0.3)
        if len(ev.labels()) <= 12:
            ax.legend(fontsize=7, loc="lower right")
    return _figure_png(fig)


def _tile(image, ref, pred, points, bbox) -> Any:
    """RGB crop around one object: reference green, prediction red, extreme points."""
    import numpy as np

    try:
        from cmdeploy.writers import ObjectMask
        from cmdeploy.writers.png_overlay import render_overlay

        objs = [ObjectMask(0, "reference", ref, points), ObjectMask(0, "prediction", pred)]
        rgb = render_overlay(image, objs, values={"prediction": 1, "reference": 2}, draw_labels=False)
    except ImportError:  # minimal fallback: tint only
        g = np.clip((image + 200.0) / 450.0, 0, 1) * 255
        rgb = np.repeat(g[:, :, None], 3, axis=2)
        rgb[ref] = rgb[ref] * 0.6 + np.array([60, 180, 75]) * 0.4
        rgb[pred] = rgb[pred] * 0.6 + np.array([230, 25, 75]) * 0.4
        rgb = rgb.astype(np.uint8)
    h, w = ref.shape
    y0, y1, x0, x1 = bbox
    if pred.any():
        ys, xs = np.nonzero(pred)
        y0, y1, x0, x1 = min(y0, ys.min()), max(y1, ys.max()), min(x0, xs.min()), max(x1, xs.max())
    side = max(y1 - y0, x1 - x0) + 1
    margin = max(int(0.4 * side), 12)
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    half = side // 2 + margin
    return rgb[max(cy - half, 0) : min(cy + half + 1, h), max(cx - half, 0) : min(cx + half + 1, w)]


def worst_grid_png(ev, model: str, seg, n: int) -> bytes:
    """A grid of the ``n`` lowest-Dice objects of ``model`` (reference green, prediction red)."""
    import math

    from matplotlib.figure import Figure

    from cmdeploy.evaluation.run import reconstruct
    from cmdeploy.evaluation.stats import worst

    idx = worst(ev, model, n)
    cols = min(GRID_COLUMNS, max(len(idx), 1))
    rows = max(math.ceil(len(idx) / cols), 1)
    fig = Figure(figsize=(3.0 * cols, 3.2 * rows))
    unit = ev.distance_unit
    for j, i in enumerate(idx):
        o, s = ev.objects[i], ev.runs[model].scores[i]
        image, ref, pred = reconstruct(ev, i, seg)
        ax = fig.add_subplot(rows, cols, j + 1)
        ax.imshow(_tile(image, ref, pred, o.points, o.bbox), interpolation="nearest")
        hd = f"{s.hd95_mm:.1f}" if math.isfinite(s.hd95_mm) else "inf"
        ax.set_title(f"{o.case} s{o.slice_index} {o.label}\nDice {s.dice * 100:.1f}%  HD95 {hd} {unit}",
                     fontsize=8)
        ax.axis("off")
    fig.suptitle(f"worst objects: {model} (green = reference, red = prediction)", fontsize=10)
    return _figure_png(fig)
