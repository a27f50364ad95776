"""``cmdeploy guidance``: render the confidence maps of a points CSV over a CT slice as a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer

from cmdeploy.guidance import VARIANTS

_MIN_SIDE = 512  # the PNG is upscaled (nearest) until its longer side is at least this many pixels
_ALPHA = 0.6  # opacity of the map colour where f = 1
_SEGMENT_COLOURS = ((0, 255, 255), (255, 0, 255))  # segment A (left-right), segment B (top-bottom)


def _heat(f: np.ndarray) -> np.ndarray:
    """Black-red-yellow colours for values in [0, 1]: (H, W) -> (H, W, 3) float in [0, 255]."""
    rgb = np.stack([2 * f, 2 * f - 1, np.zeros_like(f)], axis=-1)
    return np.clip(rgb, 0.0, 1.0) * 255.0


def render_overlay(
    slice_hu: np.ndarray,
    points: np.ndarray,
    labels: list[str],
    *,
    variant: str = "paper",
    window: tuple[float, float] = (-200.0, 250.0),
):
    """The windowed slice with the pixel-wise max of the objects' confidence maps blended on top.

    ``slice_hu`` is (H, W) HU; ``points`` (N, 4, 2) left, right, top, bottom, each (x = column,
    y = row). Returns an RGB ``PIL.Image`` upscaled (nearest) so its longer side is >= 512 px, with
    the two segments of each object drawn (A cyan, B magenta), the points as circles and the labels.
    """
    from PIL import Image, ImageDraw

    from cmdeploy.guidance import confidence_map

    h, w = slice_hu.shape
    lo, hi = window
    grey = np.clip((np.asarray(slice_hu, np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0
    f = confidence_map(points, (h, w), variant=variant).max(axis=0)
    a = (_ALPHA * f)[..., None]
    rgb = grey[..., None] * (1.0 - a) + _heat(f) * a
    scale = max(1, -(-_MIN_SIDE // max(h, w)))
    img = Image.fromarray(np.rint(rgb).astype(np.uint8), mode="RGB").resize(
        (w * scale, h * scale), Image.NEAREST
    )
    draw = ImageDraw.Draw(img)

    def screen(p: np.ndarray) -> tuple[float, float]:  # pixel centre (x, y) -> upscaled image coords
        return ((float(p[0]) + 0.5) * scale, (float(p[1]) + 0.5) * scale)

    r = max(3.0, scale * 0.9)
    for pts, label in zip(points, labels, strict=True):
        for (i, j), colour in zip(((0, 1), (2, 3)), _SEGMENT_COLOURS, strict=True):
            draw.line([screen(pts[i]), screen(pts[j])], fill=colour, width=max(1, scale // 3))
        for p in pts:
            x, y = screen(p)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(255, 255, 0), width=2)
        tx, ty = screen(pts[1])
        draw.text((tx + r + 2, ty - 6), label, fill=(255, 255, 0))
    return img


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
    variant: str = typer.Option("paper", "--variant", help=f"Confidence-map variant: {', '.join(VARIANTS)}."),
    slice_index: int = typer.Option(
        None, "--slice-index", min=0, help="Slice to render (default: the first slice named in the CSV)."
    ),
) -> None:
    """Draw the confidence maps of the CSV's objects on one slice: windowed CT, map overlay, points.

    The overlay is the pixel-wise max of the objects' maps (the paper's eqs. 3-5 with --variant
    paper). Exits 2 on a bad input.
    """
    import os
    import tempfile

    from cmdeploy.errors import InputError
    from cmdeploy.io import open_series
    from cmdeploy.points_csv import read_points_csv

    try:
        if variant not in VARIANTS:
            raise InputError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if output.suffix.lower() != ".png":
            raise InputError(f"--output '{output}' must end in .png")
        series = open_series(input)
        rows = read_points_csv(points, series)
        k = min(r.slice_index for r in rows) if slice_index is None else slice_index
        chosen = [r for r in rows if r.slice_index == k]
        if not chosen:
            raise InputError(f"points CSV '{points}' has no rows for slice {k}")
        slice_hu = series.slice_hu(k)
        img = render_overlay(
            slice_hu,
            np.stack([r.points for r in chosen]).astype(np.float64),
            [r.label for r in chosen],
            variant=variant,
        )
    except (InputError, ValueError, IndexError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None

    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            img.save(fh, format="PNG")
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    skipped = len({r.slice_index for r in rows}) - 1
    more = f"; {skipped} other slice(s) in the CSV not drawn" if skipped > 0 else ""
    typer.echo(
        f"wrote {output}: {len(chosen)} object(s) on slice {k} ({slice_hu.shape[0]}x{slice_hu.shape[1]}), "
        f"variant {variant}{more}"
    )
