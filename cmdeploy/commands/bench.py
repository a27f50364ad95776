"""``cmdeploy bench``: latency, throughput and achieved GFLOP/s of models per backend and batch size.

Exit status: 0 on success, 2 for bad options or inputs, 3 when no model could be run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def _ints(text: str, option: str) -> list[int]:
    from cmdeploy.errors import InputError

    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{option} must list integers >= 1, got {text!r}")
    return list(dict.fromkeys(values))


def bench(
    model: list[Path] = typer.Option(
        ..., "--model", "-m", help="Model .onnx or TensorRT .engine; repeat to compare (e.g. FP32 and INT8)."
    ),
    backend: list[str] = typer.Option(
        ["auto"], "--backend", help="auto, onnxruntime or tensorrt; repeat to run several."
    ),
    batch_sizes: str = typer.Option("1,16", "--batch-sizes", help="Comma-separated batch sizes."),
    iterations: int = typer.Option(20, "--iterations", min=1, help="Timed calls per measurement."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed calls before each measurement."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads."),
    device: str = typer.Option("cpu", "--device", help="onnxruntime device: cpu or cuda."),
    slice_size: int = typer.Option(512, "--slice-size", min=16, help="Synthetic slice side, pixels."),
    cm_sizes: str = typer.Option("256,512", "--cm-sizes", help="Grid sizes of the confidence-map bench."),
    peak_size: int = typer.Option(2048, "--peak-size", min=16, help="Matrix side of the matmul peak."),
    peak_repeats: int = typer.Option(5, "--peak-repeats", min=1, help="Matmul peak: best of N."),
    flops: bool = typer.Option(True, "--flops/--no-flops", help="Count model FLOPs (needs onnx)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout only."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON to this file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --output file."),
) -> None:
    """Benchmark models: p50/p95 latency, objects/s, GFLOP/s vs the machine's matmul peak."""
    from cmdeploy.commands._common import error_console, guarded, wide_console
    from cmdeploy.writers.report import json_default

    err = error_console()
    with guarded(err):
        if output is not None:
            from cmdeploy.writers.atomic import check_output_file

            check_output_file(output, overwrite=overwrite, what="--output")
        result = run_bench(
            model, backends=backend, batch_sizes=_ints(batch_sizes, "--batch-sizes"),
            iterations=iterations, warmup=warmup, threads=threads, device=device, slice_size=slice_size,
            cm_sizes=_ints(cm_sizes, "--cm-sizes"), peak_size=peak_size, peak_repeats=peak_repeats,
            flops=flops, err=err,
        )
    import json

    text = json.dumps(result, indent=2, default=json_default)
    if output is not None:
        from cmdeploy.writers.atomic import atomic_write_text

        with guarded(err):
            atomic_write_text(output, text + "\n")
    if as_json:
        typer.echo(text)
    else:
        print_report(wide_console(), result)
    if not any(r.get("results") for r in result["models"]):
        err.print("[red]model/runtime error:[/red] no model could be run", highlight=False)
        raise typer.Exit(3)


def run_bench(models: list[Path], *, backends: list[str], batch_sizes: list[int], iterations: int,
              warmup: int, threads: int | None, device: str, slice_size: int, cm_sizes: list[int],
              peak_size: int, peak_repeats: int, flops: bool, err) -> dict[str, Any]:
    """Run every benchmark and return the JSON-ready result (see :mod:`cmdeploy.benchmarking`)."""
    from rich.markup import escape

    from cmdeploy.commands._common import check_runtime_options
    from cmdeploy.errors import InputError, ModelError
    from cmdeploy.evaluation import flops as flop_count
    from cmdeploy.evaluation import timing
    from cmdeploy.evaluation.run import model_names
    from cmdeploy.privacy import scrub
    from cmdeploy.segmenter import Segmenter

    check_runtime_options(backends, device)
    for p in models:
        if not Path(p).is_file():
            raise InputError(f"model file '{p}' not found")

    result: dict[str, Any] = {
        "machine": timing.machine_info(),
        "settings": {"iterations": iterations, "warmup": warmup, "threads": threads, "device": device,
                     "slice_size": slice_size, "batch_sizes": batch_sizes},
    }
    err.print(f"matmul peak ({peak_size} x {peak_size} float32, best of {peak_repeats}) ...")
    peak = timing.matmul_peak(peak_size, peak_repeats)
    result["peak"] = peak

    entries: list[dict[str, Any]] = []
    loaded: list[tuple[dict[str, Any], Any]] = []
    for name, path in zip(model_names(models), models, strict=True):
        gflop, flop_info, unreadable = None, None, None
        try:
            if flops and path.suffix.lower() == ".onnx":
                try:
                    fc = flop_count.count_flops(path, slice_shape=(slice_size, slice_size))
                    gflop, flop_info = fc.gflop, fc.to_dict()
                except ImportError:
                    flop_info = {"skipped": "onnx is not installed (pip install 'cmdeploy[export]')"}
            precision = flop_count.model_precision(path)
        except ModelError as exc:  # a corrupt file: reported like a model that cannot be loaded
            precision, unreadable = "?", exc
        for backend in backends:
            entry: dict[str, Any] = {"name": name, "file": path.name, "requested_backend": backend,
                                     "precision": precision, "flops": flop_info, "results": []}
            entries.append(entry)
            if unreadable is not None:
                entry["error"] = scrub(unreadable)
                err.print(f"skipping {name} ({backend}): {escape(entry['error'])}", soft_wrap=True)
                continue
            try:
                seg = Segmenter.load(path, backend=backend, threads=threads, batch_size=max(batch_sizes),
                                     device=device)
            except (ModelError, ImportError, RuntimeError) as exc:
                entry["error"] = scrub(exc)
                err.print(f"skipping {name} ({backend}): {escape(entry['error'])}", soft_wrap=True)
                continue
            entry.update(backend=seg.backend, fused=seg.fused, input_size=seg.spec.input_size,
                         guidance=seg.spec.guidance)
            err.print(f"timing {name} ({seg.backend}, {precision}) ...")
            try:
                rows = timing.bench_segmenter(seg, batch_sizes, iterations=iterations, warmup=warmup,
                                          slice_size=slice_size)
            except (ModelError, RuntimeError) as exc:
                entry["error"] = scrub(exc)
                err.print(f"failed {name} ({backend}): {escape(entry['error'])}", soft_wrap=True)
                continue
            for r in rows:
                m = r["model"]
                if gflop is not None and m["p50_ms"] > 0:
                    achieved = gflop * r["batch"] / (m["p50_ms"] / 1e3)
                    r["gflops"] = round(achieved, 3)
                    r["peak_fraction"] = round(achieved / peak["gflops"], 4)
            entry["results"] = rows
            loaded.append((entry, seg))
    result["models"] = entries

    err.print("confidence map (NumPy) ...")
    result["confidence_map"] = timing.bench_confidence_map(
        cm_sizes, (1, max(batch_sizes)), iterations=iterations, warmup=1
    )
    fused = next((s for e, s in loaded if e.get("fused")), None)
    if fused is not None:
        plain = next(
            (s for e, s in loaded if not e.get("fused") and s.spec.input_size == fused.spec.input_size), None
        )
        err.print("fused graph vs NumPy preprocessing ...")
        result["fused_vs_numpy"] = timing.bench_fused_vs_numpy(
            fused, plain, batch=max(batch_sizes), iterations=iterations, warmup=min(warmup, 2),
            slice_size=slice_size,
        )
    else:
        result["fused_vs_numpy"] = None
    return result


def print_report(console, result: dict[str, Any]) -> None:
    """Rich tables of a :func:`run_bench` result."""
    from rich.table import Table

    m = result["machine"]
    console.print(
        f"{m['cpu_model']}; {m['usable_cores']} of {m['logical_cores']} cores; numpy {m['numpy']}, "
        f"onnxruntime {m.get('onnxruntime')}; float32 matmul peak {result['peak']['gflops']:.1f} GFLOP/s "
        f"(n = {result['peak']['n']})"
    )
    t = Table(title="model latency per batch (ms per call) and throughput")
    for col in ("model", "backend", "precision", "batch", "model p50", "model p95", "objects/s",
                "e2e p50", "e2e p95", "e2e objects/s", "GFLOP/s", "% peak"):
        t.add_column(col, justify="left" if col in ("model", "backend", "precision") else "right")
    for e in result["models"]:
        if e.get("error"):
            t.add_row(e["name"], e["requested_backend"], e["precision"], "-", "error: " + e["error"][:40],
                      *["-"] * 7)
            continue
        for r in e["results"]:
            mo, ee = r["model"], r["end_to_end"]
            t.add_row(
                e["name"], e["backend"], e["precision"], str(r["batch"]), f"{mo['p50_ms']:.2f}",
                f"{mo['p95_ms']:.2f}", f"{mo['items_per_s']:.1f}", f"{ee['p50_ms']:.2f}",
                f"{ee['p95_ms']:.2f}", f"{ee['items_per_s']:.1f}",
                f"{r['gflops']:.1f}" if "gflops" in r else "-",
                f"{r['peak_fraction'] * 100:.1f}" if "peak_fraction" in r else "-",
            )
    console.print(t)
    for e in result["models"]:
        f = e.get("flops") or {}
        if "gflop" in f:
            extra = f"; {len(f['unknown_nodes'])} node(s) with unknown shapes" if f["unknown_nodes"] else ""
            console.print(f"{e['name']}: {f['gflop']:.3f} GFLOP per object (Conv + MatMul/Gemm){extra}")
        elif "skipped" in f:
            console.print(f"{e['name']}: FLOPs skipped: {f['skipped']}")
    t = Table(title="confidence map, NumPy (ms per call)")
    for col in ("size", "batch", "p50", "p95", "ms per map"):
        t.add_column(col, justify="right")
    for r in result["confidence_map"]:
        t.add_row(str(r["size"]), str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}",
                  f"{r['ms_per_map']:.3f}")
    console.print(t)
    if result.get("fused_vs_numpy"):
        t = Table(title="fused graph vs NumPy preprocessing (ms per batch)")
        for col in ("path", "batch", "p50", "p95"):
            t.add_column(col, justify="left" if col == "path" else "right")
        for r in result["fused_vs_numpy"]:
            t.add_row(r["path"], str(r["batch"]), f"{r['p50_ms']:.2f}", f"{r['p95_ms']:.2f}")
        console.print(t)
