"""Triton client back end: a fused-model runner whose model runs on a Triton Inference Server.

:class:`TritonRunner` speaks the fused contract (inputs ``slices`` (B, H, W) HU and ``points``
(B, 4, 2); output ``probabilities`` (B, H, W) float32), which both ``cmdeploy triton`` (PyTriton,
CPU) and the repository of ``cmdeploy export --fused --triton-repo`` (onnxruntime/TensorRT backends,
GPU) serve. Under a :class:`~cmdeploy.segmenter.Segmenter` it behaves like a local fused model:
:func:`connect_segmenter` returns one, so the batched pipeline, the threshold and every writer are
the same as for a local run; only the model call crosses the network.

URLs: ``HOST:PORT`` or ``http://HOST:PORT`` (HTTP/REST), ``grpc://HOST:PORT`` (gRPC).
``tritonclient`` is imported lazily (``[triton]`` extra). Every failure (server down, timeout,
refused request) is a :class:`~cmdeploy.errors.ModelError` naming the server and the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy.errors import InputError, ModelError
from cmdeploy.segmenter import FUSED_INPUTS, Segmenter
from cmdeploy.spec import METADATA_KEY, ModelSpec

OUTPUT = "probabilities"
PARAM_MODEL_FILE = "cmdeploy.model_file"
PARAM_MODEL_SHA256 = "cmdeploy.model_sha256"
SETUP_TIMEOUT_S = 10.0  # connecting and reading the model config
_WIRE_DTYPES = {"FP32": np.float32, "INT16": np.int16}


def parse_url(url: str) -> tuple[str, str]:
    """``(protocol, "host:port")`` of a server address; :class:`InputError` when malformed."""
    text = url.strip()
    protocol = "http"
    for scheme in ("grpc", "http"):
        if text.lower().startswith(f"{scheme}://"):
            protocol, text = scheme, text[len(scheme) + 3 :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or "/" in text or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(
            f"Triton address must be HOST:PORT, http://HOST:PORT or grpc://HOST:PORT, got {url!r}"
        )
    return protocol, text


def _reason(exc: BaseException) -> str:
    """A one-line reason from a tritonclient error (server-side Python tracebacks cut to the last line)."""
    msg = getattr(exc, "message", None)
    text = (msg() if callable(msg) else None) or str(exc) or type(exc).__name__
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


class TritonRunner:
    """One Triton model as a :class:`~cmdeploy.backends.base.Runner` with the fused interface
    (``run({"slices", "points"}) -> {"probabilities": (B, H, W)}``).

    Args:
        url: server address (see :func:`parse_url`).
        model_name: Triton model name.
        timeout_s: network timeout of one request, seconds.

    Raises :class:`ModelError` when the server cannot be reached, the model is not ready or does
    not have the fused interface and a cmdeploy spec.
    """

    backend = "triton"
    input_names = list(FUSED_INPUTS)
    output_names = [OUTPUT]

    def __init__(self, url: str, *, model_name: str = "cmdeploy", timeout_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise InputError(f"timeout must be > 0 s, got {timeout_s}")
        self.protocol, self.address = parse_url(url)
        self.url = f"{self.protocol}://{self.address}"
        self.model_name = model_name
        self.timeout_s = float(timeout_s)
        try:
            if self.protocol == "grpc":
                import tritonclient.grpc as tc
            else:
                import tritonclient.http as tc
        except ImportError:
            raise InputError("a Triton server needs tritonclient: pip install 'cmdeploy[triton]'") from None
        self._tc = tc
        setup = max(self.timeout_s, SETUP_TIMEOUT_S)  # set-up calls; inference gets timeout_s
        kw = {"client_timeout": setup} if self.protocol == "grpc" else {}
        try:
            if self.protocol == "grpc":
                self._client = tc.InferenceServerClient(self.address)
            else:
                self._client = tc.InferenceServerClient(
                    self.address, connection_timeout=setup, network_timeout=setup
                )
            ready = self._client.is_model_ready(model_name, **kw)
        except Exception as exc:
            raise ModelError(f"cannot reach the Triton server at {self.url}: {_reason(exc)}") from None
        if not ready:
            raise ModelError(f"Triton server at {self.url} has no ready model {model_name!r}")
        try:
            meta = self._client.get_model_metadata(model_name, **kw)
            config = self._client.get_model_config(model_name, **kw)
        except Exception as exc:
            raise ModelError(
                f"Triton server at {self.url}: cannot read model {model_name!r}: {_reason(exc)}"
            ) from None
        if self.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            meta = MessageToDict(meta, preserving_proto_field_name=True)
            config = MessageToDict(config.config, preserving_proto_field_name=True)
        self._init_from(meta, config)
        if self.protocol == "http" and self.timeout_s < SETUP_TIMEOUT_S:
            self._client.close()
            self._client = tc.InferenceServerClient(
                self.address, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
            )

    def _init_from(self, meta: dict[str, Any], config: dict[str, Any]) -> None:
        where = f"Triton model {self.model_name!r} at {self.url}"
        inputs = {t["name"]: t for t in meta.get("inputs", [])}
        outputs = {t["name"] for t in meta.get("outputs", [])}
        if set(inputs) != set(FUSED_INPUTS) or OUTPUT not in outputs:
            raise ModelError(
                f"{where} is not a fused cmdeploy model: inputs {sorted(inputs)}, outputs {sorted(outputs)} "
                f"(need inputs {list(FUSED_INPUTS)} and output {OUTPUT!r})"
            )
        wire = inputs["slices"]["datatype"]
        if wire not in _WIRE_DTYPES or inputs["points"]["datatype"] != "FP32":
            raise ModelError(
                f"{where}: unsupported input types slices={wire}, points={inputs['points']['datatype']}"
            )
        self.slice_dtype = _WIRE_DTYPES[wire]
        self._slice_wire = wire
        self.max_batch_size = int(config.get("max_batch_size", 0))
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        if METADATA_KEY not in params:
            raise ModelError(f"{where} publishes no cmdeploy spec (model-config parameter {METADATA_KEY!r})")
        try:
            self.spec = ModelSpec.from_dict(json.loads(params[METADATA_KEY]))
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{where}: bad cmdeploy spec: {exc}") from None
        self.model_file = params.get(PARAM_MODEL_FILE) or self.model_name
        self.model_sha256 = params.get(PARAM_MODEL_SHA256) or None

    @property
    def input_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Batch axis first; H and W are free (the fused contract)."""
        return {"slices": (None, None, None), "points": (None, 4, 2)}

    @property
    def batch_range(self) -> tuple[int, int | None]:
        """``(1, the server's max_batch_size)`` (None when the model does not batch)."""
        return 1, (self.max_batch_size or None)

    def _slices(self, slices: np.ndarray) -> np.ndarray:
        if self.slice_dtype == np.float32:
            return np.ascontiguousarray(slices, dtype=np.float32)
        wire = np.rint(slices)
        if not np.array_equal(wire, slices) or wire.min() < -32768 or wire.max() > 32767:
            raise InputError(
                f"{self.url} takes int16 slices, but these HU values are not whole numbers in int16 range"
            )
        return np.ascontiguousarray(wire, dtype=np.int16)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send one request (B objects) and return ``{"probabilities": (B, H, W) float32}``."""
        slices = self._slices(np.asarray(feeds["slices"]))
        points = np.ascontiguousarray(feeds["points"], dtype=np.float32)
        tc = self._tc
        a = tc.InferInput("slices", list(slices.shape), self._slice_wire)
        b = tc.InferInput("points", list(points.shape), "FP32")
        if self.protocol == "http":
            a.set_data_from_numpy(slices, binary_data=True)
            b.set_data_from_numpy(points, binary_data=True)
            outs = [tc.InferRequestedOutput(OUTPUT, binary_data=True)]
        else:
            a.set_data_from_numpy(slices)
            b.set_data_from_numpy(points)
            outs = [tc.InferRequestedOutput(OUTPUT)]
        try:
            if self.protocol == "grpc":
                result = self._client.infer(
                    self.model_name, [a, b], outputs=outs, client_timeout=self.timeout_s
                )
            else:
                result = self._client.infer(self.model_name, [a, b], outputs=outs)
        except Exception as exc:
            raise ModelError(
                f"Triton server at {self.url} failed a request of {len(slices)} object(s): {_reason(exc)}"
            ) from None
        probs = result.as_numpy(OUTPUT)
        if probs is None or probs.shape != slices.shape:
            got = None if probs is None else probs.shape
            raise ModelError(
                f"Triton server at {self.url} returned {OUTPUT} of shape {got}, expected {slices.shape}"
            )
        return {OUTPUT: probs.astype(np.float32, copy=False)}

    def close(self) -> None:
        """Close the connection (idempotent)."""
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing a dead connection is fine
            pass


class TritonSegmenter(Segmenter):
    """A :class:`Segmenter` whose model runs on a Triton server (see :func:`connect_segmenter`)."""

    @property
    def model_sha256(self) -> str | None:  # type: ignore[override]
        """SHA-256 of the model file the server loaded, as it publishes it (None if it does not)."""
        return self._runner.model_sha256


def connect_segmenter(
    url: str, *, model_name: str = "cmdeploy", batch_size: int = 16, timeout_s: float = 60.0
) -> TritonSegmenter:
    """A :class:`Segmenter` for the Triton model ``model_name`` at ``url``; batches are capped by
    the server's ``max_batch_size``."""
    runner = TritonRunner(url, model_name=model_name, timeout_s=timeout_s)
    if runner.max_batch_size > 0:
        batch_size = min(batch_size, runner.max_batch_size)
    return TritonSegmenter(
        runner,
        runner.spec,
        model_path=Path(runner.model_file),
        backend=f"triton ({runner.url})",
        batch_size=batch_size,
    )
