"""onnxruntime back end: one :class:`OnnxRuntimeRunner` per ONNX file.

``onnxruntime`` is imported inside :meth:`OnnxRuntimeRunner.__init__`, so importing this module (or
``cmdeploy``) stays cheap. The runner implements :class:`cmdeploy.backends.base.Runner`, plus the
model's dtypes and its ``custom_metadata_map`` (where the :class:`~cmdeploy.spec.ModelSpec` lives).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdeploy.backends.base import Feeds, Outputs
from cmdeploy.errors import InputError, ModelError

# onnxruntime type strings -> NumPy dtypes (the ones a cmdeploy model may use at its boundary)
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

DEVICES = ("cpu", "cuda")


def _dim(d: object) -> int | None:
    """A static dimension as int; symbolic or unknown dimensions as None."""
    return d if isinstance(d, int) and d > 0 else None


class OnnxRuntimeRunner:
    """An onnxruntime ``InferenceSession`` for one model file.

    Args:
        model_path: the ``.onnx`` file.
        threads: ``intra_op_num_threads`` (None or 0 = onnxruntime's default: one per core).
        spinning: whether idle intra-op worker threads busy-wait for work
            (``session.intra_op.allow_spinning``); None = onnxruntime's default (on).
        device: ``"cpu"`` (CPUExecutionProvider) or ``"cuda"`` (CUDAExecutionProvider first, CPU as
            fallback for unsupported nodes); ``"cuda"`` raises :class:`ModelError` when this
            onnxruntime build has no CUDA provider.

    Graph optimisation is ``ORT_ENABLE_ALL``; nodes run sequentially (``inter_op_num_threads=1``).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        *,
        threads: int | None = None,
        device: str = "cpu",
        spinning: bool | None = None,
    ):
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise InputError(f"ONNX model {path} not found")
        if device not in DEVICES:
            raise ModelError(f"device must be one of {DEVICES}, got {device!r}")
        if threads is not None and threads < 0:
            raise ModelError(f"threads must be >= 0, got {threads}")
        available = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise ModelError(
                    "device 'cuda' asked for, but this onnxruntime has no CUDAExecutionProvider "
                    f"(available: {', '.join(available)}); install onnxruntime-gpu or use device 'cpu'"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = int(threads or 0)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only
        if spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"onnxruntime cannot load {path}: {exc}") from exc
        self.model_path = path
        self.device = device
        self.providers: list[str] = list(self._session.get_providers())
        ins = self._session.get_inputs()
        outs = self._session.get_outputs()
        self.input_names: list[str] = [i.name for i in ins]
        self.output_names: list[str] = [o.name for o in outs]
        self.input_shapes: dict[str, tuple[int | None, ...]] = {
            i.name: tuple(_dim(d) for d in i.shape) for i in ins
        }
        self.output_shapes: dict[str, tuple[int | None, ...]] = {
            o.name: tuple(_dim(d) for d in o.shape) for o in outs
        }
        self.input_dtypes: dict[str, type] = {i.name: _ORT_DTYPES.get(i.type, np.float32) for i in ins}
        self.metadata: dict[str, str] = dict(self._session.get_modelmeta().custom_metadata_map)

    @property
    def batch_range(self) -> tuple[int, int | None]:
        """A static batch axis on the first input fixes both ends; a dynamic one is (1, None)."""
        shape = self.input_shapes[self.input_names[0]]
        fixed = shape[0] if shape else None
        return (fixed, fixed) if fixed else (1, None)

    def close(self) -> None:
        """Drop the onnxruntime session."""
        self._session = None

    def __enter__(self) -> OnnxRuntimeRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, feeds: Feeds) -> Outputs:
        """Run the model: ``feeds`` maps every input name to an array (cast to the input's dtype)."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ModelError(f"{self.model_path.name}: missing model inputs {sorted(missing)}")
        cast = {n: np.ascontiguousarray(feeds[n], dtype=self.input_dtypes[n]) for n in self.input_names}
        try:
            outs = self._session.run(None, cast)
        except Exception as exc:
            shapes = {n: a.shape for n, a in cast.items()}
            raise ModelError(
                f"onnxruntime failed running {self.model_path.name} on inputs {shapes}: {exc}"
            ) from exc
        return dict(zip(self.output_names, outs, strict=True))
