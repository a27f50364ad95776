"""ResNet-PSP: shapes, exact matrix pooling/resizing, ONNX export, one training step."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdeploy.train.model import (
    NAMED_CONFIGS,
    MatrixAdaptiveAvgPool2d,
    MatrixBilinearResize,
    ModelConfig,
    ResNetPSP,
    build_model,
    count_parameters,
    feature_size,
    make_config,
)

torch.set_num_threads(1)


def small(depth: int = 18, in_channels: int = 2, input_size: int = 64, **kw) -> ModelConfig:
    base = dict(base_width=8, psp_channels=8, dropout=0.1)
    base.update(kw)
    return ModelConfig(depth=depth, input_size=input_size, in_channels=in_channels, **base)


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine params and running stats, so export-time BN fusion is exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_output_shape_every_depth(depth: int) -> None:
    model = build_model(small(depth=depth, base_width=4, input_size=48)).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 2, 48, 48))
    assert y.shape == (2, 1, 48, 48)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("in_channels", [2, 3, 4])
@pytest.mark.parametrize("input_size", [64, 60])  # 60: feature side ceil(60/8) = 8, not exact
def test_output_shape_every_channel_count(in_channels: int, input_size: int) -> None:
    model = build_model(small(in_channels=in_channels, input_size=input_size)).eval()
    with torch.no_grad():
        y = model(torch.randn(1, in_channels, input_size, input_size))
    assert y.shape == (1, 1, input_size, input_size)


def test_backbone_output_stride_8() -> None:
    for size in (64, 60, 57):
        model = build_model(small(input_size=size)).eval()
        with torch.no_grad():
            feats = model.backbone(torch.randn(1, 2, size, size))
        assert feats.shape[-2:] == (math.ceil(size / 8),) * 2 == (feature_size(size),) * 2
    assert build_model(small(depth=50, base_width=4)).backbone.out_channels == 4 * 8 * 4
    assert build_model(small(depth=18, base_width=4)).backbone.out_channels == 4 * 8


def test_wrong_input_shape_is_a_clear_error() -> None:
    model = build_model(small()).eval()
    with pytest.raises(ValueError, match=r"expects input \(N, 2, 64, 64\).*got \(1, 2, 32, 32\)"):
        model(torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 3, 64, 64\)"):
        model(torch.zeros(1, 3, 64, 64))


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    bins=st.sampled_from([1, 2, 3, 6]),
    seed=st.integers(0, 2**16),
)
def test_matrix_pool_equals_adaptive_avg_pool(h: int, w: int, bins: int, seed: int) -> None:
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    got = MatrixAdaptiveAvgPool2d((h, w), bins)(x)
    want = F.adaptive_avg_pool2d(x, bins)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("h", "w", "bins"), [(7, 7, 3), (13, 10, 6), (32, 32, 6), (13, 10, 3)])
def test_matrix_pool_uneven_examples(h: int, w: int, bins: int) -> None:
    x = torch.rand(1, 4, h, w, generator=torch.Generator().manual_seed(h * w))
    torch.testing.assert_close(
        MatrixAdaptiveAvgPool2d((h, w), bins)(x), F.adaptive_avg_pool2d(x, bins), atol=1e-6, rtol=0
    )


@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    oh=st.integers(1, 64),
    ow=st.integers(1, 64),
    seed=st.integers(0, 2**16),
)
def test_matrix_resize_equals_bilinear_interpolate(h: int, w: int, oh: int, ow: int, seed: int):
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    got = MatrixBilinearResize((h, w), (oh, ow))(x)
    want = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def test_head_matrices_are_not_in_state_dict() -> None:
    model = build_model(small())
    keys = set(model.state_dict())
    assert not any(k.endswith(("p_h", "p_wt", "u_h", "u_wt")) for k in keys)
    assert any(k.endswith("p_h") for k, _ in model.named_buffers())


def test_final_bias_prior_and_bn_init() -> None:
    model = build_model(small())
    assert model.head.classifier.bias.item() == pytest.approx(-1.0)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_compact_graph_matches_onnxruntime(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = build_model(small(in_channels=2, input_size=64)).eval()
    randomise_batchnorm(model)
    path = tmp_path / "m.onnx"
    x = torch.randn(2, 2, 64, 64)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    graph = onnx.load(str(path)).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["Gather"] == 0, ops
    assert len(graph.node) < 200, ops
    for banned in ("GlobalAveragePool", "AveragePool", "Resize", "Shape", "BatchNormalization"):
        assert ops[banned] == 0, (banned, ops)
    assert ops["Conv"] == 26  # stem + 16 block convs + 3 downsamples + 4 branches + fuse + cls

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 2, 64, 64)  # a different batch size than the traced one
    (got,) = session.run(None, {"input": x3.numpy()})
    with torch.no_grad():
        want = model(x3).numpy()
    assert got.shape == (3, 1, 64, 64)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_one_adam_step_lowers_bce() -> None:
    torch.manual_seed(0)
    model = build_model(small(dropout=0.0)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(4, 2, 64, 64)
    target = (torch.rand(4, 1, 64, 64) > 0.6).float()

    def loss_value() -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(model(x), target)

    before = loss_value()
    opt.zero_grad()
    before.backward()
    assert all(p.grad is not None for p in model.parameters())
    opt.step()
    after = loss_value()
    assert after.item() < before.item()


def test_config_dict_round_trip_and_errors() -> None:
    cfg = small(depth=50)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["colour"] = 1
    del d["depth"]
    with pytest.raises(ValueError, match=r"unknown \['colour'\], missing \['depth'\]"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="depth"):
        small(depth=19)
    with pytest.raises(ValueError, match="dropout"):
        small(dropout=1.0)


def test_make_config() -> None:
    cfg = make_config("compact", 3, input_size=128)
    assert (cfg.depth, cfg.in_channels, cfg.input_size) == (18, 3, 128)
    assert cfg.base_width == NAMED_CONFIGS["compact"].base_width
    with pytest.raises(ValueError, match="unknown model config 'huge'"):
        make_config("huge", 2)
    with pytest.raises(ValueError, match=r"overrides: \['width'\]"):
        make_config("paper", 2, width=3)


def test_named_configs() -> None:
    paper = NAMED_CONFIGS["paper"]
    assert (paper.depth, paper.base_width, paper.input_size) == (101, 64, 512)
    compact = NAMED_CONFIGS["compact"]
    assert (compact.depth, compact.input_size) == (18, 256)
    assert compact.base_width < 64


def test_paper_config_constructs_at_small_input() -> None:
    cfg = make_config("paper", 2, input_size=32)
    model = build_model(cfg)
    assert isinstance(model, ResNetPSP)
    assert model.backbone.out_channels == 2048
    # ResNet-101 without fc (42.5M) + PSPNet head (4 x 1x1 2048->512, 3x3 4096->512: 23.1M)
    assert 65e6 < count_parameters(model) < 66e6
    with torch.no_grad():
        y = model.eval()(torch.randn(1, 2, 32, 32))
    assert y.shape == (1, 1, 32, 32)


@pytest.mark.slow
def test_paper_config_forward_512() -> None:
    model = build_model(make_config("paper", 2)).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 2, 512, 512))
    assert y.shape == (1, 1, 512, 512)
    assert torch.isfinite(y).all()


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        small().depth = 50  # type: ignore[misc]
