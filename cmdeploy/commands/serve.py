"""``cmdeploy serve``: the annotation page and its HTTP API (the ``[serve]`` extra).

Exit status: 2 for a bad option or input (no series under ``--data``, a non-loopback ``--host``
without ``--token``, a missing extra), 3 when the model cannot be loaded.
"""

from __future__ import annotations

from pathlib import Path

import typer

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve(
    data: Path = typer.Option(
        ..., "--data", "-d", help="Folder of DICOM series / NIfTI files, or one of them."
    ),
    model: Path | None = typer.Option(None, "--model", "-m", help="Model .onnx/.plan (default: embedded)."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."
    ),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="TCP port."),
    output: Path = typer.Option(Path("annotations"), "--output", "-o", help="Folder for exports."),
    token: str | None = typer.Option(
        None, "--token", envvar="CMDEPLOY_TOKEN", help="Bearer token every API call must carry."
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help="onnxruntime intra-op threads."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Most requests per model call."),
    max_wait_ms: float = typer.Option(
        2.0, "--max-wait-ms", min=0, help="How long a batch waits for company."
    ),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.01, help="Largest request body (MiB)."),
) -> None:
    """Annotate in the browser: four clicks -> mask, Enter accepts, propagate, export SEG/NIfTI/CSV."""
    from cmdeploy.commands._common import error_console, exit_on_error, fail, no_traceback, require

    require("fastapi", "serve", "cmdeploy serve")
    require("uvicorn", "serve", "cmdeploy serve")
    if host not in LOOPBACK and not token:
        fail(f"--host {host} is reachable from other machines: pass --token (or CMDEPLOY_TOKEN)")
    err = error_console()
    with no_traceback(err), exit_on_error(err):
        import logging

        import uvicorn

        from cmdeploy.errors import InputError
        from cmdeploy.segmenter import Segmenter
        from cmdeploy.serve.app import create_app
        from cmdeploy.serve.catalog import Catalog

        if output.exists() and not output.is_dir():
            raise InputError(f"--output '{output}' exists and is not a folder")
        logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
        catalog = Catalog(data)
        if not len(catalog):
            raise InputError(f"--data '{data}': no readable CT series (DICOM CT folders, .nii/.nii.gz)")
        seg = Segmenter.load(model, threads=threads, batch_size=batch_size)
        app = create_app(
            catalog,
            seg,
            output,
            token=token,
            max_body_bytes=int(max_body_mb * 1024 * 1024),
            max_wait_ms=max_wait_ms,
        )
        shown = f"[{host}]" if ":" in host else host
        err.print(f"cmdeploy serve: {len(catalog)} series, model {seg.model_path.name}")
        err.print(f"open http://{shown}:{port}/" + ("#token=<your token>" if token else ""))
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
