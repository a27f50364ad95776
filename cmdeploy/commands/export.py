"""``cmdeploy export``: checkpoint -> ONNX (plain or fused), optionally FP16, TensorRT engine, Triton."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from cmdeploy.commands._common import EXIT_CHECK, fail, require

PRECISIONS = ("fp32", "fp16", "int8")


def export(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Training checkpoint (.pt)."),
    output: Path = typer.Option(..., "--output", help="ONNX file to write."),
    fused: bool = typer.Option(
        False, "--fused", help="Fused-preprocessing graph: inputs slices (B,H,W) HU + points (B,4,2)."
    ),
    opset: int = typer.Option(17, "--opset", min=13, help="ONNX opset (fused graphs need >= 16)."),
    fused_geometry: str = typer.Option(
        None,
        "--fused-geometry",
        help="Fused graphs: dtype of the per-object crop/guidance geometry, float64 (NumPy-exact; "
        "default) or float32 (no FP64 tensors; the default with --engine, for TensorRT).",
    ),
    fp16: bool = typer.Option(
        False, "--fp16", help="Also write an FP16 copy <output>.fp16.onnx and check it against FP32."
    ),
    engine: Path = typer.Option(None, "--engine", help="Also build a TensorRT engine here."),
    precision: str = typer.Option("fp32", "--precision", help="Engine precision: fp32, fp16 or int8."),
    min_batch: int = typer.Option(1, "--min-batch", min=1, help="Engine profile: smallest batch."),
    opt_batch: int = typer.Option(8, "--opt-batch", min=1, help="Engine profile: tuned batch."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Engine profile: largest batch."),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="TensorRT timing cache file."),
    triton_repo: Path = typer.Option(None, "--triton-repo", help="Also write a Triton model repository."),
    model_name: str = typer.Option("cmdeploy", "--model-name", help="Triton model name."),
) -> None:
    """Export a checkpoint to ONNX with a built-in parity check (exit 1 when it fails).

    Prints node count, file size and the parity numbers (plain: torch vs onnxruntime logits on real
    preprocessed CT slices; fused: the graph vs the NumPy runtime path).
    """
    if not checkpoint.is_file():
        fail(f"--checkpoint {checkpoint} not found")
    if precision not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not min_batch <= opt_batch <= max_batch:
        fail(f"need --min-batch <= --opt-batch <= --max-batch, got {min_batch}, {opt_batch}, {max_batch}")
    if fused_geometry is None:
        fused_geometry = "float32" if engine is not None else "float64"
    if fused_geometry not in ("float64", "float32"):
        fail(f"--fused-geometry must be float64 or float32, got {fused_geometry!r}")
    if fused and opset < 16:
        fail(f"--fused needs --opset >= 16 (GridSample), got {opset}")
    if engine is not None and importlib.util.find_spec("tensorrt") is None:
        fail(
            "TensorRT not installed: --engine needs the 'trt' extra: pip install 'cmdeploy[trt]' "
            "(an NVIDIA GPU and driver); the ONNX model runs without it on onnxruntime"
        )
    if output.suffix.lower() != ".onnx":
        fail(f"--output must end in .onnx, got {output}")
    require("torch", "train,export", "export")

    from cmdeploy.errors import InputError, ModelError
    from cmdeploy.export.parity import ParityError

    try:
        if fused:
            from cmdeploy.export.fused import export_fused

            result = export_fused(checkpoint, output, opset=opset, geometry_dtype=fused_geometry)
        else:
            from cmdeploy.export.onnx_export import export_onnx

            result = export_onnx(checkpoint, output, opset=opset)
    except ParityError as exc:
        fail(f"{exc}; {output} was not written", code=EXIT_CHECK)
    except (ValueError, FileNotFoundError, InputError, ModelError) as exc:
        fail(str(exc))
    typer.echo(result.summary())
    typer.echo(f"BatchNorm folded into {result.batchnorm_fused} convolutions")
    if fused:
        typer.echo(f"fused geometry computed in {fused_geometry}")

    engine_source = output
    if fp16 or (engine is not None and precision == "fp16"):
        engine_source = _write_fp16(output)
    if engine is not None:
        from cmdeploy.export.tensorrt_build import build_engine

        try:
            built = build_engine(
                engine_source if precision == "fp16" else output,
                engine,
                precision=precision,
                min_batch=min_batch,
                opt_batch=opt_batch,
                max_batch=max_batch,
                timing_cache=timing_cache,
            )
        except (InputError, ModelError, ValueError) as exc:
            fail(f"engine build failed: {exc}")
        typer.echo(f"wrote TensorRT engine {built} ({built.stat().st_size / 1e6:.2f} MB, {precision})")
    if triton_repo is not None:
        from cmdeploy.export.triton import write_triton_repository

        try:
            folders = write_triton_repository(
                triton_repo, model_name, onnx_path=output, engine_path=engine, max_batch_size=max_batch
            )
        except (InputError, ModelError, ValueError) as exc:
            fail(f"Triton repository: {exc}")
        for name, folder in folders.items():
            typer.echo(f"wrote Triton model {name!r} in {folder}")


def _write_fp16(output: Path) -> Path:
    """FP16 copy ``<stem>.fp16.onnx`` of ``output``, verified against it; exits 1 beyond tolerance."""
    import onnx

    from cmdeploy.export.fp16 import convert_to_fp16
    from cmdeploy.export.onnx_export import save_model
    from cmdeploy.export.verify import verify_models

    path = output.with_name(output.stem + ".fp16.onnx")
    model16 = convert_to_fp16(onnx.load(str(output)))
    size = save_model(model16, path)
    typer.echo(f"wrote FP16 copy {path} ({size / 1e6:.2f} MB, {len(model16.graph.node)} nodes)")
    check = verify_models(output, path)
    typer.echo("FP16 vs FP32 (onnxruntime):\n" + check.summary())
    if not check.ok:
        fail(f"the FP16 copy {path} disagrees with the FP32 model beyond tolerance", code=EXIT_CHECK)
    return path
