"""``cmdeploy triton``: serve a model on Triton Inference Server (PyTriton; the ``[triton]`` extra).

Exit status: 0 after a clean stop (Ctrl-C / SIGTERM), 2 for bad options or a missing extra, 3 when
the model cannot be loaded, the server cannot start, or it dies without being asked to stop.
"""

from __future__ import annotations

from pathlib import Path

import typer


def _sizes(text: str) -> tuple[int, ...]:
    from cmdeploy.errors import InputError

    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InputError(f"--preferred-batch-sizes must be comma-separated integers, got {text!r}") from None
    return values


def triton(
    model: Path | None = typer.Option(
        None, "--model", "-m", help="Model to serve: .onnx or TensorRT engine (default: the embedded model)."
    ),
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to bind (0.0.0.0 to serve other machines, e.g. behind a load balancer).",
    ),
    http_port: int = typer.Option(8000, "--http-port", help="HTTP/REST port (KServe v2 protocol)."),
    grpc_port: int = typer.Option(8001, "--grpc-port", help="gRPC port."),
    metrics_port: int = typer.Option(8002, "--metrics-port", help="Prometheus metrics port (/metrics)."),
    instances: int = typer.Option(
        2, "--instances", min=1, help="Model instances, each its own session (2: measured best on 2 cores)."
    ),
    max_batch_size: int = typer.Option(16, "--max-batch-size", min=1, help="Most objects per model call."),
    preferred_batch_sizes: str = typer.Option(
        "16", "--preferred-batch-sizes", help="Dynamic batcher: comma-separated preferred batch sizes."
    ),
    max_queue_delay_us: int = typer.Option(
        2000, "--max-queue-delay-us", min=0, help="Dynamic batcher: longest wait to fill a batch (µs)."
    ),
    threads: int | None = typer.Option(
        None, "--threads", min=1, help="onnxruntime threads per instance (default: cores / instances)."
    ),
    slice_dtype: str = typer.Option(
        "float32", "--slice-dtype", help="Wire type of the slices: float32 or int16."
    ),
    model_name: str = typer.Option("cmdeploy", "--model-name", help="Triton model name."),
    log_verbose: int = typer.Option(0, "--log-verbose", min=0, help="tritonserver log verbosity."),
) -> None:
    """Serve the runtime on Triton: model `cmdeploy`, inputs slices (B,H,W) HU + points (B,4,2),
    outputs probabilities and masks (B,H,W); HTTP, gRPC, /v2/health/ready and /metrics.

    Sets LD_LIBRARY_PATH for the server so Triton's Python backend stub loads this interpreter's
    libpython (needed with pyenv Pythons).
    """
    from cmdeploy.commands._common import error_console, exit_on_error, no_traceback, require
    from cmdeploy.errors import ModelError

    require("pytriton", "triton", "cmdeploy triton")
    from cmdeploy.triton_server import ServerConfig, serve

    err = error_console()
    with no_traceback(err), exit_on_error(err):
        config = ServerConfig(
            model=model,
            host=host,
            http_port=http_port,
            grpc_port=grpc_port,
            metrics_port=metrics_port,
            instances=instances,
            max_batch_size=max_batch_size,
            preferred_batch_sizes=_sizes(preferred_batch_sizes),
            max_queue_delay_us=max_queue_delay_us,
            threads=threads,
            slice_dtype=slice_dtype,
            model_name=model_name,
            log_verbose=log_verbose,
        )
        config.check()

        def ready(urls: dict[str, str]) -> None:
            err.print(
                f"serving model {model_name!r}: HTTP {urls['http']}, gRPC {urls['grpc']}, "
                f"metrics {urls['metrics']}; ready at {urls['ready']} (Ctrl-C stops)",
                soft_wrap=True,
            )

        try:
            serve(config, on_ready=ready, log=err.print)
        except TimeoutError as exc:
            raise ModelError(f"Triton did not become ready: {exc}") from None
    err.print("server stopped")
