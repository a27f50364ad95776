"""``cmdeploy generate-labels``: label volumes for a folder of cases from four clicks per object.

Exit status: 0 on success, 2 for a bad input (cases, points CSVs, options, output folder; checked
for every case before any work, nothing written), 3 when the model or the inference backend fails,
130 when interrupted (the case being written is discarded, finished cases stay).
Finished cases are kept when a later case fails, and skipped by the next run (resume). Logs name
cases by their position in the run, never by folder name.
"""

from __future__ import annotations

from pathlib import Path

import typer


def generate_labels(
    data: Path = typer.Option(
        ..., "--data", "-d",
        help="Cases: a folder of <case>/image.nii.gz (+ labels.nii.gz), *_image/*_label files, "
        "images/ + labels/, or one case folder.",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="Output folder: <case>/labels.nii.gz, points.csv, report.json."
    ),
    points: Path | None = typer.Option(
        None, "--points", "-p",
        help="Folder of <case>.csv points CSVs (as infer --points reads). Without it: --simulate.",
    ),
    simulate: bool = typer.Option(
        False, "--simulate",
        help="Clicks of the simulated annotator on each case's own labels (for studies).",
    ),
    cases: str | None = typer.Option(None, "--cases", help="Comma-separated case names (default: all)."),
    names: Path | None = typer.Option(
        None, "--names", help="id -> name JSON overriding the labels.json found next to the data."
    ),
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model: .onnx or TensorRT .engine/.plan (default: embedded model)."
    ),
    backend: str = typer.Option("auto", "--backend", help="auto, onnxruntime or tensorrt."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Objects per model call."),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="onnxruntime intra-op threads (default: one per core)."
    ),
    device: str = typer.Option("cpu", "--device", help="onnxruntime device: cpu or cuda."),
    click_tolerance: float = typer.Option(
        3.0, "--click-tolerance", min=0.0, help="With --simulate: flat-extreme band, pixels."
    ),
    click_jitter_mm: float = typer.Option(
        3.0, "--click-jitter-mm", min=0.0, help="With --simulate: radius of the hand error, mm."
    ),
    seed: int = typer.Option(0, "--seed", help="With --simulate: seed of the simulated clicks."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo finished cases and replace their outputs (default: skip them)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Generate label volumes for every case: clicks -> masks -> labels.nii.gz in each case's grid.

    Resumable: a case whose report.json exists is finished and skipped.
    """
    from cmdeploy.commands._common import error_console, guarded

    err = error_console()
    with guarded(err):
        _run(
            data, output, points=points, simulate=simulate, cases=cases, names=names, model=model,
            backend=backend, batch_size=batch_size, threads=threads, device=device,
            click_tolerance=click_tolerance, click_jitter_mm=click_jitter_mm, seed=seed,
            overwrite=overwrite, progress=progress, err=err,
        )


def _run(data, output, *, points, simulate, cases, names, model, backend, batch_size, threads,
         device, click_tolerance, click_jitter_mm, seed, overwrite, progress, err) -> None:
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cmdeploy.annotator import ClickModel
    from cmdeploy.commands._common import check_runtime_options
    from cmdeploy.errors import InputError
    from cmdeploy.labelgen import SUMMARY_NAME, generate_case, plan, summarize
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.writers.atomic import atomic_write_text
    from cmdeploy.writers.report import report_json

    t0 = time.perf_counter()
    if points is not None and simulate:
        raise InputError("--points and --simulate exclude each other")
    if points is None and not simulate:
        raise InputError("give --points FOLDER (a <case>.csv per case) or --simulate (clicks on labels)")
    check_runtime_options(backend, device)
    if model is not None and not model.is_file():
        raise InputError(f"--model '{model}' is not a file")
    names_list = [c.strip() for c in cases.split(",") if c.strip()] if cases else None
    click_model = ClickModel(click_tolerance, click_jitter_mm) if simulate else None

    todo, done = plan(data, output, points=points, cases=names_list, names_file=names, overwrite=overwrite)
    jobs = sorted(todo + done, key=lambda j: j.index)
    err.print(f"cases: {len(jobs)} ({len(done)} finished before, skipped; {len(todo)} to label)")
    if todo:
        seg = Segmenter.load(model, backend=backend, threads=threads, batch_size=batch_size, device=device)
        err.print(
            f"model: {seg.model_path.name} ({seg.backend}, input {seg.spec.input_size} px, "
            f"guidance {seg.spec.guidance})"
        )
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=True, disable=not progress,
        ) as bar:
            task = bar.add_task("labelling", total=len(todo))
            for n, job in enumerate(todo):
                bar.update(task, description=f"case {job.index}/{len(jobs)}")
                report = generate_case(
                    seg, job, output, click_model=click_model, seed=seed, overwrite=overwrite,
                )
                ext = report["extra"]
                line = (
                    f"case {job.index}/{len(jobs)}: {ext['clicks']['objects']} object(s) on "
                    f"{ext['slices_clicked']} slice(s), {report['timings_s']['case_total']:.1f} s"
                )
                if "dice" in ext and ext["dice"]["object_mean"] is not None:
                    line += f", Dice vs labels {ext['dice']['object_mean']:.4f} (mean over objects)"
                err.print(line)
                bar.update(task, completed=n + 1)
    summary = summarize(output, jobs)
    summary["command_seconds"] = time.perf_counter() - t0
    Path(output).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(output) / SUMMARY_NAME, report_json(summary))
    dc = summary["dice_over_objects"]
    tail = f"; Dice over objects {dc['mean']:.4f} ± {dc['std']:.4f}" if dc["n"] else ""
    err.print(
        f"done: {len(summary['cases'])} case(s), {summary['objects']} object(s), "
        f"{summary['clicks']} clicks, {summary['generated_voxels']} voxels labelled{tail}; "
        f"summary in {Path(output) / SUMMARY_NAME}"
    )
