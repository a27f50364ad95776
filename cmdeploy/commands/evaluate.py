"""``cmdeploy evaluate``: Dice and HD95 of one or more models on reference label volumes.

Exit status: 0 on success, 2 for a bad input (data, options, existing outputs), 3 when a model or
the inference backend fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
OBJECTS_CSV = "objects.csv"
SUMMARY_JSON = "summary.json"
SCATTER_PNG = "plots/dice_vs_size.png"
MAX_GRID = 16


def _split(text: str | None) -> list[str] | None:
    if not text:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def evaluate(
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="Model .onnx or TensorRT .engine; repeat for a side-by-side table."
    ),
    data: Path = typer.Option(
        ..., "--data", "-d",
        help="Root of case folders (<case>/image.nii.gz + labels.nii.gz, labels.json), one case "
        "folder, or an image file (with --reference).",
    ),
    cases: str | None = typer.Option(None, "--cases", help="Comma-separated case names (default: all)."),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated label names or ids to evaluate (default: all present)."
    ),
    reference: Path | None = typer.Option(
        None, "--reference", help="Label volume of an image-file --data (same grid)."
    ),
    names: Path | None = typer.Option(
        None, "--names", help="JSON id -> name map (default: labels.json next to the data)."
    ),
    jitter: float = typer.Option(
        0.0, "--jitter", min=0.0, help="Click noise: uniform in [-PX, PX] pixels per coordinate."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the jitter and of the simulated annotator."),
    clicks: str = typer.Option(
        "exact", "--clicks",
        help="Click protocol: 'exact' (extreme pixels, plus --jitter) or 'annotator' (simulated person: "
        "a point on the outline within --click-tolerance px of the extreme, then a hand error of up "
        "to --click-jitter-mm).",
    ),
    click_tolerance: float = typer.Option(
        3.0, "--click-tolerance", min=0.0, help="Annotator: flat-extreme band, pixels."
    ),
    click_jitter_mm: float = typer.Option(
        3.0, "--click-jitter-mm", min=0.0, help="Annotator: radius of the hand error, mm."
    ),
    min_size: int = typer.Option(
        25, "--min-size", min=1, help="Skip objects smaller than this (pixels; as training)."
    ),
    connectivity: int = typer.Option(8, "--connectivity", help="4 or 8-connected objects (8 as training)."),
    by_size: bool = typer.Option(False, "--by-size", help="Add a breakdown by object area."),
    size_edges: str | None = typer.Option(
        None, "--size-edges",
        help="Comma-separated area bin edges (mm^2, px without spacing); default 0,100,300,1000,3000,10000.",
    ),
    n_worst: int = typer.Option(12, "--worst", min=0, help="Worst objects to list and draw per model."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Folder for results.csv, results.md, objects.csv and plots."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Objects per model call."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads."),
    device: str = typer.Option("cpu", "--device", help="onnxruntime device: cpu or cuda."),
) -> None:
    """Segment every reference object from its extreme points and report Dice and HD95 per label."""
    from cmdeploy.commands._common import error_console, guarded

    err = error_console()
    with guarded(err):
        _evaluate(
            model, data, cases=_split(cases), labels=_split(labels), reference=reference, names=names,
            jitter=jitter, seed=seed, min_size=min_size, connectivity=connectivity, by_size=by_size,
            clicks=clicks, click_tolerance=click_tolerance, click_jitter_mm=click_jitter_mm,
            size_edges=size_edges, n_worst=n_worst, output=output, overwrite=overwrite, backend=backend,
            batch_size=batch_size, threads=threads, device=device, err=err,
        )


def parse_edges(text: str | None) -> tuple[float, ...]:
    """``"0,100,300"`` -> (0.0, 100.0, 300.0); the default bins when empty."""
    from cmdeploy.errors import InputError
    from cmdeploy.evaluation.stats import SIZE_EDGES

    items = _split(text)
    if not items:
        return SIZE_EDGES
    try:
        edges = tuple(float(x) for x in items)
    except ValueError:
        raise InputError(f"--size-edges must be comma-separated numbers, got {text!r}") from None
    if any(b <= a for a, b in zip(edges, edges[1:], strict=False)) or edges[0] < 0:
        raise InputError(f"--size-edges must be increasing and >= 0, got {text!r}")
    return edges


def _evaluate(model: list[Path], data: Path, *, cases, labels, reference, names, jitter, seed, min_size,
              connectivity, by_size, clicks, click_tolerance, click_jitter_mm, size_edges, n_worst, output,
              overwrite, backend, batch_size, threads, device, err) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmdeploy.annotator import CLICK_PROTOCOLS, ClickModel
    from cmdeploy.commands._common import check_runtime_options, wide_console
    from cmdeploy.errors import InputError
    from cmdeploy.evaluation.run import evaluate as run_evaluation
    from cmdeploy.evaluation.run import model_names
    from cmdeploy.io.cases import find_cases
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.writers.atomic import OutputDir

    check_runtime_options(backend, device)
    if clicks not in CLICK_PROTOCOLS:
        raise InputError(f"--clicks must be one of {', '.join(CLICK_PROTOCOLS)}, got {clicks!r}")
    if clicks == "annotator" and jitter > 0:
        raise InputError("--jitter applies to exact clicks; the annotator has --click-jitter-mm")
    click_model = ClickModel(tolerance_px=click_tolerance, jitter_mm=click_jitter_mm)
    edges = parse_edges(size_edges)
    found = find_cases(data, cases=cases, reference=reference, names_file=names)
    display = model_names(model)
    out = None
    if output is not None:
        out = OutputDir(output, overwrite=overwrite)
        plots = [SCATTER_PNG, *(f"plots/worst_{_safe(m)}.png" for m in display)] if n_worst else [SCATTER_PNG]
        out.check([RESULTS_CSV, RESULTS_MD, OBJECTS_CSV, SUMMARY_JSON, *plots])
    segs = [
        Segmenter.load(p, backend=backend, threads=threads, batch_size=batch_size, device=device)
        for p in model
    ]
    for name, s in zip(display, segs, strict=True):
        err.print(f"model {name}: {s.model_path.name} ({s.backend}, input {s.spec.input_size} px, "
                  f"guidance {s.spec.guidance})")
    err.print(f"cases: {', '.join(c.name for c in found)}")

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True,
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_slice(case: str, done: int, total: int) -> None:
            if case not in tasks:
                tasks[case] = progress.add_task(f"evaluating {case}", total=total)
            progress.update(tasks[case], completed=done)

        ev = run_evaluation(
            segs, found, names=display, labels=labels, jitter=jitter, seed=seed, min_size=min_size,
            connectivity=connectivity, chunk=max(4 * batch_size, 16), progress=on_slice,
            clicks=clicks, click_model=click_model,
        )
    if not ev.objects:
        raise InputError(f"no object of >= {min_size} px found in {', '.join(c.name for c in found)}"
                         + (" for the selected labels" if labels else ""))
    _print_tables(wide_console(), ev, by_size=by_size, edges=edges, n_worst=n_worst)
    if out is not None:
        with out:
            _write_outputs(out, ev, segs, by_size=by_size, edges=edges, n_worst=n_worst, err=err)
        err.print(f"wrote {len(out.written)} file(s) to {output}")


def _print_tables(console, ev, *, by_size: bool, edges, n_worst: int) -> None:
    from rich.table import Table

    from cmdeploy.evaluation.report import comparison_table, size_table, worst_table
    from cmdeploy.evaluation.stats import summarize

    def show(title: str, header: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for r in rows:
            table.add_row(*[c.replace("**", "") for c in r])
        console.print(table)

    show(f"Dice % and HD95 ({ev.distance_unit}) per label, mean ± std over objects", *comparison_table(ev))
    if by_size:
        show("by object size", *size_table(ev, edges))
    for m in ev.runs:
        if n_worst:
            show(f"worst {min(n_worst, len(ev.objects))} objects: {m}", *worst_table(ev, m, n_worst))
    for m in ev.runs:
        s = summarize(ev, m)
        console.print(
            f"{m}: headline Dice (mean over {s.n_labels} labels) {s.dice_label_mean * 100:.2f} %; "
            f"mean over {s.n_objects} objects {s.dice_object_mean * 100:.2f} %; "
            f"{s.objects_per_s:.1f} objects/s"
        )


def _csv_text(rows: list[dict[str, Any]]) -> str:
    import csv
    import io

    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    return buf.getvalue()


def _safe(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def _write_outputs(out, ev, segs, *, by_size: bool, edges, n_worst: int, err) -> None:
    import json

    from cmdeploy.evaluation.plots import scatter_png, worst_grid_png
    from cmdeploy.evaluation.report import markdown_report, object_rows, results_rows
    from cmdeploy.evaluation.stats import summarize
    from cmdeploy.writers.report import json_default

    out.write_text(RESULTS_CSV, _csv_text(results_rows(ev, by_size=by_size, edges=edges)))
    out.write_text(OBJECTS_CSV, _csv_text(list(object_rows(ev))))
    out.write_text(RESULTS_MD, markdown_report(ev, by_size=by_size, edges=edges, n_worst=n_worst))
    summary = {
        "headline": "dice_label_mean (mean over labels of the per-label mean Dice)",
        "distance_unit": ev.distance_unit,
        "settings": ev.settings,
        "cases": [c.name for c in ev.cases],
        "models": {
            m: {**summarize(ev, m).to_dict(), "file": r.path.name, "backend": r.backend}
            for m, r in ev.runs.items()
        },
    }
    out.write_text(SUMMARY_JSON, json.dumps(summary, indent=2, default=json_default) + "\n")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        err.print("note: matplotlib is not installed; plots skipped (pip install 'cmdeploy[eval]')")
        return
    out.write_bytes(SCATTER_PNG, scatter_png(ev))
    if n_worst:
        for (m, _), seg in zip(ev.runs.items(), segs, strict=True):
            out.write_bytes(f"plots/worst_{_safe(m)}.png", worst_grid_png(ev, m, seg, min(n_worst, MAX_GRID)))
