"""FP16 conversion (cmdeploy.export.fp16): numerics vs FP32 in onnxruntime, graph structure."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cmdeploy.export.fp16 import (
    DEFAULT_KEEP_FP32_OPS,
    convert_to_fp16,
    fp32_nodes,
    is_averaging_matrix,
)
from cmdeploy.spec import PRECISION_KEY, ModelSpec

# FP16 has an 11-bit mantissa (relative step 2**-11 ~ 4.9e-4); weights and activations rounded
# through ~6 layers of a model whose outputs are O(1) stay well inside 1e-2 absolute.
ATOL = 1e-2
SIZE = 16


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tiny_psp(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-ReLU trunk, two PSP-style pooled branches upsampled by Resize, 1x1 head."""
    rng = np.random.default_rng(seed)

    def init(name, *shape, scale=0.3, positive=False):
        a = rng.normal(0.0, scale, shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)

    inits = [
        init("w1", 8, 3, 3, 3),
        init("b1", 8, scale=0.1),
        init("bn_s", 8, positive=True),
        init("bn_b", 8, scale=0.1),
        init("bn_m", 8, scale=0.1),
        init("bn_v", 8, positive=True),
        init("w2", 4, 8, 1, 1),
        init("w3", 4, 8, 1, 1),
        init("w4", 1, 16, 1, 1),
        numpy_helper.from_array(np.array([1, 1, SIZE, SIZE], np.float32), "up_all"),
        numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "up4"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        n("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn"]),
        n("Relu", ["bn"], ["r"]),
        n("GlobalAveragePool", ["r"], ["g"]),
        n("Conv", ["g", "w2"], ["g2"]),
        n("Relu", ["g2"], ["g3"]),
        n("Resize", ["g3", "", "up_all"], ["p1"], mode="nearest"),
        n("AveragePool", ["r"], ["a"], kernel_shape=[4, 4], strides=[4, 4]),
        n("Conv", ["a", "w3"], ["a2"]),
        n("Resize", ["a2", "", "up4"], ["p2"], mode="linear"),
        n("Concat", ["r", "p1", "p2"], ["cat"], axis=1),
        n("Conv", ["cat", "w4"], ["logits"]),
        n("Sigmoid", ["logits"], ["prob"]),
    ]
    model = _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, SIZE, SIZE]),
            helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, SIZE, SIZE]),
        ],
        inits,
    )
    helper.set_model_props(model, ModelSpec(input_size=32, target_size=24.0).to_metadata())
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: node for node in model.graph.node for o in node.output}


def is_cast_to(node: onnx.NodeProto | None, elem: int) -> bool:
    return (
        node is not None
        and node.op_type == "Cast"
        and any(a.name == "to" and a.i == elem for a in node.attribute)
    )


@pytest.fixture(scope="module")
def pair() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    model = tiny_psp()
    return model, convert_to_fp16(model)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(1).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)


def test_converted_model_is_valid_and_matches_fp32(pair, x):
    fp32, fp16 = pair
    onnx.checker.check_model(fp16, full_check=True)
    ref_logits, ref_prob = run(fp32, {"x": x})
    logits, prob = run(fp16, {"x": x})
    assert logits.dtype == prob.dtype == np.float32
    assert logits.shape == ref_logits.shape
    assert np.abs(ref_logits).max() > 0.3  # outputs are O(1), so ATOL is meaningful
    assert np.abs(logits - ref_logits).max() < ATOL
    assert np.abs(prob - ref_prob).max() < ATOL
    assert not np.array_equal(logits, ref_logits)  # FP16 rounding really happened


def test_weights_are_fp16_resize_scales_stay_fp32(pair):
    _, fp16 = pair
    dtypes = {t.name: t.data_type for t in fp16.graph.initializer}
    for name in ("w1", "b1", "bn_s", "bn_b", "bn_m", "bn_v", "w2", "w3", "w4"):
        assert dtypes[name] == TensorProto.FLOAT16, name
    assert dtypes["up_all"] == dtypes["up4"] == TensorProto.FLOAT


def test_kept_ops_take_fp32_inputs_through_casts(pair):
    _, fp16 = pair
    prod = producers(fp16)
    kept = [n for n in fp16.graph.node if n.op_type in DEFAULT_KEEP_FP32_OPS]
    assert sorted(n.op_type for n in kept) == [
        "AveragePool",
        "GlobalAveragePool",
        "Resize",
        "Resize",
        "Sigmoid",
    ]
    for node in kept:
        data = node.input[0]
        # every kept op's data input is an FP32 cast of an FP16 tensor, or the FP32 model output
        # cast that feeds Sigmoid
        assert is_cast_to(prod.get(data), TensorProto.FLOAT), (node.op_type, data)
    assert sorted(n.op_type for n in fp32_nodes(fp16)) == sorted(n.op_type for n in kept)


def test_heavy_ops_run_in_fp16(pair):
    _, fp16 = pair
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in onnx.shape_inference.infer_shapes(fp16).graph.value_info
    }
    convs = [n for n in fp16.graph.node if n.op_type in ("Conv", "BatchNormalization", "Relu")]
    assert len(convs) == 7
    for node in convs:
        assert types[node.output[0]] == TensorProto.FLOAT16, node.op_type


def test_model_io_and_metadata_unchanged(pair):
    fp32, fp16 = pair
    io = [
        (v.name, v.type.tensor_type.elem_type)
        for v in list(fp16.graph.input) + list(fp16.graph.output)
    ]
    assert io == [("x", 1), ("logits", 1), ("prob", 1)]
    meta = {p.key: p.value for p in fp16.metadata_props}
    assert ModelSpec.from_metadata(meta) == ModelSpec.from_metadata(
        {p.key: p.value for p in fp32.metadata_props}
    )
    assert meta[PRECISION_KEY] == "fp16"
    # the input model is left as it was
    assert all(t.data_type == TensorProto.FLOAT for t in fp32.graph.initializer)
    assert not any(n.op_type == "Cast" for n in fp32.graph.node)


def test_empty_keep_list_converts_resize_but_not_its_scales(x):
    fp32 = tiny_psp()
    fp16 = convert_to_fp16(fp32, keep_fp32_ops=())
    onnx.checker.check_model(fp16, full_check=True)
    assert fp32_nodes(fp16) == []
    dtypes = {t.name: t.data_type for t in fp16.graph.initializer}
    assert dtypes["up_all"] == TensorProto.FLOAT  # Resize scales must be float32 (ONNX spec)
    ref, got = run(fp32, {"x": x})[0], run(fp16, {"x": x})[0]
    assert np.abs(ref - got).max() < ATOL


def _matmul_model(w: np.ndarray) -> onnx.ModelProto:
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w.astype(np.float32), "w")],
    )


def test_averaging_matmul_stays_fp32_other_matmul_converts():
    rng = np.random.default_rng(2)
    avg = np.full((6, 2), 1 / 6)  # columns sum to 1: mean over the 6 inputs
    kept = convert_to_fp16(_matmul_model(avg))
    assert {t.name: t.data_type for t in kept.graph.initializer}["w"] == TensorProto.FLOAT
    assert [n.op_type for n in fp32_nodes(kept)] == ["MatMul"]

    plain = convert_to_fp16(_matmul_model(rng.normal(size=(6, 2))))
    assert {t.name: t.data_type for t in plain.graph.initializer}["w"] == TensorProto.FLOAT16
    assert fp32_nodes(plain) == []
    xs = rng.normal(size=(5, 6)).astype(np.float32)
    for m in (kept, plain):
        onnx.checker.check_model(m, full_check=True)
    np.testing.assert_allclose(run(kept, {"x": xs})[0], np.maximum(xs @ avg, 0), atol=1e-6)

    as_fp16 = convert_to_fp16(_matmul_model(avg), keep_averaging_matmul=False)
    assert {t.name: t.data_type for t in as_fp16.graph.initializer}["w"] == TensorProto.FLOAT16


def test_initializer_shared_by_fp16_and_fp32_ops_stays_fp32():
    w = numpy_helper.from_array(np.array([2.0, 4.0], np.float32), "w")
    model = _model(
        [
            helper.make_node("Mul", ["x", "w"], ["m"]),  # FP16
            helper.make_node("Div", ["m", "w"], ["y"]),  # kept FP32
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    fp16 = convert_to_fp16(model)
    onnx.checker.check_model(fp16, full_check=True)
    assert fp16.graph.initializer[0].data_type == TensorProto.FLOAT
    mul = next(n for n in fp16.graph.node if n.op_type == "Mul")
    assert is_cast_to(producers(fp16)[mul.input[1]], TensorProto.FLOAT16)
    xs = np.array([[1.5, -3.0], [0.25, 8.0]], np.float32)
    np.testing.assert_allclose(run(fp16, {"x": xs})[0], xs, rtol=1e-3)


def test_control_flow_is_refused():
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o"])],
        "b",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [2])],
    )
    model = _model(
        [helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)],
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [],
    )
    with pytest.raises(ValueError, match="sub-graph"):
        convert_to_fp16(model)


def test_large_weights_clip_to_fp16_range():
    model = _model(
        [helper.make_node("Mul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1e6, -1e6], np.float32), "w")],
    )
    w = numpy_helper.to_array(convert_to_fp16(model).graph.initializer[0])
    assert w.dtype == np.float16
    np.testing.assert_array_equal(w, [65504.0, -65504.0])


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(2, 6),
    cols=st.integers(2, 6),
    seed=st.integers(0, 2**31 - 1),
    axis=st.sampled_from([0, 1]),
)
def test_is_averaging_matrix_normalised_nonnegative(rows, cols, seed, axis):
    a = np.random.default_rng(seed).uniform(0.01, 1.0, (rows, cols))
    a /= a.sum(axis=axis, keepdims=True)
    assert is_averaging_matrix(a)
    b = a.copy()
    b[0, 0] = -b[0, 0]  # a negative weight is not an average
    assert not is_averaging_matrix(b)
    assert not is_averaging_matrix(a * 1.5)  # sums of 1.5
    assert not is_averaging_matrix(a[0])  # a vector is not a matrix
