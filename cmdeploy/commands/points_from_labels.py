"""``cmdeploy points-from-labels``: a label volume -> a points CSV of extreme points."""

from __future__ import annotations

from pathlib import Path

import typer


def points_from_labels(
    labels: Path = typer.Argument(
        ..., metavar="LABELS", help="Label volume: .nii/.nii.gz (LPS frame, as infer reads it) or .npy."
    ),
    output: Path = typer.Option(..., "--output", "-o", help="Points CSV to write."),
    names: Path | None = typer.Option(
        None, "--names", help="JSON object mapping label id -> name (e.g. labels.json)."
    ),
    min_size: int = typer.Option(
        25, "--min-size", min=1, help="Drop connected components smaller than this (pixels; as training)."
    ),
    only: str | None = typer.Option(
        None, "--labels", help="Comma-separated label names or ids to keep (default: all)."
    ),
    connectivity: int = typer.Option(
        8, "--connectivity", help="4 (edge neighbours) or 8 (edges and corners; as training)."
    ),
    simulate: bool = typer.Option(
        False, "--simulate",
        help="Clicks of the simulated annotator instead of the exact extreme pixels (for studies).",
    ),
    click_tolerance: float = typer.Option(
        3.0, "--click-tolerance", min=0.0, help="With --simulate: flat-extreme band, pixels."
    ),
    click_jitter_mm: float = typer.Option(
        3.0, "--click-jitter-mm", min=0.0, help="With --simulate: radius of the hand error, mm."
    ),
    seed: int = typer.Option(0, "--seed", help="With --simulate: seed of the simulated clicks."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing points CSV."),
) -> None:
    """Write the four extreme points of every connected object on every axial slice.

    One row per object per slice; a label's extra pieces on a slice are named NAME#2, NAME#3, ...
    With --simulate each point is a simulated person's click (see cmdeploy.annotator).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cmdeploy.annotator import ClickModel
    from cmdeploy.commands._common import error_console, guarded
    from cmdeploy.errors import InputError
    from cmdeploy.io.cases import load_label_names
    from cmdeploy.labels_to_points import (
        open_label_volume,
        points_from_label_volume,
        resolve_label_ids,
    )
    from cmdeploy.points_csv import base_label, write_points_csv
    from cmdeploy.writers.atomic import check_output_file

    err = error_console()
    with guarded(err, model_errors=(OSError, MemoryError)):
        if connectivity not in (4, 8):
            raise InputError(f"--connectivity must be 4 or 8, got {connectivity}")
        name_map = load_label_names(names) if names is not None else None
        ids = resolve_label_ids(only.split(","), name_map) if only else None
        volume = open_label_volume(labels)
        check_output_file(output, overwrite=overwrite, what="--output")
        with Progress(
            TextColumn("[bold]extreme points"), BarColumn(), MofNCompleteColumn(),
            console=err, transient=True,
        ) as progress:
            task = progress.add_task("slices", total=volume.num_slices)
            rows = points_from_label_volume(
                volume.iter_slices(), names=name_map, label_ids=ids, min_size=min_size,
                connectivity=connectivity, on_slice=lambda _k: progress.advance(task),
                simulate=ClickModel(click_tolerance, click_jitter_mm) if simulate else None,
                spacing_xy=volume.spacing_xy_mm, seed=seed,
            )
        if not rows:
            raise InputError(
                f"'{labels}': no object of >= {min_size} pixels found"
                + (" for the selected labels" if ids else "")
            )
        write_points_csv(output, rows, overwrite=overwrite)
    n_slices = len({r.slice_index for r in rows})
    n_labels = len({base_label(r.label) for r in rows})
    err.print(
        f"wrote {len(rows)} rows ({n_labels} labels on {n_slices} slices) to {output}",
        highlight=False,
        soft_wrap=True,
    )
