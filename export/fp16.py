"""FP32 -> FP16 ONNX conversion that keeps numerically sensitive ops in FP32.

TensorRT 11 builds strongly typed networks only: the precision of every layer is the precision of
its tensors in the ONNX graph, so an FP16 engine needs an FP16 graph. This module writes one
without onnxconverter-common.

The rule, per node (default domain only):

* **FP16** when the op is in :data:`FP16_OPS` - ops whose float outputs take the type of their
  float inputs - and not in ``keep_fp32_ops``. That covers the compute-heavy, well-conditioned
  part of a ResNet-PSP: Conv, BatchNormalization, ReLU, Add/Mul, MaxPool, Concat, MatMul/Gemm,
  shape ops.
* **FP32** for ``keep_fp32_ops`` (default :data:`DEFAULT_KEEP_FP32_OPS`): ops with exponent-range
  outputs (Exp, Log, Pow, Sqrt, Reciprocal, Div, Softmax, Sigmoid, Erf), long accumulations whose
  sum can leave FP16's 11-bit mantissa behind (ReduceMean/ReduceSum and friends, AveragePool,
  GlobalAveragePool - the PSP pooling bins), and resampling, whose coordinate arithmetic and
  blend weights need FP32 (Resize, Upsample, GridSample), and normalisations that divide by a
  variance (InstanceNormalization).
* **FP32** for a MatMul or Gemm whose constant operand is an *averaging matrix* (non-negative,
  rows or columns summing to 1): that is pooling or interpolation written as a matrix product,
  so it follows the pooling rule. Other MatMul/Gemm run in FP16 (TensorRT accumulates FP16 GEMMs
  in FP32).
* **FP32** for everything else: unknown or custom ops, ops with sub-graphs, ops whose output type
  is set by an attribute (Cast, ConstantOfShape, ...), and any node touching a tensor whose type
  shape inference could not work out.

Float initializers and ``Constant`` values used only by FP16 nodes are stored as FP16 (clipped to
+-65504); shared ones stay FP32. A ``Cast`` is inserted on every edge between an FP32 and an
FP16 tensor (one per tensor and direction). Model inputs and outputs stay FP32, cast on entry and
exit, so callers feed and read float32 as before. ``Resize``'s roi/scales and ``Upsample``'s
scales stay FP32 whatever the op's precision, as the ONNX spec requires for scales.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from cmdeploy.spec import PRECISION_KEY

FP16_MAX = 65504.0


DEFAULT_KEEP_FP32_OPS: frozenset[str] = frozenset(
    {
        # resampling
        "Resize",
        "Upsample",
        "GridSample",
        # long accumulations / averaging
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL1",
        "ReduceL2",
        "ReduceLogSum",
        "ReduceLogSumExp",
        "ReduceProd",
        "AveragePool",
        "GlobalAveragePool",
        # exponent-range outputs
        "Softmax",
        "LogSoftmax",
        "Sigmoid",
        "Exp",
        "Log",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Div",
        "Erf",
        "InstanceNormalization",
    }
)

# Ops whose float outputs have the type of their float inputs, and which ONNX defines for float16.
FP16_OPS: frozenset[str] = DEFAULT_KEEP_FP32_OPS | frozenset(
    {
        "Abs",
        "Add",
        "BatchNormalization",
        "Ceil",
        "Clip",
        "Concat",
        "Conv",
        "ConvTranspose",
        "DepthToSpace",
        "Elu",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "Gemm",
        "GlobalMaxPool",
        "HardSigmoid",
        "HardSwish",
        "Identity",
        "LeakyRelu",
        "MatMul",
        "Max",
        "MaxPool",
        "Mean",
        "Min",
        "Mul",
        "Neg",
        "PRelu",
        "Pad",
        "Relu",
        "Reshape",
        "Slice",
        "SpaceToDepth",
        "Split",
        "Squeeze",
        "Sub",
        "Sum",
        "Tanh",
        "Tile",
        "Transpose",
        "Unsqueeze",
        "Where",
    }
)

# (op type -> input indices that stay float32 whatever the node's precision)
_FP32_ONLY_INPUTS: dict[str, frozenset[int]] = {
    "Resize": frozenset({1, 2}),
    "Upsample": frozenset({1}),
}
_SUBGRAPH_ATTRS = (AttributeProto.GRAPH, AttributeProto.GRAPHS)
_FP16, _FP32 = 16, 32


def is_averaging_matrix(a: np.ndarray, atol: float = 1e-4) -> bool:
    """True for a non-negative matrix (stack) whose rows or columns each sum to 1."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 2 or a.size < 2 or not np.all(a >= 0):
        return False
    return bool(
        np.allclose(a.sum(axis=-1), 1.0, atol=atol) or np.allclose(a.sum(axis=-2), 1.0, atol=atol)
    )


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def _constant_value(node: onnx.NodeProto) -> TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == AttributeProto.TENSOR:
            return attr.t
    return None


def _to_fp16_tensor(t: TensorProto) -> TensorProto:
    arr = numpy_helper.to_array(t).astype(np.float32)
    half = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(half, t.name)


def _unique(name: str, taken: set[str]) -> str:
    candidate, i = name, 1
    while candidate in taken:
        candidate = f"{name}_{i}"
        i += 1
    taken.add(candidate)
    return candidate


def convert_to_fp16(
    model: onnx.ModelProto,
    *,
    keep_fp32_ops: Iterable[str] = DEFAULT_KEEP_FP32_OPS,
    keep_averaging_matmul: bool = True,
    node_prefixes: Iterable[str] | None = None,
) -> onnx.ModelProto:
    """Return an FP16 copy of ``model``; inputs/outputs stay float32 (see the module rule).

    Args:
        model: a float32 ONNX model (not modified). Control flow (If/Loop/Scan) is refused.
        keep_fp32_ops: op types kept in float32.
        keep_averaging_matmul: keep MatMul/Gemm with a constant averaging-matrix operand in FP32.
        node_prefixes: only nodes whose names start with one of these may run in FP16 (None:
            every node). :func:`fp16_node_prefixes` gives the fused graph's network scope, so its
            pixel-coordinate geometry stays FP32 (FP16 steps are 0.25 px at 512).

    Raises:
        ValueError: the model has control-flow sub-graphs.
    """
    keep = frozenset(keep_fp32_ops)
    prefixes = None if node_prefixes is None else tuple(node_prefixes)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        if any(a.type in _SUBGRAPH_ATTRS for a in node.attribute):
            raise ValueError(
                f"convert_to_fp16: node {node.name or node.op_type!r} ({node.op_type}) has a "
                "sub-graph; control flow is not supported"
            )

    types = _elem_types(onnx.shape_inference.infer_shapes(out).graph)
    constants: dict[str, TensorProto] = {i.name: i for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and (value := _constant_value(node)) is not None:
            constants[node.output[0]] = value

    def runs_fp16(node: onnx.NodeProto) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type not in FP16_OPS:
            return False
        if node.op_type in keep:
            return False
        if prefixes is not None and not node.name.startswith(prefixes):
            return False
        io = [n for n in list(node.input) + list(node.output) if n]
        if any(n not in types for n in io) or not any(types[n] == TensorProto.FLOAT for n in io):
            return False
        if keep_averaging_matmul and node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                if name in constants and is_averaging_matrix(
                    numpy_helper.to_array(constants[name])
                ):
                    return False
        return True

    nodes = list(graph.node)
    fp16_node = [runs_fp16(n) for n in nodes]

    def required(i: int, k: int) -> int:
        if fp16_node[i] and k not in _FP32_ONLY_INPUTS.get(nodes[i].op_type, ()):
            return _FP16
        return _FP32

    # home precision of every float32 tensor
    is_float = {n for n, t in types.items() if t == TensorProto.FLOAT}
    home: dict[str, int] = {}
    init_names = {i.name for i in graph.initializer}
    for vi in graph.input:
        if vi.name in is_float and vi.name not in init_names:
            home[vi.name] = _FP32
    for i, node in enumerate(nodes):
        for name in node.output:
            if name in is_float:
                home[name] = _FP16 if fp16_node[i] else _FP32
    consumers: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(nodes):
        for k, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((i, k))
    output_names = {o.name for o in graph.output}
    for name, tensor in constants.items():
        if tensor.data_type != TensorProto.FLOAT:
            continue
        uses = consumers.get(name, [])
        all_fp16 = bool(uses) and all(required(i, k) == _FP16 for i, k in uses)
        home[name] = _FP16 if all_fp16 and name not in output_names else _FP32

    taken = {n for node in nodes for n in list(node.input) + list(node.output)}
    taken |= {vi.name for vi in list(graph.input) + list(graph.output)} | init_names

    # Cast nodes keyed by (source tensor, target precision); emitted before their first user
    cast_nodes: dict[tuple[str, int], onnx.NodeProto] = {}

    # FP16 graph outputs: rename the producer's tensor, cast back to float32 under the old name
    for name in [o.name for o in graph.output]:
        if home.get(name) != _FP16:
            continue
        new = _unique(f"{name}_fp16", taken)
        for node in nodes:
            for seq in (node.output, node.input):
                for k, n in enumerate(seq):
                    if n == name:
                        seq[k] = new
        home[new] = home.pop(name)
        cast_nodes[(new, _FP32)] = helper.make_node(
            "Cast", [new], [name], name=_unique(f"{name}_to_fp32", taken), to=TensorProto.FLOAT
        )

    new_nodes: list[onnx.NodeProto] = []
    emitted: set[tuple[str, int]] = set()
    for i, node in enumerate(nodes):
        for k, name in enumerate(node.input):
            if not name or name not in home or home[name] == required(i, k):
                continue
            key = (name, required(i, k))
            if key not in cast_nodes:
                suffix = "fp16" if key[1] == _FP16 else "fp32"
                cast_out = _unique(f"{name}_to_{suffix}", taken)
                to = TensorProto.FLOAT16 if key[1] == _FP16 else TensorProto.FLOAT
                cast_nodes[key] = helper.make_node("Cast", [name], [cast_out], name=cast_out, to=to)
            if key not in emitted:
                new_nodes.append(cast_nodes[key])
                emitted.add(key)
            node.input[k] = cast_nodes[key].output[0]
        new_nodes.append(node)
    new_nodes.extend(c for key, c in cast_nodes.items() if key not in emitted)
    del graph.node[:]
    graph.node.extend(new_nodes)

    # store FP16 constants
    for idx, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT and home.get(init.name) == _FP16:
            graph.initializer[idx].CopyFrom(_to_fp16_tensor(init))
    for node in graph.node:
        if node.op_type == "Constant" and home.get(node.output[0]) == _FP16:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(_to_fp16_tensor(attr.t))

    del graph.value_info[:]
    props = {p.key: p for p in out.metadata_props}
    if PRECISION_KEY in props:
        props[PRECISION_KEY].value = "fp16"
    else:
        out.metadata_props.append(
            onnx.StringStringEntryProto(key=PRECISION_KEY, value="fp16")
        )
    return onnx.shape_inference.infer_shapes(out)


FUSED_NETWORK_PREFIX = "/network/"  # torch.onnx names the FusedSegmenter's network nodes so


def fp16_node_prefixes(model: onnx.ModelProto) -> tuple[str, ...] | None:
    """The node-name scope that may run in FP16: the network part of a fused-preprocessing graph
    (metadata ``cmdeploy.graph`` = ``fused``), None (everything) for other graphs."""
    meta = {p.key: p.value for p in model.metadata_props}
    return (FUSED_NETWORK_PREFIX,) if meta.get("cmdeploy.graph") == "fused" else None


def fp32_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of a converted model that compute in float32 (for reports and tests)."""
    types = _elem_types(onnx.shape_inference.infer_shapes(model).graph)
    return [
        n
        for n in model.graph.node
        if n.op_type != "Cast" and any(types.get(o) == TensorProto.FLOAT for o in n.output if o)
    ]
