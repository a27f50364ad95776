"""The FastAPI app: :func:`create_app` wires the routes, the page, auth, limits and JSON errors.

* ``/`` serves the annotation page (``static/``; no CDN, no network fetch: a Content-Security-Policy
  of ``'self'`` enforces it); ``POST /`` is the CVAT interactor (CVAT posts to a function's root).
* ``/api/v1/...``: :mod:`cmdeploy.serve.api`; OpenAPI at ``/openapi.json`` and ``/docs``.
* With a ``token`` every ``/api/`` call and ``POST /`` needs ``Authorization: Bearer <token>``
  (the page reads it from the URL fragment ``#token=...``, which browsers never send or log).
  Without one (loopback only) every request must name a loopback ``Host`` (403 otherwise), so a web
  page elsewhere cannot reach the server through DNS rebinding.
* Bodies over ``max_body_bytes`` get 413; bad input 400/404/422, all as ``{"error": "..."}``;
  anything unexpected 500 ``{"error": "internal error"}`` with its type logged, never a traceback
  or a patient identifier.
"""

from __future__ import annotations

import hmac
import logging
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from cmdeploy import __version__
from cmdeploy.errors import InputError, ModelError
from cmdeploy.serve import api
from cmdeploy.serve.batching import MicroBatcher
from cmdeploy.serve.catalog import Catalog
from cmdeploy.serve.store import ObjectStore

log = logging.getLogger("cmdeploy.serve")
DEFAULT_MAX_BODY = 16 * 1024 * 1024
CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


# libraries whose log records quote DICOM attributes (highdicom logs each source SOPInstanceUID at INFO
# while building a SEG); the server's own problems reach the client as JSON instead
QUIET_LOGGERS = ("highdicom", "pydicom")


def quiet_identifier_loggers() -> None:
    """Silence :data:`QUIET_LOGGERS` (process-wide): no patient identifier may reach the logs."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def static_dir() -> Path:
    """The page's files, shipped as package data."""
    return Path(str(files("cmdeploy.serve") / "static"))


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _error(413, f"request body over {self.limit} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def _host_name(request: Request) -> str:
    host = request.headers.get("host", "")
    return host.rsplit(":", 1)[0] if not host.endswith("]") else host


def _needs_token(request: Request) -> bool:
    path = request.url.path
    return path.startswith("/api/") or (path == "/" and request.method == "POST")


def create_app(
    catalog: Catalog,
    segmenter: Any,
    output: str | Path,
    *,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
    max_wait_ms: float = 2.0,
) -> FastAPI:
    """The server for ``catalog`` with one shared ``segmenter`` (batched), exports into ``output``.

    Also silences the loggers of :data:`QUIET_LOGGERS` (see :func:`quiet_identifier_loggers`)."""
    quiet_identifier_loggers()
    app = FastAPI(
        title="cmdeploy serve",
        version=__version__,
        description="Four clicks -> mask on CT slices; accept, propagate, export DICOM SEG / NIfTI / "
        "points CSV. Points are [x, y] pixels (x = column, y = row). Research use only.",
    )
    batcher = MicroBatcher(segmenter, max_wait_ms=max_wait_ms, max_batch=segmenter.batch_size)
    app.state.cmdeploy = api.ServerState(catalog, batcher, ObjectStore(), Path(output))
    app.router.on_shutdown.append(batcher.close)

    @app.middleware("http")
    async def auth_and_headers(request: Request, call_next: Any) -> Any:
        if not token and _host_name(request).lower() not in LOOPBACK_HOSTS:
            return _error(403, "this server answers loopback host names only (start it with --token)")
        if token and _needs_token(request):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _error(401, "missing or wrong bearer token")
        try:
            response = await call_next(request)
        except Exception as exc:  # never a traceback, in the answer or the log
            log.error("internal error: %s", type(exc).__name__)
            return _error(500, "internal error")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path == "/" or request.url.path.startswith("/static/"):
            response.headers["Content-Security-Policy"] = CSP
        return response

    @app.exception_handler(InputError)
    async def bad_input(_: Request, exc: InputError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(KeyError)
    async def not_found(_: Request, exc: KeyError) -> JSONResponse:
        detail = exc.args[0] if exc.args and isinstance(exc.args[0], str) else "no such object"
        return _error(404, detail)

    @app.exception_handler(IndexError)
    async def bad_index(_: Request, exc: IndexError) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}".strip(": "))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ModelError)
    async def model_error(_: Request, exc: ModelError) -> JSONResponse:
        log.error("model error: %s", type(exc).__name__)
        return _error(500, "model error")

    app.include_router(api.router)

    page = static_dir()

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(page / "index.html", media_type="text/html")

    @app.post("/", summary="CVAT interactor at the root URL (as CVAT invokes a function)")
    def cvat_root(request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return api.cvat_interactor(body, request.app.state.cmdeploy)

    app.mount("/static", StaticFiles(directory=page), name="static")
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app
