"""Triton model repository writer (cmdeploy.export.triton): layout and config.pbtxt contents."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cmdeploy.engine_sidecar import EngineSidecar, sidecar_path
from cmdeploy.errors import InputError
from cmdeploy.export.triton import write_triton_repository
from cmdeploy.spec import METADATA_KEY, ModelSpec

SPEC = ModelSpec(input_size=32, guidance="cm+ep", target_size=24.0)

# --------------------------------------------------------------------------- tiny pbtxt parser

_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{}\[\]:,])|([A-Za-z0-9_.+-]+))')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m and m.end() > pos, f"bad pbtxt near {text[pos : pos + 30]!r}"
        pos = m.end()
        if m.group(1) is None:
            out.append(next(g for g in m.groups()[1:] if g is not None))
    return out


def _scalar(tok: str):
    if tok.startswith('"'):
        return json.loads(tok)
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if re.fullmatch(r"-?\d*\.\d+(e-?\d+)?", tok):
        return float(tok)
    assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", tok), f"bad token {tok!r}"
    return tok  # enum value / identifier


def _value(toks: list[str], i: int):
    if toks[i] == "{":
        msg, i = _message(toks, i + 1)
        assert i < len(toks) and toks[i] == "}", f"expected '}}' at token {i}"
        return msg, i + 1
    if toks[i] == "[":
        items, i = [], i + 1
        while toks[i] != "]":
            item, i = _value(toks, i)
            items.append(item)
            if toks[i] == ",":
                i += 1
            else:
                assert toks[i] == "]", f"expected ',' or ']' at token {i}: {toks[i]!r}"
        return items, i + 1
    return _scalar(toks[i]), i + 1


def _message(toks: list[str], i: int) -> tuple[dict[str, list], int]:
    """Fields -> list of values (repeated fields and ``[...]`` lists both append)."""
    msg: dict[str, list] = {}
    while i < len(toks) and toks[i] != "}":
        key = toks[i]
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"bad field name {key!r}"
        i += 1
        if toks[i] == ":":
            i += 1
        else:
            # the colon may be omitted before a message or a list of messages only
            assert toks[i] in "{[", f"field {key!r}: expected ':', '{{' or '['"
        val, i = _value(toks, i)
        msg.setdefault(key, []).extend(val if isinstance(val, list) else [val])
    return msg, i


def parse_pbtxt(text: str) -> dict[str, list]:
    toks = _tokens(text)
    msg, i = _message(toks, 0)
    assert i == len(toks), f"trailing tokens: {toks[i:]}"
    return msg


def params(cfg: dict[str, list]) -> dict[str, str]:
    """The config's ``parameters`` map as key -> string_value."""
    return {one(p, "key"): one(one(p, "value"), "string_value") for p in cfg.get("parameters", [])}


def one(msg: dict[str, list], key: str):
    assert len(msg[key]) == 1, (key, msg[key])
    return msg[key][0]


def test_parser_handles_nesting_lists_and_escapes():
    msg = parse_pbtxt('a: 1\nb [ { c: "x\\"y" }, { c: "z" } ]\nd { e: [ 1, -2 ] f: KIND_GPU }\n')
    assert one(msg, "a") == 1
    assert [one(b, "c") for b in msg["b"]] == ['x"y', "z"]
    assert one(msg, "d") == {"e": [1, -2], "f": ["KIND_GPU"]}
    with pytest.raises(AssertionError):
        parse_pbtxt("a { b: 1")


# ----------------------------------------------- the subset of Triton's ModelConfig we write
# Field names and enum values follow triton-inference-server/common protobuf/model_config.proto;
# google.protobuf.text_format then checks the file exactly as Triton's parser would (unknown
# fields or enum values are errors).

_DATA_TYPES = (
    "TYPE_INVALID TYPE_BOOL TYPE_UINT8 TYPE_UINT16 TYPE_UINT32 TYPE_UINT64 TYPE_INT8 TYPE_INT16 "
    "TYPE_INT32 TYPE_INT64 TYPE_FP16 TYPE_FP32 TYPE_FP64 TYPE_STRING TYPE_BF16"
).split()


def _model_config_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="cmdeploy_test_model_config.proto", package="inference", syntax="proto3"
    )
    dt = fdp.enum_type.add(name="DataType")
    for i, name in enumerate(_DATA_TYPES):
        dt.value.add(name=name, number=i)

    def add(msg, name, number, ftype, repeated=False, type_name=None):
        f = msg.field.add(name=name, number=number, type=ftype)
        f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
        if type_name:
            f.type_name = type_name

    for msg_name, dims_no in (("ModelInput", 4), ("ModelOutput", 3)):
        m = fdp.message_type.add(name=msg_name)
        add(m, "name", 1, F.TYPE_STRING)
        add(m, "data_type", 2, F.TYPE_ENUM, type_name=".inference.DataType")
        add(m, "dims", dims_no, F.TYPE_INT64, repeated=True)
    group = fdp.message_type.add(name="ModelInstanceGroup")
    kind = group.enum_type.add(name="Kind")
    for i, name in enumerate(("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")):
        kind.value.add(name=name, number=i)
    add(group, "name", 1, F.TYPE_STRING)
    add(group, "count", 2, F.TYPE_INT32)
    add(group, "kind", 4, F.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")
    batching = fdp.message_type.add(name="ModelDynamicBatching")
    add(batching, "preferred_batch_size", 1, F.TYPE_INT32, repeated=True)
    add(batching, "max_queue_delay_microseconds", 2, F.TYPE_UINT64)
    param = fdp.message_type.add(name="ModelParameter")
    add(param, "string_value", 1, F.TYPE_STRING)
    cfg = fdp.message_type.add(name="ModelConfig")
    entry = cfg.nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    add(entry, "key", 1, F.TYPE_STRING)
    add(entry, "value", 2, F.TYPE_MESSAGE, type_name=".inference.ModelParameter")
    add(cfg, "name", 1, F.TYPE_STRING)
    add(cfg, "platform", 2, F.TYPE_STRING)
    add(cfg, "max_batch_size", 4, F.TYPE_INT32)
    add(cfg, "input", 5, F.TYPE_MESSAGE, True, ".inference.ModelInput")
    add(cfg, "output", 6, F.TYPE_MESSAGE, True, ".inference.ModelOutput")
    add(cfg, "instance_group", 7, F.TYPE_MESSAGE, True, ".inference.ModelInstanceGroup")
    add(cfg, "dynamic_batching", 11, F.TYPE_MESSAGE, type_name=".inference.ModelDynamicBatching")
    add(cfg, "parameters", 14, F.TYPE_MESSAGE, True, ".inference.ModelConfig.ParametersEntry")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_model_config(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, _model_config_class()())


# --------------------------------------------------------------------------- fixtures


def seg_model(*, batch="N", spec=SPEC) -> onnx.ModelProto:
    w = np.random.default_rng(0).normal(size=(1, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["logits"])],
        "seg",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1, 32, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if spec is not None:
        helper.set_model_props(model, spec.to_metadata())
    return model


@pytest.fixture
def onnx_path(tmp_path):
    path = tmp_path / "src" / "seg.onnx"
    path.parent.mkdir()
    onnx.save(seg_model(), path)
    return path


@pytest.fixture
def engine_path(tmp_path):
    path = tmp_path / "src" / "seg.plan"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x00fake serialized engine")
    EngineSidecar(
        tensorrt_version="10.3.0",
        gpu_name="NVIDIA L4",
        compute_capability="8.9",
        onnx_sha256="0" * 64,
        input_shapes={
            "image": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}
        },
        output_names=["logits"],
        precision="fp16",
        created="2025-01-01T00:00:00+00:00",
        cmdeploy_version="0.1.0",
        spec=SPEC.to_dict(),
        output_shapes={"logits": [-1, 1, 32, 32]},
        io_dtypes={"image": "float32", "logits": "float32"},
    ).write(sidecar_path(path))
    return path


# --------------------------------------------------------------------------- tests


def test_onnx_repository_layout_and_config(tmp_path, onnx_path):
    repo = tmp_path / "repo"
    written = write_triton_repository(repo, "seg", onnx_path=onnx_path)
    assert written == {"seg": repo / "seg"}
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == [
        "seg/1/model.onnx",
        "seg/config.pbtxt",
    ]
    assert (repo / "seg/1/model.onnx").read_bytes() == onnx_path.read_bytes()

    cfg = parse_pbtxt((repo / "seg/config.pbtxt").read_text())
    assert one(cfg, "name") == "seg"
    assert one(cfg, "platform") == "onnxruntime_onnx"
    assert one(cfg, "max_batch_size") == 32
    (inp,) = cfg["input"]
    assert (one(inp, "name"), one(inp, "data_type"), inp["dims"]) == (
        "image",
        "TYPE_FP32",
        [3, 32, 32],
    )
    (out,) = cfg["output"]
    assert (one(out, "name"), one(out, "data_type"), out["dims"]) == (
        "logits",
        "TYPE_FP32",
        [1, 32, 32],
    )
    batching = one(cfg, "dynamic_batching")
    assert batching["preferred_batch_size"] == [4, 8, 16]
    assert one(batching, "max_queue_delay_microseconds") == 500
    (group,) = cfg["instance_group"]
    assert (one(group, "count"), one(group, "kind")) == (1, "KIND_GPU")
    p = params(cfg)
    assert set(p) == {METADATA_KEY, "cmdeploy.model_file", "cmdeploy.model_sha256"}
    assert p["cmdeploy.model_file"] == "seg.onnx"
    assert p["cmdeploy.model_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    spec_json = p[METADATA_KEY]
    assert ModelSpec.from_dict(json.loads(spec_json)) == SPEC


def test_engine_gets_a_trt_model_capped_by_profile(tmp_path, onnx_path, engine_path):
    repo = tmp_path / "repo"
    written = write_triton_repository(
        repo,
        "seg",
        onnx_path=onnx_path,
        engine_path=engine_path,
        preferred_batch_sizes=(4, 8, 16, 32),
        max_queue_delay_us=250,
        instance_count=2,
        version=3,
    )
    assert set(written) == {"seg", "seg_trt"}
    assert (repo / "seg/3/model.onnx").is_file()
    assert (repo / "seg_trt/3/model.plan").read_bytes() == engine_path.read_bytes()
    cfg = parse_pbtxt((repo / "seg_trt/config.pbtxt").read_text())
    assert one(cfg, "name") == "seg_trt"
    assert one(cfg, "platform") == "tensorrt_plan"
    assert one(cfg, "max_batch_size") == 16  # the engine's profile maximum
    assert one(cfg, "dynamic_batching")["preferred_batch_size"] == [4, 8, 16]
    assert one(one(cfg, "dynamic_batching"), "max_queue_delay_microseconds") == 250
    assert one(cfg, "input")["dims"] == [3, 32, 32]
    assert one(cfg, "output")["dims"] == [1, 32, 32]
    assert one(one(cfg, "instance_group"), "count") == 2
    spec_json = params(cfg)[METADATA_KEY]
    assert params(cfg)["cmdeploy.model_file"] == "seg.plan"
    assert ModelSpec.from_dict(json.loads(spec_json)) == SPEC
    onnx_cfg = parse_pbtxt((repo / "seg/config.pbtxt").read_text())
    assert one(onnx_cfg, "dynamic_batching")["preferred_batch_size"] == [4, 8, 16, 32]


def test_configs_parse_as_triton_model_config(tmp_path, onnx_path, engine_path):
    repo = tmp_path / "repo"
    write_triton_repository(repo, "seg", onnx_path=onnx_path, engine_path=engine_path)
    for name, platform, mbs in (("seg", "onnxruntime_onnx", 32), ("seg_trt", "tensorrt_plan", 16)):
        cfg = parse_model_config((repo / name / "config.pbtxt").read_text())
        assert (cfg.name, cfg.platform, cfg.max_batch_size) == (name, platform, mbs)
        assert [(i.name, _DATA_TYPES[i.data_type], list(i.dims)) for i in cfg.input] == [
            ("image", "TYPE_FP32", [3, 32, 32])
        ]
        assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [1, 32, 32])]
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, 1)]  # KIND_GPU
        spec = json.loads(cfg.parameters[METADATA_KEY].string_value)
        assert ModelSpec.from_dict(spec) == SPEC
    # the schema has teeth: unknown fields and enum values are rejected
    from google.protobuf.text_format import ParseError

    for bad in ('name: "x"\nbogus: 1\n', "input [ { data_type: TYPE_FLOAT } ]\n"):
        with pytest.raises(ParseError):
            parse_model_config(bad)


def test_engine_only(tmp_path, engine_path):
    written = write_triton_repository(tmp_path / "r", "seg", engine_path=engine_path)
    assert list(written) == ["seg_trt"]
    assert not (tmp_path / "r" / "seg").exists()


def test_no_batching_keeps_batch_axis_and_drops_batcher(tmp_path, onnx_path):
    write_triton_repository(tmp_path / "r", "seg", onnx_path=onnx_path, max_batch_size=0)
    cfg = parse_pbtxt((tmp_path / "r/seg/config.pbtxt").read_text())
    assert one(cfg, "max_batch_size") == 0
    assert "dynamic_batching" not in cfg
    assert one(cfg, "input")["dims"] == [-1, 3, 32, 32]


def test_model_without_spec_has_no_spec_parameter(tmp_path):
    path = tmp_path / "plain.onnx"
    onnx.save(seg_model(spec=None), path)
    write_triton_repository(tmp_path / "r", "plain", onnx_path=path, onnx_instance_kind="KIND_CPU")
    cfg = parse_pbtxt((tmp_path / "r/plain/config.pbtxt").read_text())
    assert METADATA_KEY not in params(cfg)
    assert params(cfg)["cmdeploy.model_file"] == "plain.onnx"
    assert one(one(cfg, "instance_group"), "kind") == "KIND_CPU"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs onnx_path, engine_path or both"),
        ({"onnx": True, "model_name": "bad name"}, "may only use"),
        ({"onnx": True, "preferred_batch_sizes": (4, 64)}, r"must lie in 1\.\.32"),
        ({"onnx": True, "instance_count": 0}, "instance_count >= 1"),
        ({"onnx": True, "onnx_instance_kind": "KIND_TPU"}, "onnx_instance_kind"),
        ({"onnx_path": "missing.onnx"}, "not found"),
    ],
)
def test_argument_errors(tmp_path, onnx_path, kwargs, match):
    kwargs = dict(kwargs)
    name = kwargs.pop("model_name", "seg")
    if kwargs.pop("onnx", False):
        kwargs["onnx_path"] = onnx_path
    elif "onnx_path" in kwargs:
        kwargs["onnx_path"] = tmp_path / kwargs["onnx_path"]
    with pytest.raises(InputError, match=match):
        write_triton_repository(tmp_path / "r", name, **kwargs)


def test_fixed_batch_model_needs_dynamic_axis(tmp_path):
    path = tmp_path / "fixed.onnx"
    onnx.save(seg_model(batch=1), path)
    with pytest.raises(InputError, match="fixed batch size 1"):
        write_triton_repository(tmp_path / "r", "fixed", onnx_path=path)
    write_triton_repository(tmp_path / "r", "fixed", onnx_path=path, max_batch_size=0)
    cfg = parse_pbtxt((tmp_path / "r/fixed/config.pbtxt").read_text())
    assert one(cfg, "input")["dims"] == [1, 3, 32, 32]


def test_fused_repository_speaks_the_client_contract(tmp_path, fused_model_path, onnx_path):
    """The GPU path: the fused model's config is what cmdeploy's Triton client expects."""
    write_triton_repository(tmp_path / "r", "cmdeploy", onnx_path=fused_model_path, require_fused=True)
    text = (tmp_path / "r/cmdeploy/config.pbtxt").read_text()
    cfg = parse_model_config(text)
    assert [(i.name, _DATA_TYPES[i.data_type], list(i.dims)) for i in cfg.input] == [
        ("slices", "TYPE_FP32", [-1, -1]),
        ("points", "TYPE_FP32", [4, 2]),
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("probabilities", [-1, -1])]
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32

    # what a Triton server reports for this config, fed to the client's set-up
    from cmdeploy.backends.triton import TritonRunner

    meta = {
        "inputs": [{"name": i.name, "datatype": _DATA_TYPES[i.data_type][5:]} for i in cfg.input],
        "outputs": [{"name": o.name, "datatype": "FP32"} for o in cfg.output],
    }
    config = {
        "max_batch_size": cfg.max_batch_size,
        "parameters": {k: {"string_value": v.string_value} for k, v in cfg.parameters.items()},
    }
    runner = object.__new__(TritonRunner)
    runner.model_name, runner.url = "cmdeploy", "http://gpu-node:8000"
    runner._init_from(meta, config)
    assert runner.spec == ModelSpec.from_metadata(
        {p.key: p.value for p in onnx.load(str(fused_model_path)).metadata_props}
    )
    assert runner.slice_dtype == np.float32 and runner.max_batch_size == 32
    assert runner.model_file == fused_model_path.name
    assert runner.model_sha256 == hashlib.sha256(fused_model_path.read_bytes()).hexdigest()

    with pytest.raises(InputError, match="not a fused cmdeploy model"):
        write_triton_repository(tmp_path / "r2", "plain", onnx_path=onnx_path, require_fused=True)
    assert not (tmp_path / "r2").exists()
