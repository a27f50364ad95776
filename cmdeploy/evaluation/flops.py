"""What an ONNX model computes: FLOPs per call and its precision (needs ``onnx``, the ``eval`` extra).

FLOPs are counted from the graph after shape inference with batch 1 (and ``slice_size`` for the
fused layout's H and W): ``Conv``/``ConvTranspose``/``QLinearConv``/``ConvInteger`` as
``2 * output elements * (C_in / groups) * kernel area``, ``MatMul``/``Gemm`` (and their integer /
QLinear forms) as ``2 * output elements * K``. Other ops (activations, pooling, resize,
element-wise) are not counted, so the achieved GFLOP/s is a lower bound of the arithmetic done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmdeploy.spec import PRECISION_KEY

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                     "MatMulInteger", "DynamicQuantizeLinear"})


# ----------------------------------------------------------------------------------------- FLOPs
@dataclass
class FlopCount:
    """FLOPs of one model call at batch 1: total, per op type, and nodes whose shapes were unknown."""

    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    @property
    def gflop(self) -> float:
        return self.total / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"gflop": round(self.gflop, 6), "by_op": self.by_op, "unknown_nodes": self.unknown}


def _fix_input_dims(model: Any, batch: int, spatial: tuple[int, int]) -> None:
    """Give every symbolic graph-input dimension a value: axis 0 = batch, the rest = H then W."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits or not inp.type.HasField("tensor_type"):
            continue
        free = iter(spatial)
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                continue
            d.ClearField("dim_param")
            d.dim_value = batch if axis == 0 else next(free, 1)


def _shapes(model: Any) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for init in model.graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if all(d > 0 for d in dims):
            shapes[vi.name] = tuple(int(d) for d in dims)
    return shapes


def _node_flops(node: Any, shapes: dict[str, tuple[int, ...]]) -> int | None:
    op, ins, outs = node.op_type, list(node.input), list(node.output)

    def shp(i: int, names: list[str]) -> tuple[int, ...] | None:
        return shapes.get(names[i]) if i < len(names) and names[i] else None

    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w, y = shp(3 if op == "QLinearConv" else 1, ins), shp(0, outs)
        if w is None or y is None:
            return None
        return 2 * int(np.prod(y)) * int(np.prod(w[1:]))
    if op == "ConvTranspose":
        x, w = shp(0, ins), shp(1, ins)
        if x is None or w is None:
            return None
        return 2 * int(np.prod(x)) * int(np.prod(w[1:]))
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a, y = shp(0, ins), shp(0, outs)
        if a is None or y is None:
            return None
        return 2 * int(np.prod(y)) * int(a[-1])
    if op == "Gemm":
        a, y = shp(0, ins), shp(0, outs)
        if a is None or y is None:
            return None
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        return 2 * int(np.prod(y)) * int(a[0] if trans_a else a[-1])
    return 0


COUNTED_OPS = ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose", "MatMul", "MatMulInteger",
               "QLinearMatMul", "Gemm")


def _load_onnx(path: str | Path) -> Any:
    """``onnx.load`` (no external data) with a :class:`ModelError` for a file that is not ONNX, so a
    corrupt model is a model failure (exit 3) in every command, not a protobuf traceback."""
    import onnx

    from cmdeploy.errors import ModelError

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and others
        raise ModelError(f"'{path}': cannot read as ONNX ({type(exc).__name__})") from None


def count_flops(
    model_path: str | Path, *, batch: int = 1, slice_shape: tuple[int, int] = (512, 512)
) -> FlopCount:
    """Conv and MatMul/Gemm FLOPs of one call of an ONNX model (see the module docstring).

    ``slice_shape`` (H, W) fills symbolic spatial input dimensions (fused models). Raises
    ``ImportError`` when ``onnx`` is not installed.
    """
    from onnx import shape_inference

    model = _load_onnx(model_path)
    _fix_input_dims(model, batch, slice_shape)
    try:
        inferred = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # inference can fail on exotic graphs; count what is known
        inferred = model
    shapes = _shapes(inferred)
    counted = [n for n in inferred.graph.node if n.op_type in COUNTED_OPS]
    if any(_node_flops(n, shapes) is None for n in counted):
        try:  # onnxruntime's symbolic inference resolves more (Resize/Reshape chains)
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            sym = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
            shapes = {**_shapes(sym), **shapes}
        except Exception:
            pass
    fc = FlopCount()
    for n in counted:
        f = _node_flops(n, shapes)
        if f is None:
            fc.unknown.append(n.name or n.op_type)
            continue
        fc.total += f
        fc.by_op[n.op_type] = fc.by_op.get(n.op_type, 0) + f
    return fc


def model_precision(model_path: str | Path) -> str:
    """``"int8"`` (Q/DQ or integer ops), ``"fp16"`` or ``"fp32"`` for an ONNX file; an engine's
    from its sidecar. Without ``onnx``: the ``cmdeploy.precision`` metadata, else a file-name hint."""
    p = Path(model_path)
    if p.suffix.lower() in (".engine", ".plan", ".trt"):
        try:
            from cmdeploy.engine_sidecar import EngineSidecar, sidecar_path

            return EngineSidecar.read(sidecar_path(p)).precision
        except Exception:
            return "unknown"
    try:
        import onnx
    except ImportError:
        return _precision_without_onnx(p)
    model = _load_onnx(p)
    meta = {m.key: m.value for m in model.metadata_props}
    if any(n.op_type in QDQ_OPS for n in model.graph.node):
        return "int8"
    if meta.get(PRECISION_KEY) in ("fp32", "fp16", "int8"):
        return meta[PRECISION_KEY]
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return "fp32"


def _precision_without_onnx(p: Path) -> str:
    try:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        value = sess.get_modelmeta().custom_metadata_map.get(PRECISION_KEY)
        if value:
            return value
    except Exception:
        pass
    name = p.name.lower()
    return "int8" if "int8" in name else "fp16" if "fp16" in name else "fp32"


