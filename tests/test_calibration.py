"""INT8 calibration: graph rewrites, QDQ models, the accuracy gate, caches and the CLI.

The model is a small ResNet-PSP (depth 18, base width 8, input 64) with random weights, exported
by :func:`cmdeploy.export.onnx_export.export_onnx`; its classifier bias is centred so about half
of the crop pixels are foreground (a random model otherwise predicts nothing, and Dice would not
react to anything). Calibration uses the real CT_small.dcm slice with hand-placed extreme points.
Evaluation objects are HU-band components of that slice whose *reference masks are the FP32
model's own masks*: FP32 Dice is then 100 and INT8 Dice measures agreement with FP32, which is
what a gate on a random-weight model can meaningfully check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cmdeploy.calibration import gate as gate_mod
from cmdeploy.calibration.gate import (
    calibrate_model,
    conv_sensitivity,
    make_session,
    run_gate,
)
from cmdeploy.calibration.graph import check_plain, output_tail, space_to_depth_first_conv
from cmdeploy.calibration.quantize import (
    INT8_KEY,
    RangeCache,
    Recipe,
    calibrate_ranges,
    parse_trt_calibration_cache,
    prepare,
    qdq_summary,
    quantize,
    trt_cache_tensors,
    trt_calibration_cache,
    trt_version_number,
)
from cmdeploy.calibration.reader import SliceCalibrationReader, prepare_objects
from cmdeploy.calibration.slices import (
    CaseVolume,
    DataSplit,
    SliceObject,
    load_split,
    sample_objects,
    slice_objects,
)
from cmdeploy.errors import ModelError
from cmdeploy.evaluation.metrics import dice
from cmdeploy.preprocess import prepare_batch, probabilities_to_slice, sigmoid
from cmdeploy.spec import ModelSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs"
SIZE = 64
TAIL = ["/head/classifier/Conv", "/upsample/MatMul", "/upsample/MatMul_1"]
# hand-placed on CT_small.dcm (128 x 128), (x, y) left, right, top, bottom
HAND_POINTS = {
    "spinal_canal": [[47, 52], [71, 51], [59, 42], [59, 61]],
    "vertebral_body": [[44, 25], [79, 25], [60, 2], [60, 40]],
    "aorta": [[73, 10], [109, 8], [92, 0], [92, 26]],
    "rib": [[4, 63], [30, 60], [16, 55], [20, 75]],
    "posterior_arch": [[41, 60], [84, 60], [60, 48], [60, 82]],
    "bright_spot": [[57, 94], [61, 94], [59, 92], [59, 96]],
}


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ct_small() -> np.ndarray:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    return (ds.pixel_array.astype(np.float32) * slope + intercept).astype(np.float32)


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.for_input_size(SIZE)


@pytest.fixture(scope="module")
def calib_objects(ct_small) -> list[SliceObject]:
    empty = np.zeros(ct_small.shape, bool)
    return [
        SliceObject(f"ct_small:{k}", "ct_small", 0, 0, ct_small, empty, np.asarray(p, np.float32))
        for k, p in HAND_POINTS.items()
    ]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory, ct_small, spec) -> Path:
    torch = pytest.importorskip("torch")
    from cmdeploy.export.onnx_export import export_onnx
    from cmdeploy.train.checkpoint import Checkpoint
    from cmdeploy.train.model import build_model, make_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("int8")
    net = build_model(make_config("compact", spec.num_channels, base_width=8, input_size=SIZE)).eval()
    with torch.no_grad():
        net.head.classifier.weight.normal_(0.0, 0.3)
    Checkpoint.from_model(net, spec).save(folder / "small.pt")
    path = folder / "small.onnx"
    export_onnx(folder / "small.pt", path, check_parity=False)
    # centre the classifier bias on the median logit of real crops: ~half the pixels foreground
    model = onnx.load(str(path))
    x = prepare_objects(_band_objects(ct_small), spec)
    median = float(np.median(make_session(path).run(None, {"input": x})[0]))
    for init in model.graph.initializer:
        if init.name == "head.classifier.bias":
            centred = numpy_helper.to_array(init) - np.float32(median)
            init.CopyFrom(numpy_helper.from_array(centred, init.name))
    onnx.save(model, str(path))
    return path


def _band_objects(hu: np.ndarray) -> list[SliceObject]:
    """Components of HU bands (< -100, -100..100, 100..300, >= 300) of one slice."""
    bands = np.digitize(hu, [-100.0, 100.0, 300.0]).astype(np.int32) + 1
    return slice_objects(CaseVolume("ct_small", hu[None], bands[None]), 0)


@pytest.fixture(scope="module")
def eval_objects(small_model, ct_small, spec) -> list[SliceObject]:
    """Band objects whose reference masks are the FP32 model's masks (FP32 Dice = 100)."""
    objs = _band_objects(ct_small)
    x, transforms = prepare_batch([o.slice_hu for o in objs], [o.points for o in objs], spec)
    probs = sigmoid(make_session(small_model).run(None, {"input": x})[0][:, 0])
    out = []
    for o, p, t in zip(objs, probs, transforms, strict=True):
        ref = probabilities_to_slice(p, t, ct_small.shape) > spec.threshold
        out.append(SliceObject(o.source, o.case, 0, o.label, o.slice_hu, ref, o.points))
    return out


@pytest.fixture(scope="module")
def split(calib_objects, eval_objects) -> DataSplit:
    return DataSplit(calib_objects, eval_objects, ["ct_small"], ["ct_small"])


@pytest.fixture(scope="module")
def prepared_cpu(small_model, tmp_path_factory):
    return prepare(small_model, Recipe("cpu"), tmp_path_factory.mktemp("prep_cpu"))


@pytest.fixture(scope="module")
def ranges_cpu(prepared_cpu, calib_objects):
    return calibrate_ranges(prepared_cpu, calib_objects, Recipe("cpu"), batch_size=4)


@pytest.fixture(scope="module")
def int8_cpu(prepared_cpu, ranges_cpu) -> onnx.ModelProto:
    return quantize(prepared_cpu, ranges_cpu, Recipe("cpu"))


# ------------------------------------------------------------------------------ graph rewrites
def _conv_model(cin: int, k: int, p: int, h: int, w: int, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(rng.standard_normal((5, cin, k, k)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(5).astype(np.float32), "b")
    node = helper.make_node(
        "Conv",
        ["input", "w", "b"],
        ["y"],
        name="stem",
        kernel_shape=[k, k],
        strides=[2, 2],
        pads=[p, p, p, p],
    )
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [2, cin, h, w])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, None, None])
    g = helper.make_graph([node], "g", [x], [y], [weight, bias])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@settings(max_examples=20, deadline=None)
@given(
    cin=st.integers(1, 3),
    k=st.sampled_from([1, 2, 3, 5, 7]),
    p=st.integers(0, 3),
    h=st.sampled_from([8, 10, 16]),
    w=st.sampled_from([6, 12]),
    seed=st.integers(0, 1000),
)
def test_space_to_depth_rewrite_is_exact(cin, k, p, h, w, seed):
    """SpaceToDepth + stride-1 conv reproduces any stride-2 stem conv (float rounding only)."""
    assume(k <= min(h, w) + 2 * p)
    model = _conv_model(cin, k, p, h, w, seed)
    x = np.random.default_rng(seed + 1).standard_normal((2, cin, h, w)).astype(np.float32)
    ref = make_session(model).run(None, {"input": x})[0]
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    assert space_to_depth_first_conv(rewritten) == "stem"
    onnx.checker.check_model(rewritten)
    assert [n.op_type for n in rewritten.graph.node] == ["SpaceToDepth", "Conv"]
    got = make_session(rewritten).run(None, {"input": x})[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_space_to_depth_skips_other_convs():
    model = _conv_model(2, 3, 1, 8, 8, 0)
    for a in model.graph.node[0].attribute:
        if a.name == "strides":
            a.ints[:] = [1, 1]
    assert space_to_depth_first_conv(model) is None
    assert [n.op_type for n in model.graph.node] == ["Conv"]


def test_bilinear_matrix_is_the_models_upsampling():
    """The matrix the rewrite looks for is the model's (one implementation) and is torch's bilinear."""
    torch = pytest.importorskip("torch")
    model = pytest.importorskip("cmdeploy.train.model")
    from cmdeploy.calibration.graph import bilinear_matrix

    torch.set_num_threads(1)
    assert bilinear_matrix is model.bilinear_matrix
    rng = np.random.default_rng(0)
    for n_in, n_out in [(1, 8), (2, 8), (3, 8), (6, 32), (8, 64), (5, 3)]:
        x = rng.standard_normal((n_in, n_in))
        want = torch.nn.functional.interpolate(
            torch.from_numpy(x)[None, None], size=(n_out, n_out), mode="bilinear", align_corners=False
        )[0, 0].numpy()
        m = bilinear_matrix(n_in, n_out).astype(np.float64)
        np.testing.assert_allclose(m @ x @ m.T, want, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 7), out=st.sampled_from([8, 13, 32]), c=st.integers(1, 3))
def test_resize_rewrite_is_exact(b, out, c):
    """U_h @ x @ U_w^T with bilinear matrices == Resize(linear, half_pixel)."""
    from cmdeploy.calibration.graph import bilinear_matrix, resize_bilinear_matmuls

    uh = numpy_helper.from_array(bilinear_matrix(b, out).astype(np.float32), "uh")
    uwt = numpy_helper.from_array(bilinear_matrix(b, out).T.copy().astype(np.float32), "uwt")
    nodes = [
        helper.make_node("MatMul", ["uh", "input"], ["t"], name="up"),
        helper.make_node("MatMul", ["t", "uwt"], ["y"], name="up_1"),
    ]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", c, b, b])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", c, out, out])
    model = helper.make_model(
        helper.make_graph(nodes, "r", [x], [y], [uh, uwt]), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    feed = np.random.default_rng(b * 100 + out).standard_normal((2, c, b, b)).astype(np.float32)
    ref = make_session(model).run(None, {"input": feed})[0]
    assert resize_bilinear_matmuls(model) == ["up"]
    assert [n.op_type for n in model.graph.node] == ["Shape", "Concat", "Resize"]
    np.testing.assert_allclose(make_session(model).run(None, {"input": feed})[0], ref, atol=1e-5)


def test_output_tail_is_last_conv_and_upsampling(small_model):
    model = onnx.load(str(small_model))
    assert output_tail(model) == TAIL
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}  # folded by export


def _fused_model(spec: ModelSpec) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("slices", TensorProto.FLOAT, [1, 8, 8])
    pts = helper.make_tensor_value_info("points", TensorProto.FLOAT, [1, 4, 2])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 8, 8])
    g = helper.make_graph([helper.make_node("Identity", ["slices"], ["probabilities"])], "f", [x, pts], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(model, spec.to_metadata())
    return model


def test_check_plain_refuses_fused_graph(spec):
    with pytest.raises(ModelError, match="fused-preprocessing graph"):
        check_plain(_fused_model(spec))


def test_prepare_folds_batchnorm(spec, tmp_path):
    """A Conv+BatchNormalization graph is folded by the pre-processing (and then accepted)."""
    rng = np.random.default_rng(0)

    def init(name, *shape, positive=False):
        a = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a, name)

    nodes = [
        helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], name="bn1"),
        helper.make_node("Relu", ["bn"], ["r"], name="relu1"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["logits"], name="classifier", kernel_shape=[1, 1]),
    ]
    inits = [init("w1", 8, 2, 3, 3), init("g", 8), init("b", 8), init("m", 8), init("v", 8, positive=True)]
    inits += [init("w2", 1, 8, 1, 1), init("b2", 1)]
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 2, SIZE, SIZE])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 1, SIZE, SIZE])
    model = helper.make_model(
        helper.make_graph(nodes, "bn", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    helper.set_model_props(model, spec.to_metadata())
    with pytest.raises(ModelError, match="BatchNormalization"):
        check_plain(model)
    onnx.save(model, str(tmp_path / "bn.onnx"))
    prepared = prepare(tmp_path / "bn.onnx", Recipe("cpu"), tmp_path)
    assert [n.op_type for n in prepared.model.graph.node] == ["Conv", "Relu", "Conv"]
    assert prepared.tail == ["classifier"]


# ------------------------------------------------------------------------------ reader
def test_reader_streams_prepare_batch(calib_objects, spec):
    reader = SliceCalibrationReader(calib_objects, spec, batch_size=4)
    assert len(reader) == reader.num_batches == 2
    batches = [b["input"] for b in iter(reader.get_next, None)]
    assert [b.shape for b in batches] == [(4, 2, SIZE, SIZE), (2, 2, SIZE, SIZE)]
    ref, _ = prepare_batch([o.slice_hu for o in calib_objects], [o.points for o in calib_objects], spec)
    np.testing.assert_array_equal(np.concatenate(batches), ref)
    assert reader.get_next() is None
    reader.rewind()
    assert reader.get_next()["input"].shape[0] == 4
    reader.set_range(1, 2)
    assert len(reader) == 1 and reader.get_next()["input"].shape[0] == 2 and reader.get_next() is None


def test_sample_objects_is_seeded_and_bounded(ct_small):
    bands = np.digitize(ct_small, [-100.0, 100.0, 300.0]).astype(np.int32) + 1
    vol = CaseVolume("c", np.stack([ct_small, ct_small]), np.stack([bands, bands]))
    a = sample_objects([vol], 5, seed=3)
    b = sample_objects([vol], 5, seed=3)
    assert [o.source for o in a] == [o.source for o in b] and len(a) == 5
    assert [o.source for o in sample_objects([vol], 5, seed=4)] != [o.source for o in a]
    for o in a:  # points are the mask's extreme points
        ys, xs = np.nonzero(o.mask)
        assert o.points[0, 0] == xs.min() and o.points[1, 0] == xs.max()
        assert o.points[2, 1] == ys.min() and o.points[3, 1] == ys.max()


# ------------------------------------------------------------------------------ QDQ model
def test_cpu_qdq_graph_runs_close_to_fp32(prepared_cpu, int8_cpu, small_model, eval_objects, spec):
    """Q/DQ inserted, last conv + upsampling float, uint8 activations; probabilities close to FP32.

    Tolerance on sigmoid probabilities of random-weight logits (std ~3): mean |dp| <= 0.03 and
    99th percentile |dp| <= 0.2 over all crop pixels (measured 0.014 and 0.12; the collapsed-range
    calibration of the gate test gives a mean of 0.5) of the evaluation objects.
    """
    summary = qdq_summary(int8_cpu)
    assert summary["quantize_linear"] > 20 and summary["dequantize_linear"] > 20
    assert summary["float_convs"] == ["/head/classifier/Conv"]
    assert summary["activation_dtypes"] == ["uint8"]
    ops = [n.op_type for n in int8_cpu.graph.node]
    assert "SpaceToDepth" in ops  # stem rewrite (CPU target), moving uint8 data
    producer = {o: n for n in int8_cpu.graph.node for o in n.output}
    s2d = next(n for n in int8_cpu.graph.node if n.op_type == "SpaceToDepth")
    assert s2d.input[0] in producer and producer[s2d.input[0]].op_type == "QuantizeLinear"
    assert prepared_cpu.tail == TAIL and len(prepared_cpu.uint8_weights) == 4  # pooling matrices
    assert ops.count("Resize") == 4  # branch upsampling
    # nothing after the last conv is quantized
    for n in int8_cpu.graph.node:
        if n.name in TAIL:
            weights = [producer.get(t) for t in n.input[1:]]
            assert all(w is None or w.op_type != "DequantizeLinear" for w in weights)
    assert ops[-1] == "MatMul" and int8_cpu.graph.output[0].name == "logits"
    x = prepare_objects(eval_objects, spec)
    p32 = sigmoid(make_session(small_model).run(None, {"input": x})[0])
    p8 = sigmoid(make_session(int8_cpu).run(None, {"input": x})[0])
    diff = np.abs(p32 - p8)
    assert diff.mean() <= 0.03 and np.percentile(diff, 99) <= 0.2


def test_onnxruntime_fuses_the_head_matmuls(int8_cpu, tmp_path):
    """Every pooling MatMul becomes a QLinearMatMul (uint8 constant matrices on the left)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(int8_cpu.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearMatMul") == 8  # 4 branches x 2 pooling MatMuls
    assert ops.count("MatMul") == 2  # the final upsampling, float
    assert "Relu" not in ops  # folded into QLinearConv / QLinearAdd


def test_exclude_nodes_stay_float(prepared_cpu, ranges_cpu):
    name = "/backbone/layer2/layer2.0/conv1/Conv"
    model = quantize(prepared_cpu, ranges_cpu, Recipe("cpu"), exclude=[name])
    assert qdq_summary(model)["float_convs"] == [name, "/head/classifier/Conv"]
    with pytest.raises(ModelError, match="no node named"):
        quantize(prepared_cpu, ranges_cpu, Recipe("cpu"), exclude=["/no/such/Conv"])


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_clip_within_minmax(prepared_cpu, ranges_cpu, calib_objects, method):
    """Entropy / percentile ranges cover the same tensors and never exceed the MinMax range."""
    ranges = calibrate_ranges(prepared_cpu, calib_objects, Recipe("cpu", method), batch_size=3)
    assert ranges.keys() == ranges_cpu.keys()
    for name, (lo, hi) in ranges.items():
        mlo, mhi = ranges_cpu[name]
        span = mhi - mlo
        assert lo >= mlo - 0.01 * span - 1e-6 and hi <= mhi + 0.01 * span + 1e-6, name
    if method == "entropy":  # the KL-optimal threshold clips the long tails of some tensors
        assert any(hi < 0.98 * ranges_cpu[n][1] for n, (_, hi) in ranges.items())


def test_tensorrt_target_is_symmetric(small_model, calib_objects, tmp_path):
    recipe = Recipe("tensorrt", "entropy")
    prepared = prepare(small_model, recipe, tmp_path)
    assert prepared.rewrites == [] and prepared.uint8_weights == []
    model = quantize(prepared, calibrate_ranges(prepared, calib_objects, recipe), recipe)
    summary = qdq_summary(model)
    assert summary["activation_dtypes"] == ["int8"] and summary["activation_zero_points"] == [0]
    assert summary["float_convs"] == ["/head/classifier/Conv"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and len(n.input) > 2:
            zp = inits[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), n.name
    # no quantized (INT32) biases: TensorRT's DequantizeLayer takes int8 only (issue 16)
    assert not [i.name for i in model.graph.initializer if i.data_type == TensorProto.INT32]
    assert "SpaceToDepth" not in {n.op_type for n in model.graph.node}
    # NVIDIA's placement: Q/DQ on conv/add inputs, ReLU left unquantized so TensorRT fuses it
    producer = {o: n for n in model.graph.node for o in n.output}
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    assert relus and all(producer[n.input[0]].op_type != "DequantizeLinear" for n in relus)


def test_sensitivity_ranks_quantized_convs(prepared_cpu, int8_cpu, calib_objects, spec):
    x = prepare_objects(calib_objects[:4], spec)
    ranked = conv_sensitivity(prepared_cpu.model, int8_cpu, x)
    names = [n for n, _ in ranked]
    assert "/head/classifier/Conv" not in names and len(names) >= 20
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))


# ------------------------------------------------------------------------------ gate + metadata
def test_calibrate_model_writes_int8_with_metadata(small_model, split, tmp_path):
    out = tmp_path / "m.int8.onnx"
    result = calibrate_model(small_model, split, out, recipe=Recipe("cpu", "minmax"), max_drop=5.0, seed=7)
    assert result.report.passed and result.output == out and out.is_file()
    assert result.report.fp32_mean == pytest.approx(100.0)  # reference = FP32 masks
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    source = {p.key: p.value for p in onnx.load(str(small_model)).metadata_props}
    assert all(meta[k] == v for k, v in source.items())  # the original model card survives
    record = json.loads(meta[INT8_KEY])
    assert record["method"] == "minmax" and record["num_slices"] == len(HAND_POINTS)
    assert record["target"] == "cpu" and record["data"]["calib_cases"] == ["ct_small"]
    assert record["dice"]["fp32"] == pytest.approx(100.0)
    assert float(meta["cmdeploy.int8_dice"]) == pytest.approx(result.report.int8_mean, abs=1e-4)
    assert meta["cmdeploy.fp32_sha256"] == result.prepared.source_sha256
    from cmdeploy.segmenter import Segmenter

    seg = Segmenter.load(out)
    o = split.evaluation[0]
    mask = seg.predict(o.slice_hu, o.points)
    assert mask.shape == o.slice_hu.shape and dice(mask, o.mask) > 0.8


def test_gate_refuses_collapsed_ranges_and_writes_nothing(small_model, split, tmp_path, monkeypatch):
    """A deliberately broken calibration (every range shrunk 20x, as if calibrated on a constant
    input) costs tens of Dice points; the gate refuses and writes nothing."""
    real = gate_mod.calibrate_ranges

    def collapsed(*args, **kwargs):
        return {k: (lo * 0.05, hi * 0.05) for k, (lo, hi) in real(*args, **kwargs).items()}

    monkeypatch.setattr(gate_mod, "calibrate_ranges", collapsed)
    out = tmp_path / "broken.onnx"
    result = calibrate_model(small_model, split, out, recipe=Recipe("cpu"), max_drop=5.0)
    assert not result.report.passed and result.report.drop > 20.0
    assert result.output is None and not out.exists() and list(tmp_path.iterdir()) == []
    assert "FAIL" in result.report.table()


def test_auto_exclude_retries_with_ranked_convs():
    calls: list[list[str]] = []
    scores = {0: 0.5, 1: 0.6, 2: 0.97}  # Dice after 0, 1, 2 excluded convs

    def quantize_fn(ex):
        calls.append(list(ex))
        return onnx.ModelProto()

    def score_fn(_m):
        return np.array([scores[min(len(calls[-1]) - 1, 2)]])

    report, _ = run_gate(
        np.array([0.98]),
        ["c"],
        quantize_fn,
        score_fn,
        max_drop=2.0,
        auto_exclude=True,
        rank_fn=lambda _m: ["a", "b", "c"],
        base_exclude=["user"],
    )
    assert calls == [["user"], ["user", "a"], ["user", "a", "b"]]
    assert report.passed and len(report.attempts) == 3 and report.attempts[-1].excluded == ["user", "a", "b"]


def test_range_cache_is_reused(small_model, split, tmp_path):
    cache = tmp_path / "cache"
    first = calibrate_model(
        small_model, split, tmp_path / "a.onnx", recipe=Recipe("cpu"), max_drop=5.0, cache_dir=cache
    )
    files = list(cache.glob("*.json"))
    assert not first.ranges_from_cache and len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["info"]["method"] == "minmax" and "input" in saved["ranges"]
    second = calibrate_model(
        small_model, split, tmp_path / "b.onnx", recipe=Recipe("cpu"), max_drop=5.0, cache_dir=cache
    )
    assert second.ranges_from_cache
    a = {i.name: numpy_helper.to_array(i) for i in first.model.graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in second.model.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # a different method is a different key
    key_a = RangeCache.key(model="m", data="d", method="minmax", seed=0)
    assert key_a != RangeCache.key(model="m", data="d", method="entropy", seed=0)


def test_trt_calibration_cache_round_trip(prepared_cpu, ranges_cpu):
    tensors = trt_cache_tensors(prepared_cpu, ranges_cpu)
    assert tensors[0] == "input" and "logits" not in tensors
    text = trt_calibration_cache(ranges_cpu, tensors, method="minmax", trt_version="10.9.0")
    header, scales = parse_trt_calibration_cache(text)
    assert header == "TRT-100900-MinMaxCalibration"  # the ranges' algorithm, not always Entropy2
    assert list(scales) == tensors
    for name in tensors:
        lo, hi = ranges_cpu[name]
        assert scales[name] == np.float32(max(abs(lo), abs(hi)) / 127.0)
    line = text.splitlines()[1]
    assert line.startswith("input: ") and len(line.split(": ")[1]) == 8  # big-endian float32 hex
    assert trt_version_number("8.6.1") == 8601 and trt_version_number("10.3") == 100300
    entropy = trt_calibration_cache(ranges_cpu, tensors, method="entropy", trt_version="10.9.0")
    assert entropy.splitlines()[0] == "TRT-100900-EntropyCalibration2"
    with pytest.raises(ValueError, match="no TensorRT calibrator matches 'percentile'"):
        trt_calibration_cache(ranges_cpu, tensors, method="percentile")


def test_calibrate_model_writes_trt_cache(small_model, split, tmp_path):
    out = tmp_path / "m.trt.int8.onnx"
    # the cache is what is checked here; the random-weight model's TensorRT-recipe Dice drop
    # (about 34 points with onnxruntime 1.32, before and after issue 16) is not
    result = calibrate_model(
        small_model, split, out, recipe=Recipe("tensorrt"), max_drop=100.0, trt_version="10.9.0"
    )
    assert result.output == out, result.report.table()
    assert result.trt_cache == tmp_path / "m.trt.int8.calibration.cache"
    header, scales = parse_trt_calibration_cache(result.trt_cache.read_text())
    assert header == "TRT-100900-MinMaxCalibration"
    assert "input" in scales and all(s > 0 for s in scales.values())


def test_trt_cache_reads_back_through_polygraphy(prepared_cpu, ranges_cpu, tmp_path):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pytest.skip("TensorRT not installed")
    from polygraphy.backend.trt import Calibrator

    from cmdeploy.calibration.quantize import write_trt_calibration_cache

    path = write_trt_calibration_cache(tmp_path / "c.cache", prepared_cpu, ranges_cpu, method="minmax")
    calibrator = Calibrator(data_loader=[], cache=str(path))
    assert bytes(calibrator.read_calibration_cache()) == path.read_bytes()


# ------------------------------------------------------------------------------ CLI
def _cli(*args: str):
    from typer.testing import CliRunner

    from cmdeploy.cli import app

    return CliRunner().invoke(app, ["calibrate", *args])


def test_cli_gate_failure_exits_1_and_writes_nothing(small_model, tmp_path):
    from pydicom.data import get_testdata_file

    out = tmp_path / "q.onnx"
    res = _cli(
        "--model",
        str(small_model),
        "--data",
        get_testdata_file("CT_small.dcm"),
        "--output",
        str(out),
        "--max-dice-drop",
        "-101",
    )
    assert res.exit_code == 1, res.output
    assert "FAIL" in res.output and not out.exists()


def test_cli_rejects_bad_options(small_model, spec, tmp_path):
    res = _cli(
        "--model",
        str(small_model),
        "--data",
        str(tmp_path),
        "--output",
        str(tmp_path / "q.onnx"),
        "--target",
        "gpu",
    )
    assert res.exit_code == 2 and "--target" in res.output
    res = _cli(
        "--model", str(small_model), "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "q.onnx")
    )
    assert res.exit_code == 2
    fused = tmp_path / "fused.onnx"
    onnx.save(_fused_model(spec), str(fused))
    res = _cli("--model", str(fused), "--data", str(tmp_path), "--output", str(tmp_path / "q.onnx"))
    assert res.exit_code == 3 and "fused-preprocessing" in res.output


# ------------------------------------------------------------------------------ shared data
@pytest.mark.shared_data
@pytest.mark.skipif(
    not (SHARED / "abdomen_3mm" / "image.nii.gz").is_file(), reason="shared ct-organs data absent"
)
def test_shared_split_holds_out_a_patient_in_lps(spec):
    split = load_split(SHARED, num_calib=6, num_eval=6, seed=1)
    assert split.calib_cases == ["abdomen_3mm"] and split.eval_cases == ["thorax_1p5mm"]
    assert {o.case for o in split.calibration} == {"abdomen_3mm"}
    assert {o.case for o in split.evaluation} == {"thorax_1p5mm"}
    again = load_split(SHARED, num_calib=6, num_eval=6, seed=1)
    assert [o.source for o in again.calibration] == [o.source for o in split.calibration]
    with pytest.raises(Exception, match="held-out"):
        load_split(SHARED, num_calib=2, num_eval=2, calib_cases="thorax_1p5mm", eval_cases="thorax_1p5mm")
    try:  # same LPS slice convention as the training data loader
        from cmdeploy.train.data import find_cases, load_volume
    except ImportError:
        return
    vol = load_volume(next(c for c in find_cases(SHARED) if c.name == "thorax_1p5mm"))
    o = split.evaluation[0]
    np.testing.assert_array_equal(vol.image[o.slice_index], o.slice_hu)
    assert np.all(vol.labels[o.slice_index][o.mask] == o.label)


@pytest.mark.shared_data
@pytest.mark.skipif(
    not (SHARED / "abdomen_3mm" / "image.nii.gz").is_file(), reason="shared ct-organs data absent"
)
def test_shared_data_end_to_end(small_model, tmp_path):
    """Calibrate on abdomen objects, gate on thorax objects (another patient); the report and the
    metadata name the cases."""
    split = load_split(SHARED, num_calib=8, num_eval=8, seed=0)
    out = tmp_path / "shared.int8.onnx"
    result = calibrate_model(small_model, split, out, recipe=Recipe("cpu"), max_drop=100.0)
    assert result.report.passed and out.is_file()
    assert "thorax_1p5mm" in result.report.table()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    data = json.loads(meta["cmdeploy.calibration_data"])
    assert data["calib_cases"] == ["abdomen_3mm"] and data["eval_cases"] == ["thorax_1p5mm"]
    assert meta["cmdeploy.calibration_slices"] == "8"
