"""``cmdeploy guidance``: render the confidence maps of a points CSV over a CT slice as a PNG."""

from __future__ import annotations

from pathlib import Path

import typer

_VARIANTS = ("paper", "authors", "chebyshev", "mahalanobis")  # cmdeploy.guidance.VARIANTS (test-checked)


def guidance(
    input: Path = typer.Option(
        ..., "--input", "-i", help="CT input: a DICOM file (or folder, NIfTI, NPY, PNG)."
    ),
    points: Path = typer.Option(
        ...,
        "--points",
        "-p",
        help="Points CSV (slice_index/sop_instance_uid, "
        "label, left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y).",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="PNG file to write."),
    variant: str = typer.Option("paper", "--variant", help=f"Map variant: {', '.join(_VARIANTS)}."),
    slice_index: int = typer.Option(
        None, "--slice-index", min=0, help="Slice to render (default: the first slice named in the CSV)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing PNG."),
) -> None:
    """Draw the confidence maps of the CSV's objects on one slice: windowed CT, map overlay, points.

    The overlay is the pixel-wise max of the objects' maps (the paper's eqs. 3-5 with --variant
    paper). Exits 2 on a bad input.
    """
    import numpy as np

    from cmdeploy.commands._common import error_console, guarded
    from cmdeploy.errors import InputError
    from cmdeploy.guidance import confidence_map
    from cmdeploy.io import open_series
    from cmdeploy.points_csv import read_points_csv
    from cmdeploy.writers.atomic import check_output_file
    from cmdeploy.writers.png_overlay import render_guidance_overlay

    err = error_console()
    with guarded(err):
        if variant not in _VARIANTS:
            raise InputError(f"--variant must be one of {', '.join(_VARIANTS)}, got {variant!r}")
        if output.suffix.lower() != ".png":
            raise InputError(f"--output '{output}' must end in .png")
        series = open_series(input)
        rows = read_points_csv(points, series)
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"--output '{output}': cannot create its folder ({exc.strerror})") from None
        check_output_file(output, overwrite=overwrite, what="--output")
        k = min(r.slice_index for r in rows) if slice_index is None else slice_index
        chosen = [r for r in rows if r.slice_index == k]
        if not chosen:
            raise InputError(f"points CSV '{points}' has no rows for slice {k}")
        if k >= series.num_slices:
            raise InputError(f"--slice-index {k} is outside the series (0..{series.num_slices - 1})")
        slice_hu = series.slice_hu(k)
        pts = np.stack([r.points for r in chosen]).astype(np.float64)
        maps = confidence_map(pts, slice_hu.shape, variant=variant)
        render_guidance_overlay(slice_hu, pts, maps, output)

    skipped = len({r.slice_index for r in rows}) - 1
    more = f"; {skipped} other slice(s) in the CSV not drawn" if skipped > 0 else ""
    typer.echo(
        f"wrote {output}: {len(chosen)} object(s) on slice {k} ({slice_hu.shape[0]}x{slice_hu.shape[1]}), "
        f"variant {variant}{more}"
    )
