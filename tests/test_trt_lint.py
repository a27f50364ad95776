"""TensorRT-compatibility lint (no TensorRT needed): one regression case per defect of issue 16,
the shipped models, and freshly exported / calibrated models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from cmdeploy.export import trt_ops
from cmdeploy.export.tensorrt_build import profile_shapes
from cmdeploy.export.trt_lint import lint_file, lint_model
from cmdeploy.spec import ModelSpec

MODELS = Path(__file__).resolve().parents[1] / "cmdeploy" / "models"
SPEC = ModelSpec(input_size=16, target_size=12.0)


def _model(nodes, inputs, outputs, inits=(), *, opset=17, spec=SPEC) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if spec is not None:
        helper.set_model_props(model, spec.to_metadata())
    return model


def _vi(name, dims, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, dims)


def _init(name, value, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def conv_qdq(*, zp_dtype=np.int8, zp=0, bias_int32=False, weight_axis=0) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(DQ(w int8 per channel), bias) -> y."""
    rng = np.random.default_rng(0)
    inits = [
        _init("s", 0.05),
        _init("zp", zp, zp_dtype),
        _init("wq", rng.integers(-100, 100, (4, 2, 3, 3)), np.int8),
        _init("ws", np.full(4 if weight_axis == 0 else 2, 0.01)),
        _init("wzp", np.zeros(4 if weight_axis == 0 else 2), np.int8),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], name="dq_w", axis=weight_axis),
    ]
    conv_inputs = ["xd", "w"]
    if bias_int32:
        inits += [_init("bq", [1, 2, 3, 4], np.int32), _init("bs", np.full(4, 0.0005))]
        inits.append(_init("bzp", np.zeros(4), np.int32))
        nodes.append(helper.make_node("DequantizeLinear", ["bq", "bs", "bzp"], ["b"], name="dq_b", axis=0))
        conv_inputs.append("b")
    else:
        inits.append(_init("b", np.zeros(4)))
        conv_inputs.append("b")
    nodes.append(helper.make_node("Conv", conv_inputs, ["y"], name="conv", pads=[1, 1, 1, 1]))
    return _model(nodes, [_vi("x", ["N", 2, 16, 16])], [_vi("y", ["N", 4, 16, 16])], inits)


# ------------------------------------------------------------------------------ the table
def test_operator_table_names_its_source_and_is_consistent():
    assert "onnx-tensorrt" in trt_ops.SOURCE and trt_ops.PARSER_VERSION in trt_ops.SOURCE
    assert "2026-02-02" in trt_ops.SOURCE
    assert not set(trt_ops.SUPPORTED) & trt_ops.UNSUPPORTED
    assert "AffineGrid" in trt_ops.UNSUPPORTED and "GridSample" in trt_ops.SUPPORTED
    # every op of the shipped graphs is in the table
    for path in MODELS.glob("*.onnx"):
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
        assert ops <= set(trt_ops.SUPPORTED), (path.name, ops - set(trt_ops.SUPPORTED))


# ------------------------------------------------------------------------------ regression cases
def test_clean_symmetric_qdq_conv_passes():
    report = lint_model(conv_qdq())
    assert report.ok, report.summary()
    assert report.codes == set()


@pytest.mark.parametrize(
    ("kwargs", "codes"),
    [
        ({"zp_dtype": np.uint8, "zp": 128}, {"qdq-type", "qdq-asymmetric", "dtype-uint8", "int8-target"}),
        ({"zp": 3}, {"qdq-asymmetric", "int8-target"}),
        ({"bias_int32": True}, {"qdq-bias", "int8-target"}),  # issue 16 item 2
        ({"weight_axis": 1}, {"qdq-axis"}),
    ],
)
def test_qdq_rules(kwargs, codes):
    report = lint_model(conv_qdq(**kwargs))
    assert not report.ok
    assert report.error_codes() == codes, report.summary()


def test_cpu_target_int8_says_calibrate_for_tensorrt():
    model = conv_qdq(zp_dtype=np.uint8, zp=128)
    helper.set_model_props(model, {**SPEC.to_metadata(), "cmdeploy.quant_target": "cpu"})
    (finding,) = [f for f in lint_model(model).errors if f.code == "int8-target"]
    assert "CPU-target INT8" in finding.message and "--target tensorrt" in finding.message


def _matmul_weight_model(axis: int | None, left: bool) -> onnx.ModelProto:
    """A constant (8, 8) matrix quantized per channel (or per tensor) times x (N, 8, 8)."""
    n = 8 if axis is not None else 1
    inits = [
        _init("mq", np.eye(8) * 100, np.int8),
        _init("ms", np.full(n, 0.01) if axis is not None else 0.01),
        _init("mzp", np.zeros(n) if axis is not None else 0, np.int8),
        _init("s", 0.05),
        _init("zp", 0, np.int8),
    ]
    dq = helper.make_node("DequantizeLinear", ["mq", "ms", "mzp"], ["m"], name="dq_m", axis=axis or 0)
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="dq"),
        dq,
        helper.make_node("MatMul", ["m", "xd"] if left else ["xd", "m"], ["y"], name="mm"),
    ]
    return _model(nodes, [_vi("x", ["N", 8, 8])], [_vi("y", ["N", 8, 8])], inits)


@pytest.mark.parametrize(
    ("axis", "left", "flagged"),
    [(1, True, True), (0, False, True), (0, True, False), (1, False, False), (None, True, False)],
)
def test_matmul_weight_per_channel_along_reduction_axis_is_flagged(axis, left, flagged):
    """Issue 16 item 7: the PSP head's constant left operands got per-channel scales on axis 1."""
    report = lint_model(_matmul_weight_model(axis, left))
    assert report.ok
    assert ("qdq-matmul-axis" in report.codes) == flagged, report.summary()


def test_per_channel_activation_scale_is_an_error():
    inits = [_init("s", np.full(2, 0.05)), _init("zp", np.zeros(2), np.int8)]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q", axis=1),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq", axis=1),
    ]
    report = lint_model(_model(nodes, [_vi("x", ["N", 2, 4, 4])], [_vi("y", ["N", 2, 4, 4])], inits))
    assert report.error_codes() == {"qdq-axis"}


def test_affine_grid_is_unsupported():
    nodes = [helper.make_node("AffineGrid", ["theta", "size"], ["grid"], name="ag")]
    inits = [_init("size", [1, 1, 8, 8], np.int64)]
    model = _model(nodes, [_vi("theta", [1, 2, 3])], [_vi("grid", [1, 8, 8, 2])], inits, opset=20)
    (f,) = [f for f in lint_model(model).errors if f.code == "op-unsupported"]
    assert "AffineGrid" in f.message and "GridSample" in f.message and f.node == "ag"


def _grid_sample(opset: int, mode: str) -> onnx.ModelProto:
    nodes = [helper.make_node("GridSample", ["x", "g"], ["y"], name="gs", mode=mode, align_corners=1)]
    ins = [_vi("x", ["N", 1, 8, 8]), _vi("g", ["N", 4, 4, 2])]
    return _model(nodes, ins, [_vi("y", ["N", 1, 4, 4])], opset=opset)


def test_gridsample_from_opset_20_is_refused():
    assert lint_model(_grid_sample(17, "bilinear")).ok
    assert lint_model(_grid_sample(19, "bilinear")).ok
    report = lint_model(_grid_sample(20, "linear"))
    assert "gridsample-opset" in report.error_codes()
    assert "opset" not in report.codes  # opset 20 itself is inside TensorRT 10.0's range


@pytest.mark.parametrize(("opset", "severity"), [(8, "error"), (21, "warning"), (25, "error")])
def test_opset_range(opset, severity):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    model = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], opset=opset)
    assert [f.severity for f in lint_model(model).findings if f.code == "opset"] == [severity]


def _range_model(integer: bool) -> onnx.ModelProto:
    """arange(W) of a dynamic input width: float Range, or integer Range + Cast."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),
        helper.make_node("Squeeze", ["shape", "ax0"], ["w"]),
    ]
    inits = [_init("ax0", [0], np.int64)]
    if integer:
        inits += [_init("zero", 0, np.int64), _init("one", 1, np.int64)]
        nodes += [
            helper.make_node("Range", ["zero", "w", "one"], ["r"], name="range"),
            helper.make_node("Cast", ["r"], ["y"], to=TensorProto.FLOAT),
        ]
    else:
        inits += [_init("zero", 0.0), _init("one", 1.0)]
        nodes += [
            helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
            helper.make_node("Range", ["zero", "wf", "one"], ["y"], name="range"),
        ]
    return _model(nodes, [_vi("x", ["N", "width"])], [_vi("y", ["width"])], inits)


def test_float_range_with_runtime_bounds_is_flagged():
    assert lint_model(_range_model(integer=True)).ok
    report = lint_model(_range_model(integer=False))
    assert report.error_codes() == {"range-float"}


def test_float64_anywhere_is_an_error():
    nodes = [
        helper.make_node("Cast", ["x"], ["xd"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["xd", "tiny"], ["yd"]),
        helper.make_node("Cast", ["yd"], ["y"], to=TensorProto.FLOAT),
    ]
    model = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 4])], [_init("tiny", 1e-300, np.float64)])
    (f,) = lint_model(model).errors
    assert f.code == "dtype-float64" and "--fused-geometry float32" in f.message


@pytest.mark.parametrize(
    ("node", "code"),
    [
        (helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="cubic"), "op-restriction"),
        (helper.make_node("MaxPool", ["x"], ["y", "idx"], kernel_shape=[1, 1]), "op-restriction"),
        (helper.make_node("Unique", ["x"], ["y"]), "op-unsupported"),
        (helper.make_node("FancyOp", ["x"], ["y"]), "op-unknown"),
        (helper.make_node("QLinearSigmoid", ["x"], ["y"], domain="com.microsoft"), "op-domain"),
    ],
)
def test_operator_findings(node, code):
    outs = [_vi("y", None)] + ([_vi("idx", None, TensorProto.INT64)] if len(node.output) > 1 else [])
    model = _model([node], [_vi("x", ["N", 2, 4, 4])], outs, [_init("sc", [1, 1, 1, 1])])
    assert code in lint_model(model).error_codes()


def test_dynamic_axes_need_profile_ranges():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    fused_like = _model(
        nodes, [_vi("x", ["batch", "height", "width"])], [_vi("y", ["batch", "height", "width"])]
    )
    report = lint_model(fused_like)
    assert report.ok and report.profiles["x"]["max"] == [32, 1024, 1024]
    unnamed = _model(nodes, [_vi("x", ["N", 2, None])], [_vi("y", ["N", 2, None])])
    assert "profile" in lint_model(unnamed).error_codes()
    # a profile that disagrees with the static axes, or is unordered
    bad = {"x": {"min": [1, 3, 8], "opt": [4, 3, 8], "max": [8, 3, 8]}}
    assert (
        "profile"
        in lint_model(
            _model(nodes, [_vi("x", ["N", 2, 8])], [_vi("y", ["N", 2, 8])]), profiles=bad
        ).error_codes()
    )
    fine = profile_shapes({"x": ("N", 2, 8)}, 1, 2, 4)
    assert lint_model(_model(nodes, [_vi("x", ["N", 2, 8])], [_vi("y", ["N", 2, 8])]), profiles=fine).ok


# ------------------------------------------------------------------------------ shipped models
def _shipped(name: str) -> Path:
    path = MODELS / name
    if not path.is_file():
        pytest.skip(f"{name} not shipped")
    return path


def test_shipped_plain_model_is_tensorrt_compatible():
    report = lint_file(_shipped("cmdeploy-default.onnx"))
    assert report.ok and not report.warnings, report.summary()
    assert report.profiles["input"]["min"][0] == 1


def test_shipped_cpu_int8_model_is_not_tensorrt_compatible():
    """The shipped INT8 model is the CPU target (uint8, asymmetric, INT32 biases): reported with
    the action to take."""
    report = lint_file(_shipped("cmdeploy-default.int8.onnx"))
    assert not report.ok
    assert {"qdq-type", "dtype-uint8", "int8-target"} <= report.error_codes(), report.summary()
    (f,) = [f for f in report.errors if f.code == "int8-target"]
    assert "CPU-target INT8" in f.message and "cmdeploy calibrate" in f.message
    assert "--target tensorrt" in f.message


def test_shipped_fused_model_findings_follow_its_geometry():
    """The fused model shipped before this fix carries float64 geometry and a float Range; one
    exported by this code with float32 geometry (`make model`) has no findings."""
    path = _shipped("cmdeploy-default.fused.onnx")
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    report = lint_model(model, source=path.name)
    assert report.error_codes() <= {"dtype-float64", "range-float"}, report.summary()
    assert ("dtype-float64" in report.error_codes()) == (
        meta.get("cmdeploy.fused_geometry_dtype") == "float64"
    )
    assert "op-unsupported" not in report.codes and "gridsample-opset" not in report.codes
    assert report.profiles["slices"]["opt"] == [8, 512, 512]


# ------------------------------------------------------------------------------ CLI
def _verify(*args: str):
    from cmdeploy.cli import app

    return CliRunner().invoke(app, ["verify", *args])


def test_cli_verify_target_tensorrt(tmp_path):
    res = _verify("--target", "tensorrt", str(_shipped("cmdeploy-default.onnx")))
    assert res.exit_code == 0, res.output
    assert "TensorRT-compatible" in res.output and "10.15" in res.output
    res = _verify("--target", "tensorrt", str(_shipped("cmdeploy-default.int8.onnx")))
    assert res.exit_code == 1 and "NOT TensorRT-compatible" in res.output
    assert "--target tensorrt" in res.output
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"not a model")
    for args, message, code in (
        (["--target", "tensorrt", str(bad)], "cannot read as ONNX", 3),  # a corrupt model: 3 everywhere
        (["--target", "tensorrt", str(tmp_path / "missing.onnx")], "not found", 2),
        (["--target", "gpu", str(bad)], "--target must be one of", 2),
        (["--target", "tensorrt", str(bad), str(bad)], "only MODEL_A", 2),
        ([str(bad)], "give two models", 2),
    ):
        res = _verify(*args)
        assert res.exit_code == code and message in res.output, (args, res.output)


def test_cli_verify_profile_options(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    path = tmp_path / "hw.onnx"
    onnx.save(
        _model(nodes, [_vi("x", ["batch", "height", "width"])], [_vi("y", ["batch", "height", "width"])]),
        path,
    )
    res = _verify(
        "--target",
        "tensorrt",
        str(path),
        "--slice-sizes",
        "64,256,512",
        "--opt-batch",
        "2",
        "--max-batch",
        "4",
    )
    assert res.exit_code == 0, res.output
    assert "max [4, 512, 512]" in res.output
    res = _verify("--target", "tensorrt", str(path), "--slice-sizes", "512,256,64")
    assert res.exit_code == 2 and "MIN <= OPT <= MAX" in res.output


# ------------------------------------------------------------------------------ fresh models
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from cmdeploy.train.checkpoint import Checkpoint
    from cmdeploy.train.model import build_model, make_config

    torch.manual_seed(0)
    spec = ModelSpec.for_input_size(64)
    cfg = make_config("compact", 2, depth=18, base_width=8, input_size=64, psp_channels=16)
    path = tmp_path_factory.mktemp("lint") / "tiny.pt"
    Checkpoint.from_model(build_model(cfg).eval(), spec).save(path)
    return path


def test_fresh_plain_export_is_compatible(tiny_checkpoint, tmp_path):
    from cmdeploy.export.onnx_export import export_onnx

    export_onnx(tiny_checkpoint, tmp_path / "plain.onnx", check_parity=False)
    report = lint_file(tmp_path / "plain.onnx")
    assert report.ok and not report.warnings, report.summary()


@pytest.fixture(scope="module")
def fused32(tiny_checkpoint) -> Path:
    from cmdeploy.export.fused import export_fused

    out = tiny_checkpoint.with_name("fused32.onnx")
    export_fused(tiny_checkpoint, out, check_parity=False, geometry_dtype="float32")
    return out


def test_fresh_fused_export_float32_is_compatible(fused32):
    """Issue 16 item 9: no AffineGrid, opset <= 19, no float64, integer Range + Cast."""
    model = onnx.load(str(fused32))
    report = lint_model(model)
    assert report.ok and not report.warnings, report.summary()
    ops = [n.op_type for n in model.graph.node]
    assert "AffineGrid" not in ops and "GridSample" not in ops  # separable whole-row Gathers
    assert "GatherElements" not in ops
    ranges = [n for n in model.graph.node if n.op_type == "Range"]
    users = {t: n for n in model.graph.node for t in n.input}
    # the two dynamic pixel grids: integer Range + Cast (the lint above refuses a float Range with
    # dynamic bounds); the others are the integer batch offsets (b * rows) of the row gathers
    assert len([r for r in ranges if users[r.output[0]].op_type == "Cast"]) == 2
    assert report.profiles["slices"]["max"] == [32, 1024, 1024]


def test_fresh_fused_export_float64_reports_only_fp64(tiny_checkpoint, tmp_path):
    from cmdeploy.export.fused import export_fused

    export_fused(tiny_checkpoint, tmp_path / "f64.onnx", check_parity=False)
    assert lint_file(tmp_path / "f64.onnx").error_codes() == {"dtype-float64"}


def test_fused_export_refuses_opset_20(tiny_checkpoint, tmp_path):
    from cmdeploy.export.fused import export_fused

    with pytest.raises(ValueError, match="16..19.*linear"):
        export_fused(tiny_checkpoint, tmp_path / "f20.onnx", check_parity=False, opset=20)
    assert not (tmp_path / "f20.onnx").exists()


def test_fp16_fused_graph_keeps_geometry_fp32_and_passes_lint(fused32, tmp_path):
    from cmdeploy.export.fp16 import convert_to_fp16, fp16_node_prefixes, fp32_nodes

    model = onnx.load(str(fused32))
    assert fp16_node_prefixes(model) == ("/network/",)
    model16 = convert_to_fp16(model, node_prefixes=fp16_node_prefixes(model))
    report = lint_model(model16)
    assert report.ok, report.summary()
    fp32 = {n.name for n in fp32_nodes(model16)}
    geometry = [n.name for n in model.graph.node if not n.name.startswith("/network/")]
    float_geometry = [n for n in geometry if n in {m.name for m in model16.graph.node}]
    network_convs = [n.name for n in model16.graph.node if n.op_type == "Conv"]
    assert network_convs and not set(network_convs) & fp32  # the network runs in FP16
    types = {vi.name: vi.type.tensor_type.elem_type for vi in model16.graph.value_info}
    for n in model16.graph.node:
        if n.name in float_geometry:
            assert all(types.get(o) != TensorProto.FLOAT16 for o in n.output), n.name


def test_tensorrt_target_calibration_passes_lint(tmp_path, tiny_checkpoint):
    """Issue 16 items 2 and 7: no INT32 bias DequantizeLinear, MatMul weights per tensor."""
    from cmdeploy.calibration.quantize import Recipe, calibrate_ranges, prepare, quantize
    from cmdeploy.calibration.slices import SliceObject
    from cmdeploy.export.onnx_export import export_onnx
    from cmdeploy.export.parity import ct_small_cases

    plain = tmp_path / "plain.onnx"
    export_onnx(tiny_checkpoint, plain, check_parity=False)
    objects = [
        SliceObject(c.name, "ct_small", 0, 0, c.slice_hu, np.zeros(c.slice_hu.shape, bool), c.points)
        for c in ct_small_cases()
    ]
    results = {}
    for target in ("tensorrt", "cpu"):
        recipe = Recipe(target)
        (tmp_path / target).mkdir()
        prepared = prepare(plain, recipe, tmp_path / target)
        model = quantize(prepared, calibrate_ranges(prepared, objects, recipe, batch_size=4), recipe)
        helper.set_model_props(
            model,
            {**{p.key: p.value for p in prepared.model.metadata_props}, "cmdeploy.quant_target": target},
        )
        results[target] = (model, lint_model(model, source=target))
    model, report = results["tensorrt"]
    assert report.ok and not report.warnings, report.summary()
    types = {i.name: i.data_type for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(types.get(n.input[0]) != TensorProto.INT32 for n in dq)
    matmul_dq = [
        n
        for n in dq
        if any(u.op_type == "MatMul" for u in model.graph.node if n.output[0] in u.input)
        and n.input[0] in types
    ]
    assert matmul_dq
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert all(inits[n.input[1]].size == 1 for n in matmul_dq)  # per tensor
    record = Recipe("tensorrt").describe()
    assert record["quantize_bias"] is False and record["matmul_weights"] == "per_tensor"
    cpu_model, cpu_report = results["cpu"]
    assert "int8-target" in cpu_report.error_codes() and "qdq-bias" in cpu_report.error_codes()
    assert json.dumps(Recipe("cpu").describe())  # serialisable record
