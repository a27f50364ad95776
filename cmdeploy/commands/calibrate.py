"""``cmdeploy calibrate``: static INT8 (QDQ) quantization of a plain ONNX model, behind an accuracy gate.

Calibrates on real preprocessed crops of labelled objects, quantizes for onnxruntime on CPU or for
TensorRT, scores FP32 and INT8 Dice on held-out objects (another case, i.e. another patient, when
the data has several) and writes the INT8 model only when the mean Dice drops by at most
``--max-dice-drop`` points. See :mod:`cmdeploy.calibration` for the method.

Exit status: 0 written, 1 the accuracy gate refused the INT8 model (nothing written), 2 a bad input
or option, 3 a model or runtime failure. Logs never show patient names, IDs or DICOM UIDs.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer


def calibrate(
    model: Path = typer.Option(..., "--model", "-m", help="Plain FP32 ONNX model (cmdeploy export)."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Labelled NIfTI cases (folder of <case>/image.nii.gz + labels.nii.gz, or one case "
        "folder), or unlabelled CT (DICOM folder/file, NIfTI) whose HU >= 200 regions are used.",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="INT8 ONNX model to write."),
    target: str = typer.Option("cpu", "--target", help="cpu (onnxruntime) or tensorrt."),
    method: str = typer.Option("minmax", "--method", help="minmax, entropy or percentile."),
    num_slices: int = typer.Option(64, "--num-slices", min=1, help="Calibration objects (slice + points)."),
    num_eval: int = typer.Option(64, "--num-eval", min=1, help="Held-out objects scored by the gate."),
    seed: int = typer.Option(0, "--seed", help="Seed of the object draw."),
    calib_cases: str | None = typer.Option(
        None, "--calib-cases", help="Comma-separated calibration case names (default: all but the last)."
    ),
    eval_cases: str | None = typer.Option(
        None, "--eval-cases", help="Comma-separated held-out case names (default: the last case)."
    ),
    max_dice_drop: float = typer.Option(
        1.0, "--max-dice-drop", help="Largest allowed drop of mean Dice, in points (percent)."
    ),
    exclude_nodes: list[str] = typer.Option(
        [], "--exclude-nodes", help="Node names kept float (repeat or comma-separate)."
    ),
    auto_exclude: bool = typer.Option(
        False, "--auto-exclude", help="If the gate fails, keep the most sensitive convs float and retry."
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Folder caching calibration ranges (model hash + data + method + seed)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Objects per calibration batch."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads."),
    trt_version: str | None = typer.Option(
        None,
        "--trt-version",
        help="TensorRT version in the calibration cache header (default: installed, else 10.0.0).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Quantize a plain ONNX model to INT8 (QDQ) and keep it only if held-out Dice holds up."""
    from cmdeploy.commands._common import error_console, guarded

    err = error_console()
    with guarded(err):
        passed = _calibrate(
            model=model,
            data=data,
            output=output,
            target=target,
            method=method,
            num_slices=num_slices,
            num_eval=num_eval,
            seed=seed,
            calib_cases=calib_cases,
            eval_cases=eval_cases,
            max_dice_drop=max_dice_drop,
            exclude_nodes=exclude_nodes,
            auto_exclude=auto_exclude,
            cache=cache,
            batch_size=batch_size,
            threads=threads,
            trt_version=trt_version,
            overwrite=overwrite,
            err=err,
        )
    if not passed:
        raise typer.Exit(1)


def _calibrate(*, err, exclude_nodes: list[str], **kw) -> bool:  # noqa: ANN001, ANN003
    from rich.markup import escape

    from cmdeploy.errors import ModelError

    try:
        import onnx  # noqa: F401
        import onnxruntime.quantization  # noqa: F401
    except ImportError as exc:
        raise ModelError(
            f"cmdeploy calibrate needs onnx and onnxruntime.quantization ({exc}): "
            "pip install 'cmdeploy[export]'"
        ) from None
    from cmdeploy.calibration.gate import calibrate_model
    from cmdeploy.calibration.quantize import METHODS, TARGETS, Recipe
    from cmdeploy.calibration.slices import load_split
    from cmdeploy.errors import InputError

    if kw["target"] not in TARGETS:
        raise InputError(f"--target must be one of {', '.join(TARGETS)}, got {kw['target']!r}")
    if kw["method"] not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)}, got {kw['method']!r}")
    out: Path = kw["output"]
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--output '{out}' must end in .onnx")
    if out.resolve() == Path(kw["model"]).resolve():
        raise InputError("--output must differ from --model (inputs are never modified)")
    from cmdeploy.writers.atomic import check_output_file

    check_output_file(out, overwrite=kw["overwrite"], what="--output")
    if kw["target"] == "tensorrt":  # the TensorRT 10 calibration cache written next to it
        check_output_file(
            out.with_name(out.name.removesuffix(".onnx") + ".calibration.cache"),
            overwrite=kw["overwrite"], what="calibration cache",
        )
    excluded = [n.strip() for item in exclude_nodes for n in item.split(",") if n.strip()]
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        err.print(f"[dim][{time.perf_counter() - t0:6.1f}s][/dim] {escape(msg)}", soft_wrap=True)

    from cmdeploy.calibration.graph import check_plain
    from cmdeploy.calibration.quantize import load_model

    check_plain(load_model(kw["model"]), name=f"model '{kw['model']}'", batchnorm_ok=True)  # fail fast
    say("selecting calibration and held-out objects")
    split = load_split(
        kw["data"],
        num_calib=kw["num_slices"],
        num_eval=kw["num_eval"],
        seed=kw["seed"],
        calib_cases=kw["calib_cases"],
        eval_cases=kw["eval_cases"],
    )
    say(
        f"calibration: {len(split.calibration)} objects from {', '.join(split.calib_cases)}; "
        f"held out: {len(split.evaluation)} objects from {', '.join(split.eval_cases)}"
    )
    if split.note:
        err.print(f"[yellow]note:[/yellow] {escape(split.note)}", soft_wrap=True)
    recipe = Recipe(target=kw["target"], method=kw["method"])
    result = calibrate_model(
        kw["model"],
        split,
        out,
        recipe=recipe,
        seed=kw["seed"],
        max_drop=kw["max_dice_drop"],
        exclude=excluded,
        auto_exclude=kw["auto_exclude"],
        cache_dir=kw["cache"],
        batch_size=kw["batch_size"],
        threads=kw["threads"],
        trt_version=kw["trt_version"],
        progress=say,
    )
    typer.echo(result.report.table())
    if result.prepared.rewrites:
        typer.echo("graph rewrites: " + "; ".join(result.prepared.rewrites))
    typer.echo("kept float: " + ", ".join(result.summary["float_convs"] + result.prepared.tail[1:]))
    if result.output is None:
        err.print(f"[red]refused:[/red] INT8 model not written ({escape(str(out))})", soft_wrap=True)
        return False
    typer.echo(f"wrote {result.output} ({result.output.stat().st_size / 1e6:.2f} MB)")
    if result.trt_cache is not None:
        typer.echo(
            f"wrote {result.trt_cache} (TensorRT 10 implicit-INT8 calibration cache, for trtexec "
            "--calib or polygraphy --calibration-cache only; TensorRT 11 and cmdeploy build from "
            "the Q/DQ model)"
        )
    if kw["target"] == "tensorrt":
        typer.echo(
            f"build the engine with: cmdeploy export --onnx {result.output} --engine "
            f"{result.output.with_suffix('.plan')} --precision int8"
        )
    return True
