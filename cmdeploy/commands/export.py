"""``cmdeploy export``: checkpoint -> ONNX (plain or fused), optionally FP16, TensorRT engine, Triton.

Engines come from a checkpoint's fresh export (FP32/FP16) or, with ``--onnx``, from an existing
ONNX file: a TensorRT-target INT8 model (``cmdeploy calibrate --target tensorrt``) or a fused one.
Before TensorRT is imported, the engine's source ONNX goes through the TensorRT-compatibility lint
(:mod:`cmdeploy.export.trt_lint`); a model with errors is refused (exit 2) with what to do.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import typer

from cmdeploy.commands._common import EXIT_CHECK, EXIT_MODEL, fail, require

PRECISIONS = ("fp32", "fp16", "int8")
INT8_HINT = (
    "INT8 engines are built from a TensorRT-target Q/DQ ONNX: cmdeploy calibrate --model M.onnx "
    "--target tensorrt --output M.int8-trt.onnx, then cmdeploy export --onnx M.int8-trt.onnx "
    "--engine M.int8.plan --precision int8"
)


def parse_slice_sizes(text: str | None) -> dict[str, tuple[int, int, int]] | None:
    """``"MIN,OPT,MAX"`` pixels -> the profile range of the fused graph's ``height`` and ``width``."""
    if text is None:
        return None
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        fail(f"--slice-sizes must be MIN,OPT,MAX pixels (e.g. 64,512,1024), got {text!r}")
    if not 1 <= lo <= opt <= hi:
        fail(f"--slice-sizes needs 1 <= MIN <= OPT <= MAX, got {text!r}")
    return {"height": (lo, opt, hi), "width": (lo, opt, hi)}


def export(
    checkpoint: Path = typer.Option(None, "--checkpoint", help="Training checkpoint (.pt) to export."),
    onnx_model: Path = typer.Option(
        None,
        "--onnx",
        help="Existing ONNX to build --engine / --triton-repo from instead of exporting a checkpoint "
        "(a TensorRT-target INT8 model from `cmdeploy calibrate --target tensorrt`, a fused or "
        "plain model).",
    ),
    output: Path = typer.Option(None, "--output", help="ONNX file to write (with --checkpoint)."),
    fused: bool = typer.Option(
        False, "--fused", help="Fused-preprocessing graph: inputs slices (B,H,W) HU + points (B,4,2)."
    ),
    opset: int = typer.Option(
        17, "--opset", min=13, help="ONNX opset (fused graphs: 16..19, GridSample)."
    ),
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
    precision: str = typer.Option(
        "fp32", "--precision", help="Engine precision: fp32, fp16 (via an FP16 ONNX) or int8 (--onnx Q/DQ)."
    ),
    min_batch: int = typer.Option(1, "--min-batch", min=1, help="Engine profile: smallest batch."),
    opt_batch: int = typer.Option(8, "--opt-batch", min=1, help="Engine profile: tuned batch."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Engine profile: largest batch."),
    slice_sizes: str = typer.Option(
        None,
        "--slice-sizes",
        help="Engine profile of a fused graph's slice height and width: MIN,OPT,MAX pixels "
        "(default 32,512,1024).",
    ),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="TensorRT timing cache file."),
    triton_repo: Path = typer.Option(
        None,
        "--triton-repo",
        help="Also write a Triton model repository serving the fused model (export with --fused, or "
        "--onnx a fused ONNX): onnxruntime backend, plus tensorrt_plan with --engine.",
    ),
    model_name: str = typer.Option("cmdeploy", "--model-name", help="Triton model name."),
    triton_tensorrt_version: str = typer.Option(
        None,
        "--triton-tensorrt-version",
        help="TensorRT version of the Triton container that will serve the plan (its major.minor "
        "must equal the engine's builder's).",
    ),
    threshold: float = typer.Option(
        None, "--threshold",
        help="Run-time mask threshold stored in the model (default: the checkpoint's, 0.5).",
    ),
    postprocess: str = typer.Option(
        None, "--postprocess",
        help="Run-time mask post-processing stored in the model: none or clicked (keep the components "
        "the clicks' segments touch, fill holes) [default: the checkpoint's].",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing output files."),
) -> None:
    """Export a checkpoint to ONNX with a built-in parity check (exit 1 when it fails), and/or build
    a TensorRT engine from it or from an existing ONNX (--onnx).

    Prints node count, file size and the parity numbers (plain: torch vs onnxruntime logits on real
    preprocessed CT slices; fused: the graph vs the NumPy runtime path). Existing outputs are
    refused (exit 2) unless --overwrite, before any work.
    """
    from cmdeploy.commands._common import error_console, guarded

    with guarded(error_console()):
        _export(**{k: v for k, v in locals().items() if k not in ("error_console", "guarded")})


def _targets(checkpoint: Path | None, output: Path | None, fp16: bool, engine: Path | None,
             precision: str, triton_repo: Path | None, model_name: str) -> list[Path]:
    """Every file ``export`` writes for these options (checked before the work)."""
    from cmdeploy.engine_sidecar import sidecar_path

    paths: list[Path] = []
    if checkpoint is not None and output is not None:
        paths.append(output)
        if fp16 or (engine is not None and precision == "fp16"):
            paths.append(output.with_name(output.stem + ".fp16.onnx"))
    if engine is not None:
        paths += [engine, sidecar_path(engine)]
        if checkpoint is None and precision == "fp16":
            paths.append(engine.with_name(engine.stem + ".fp16.onnx"))
    if triton_repo is not None:
        paths += [triton_repo / model_name / "1" / "model.onnx", triton_repo / model_name / "config.pbtxt"]
        if engine is not None:
            trt = triton_repo / f"{model_name}_trt"
            paths += [trt / "1" / "model.plan", trt / "config.pbtxt"]
    return paths


def _check_targets(paths: list[Path], overwrite: bool) -> None:
    """No folder or other non-regular file at any output, no existing one unless ``overwrite``,
    writable folders; stale temp files of killed runs removed."""
    from cmdeploy.writers.atomic import check_output_files

    check_output_files(paths, overwrite=overwrite, folder_may_be_missing=True)


def _export(*, checkpoint: Path | None, onnx_model: Path | None, output: Path | None, fused: bool,
            opset: int, fused_geometry: str | None, fp16: bool, engine: Path | None, precision: str,
            min_batch: int, opt_batch: int, max_batch: int, slice_sizes: str | None,
            timing_cache: Path | None, triton_repo: Path | None, model_name: str,
            triton_tensorrt_version: str | None, threshold: float | None, postprocess: str | None,
            overwrite: bool) -> None:
    if (checkpoint is None) == (onnx_model is None):
        fail("give exactly one of --checkpoint (export it) or --onnx (build from an existing ONNX)")
    if precision not in PRECISIONS:
        fail(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not min_batch <= opt_batch <= max_batch:
        fail(f"need --min-batch <= --opt-batch <= --max-batch, got {min_batch}, {opt_batch}, {max_batch}")
    axis_ranges = parse_slice_sizes(slice_sizes)
    if triton_repo is not None:
        _check_triton_source(onnx_model, fused)
    if (threshold is not None or postprocess is not None) and checkpoint is None:
        fail("--threshold and --postprocess are stored by a checkpoint export: give --checkpoint")
    if threshold is not None and not 0.0 < threshold < 1.0:
        fail(f"--threshold must be in (0, 1), got {threshold}")
    from cmdeploy.spec import POSTPROCESS_MODES

    if postprocess is not None and postprocess not in POSTPROCESS_MODES:
        fail(f"--postprocess must be one of {', '.join(POSTPROCESS_MODES)}, got {postprocess!r}")
    if checkpoint is not None:
        _check_export_options(checkpoint, output, fused, opset, fused_geometry, engine, precision)
        if fused_geometry is None:
            fused_geometry = "float32" if engine is not None else "float64"
    else:
        if not onnx_model.is_file():
            fail(f"--onnx {onnx_model} not found")
        if output is not None or fused or fp16 or fused_geometry is not None:
            fail("--output, --fused, --fused-geometry and --fp16 export a checkpoint; with --onnx "
                 "give --engine and/or --triton-repo")
        if engine is None and triton_repo is None:
            fail("--onnx needs --engine and/or --triton-repo")
    if engine is not None and engine.suffix.lower() not in (".plan", ".engine", ".trt"):
        fail(f"--engine must end in .plan, .engine or .trt, got {engine}")
    _check_targets(_targets(checkpoint, output, fp16, engine, precision, triton_repo, model_name), overwrite)

    if checkpoint is not None:
        source = _export_checkpoint(
            checkpoint, output, fused, opset, fused_geometry,
            {"threshold": threshold, "postprocess": postprocess},
        )
        if fp16 and not (engine is not None and precision == "fp16"):  # else _build writes it
            _write_fp16(source, source.with_name(source.stem + ".fp16.onnx"))
    else:
        source = onnx_model
    if engine is not None:
        source = _build(
            source,
            engine,
            precision=precision,
            batches=(min_batch, opt_batch, max_batch),
            axis_ranges=axis_ranges,
            timing_cache=timing_cache,
            fp16_path=(
                source.with_name(source.stem + ".fp16.onnx")
                if checkpoint is not None
                else engine.with_name(engine.stem + ".fp16.onnx")
            ),
        )
    if triton_repo is not None:
        from cmdeploy.errors import InputError, ModelError
        from cmdeploy.export.triton import write_triton_repository

        try:
            folders = write_triton_repository(
                triton_repo,
                model_name,
                onnx_path=source,
                engine_path=engine,
                max_batch_size=max_batch,
                tensorrt_version=triton_tensorrt_version,
                require_fused=True,
            )
        except (InputError, ModelError, ValueError) as exc:
            fail(f"Triton repository: {exc}")
        for name, folder in folders.items():
            typer.echo(f"wrote Triton model {name!r} in {folder}")
        if engine is not None and triton_tensorrt_version is None:
            typer.echo(
                "note: the plan loads only in a Triton container with the TensorRT major.minor that "
                "built it; pass --triton-tensorrt-version to check"
            )


def _check_triton_source(onnx_model: Path | None, fused: bool) -> None:
    """The Triton repository serves the fused model (raw HU + points in, probabilities out, no
    Python on the server): refuse a plain export or a plain --onnx before any work."""
    if onnx_model is None:
        if not fused:
            fail(
                "--triton-repo serves the fused model (raw HU + points in, probabilities out, no Python "
                "on the server): add --fused"
            )
        return
    if not onnx_model.is_file():
        return  # reported by the caller
    import onnx

    try:
        names = {i.name for i in onnx.load(str(onnx_model), load_external_data=False).graph.input}
    except Exception as exc:  # protobuf decode errors
        fail(f"--onnx {onnx_model}: cannot read as ONNX ({type(exc).__name__})")
    if not {"slices", "points"} <= names:
        fail(
            f"--triton-repo serves the fused model, but --onnx {onnx_model} has inputs {sorted(names)}: "
            "export it with --fused"
        )


def _check_export_options(
    checkpoint: Path,
    output: Path | None,
    fused: bool,
    opset: int,
    fused_geometry: str | None,
    engine: Path | None,
    precision: str,
) -> None:
    """Everything about a checkpoint export that can be refused before the export runs."""
    from cmdeploy.export.trt_ops import MAX_GRIDSAMPLE_OPSET as MAX_FUSED_OPSET  # torch-free

    if not checkpoint.is_file():
        fail(f"--checkpoint {checkpoint} not found")
    if output is None:
        fail("--checkpoint needs --output (the ONNX file to write)")
    if output.suffix.lower() != ".onnx":
        fail(f"--output must end in .onnx, got {output}")
    if fused_geometry not in (None, "float64", "float32"):
        fail(f"--fused-geometry must be float64 or float32, got {fused_geometry!r}")
    if fused and not 16 <= opset <= MAX_FUSED_OPSET:
        fail(
            f"--fused needs --opset 16..{MAX_FUSED_OPSET} (GridSample from 16; from 20 its bilinear "
            f"mode is named 'linear', which older TensorRT parsers read as nearest), got {opset}"
        )
    if engine is not None and precision == "int8":
        fail(f"--precision int8 cannot come from a fresh FP32 export. {INT8_HINT}")
    if engine is not None and fused and fused_geometry == "float64":
        fail("--engine needs --fused-geometry float32: TensorRT has no FP64")
    if engine is not None and importlib.util.find_spec("tensorrt") is None:
        fail(
            "TensorRT not installed: --engine needs the 'trt' extra: pip install 'cmdeploy[trt]' "
            "(an NVIDIA GPU and driver); the ONNX model runs without it on onnxruntime"
        )
    require("torch", "train,export", "export")


def _export_checkpoint(
    checkpoint: Path, output: Path, fused: bool, opset: int, fused_geometry: str,
    runtime_options: dict | None = None,
) -> Path:
    from cmdeploy.errors import InputError, ModelError
    from cmdeploy.export.parity import ParityError

    try:
        if fused:
            from cmdeploy.export.fused import export_fused

            result = export_fused(
                checkpoint, output, opset=opset, geometry_dtype=fused_geometry,
                runtime_options=runtime_options,
            )
        else:
            from cmdeploy.export.onnx_export import export_onnx

            result = export_onnx(checkpoint, output, opset=opset, runtime_options=runtime_options)
    except ParityError as exc:
        fail(f"{exc}; {output} was not written", code=EXIT_CHECK)
    except (ValueError, FileNotFoundError, InputError, ModelError) as exc:
        fail(str(exc))
    typer.echo(result.summary())
    typer.echo(f"BatchNorm folded into {result.batchnorm_fused} convolutions")
    if fused:
        typer.echo(f"fused geometry computed in {fused_geometry}")
    return output


def _build(
    source: Path,
    engine: Path,
    *,
    precision: str,
    batches: tuple[int, int, int],
    axis_ranges: dict[str, tuple[int, int, int]] | None,
    timing_cache: Path | None,
    fp16_path: Path,
) -> Path:
    """Lint ``source`` (FP16-converted first for ``fp16``), then build; returns the engine's ONNX."""
    import onnx

    from cmdeploy.errors import InputError, ModelError
    from cmdeploy.export.tensorrt_build import (
        check_tensorrt_compatible,
        graph_precision,
        onnx_input_shapes,
        profile_shapes,
    )

    try:
        model = onnx.load(str(source), load_external_data=False)
        profiles = profile_shapes(onnx_input_shapes(model), *batches, axis_ranges=axis_ranges)
        check_tensorrt_compatible(model, profiles, source=str(source))  # before TensorRT
    except InputError as exc:
        hint = f"\n{INT8_HINT}" if precision == "int8" and graph_precision(model) != "int8" else ""
        fail(f"engine not built: {exc}{hint}")
    except Exception as exc:  # protobuf decode errors: a model failure (exit 3), as in every command
        fail(f"--onnx {source}: cannot read as ONNX ({type(exc).__name__})", code=EXIT_MODEL)
    if precision == "int8" and graph_precision(model) != "int8":
        fail(f"{source} has no QuantizeLinear nodes. {INT8_HINT}")
    if importlib.util.find_spec("tensorrt") is None:
        fail(
            f"{source} passed the TensorRT-compatibility lint, but TensorRT is not installed: "
            "pip install 'cmdeploy[trt]' (an NVIDIA GPU and driver)"
        )
    if precision == "fp16" and graph_precision(model) != "fp16":
        source = _write_fp16(source, fp16_path)
    from cmdeploy.export.tensorrt_build import build_engine

    min_batch, opt_batch, max_batch = batches
    try:
        built = build_engine(
            source,
            engine,
            precision=precision,
            min_batch=min_batch,
            opt_batch=opt_batch,
            max_batch=max_batch,
            axis_ranges=axis_ranges,
            timing_cache=timing_cache,
        )
    except InputError as exc:
        fail(f"engine build failed: {exc}")
    except (ModelError, ValueError) as exc:
        fail(f"engine build failed: {exc}", code=3)
    typer.echo(f"wrote TensorRT engine {built} ({built.stat().st_size / 1e6:.2f} MB, {precision})")
    return source


def _write_fp16(source: Path, path: Path) -> Path:
    """FP16 copy of ``source`` at ``path`` (a fused graph's geometry stays FP32), verified against
    it; exits 1 beyond tolerance."""
    import onnx

    from cmdeploy.export.fp16 import convert_to_fp16, fp16_node_prefixes
    from cmdeploy.export.onnx_export import save_model
    from cmdeploy.export.verify import verify_models

    model = onnx.load(str(source))
    model16 = convert_to_fp16(model, node_prefixes=fp16_node_prefixes(model))
    size = save_model(model16, path)
    typer.echo(f"wrote FP16 copy {path} ({size / 1e6:.2f} MB, {len(model16.graph.node)} nodes)")
    check = verify_models(source, path)
    typer.echo("FP16 vs FP32 (onnxruntime):\n" + check.summary())
    if not check.ok:
        fail(f"the FP16 copy {path} disagrees with the FP32 model beyond tolerance", code=EXIT_CHECK)
    return path
