"""The engine build up to (and around) TensorRT, with a stand-in ``tensorrt`` module: profiles of the
fused graph's dynamic H/W and the sidecar that records them, strongly typed networks without
precision flags, refusals before TensorRT is imported, the ``cmdeploy export --onnx`` INT8 path,
and the Triton writer's plan checks. TensorRT itself is not installable here."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from cmdeploy.engine_sidecar import EngineSidecar, sidecar_path
from cmdeploy.errors import InputError
from cmdeploy.export import tensorrt_build
from cmdeploy.export.tensorrt_build import build_engine, profile_shapes
from cmdeploy.hashing import file_sha256
from cmdeploy.spec import ModelSpec

MODELS = Path(__file__).resolve().parents[1] / "cmdeploy" / "models"
SPEC = ModelSpec(input_size=16, target_size=12.0)


# ------------------------------------------------------------------------------ stand-in TensorRT
class _Tensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class FakeTRT(types.ModuleType):
    """Just enough of the TensorRT 10/11 Python API for ``build_engine``; records what it is told."""

    def __init__(self, version: str = "10.9.0.34", *, strongly_typed_flag: bool = True) -> None:
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
        self.__version__ = version
        self.calls: dict[str, list] = {"network_flags": [], "set_flag": [], "set_shape": [], "parsed": []}
        fake = self

        class Logger:
            INFO, WARNING = "info", "warning"

            def __init__(self, level):
                self.level = level

        class Flags:
            pass

        if strongly_typed_flag:
            Flags.STRONGLY_TYPED = 2

        class Network:
            def __init__(self):
                self.inputs, self.outputs = [], []

            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                fake.calls["parsed"].append(path)
                model = onnx.load(path)
                inits = {i.name for i in model.graph.initializer}
                dims = lambda vi: tuple(  # noqa: E731
                    d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim
                )
                self.network.inputs = [
                    _Tensor(i.name, dims(i)) for i in model.graph.input if i.name not in inits
                ]
                self.network.outputs = [_Tensor(o.name, dims(o)) for o in model.graph.output]
                return True

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.calls["set_shape"].append((name, list(lo), list(opt), list(hi)))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                pass

            def set_flag(self, flag):
                fake.calls["set_flag"].append(flag)

            def add_optimization_profile(self, profile):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls["network_flags"].append(flags)
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"serialized engine"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = Flags
        self.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTRT:
    trt = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_build, "cuda_device_info", lambda device=0: ("NVIDIA L4", "8.9"))
    return trt


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)


# ------------------------------------------------------------------------------ models
def fused_like(tmp_path: Path, name: str = "fused.onnx", *, double: bool = False) -> Path:
    """slices (batch, height, width) + points (batch, 4, 2) -> probabilities (batch, height, width)."""
    dtype = TensorProto.DOUBLE if double else TensorProto.FLOAT
    nodes = [
        helper.make_node("Cast", ["slices"], ["c"], to=dtype),
        helper.make_node("Cast", ["c"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Sigmoid", ["f"], ["probabilities"]),
        helper.make_node("ReduceSum", ["points"], ["unused"], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "fused",
        [
            helper.make_tensor_value_info("slices", TensorProto.FLOAT, ["batch", "height", "width"]),
            helper.make_tensor_value_info("points", TensorProto.FLOAT, ["batch", 4, 2]),
        ],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", "height", "width"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {**SPEC.to_metadata(), "cmdeploy.graph": "fused"})
    path = tmp_path / name
    onnx.save(model, path)
    return path


def qdq_conv(tmp_path: Path, *, cpu_target: bool, name: str = "m.int8.onnx") -> Path:
    """A one-conv Q/DQ model: symmetric int8 (TensorRT target) or uint8 asymmetric (CPU target)."""
    rng = np.random.default_rng(0)
    zp = numpy_helper.from_array(
        np.array(128 if cpu_target else 0, np.uint8 if cpu_target else np.int8), "zp"
    )
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        zp,
        numpy_helper.from_array(rng.integers(-100, 100, (1, 2, 3, 3)).astype(np.int8), "wq"),
        numpy_helper.from_array(np.array([0.01], np.float32), "ws"),
        numpy_helper.from_array(np.array([0], np.int8), "wzp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["image", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], axis=0),
        helper.make_node("Conv", ["dq", "w"], ["logits"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 2, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 16, 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {**SPEC.to_metadata(), "cmdeploy.quant_target": "cpu" if cpu_target else "tensorrt"}
    helper.set_model_props(model, meta)
    path = tmp_path / name
    onnx.save(model, path)
    return path


# ------------------------------------------------------------------------------ item 1: profiles
def test_fused_inputs_get_height_width_profiles():
    shapes = {"slices": ("batch", "height", "width"), "points": ("batch", 4, 2)}
    prof = profile_shapes(shapes, 1, 4, 16)
    assert prof["slices"] == {"min": [1, 32, 32], "opt": [4, 512, 512], "max": [16, 1024, 1024]}
    assert prof["points"] == {"min": [1, 4, 2], "opt": [4, 4, 2], "max": [16, 4, 2]}
    custom = profile_shapes(shapes, 2, 2, 2, axis_ranges={"height": (64, 128, 256), "width": (8, 8, 8)})
    assert custom["slices"] == {"min": [2, 64, 8], "opt": [2, 128, 8], "max": [2, 256, 8]}
    with pytest.raises(InputError, match="range of axis 'height'"):
        profile_shapes(shapes, axis_ranges={"height": (64, 32, 256), "width": (8, 8, 8)})


def test_build_engine_on_fused_graph_records_hw_profile(tmp_path, fake_trt):
    """Issue 16 item 1: was "input 'slices' axis 1 is dynamic"."""
    onnx_path = fused_like(tmp_path)
    engine = build_engine(
        onnx_path,
        tmp_path / "f.plan",
        max_batch=8,
        axis_ranges={"height": (64, 512, 768), "width": (64, 512, 768)},
    )
    assert engine.read_bytes() == b"serialized engine"
    assert ("slices", [1, 64, 64], [8, 512, 512], [8, 768, 768]) in fake_trt.calls["set_shape"]
    sc = EngineSidecar.read(sidecar_path(engine))
    assert sc.input_shapes["slices"] == {"min": [1, 64, 64], "opt": [8, 512, 512], "max": [8, 768, 768]}
    assert sc.input_shapes["points"]["max"] == [8, 4, 2]
    assert sc.onnx_sha256 == file_sha256(onnx_path) and sc.tensorrt_version == "10.9.0.34"
    # the runner's feed check uses the recorded ranges
    from cmdeploy.backends.tensorrt import validate_feeds

    ok = {"slices": np.zeros((2, 100, 90), np.float32), "points": np.zeros((2, 4, 2), np.float32)}
    assert validate_feeds(ok, sc.input_shapes)[1] == 2
    with pytest.raises(InputError, match="axis 1 has size 1000, the engine accepts 64..768"):
        validate_feeds({**ok, "slices": np.zeros((2, 1000, 90), np.float32)}, sc.input_shapes)


# ------------------------------------------------------------------------------ item 5: strong typing
@pytest.mark.parametrize("version", ["10.3.0", "10.12.0", "11.0.0"])
def test_every_build_is_strongly_typed_without_precision_flags(tmp_path, monkeypatch, version):
    trt = FakeTRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_build, "cuda_device_info", lambda device=0: ("NVIDIA L4", "8.9"))
    build_engine(qdq_conv(tmp_path, cpu_target=False), tmp_path / "q.plan", precision="int8")
    assert trt.calls["network_flags"] == [1 << 2] and trt.calls["set_flag"] == []
    assert EngineSidecar.read(sidecar_path(tmp_path / "q.plan")).precision == "int8"


def test_tensorrt_without_strong_typing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT("10.0.0", strongly_typed_flag=False))
    monkeypatch.setattr(tensorrt_build, "cuda_device_info", lambda device=0: ("NVIDIA L4", "8.9"))
    with pytest.raises(Exception, match="strongly typed"):
        build_engine(fused_like(tmp_path), tmp_path / "f.plan")
    assert not (tmp_path / "f.plan").exists()


def test_fp16_build_needs_an_fp16_graph_on_tensorrt_10(tmp_path, fake_trt):
    with pytest.raises(InputError, match="strongly typed.*FP16"):
        build_engine(fused_like(tmp_path), tmp_path / "f.plan", precision="fp16")
    assert fake_trt.calls["parsed"] == []


# ------------------------------------------------------------------------------ item 3: refusals
def test_cpu_target_int8_is_refused_before_tensorrt(tmp_path, no_tensorrt):
    """With ``import tensorrt`` failing, an InputError (not "TensorRT not installed") proves the
    lint ran first."""
    with pytest.raises(InputError, match=r"(?s)not TensorRT-compatible:\n  int8-target.*--target tensorrt"):
        build_engine(qdq_conv(tmp_path, cpu_target=True), tmp_path / "m.plan", precision="int8")
    assert not (tmp_path / "m.plan").exists()


def test_shipped_cpu_int8_is_refused_before_tensorrt(tmp_path, no_tensorrt):
    path = MODELS / "cmdeploy-default.int8.onnx"
    if not path.is_file():
        pytest.skip("no shipped INT8 model")
    with pytest.raises(InputError) as info:
        build_engine(path, tmp_path / "m.plan", precision="int8")
    text = str(info.value)
    assert "qdq-bias" in text and "CPU-target INT8" in text and "--target tensorrt" in text


def test_float64_graph_is_refused_before_tensorrt(tmp_path, no_tensorrt):
    with pytest.raises(InputError, match="dtype-float64"):
        build_engine(fused_like(tmp_path, double=True), tmp_path / "f.plan")


# ------------------------------------------------------------------------------ item 4: CLI
def _cli(*args: str):
    from cmdeploy.cli import app

    return CliRunner().invoke(app, ["export", *args])


def test_cli_int8_engine_from_calibrated_onnx(tmp_path, fake_trt):
    src = qdq_conv(tmp_path, cpu_target=False)
    before = src.read_bytes()
    res = _cli("--onnx", str(src), "--engine", str(tmp_path / "m.plan"), "--precision", "int8")
    assert res.exit_code == 0, res.output
    assert "wrote TensorRT engine" in res.output and fake_trt.calls["parsed"] == [str(src)]
    assert src.read_bytes() == before  # inputs are never modified
    sc = EngineSidecar.read(sidecar_path(tmp_path / "m.plan"))
    assert sc.precision == "int8" and sc.onnx_sha256 == file_sha256(src)


def test_cli_refuses_cpu_target_int8_without_tensorrt(tmp_path, no_tensorrt):
    res = _cli(
        "--onnx",
        str(qdq_conv(tmp_path, cpu_target=True)),
        "--engine",
        str(tmp_path / "m.plan"),
        "--precision",
        "int8",
    )
    assert res.exit_code == 2
    assert "not TensorRT-compatible" in res.output and "--target tensorrt" in res.output
    assert "TensorRT is not installed" not in res.output  # the lint answered first
    assert not (tmp_path / "m.plan").exists()


def test_cli_lint_passes_then_names_missing_tensorrt(tmp_path, no_tensorrt):
    res = _cli(
        "--onnx",
        str(qdq_conv(tmp_path, cpu_target=False)),
        "--engine",
        str(tmp_path / "m.plan"),
        "--precision",
        "int8",
    )
    assert res.exit_code == 2 and "passed the TensorRT-compatibility lint" in res.output


def test_cli_int8_from_fp32_points_to_calibrate(tmp_path, fake_trt):
    res = _cli(
        "--onnx", str(fused_like(tmp_path)), "--engine", str(tmp_path / "m.plan"), "--precision", "int8"
    )
    assert res.exit_code == 2 and "cmdeploy calibrate" in res.output and "--target tensorrt" in res.output
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    res = _cli(
        "--checkpoint",
        str(ckpt),
        "--output",
        str(tmp_path / "o.onnx"),
        "--engine",
        str(tmp_path / "m.plan"),
        "--precision",
        "int8",
    )
    assert res.exit_code == 2 and "fresh FP32 export" in res.output  # refused before exporting
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --checkpoint"),
        (["--onnx", "{src}", "--checkpoint", "{src}"], "exactly one of --checkpoint"),
        (["--onnx", "{src}"], "needs --engine and/or --triton-repo"),
        (["--onnx", "{src}", "--engine", "{tmp}/m.plan", "--fused"], "with --onnx"),
        (["--onnx", "{tmp}/none.onnx", "--engine", "{tmp}/m.plan"], "not found"),
        (["--onnx", "{src}", "--engine", "{tmp}/m.bin"], "must end in .plan"),
        (["--onnx", "{src}", "--engine", "{tmp}/m.plan", "--slice-sizes", "1,2"], "MIN,OPT,MAX"),
    ],
)
def test_cli_option_errors(tmp_path, args, message):
    src = fused_like(tmp_path)
    res = _cli(*[a.format(src=src, tmp=tmp_path) for a in args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_cli_fused_opset_20_refused_before_export(tmp_path):
    ckpt = tmp_path / "x.pt"
    ckpt.write_bytes(b"x")
    res = _cli("--checkpoint", str(ckpt), "--output", str(tmp_path / "o.onnx"), "--fused", "--opset", "20")
    assert res.exit_code == 2 and "16..19" in res.output


def test_cli_fp16_engine_from_fused_onnx_converts_beside_engine(tmp_path, fake_trt, monkeypatch):
    """FP16 via an FP16 ONNX: written beside the engine (the given ONNX is not touched)."""
    from cmdeploy.commands import export as export_cmd

    src = fused_like(tmp_path)
    seen = {}

    def fake_write_fp16(source, path):
        seen["args"] = (source, path)
        from cmdeploy.export.fp16 import convert_to_fp16, fp16_node_prefixes

        model = onnx.load(str(source))
        onnx.save(convert_to_fp16(model, node_prefixes=fp16_node_prefixes(model)), path)
        return path

    monkeypatch.setattr(export_cmd, "_write_fp16", fake_write_fp16)
    out = tmp_path / "engines" / "f.plan"
    out.parent.mkdir()
    res = _cli("--onnx", str(src), "--engine", str(out), "--precision", "fp16")
    # the stand-in graph has no /network/ nodes, so nothing becomes FP16: refused as not an FP16 graph
    assert seen["args"] == (src, out.with_name("f.fp16.onnx"))
    assert res.exit_code == 2 and "no FP16 tensors" in res.output


# ------------------------------------------------------------------------------ item 8: Triton
def _plan(tmp_path: Path, *, version: str = "10.3.0", min_batch: int = 1) -> Path:
    path = tmp_path / "seg.plan"
    path.write_bytes(b"plan")
    EngineSidecar(
        tensorrt_version=version,
        gpu_name="NVIDIA L4",
        compute_capability="8.9",
        onnx_sha256="0" * 64,
        input_shapes={
            "image": {"min": [min_batch, 2, 16, 16], "opt": [8, 2, 16, 16], "max": [16, 2, 16, 16]}
        },
        output_names=["logits"],
        precision="fp16",
        created="2025-01-01T00:00:00+00:00",
        cmdeploy_version="0.1.0",
        spec=SPEC.to_dict(),
        output_shapes={"logits": [-1, 1, 16, 16]},
        io_dtypes={"image": "float32", "logits": "float32"},
    ).write(sidecar_path(path))
    return path


def test_triton_checks_container_tensorrt_version(tmp_path):
    from cmdeploy.export.triton import write_triton_repository

    plan = _plan(tmp_path)
    written = write_triton_repository(tmp_path / "r", "seg", engine_path=plan, tensorrt_version="10.3.1")
    assert list(written) == ["seg_trt"]
    with pytest.raises(
        InputError, match=r"built by TensorRT 10.3.0, the Triton container runs TensorRT 10.8"
    ):
        write_triton_repository(tmp_path / "r2", "seg", engine_path=plan, tensorrt_version="10.8.0")
    assert not (tmp_path / "r2").exists()


def test_triton_refuses_min_batch_above_one(tmp_path):
    from cmdeploy.export.triton import write_triton_repository

    plan = _plan(tmp_path, min_batch=4)
    with pytest.raises(InputError, match="starts at batch 4.*--min-batch 1"):
        write_triton_repository(tmp_path / "r", "seg", engine_path=plan)
    # without batching Triton sends whole tensors: allowed
    assert write_triton_repository(tmp_path / "r0", "seg", engine_path=plan, max_batch_size=0)


# ------------------------------------------------------------------------------ item 8: extras
def test_trt_extra_has_upper_bounds():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    trt = pyproject["project"]["optional-dependencies"]["trt"]
    assert "cuda-python>=12,<13" in trt and "tensorrt>=10,<12" in trt


def test_sidecar_json_lists_full_profile_shapes(tmp_path, fake_trt):
    engine = build_engine(fused_like(tmp_path), tmp_path / "f.plan")
    data = json.loads(sidecar_path(engine).read_text())
    assert data["input_shapes"]["slices"]["max"] == [32, 1024, 1024]
    assert data["output_shapes"]["probabilities"] == [-1, -1, -1]


# ------------------------------------------------------------------------------ the GPU script
def _parity_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "trt_parity", Path(__file__).resolve().parents[1] / "benchmarks" / "trt_parity.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parity_script_without_tensorrt_exits_2(tmp_path, no_tensorrt, capsys):
    assert _parity_script().main(["--out", str(tmp_path / "o")]) == 2
    assert "needs TensorRT and an NVIDIA GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_parity_script_feeds_are_real_model_inputs():
    from cmdeploy.export.parity import ct_small_cases

    script = _parity_script()
    cases = ct_small_cases()
    for name in ("cmdeploy-default.onnx", "cmdeploy-default.fused.onnx"):
        path = MODELS / name
        if not path.is_file():
            pytest.skip(f"{name} not shipped")
        feeds = script.feeds_for(path, cases)
        assert sum(len(next(iter(f.values()))) for f in feeds) == len(cases)
        assert all(len(next(iter(f.values()))) <= script.BATCH for f in feeds)
        model = onnx.load(str(path), load_external_data=False)
        assert set(feeds[0]) == {i.name for i in model.graph.input}
        assert all(a.dtype == np.float32 for f in feeds for a in f.values())
