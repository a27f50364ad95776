"""TensorRT-compatibility lint of an ONNX model, without TensorRT.

Reads the graph (``onnx`` only) and reports what TensorRT's ONNX parser or builder would refuse
or silently change, before anyone needs a GPU:

* **opset**: inside the parser's range (:data:`cmdeploy.export.trt_ops.OPSET_RANGE`); above
  TensorRT 10.0's maximum (20) is a warning.
* **operators**: against the table in :mod:`cmdeploy.export.trt_ops` (taken from onnx-tensorrt's
  ``docs/operators.md``, version in :data:`cmdeploy.export.trt_ops.SOURCE`); non-ONNX domains;
  ``AffineGrid`` (unsupported); ``GridSample`` at opset >= 20 (its mode is named ``"linear"``
  there, which older parsers read as nearest); a floating-point ``Range`` whose bounds are
  computed at run time (compute it in integers and ``Cast``); Resize modes; MaxPool indices.
* **dtypes**: no FP64 anywhere (the parser casts DOUBLE to FLOAT silently, clamping to +-FLT_MAX:
  a 1e-300 guard becomes 0); UINT8 only as a network input or output; INT8 only through Q/DQ;
  network inputs/outputs of a type TensorRT binds.
* **Q/DQ** (explicit quantization): zero points int8 and 0 (symmetric), no quantized (INT32)
  biases, constant scales, per-channel scales only on weights along the output-channel axis
  (axis 0 for Conv; for MatMul weights per-channel along the reduction axis is a warning:
  TensorRT cannot fold it into the GEMM and dequantizes the weights to float).
* **dynamic axes vs profiles**: every dynamic input axis needs an optimisation-profile range
  (batch from ``min/opt/max_batch``, named spatial axes from ``axis_ranges``), static axes must
  match the profile.

Severity ``error``: the build would fail or the engine would compute something else.
``warning``: it builds but not as intended (precision fallback, newer-parser-only).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cmdeploy.errors import InputError
from cmdeploy.export import trt_ops

ERROR, WARNING, INFO = "error", "warning", "info"
CALIBRATE_HINT = (
    "calibrate the FP32 model for TensorRT instead: cmdeploy calibrate --model MODEL.onnx "
    "--target tensorrt --output MODEL.int8-trt.onnx (symmetric int8, no quantized biases)"
)
FP32_GEOMETRY_HINT = "re-export the fused graph with --fused-geometry float32 (the default with --engine)"
_IO_TYPES = {
    TensorProto.FLOAT,
    TensorProto.FLOAT16,
    TensorProto.BFLOAT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.BOOL,
    TensorProto.UINT8,
}
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_QDQ = ("QuantizeLinear", "DequantizeLinear")
MAX_EXAMPLES = 3


@dataclass(frozen=True)
class Finding:
    """One lint result: ``severity`` error/warning/info, a stable ``code``, where, what to do."""

    severity: str
    code: str
    message: str
    node: str | None = None

    def line(self) -> str:
        where = f" [{self.node}]" if self.node else ""
        return f"{self.severity.upper():7s} {self.code}{where}: {self.message}"


@dataclass
class LintReport:
    """All findings for one model; ``ok`` when there is no error."""

    source: str
    findings: list[Finding] = field(default_factory=list)
    profiles: dict[str, dict[str, list[int]]] | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings if f.severity != INFO}

    def error_codes(self) -> set[str]:
        return {f.code for f in self.errors}

    def summary(self) -> str:
        head = (
            f"{self.source}: "
            + ("TensorRT-compatible" if self.ok else "NOT TensorRT-compatible")
            + f" ({len(self.errors)} errors, {len(self.warnings)} warnings; operator table: "
            f"{trt_ops.SOURCE})"
        )
        order = {ERROR: 0, WARNING: 1, INFO: 2}
        lines = [f.line() for f in sorted(self.findings, key=lambda f: order[f.severity])]
        return "\n".join([head, *lines])

    def error_text(self) -> str:
        """The errors only, one per line (for exceptions)."""
        return "\n".join(
            f"  {f.code}{' [' + f.node + ']' if f.node else ''}: {f.message}" for f in self.errors
        )


class _Graph:
    """Lookups over one (shape-inferred) graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:  # lint what we can without inferred types
            inferred = model
        g = inferred.graph
        self.nodes = list(model.graph.node)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.constants: dict[str, TensorProto] = dict(self.inits)
        for n in self.nodes:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value":
                        self.constants[n.output[0]] = a.t
        self.types: dict[str, int] = {}
        self.ranks: dict[str, int] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.types[vi.name] = tt.elem_type
            if tt.HasField("shape"):
                self.ranks[vi.name] = len(tt.shape.dim)
        for name, t in self.constants.items():
            self.types[name] = t.data_type
            self.ranks[name] = len(t.dims)
        self.inputs = [i for i in model.graph.input if i.name not in self.inits]
        self.io_names = {i.name for i in self.inputs} | {o.name for o in model.graph.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for t in n.input:
                self.consumers.setdefault(t, []).append(n)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def const(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.op_type


def _examples(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_EXAMPLES])
    more = f" and {len(names) - MAX_EXAMPLES} more" if len(names) > MAX_EXAMPLES else ""
    return shown + more


# ------------------------------------------------------------------------------ checks
def _check_opset(g: _Graph, out: list[Finding]) -> None:
    lo, hi = trt_ops.OPSET_RANGE
    if not lo <= g.opset <= hi:
        out.append(Finding(ERROR, "opset", f"opset {g.opset} is outside the parser's {lo}..{hi}"))
    elif g.opset > trt_ops.OPSET_MAX_TRT_10_0:
        out.append(
            Finding(
                WARNING,
                "opset",
                f"opset {g.opset} > {trt_ops.OPSET_MAX_TRT_10_0}: TensorRT 10.0's parser refuses "
                "it (newer 10.x parsers accept it); export with --opset 17",
            )
        )


def _check_ops(g: _Graph, out: list[Finding]) -> None:
    unknown: Counter[str] = Counter()
    for n in g.nodes:
        if n.domain not in ("", "ai.onnx"):
            out.append(
                Finding(
                    ERROR,
                    "op-domain",
                    f"{n.op_type} from domain {n.domain!r} is not an ONNX operator; TensorRT "
                    "needs a plugin for it",
                    _label(n),
                )
            )
            continue
        if n.op_type == "AffineGrid":
            out.append(
                Finding(
                    ERROR,
                    "op-unsupported",
                    "AffineGrid is not supported by TensorRT's ONNX parser: compute the sampling "
                    "grid with elementwise ops and feed GridSample (cmdeploy's fused export does)",
                    _label(n),
                )
            )
        elif n.op_type in trt_ops.UNSUPPORTED:
            out.append(Finding(ERROR, "op-unsupported", f"{n.op_type} is not supported", _label(n)))
        elif n.op_type not in trt_ops.SUPPORTED:
            unknown[n.op_type] += 1
        else:
            _check_node(g, n, out)
    for op, count in sorted(unknown.items()):
        out.append(Finding(ERROR, "op-unknown", f"{op} ({count} nodes) is not in the operator table"))


def _check_node(g: _Graph, n: onnx.NodeProto, out: list[Finding]) -> None:
    op = n.op_type
    if op == "GridSample":
        if g.opset > trt_ops.MAX_GRIDSAMPLE_OPSET:
            out.append(
                Finding(
                    ERROR,
                    "gridsample-opset",
                    f"GridSample at opset {g.opset}: from opset 20 its bilinear mode is named "
                    "'linear', which older TensorRT parsers read as nearest; export with "
                    "opset <= 19",
                    _label(n),
                )
            )
        rank = g.ranks.get(n.input[0])
        if rank is not None and rank != 4:
            out.append(
                Finding(ERROR, "op-restriction", f"GridSample input must be 4D, got {rank}D", _label(n))
            )
    elif op == "Range":
        dtype = g.types.get(n.output[0]) or g.types.get(n.input[0])
        runtime = [t for t in n.input if t not in g.constants]
        if dtype in _FLOAT_TYPES and runtime:
            out.append(
                Finding(
                    ERROR,
                    "range-float",
                    "floating-point Range with bounds computed at run time (the parser supports "
                    "float Range only with constant bounds); build it as an integer Range "
                    "followed by Cast",
                    _label(n),
                )
            )
    elif op == "Resize":
        mode = _attr(n, "mode", "nearest")
        ctm = _attr(n, "coordinate_transformation_mode", "half_pixel")
        bad = []
        if mode not in trt_ops.RESIZE_MODES:
            bad.append(f"mode {mode!r}")
        if ctm not in trt_ops.RESIZE_COORDINATE_MODES:
            bad.append(f"coordinate_transformation_mode {ctm!r}")
        if _attr(n, "antialias", 0):
            bad.append("antialias")
        if bad:
            out.append(
                Finding(ERROR, "op-restriction", "Resize with unsupported " + ", ".join(bad), _label(n))
            )
    elif op == "MaxPool" and len([o for o in n.output if o]) > 1:
        out.append(Finding(ERROR, "op-restriction", "MaxPool's Indices output is unsupported", _label(n)))


def _check_dtypes(g: _Graph, out: list[Finding]) -> None:
    doubles = sorted(t for t, dt in g.types.items() if dt == TensorProto.DOUBLE)
    casts = [_label(n) for n in g.nodes if n.op_type == "Cast" and _attr(n, "to", 0) == TensorProto.DOUBLE]
    if doubles or casts:
        out.append(
            Finding(
                ERROR,
                "dtype-float64",
                f"{len(doubles)} FP64 tensors (e.g. {_examples(doubles or casts)}) and "
                f"{len(casts)} Casts to FP64: TensorRT has no FP64; the parser casts DOUBLE to "
                "FLOAT silently (clamping to +-FLT_MAX, a 1e-300 guard becomes 0), so the graph "
                f"would not compute what onnxruntime computes; {FP32_GEOMETRY_HINT}",
            )
        )
    dq_inputs = {n.input[0] for n in g.nodes if n.op_type == "DequantizeLinear"}
    qdq_io = {t for n in g.nodes if n.op_type in _QDQ for t in [*n.input, *n.output]}
    internal_u8 = sorted(t for t, dt in g.types.items() if dt == TensorProto.UINT8 and t not in g.io_names)
    if internal_u8:
        out.append(
            Finding(
                ERROR,
                "dtype-uint8",
                f"{len(internal_u8)} UINT8 tensors inside the graph (e.g. {_examples(internal_u8)}): "
                "TensorRT supports UINT8 only as a network input or output",
            )
        )
    stray_i8 = sorted(
        t for t, dt in g.types.items() if dt == TensorProto.INT8 and t not in dq_inputs and t not in qdq_io
    )
    if stray_i8:
        out.append(
            Finding(
                ERROR,
                "dtype-int8",
                f"INT8 tensors outside Q/DQ (e.g. {_examples(stray_i8)}): TensorRT treats INT8 "
                "as a quantized type, reachable only through QuantizeLinear/DequantizeLinear",
            )
        )
    for vi in list(g.inputs) + list(g.model.graph.output):
        dt = vi.type.tensor_type.elem_type
        if dt not in _IO_TYPES and dt != TensorProto.DOUBLE:
            out.append(
                Finding(
                    ERROR,
                    "dtype-io",
                    f"network {'input' if vi in g.inputs else 'output'} {vi.name!r} has type "
                    f"{TensorProto.DataType.Name(dt)}, which TensorRT cannot bind",
                )
            )


def _per_channel_axis(n: onnx.NodeProto, scale: np.ndarray, rank: int | None) -> int | None:
    if scale.size <= 1:
        return None
    axis = int(_attr(n, "axis", 1))
    return axis + rank if axis < 0 and rank else axis


def _check_qdq(g: _Graph, out: list[Finding], meta: Mapping[str, str]) -> None:
    zp_types: Counter[str] = Counter()
    asym: list[str] = []
    biases: list[str] = []
    for n in g.nodes:
        if n.op_type not in _QDQ:
            continue
        label = _label(n)
        scale = g.const(n.input[1]) if len(n.input) > 1 else None
        if scale is None:
            out.append(Finding(ERROR, "qdq-scale", "the scale must be a constant", label))
            continue
        zp = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if len(n.input) > 2 and n.input[2] and zp is None:
            out.append(Finding(ERROR, "qdq-zero-point", "the zero point must be a constant", label))
        x = n.input[0]
        if n.op_type == "DequantizeLinear" and g.types.get(x) == TensorProto.INT32:
            biases.append(label)
            continue
        if zp is not None:
            if zp.dtype != np.int8:
                zp_types[str(zp.dtype)] += 1
            if np.any(zp != 0):
                asym.append(label)
        if not np.all(scale > 0):
            out.append(Finding(ERROR, "qdq-scale", "scales must be positive", label))
        # per-channel: only on constant weights, along the output-channel axis
        is_weight = n.op_type == "DequantizeLinear" and x in g.constants
        axis = _per_channel_axis(n, scale, g.ranks.get(x))
        if axis is None:
            continue
        if not is_weight:
            out.append(
                Finding(
                    ERROR,
                    "qdq-axis",
                    "per-channel scales on an activation: TensorRT quantizes activations per tensor",
                    label,
                )
            )
            continue
        rank = g.ranks.get(x)
        for user in g.consumers.get(n.output[0], []):
            if user.op_type in ("Conv", "ConvTranspose") and list(user.input[1:2]) == [n.output[0]]:
                want = 0 if user.op_type == "Conv" else 1
                if axis != want:
                    out.append(
                        Finding(
                            ERROR,
                            "qdq-axis",
                            f"{user.op_type} weight quantized per channel along axis {axis}; "
                            f"TensorRT needs the output-channel axis {want}",
                            label,
                        )
                    )
            elif user.op_type in ("MatMul", "Gemm") and rank is not None and rank >= 2:
                operand = list(user.input).index(n.output[0])
                reduction = rank - 1 if operand == 0 else rank - 2
                if user.op_type == "Gemm" and _attr(user, "transB" if operand else "transA", 0):
                    reduction = rank - 2 if operand == 0 else rank - 1
                if axis == reduction:
                    out.append(
                        Finding(
                            WARNING,
                            "qdq-matmul-axis",
                            f"{user.op_type} weight {x!r} is quantized per channel along its "
                            "reduction axis: TensorRT cannot fold those scales into the GEMM and "
                            "runs it in float; quantize MatMul weights per tensor "
                            "(cmdeploy calibrate --target tensorrt does)",
                            label,
                        )
                    )
    if zp_types:
        kinds = ", ".join(f"{k} ({v} nodes)" for k, v in sorted(zp_types.items()))
        out.append(
            Finding(
                ERROR,
                "qdq-type",
                f"zero points of type {kinds}: TensorRT's explicit quantization is int8 only",
            )
        )
    if asym:
        out.append(
            Finding(
                ERROR,
                "qdq-asymmetric",
                f"{len(asym)} Q/DQ nodes with non-zero zero points (e.g. {_examples(asym)}): "
                "TensorRT only supports symmetric quantization",
            )
        )
    if biases:
        out.append(
            Finding(
                ERROR,
                "qdq-bias",
                f"{len(biases)} DequantizeLinear nodes read INT32 (quantized biases, e.g. "
                f"{_examples(biases)}): TensorRT's DequantizeLayer accepts only quantized "
                "activation types; keep biases float (onnxruntime's QuantizeBias=False)",
            )
        )
    qdq_errors = {"qdq-type", "qdq-asymmetric", "qdq-bias", "dtype-uint8"} & {
        f.code for f in out if f.severity == ERROR
    }
    if qdq_errors and any(n.op_type in _QDQ for n in g.nodes):
        target = meta.get("cmdeploy.quant_target")
        what = (
            "a CPU-target INT8 model (onnxruntime: uint8 asymmetric activations)"
            if target == "cpu"
            else "quantized in a way TensorRT cannot build"
        )
        out.insert(0, Finding(ERROR, "int8-target", f"this is {what}; {CALIBRATE_HINT}"))  # lead


def _check_profiles(
    g: _Graph,
    out: list[Finding],
    profiles: Mapping[str, Mapping[str, list[int]]] | None,
) -> dict[str, dict[str, list[int]]] | None:
    from cmdeploy.export.tensorrt_build import onnx_input_shapes, profile_shapes

    shapes = onnx_input_shapes(g.model)
    if profiles is None:
        try:
            profiles = profile_shapes(shapes)
        except InputError as exc:
            out.append(Finding(ERROR, "profile", str(exc)))
            return None
    for name, dims in shapes.items():
        prof = profiles.get(name)
        if prof is None:
            out.append(Finding(ERROR, "profile", f"no optimisation profile for input {name!r}"))
            continue
        lo, opt, hi = prof["min"], prof["opt"], prof["max"]
        if not len(lo) == len(opt) == len(hi) == len(dims):
            out.append(Finding(ERROR, "profile", f"input {name!r} has rank {len(dims)}; profile {prof}"))
            continue
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                if not lo[axis] == opt[axis] == hi[axis] == d:
                    out.append(
                        Finding(
                            ERROR,
                            "profile",
                            f"input {name!r} axis {axis} is static ({d}); the profile gives "
                            f"{lo[axis]}/{opt[axis]}/{hi[axis]}",
                        )
                    )
            elif not 1 <= lo[axis] <= opt[axis] <= hi[axis]:
                out.append(
                    Finding(
                        ERROR,
                        "profile",
                        f"input {name!r} dynamic axis {axis} ({d!r}) needs 1 <= min <= opt <= max, "
                        f"got {lo[axis]}/{opt[axis]}/{hi[axis]}",
                    )
                )
        dyn = [f"{axis}:{d or '?'}" for axis, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        if dyn:
            out.append(
                Finding(
                    INFO,
                    "profile",
                    f"input {name!r} dynamic axes {', '.join(dyn)}: min {lo}, opt {opt}, max {hi}",
                )
            )
    return {k: {kk: list(v) for kk, v in p.items()} for k, p in profiles.items()}


# ------------------------------------------------------------------------------ entry points
def lint_model(
    model: onnx.ModelProto,
    *,
    source: str = "ONNX",
    profiles: Mapping[str, Mapping[str, list[int]]] | None = None,
) -> LintReport:
    """Lint ``model`` for TensorRT; ``profiles`` as :func:`tensorrt_build.profile_shapes` returns
    (None: the default profile of :func:`~cmdeploy.export.tensorrt_build.profile_shapes`)."""
    g = _Graph(model)
    meta = {p.key: p.value for p in model.metadata_props}
    findings: list[Finding] = []
    _check_opset(g, findings)
    _check_ops(g, findings)
    _check_dtypes(g, findings)
    _check_qdq(g, findings, meta)
    checked = _check_profiles(g, findings, profiles)
    return LintReport(source=source, findings=findings, profiles=checked)


def lint_file(
    path: str | Path, *, profiles: Mapping[str, Mapping[str, list[int]]] | None = None
) -> LintReport:
    """:func:`lint_model` on an ONNX file; :class:`InputError` when it is missing or unreadable."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model {p} not found")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises several types
        raise InputError(f"{p}: cannot read as ONNX ({type(exc).__name__})") from None
    return lint_model(model, source=str(p), profiles=profiles)


__all__ = [
    "CALIBRATE_HINT",
    "ERROR",
    "INFO",
    "WARNING",
    "Finding",
    "LintReport",
    "lint_file",
    "lint_model",
]
