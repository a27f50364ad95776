"""Serve a cmdeploy model on a real Triton Inference Server through PyTriton (``[triton]`` extra).

The Triton model (default name ``cmdeploy``) has the **fused** interface, so a client sees the same
contract whether it talks to this server (CPU, Python backend) or to the repository written by
``cmdeploy export --triton-repo`` (GPU, onnxruntime/TensorRT backends):

* inputs ``slices`` (B, H, W) raw HU, float32 (or int16 with ``slice_dtype="int16"``), and
  ``points`` (B, 4, 2) float32 extreme points, order left, right, top, bottom, each
  (x = column, y = row) in slice pixels; B is Triton's batch axis, H and W are free;
* outputs ``probabilities`` (B, H, W) float32 and ``masks`` (B, H, W) bool
  (:meth:`Segmenter.to_mask`: the threshold, then the spec's post-processing); a client asks for
  the ones it wants.

Every request goes through :meth:`cmdeploy.Segmenter.predict_batch` (the one preprocessing, the
one threshold): the requests the dynamic batcher merged are segmented together, so a batch of 16
single-object requests costs one batch-16 model call. The model card (:class:`~cmdeploy.spec.ModelSpec`
JSON), the model file's name and SHA-256 are published as model-config parameters
(``cmdeploy.spec``, ``cmdeploy.model_file``, ``cmdeploy.model_sha256``) for clients.

PyTriton starts ``tritonserver`` (bundled in the wheel) as a child process whose Python backend stub
must load the same libpython as this interpreter: :func:`stub_library_env` puts this Python's
``LIBDIR`` first on ``LD_LIBRARY_PATH`` (a pyenv Python otherwise dies in the stub with
``'_thread.RLock' object has no attribute '_recursion_count'``). With several instances, PyTriton
0.7's stubs fetch their configuration from a handshake socket that can refuse them while the server
starts under CPU load; such a start is stopped and tried again (:func:`handshake_race`).
"""

from __future__ import annotations

import json
import os
import signal
import sysconfig
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy.errors import InputError, ModelError
from cmdeploy.segmenter import Segmenter

MODEL_NAME = "cmdeploy"
OUTPUTS = ("probabilities", "masks")
SLICE_DTYPES = {"float32": np.float32, "int16": np.int16}
START_ATTEMPTS = 3  # server starts tried when PyTriton's instance handshake races (handshake_race)
PARAM_SPEC = "cmdeploy.spec"  # = cmdeploy.spec.METADATA_KEY, the key export/triton.py writes too
PARAM_MODEL_FILE = "cmdeploy.model_file"
PARAM_MODEL_SHA256 = "cmdeploy.model_sha256"


def stub_library_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default ``os.environ``) with this interpreter's ``LIBDIR`` first on
    ``LD_LIBRARY_PATH`` when Python is built as a shared library (pyenv, distro Pythons); unchanged
    otherwise. Returns a new dict."""
    env = dict(os.environ if environ is None else environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    if not libdir or not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return env
    parts = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if parts[:1] != [libdir]:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *[p for p in parts if p != libdir]])
    return env


@dataclass(frozen=True)
class ServerConfig:
    """How to serve: model (None = the embedded default), bind address and the three ports (1..65535,
    distinct), model instances, dynamic batching (sizes in objects, delay in microseconds),
    onnxruntime threads per instance (None = cores // instances, at least 1) and the wire type of
    ``slices``. Two instances of one thread each served 16 clients fastest on 2 cores (one
    instance's NumPy pre/post-processing overlaps the other's model call; docs/results.md)."""

    model: Path | None = None
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 2
    max_batch_size: int = 16
    preferred_batch_sizes: tuple[int, ...] = (16,)
    max_queue_delay_us: int = 2000
    threads: int | None = None
    slice_dtype: str = "float32"
    model_name: str = MODEL_NAME
    log_verbose: int = 0

    def check(self) -> None:
        """:class:`InputError` for impossible settings (before any model or server starts)."""
        ports = {"http": self.http_port, "grpc": self.grpc_port, "metrics": self.metrics_port}
        for name, port in ports.items():
            if not 1 <= port <= 65535:
                raise InputError(f"--{name}-port must be in 1..65535, got {port}")
        if len(set(ports.values())) != 3:
            raise InputError(f"HTTP, gRPC and metrics ports must differ, got {ports}")
        if self.instances < 1:
            raise InputError(f"--instances must be >= 1, got {self.instances}")
        if self.max_batch_size < 1:
            raise InputError(f"--max-batch-size must be >= 1, got {self.max_batch_size}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise InputError(
                f"preferred batch sizes {list(self.preferred_batch_sizes)} must lie in "
                f"1..{self.max_batch_size}"
            )
        if self.max_queue_delay_us < 0:
            raise InputError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        if self.slice_dtype not in SLICE_DTYPES:
            raise InputError(
                f"--slice-dtype must be one of {', '.join(SLICE_DTYPES)}, got {self.slice_dtype!r}"
            )
        if self.model is not None and not Path(self.model).is_file():
            raise InputError(f"--model {self.model} not found")


@dataclass
class InferFunction:
    """The PyTriton inference callable of one model instance: a list of requests in, one dict of
    requested outputs per request out (both when none are named). All objects of all requests go through one
    :meth:`Segmenter.predict_batch` call (validated there; a bad request fails its batch with the
    reason, the server keeps serving)."""

    segmenter: Segmenter
    calls: int = field(default=0, init=False)

    def __call__(self, requests: Sequence[Any]) -> list[dict[str, np.ndarray]]:
        self.calls += 1
        slices: list[np.ndarray] = []
        points: list[np.ndarray] = []
        counts: list[int] = []
        for r, req in enumerate(requests):
            s, p = np.asarray(req["slices"]), np.asarray(req["points"])
            if s.ndim != 3 or p.shape != (len(s), 4, 2):
                raise InputError(
                    f"request {r}: need slices (B, H, W) and points (B, 4, 2) with the same B, "
                    f"got {s.shape} and {p.shape}"
                )
            slices.extend(s)
            points.extend(p)
            counts.append(len(s))
        if not all(counts):
            raise InputError("empty request: B must be >= 1")
        probs = self.segmenter.predict_batch(slices, points, return_probabilities=True)
        out, a = [], 0
        for req, n in zip(requests, counts, strict=True):
            p = np.stack(probs[a : a + n]).astype(np.float32, copy=False)
            wanted = set(getattr(req, "requested_output_names", None) or OUTPUTS)
            response = {}
            if "probabilities" in wanted:
                response["probabilities"] = p
            if "masks" in wanted:  # the one probabilities -> mask step (threshold, post-processing)
                response["masks"] = np.stack([self.segmenter.to_mask(p[j], points[a + j]) for j in range(n)])
            a += n
            out.append(response)
        return out


def instance_threads(config: ServerConfig) -> int:
    """onnxruntime threads of each instance: ``config.threads``, else the cores shared out."""
    return config.threads or max(1, (os.cpu_count() or 1) // config.instances)


def load_segmenter(config: ServerConfig) -> Segmenter:
    """The instance's :class:`Segmenter` (``batch_size`` = the server's largest batch)."""
    return Segmenter.load(config.model, threads=instance_threads(config), batch_size=config.max_batch_size)


def _publish_parameters(triton: Any, model_name: str, params: dict[str, str]) -> None:
    """Add string parameters to the bound model's Triton config (PyTriton has no public hook for
    model-config ``parameters``; it keeps its own there, which are left as they are)."""
    for model in triton._model_manager.models:  # noqa: SLF001 - PyTriton 0.7 internals
        if model.model_name == model_name:
            cfg = model._get_triton_model_config()  # noqa: SLF001 - built once, then cached
            cfg.backend_parameters.update(params)
            return
    raise RuntimeError(f"PyTriton did not register model {model_name!r}")


def serve(
    config: ServerConfig,
    *,
    on_ready: Callable[[dict[str, str]], None] | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Load ``config.instances`` segmenters, start Triton and serve until interrupted (SIGINT/SIGTERM).

    ``on_ready`` gets the endpoint URLs once the model is loaded and Triton answers ready. Returns
    after SIGINT/SIGTERM (handled when called from the main thread) with Triton stopped. Raises
    :class:`InputError` (settings), :class:`~cmdeploy.errors.ModelError` (model; or the server died
    without being asked to stop) or ``RuntimeError``/``TimeoutError`` (the server could not start).
    """
    config.check()
    stop_requested = _handle_stop_signals()
    os.environ.update(stub_library_env())  # inherited by tritonserver and its Python backend stub

    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    segmenters = [load_segmenter(config) for _ in range(config.instances)]
    first = segmenters[0]
    log(
        f"model: {first.model_path.name} ({'fused' if first.fused else 'plain'}, "
        f"input {first.spec.input_size} px, threshold {first.threshold:g}); {config.instances} instance(s) "
        f"x {instance_threads(config)} onnxruntime thread(s)"
    )
    slice_dtype = SLICE_DTYPES[config.slice_dtype]
    triton_config = TritonConfig(
        http_address=config.host,
        http_port=config.http_port,
        grpc_address=config.host,
        grpc_port=config.grpc_port,
        metrics_address=config.host,
        metrics_port=config.metrics_port,
        allow_metrics=True,
        allow_cpu_metrics=True,
        allow_gpu_metrics=False,
        exit_on_error=True,
        exit_timeout_secs=5,
        log_verbose=config.log_verbose,
    )

    def bind(triton: Any) -> None:
        triton.bind(
            model_name=config.model_name,
            infer_func=[InferFunction(s) for s in segmenters],
            inputs=[
                Tensor(name="slices", dtype=slice_dtype, shape=(-1, -1)),
                Tensor(name="points", dtype=np.float32, shape=(4, 2)),
            ],
            outputs=[
                Tensor(name="probabilities", dtype=np.float32, shape=(-1, -1)),
                Tensor(name="masks", dtype=np.bool_, shape=(-1, -1)),
            ],
            config=ModelConfig(
                max_batch_size=config.max_batch_size,
                batcher=DynamicBatcher(
                    preferred_batch_size=list(config.preferred_batch_sizes),
                    max_queue_delay_microseconds=config.max_queue_delay_us,
                ),
            ),
            strict=True,
        )
        _publish_parameters(
            triton,
            config.model_name,
            {
                PARAM_SPEC: json.dumps(first.spec.to_dict(), sort_keys=True),
                PARAM_MODEL_FILE: first.model_path.name,
                PARAM_MODEL_SHA256: first.model_sha256,
            },
        )

    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    urls = {
        "http": f"http://{host}:{config.http_port}",
        "grpc": f"grpc://{host}:{config.grpc_port}",
        "metrics": f"http://{host}:{config.metrics_port}/metrics",
        "ready": f"http://{host}:{config.http_port}/v2/models/{config.model_name}/ready",
    }
    triton = None
    try:
        triton = _start_triton(lambda: Triton(config=triton_config), bind, log)
        if on_ready is not None:
            on_ready(urls)
        triton.serve(monitoring_period_s=1.0)
    except KeyboardInterrupt:
        stop_requested.set()
    finally:
        if triton is not None:
            triton.stop()
    if not stop_requested.is_set():
        _kill_leftover_stubs(_workspace(triton))
        raise ModelError("the Triton server stopped without being asked to (see its log above)")


def _workspace(triton: Any) -> str:
    """The PyTriton workspace folder, where its tritonserver copy and stub binary live."""
    return str(triton._workspace.path)  # noqa: SLF001 - PyTriton 0.7


def handshake_race(exc: BaseException) -> bool:
    """True when a model instance's Python stub could not fetch its configuration from PyTriton's
    handshake socket while the server started: the first instance creates the socket file before it
    listens, and under CPU load a second instance connects in between (refused) or gives up waiting
    for the file (PyTriton 0.7 waits 1 s). The start can simply be tried again."""
    text = str(exc)
    return "get_config_from_handshake_server" in text and (
        "Connection refused" in text or "ConnectionRefusedError" in text
        or "waiting for config file" in text
    )


def _start_triton(
    make: Callable[[], Any], bind: Callable[[Any], None], log: Callable[[str], None],
    attempts: int = START_ATTEMPTS,
) -> Any:
    """A bound, running PyTriton server: ``make()``, ``bind(triton)``, ``triton.run()``; a start that
    fails on :func:`handshake_race` is stopped (stubs included) and tried again, up to ``attempts``
    times in all; any other failure is raised after the server is stopped."""
    for attempt in range(1, attempts + 1):
        triton = make()
        try:
            bind(triton)
            triton.run()
            return triton
        except BaseException as exc:
            workspace = _workspace(triton)
            triton.stop()
            _kill_leftover_stubs(workspace)
            if attempt < attempts and isinstance(exc, Exception) and handshake_race(exc):
                log(
                    f"Triton start {attempt}/{attempts}: a model instance could not reach PyTriton's "
                    "handshake socket while the server started (a start-up race under CPU load); "
                    "starting again"
                )
                continue
            raise
    raise AssertionError("unreachable")


def _kill_leftover_stubs(workspace: str) -> None:
    """SIGKILL the Python backend stubs of this server's tritonserver (their binary lives in its
    PyTriton workspace), which outlive a tritonserver that crashed; Linux ``/proc`` only."""
    prefix = workspace.encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            exe = cmdline.read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if exe.startswith(prefix) and exe.endswith(b"triton_python_backend_stub"):
            try:
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _handle_stop_signals() -> threading.Event:
    """SIGINT/SIGTERM -> the returned event is set and KeyboardInterrupt is raised in the main
    thread, which PyTriton answers by stopping tritonserver cleanly (main thread only)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return requested

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        requested.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return requested
