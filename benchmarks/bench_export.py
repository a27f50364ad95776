"""torch vs onnxruntime (CPU) latency of the same checkpoint, side by side in one process.

    .venv/bin/python benchmarks/bench_export.py --checkpoint best.pt [--onnx best.onnx] \
        [--threads 2] [--batch-sizes 1,16] [--iterations N] [--warmup 2] [--gap-ms 50] [--json out.json]

Backends:

* ``torch``: ``Checkpoint.load(C).build_model()`` (eval mode, BatchNorm not folded), called under
  ``torch.no_grad()`` with ``torch.set_num_threads(T)`` (and one inter-op thread);
* ``onnxruntime``: the plain exported ONNX (``--onnx``; without it the checkpoint is exported to a
  temporary folder with ``export_onnx(C, tmp, check_parity=False)``), ``CPUExecutionProvider``,
  ``intra_op_num_threads=T``, one inter-op thread, ``ORT_ENABLE_ALL``, sequential execution.

Input: one float32 (batch, C, S, S) array drawn from N(0, 1) (``--seed``), the same for both
backends. Dense convolutions do the same arithmetic whatever the values, so random normal input is
fine for latency; it is not a real preprocessed crop. The largest |torch logit - onnxruntime logit|
on it is reported as a check that both run the same model.

Timing: per batch size, ``--warmup`` untimed calls per backend, then the backends run in turn
(round-robin, so load from other processes hits both alike) ``--iterations`` times each (default 20
at batch 1, 5 at larger batches), each call after a ``--gap-ms`` sleep so the previous backend's
spinning worker threads have parked. Wall-clock ``time.perf_counter`` per call; the table gives the
median and 95th percentile (ms per call, i.e. per batch), items/s = batch * calls / total time, and
torch/ORT = torch median / onnxruntime median (> 1: onnxruntime is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ITERATIONS_BATCH1 = 20
DEFAULT_ITERATIONS_BATCHED = 5


def parse_batch_sizes(text: str) -> list[int]:
    """``"1,16"`` -> ``[1, 16]``; ``ValueError`` naming the bad entry."""
    sizes = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"--batch-sizes: {part!r} is not an integer") from None
        if value < 1:
            raise ValueError(f"--batch-sizes: batch size must be >= 1, got {value}")
        sizes.append(value)
    if not sizes:
        raise ValueError(f"--batch-sizes: no batch size in {text!r}")
    return sizes


def default_threads() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def time_round_robin(
    calls: dict[str, Any], *, iterations: int, warmup: int, gap_s: float
) -> dict[str, np.ndarray]:
    """Seconds per call of each zero-argument callable, ``iterations`` each, run in turn after
    ``warmup`` untimed calls each; ``gap_s`` of sleep before every timed call."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times = {name: np.empty(iterations, dtype=np.float64) for name in calls}
    for i in range(iterations):
        for name, fn in calls.items():
            if gap_s > 0:
                time.sleep(gap_s)
            t0 = time.perf_counter()
            fn()
            times[name][i] = time.perf_counter() - t0
    return times


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows of ``results`` as a Markdown table (ratio on the onnxruntime row of each batch)."""
    lines = [
        "| backend | batch | median ms | p95 ms | items/s | torch/ORT |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ratio = "—" if r.get("torch_over_ort") is None else f"{r['torch_over_ort']:.2f}x"
        lines.append(
            f"| {r['backend']} | {r['batch']} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | "
            f"{r['items_per_s']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="cmdeploy training checkpoint")
    ap.add_argument("--onnx", type=Path, help="plain ONNX export of it (default: exported to a temp dir)")
    ap.add_argument("--threads", type=int, default=default_threads(), help="torch and ORT intra-op threads")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated, e.g. 1,16")
    ap.add_argument(
        "--iterations",
        type=int,
        help=f"timed calls per backend and batch size (default {DEFAULT_ITERATIONS_BATCH1} at batch 1, "
        f"{DEFAULT_ITERATIONS_BATCHED} otherwise)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per backend and batch size")
    ap.add_argument("--gap-ms", type=float, default=50.0, help="sleep before each timed call")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random normal input")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    try:
        batch_sizes = parse_batch_sizes(args.batch_sizes)
    except ValueError as e:
        ap.error(str(e))
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    if args.iterations is not None and args.iterations < 1:
        ap.error(f"--iterations must be >= 1, got {args.iterations}")
    if args.warmup < 0:
        ap.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.checkpoint.is_file():
        ap.error(f"--checkpoint: file not found: {args.checkpoint}")
    if args.onnx is not None and not args.onnx.is_file():
        ap.error(f"--onnx: file not found: {args.onnx}")

    import onnxruntime as ort
    import torch

    from cmdeploy.evaluation.timing import latency, machine_info
    from cmdeploy.hashing import file_sha256
    from cmdeploy.train.checkpoint import Checkpoint

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work has started in this process
        pass

    ckpt = Checkpoint.load(args.checkpoint)
    model = ckpt.build_model().eval()
    spec = ckpt.spec
    c, s = spec.num_channels, spec.input_size
    ckpt_sha = file_sha256(args.checkpoint)

    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        if args.onnx is None:
            from cmdeploy.export.onnx_export import export_onnx

            onnx_path = Path(tmp) / "model.onnx"
            print(f"exporting {args.checkpoint} to a temporary ONNX (no parity check)", file=sys.stderr)
            export_onnx(args.checkpoint, onnx_path, check_parity=False)
        else:
            onnx_path = args.onnx
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        onnx_bytes = onnx_path.stat().st_size
    onnx_sha = sess.get_modelmeta().custom_metadata_map.get("cmdeploy.checkpoint_sha256")
    if args.onnx is not None and onnx_sha not in (None, ckpt_sha):
        print(
            f"warning: {args.onnx} records checkpoint sha256 {onnx_sha[:12]}..., "
            f"{args.checkpoint} is {ckpt_sha[:12]}...; they may be different models",
            file=sys.stderr,
        )
    (inp,) = sess.get_inputs()
    dims = inp.shape[1:]
    if list(dims) != [c, s, s]:
        raise SystemExit(
            f"--onnx input {inp.name!r} has shape {inp.shape}; checkpoint expects (N, {c}, {s}, {s})"
        )
    out_name = sess.get_outputs()[0].name

    info = machine_info()
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["load_average_before"] = round(os.getloadavg()[0], 2)
    rng = np.random.default_rng(args.seed)
    rows: list[dict[str, Any]] = []
    max_abs_diff: dict[str, float] = {}
    for b in batch_sizes:
        x = rng.standard_normal((b, c, s, s), dtype=np.float32)
        xt = torch.from_numpy(x)

        def run_torch(xt: Any = xt) -> np.ndarray:
            with torch.no_grad():
                return model(xt).numpy()

        def run_ort(x: np.ndarray = x) -> np.ndarray:
            return sess.run([out_name], {inp.name: x})[0]

        max_abs_diff[str(b)] = float(np.max(np.abs(run_torch() - run_ort())))
        iters = args.iterations or (DEFAULT_ITERATIONS_BATCH1 if b == 1 else DEFAULT_ITERATIONS_BATCHED)
        print(f"batch {b}: {args.warmup} warm-up + {iters} round-robin calls per backend", file=sys.stderr)
        times = time_round_robin(
            {"torch": run_torch, "onnxruntime": run_ort},
            iterations=iters,
            warmup=args.warmup,
            gap_s=args.gap_ms / 1e3,
        )
        stats = {name: latency(t, b) for name, t in times.items()}
        ratio = stats["torch"].p50_ms / stats["onnxruntime"].p50_ms
        for name, lat in stats.items():
            rows.append(
                {
                    "backend": name,
                    "batch": b,
                    "median_ms": lat.p50_ms,
                    "p95_ms": lat.p95_ms,
                    "mean_ms": lat.mean_ms,
                    "min_ms": lat.min_ms,
                    "items_per_s": lat.items_per_s,
                    "iterations": lat.iterations,
                    "torch_over_ort": ratio if name == "onnxruntime" else None,
                }
            )
    info["load_average_after"] = round(os.getloadavg()[0], 2)

    result: dict[str, Any] = {
        "machine": info,
        "config": {
            "checkpoint": str(args.checkpoint),
            "checkpoint_sha256": ckpt_sha,
            "onnx": None if args.onnx is None else str(args.onnx),
            "onnx_exported_here": args.onnx is None,
            "onnx_bytes": onnx_bytes,
            "model_config": ckpt.model_config.to_dict(),
            "input_shape": ["batch", c, s, s],
            "input": f"random normal N(0, 1) float32, seed {args.seed}",
            "threads": args.threads,
            "warmup": args.warmup,
            "gap_ms": args.gap_ms,
            "batch_sizes": batch_sizes,
            "ort_graph_optimization": "ORT_ENABLE_ALL",
        },
        "results": rows,
        "max_abs_diff": max_abs_diff,
    }

    m = info
    print(
        f"CPU: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['usable_cores']} usable); "
        f"load average {m['load_average_before']} -> {m['load_average_after']}"
    )
    print(
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}, numpy {m['numpy']}, python {m['python']}; "
        f"{args.threads} intra-op threads each"
    )
    print(
        f"model: {ckpt.model_config.to_dict()}, input (N, {c}, {s}, {s}) random normal (seed {args.seed}); "
        "max |torch - ORT| logit: " + ", ".join(f"batch {k}: {v:.2e}" for k, v in max_abs_diff.items())
    )
    print()
    print(markdown_table(rows))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"\nwrote {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
