"""``cmdeploy infer``: segment every object of a points CSV on a CT series and write the results.

Exit status: 0 on success, 2 for a bad input (series, CSV, options, existing outputs; nothing is
written), 3 when the model or the inference backend fails; with a PACS input or ``--send``, 4-9 for
PACS failures (see :mod:`cmdeploy.pacs.errors`) and 130 on Ctrl-C. Logs never show patient names,
IDs or DICOM UIDs.
"""

from __future__ import annotations

from pathlib import Path

import typer

FORMATS = ("png", "nifti", "dicom-seg")
REPORT_NAME = "report.json"
NIFTI_NAME = "labels.nii.gz"
SEG_NAME = "seg.dcm"
OVERLAY_FOLDER = "overlays"


def infer(
    input_path: str = typer.Option(
        ...,
        "--input",
        "-i",
        help="CT input: DICOM folder or file, .nii/.nii.gz, 16-bit .png or .npy; or a PACS: "
        "dicomweb:URL or dimse:AET@HOST:PORT (with --study and --series).",
    ),
    points: Path = typer.Option(
        ..., "--points", "-p", help="Points CSV: slice_index/sop_instance_uid, label, 8 coordinates."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Output folder (created if missing)."),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model: .onnx or TensorRT .engine/.plan (default: embedded model)."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Objects per model call."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="onnxruntime intra-op threads (default: one per core)."
    ),
    device: str = typer.Option("cpu", "--device", help="onnxruntime device: cpu or cuda."),
    formats: str | None = typer.Option(
        None,
        "--format",
        help="Comma-separated outputs among png, nifti, dicom-seg (report.json is always written). "
        "Default: png, plus dicom-seg for DICOM input (with highdicom) or nifti for NIfTI input.",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
    series_uid: str | None = typer.Option(
        None, "--series-uid", help="Pick this series when the DICOM folder holds several."
    ),
    study: str | None = typer.Option(None, "--study", help="PACS input: StudyInstanceUID."),
    series: str | None = typer.Option(
        None, "--series", help="PACS input: SeriesInstanceUID (for a folder: same as --series-uid)."
    ),
    send: str | None = typer.Option(
        None, "--send", help="Store the DICOM SEG on a PACS: dicomweb:URL or dimse:AET@HOST:PORT."
    ),
    calling_aet: str = typer.Option("CMDEPLOY", "--calling-aet", help="Our AE title for DIMSE."),
    pacs_timeout: float = typer.Option(
        30.0, "--pacs-timeout", min=0.01, help="Seconds to wait for the PACS to connect or answer."
    ),
    pacs_retries: int = typer.Option(
        2, "--pacs-retries", min=0, help="Retries (with back-off) after transient PACS failures."
    ),
    allow_gaps: bool = typer.Option(
        False, "--allow-gaps",
        help="Accept a DICOM series with a gap in its slice positions "
        "(slice_index counts the slices present).",
    ),
    triton: str | None = typer.Option(
        None,
        "--triton",
        help="Run the model on a Triton server instead: HOST:PORT (HTTP) or grpc://HOST:PORT "
        "(see `cmdeploy triton`); outputs are the same as a local run.",
    ),
    triton_timeout: float = typer.Option(
        60.0, "--triton-timeout", min=0.001, help="Seconds one Triton request may take."
    ),
) -> None:
    """Segment the objects of a points CSV (four extreme points each) on a CT series."""
    from cmdeploy.commands._common import error_console, exit_on_error, no_traceback
    from cmdeploy.pacs.cli import pacs_exit_codes, pacs_run

    err = error_console()
    with no_traceback(err), pacs_exit_codes(err), exit_on_error(err):
        with pacs_run(
            input_path, study=study, series=series, series_uid=series_uid, send=send,
            calling_aet=calling_aet, timeout=pacs_timeout, retries=pacs_retries,
            points=points, output=output, overwrite=overwrite, formats=formats, err=err,
        ) as run:
            written = _infer(
                run.input_path,
                points,
                output,
                model=model,
                backend=backend,
                batch_size=batch_size,
                threads=threads,
                device=device,
                formats=formats,
                overwrite=overwrite,
                series_uid=run.series_uid,
                allow_gaps=allow_gaps,
                err=err,
                triton=triton,
                triton_timeout=triton_timeout,
            )
            run.send(written, SEG_NAME)


def parse_formats(text: str | None, kind: str) -> list[str]:
    """The output formats to write: ``text`` checked against :data:`FORMATS`, or the defaults for
    an input of ``kind`` (:class:`InputError` on unknown names or a SEG for non-DICOM input)."""
    from cmdeploy.errors import InputError

    is_dicom = kind.startswith("dicom")
    if text is None or not text.strip():
        chosen = ["png"]
        if is_dicom and _has_highdicom():
            chosen.append("dicom-seg")
        if kind == "nifti":
            chosen.append("nifti")
        return chosen
    chosen = []
    for name in (t.strip().lower() for t in text.split(",")):
        if not name or name == "report":
            continue
        if name not in FORMATS:
            raise InputError(f"--format: unknown format {name!r}; choose from {', '.join(FORMATS)}")
        if name not in chosen:
            chosen.append(name)
    if "dicom-seg" in chosen:
        if not is_dicom:
            raise InputError(f"--format dicom-seg needs a DICOM input, got a {kind} input")
        if not _has_highdicom():
            raise InputError("--format dicom-seg needs highdicom: pip install 'cmdeploy[dicom]'")
    return chosen


def _has_highdicom() -> bool:
    import importlib.util

    return importlib.util.find_spec("highdicom") is not None


def output_names(formats: list[str], slices: list[int]) -> list[str]:
    """Relative names of every file ``infer`` writes for these formats and annotated slices."""
    from cmdeploy.writers import overlay_name

    names = [REPORT_NAME]
    if "png" in formats:
        names += [f"{OVERLAY_FOLDER}/{overlay_name(k)}" for k in slices]
    if "nifti" in formats:
        names.append(NIFTI_NAME)
    if "dicom-seg" in formats:
        names.append(SEG_NAME)
    return names


def _infer(
    input_path: Path,
    points: Path,
    output: Path,
    *,
    model: Path | None,
    backend: str,
    batch_size: int,
    threads: int | None,
    device: str,
    formats: str | None,
    overwrite: bool,
    series_uid: str | None,
    allow_gaps: bool = False,
    err,
    triton: str | None = None,
    triton_timeout: float = 60.0,
) -> list[Path]:
    """Run inference and write the outputs; returns the files written."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from cmdeploy.commands._common import check_runtime_options
    from cmdeploy.errors import InputError
    from cmdeploy.io import open_series
    from cmdeploy.pipeline import run_pipeline
    from cmdeploy.points_csv import read_points_csv
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.writers.atomic import OutputDir

    t0 = time.perf_counter()
    check_runtime_options(backend, device)
    if triton is not None:
        from cmdeploy.backends.triton import parse_url

        parse_url(triton)
        if model is not None:
            raise InputError("--model and --triton exclude each other: the Triton server chooses the model")

    # 1. inputs, fully validated before anything runs
    series = open_series(input_path, series_uid=series_uid, allow_gaps=allow_gaps)
    chosen = parse_formats(formats, series.kind)
    rows = read_points_csv(points, series)
    slices = sorted({r.slice_index for r in rows})
    out = OutputDir(output, overwrite=overwrite)
    out.check(output_names(chosen, slices))
    if overwrite:  # the folder will hold exactly this run's outputs
        out.remove_on_commit(previous_outputs(out.target(REPORT_NAME)))
    seg_sources = None
    if "dicom-seg" in chosen:  # every SEG prerequisite, before the model runs
        from cmdeploy.writers.dicom_seg import prepare_sources, segment_labels

        seg_sources = prepare_sources(series)
        _warn_seg(err, seg_sources.dropped, rows, segment_labels)
    h, w = series.shape
    err.print(
        f"input: {series.kind}, {series.num_slices} slice(s) of {h} x {w}; "
        f"{len(rows)} object(s) on {len(slices)} slice(s)"
    )

    # 2. model
    if triton is not None:
        seg = _triton_segmenter(triton, model=model, batch_size=batch_size, timeout_s=triton_timeout)
    else:
        seg = Segmenter.load(model, backend=backend, threads=threads, batch_size=batch_size, device=device)
    err.print(
        f"model: {seg.model_path.name} ({seg.backend}, {'fused' if seg.fused else 'plain'}, "
        f"input {seg.spec.input_size} px, guidance {seg.spec.guidance})"
    )

    # 3. inference
    with Progress(
        TextColumn("[bold]segmenting"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("objects", total=len(rows))
        result = run_pipeline(seg, series, rows, progress=lambda n: progress.update(task, completed=n))

    # 4. outputs, all or nothing
    with out:
        _write_outputs(out, chosen, series, rows, result, seg, t0, err, seg_sources)

    total = time.perf_counter() - t0
    table = Table(title="cmdeploy infer", show_header=True)
    for col in ("objects", "slices", "labels", "time (s)", "objects/s", "model (s)"):
        table.add_column(col, justify="right")
    table.add_row(
        str(len(rows)),
        str(len(slices)),
        str(len(result.label_values)),
        f"{total:.2f}",
        f"{len(rows) / result.timings.total:.1f}" if result.timings.total > 0 else "-",
        f"{result.timings.model:.2f}",
    )
    Console(highlight=False).print(table)
    removed = f"; removed {len(out.removed)} output(s) of the earlier run" if out.removed else ""
    err.print(f"wrote {len(out.written)} file(s) to {output}{removed}")
    return list(out.written)


def _triton_segmenter(url: str, *, model: Path | None, batch_size: int, timeout_s: float):
    """A Segmenter whose model runs on the Triton server at ``url`` (the server owns the model)."""
    from cmdeploy.errors import InputError

    if model is not None:
        raise InputError("--model and --triton exclude each other: the Triton server chooses the model")
    from cmdeploy.backends.triton import connect_segmenter

    return connect_segmenter(url, batch_size=batch_size, timeout_s=timeout_s)


def previous_outputs(report_path: Path) -> list[str]:
    """The output names an earlier run recorded in its ``report.json`` (empty when the file is
    missing or not a cmdeploy report): with ``--overwrite`` these, and nothing else, may be
    removed when this run does not write them again."""
    import json

    from cmdeploy.writers.report import REPORT_FORMAT

    try:
        if not report_path.is_file() or report_path.is_symlink():
            return []
        data = json.loads(report_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        return []
    names = data.get("outputs")
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _warn_seg(err, dropped: list[str], rows, segment_labels) -> None:
    """Say which patient/study attributes the SEG leaves out (never their values) and which
    segment labels are shortened."""
    from rich.markup import escape

    from cmdeploy.points_csv import base_label

    if dropped:
        err.print(
            "[yellow]warning:[/yellow] invalid values left out of the DICOM SEG: "
            f"{', '.join(dropped)} (values not shown)", soft_wrap=True,
        )
    labels = {base_label(r.label): 0 for r in rows}
    short = {a: b for a, b in segment_labels(labels).items() if a != b}
    if short:
        err.print(
            f"[yellow]warning:[/yellow] {len(short)} label(s) shortened to DICOM SEG segment labels: "
            + "; ".join(f"{escape(a[:40])}... -> {escape(b)}" for a, b in short.items()),
            soft_wrap=True,
        )


def _write_outputs(out, formats, series, rows, result, seg, t0: float, err, seg_sources=None) -> None:
    """Write the chosen formats and report.json into the staged :class:`OutputDir` ``out``.

    The writers receive one merged object per (slice, base label) (the pipeline's label maps);
    the report adds the per-row results (line, label as given, area, probability stats) under
    ``extra``.
    """
    import time

    from cmdeploy.errors import InputError
    from cmdeploy.writers.report import build_report, write_report

    objects = result.label_masks(rows)
    values = result.label_values
    try:
        if "png" in formats:
            from cmdeploy.writers.png_overlay import write_series_overlays

            write_series_overlays(
                out, series, objects, folder=OVERLAY_FOLDER, values=values, spec=seg.spec, min_side=512
            )
        if "nifti" in formats:
            from cmdeploy.writers.nifti import write_nifti_labels

            with out.stage(NIFTI_NAME) as tmp:
                write_nifti_labels(tmp, series, objects, values=values)
        if "dicom-seg" in formats and not objects:
            err.print("[yellow]warning:[/yellow] every mask is empty: no DICOM SEG written")
        elif "dicom-seg" in formats:
            from cmdeploy.writers.dicom_seg import write_dicom_seg

            with out.stage(SEG_NAME) as tmp:
                write_dicom_seg(tmp, series, objects, values=values, source_datasets=seg_sources)
        timings = {**result.timings.to_dict(), "command_total": time.perf_counter() - t0}
        report = build_report(
            objects=objects,
            series=series,
            model_path=seg.model_path,
            model_sha256=seg.model_sha256,
            spec=seg.spec,
            backend=seg.backend,
            timings=timings,
            values=values,
            outputs=[str(p.relative_to(out.root)) for p in out.pending] + [REPORT_NAME],
            extra={
                "model_layout": "fused" if seg.fused else "plain",
                "batch_size": seg.batch_size,
                "label_summary": result.label_summary(),
                "rows": [o.to_dict() for o in result.objects],
            },
        )
        with out.stage(REPORT_NAME) as tmp:
            write_report(tmp, report)
    except ValueError as exc:
        if isinstance(exc, InputError):
            raise
        from cmdeploy.privacy import describe_exception

        raise InputError(f"cannot write outputs: {describe_exception(exc)}") from None
