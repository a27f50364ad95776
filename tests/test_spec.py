"""Tests of cmdeploy.spec.ModelSpec: the model card carried by every artifact."""

from __future__ import annotations

import json

import pytest

from cmdeploy.spec import METADATA_KEY, ModelSpec

SPECS = [
    ModelSpec(),
    ModelSpec.for_input_size(512),
    ModelSpec.for_input_size(128, guidance="cm+ep", threshold=0.4, pad_hu=-1000.0),
    ModelSpec(input_size=64, guidance="ep", ep_sigma=2.5, target_size=40.0, window=(-100, 300)),
    ModelSpec(cm_variant="authors", cm_params={"tau": 7.0}, norm_mean=0.1, norm_std=0.3),
    ModelSpec(guidance="ep", extra_windows=((-1000, 0), (150.5, 1500))),
]


@pytest.mark.parametrize("spec", SPECS)
def test_metadata_round_trip(spec):
    meta = spec.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    back = ModelSpec.from_metadata(meta)
    assert back == spec
    assert isinstance(back.window, tuple) and isinstance(back.train_target_range, tuple)
    assert meta["cmdeploy.input_size"] == str(spec.input_size)
    assert meta["cmdeploy.channels"] == ",".join(spec.channels)
    assert meta["cmdeploy.guidance"] == spec.guidance
    assert float(meta["cmdeploy.threshold"]) == spec.threshold
    # a JSON round trip of the dict form (checkpoint config) gives the same spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_metadata_round_trip_through_onnx_metadata_props():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    spec = ModelSpec.for_input_size(256, guidance="cm+ep", cm_params={"tau": 3.0})
    helper.set_model_props(model, spec.to_metadata())
    loaded = onnx.load_from_string(model.SerializeToString())
    assert ModelSpec.from_metadata({p.key: p.value for p in loaded.metadata_props}) == spec


def test_extra_windows_add_image_channels_before_guidance():
    spec = ModelSpec(guidance="cm+ep", extra_windows=[(-1000, 0), [150, 1500]])
    assert spec.extra_windows == ((-1000.0, 0.0), (150.0, 1500.0))  # normalised to float tuples
    assert spec.windows == ((-200.0, 250.0), (-1000.0, 0.0), (150.0, 1500.0))
    assert spec.channels == ("image", "image2", "image3", "cm", "ep")
    assert spec.num_image_channels == 3 and spec.guidance_channels == ("cm", "ep")
    # the paper's single window keeps the metadata older readers know (no extra_windows key)
    assert "extra_windows" not in ModelSpec().to_dict()
    assert ModelSpec.from_dict(ModelSpec().to_dict()).extra_windows == ()
    with pytest.raises(ValueError, match="extra window"):
        ModelSpec(extra_windows=((100, 100),))


def test_channels_and_paper_scaling():
    assert ModelSpec(guidance="cm").channels == ("image", "cm")
    assert ModelSpec(guidance="ep").num_channels == 2
    assert ModelSpec(guidance="cm+ep").channels == ("image", "cm", "ep")
    paper = ModelSpec.for_input_size(512)
    assert paper.target_size == 375.0 and paper.train_target_range == (350.0, 400.0)
    assert paper.ep_sigma == 10.0
    half = ModelSpec.for_input_size(256)
    assert half.target_size == 187.5 and half.train_target_range == (175.0, 200.0)
    assert half.ep_sigma == 5.0
    assert ModelSpec().target_size == half.target_size  # defaults are the 256-pixel paper scaling
    assert ModelSpec.for_input_size(256, target_size=100.0).target_size == 100.0
    spec = ModelSpec(window=[-100, 300], train_target_range=[1, 2])
    assert spec.window == (-100.0, 300.0) and spec.train_target_range == (1.0, 2.0)
    assert all(isinstance(v, float) for v in spec.window)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guidance": "cm+cm"}, "guidance"),
        ({"guidance": "points"}, "guidance"),
        ({"input_size": 8, "target_size": 4.0}, "input_size"),
        ({"window": (250.0, -200.0)}, "window"),
        ({"window": (0.0, 0.0)}, "window"),
        ({"norm_std": 0.0}, "norm_std"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.0}, "threshold"),
        ({"target_size": 300.0}, "target_size"),
        ({"target_size": 0.0}, "target_size"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelSpec(**kwargs)


def test_from_dict_and_from_metadata_errors():
    d = ModelSpec().to_dict()
    d["colour"] = "blue"
    with pytest.raises(ValueError, match="colour"):
        ModelSpec.from_dict(d)
    with pytest.raises(ValueError, match=METADATA_KEY):
        ModelSpec.from_metadata({"producer": "somebody"})
    with pytest.raises(ValueError):
        ModelSpec.from_metadata({METADATA_KEY: "{not json"})
    bad = json.loads(ModelSpec().to_metadata()[METADATA_KEY])
    bad["threshold"] = 2.0
    with pytest.raises(ValueError, match="threshold"):
        ModelSpec.from_metadata({METADATA_KEY: json.dumps(bad)})


def test_spec_is_immutable():
    spec = ModelSpec()
    with pytest.raises(AttributeError):
        spec.input_size = 512  # type: ignore[misc]
