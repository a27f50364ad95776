"""Triton Inference Server model repository for a cmdeploy model (ONNX and/or TensorRT plan).

Layout written by :func:`write_triton_repository`::

    <repo>/<name>/config.pbtxt            platform "onnxruntime_onnx"
    <repo>/<name>/<version>/model.onnx
    <repo>/<name>_trt/config.pbtxt        platform "tensorrt_plan"
    <repo>/<name>_trt/<version>/model.plan

Each config declares inputs/outputs with their Triton data types and dims *without* the batch
axis (``max_batch_size`` > 0 makes axis 0 Triton's batch axis), dynamic batching, one instance
group, and as ``parameters`` the cmdeploy model card ``"cmdeploy.spec"`` (JSON), the served file's
name ``"cmdeploy.model_file"`` and SHA-256 ``"cmdeploy.model_sha256"``.

``cmdeploy export --fused --triton-repo`` writes the **fused** model (``require_fused=True``): inputs
``slices`` (B, H, W) HU and ``points`` (B, 4, 2), output ``probabilities`` (B, H, W), so the GPU
server needs no Python and speaks the same contract as ``cmdeploy triton``; the client
(:class:`cmdeploy.backends.triton.TritonRunner`, ``cmdeploy infer --triton``) works with both.
``examples/triton_gpu_check.sh`` loads such a repository in NVIDIA's Triton container and compares
its outputs with the local runtime.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from cmdeploy.engine_sidecar import EngineSidecar, sidecar_path, tensorrt_major_minor
from cmdeploy.errors import InputError
from cmdeploy.hashing import file_sha256
from cmdeploy.spec import METADATA_KEY, ModelSpec
from cmdeploy.writers.atomic import atomic_path, atomic_write_text

_ONNX_TO_TRITON = {
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.FLOAT16: "TYPE_FP16",
    TensorProto.DOUBLE: "TYPE_FP64",
    TensorProto.BFLOAT16: "TYPE_BF16",
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT16: "TYPE_INT16",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.INT64: "TYPE_INT64",
    TensorProto.UINT8: "TYPE_UINT8",
    TensorProto.BOOL: "TYPE_BOOL",
}
_NUMPY_TO_TRITON = {
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "float64": "TYPE_FP64",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "uint8": "TYPE_UINT8",
    "bool": "TYPE_BOOL",
}
FUSED_INPUTS = ("slices", "points")
FUSED_OUTPUT = "probabilities"
PARAM_MODEL_FILE = "cmdeploy.model_file"
PARAM_MODEL_SHA256 = "cmdeploy.model_sha256"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU", "KIND_AUTO")


@dataclass(frozen=True)
class TensorDesc:
    """One model input or output as Triton sees it: dims exclude the batch axis."""

    name: str
    data_type: str
    dims: tuple[int, ...]


def _onnx_dims(vi: onnx.ValueInfoProto) -> list[int]:
    return [
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in vi.type.tensor_type.shape.dim
    ]


def _strip_batch(name: str, dims: Sequence[int], batched: bool, source: str) -> tuple[int, ...]:
    if not batched:
        return tuple(dims)
    if not dims:
        raise InputError(f"{source}: tensor {name!r} is a scalar; it has no batch axis")
    if dims[0] != -1:
        raise InputError(
            f"{source}: tensor {name!r} has a fixed batch size {dims[0]}; Triton batching needs "
            "a dynamic batch axis (export with a dynamic batch, or use max_batch_size=0)"
        )
    return tuple(dims[1:])


def onnx_tensors(
    model: onnx.ModelProto, *, batched: bool, source: str = "ONNX"
) -> tuple[list[TensorDesc], list[TensorDesc]]:
    """(inputs, outputs) of an ONNX model; initializers are not inputs."""
    inits = {i.name for i in model.graph.initializer}

    def desc(vi: onnx.ValueInfoProto) -> TensorDesc:
        elem = vi.type.tensor_type.elem_type
        if elem not in _ONNX_TO_TRITON:
            raise InputError(f"{source}: tensor {vi.name!r} has unsupported type {elem}")
        dims = _strip_batch(vi.name, _onnx_dims(vi), batched, source)
        return TensorDesc(vi.name, _ONNX_TO_TRITON[elem], dims)

    ins = [desc(vi) for vi in model.graph.input if vi.name not in inits]
    outs = [desc(vi) for vi in model.graph.output]
    return ins, outs


def engine_tensors(
    sidecar: EngineSidecar, *, batched: bool, source: str = "engine"
) -> tuple[list[TensorDesc], list[TensorDesc]]:
    """(inputs, outputs) of an engine from its sidecar (input dims from the profile's max)."""
    dtypes = sidecar.io_dtypes

    def ttype(name: str) -> str:
        return _NUMPY_TO_TRITON.get(dtypes.get(name, "float32"), "TYPE_FP32")

    ins = []
    for name, prof in sidecar.input_shapes.items():
        dims = [-1 if lo != hi else hi for lo, hi in zip(prof["min"], prof["max"], strict=True)]
        ins.append(TensorDesc(name, ttype(name), _strip_batch(name, dims, batched, source)))
    outs = []
    for name in sidecar.output_names:
        if name not in sidecar.output_shapes:
            raise InputError(f"{source}: sidecar has no shape for output {name!r}; rebuild it")
        dims = _strip_batch(name, sidecar.output_shapes[name], batched, source)
        outs.append(TensorDesc(name, ttype(name), dims))
    return ins, outs


def check_plan_for_triton(
    sidecar: EngineSidecar, *, batched: bool, tensorrt_version: str | None = None
) -> None:
    """:class:`InputError` when Triton could not serve the plan: another TensorRT major.minor
    than ``tensorrt_version`` (the container's) built it, or (batched) its minimum batch is > 1."""
    if tensorrt_version is not None:
        built = tensorrt_major_minor(sidecar.tensorrt_version)
        serving = tensorrt_major_minor(tensorrt_version)
        if built != serving:
            raise InputError(
                f"the plan was built by TensorRT {sidecar.tensorrt_version}, the Triton container "
                f"runs TensorRT {tensorrt_version}: a plan loads only on the major.minor that built "
                "it; build the engine inside that container (or pick the matching Triton release)"
            )
    if batched and sidecar.batch_range[0] > 1:
        raise InputError(
            f"the plan's profile starts at batch {sidecar.batch_range[0]}; Triton's dynamic batcher "
            "sends batches from 1 up: rebuild the engine with --min-batch 1"
        )


@dataclass(frozen=True)
class _Job:
    name: str
    platform: str
    file_name: str
    source: Path
    inputs: list[TensorDesc]
    outputs: list[TensorDesc]
    max_batch_size: int
    instance_kind: str
    spec: ModelSpec | None


def _q(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # JSON string literal = text-format string


def _tensor_block(key: str, tensors: Sequence[TensorDesc]) -> list[str]:
    lines = [f"{key} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        lines += [
            "  {",
            f"    name: {_q(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if i < len(tensors) - 1 else ""),
        ]
    lines.append("]")
    return lines


def render_config(
    name: str,
    platform: str,
    inputs: Sequence[TensorDesc],
    outputs: Sequence[TensorDesc],
    *,
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int],
    max_queue_delay_us: int,
    instance_count: int,
    instance_kind: str,
    spec: ModelSpec | None,
    parameters: dict[str, str] | None = None,
) -> str:
    """The ``config.pbtxt`` text (protobuf text format of Triton's ``ModelConfig``)."""
    lines = [
        f"name: {_q(name)}",
        f"platform: {_q(platform)}",
        f"max_batch_size: {max_batch_size}",
    ]
    lines += _tensor_block("input", inputs)
    lines += _tensor_block("output", outputs)
    if max_batch_size > 0:
        lines.append("dynamic_batching {")
        if preferred_batch_sizes:
            sizes = ", ".join(str(b) for b in preferred_batch_sizes)
            lines.append(f"  preferred_batch_size: [ {sizes} ]")
        lines += [f"  max_queue_delay_microseconds: {max_queue_delay_us}", "}"]
    lines += [
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    params = dict(parameters or {})
    if spec is not None:
        params[METADATA_KEY] = json.dumps(spec.to_dict(), sort_keys=True)
    for key in sorted(params):
        lines += [
            "parameters {",
            f"  key: {_q(key)}",
            f"  value: {{ string_value: {_q(params[key])} }}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def write_triton_repository(
    repo_dir: str | Path,
    model_name: str,
    *,
    onnx_path: str | Path | None = None,
    engine_path: str | Path | None = None,
    max_batch_size: int = 32,
    preferred_batch_sizes: Sequence[int] = (4, 8, 16),
    max_queue_delay_us: int = 500,
    instance_count: int = 1,
    version: int = 1,
    onnx_instance_kind: str = "KIND_GPU",
    tensorrt_version: str | None = None,
    require_fused: bool = False,
) -> dict[str, Path]:
    """Write Triton model folders; returns ``{triton model name: model folder}``.

    Args:
        repo_dir: model repository root (created if missing).
        model_name: Triton name of the ONNX model; the TensorRT plan is ``<model_name>_trt``.
        onnx_path: cmdeploy ONNX model -> ``<name>/<version>/model.onnx``.
        engine_path: TensorRT engine with its sidecar -> ``<name>_trt/<version>/model.plan``.
        max_batch_size: Triton's batch limit (0: no batching; dims then include axis 0). For a
            plan it is capped by the engine's profile maximum.
        preferred_batch_sizes: dynamic batcher's preferred sizes (each <= max_batch_size).
        max_queue_delay_us: how long the dynamic batcher may wait to fill a batch.
        instance_count: model instances per device.
        version: numeric version folder.
        onnx_instance_kind: instance kind of the ONNX model (the plan is always ``KIND_GPU``).
        tensorrt_version: TensorRT version of the Triton container that will serve the plan; its
            major.minor must equal the sidecar's (a plan only loads on the release that built it).
        require_fused: refuse models without the fused interface (inputs ``slices`` (B, H, W) and
            ``points`` (B, 4, 2), output ``probabilities`` (B, H, W)).

    A plan whose profile's minimum batch is above 1 is refused when batching: Triton's dynamic
    batcher sends any batch from 1 up, and the engine would reject the small ones at run time.
    """
    if onnx_path is None and engine_path is None:
        raise InputError("write_triton_repository needs onnx_path, engine_path or both")
    if not _NAME_RE.match(model_name):
        raise InputError(f"model name {model_name!r} may only use letters, digits, '_', '-', '.'")
    if max_batch_size < 0:
        raise InputError(f"max_batch_size must be >= 0, got {max_batch_size}")
    bad = [b for b in preferred_batch_sizes if not 1 <= b <= max(max_batch_size, 1)]
    if max_batch_size > 0 and bad:
        raise InputError(
            f"preferred_batch_sizes {list(preferred_batch_sizes)} must lie in 1..{max_batch_size}"
        )
    if max_queue_delay_us < 0 or instance_count < 1 or version < 1:
        raise InputError(
            "need max_queue_delay_us >= 0, instance_count >= 1 and version >= 1, got "
            f"{max_queue_delay_us}, {instance_count}, {version}"
        )
    if onnx_instance_kind not in INSTANCE_KINDS:
        raise InputError(f"onnx_instance_kind must be one of {INSTANCE_KINDS}")

    repo = Path(repo_dir)
    batched = max_batch_size > 0
    jobs: list[_Job] = []
    if onnx_path is not None:
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise InputError(f"ONNX model {onnx_path} not found")
        model = onnx.load(str(onnx_path), load_external_data=False)
        if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
            raise InputError(f"{onnx_path} stores weights externally; save it as one file first")
        meta = {p.key: p.value for p in model.metadata_props}
        ins, outs = onnx_tensors(model, batched=batched, source=str(onnx_path))
        jobs.append(
            _Job(
                name=model_name,
                platform="onnxruntime_onnx",
                file_name="model.onnx",
                source=onnx_path,
                inputs=ins,
                outputs=outs,
                max_batch_size=max_batch_size,
                instance_kind=onnx_instance_kind,
                spec=ModelSpec.from_metadata(meta) if METADATA_KEY in meta else None,
            )
        )
    if engine_path is not None:
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise InputError(f"TensorRT engine {engine_path} not found")
        sidecar = EngineSidecar.read(sidecar_path(engine_path))
        check_plan_for_triton(sidecar, batched=batched, tensorrt_version=tensorrt_version)
        ins, outs = engine_tensors(sidecar, batched=batched, source=str(engine_path))
        jobs.append(
            _Job(
                name=f"{model_name}_trt",
                platform="tensorrt_plan",
                file_name="model.plan",
                source=engine_path,
                inputs=ins,
                outputs=outs,
                max_batch_size=min(max_batch_size, sidecar.batch_range[2]) if batched else 0,
                instance_kind="KIND_GPU",
                spec=sidecar.model_spec,
            )
        )

    if require_fused:
        for job in jobs:
            check_fused_interface(job.inputs, job.outputs, batched=batched, source=str(job.source))

    written: dict[str, Path] = {}
    for job in jobs:
        model_dir = repo / job.name
        version_dir = model_dir / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(version_dir / job.file_name) as tmp:
            shutil.copyfile(job.source, tmp)
        text = render_config(
            job.name,
            job.platform,
            job.inputs,
            job.outputs,
            max_batch_size=job.max_batch_size,
            preferred_batch_sizes=[b for b in preferred_batch_sizes if b <= job.max_batch_size],
            max_queue_delay_us=max_queue_delay_us,
            instance_count=instance_count,
            instance_kind=job.instance_kind,
            spec=job.spec,
            parameters={PARAM_MODEL_FILE: job.source.name, PARAM_MODEL_SHA256: file_sha256(job.source)},
        )
        atomic_write_text(model_dir / "config.pbtxt", text)
        written[job.name] = model_dir
    return written


def check_fused_interface(
    inputs: Sequence[TensorDesc], outputs: Sequence[TensorDesc], *, batched: bool, source: str
) -> None:
    """:class:`InputError` unless the tensors are the fused contract: ``slices`` (H, W) and
    ``points`` (4, 2) in, ``probabilities`` (H, W) out, all FP32 (dims without the batch axis when
    ``batched``)."""
    lead = () if batched else (-1,)
    want_in = {"slices": (*lead, -1, -1), "points": (*lead, 4, 2)}
    got_in = {t.name: t for t in inputs}
    got_out = {t.name: t for t in outputs}
    problems = []
    if set(got_in) != set(FUSED_INPUTS):
        problems.append(f"inputs {sorted(got_in)} (need {list(FUSED_INPUTS)})")
    if FUSED_OUTPUT not in got_out:
        problems.append(f"outputs {sorted(got_out)} (need {FUSED_OUTPUT!r})")
    for name, dims in want_in.items():
        t = got_in.get(name)
        if t is not None and (
            t.data_type != "TYPE_FP32"
            or len(t.dims) != len(dims)
            or any(w != -1 and d != w for d, w in zip(t.dims, dims, strict=True))
        ):
            problems.append(f"{name} is {t.data_type} {list(t.dims)} (need TYPE_FP32 {list(dims)})")
    out = got_out.get(FUSED_OUTPUT)
    if out is not None and (out.data_type != "TYPE_FP32" or len(out.dims) != len(lead) + 2):
        problems.append(f"{FUSED_OUTPUT} is {out.data_type} {list(out.dims)} (need TYPE_FP32 (H, W))")
    if problems:
        raise InputError(
            f"{source} is not a fused cmdeploy model (export it with --fused): " + "; ".join(problems)
        )
