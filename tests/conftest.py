"""Shared test fixtures: tiny cmdeploy ONNX models built with ``onnx.helper`` (no torch).

* :func:`build_random_plain_model`: input ``input`` (N, C, S, S) -> Conv+Relu -> Conv+Relu ->
  1x1 Conv -> ``logits`` (N, 1, S, S), random weights, ModelSpec in ``metadata_props``.
* :func:`build_identity_cm_model`: ``logits = 20 * (cm - 0.5)`` where ``cm`` is input channel 1, so
  the predicted mask is exactly the confidence-map region ``cm > 0.5`` (checks geometry end to end).
* :func:`build_fake_fused_model`: fused layout ``slices`` (B, H, W), ``points`` (B, 4, 2) ->
  ``probabilities = sigmoid(slices - left_x)``, i.e. mask = ``hu > left_x`` of that item's points.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from cmdeploy.spec import ModelSpec

OPSET = 17
IR_VERSION = 8
TEST_INPUT_SIZE = 64


def _save(graph, spec: ModelSpec, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cmdeploy-tests"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, spec.to_metadata())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_random_plain_model(
    path: Path, spec: ModelSpec | None = None, *, hidden: int = 8, seed: int = 0
) -> Path:
    """Random-weight plain model for ``spec`` (default: ``ModelSpec.for_input_size(64)``)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or ModelSpec.for_input_size(TEST_INPUT_SIZE)
    c = spec.num_channels
    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...], scale: float):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("w1", (hidden, c, 3, 3), 0.5),
        init("b1", (hidden,), 0.1),
        init("w2", (hidden, hidden, 3, 3), 0.3),
        init("b2", (hidden,), 0.1),
        init("w3", (1, hidden, 1, 1), 1.0),
        init("b3", (1,), 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["h1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Conv", ["r2", "w3", "b3"], ["logits"]),
    ]
    s = spec.input_size
    graph = helper.make_graph(
        nodes,
        "random_plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, s, s])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, s, s])],
        initializer=inits,
    )
    return _save(graph, spec, path)


def build_identity_cm_model(path: Path, spec: ModelSpec | None = None, *, gain: float = 20.0) -> Path:
    """Plain model with ``logits = gain * (input[:, 1:2] - 0.5)`` (channel 1 = the confidence map)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or ModelSpec.for_input_size(TEST_INPUT_SIZE)
    assert spec.channels[1] == "cm", "the identity model reads the confidence-map channel"
    c, s = spec.num_channels, spec.input_size

    def const(name: str, values: list, dtype=np.int64):
        return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)

    inits = [
        const("starts", [1]),
        const("ends", [2]),
        const("axes", [1]),
        const("half", [0.5], np.float32),
        const("gain", [gain], np.float32),
    ]
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["cm"]),
        helper.make_node("Sub", ["cm", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "identity_cm",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", c, s, s])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, s, s])],
        initializer=inits,
    )
    return _save(graph, spec, path)


def build_fake_fused_model(path: Path, spec: ModelSpec | None = None) -> Path:
    """Fused-layout model: ``probabilities = sigmoid(slices - points[:, 0:1, 0:1])`` (B, H, W)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = spec or ModelSpec.for_input_size(TEST_INPUT_SIZE)
    inits = [
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([1, 1], np.int64), "ends"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
    ]
    nodes = [
        helper.make_node("Slice", ["points", "starts", "ends", "axes"], ["left_x"]),  # (B, 1, 1)
        helper.make_node("Sub", ["slices", "left_x"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "fake_fused",
        [
            helper.make_tensor_value_info("slices", TensorProto.FLOAT, ["B", "H", "W"]),
            helper.make_tensor_value_info("points", TensorProto.FLOAT, ["B", 4, 2]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["B", "H", "W"])],
        initializer=inits,
    )
    return _save(graph, spec, path)


@pytest.fixture(scope="session", autouse=True)
def sigint_delivered() -> None:
    """Tests that interrupt a run need SIGINT to arrive: a shell that starts the suite in the
    background (``make test &``) ignores it, and children would inherit the ignore. A Python handler
    here is reset to the default across exec, so subprocesses get KeyboardInterrupt again."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def plain_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight plain model (input 2 x 64 x 64, guidance "cm")."""
    return build_random_plain_model(tmp_path_factory.mktemp("models") / "random_plain.onnx")


@pytest.fixture(scope="session")
def identity_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``logits = 20 * (cm - 0.5)``; a small zoom target keeps the whole cm > 0.5 region in the crop."""
    spec = ModelSpec.for_input_size(TEST_INPUT_SIZE, target_size=24.0)
    return build_identity_cm_model(tmp_path_factory.mktemp("models") / "identity_cm.onnx", spec)


@pytest.fixture(scope="session")
def fused_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fake_fused_model(tmp_path_factory.mktemp("models") / "fake_fused.onnx")
