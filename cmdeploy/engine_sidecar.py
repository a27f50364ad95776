"""The JSON sidecar that travels beside every TensorRT engine.

A serialized TensorRT engine only runs on the GPU model (compute capability) and the TensorRT
major.minor release that built it, and carries none of cmdeploy's model card. The sidecar
``<engine file name>.json`` (``seg.plan`` -> ``seg.plan.json``) records both, so the runtime can
refuse a foreign engine with a readable message *before* handing the bytes to TensorRT, and can
prepare inputs without the ONNX file.

Pure Python (json, :mod:`cmdeploy.hashing`): importable and testable without TensorRT or a GPU.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cmdeploy.errors import ModelError
from cmdeploy.hashing import file_sha256
from cmdeploy.spec import ModelSpec
from cmdeploy.writers.atomic import atomic_write_text

SIDECAR_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "int8")


class EngineIncompatibleError(ModelError):
    """The engine was built for another GPU or TensorRT release than the one running now."""


def sidecar_path(engine_path: str | Path) -> Path:
    """``<engine>.json`` beside the engine: ``model.plan`` -> ``model.plan.json``."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def utc_now() -> str:
    """Current time as an ISO 8601 UTC string, seconds precision."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _major_minor(version: str) -> tuple[int, int]:
    parts = str(version).strip().split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 else 0
    except ValueError as exc:
        raise ModelError(
            f"cannot read TensorRT version {version!r} (expected 'major.minor...')"
        ) from exc
    return major, minor


def tensorrt_major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string; :class:`ModelError` when unreadable."""
    return _major_minor(version)


def normalise_compute_capability(cc: str | tuple[int, int] | list[int]) -> str:
    """``(8, 6)``, ``[8, 6]``, ``"8.6"``, ``"86"`` or ``"sm_86"`` -> ``"8.6"``."""
    try:
        if isinstance(cc, (tuple, list)):
            if len(cc) == 2:
                return f"{int(cc[0])}.{int(cc[1])}"
        else:
            s = str(cc).strip().lower().removeprefix("sm_")
            if "." in s:
                major, minor = s.split(".", 1)
                return f"{int(major)}.{int(minor)}"
            if s.isdigit() and len(s) >= 2:
                return f"{int(s[:-1])}.{int(s[-1])}"
    except (TypeError, ValueError):
        pass
    raise ModelError(f"cannot read compute capability {cc!r} (expected e.g. '8.6' or (8, 6))")


@dataclass(frozen=True)
class EngineSidecar:
    """What an engine was built from, for, and with.

    Attributes:
        tensorrt_version: full TensorRT version string of the builder (``trt.__version__``).
        gpu_name: CUDA device name of the build GPU (e.g. ``"NVIDIA H100 80GB HBM3"``).
        compute_capability: ``"major.minor"`` of the build GPU.
        onnx_sha256: hex SHA-256 of the ONNX file the engine was built from.
        input_shapes: optimisation profile per input: ``{name: {"min": [...], "opt": [...],
            "max": [...]}}``, full NCHW shapes; axis 0 is the batch axis.
        output_names: engine output tensor names, in network order.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        created: ISO 8601 UTC build time.
        cmdeploy_version: version of cmdeploy that built the engine.
        spec: the model card (:meth:`cmdeploy.spec.ModelSpec.to_dict`) from the ONNX metadata.
        output_shapes: network output shapes, ``-1`` for dynamic axes.
        io_dtypes: NumPy dtype name of every input and output (``"float32"``).
        format: sidecar schema version.
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    onnx_sha256: str
    input_shapes: dict[str, dict[str, list[int]]]
    output_names: list[str]
    precision: str
    created: str
    cmdeploy_version: str
    spec: dict[str, Any]
    output_shapes: dict[str, list[int]] = field(default_factory=dict)
    io_dtypes: dict[str, str] = field(default_factory=dict)
    format: int = SIDECAR_FORMAT

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ModelError(
                f"sidecar precision must be one of {PRECISIONS}, got {self.precision!r}"
            )
        object.__setattr__(
            self, "compute_capability", normalise_compute_capability(self.compute_capability)
        )
        shapes: dict[str, dict[str, list[int]]] = {}
        for name, prof in self.input_shapes.items():
            missing = {"min", "opt", "max"} - set(prof)
            if missing:
                raise ModelError(f"sidecar input {name!r} lacks profile keys {sorted(missing)}")
            shapes[name] = {k: [int(d) for d in prof[k]] for k in ("min", "opt", "max")}
        object.__setattr__(self, "input_shapes", shapes)
        object.__setattr__(self, "output_names", [str(n) for n in self.output_names])

    @property
    def model_spec(self) -> ModelSpec:
        """The :class:`~cmdeploy.spec.ModelSpec` the engine's ONNX carried."""
        return ModelSpec.from_dict(self.spec)

    @property
    def batch_range(self) -> tuple[int, int, int]:
        """(min, opt, max) batch size shared by all inputs' profiles."""
        first = next(iter(self.input_shapes.values()))
        return first["min"][0], first["opt"][0], first["max"][0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, path: str | Path) -> Path:
        """Write as JSON to ``path`` (temp file + rename); returns the path."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, path: str | Path) -> EngineSidecar:
        """Read a sidecar JSON file; :class:`ModelError` names the file and what is wrong."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(
                f"engine sidecar {path} not found: an engine must have its <engine>.json beside "
                "it (written by cmdeploy's engine build); rebuild the engine"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"engine sidecar {path} is not readable JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ModelError(f"engine sidecar {path} must hold a JSON object")
        fmt = data.get("format", SIDECAR_FORMAT)
        if fmt != SIDECAR_FORMAT:
            raise ModelError(
                f"engine sidecar {path} has format {fmt}; this cmdeploy reads format "
                f"{SIDECAR_FORMAT}; rebuild the engine"
            )
        known = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        missing = required - set(data)
        if missing:
            raise ModelError(f"engine sidecar {path} lacks keys {sorted(missing)}")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"engine sidecar {path} is malformed: {exc}") from exc

    def matches_onnx(self, onnx_path: str | Path) -> bool:
        """True when ``onnx_path`` is byte-identical to the ONNX the engine was built from."""
        return file_sha256(onnx_path) == self.onnx_sha256


def check_compatible(
    sidecar: EngineSidecar,
    *,
    tensorrt_version: str,
    gpu_name: str,
    compute_capability: str | tuple[int, int],
) -> None:
    """Raise :class:`EngineIncompatibleError` unless the engine can run here.

    Rules: same TensorRT major.minor (patch/build may differ), same compute capability, and the
    same GPU name (case and surrounding blanks ignored). Every mismatch is listed in one message.
    """
    problems = []
    built, running = _major_minor(sidecar.tensorrt_version), _major_minor(tensorrt_version)
    if built != running:
        problems.append(
            f"TensorRT {sidecar.tensorrt_version} built it, TensorRT {tensorrt_version} is "
            f"running (major.minor {built[0]}.{built[1]} != {running[0]}.{running[1]})"
        )
    cc = normalise_compute_capability(compute_capability)
    if cc != sidecar.compute_capability:
        problems.append(
            f"built for compute capability {sidecar.compute_capability}, this GPU has {cc}"
        )
    if gpu_name.strip().lower() != sidecar.gpu_name.strip().lower():
        problems.append(f"built on GPU {sidecar.gpu_name!r}, this GPU is {gpu_name!r}")
    if problems:
        raise EngineIncompatibleError(
            "TensorRT engine cannot run here: "
            + "; ".join(problems)
            + ". Rebuild it on this machine from the ONNX model (cmdeploy.export.tensorrt_build"
            ".build_engine), or use the ONNX model with onnxruntime."
        )
