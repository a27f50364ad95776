"""ONNX -> TensorRT engine (TensorRT 10 and 11), with an optimisation profile for every dynamic axis.

Precision is carried by the graph on both TensorRT generations (strongly typed networks, no
``BuilderFlag.FP16``/``INT8``: deprecated in 10.x, removed in 11; NVIDIA's explicit-quantization
guide builds Q/DQ graphs strongly typed):

* ``fp32``: a float32 graph.
* ``fp16``: an FP16 graph (:func:`cmdeploy.export.fp16.convert_to_fp16`; ``cmdeploy export
  --precision fp16`` writes one).
* ``int8``: a Q/DQ (explicitly quantized) graph from ``cmdeploy calibrate --target tensorrt``.
  A CPU-target INT8 model (uint8, asymmetric) is refused before TensorRT is imported.

An ONNX whose graph already carries FP16 or Q/DQ cannot be labelled ``fp32``.

Profiles: the batch axis (axis 0) from ``min/opt/max_batch``; other dynamic axes by their ONNX
``dim_param`` name from ``axis_ranges`` (default :data:`DEFAULT_AXIS_RANGES`: the fused graph's
``height`` and ``width``, 32 / 512 / 1024 pixels). The sidecar records every input's full
min/opt/max shapes.

Before TensorRT is imported, :func:`build_engine` runs the TensorRT-compatibility lint
(:mod:`cmdeploy.export.trt_lint`) and refuses a model with errors, listing them.

The build writes the engine atomically, then its JSON sidecar (``<engine>.json``, see
:mod:`cmdeploy.engine_sidecar`). The timing cache, when given, is loaded if present and saved
after the build. The pure-Python steps (:func:`plan_build`, :func:`graph_precision`,
:func:`onnx_input_shapes`, :func:`profile_shapes`, :func:`format_parser_errors`) need no TensorRT.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

import cmdeploy
from cmdeploy.backends.tensorrt import cuda_device_info, import_tensorrt
from cmdeploy.engine_sidecar import EngineSidecar, sidecar_path, utc_now
from cmdeploy.errors import InputError, ModelError
from cmdeploy.hashing import file_sha256
from cmdeploy.spec import ModelSpec
from cmdeploy.writers.atomic import atomic_write_bytes

PRECISIONS = ("fp32", "fp16", "int8")
#: profile (min, opt, max) of the fused graph's dynamic slice axes, pixels
DEFAULT_AXIS_RANGES: dict[str, tuple[int, int, int]] = {
    "height": (32, 512, 1024),
    "width": (32, 512, 1024),
}
QDQ_HINT = (
    "run `cmdeploy calibrate --target tensorrt` to produce a Q/DQ (explicitly quantized) ONNX"
)
FP16_HINT = (
    "convert it first (cmdeploy.export.fp16.convert_to_fp16; `cmdeploy export --precision fp16` "
    "does it)"
)

_ONNX_TO_NUMPY = {
    TensorProto.FLOAT: "float32",
    TensorProto.FLOAT16: "float16",
    TensorProto.DOUBLE: "float64",
    TensorProto.INT8: "int8",
    TensorProto.UINT8: "uint8",
    TensorProto.INT32: "int32",
    TensorProto.INT64: "int64",
    TensorProto.BOOL: "bool",
}


@dataclass(frozen=True)
class BuildPlan:
    """How to set up the builder for one TensorRT major version and precision.

    Attributes:
        trt_major: TensorRT major version (10 or 11).
        strongly_typed: create the network with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``
            (always: TensorRT 10 and 11).
        builder_flags: ``trt.BuilderFlag`` member names to set (none: precision is in the graph).
        precision: the precision the engine is labelled with.
    """

    trt_major: int
    strongly_typed: bool
    builder_flags: tuple[str, ...]
    precision: str


def trt_major(version: str) -> int:
    """Major version from a TensorRT version string (``"10.3.0.26"`` -> 10)."""
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise ModelError(f"cannot read TensorRT version {version!r}") from exc


def qdq_node_count(model: onnx.ModelProto) -> int:
    """Number of ``QuantizeLinear`` nodes in the main graph."""
    return sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear")


def has_fp16_tensors(model: onnx.ModelProto) -> bool:
    """True when the graph stores FP16 initializers or casts to FP16 (an FP16 graph)."""
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        return True
    for node in model.graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                    return True
    return False


def graph_precision(model: onnx.ModelProto) -> str:
    """Precision the graph itself carries: ``"int8"`` (Q/DQ), ``"fp16"`` or ``"fp32"``."""
    if qdq_node_count(model):
        return "int8"
    if has_fp16_tensors(model):
        return "fp16"
    return "fp32"


def check_precision_request(
    model: onnx.ModelProto, precision: str, *, source: str = "ONNX"
) -> None:
    """Known precision; the graph carries it: INT8 needs Q/DQ, FP16 an FP16 graph, FP32 neither."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    carried = graph_precision(model)
    if precision == "int8" and carried != "int8":
        raise InputError(
            f"precision='int8' needs QuantizeLinear/DequantizeLinear nodes, and {source} has "
            f"no QuantizeLinear node: {QDQ_HINT}"
        )
    if precision == "fp32" and carried != "fp32":
        raise InputError(
            f"{source} is already a {carried} graph; build it with precision={carried!r}"
        )
    if precision == "fp16" and carried == "int8":
        raise InputError(f"{source} is a Q/DQ (int8) graph; build it with precision='int8'")
    if precision == "fp16" and carried != "fp16":
        raise InputError(
            f"precision='fp16' builds a strongly typed network, so precision comes from the "
            f"graph, and {source} has no FP16 tensors; {FP16_HINT}"
        )


def plan_build(
    trt_version: str, precision: str, model: onnx.ModelProto, *, source: str = "ONNX"
) -> BuildPlan:
    """Validate the graph for ``precision`` on ``trt_version``; every plan is strongly typed.

    TensorRT 10 and 11 alike: no precision builder flags (``BuilderFlag.FP16``/``INT8`` are
    deprecated in 10.x and removed in 11), the graph's types decide - FP16 needs an FP16 graph,
    INT8 a Q/DQ graph.

    Raises:
        InputError: the request cannot be met by this graph.
        ModelError: TensorRT older than 10.
    """
    check_precision_request(model, precision, source=source)
    major = trt_major(trt_version)
    if major < 10:
        raise ModelError(f"TensorRT {trt_version} is too old: cmdeploy needs TensorRT 10 or 11")
    return BuildPlan(major, strongly_typed=True, builder_flags=(), precision=precision)


def onnx_input_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Graph inputs (initializers excluded) -> dims: int when static, dim_param name or None."""
    inits = {i.name for i in model.graph.initializer}
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims: list[int | str | None] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shapes[vi.name] = tuple(dims)
    return shapes


def onnx_io_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    """NumPy dtype names of graph inputs and outputs (initializers excluded)."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name not in inits:
            out[vi.name] = _ONNX_TO_NUMPY.get(vi.type.tensor_type.elem_type, "unknown")
    return out


def profile_shapes(
    input_shapes: Mapping[str, tuple[int | str | None, ...]],
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    *,
    axis_ranges: Mapping[str, tuple[int, int, int]] | None = None,
) -> dict[str, dict[str, list[int]]]:
    """Optimisation profile per input: full min/opt/max shapes.

    Axis 0 is the batch axis (``min/opt/max_batch``). Any other dynamic axis takes its
    (min, opt, max) from ``axis_ranges`` by its ONNX ``dim_param`` name (default
    :data:`DEFAULT_AXIS_RANGES`: ``height``/``width`` of the fused graph); static axes pin
    min = opt = max. An unnamed dynamic axis, or a name without a range, is an error naming the
    input and axis.
    """
    ranges = DEFAULT_AXIS_RANGES if axis_ranges is None else axis_ranges
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise InputError(
            f"batch sizes must satisfy 1 <= min <= opt <= max, got min={min_batch}, "
            f"opt={opt_batch}, max={max_batch}"
        )
    for axis_name, r in ranges.items():
        if len(r) != 3 or not 1 <= r[0] <= r[1] <= r[2]:
            raise InputError(
                f"range of axis {axis_name!r} must be (min, opt, max) with 1 <= min <= opt <= max, "
                f"got {tuple(r)}"
            )
    if not input_shapes:
        raise InputError("the ONNX model has no inputs")
    profiles: dict[str, dict[str, list[int]]] = {}
    for name, dims in input_shapes.items():
        if not dims:
            raise InputError(f"input {name!r} is a scalar; expected a batch axis first")
        b = dims[0]
        per_axis: list[tuple[int, int, int]] = [
            (b, b, b) if isinstance(b, int) and b > 0 else (min_batch, opt_batch, max_batch)
        ]
        for axis, d in enumerate(dims[1:], start=1):
            if isinstance(d, int) and d > 0:
                per_axis.append((d, d, d))
            elif isinstance(d, str) and d in ranges:
                lo, opt, hi = ranges[d]
                per_axis.append((int(lo), int(opt), int(hi)))
            else:
                raise InputError(
                    f"input {name!r} axis {axis} is dynamic ({d!r}) and has no profile range "
                    f"(known: {sorted(ranges)}); give one or export with a fixed input size "
                    f"(shape {list(dims)})"
                )
        profiles[name] = {
            key: [r[k] for r in per_axis] for k, key in enumerate(("min", "opt", "max"))
        }
    return profiles


def format_parser_errors(parser: Any, source: str = "ONNX") -> str:
    """One line per ``OnnxParser`` error: code, node index, name and operator, description."""
    lines = []
    for i in range(int(parser.num_errors)):
        err = parser.get_error(i)

        def field(name: str, err: Any = err) -> Any:
            fn = getattr(err, name, None)
            try:
                return fn() if callable(fn) else None
            except Exception:  # best-effort diagnostics
                return None

        node, node_name, op = field("node"), field("node_name"), field("node_operator")
        where = []
        if node is not None and node >= 0:
            where.append(f"node {node}")
        if node_name:
            where.append(repr(node_name))
        if op:
            where.append(f"({op})")
        code = field("code")
        code_s = getattr(code, "name", code)
        lines.append(f"  [{code_s}] {' '.join(where) or 'graph'}: {field('desc')}")
    return f"TensorRT could not parse {source}:\n" + "\n".join(lines)


def read_spec(model: onnx.ModelProto, source: str = "ONNX") -> ModelSpec:
    """The :class:`ModelSpec` in the ONNX metadata; :class:`InputError` when absent."""
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        return ModelSpec.from_metadata(meta)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from exc


def check_tensorrt_compatible(
    model: onnx.ModelProto,
    profiles: Mapping[str, Mapping[str, list[int]]] | None = None,
    *,
    source: str = "ONNX",
) -> None:
    """Run the TensorRT-compatibility lint; :class:`InputError` listing its errors, if any."""
    from cmdeploy.export.trt_lint import lint_model

    report = lint_model(model, source=source, profiles=profiles)
    if not report.ok:
        raise InputError(f"{source} is not TensorRT-compatible:\n{report.error_text()}")


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_gb: float = 4,
    axis_ranges: Mapping[str, tuple[int, int, int]] | None = None,
    timing_cache: Path | None = None,
    device: int = 0,
    verbose: bool = False,
) -> Path:
    """Build a TensorRT engine from a cmdeploy ONNX model; returns ``engine_path``.

    Args:
        onnx_path: cmdeploy ONNX model (its metadata must hold the model spec).
        engine_path: output engine file; ``<engine_path>.json`` receives the sidecar.
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"`` (see the module docstring).
        min_batch, opt_batch, max_batch: optimisation profile of the batch axis.
        axis_ranges: (min, opt, max) of other dynamic axes by ``dim_param`` name (default
            :data:`DEFAULT_AXIS_RANGES`, the fused graph's ``height`` and ``width``).
        workspace_gb: builder workspace memory pool limit, GiB.
        timing_cache: file to load tactic timings from (if it exists) and save them to.
        device: CUDA device whose name/compute capability go into the sidecar.
        verbose: TensorRT INFO logging instead of WARNING.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX model {onnx_path} not found")
    if workspace_gb <= 0:
        raise InputError(f"workspace_gb must be > 0, got {workspace_gb}")
    model = onnx.load(str(onnx_path), load_external_data=False)
    source = str(onnx_path)
    profiles = profile_shapes(
        onnx_input_shapes(model), min_batch, opt_batch, max_batch, axis_ranges=axis_ranges
    )
    check_tensorrt_compatible(model, profiles, source=source)  # before TensorRT is imported
    check_precision_request(model, precision, source=source)
    spec = read_spec(model, source)

    trt = import_tensorrt()
    plan = plan_build(trt.__version__, precision, model, source=source)
    gpu_name, cc = cuda_device_info(device)
    logger = trt.Logger(trt.Logger.INFO if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed:
        strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strong is None:
            raise ModelError(
                f"TensorRT {trt.__version__} has no strongly typed networks; cmdeploy needs "
                "TensorRT 10 or 11"
            )
        flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ModelError(format_parser_errors(parser, source))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    for flag in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))

    profile = builder.create_optimization_profile()
    net_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    for name in net_inputs:
        if name not in profiles:
            raise ModelError(f"TensorRT network input {name!r} is not an input of {source}")
        p = profiles[name]
        profile.set_shape(name, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(profile)

    cache = None
    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        blob = timing_cache.read_bytes() if timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ModelError(f"TensorRT failed to build an engine from {source} (see the log above)")

    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    sidecar = EngineSidecar(
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=cc,
        onnx_sha256=file_sha256(onnx_path),
        input_shapes={n: profiles[n] for n in net_inputs},
        output_names=[t.name for t in outputs],
        precision=plan.precision,
        created=utc_now(),
        cmdeploy_version=cmdeploy.__version__,
        spec=spec.to_dict(),
        output_shapes={t.name: [int(d) for d in t.shape] for t in outputs},
        io_dtypes=onnx_io_dtypes(model),
    )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(engine_path, memoryview(serialized))
    sidecar.write(sidecar_path(engine_path))
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(timing_cache, memoryview(cache.serialize()))
    return engine_path
