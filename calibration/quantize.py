"""Static INT8 quantization of a plain cmdeploy ONNX model (onnxruntime.quantization, QDQ format).

Pipeline (:func:`prepare` -> :func:`calibrate_ranges` -> :func:`quantize`):

1. **prepare**: refuse fused-preprocessing graphs
   (:func:`cmdeploy.calibration.graph.check_plain`), run ``quant_pre_process`` (ONNX shape
   inference, onnxruntime basic optimisations, which fold any Conv+BatchNormalization left),
   refuse a graph that still has BatchNormalization, then - for ``target="cpu"`` only - the
   exact float rewrites of :mod:`cmdeploy.calibration.graph` (stem conv as SpaceToDepth + 4x4
   conv; branch upsampling MatMul pairs as Resize; uint8 pooling matrices), checked against the
   original on a random batch.
2. **calibrate**: run the prepared float model on real preprocessed crops
   (:class:`~cmdeploy.calibration.reader.SliceCalibrationReader`) one batch at a time and collect
   every float tensor's range with the chosen method (MinMax, Entropy or Percentile). Ranges can be
   cached on disk (:class:`RangeCache`), keyed by the prepared model's SHA-256, the calibration
   objects' fingerprint, the method, seed and slice count.
3. **quantize**: QDQ, per-channel int8 weights, ranges from step 2. The last Conv (the 1-channel
   logit conv) and everything after it (the final bilinear upsampling) stay float.

Targets (:class:`Recipe`):

* ``cpu`` (onnxruntime, x86): activations **uint8** (asymmetric), weights int8 symmetric
  per channel with a **7-bit range** (``reduce_range``): on x86 CPUs without VNNI (AVX2 only)
  MLAS's u8 x s8 kernels add pairs of products in int16, which saturates with full-range weights
  (255 * 127 * 2 > 32767) and costs several Dice points; 7-bit weights fit, so one INT8 file gives
  the same masks on every x86 CPU. uint8 activations rather than int8 because
  MLAS's symmetric conv kernel (indirect conv, requantisation fused) exists for u8 x s8 only. ReLU
  is folded into the preceding QuantizeLinear (asymmetric ranges start at 0), so onnxruntime runs
  Conv+ReLU and Add+ReLU as one QLinearConv / QLinearAdd. The head's constant pooling /
  interpolation matrices are quantized as uint8 so that every head MatMul becomes a QLinearMatMul.
* ``tensorrt``: symmetric int8 activations and weights (zero points 0, what TensorRT's explicit
  quantization requires), Q/DQ on the inputs of Conv / MatMul / Add / Concat / MaxPool only
  (:attr:`Recipe.op_types`), no graph rewrites, biases left float (``QuantizeBias`` off:
  TensorRT's DequantizeLayer takes int8, not INT32) and constant MatMul operands per tensor
  (:attr:`Recipe.per_tensor_matmul_weights`). ``cmdeploy export --onnx M.int8.onnx --engine
  M.plan --precision int8`` builds the engine from it (strongly typed, TensorRT 10 and 11).
  Beside it goes a TensorRT 10 implicit-quantization calibration cache
  (:func:`write_trt_calibration_cache`) for ``trtexec``/Polygraphy users only: TensorRT 11 removed
  implicit INT8 calibrators and cmdeploy never reads the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantType

from cmdeploy.calibration import graph
from cmdeploy.calibration.reader import DEFAULT_BATCH, SliceCalibrationReader, _OneBatch
from cmdeploy.calibration.slices import SliceObject
from cmdeploy.errors import InputError, ModelError
from cmdeploy.hashing import file_sha256
from cmdeploy.spec import PRECISION_KEY, ModelSpec
from cmdeploy.writers.atomic import atomic_write_bytes

TARGETS = ("cpu", "tensorrt")
METHODS: dict[str, CalibrationMethod] = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
INT8_KEY = "cmdeploy.int8"
MIN_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear
REWRITE_TOLERANCE = 1e-4  # max |rewritten - original| float output, relative to max |output|
Ranges = dict[str, tuple[float, float]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """How to quantize for one target (see the module docstring)."""

    target: str = "cpu"
    method: str = "minmax"
    per_channel: bool = True
    graph_rewrites: bool = True

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {self.method!r}")

    @property
    def symmetric_activations(self) -> bool:
        return self.target == "tensorrt"

    @property
    def activation_type(self) -> QuantType:
        return QuantType.QInt8 if self.symmetric_activations else QuantType.QUInt8

    @property
    def weight_type(self) -> QuantType:
        return QuantType.QInt8

    @property
    def op_types(self) -> list[str] | None:
        """Op types to quantize (None = every type onnxruntime can quantize).

        TensorRT: Q/DQ only on the *inputs* of Conv, MatMul, Add, Concat and MaxPool (NVIDIA's
        explicit-quantization placement): ReLU stays unquantized so TensorRT fuses
        Conv+(Add)+ReLU and quantizes the fused output for the next layer, and both inputs of each
        residual Add are quantized so the Add fuses into the conv.
        """
        if self.target == "tensorrt":
            return ["Conv", "MatMul", "Add", "Concat", "MaxPool"]
        return None

    @property
    def reduce_range(self) -> bool:
        """7-bit weights for the CPU target (no int16 saturation on AVX2-only x86 CPUs)."""
        return self.target == "cpu"

    @property
    def quantize_bias(self) -> bool:
        """Quantize Conv biases to INT32 (onnxruntime's default). Off for TensorRT, whose
        DequantizeLayer accepts only quantized activation types (int8), not INT32 biases."""
        return self.target != "tensorrt"

    @property
    def per_tensor_matmul_weights(self) -> bool:
        """Quantize constant MatMul operands per tensor. TensorRT: onnxruntime's per-channel axis
        for a MatMul weight is axis 1, the reduction axis of a constant *left* operand (the PSP
        head's pooling/interpolation matrices), and TensorRT cannot fold such scales into the
        GEMM; per tensor keeps those MatMuls in INT8."""
        return self.target == "tensorrt"

    @property
    def rewrites(self) -> bool:
        """Apply the CPU graph rewrites (stem SpaceToDepth, uint8 head matrices)."""
        return self.target == "cpu" and self.graph_rewrites

    def describe(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "method": self.method,
            "activation_type": "uint8" if self.activation_type == QuantType.QUInt8 else "int8",
            "weight_type": "int8",
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "activation_symmetric": self.symmetric_activations,
            "weight_symmetric": True,
            "format": "QDQ",
            "graph_rewrites": self.rewrites,
            "quantize_bias": self.quantize_bias,
            "matmul_weights": "per_tensor" if self.per_tensor_matmul_weights else "per_channel",
        }


@dataclass
class PreparedModel:
    """The float model that is calibrated and quantized, and what is known about it.

    Attributes:
        model: the prepared float ModelProto (shape-inferred, optimised, rewritten for the target).
        path: the same model on disk (calibrators and quantizers read paths).
        spec: the model card.
        source_metadata: ``metadata_props`` of the original model.
        source_sha256: SHA-256 of the original FP32 file.
        input_name: the model's input.
        tail: nodes that stay float (last Conv and everything after it).
        rewrites: the graph rewrites applied, human-readable.
        uint8_weights: initializers quantized as uint8 (the head's constant matrices).
    """

    model: onnx.ModelProto
    path: Path
    spec: ModelSpec
    source_metadata: dict[str, str]
    source_sha256: str
    input_name: str
    tail: list[str]
    rewrites: list[str] = field(default_factory=list)
    uint8_weights: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.model.SerializeToString(deterministic=True)).hexdigest()


def load_model(path: str | Path) -> onnx.ModelProto:
    """``onnx.load`` with a :class:`ModelError` naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"model '{p}' does not exist or is not a file")
    try:
        return onnx.load(str(p))
    except Exception as exc:  # protobuf raises several types
        raise ModelError(f"'{p}': cannot read as ONNX ({type(exc).__name__}: {exc})") from None


def prepare(model_path: str | Path, recipe: Recipe, workdir: str | Path) -> PreparedModel:
    """Check, pre-process and (CPU target) rewrite the FP32 model; written under ``workdir``."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src = Path(model_path)
    original = load_model(src)
    spec = graph.check_plain(original, name=f"model '{src}'", batchnorm_ok=True)
    opset = next((o.version for o in original.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ModelError(f"model '{src}' has opset {opset}; per-channel INT8 needs opset >= {MIN_OPSET}")
    work = Path(workdir)
    pre_path = work / "fp32_preprocessed.onnx"
    # ONNX shape inference only: onnxruntime's symbolic shape inference imports torch (via
    # onnxruntime.tools) and adds nothing for a CNN whose channels and size are fixed
    with contextlib.redirect_stdout(io.StringIO()):
        quant_pre_process(str(src), str(pre_path), skip_symbolic_shape=True)
    model = onnx.load(str(pre_path))
    # onnxruntime's basic optimisations fold Conv+BatchNormalization; none may be left
    graph.check_plain(model, name=f"model '{src}' after pre-processing")
    tail = graph.output_tail(model)
    rewrites: list[str] = []
    u8: list[str] = []
    if recipe.rewrites:
        rewritten = onnx.ModelProto()
        rewritten.CopyFrom(model)
        rewrites, u8 = rewrite_for_cpu(rewritten, tail)
        # safety net: the rewrites are exact in real arithmetic; check it on this model
        x = np.random.default_rng(0).standard_normal((2, spec.num_channels, spec.input_size, spec.input_size))
        diff, scale = graph.max_abs_difference(model, rewritten, x.astype(np.float32))
        if diff <= REWRITE_TOLERANCE * max(1.0, scale):
            model = rewritten
        else:
            rewrites = [f"graph rewrites dropped: float outputs differ by {diff:.3g}"]
            u8 = []
    path = work / "fp32_prepared.onnx"
    onnx.save(model, str(path))
    return PreparedModel(
        model=model,
        path=path,
        spec=spec,
        source_metadata=graph.metadata(original),
        source_sha256=file_sha256(src),
        input_name=model.graph.input[0].name,
        tail=tail,
        rewrites=rewrites,
        uint8_weights=u8,
    )


def rewrite_for_cpu(model: onnx.ModelProto, tail: Sequence[str]) -> tuple[list[str], list[str]]:
    """Apply the CPU rewrites of :mod:`cmdeploy.calibration.graph` in place; returns (what was
    done, initializers to quantize as uint8)."""
    done: list[str] = []
    stem = graph.space_to_depth_first_conv(model)
    if stem is not None:
        done.append(f"{stem}: SpaceToDepth(2) + stride-1 conv")
    resized = graph.resize_bilinear_matmuls(model, skip=set(tail))
    if resized:
        done.append(f"{len(resized)} bilinear MatMul pairs -> Resize")
    u8 = graph.const_first_matmul_inputs(model, skip=set(tail))
    if u8:
        done.append(f"{len(u8)} constant left MatMul operands quantized as uint8")
    return done, u8


# ------------------------------------------------------------------------------ calibration
def calibrate_ranges(
    prepared: PreparedModel,
    objects: Sequence[SliceObject],
    recipe: Recipe,
    *,
    batch_size: int = DEFAULT_BATCH,
    progress: Progress | None = None,
) -> Ranges:
    """Range (low, high) of every float tensor of the prepared model over ``objects``.

    The calibrator sees one batch at a time (its intermediate tensors are folded into the running
    ranges / histograms after each batch), so memory stays at one batch of activations.
    """
    from onnxruntime.quantization.calibrate import create_calibrator

    reader = SliceCalibrationReader(
        objects, prepared.spec, input_name=prepared.input_name, batch_size=batch_size
    )
    options: dict[str, Any] = {"symmetric": recipe.symmetric_activations}
    with tempfile.TemporaryDirectory(prefix="cmdeploy-calib-") as tmp:
        calibrator = create_calibrator(
            prepared.path,
            None,  # every float tensor: the TensorRT cache needs them all
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=METHODS[recipe.method],
            extra_options=options,
        )
        for b in range(reader.num_batches):
            if progress is not None:
                progress(f"calibration batch {b + 1}/{reader.num_batches}")
            with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print
                calibrator.collect_data(_OneBatch({prepared.input_name: reader.batch(b)}))
        with contextlib.redirect_stdout(io.StringIO()):
            data = calibrator.compute_data()
    ranges: Ranges = {}
    for name in data:
        lo, hi = data[name].range_value
        ranges[name] = (float(np.asarray(lo).min()), float(np.asarray(hi).max()))
    return ranges


def tensors_data(ranges: Ranges, method: str) -> Any:
    """onnxruntime ``TensorsData`` from plain ranges (a fresh object: quantizers edit it)."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    return TensorsData(
        METHODS[method],
        {k: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for k, (lo, hi) in ranges.items()},
    )


class RangeCache:
    """Calibration ranges on disk: ``<dir>/<key>.json`` with the inputs of the key spelled out."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(**fields: Any) -> str:
        """SHA-256 of the sorted-key JSON of ``fields`` (model hash, data fingerprint, ...)."""
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str) -> Ranges | None:
        """Cached ranges for ``key``, or None (missing or unreadable file)."""
        p = self.path(key)
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
            return {k: (float(v[0]), float(v[1])) for k, v in raw["ranges"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def save(self, key: str, ranges: Ranges, info: dict[str, Any]) -> Path:
        """Write ``ranges`` (atomically) with ``info`` describing how they were made."""
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"key": key, "info": info, "ranges": {k: [lo, hi] for k, (lo, hi) in ranges.items()}}
        return _write_atomic(self.path(key), json.dumps(payload, sort_keys=True, indent=1).encode())


# ------------------------------------------------------------------------------ quantization
def quantize(
    prepared: PreparedModel,
    ranges: Ranges,
    recipe: Recipe,
    *,
    exclude: Sequence[str] = (),
) -> onnx.ModelProto:
    """The QDQ INT8 model; ``prepared.tail`` and ``exclude`` (node names) stay float.

    Raises :class:`ModelError` when an excluded name is not a node of the model.
    """
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    names = {n.name for n in prepared.model.graph.node}
    unknown = sorted(set(exclude) - names)
    if unknown:
        raise ModelError(f"--exclude-nodes: no node named {unknown} in the model")
    extra: dict[str, Any] = {
        "ActivationSymmetric": recipe.symmetric_activations,
        "WeightSymmetric": True,
        "QuantizeBias": recipe.quantize_bias,
    }
    op_types = recipe.op_types
    if op_types is None:
        op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    else:
        extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
    overrides: dict[str, list[dict[str, Any]]] = {}
    if prepared.uint8_weights:
        overrides.update({n: [{"quant_type": QuantType.QUInt8}] for n in prepared.uint8_weights})
    if recipe.per_tensor_matmul_weights:
        keep_float = set(prepared.tail) | set(exclude)
        inits = {i.name for i in prepared.model.graph.initializer}
        for n in prepared.model.graph.node:
            if n.op_type == "MatMul" and n.name not in keep_float:
                for t in n.input:
                    if t in inits:  # per-tensor override: no "axis"
                        overrides[t] = [{"quant_type": recipe.weight_type, "symmetric": True}]
    if overrides:
        extra["TensorQuantOverrides"] = overrides
    model = load_model_with_shape_infer(prepared.path)
    quantizer = QDQQuantizer(
        model,
        recipe.per_channel,
        recipe.reduce_range,
        recipe.weight_type,
        recipe.activation_type,
        tensors_data(ranges, recipe.method),
        [],
        sorted(set(prepared.tail) | set(exclude)),
        op_types,
        extra,
    )
    with contextlib.redirect_stdout(io.StringIO()):
        quantizer.quantize_model()
    quantizer.model.topological_sort()  # the inserted Q/DQ nodes are appended out of order
    out = quantizer.model.model
    if recipe.rewrites:
        graph.quantize_before_space_to_depth(out)
    graph.prune_initializers(out)
    return out


def qdq_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Counts of Q/DQ nodes and quantized convs, activation zero-point types and values."""
    inits = {i.name: i for i in model.graph.initializer}
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    producer = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    # a quantized conv reads its weight through a DequantizeLinear; a float one reads the initializer
    quantized_convs = [
        n.name for n in convs if n.input[1] in producer and producer[n.input[1]].op_type == "DequantizeLinear"
    ]
    zps = []
    for n in q:
        if len(n.input) > 2 and n.input[2] in inits:
            zps.append(numpy_helper.to_array(inits[n.input[2]]))
    return {
        "quantize_linear": len(q),
        "dequantize_linear": len(dq),
        "quantized_convs": quantized_convs,
        "float_convs": [n.name for n in convs if n.name not in quantized_convs],
        "activation_dtypes": sorted({str(z.dtype) for z in zps}),
        "activation_zero_points": sorted({int(v) for z in zps for v in np.ravel(z)}),
    }


def int8_metadata(
    prepared: PreparedModel,
    recipe: Recipe,
    *,
    num_slices: int,
    data: dict[str, Any],
    dice: dict[str, float],
    excluded: Sequence[str],
) -> dict[str, str]:
    """``metadata_props`` of the INT8 model: the original model card plus the calibration record."""
    meta = dict(prepared.source_metadata)
    record = {
        **recipe.describe(),
        "num_slices": int(num_slices),
        "data": data,
        "dice": {k: round(float(v), 6) for k, v in dice.items()},
        "fp32_sha256": prepared.source_sha256,
        "float_nodes": list(prepared.tail),
        "excluded_nodes": list(excluded),
        "graph_rewrites": list(prepared.rewrites),
        "onnxruntime": onnxruntime.__version__,
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
    }
    meta.update(
        {
            INT8_KEY: json.dumps(record, sort_keys=True),
            PRECISION_KEY: "int8",
            "cmdeploy.quant_target": recipe.target,
            "cmdeploy.calibration_method": recipe.method,
            "cmdeploy.calibration_slices": str(int(num_slices)),
            "cmdeploy.calibration_data": json.dumps(data, sort_keys=True),
            "cmdeploy.fp32_sha256": prepared.source_sha256,
            "cmdeploy.fp32_dice": f"{dice.get('fp32', float('nan')):.6f}",
            "cmdeploy.int8_dice": f"{dice.get('int8', float('nan')):.6f}",
        }
    )
    return meta


def set_metadata(model: onnx.ModelProto, meta: dict[str, str]) -> None:
    """Replace ``metadata_props`` by ``meta``."""
    del model.metadata_props[:]
    for key in sorted(meta):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(meta[key])


def _write_atomic(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, data)


def save_model(model: onnx.ModelProto, path: str | Path) -> int:
    """Check and write ``model`` as one file (temp name + rename); returns its size in bytes."""
    onnx.checker.check_model(model)
    p = _write_atomic(Path(path), model.SerializeToString())
    return p.stat().st_size


# ------------------------------------------------------------------------------ TensorRT cache
def trt_version_number(version: str) -> int:
    """TensorRT's version integer: 8.6.1 -> 8601 (major*1000 before 10), 10.9.0 -> 100900."""
    parts = [int(p) for p in (version.split(".") + ["0", "0"])[:3]]
    major, minor, patch = parts
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def installed_trt_version() -> str | None:
    """``tensorrt.__version__`` when TensorRT's Python package is installed, else None."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        return None
    return str(tensorrt.__version__)


#: TensorRT calibrator algorithm each range method matches (the cache header names it, and a
#: TensorRT calibrator reads only a cache of its own algorithm); percentile ranges have none
TRT_CACHE_ALGORITHMS = {"minmax": "MinMaxCalibration", "entropy": "EntropyCalibration2"}


def trt_calibration_cache(
    ranges: Ranges, tensors: Sequence[str], *, method: str, trt_version: str = "10.0.0"
) -> str:
    """TensorRT 10 implicit-quantization calibration cache text for ``tensors``.

    Format (what TensorRT's ``IInt8Calibrator`` writes and reads back through
    ``read_calibration_cache``): a header line ``TRT-<version>-<algorithm>``, the algorithm of
    the calibrator whose ranges these are (:data:`TRT_CACHE_ALGORITHMS`: ``MinMaxCalibration``
    for MinMax ranges, ``EntropyCalibration2`` for entropy ones), then one
    ``<tensor name>: <scale>`` line per tensor, the scale being the big-endian IEEE-754 float32
    bit pattern of ``amax / 127`` in hex (``amax = max(|low|, |high|)``).

    For TensorRT 10 only (``trtexec --int8 --calib=<cache>`` for EntropyCalibration2 headers,
    ``polygraphy convert --int8 --calibration-cache <cache> --calib-base-cls
    IInt8MinMaxCalibrator`` for MinMax): implicit INT8 calibrators are deprecated since 10.1 and
    removed in 11, and cmdeploy's own engine build never reads the cache - it builds INT8 from the
    Q/DQ ONNX.

    Raises:
        ValueError: ``method`` has no TensorRT calibrator (``percentile``).
    """
    if method not in TRT_CACHE_ALGORITHMS:
        raise ValueError(
            f"no TensorRT calibrator matches {method!r} ranges (only {sorted(TRT_CACHE_ALGORITHMS)})"
        )
    lines = [f"TRT-{trt_version_number(trt_version)}-{TRT_CACHE_ALGORITHMS[method]}"]
    for name in tensors:
        lo, hi = ranges[name]
        amax = max(abs(lo), abs(hi), 1e-12)
        lines.append(f"{name}: {struct.pack('>f', amax / 127.0).hex()}")
    return "\n".join(lines) + "\n"


def parse_trt_calibration_cache(text: str) -> tuple[str, dict[str, float]]:
    """Inverse of :func:`trt_calibration_cache`: (header, {tensor: scale})."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("TRT-"):
        raise ValueError("not a TensorRT calibration cache (no 'TRT-<version>-<algorithm>' header)")
    scales = {}
    for ln in lines[1:]:
        name, _, value = ln.rpartition(": ")
        if not name:
            raise ValueError(f"bad calibration cache line {ln!r}")
        scales[name] = struct.unpack(">f", bytes.fromhex(value.strip().rjust(8, "0")))[0]
    return lines[0], scales


def trt_cache_tensors(prepared: PreparedModel, ranges: Ranges) -> list[str]:
    """Tensors that get a TensorRT scale: the input and every node output outside the float tail."""
    tail = set(prepared.tail)
    names = [prepared.input_name]
    for n in prepared.model.graph.node:
        if n.name not in tail:
            names.extend(o for o in n.output if o in ranges)
    return [n for n in dict.fromkeys(names) if n in ranges]


def write_trt_calibration_cache(
    path: str | Path,
    prepared: PreparedModel,
    ranges: Ranges,
    *,
    method: str,
    trt_version: str | None = None,
) -> Path | None:
    """Write the TensorRT 10 calibration cache of the prepared (unrewritten) model; None (nothing
    written) for ranges no TensorRT calibrator produces (``percentile``)."""
    if method not in TRT_CACHE_ALGORITHMS:
        return None
    version = trt_version or installed_trt_version() or "10.0.0"
    text = trt_calibration_cache(
        ranges, trt_cache_tensors(prepared, ranges), method=method, trt_version=version
    )
    return _write_atomic(Path(path), text.encode())


__all__ = [
    "INT8_KEY",
    "METHODS",
    "TARGETS",
    "TRT_CACHE_ALGORITHMS",
    "PreparedModel",
    "RangeCache",
    "Ranges",
    "Recipe",
    "calibrate_ranges",
    "installed_trt_version",
    "int8_metadata",
    "load_model",
    "parse_trt_calibration_cache",
    "prepare",
    "qdq_summary",
    "quantize",
    "save_model",
    "set_metadata",
    "trt_cache_tensors",
    "trt_calibration_cache",
    "trt_version_number",
    "write_trt_calibration_cache",
]
