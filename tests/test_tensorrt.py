"""TensorRT back end: engine sidecar, build planning, runner - everything testable without TensorRT.

The end-to-end build-and-run test needs TensorRT and a CUDA GPU and skips without them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from cmdeploy.backends.base import batch_chunks
from cmdeploy.backends.tensorrt import TensorRTRunner, validate_feeds
from cmdeploy.engine_sidecar import (
    EngineIncompatibleError,
    EngineSidecar,
    check_compatible,
    normalise_compute_capability,
    sidecar_path,
)
from cmdeploy.errors import InputError, ModelError
from cmdeploy.export.fp16 import convert_to_fp16
from cmdeploy.export.tensorrt_build import (
    build_engine,
    format_parser_errors,
    graph_precision,
    onnx_input_shapes,
    plan_build,
    profile_shapes,
)
from cmdeploy.hashing import file_sha256
from cmdeploy.spec import ModelSpec

try:
    import tensorrt  # noqa: F401

    HAVE_TRT = True
except (ImportError, OSError):
    HAVE_TRT = False

SPEC = ModelSpec(input_size=16, target_size=12.0)


def conv_model(*, batch="N", size=16, spec=SPEC, qdq=False) -> onnx.ModelProto:
    """(batch, 2, size, size) -> Conv 3x3 -> Relu -> Conv 1x1 -> (batch, 1, size, size)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 2, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (1, 4, 1, 1)).astype(np.float32), "w2"),
    ]
    nodes = []
    src = "image"
    if qdq:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["image", "s", "zp"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
        ]
        src = "dq"
    nodes += [
        helper.make_node("Conv", [src, "w1"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 2, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, size, size])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if spec is not None:
        helper.set_model_props(model, spec.to_metadata())
    onnx.checker.check_model(model, full_check=True)
    return model


def make_sidecar(**overrides) -> EngineSidecar:
    kw = dict(
        tensorrt_version="10.3.0.26",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        onnx_sha256="ab" * 32,
        input_shapes={
            "image": {"min": [1, 2, 16, 16], "opt": [8, 2, 16, 16], "max": [32, 2, 16, 16]}
        },
        output_names=["logits"],
        precision="fp16",
        created="2025-01-01T00:00:00+00:00",
        cmdeploy_version="0.1.0",
        spec=SPEC.to_dict(),
        output_shapes={"logits": [-1, 1, 16, 16]},
        io_dtypes={"image": "float32", "logits": "float32"},
    )
    kw.update(overrides)
    return EngineSidecar(**kw)


# --------------------------------------------------------------------------- sidecar


def test_sidecar_path_appends_json():
    assert sidecar_path("/m/seg.plan").name == "seg.plan.json"
    assert str(sidecar_path("/m/seg.plan").parent) == "/m"


def test_sidecar_round_trip(tmp_path):
    sc = make_sidecar()
    path = sc.write(tmp_path / "seg.plan.json")
    back = EngineSidecar.read(path)
    assert back == sc
    assert back.model_spec == SPEC
    assert back.batch_range == (1, 8, 32)
    assert json.loads(path.read_text())["compute_capability"] == "9.0"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.plan.json"]  # no temp file left behind


def test_sidecar_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.plan.json"
    with pytest.raises(ModelError, match="none.plan.json.*not found"):
        EngineSidecar.read(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelError, match="bad.json.*JSON"):
        EngineSidecar.read(bad)
    partial = tmp_path / "partial.json"
    d = make_sidecar().to_dict()
    del d["gpu_name"], d["onnx_sha256"]
    partial.write_text(json.dumps(d))
    with pytest.raises(ModelError, match=r"partial.json lacks keys \['gpu_name', 'onnx_sha256'\]"):
        EngineSidecar.read(partial)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({**make_sidecar().to_dict(), "format": 99}))
    with pytest.raises(ModelError, match="format 99"):
        EngineSidecar.read(future)


def test_sidecar_validates_fields():
    with pytest.raises(ModelError, match="precision"):
        make_sidecar(precision="bf16")
    with pytest.raises(ModelError, match="profile keys"):
        make_sidecar(input_shapes={"image": {"min": [1], "max": [2]}})


@pytest.mark.parametrize(
    ("cc", "want"),
    [("8.6", "8.6"), ((9, 0), "9.0"), ([7, 5], "7.5"), ("sm_86", "8.6"), ("90", "9.0")],
)
def test_normalise_compute_capability(cc, want):
    assert normalise_compute_capability(cc) == want


@pytest.mark.parametrize("cc", ["x.y", "9", (9,), "", None])
def test_normalise_compute_capability_rejects_garbage(cc):
    with pytest.raises(ModelError, match="compute capability"):
        normalise_compute_capability(cc)


def test_check_compatible_accepts_same_gpu_and_trt_minor():
    sc = make_sidecar()
    # a different patch/build of the same major.minor, name case/blanks ignored
    check_compatible(
        sc,
        tensorrt_version="10.3.1",
        gpu_name=" nvidia h100 80gb hbm3",
        compute_capability=(9, 0),
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"tensorrt_version": "10.4.0"},
            r"TensorRT 10.3.0.26 built it, TensorRT 10.4.0 is running",
        ),
        ({"tensorrt_version": "11.0.0"}, r"major.minor 10.3 != 11.0"),
        ({"compute_capability": "8.9"}, r"compute capability 9.0, this GPU has 8.9"),
        ({"gpu_name": "NVIDIA H200"}, r"built on GPU 'NVIDIA H100 80GB HBM3'.*'NVIDIA H200'"),
    ],
)
def test_check_compatible_rejects_foreign_engines(kwargs, message):
    here = {
        "tensorrt_version": "10.3.0.26",
        "gpu_name": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    here.update(kwargs)
    with pytest.raises(EngineIncompatibleError, match=message) as info:
        check_compatible(make_sidecar(), **here)
    assert "Rebuild" in str(info.value)
    assert isinstance(info.value, ModelError)


def test_check_compatible_lists_every_mismatch():
    with pytest.raises(EngineIncompatibleError) as info:
        check_compatible(
            make_sidecar(), tensorrt_version="11.1", gpu_name="RTX 4090", compute_capability="8.9"
        )
    text = str(info.value)
    assert "TensorRT" in text and "compute capability" in text and "RTX 4090" in text


def test_sidecar_matches_onnx(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(conv_model(), p)
    sc = make_sidecar(onnx_sha256=file_sha256(p))
    assert sc.matches_onnx(p)
    p.write_bytes(p.read_bytes() + b"\0")
    assert not sc.matches_onnx(p)


# --------------------------------------------------------------------------- build planning


def test_graph_precision_detection():
    assert graph_precision(conv_model()) == "fp32"
    assert graph_precision(convert_to_fp16(conv_model())) == "fp16"
    assert graph_precision(conv_model(qdq=True)) == "int8"


@pytest.mark.parametrize(
    ("version", "precision", "graph"),
    [
        ("10.3.0", "fp32", "fp32"),
        ("10.3.0", "fp16", "fp16"),
        ("10.3.0", "int8", "int8"),
        ("11.0.0", "fp32", "fp32"),
        ("11.0.0", "fp16", "fp16"),
        ("11.2.1", "int8", "int8"),
    ],
)
def test_plan_build_is_strongly_typed_without_precision_flags(version, precision, graph):
    """TensorRT 10 too: BuilderFlag.FP16/INT8 are deprecated in 10.x and gone in 11."""
    model = {
        "fp32": conv_model(),
        "fp16": convert_to_fp16(conv_model()),
        "int8": conv_model(qdq=True),
    }[graph]
    plan = plan_build(version, precision, model)
    assert (plan.strongly_typed, plan.builder_flags, plan.precision) == (True, (), precision)
    assert plan.trt_major == int(version.split(".")[0])


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_int8_without_qdq_points_to_calibrate(version):
    with pytest.raises(InputError, match="QuantizeLinear.*cmdeploy calibrate --target tensorrt"):
        plan_build(version, "int8", conv_model())


@pytest.mark.parametrize("version", ["10.3.0", "11.0.0"])
def test_fp16_needs_fp16_graph(version):
    with pytest.raises(InputError, match="strongly typed.*convert_to_fp16"):
        plan_build(version, "fp16", conv_model())


@pytest.mark.parametrize(
    ("precision", "graph", "match"),
    [
        ("fp32", "fp16", "already a fp16 graph"),
        ("fp32", "int8", "already a int8 graph"),
        ("fp16", "int8", "Q/DQ"),
        ("bf16", "fp32", "precision must be one of"),
    ],
)
def test_precision_label_must_match_graph(precision, graph, match):
    model = {
        "fp16": convert_to_fp16(conv_model()),
        "int8": conv_model(qdq=True),
        "fp32": conv_model(),
    }
    with pytest.raises(InputError, match=match):
        plan_build("10.3.0", precision, model[graph])


def test_trt_older_than_10_is_refused():
    with pytest.raises(ModelError, match="too old"):
        plan_build("8.6.1", "fp32", conv_model())


def test_onnx_input_shapes_skips_initializers():
    model = conv_model()
    # old exporters list initializers among graph inputs
    model.graph.input.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [4, 2, 3, 3]))
    assert onnx_input_shapes(model) == {"image": ("N", 2, 16, 16)}


def test_profile_shapes_dynamic_and_static_batch():
    prof = profile_shapes({"image": ("N", 2, 16, 16), "aux": (None, 3)}, 1, 4, 16)
    assert prof["image"] == {"min": [1, 2, 16, 16], "opt": [4, 2, 16, 16], "max": [16, 2, 16, 16]}
    assert prof["aux"] == {"min": [1, 3], "opt": [4, 3], "max": [16, 3]}
    static = profile_shapes({"image": (2, 2, 16, 16)}, 1, 8, 32)
    assert static["image"]["min"] == static["image"]["max"] == [2, 2, 16, 16]


@pytest.mark.parametrize(
    ("shapes", "batches", "match"),
    [
        ({"image": ("N", 2, "H", 16)}, (1, 8, 32), "axis 2 is dynamic.*no profile range"),
        ({"image": ("N", 2, None, 16)}, (1, 8, 32), "axis 2 is dynamic"),
        ({"image": ("N", 2, 16, 16)}, (4, 2, 32), "1 <= min <= opt <= max"),
        ({"image": ("N", 2, 16, 16)}, (0, 1, 2), "1 <= min"),
        ({"image": ()}, (1, 1, 1), "scalar"),
        ({}, (1, 1, 1), "no inputs"),
    ],
)
def test_profile_shapes_errors(shapes, batches, match):
    with pytest.raises(InputError, match=match):
        profile_shapes(shapes, *batches)


def test_format_parser_errors_reports_node_details():
    errors = [
        SimpleNamespace(
            code=lambda: SimpleNamespace(name="UNSUPPORTED_NODE"),
            desc=lambda: "No importer registered for op: GridSample3D",
            node=lambda: 7,
            node_name=lambda: "/head/grid",
            node_operator=lambda: "GridSample3D",
        ),
        SimpleNamespace(code=lambda: "INVALID_GRAPH", desc=lambda: "bad graph", node=lambda: -1),
    ]
    parser = SimpleNamespace(num_errors=len(errors), get_error=lambda i: errors[i])
    text = format_parser_errors(parser, "model.onnx")
    assert text.splitlines()[0] == "TensorRT could not parse model.onnx:"
    assert "[UNSUPPORTED_NODE] node 7 '/head/grid' (GridSample3D): No importer" in text
    assert "[INVALID_GRAPH] graph: bad graph" in text


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even where TensorRT is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def test_build_engine_without_tensorrt_names_the_extra(tmp_path, no_tensorrt):
    onnx.save(conv_model(), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match=r"TensorRT not installed.*cmdeploy\[trt\]"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan")
    assert not (tmp_path / "m.plan").exists()


def test_build_engine_checks_inputs_before_tensorrt(tmp_path, no_tensorrt):
    with pytest.raises(InputError, match="not found"):
        build_engine(tmp_path / "missing.onnx", tmp_path / "m.plan")
    onnx.save(conv_model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="cmdeploy calibrate --target tensorrt"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", precision="int8")
    onnx.save(conv_model(spec=None), tmp_path / "nospec.onnx")
    with pytest.raises(InputError, match="nospec.onnx.*not a cmdeploy model"):
        build_engine(tmp_path / "nospec.onnx", tmp_path / "m.plan")
    onnx.save(conv_model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="min <= opt <= max"):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.plan", min_batch=8, opt_batch=4)


# --------------------------------------------------------------------------- runner


def test_runner_module_imports_lazily():
    code = (
        "import sys; sys.modules['tensorrt'] = None\n"
        "import cmdeploy.backends.tensorrt as m\n"
        "heavy = [k for k in ('polygraphy', 'cuda', 'torch', 'onnx') if k in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(m.TensorRTRunner)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_runner_without_tensorrt_raises_clear_message(tmp_path, no_tensorrt):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"not an engine")
    make_sidecar().write(sidecar_path(engine))
    with pytest.raises(ModelError, match=r"TensorRT not installed.*pip install 'cmdeploy\[trt\]'"):
        TensorRTRunner(engine)


PROFILE = make_sidecar().input_shapes


def test_validate_feeds_casts_and_checks():
    x = np.zeros((3, 2, 16, 16), np.float64)
    arrays, n = validate_feeds({"image": x}, PROFILE)
    assert n == 3
    assert arrays["image"].dtype == np.float32 and arrays["image"].flags.c_contiguous


@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        ({}, r"missing \['image'\]"),
        ({"image": np.zeros((1, 2, 16, 16)), "extra": np.zeros(1)}, r"unexpected \['extra'\]"),
        ({"image": np.zeros((2, 16, 16))}, "must have 4 dimensions"),
        ({"image": np.zeros((1, 2, 16, 8))}, "axis 3 has size 8, the engine accepts 16..16"),
        ({"image": np.zeros((0, 2, 16, 16))}, "empty batch"),
        ({"image": np.full((1, 2, 16, 16), "a")}, "must be numeric"),
    ],
)
def test_validate_feeds_errors(feeds, match):
    with pytest.raises(InputError, match=match):
        validate_feeds(feeds, PROFILE)


def test_validate_feeds_batch_must_agree():
    profile = {"a": PROFILE["image"], "b": PROFILE["image"]}
    feeds = {"a": np.zeros((2, 2, 16, 16)), "b": np.zeros((3, 2, 16, 16))}
    with pytest.raises(InputError, match="disagree on the batch size"):
        validate_feeds(feeds, profile)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 200), max_batch=st.integers(1, 40))
def test_batch_chunks_cover_in_order(n, max_batch):
    chunks = batch_chunks(n, max_batch)
    assert [i for s, e in chunks for i in range(s, e)] == list(range(n))
    assert all(0 < e - s <= max_batch for s, e in chunks)
    assert len(chunks) == -(-n // max_batch)


# --------------------------------------------------------------------------- needs TensorRT + GPU


@pytest.mark.trt
@pytest.mark.skipif(not HAVE_TRT, reason="TensorRT not installed")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_and_run_matches_onnxruntime(tmp_path, precision):
    import onnxruntime as ort

    model = conv_model()
    if precision == "fp16":
        model = convert_to_fp16(model)
    onnx_path = tmp_path / "m.onnx"
    onnx.save(model, onnx_path)
    cache = tmp_path / "timing.cache"
    engine = build_engine(
        onnx_path, tmp_path / "m.plan", precision=precision, max_batch=4, timing_cache=cache
    )
    assert cache.is_file() and sidecar_path(engine).is_file()
    sc = EngineSidecar.read(sidecar_path(engine))
    assert sc.onnx_sha256 == file_sha256(onnx_path) and sc.precision == precision
    x = np.random.default_rng(0).normal(size=(6, 2, 16, 16)).astype(np.float32)  # 2 chunks
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
        None, {"image": x}
    )[0]
    with TensorRTRunner(engine) as runner:
        assert runner.spec == SPEC and runner.max_batch == 4
        out = runner.run({"image": x})["logits"]
    np.testing.assert_allclose(out, ref, atol=1e-2 if precision == "fp16" else 1e-3)
