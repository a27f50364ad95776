"""TensorRT engine runner (TensorRT 10 and 11 name-based I/O API), torch-free and pycuda-free.

``TensorRTRunner(engine_path)`` reads the engine's JSON sidecar, refuses an engine built for
another GPU or TensorRT release (:func:`cmdeploy.engine_sidecar.check_compatible`), deserialises
it and runs batches of any size: inputs larger than the optimisation profile's maximum batch are
split into chunks (:func:`cmdeploy.backends.base.run_chunked`), each bound with
``set_input_shape``; the runner implements :class:`cmdeploy.backends.base.Runner`. Device memory
and the CUDA stream come from ``polygraphy.cuda`` (``DeviceArray``, ``Stream``); the GPU's name and
compute capability from cuda-python (``cuda.bindings.runtime``), with a ctypes fallback on the CUDA runtime.

``tensorrt``, ``polygraphy`` and ``cuda`` are imported when a runner is built, never at import
time, so this module imports on machines without a GPU. Install them with
``pip install 'cmdeploy[trt]'``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from cmdeploy.backends.base import Feeds, Outputs, run_chunked
from cmdeploy.engine_sidecar import EngineSidecar, check_compatible, sidecar_path
from cmdeploy.errors import InputError, ModelError
from cmdeploy.spec import ModelSpec

TRT_INSTALL_HINT = "pip install 'cmdeploy[trt]' (needs an NVIDIA GPU and its driver)"

# cudaDeviceAttr values (CUDA runtime API), used by the ctypes fallback
_ATTR_CC_MAJOR = 75
_ATTR_CC_MINOR = 76


def import_tensorrt() -> ModuleType:
    """Import ``tensorrt`` or raise :class:`ModelError` naming the ``trt`` extra."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        raise ModelError(
            f"TensorRT not installed: cannot import the 'tensorrt' Python package ({exc}). "
            f"Install the TensorRT extra: {TRT_INSTALL_HINT}, or use the ONNX model with the "
            "onnxruntime backend."
        ) from exc
    return trt


def _import_polygraphy_cuda() -> ModuleType:
    try:
        from polygraphy import cuda
    except ImportError as exc:
        raise ModelError(
            f"polygraphy is needed for TensorRT device buffers ({exc}); {TRT_INSTALL_HINT}"
        ) from exc
    return cuda


def cuda_device_info(device: int = 0) -> tuple[str, str]:
    """(name, ``"major.minor"`` compute capability) of CUDA device ``device``."""
    cudart: Any = None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        err, prop = cudart.cudaGetDeviceProperties(device)
        if int(err) != 0:
            raise ModelError(
                f"CUDA device {device} is not available (cudaGetDeviceProperties: {err})"
            )
        name = prop.name
        if isinstance(name, (bytes, bytearray)):
            name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
        return str(name).strip(), f"{int(prop.major)}.{int(prop.minor)}"
    return _cuda_device_info_ctypes(device)


def _cuda_device_info_ctypes(device: int) -> tuple[str, str]:
    """Fallback without cuda-python: the CUDA runtime library polygraphy already loads."""
    from polygraphy.cuda.cuda import wrapper

    lib = wrapper().handle
    major, minor = ctypes.c_int(), ctypes.c_int()
    for attr, out in ((_ATTR_CC_MAJOR, major), (_ATTR_CC_MINOR, minor)):
        status = lib.cudaDeviceGetAttribute(ctypes.byref(out), attr, device)
        if status != 0:
            raise ModelError(
                f"CUDA device {device} is not available (cudaDeviceGetAttribute: {status})"
            )
    # cudaDeviceProp starts with char name[256]; the buffer is larger than the whole struct
    prop = ctypes.create_string_buffer(8192)
    try:
        get_props = lib.cudaGetDeviceProperties_v2
    except AttributeError:
        get_props = lib.cudaGetDeviceProperties
    status = get_props(prop, device)
    if status != 0:
        raise ModelError(
            f"CUDA device {device} is not available (cudaGetDeviceProperties: {status})"
        )
    name = prop.raw[:256].split(b"\0", 1)[0].decode("utf-8", "replace")
    return name.strip(), f"{major.value}.{minor.value}"


_TRT_DTYPE_NAMES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "UINT8": "uint8",
    "BOOL": "bool",
}


def _numpy_dtype(trt: ModuleType, trt_dtype: Any) -> np.dtype:
    """NumPy dtype of a TensorRT ``DataType`` (``trt.nptype``, or by member name)."""
    try:
        return np.dtype(trt.nptype(trt_dtype))
    except (AttributeError, TypeError):
        name = getattr(trt_dtype, "name", str(trt_dtype)).rsplit(".", 1)[-1]
        if name not in _TRT_DTYPE_NAMES:
            raise ModelError(f"engine tensor type {trt_dtype} has no NumPy equivalent") from None
        return np.dtype(_TRT_DTYPE_NAMES[name])


def validate_feeds(
    feeds: Mapping[str, Any],
    input_shapes: Mapping[str, Mapping[str, list[int]]],
    dtypes: Mapping[str, np.dtype] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Check ``feeds`` against the engine's inputs; returns (contiguous arrays, batch size).

    Every input must be present (no extras), have the profile's rank, a shared batch size
    (axis 0), and non-batch dimensions inside the profile's [min, max]. Floating inputs are
    cast to the engine's dtype (float32 unless ``dtypes`` says otherwise).
    """
    if not isinstance(feeds, Mapping):
        raise InputError(f"feeds must be a mapping of input name -> array, got {type(feeds)}")
    expected = list(input_shapes)
    missing = [n for n in expected if n not in feeds]
    extra = [n for n in feeds if n not in input_shapes]
    if missing or extra:
        raise InputError(f"engine inputs are {expected}; missing {missing}, unexpected {extra}")
    arrays: dict[str, np.ndarray] = {}
    batch: int | None = None
    for name in expected:
        prof = input_shapes[name]
        lo, hi = prof["min"], prof["max"]
        arr = np.asarray(feeds[name])
        want = np.dtype(dtypes[name]) if dtypes and name in dtypes else np.dtype(np.float32)
        if arr.dtype != want:
            if want.kind == "f" and arr.dtype.kind not in "fiu":
                raise InputError(f"input {name!r} must be numeric, got dtype {arr.dtype}")
            arr = arr.astype(want)
        if arr.ndim != len(lo):
            raise InputError(
                f"input {name!r} must have {len(lo)} dimensions (batch first, profile "
                f"{lo}..{hi}), got shape {arr.shape}"
            )
        for axis in range(1, arr.ndim):
            if not lo[axis] <= arr.shape[axis] <= hi[axis]:
                raise InputError(
                    f"input {name!r} axis {axis} has size {arr.shape[axis]}, the engine accepts "
                    f"{lo[axis]}..{hi[axis]} (shape {arr.shape}, profile max {hi})"
                )
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise InputError(
                f"inputs disagree on the batch size: {name!r} has {arr.shape[0]}, "
                f"{expected[0]!r} has {batch}"
            )
        arrays[name] = np.ascontiguousarray(arr)
    if not batch:
        raise InputError("empty batch: feeds have batch size 0")
    return arrays, batch


class TensorRTRunner:
    """Runs a cmdeploy TensorRT engine; construct with the ``.plan``/``.engine`` path.

    Attributes:
        sidecar: the engine's :class:`~cmdeploy.engine_sidecar.EngineSidecar`.
        spec: the model card (:class:`~cmdeploy.spec.ModelSpec`) the engine was built with.
        input_names, output_names: engine I/O tensor names, in engine order.
        max_batch: largest batch one execution takes; larger batches are chunked.
    """

    def __init__(self, engine_path: str | Path, *, device: int = 0, check: bool = True) -> None:
        path = Path(engine_path)
        if not path.is_file():  # the user's input, before any dependency: as every runner
            raise InputError(f"TensorRT engine {path} not found")
        trt = import_tensorrt()
        cuda = _import_polygraphy_cuda()
        self.engine_path = path
        self.sidecar = EngineSidecar.read(sidecar_path(path))
        self.spec: ModelSpec = self.sidecar.model_spec
        if check:
            gpu_name, cc = cuda_device_info(device)
            check_compatible(
                self.sidecar,
                tensorrt_version=trt.__version__,
                gpu_name=gpu_name,
                compute_capability=cc,
            )
        self._trt = trt
        self._cuda = cuda
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ModelError(
                f"TensorRT could not deserialise {path} (see the TensorRT log above); "
                "rebuild the engine on this machine"
            )
        self._engine = engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise ModelError(f"TensorRT could not create an execution context for {path}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        mode_in = trt.TensorIOMode.INPUT
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == mode_in]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) != mode_in]
        if set(self.input_names) != set(self.sidecar.input_shapes):
            raise ModelError(
                f"engine {path} inputs {self.input_names} do not match its sidecar "
                f"{sorted(self.sidecar.input_shapes)}; rebuild the engine"
            )
        self._dtypes = {n: _numpy_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        lo, _, self.max_batch = self.sidecar.batch_range
        self.batch_range: tuple[int, int | None] = (max(int(lo), 1), int(self.max_batch))
        # dimensions the profile fixes (min == max); None where it lets them vary
        self.input_shapes: dict[str, tuple[int | None, ...]] = {
            n: tuple(a if a == b else None for a, b in zip(p["min"], p["max"], strict=True))
            for n, p in self.sidecar.input_shapes.items()
        }
        self._stream = cuda.Stream()
        self._buffers = {n: cuda.DeviceArray(shape=(0,), dtype=self._dtypes[n]) for n in names}

    def run(self, feeds: Feeds) -> Outputs:
        """Run a batch: ``{input name: (N, ...) array}`` -> ``{output name: (N, ...) array}``."""
        arrays, n = validate_feeds(feeds, self.sidecar.input_shapes, self._dtypes)
        min_batch = self.sidecar.batch_range[0]
        if n < min_batch:
            raise InputError(f"batch size {n} is below the engine's minimum {min_batch}")
        return run_chunked(self._run_once, arrays, self.max_batch)

    def _run_once(self, arrays: Feeds) -> Outputs:
        ctx, stream = self._context, self._stream
        for name in self.input_names:
            host = np.ascontiguousarray(arrays[name])
            if not ctx.set_input_shape(name, host.shape):
                raise ModelError(f"TensorRT rejected shape {host.shape} for input {name!r}")
            buf = self._buffers[name].resize(host.shape)
            buf.copy_from(host, stream)
            ctx.set_tensor_address(name, buf.ptr)
        outputs: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(
                    f"output {name!r} shape {shape} is unresolved after binding inputs"
                )
            buf = self._buffers[name].resize(shape)
            ctx.set_tensor_address(name, buf.ptr)
            outputs[name] = np.empty(shape, dtype=self._dtypes[name])
        if not ctx.execute_async_v3(stream.ptr):
            raise ModelError(f"TensorRT execution of {self.engine_path} failed (see log above)")
        for name, host in outputs.items():
            self._buffers[name].copy_to(host, stream)
        stream.synchronize()
        return outputs

    def close(self) -> None:
        """Free device buffers and the stream (also done by ``with TensorRTRunner(...)``)."""
        for buf in getattr(self, "_buffers", {}).values():
            buf.free()
        self._buffers = {}
        stream = getattr(self, "_stream", None)
        if stream is not None:
            stream.free()
            self._stream = None
        self._context = None
        self._engine = None

    def __enter__(self) -> TensorRTRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
