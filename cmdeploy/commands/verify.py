"""``cmdeploy verify``: compare two models (ONNX or TensorRT, plain or fused) on the same real inputs,
or, with ``--target tensorrt``, lint one ONNX model for TensorRT without TensorRT."""

from __future__ import annotations

from pathlib import Path

import typer

TARGETS = ("tensorrt",)


def verify(
    model_a: Path = typer.Argument(..., help="Reference model (.onnx, or .engine/.plan with its sidecar)."),
    model_b: Path = typer.Argument(
        None, help="Model to check against the reference (not with --target)."
    ),
    target: str = typer.Option(
        None,
        "--target",
        help="tensorrt: lint MODEL_A for TensorRT (operators, Q/DQ, dtypes, opset, dynamic axes vs "
        "the engine profile); needs no TensorRT.",
    ),
    min_batch: int = typer.Option(1, "--min-batch", min=1, help="--target: profile's smallest batch."),
    opt_batch: int = typer.Option(8, "--opt-batch", min=1, help="--target: profile's tuned batch."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="--target: profile's largest batch."),
    slice_sizes: str = typer.Option(
        None, "--slice-sizes", help="--target: fused graphs' slice H/W profile MIN,OPT,MAX (32,512,1024)."
    ),
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
    1 when beyond --atol or --min-mask-agreement, 2 on a bad input, 3 when a model cannot be
    loaded or run (as every command).

    With --target tensorrt and one model: the TensorRT-compatibility lint; exits 1 when the model
    has errors (each says what to do), 0 when TensorRT's parser and builder should take it.
    """
    from cmdeploy.commands._common import EXIT_CHECK, error_console, guarded
    from cmdeploy.errors import InputError, ModelError
    from cmdeploy.privacy import describe_exception

    err = error_console()
    with guarded(err):
        if target is not None:
            if target not in TARGETS:
                raise InputError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
            if model_b is not None:
                raise InputError("--target lints one model; give only MODEL_A")
            _lint(model_a, (min_batch, opt_batch, max_batch), slice_sizes)
            return
        if model_b is None:
            raise InputError("give two models to compare, or --target tensorrt to lint one")
        from cmdeploy.export.verify import load_cases, verify_models

        for p in (model_a, model_b):
            if not p.is_file():
                raise InputError(f"model {p} not found")
        try:
            cases = load_cases(input, points)
            result = verify_models(
                model_a, model_b, cases, atol=atol, min_mask_agreement=min_mask_agreement, threads=threads
            )
        except (ValueError, FileNotFoundError) as exc:
            if isinstance(exc, (InputError, ModelError)):
                raise
            raise InputError(describe_exception(exc)) from None
    typer.echo(result.summary())
    if not result.ok:
        raise typer.Exit(EXIT_CHECK)


def _lint(model: Path, batches: tuple[int, int, int], slice_sizes: str | None) -> None:
    from cmdeploy.commands._common import EXIT_CHECK, EXIT_MODEL, fail, require
    from cmdeploy.commands.export import parse_slice_sizes
    from cmdeploy.errors import InputError

    require("onnx", "export", "verify --target tensorrt")
    if model.suffix.lower() != ".onnx":
        fail(f"--target tensorrt lints an ONNX model, got {model}")
    if not batches[0] <= batches[1] <= batches[2]:
        fail(f"need --min-batch <= --opt-batch <= --max-batch, got {', '.join(map(str, batches))}")
    import onnx

    from cmdeploy.export.tensorrt_build import onnx_input_shapes, profile_shapes
    from cmdeploy.export.trt_lint import ERROR, Finding, lint_file

    ranges = parse_slice_sizes(slice_sizes)
    try:
        shapes = onnx_input_shapes(onnx.load(str(model), load_external_data=False))
    except FileNotFoundError:
        fail(f"model {model} not found")
    except Exception as exc:  # protobuf decode errors: a model failure, exit 3 as in every command
        fail(f"{model}: cannot read as ONNX ({type(exc).__name__})", code=EXIT_MODEL)
    try:
        profiles = profile_shapes(shapes, *batches, axis_ranges=ranges)
    except InputError as exc:  # lint the rest with the default profile; report this as an error
        report = lint_file(model)
        report.findings.insert(0, Finding(ERROR, "profile", str(exc)))
    else:
        report = lint_file(model, profiles=profiles)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_CHECK)
