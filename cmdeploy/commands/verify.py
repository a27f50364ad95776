"""``cmdeploy verify``: compare two models (ONNX or TensorRT, plain or fused) on the same real inputs."""

from __future__ import annotations

from pathlib import Path

import typer


def verify(
    model_a: Path = typer.Argument(..., help="Reference model (.onnx, or .engine/.plan with its sidecar)."),
    model_b: Path = typer.Argument(..., help="Model to check against the reference."),
    input: Path = typer.Option(
        None, "--input", help="CT input (DICOM file/folder, NIfTI, NPY, PNG); default CT_small.dcm."
    ),
    points: Path = typer.Option(
        None, "--points", help="Points CSV for --input; default examples/ct_small_points.csv."
    ),
    atol: float = typer.Option(0.1, "--atol", min=0.0, help="Largest allowed max |dprobability|."),
    min_mask_agreement: float = typer.Option(
        0.99, "--min-mask-agreement", min=0.0, max=1.0,
        help="Least fraction of crop-footprint pixels whose masks must agree.",
    ),
    threads: int = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads."),
) -> None:
    """Run MODEL_A and MODEL_B on the same preprocessed slices and compare their probabilities.

    Prints max/mean |dprobability| and the mask agreement on each object's crop footprint; exits
    1 when beyond --atol or --min-mask-agreement, 2 on a bad input or model.
    """
    from cmdeploy.commands._common import EXIT_CHECK, fail
    from cmdeploy.errors import InputError, ModelError
    from cmdeploy.export.verify import load_cases, verify_models

    for p in (model_a, model_b):
        if not p.is_file():
            fail(f"model {p} not found")
    try:
        cases = load_cases(input, points)
        result = verify_models(
            model_a, model_b, cases, atol=atol, min_mask_agreement=min_mask_agreement, threads=threads
        )
    except (InputError, ModelError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(result.summary())
    if not result.ok:
        raise typer.Exit(EXIT_CHECK)
