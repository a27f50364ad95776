"""Fused-preprocessing graph: tensor guidance vs cmdeploy.guidance, and the exported graph vs the
NumPy runtime path (prepare_batch -> network -> sigmoid -> probabilities_to_slice) on real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from cmdeploy.export.fused import (  # noqa: E402
    FusedSegmenter,
    _sample_grid_t,
    confidence_map_t,
    cross_centre_t,
    export_fused,
    export_fused_graph,
    gaussian_heatmap_t,
    numpy_reference,
    run_fused,
)
from cmdeploy.export.parity import (  # noqa: E402
    compare_outputs,
    ct_small_cases,
    default_cases,
    footprints,
    shared_data_cases,
    shared_data_dir,
)
from cmdeploy.geometry import crop_transform, sample_grid  # noqa: E402
from cmdeploy.guidance import confidence_map, cross_centre, gaussian_heatmap  # noqa: E402
from cmdeploy.preprocess import prepare_batch  # noqa: E402
from cmdeploy.spec import ModelSpec  # noqa: E402
from cmdeploy.train.checkpoint import Checkpoint  # noqa: E402
from cmdeploy.train.model import build_model, make_config  # noqa: E402

torch.set_num_threads(1)
SIZE = 64


def _t(points: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(np.asarray(points, np.float64).reshape(-1, 4, 2), dtype=dtype)


# ------------------------------------------------------------------------ tensor guidance
coord = st.floats(-3.0, 35.0, allow_nan=False, width=32)
lattice = st.integers(0, 32).map(float)  # clicked pixel centres: lines often meet on the grid


@st.composite
def point_sets(draw: st.DrawFn, values: st.SearchStrategy = coord) -> np.ndarray:
    v = np.array(draw(st.lists(values, min_size=8, max_size=8)), dtype=np.float64).reshape(4, 2)
    if v[0, 0] > v[1, 0]:
        v[[0, 1]] = v[[1, 0]]
    if v[2, 1] > v[3, 1]:
        v[[2, 3]] = v[[3, 2]]
    if np.all(v == v[0]):
        v[1, 0] += 1.0
    return v.astype(np.float32).astype(np.float64)


class _GuidanceGraph(torch.nn.Module):
    def __init__(self, size: int, variant: str) -> None:
        super().__init__()
        self.size, self.variant = size, variant

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return confidence_map_t(points, self.size, variant=self.variant)


VARIANTS = ("paper", "authors", "chebyshev", "mahalanobis")


@pytest.fixture(scope="module")
def guidance_sessions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """onnxruntime sessions of the in-graph confidence map (float64 points), per (size, variant)."""
    import warnings

    d = tmp_path_factory.mktemp("cm")
    sessions = {}
    for size in (17, 32):
        for variant in VARIANTS:
            path = d / f"cm_{size}_{variant}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _GuidanceGraph(size, variant), (torch.zeros(1, 4, 2, dtype=torch.float64),),
                    str(path), input_names=["points"], output_names=["cm"],
                    dynamic_axes={"points": {0: "batch"}}, opset_version=17, dynamo=False,
                )
            sessions[size, variant] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sessions


@settings(max_examples=80, deadline=None)
@given(pts=st.one_of(point_sets(), point_sets(lattice)), size=st.sampled_from([17, 32]))
def test_graph_confidence_map_equals_numpy(guidance_sessions, pts: np.ndarray, size: int) -> None:
    """The exported guidance (float64 geometry) reproduces cmdeploy.guidance, tie band and
    thresholds included, on random and on pixel-lattice points."""
    for variant in VARIANTS:
        want = confidence_map(pts, (size, size), variant=variant)
        (got,) = guidance_sessions[size, variant].run(None, {"points": pts[None].astype(np.float64)})
        np.testing.assert_allclose(got[0], want, atol=1e-6, err_msg=variant)


@settings(max_examples=40, deadline=None)
@given(pts=st.one_of(point_sets(), point_sets(lattice)), size=st.sampled_from([17, 32]))
def test_eager_confidence_map_is_close(pts: np.ndarray, size: int) -> None:
    """torch eager with float64 geometry: torch's vectorised float32 sqrt is not always correctly
    rounded, so within 1e-4 except a pixel or two exactly on a binary map's threshold."""
    for variant in VARIANTS:
        want = confidence_map(pts, (size, size), variant=variant)
        got = confidence_map_t(_t(pts, torch.float64), size, variant=variant)[0].numpy()
        assert np.count_nonzero(np.abs(got - want) > 1e-4) <= 3, variant


@settings(max_examples=30, deadline=None)
@given(pts=point_sets(), sigma=st.floats(0.5, 8.0))
def test_gaussian_heatmap_matches_numpy(pts: np.ndarray, sigma: float) -> None:
    want = gaussian_heatmap(pts, (24, 24), sigma=sigma)
    got = gaussian_heatmap_t(_t(pts), 24, sigma)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_parallel_fallback_degenerate_segment_and_tie_rule() -> None:
    cases = {
        # both segments horizontal: parallel -> mean of the four points
        "parallel": [[2, 10], [20, 10], [5, 10], [15, 10]],
        # left == right: zero-length segment A, any direction
        "zero_length": [[12, 12], [12, 12], [10, 3], [14, 25]],
        # c = (16, 16) exactly; column 16 is level with c: sigma_A = mean(14, 4) = 9 there
        "tie": [[2, 16], [20, 16], [10, 3], [22, 29]],
    }
    for name, pts in cases.items():
        p = np.asarray(pts, np.float64)
        np.testing.assert_allclose(
            cross_centre_t(_t(p))[0].numpy(), cross_centre(p[None])[0], atol=1e-5, err_msg=name
        )
        want = confidence_map(p, (33, 33))
        got = confidence_map_t(_t(p), 33)[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(cross_centre_t(_t(cases["parallel"]))[0].numpy(), [10.5, 10.0])
    # pixel (x=16, y=26): d_A = 10 / 9 (tie sigma), d_B = perpendicular distance / |c - q|
    tie = confidence_map_t(_t(cases["tie"]), 33)[0].numpy()
    d_a = 10.0 / 9.0
    d_b = abs(6 * 26 - 23 * 12) / np.hypot(12, 26) / np.hypot(6, 13)
    want = 1.0 / (1.0 + min(d_a, d_b) * np.hypot(d_a, d_b))
    assert tie[26, 16] == pytest.approx(want, abs=1e-5)
    assert tie[26, 15] != pytest.approx(want, abs=1e-2)  # one column left: sigma_A = 14


# ------------------------------------------------------------------------ module, no export
class StandIn(torch.nn.Module):
    """A small conv stack standing in for any network (C channels -> 1 logit)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 3, padding=1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) * 4.0


def _run_net(net: torch.nn.Module):
    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).numpy()

    return run


def test_fused_module_matches_numpy_path_with_stand_in() -> None:
    spec = ModelSpec.for_input_size(32)
    net = StandIn(2).eval()
    cases = ct_small_cases()
    slices = np.stack([c.slice_hu for c in cases])
    pts = np.stack([c.points for c in cases])
    want = numpy_reference(_run_net(net), list(slices), pts, spec)
    with torch.no_grad():
        got = FusedSegmenter(net, spec)(torch.from_numpy(slices), torch.from_numpy(pts)).numpy()
    regions = footprints(cases, spec.input_size, spec.target_size)
    for i in range(len(cases)):
        np.testing.assert_allclose(got[i], want[i], atol=1e-4, err_msg=cases[i].name)
        assert np.all(got[i][~regions[i]] == 0.0)


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec.for_input_size(32, guidance="cm+ep"),
        ModelSpec.for_input_size(32, guidance="ep", extra_windows=((-1000.0, 0.0), (150.0, 1500.0))),
    ],
    ids=["cm+ep", "three-windows+ep"],
)
def test_graph_input_channels_match_numpy(spec: ModelSpec, tmp_path: Path) -> None:
    path = export_fused_graph(StandIn(spec.num_channels).eval(), spec, tmp_path / "g.onnx", debug=True)
    cases = ct_small_cases()[:4]
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"slices": np.stack([c.slice_hu for c in cases]), "points": np.stack([c.points for c in cases])}
    _, net_in, _ = sess.run(None, feeds)
    k = spec.num_image_channels
    assert net_in.shape == x.shape == (4, spec.num_channels, 32, 32)
    np.testing.assert_allclose(net_in[:, k:], x[:, k:], atol=1e-4)  # guidance
    np.testing.assert_allclose(net_in[:, :k], x[:, :k], atol=1e-3)  # windowed image(s)


# ------------------------------------------------------------------------ exported checkpoint
def _tiny_checkpoint(path: Path) -> Checkpoint:
    """Random ResNet-18 (width 8, 64 px), classifier calibrated to ~50 % foreground on CT_small."""
    torch.manual_seed(0)
    spec = ModelSpec.for_input_size(SIZE)
    cfg = make_config("compact", 2, depth=18, base_width=8, input_size=SIZE, psp_channels=16)
    model = build_model(cfg).eval()
    cases = ct_small_cases()
    x, _ = prepare_batch([c.slice_hu for c in cases], [c.points for c in cases], spec)
    with torch.no_grad():
        torch.nn.init.normal_(model.head.classifier.weight, std=0.5)
        model.head.classifier.bias -= float(np.median(model(torch.from_numpy(x)).numpy()))
    ckpt = Checkpoint.from_model(model, spec, metrics={"val_dice": 0.5})
    ckpt.save(path)
    return ckpt


@pytest.fixture(scope="module")
def fused_model(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("fused")
    ckpt = _tiny_checkpoint(d / "tiny.pt")
    result = export_fused(d / "tiny.pt", d / "fused.onnx", parity_slices=ct_small_cases(), debug=True)
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, feeds), strict=True))

    return ckpt, result, run, d


def _check_against_numpy(ckpt: Checkpoint, run, cases) -> None:
    spec = ckpt.spec
    slices = [c.slice_hu for c in cases]
    pts = np.stack([c.points for c in cases])
    want = numpy_reference(_run_net(ckpt.build_model()), slices, pts, spec)
    got = run_fused(run, slices, pts)
    regions = footprints(cases, spec.input_size, spec.target_size)
    rep = compare_outputs(want, got, spec.threshold, regions=regions)
    assert rep.mask_agreement >= 0.995, rep.summary()
    assert rep.dice >= 0.995, rep.summary()
    assert 0.1 < rep.foreground < 0.9, rep.summary()  # masks with real boundaries
    for g, r, c in zip(got, regions, cases, strict=True):
        assert g.shape == c.slice_hu.shape
        assert np.all(g[~r] == 0.0), c.name


def test_exported_graph_io_metadata_and_parity(fused_model) -> None:
    ckpt, result, _, _ = fused_model
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model, full_check=True)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["cmdeploy.graph"] == "fused"
    assert ModelSpec.from_metadata(meta) == ckpt.spec
    ins = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert ins == {"slices": ["batch", "height", "width"], "points": ["batch", 4, 2]}
    assert [o.name for o in model.graph.output][0] == "probabilities"
    ops = [n.op_type for n in model.graph.node]
    # crop and paste-back sample separably with whole-row Gathers: no GridSample, no GatherElements
    assert "GridSample" not in ops and "GatherElements" not in ops
    assert "BatchNormalization" not in ops
    assert result.parity is not None and result.parity.mask_agreement >= 0.995


def test_in_graph_preprocessing_equals_numpy(fused_model) -> None:
    ckpt, _, run, _ = fused_model
    spec = ckpt.spec
    cases = default_cases()  # CT_small point sets, plus shared-data objects when present
    for c in cases:
        out = run({"slices": c.slice_hu[None], "points": c.points[None]})
        x, (t,) = prepare_batch([c.slice_hu], [c.points], spec)
        cm = confidence_map(t.to_crop(c.points), (SIZE, SIZE))
        # brief: within 1e-4; float64 geometry reproduces it to float32 rounding
        np.testing.assert_allclose(out["network_input"][0, 1], cm, atol=1e-6, err_msg=c.name)
        np.testing.assert_allclose(out["network_input"][0, 0], x[0, 0], atol=1e-3, err_msg=c.name)


def test_fused_vs_numpy_on_ct_small(fused_model) -> None:
    ckpt, _, run, _ = fused_model
    _check_against_numpy(ckpt, run, ct_small_cases())


def test_dynamic_slice_size_and_batch(fused_model) -> None:
    ckpt, _, run, _ = fused_model
    base = ct_small_cases()
    shift = np.array([5.0, 10.0], np.float32)  # crop rows 10..109, columns 5..94
    cases = []
    for c in base:
        p = c.points - shift
        if (p >= 0).all() and (p[:, 0] <= 89).all() and (p[:, 1] <= 99).all():
            cases.append(type(c)(c.name + ":cropped", c.slice_hu[10:110, 5:95].copy(), p))
    assert len(cases) >= 3
    _check_against_numpy(ckpt, run, cases[:1])  # batch 1, 100 x 90 slice
    _check_against_numpy(ckpt, run, cases)


@pytest.mark.shared_data
@pytest.mark.skipif(shared_data_dir() is None, reason="needs ../shared/data/ct-organs")
def test_fused_vs_numpy_on_shared_data(fused_model) -> None:
    ckpt, _, run, _ = fused_model
    cases = shared_data_cases()
    assert cases
    _check_against_numpy(ckpt, run, cases)


def test_crop_transform_matches_module_geometry() -> None:
    from cmdeploy.export.fused import crop_geometry

    for c in ct_small_cases():
        t = crop_transform(c.points, SIZE, 46.875)
        pts = torch.tensor(c.points[None], dtype=torch.float64)
        z, off = crop_geometry(pts, 46.875, SIZE)
        want = np.array([[z[0].item(), 0.0, off[0, 0].item()], [0.0, z[0].item(), off[0, 1].item()]])
        np.testing.assert_array_equal(t.matrix, want)  # the same float64 operations


def test_float32_geometry_graph_has_no_float64_and_passes_parity(fused_model) -> None:
    d = fused_model[3]
    cases = default_cases()
    result = export_fused(
        d / "tiny.pt", d / "fused32.onnx", parity_slices=cases, geometry_dtype="float32", debug=True
    )
    assert result.parity is not None and result.parity.mask_agreement >= 0.995
    assert result.parity.dice >= 0.995
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    spec = fused_model[0].spec
    for c in cases:  # float32 geometry moves points by ~1e-6 px: the map stays within 1e-4
        _, net_in, _ = sess.run(None, {"slices": c.slice_hu[None], "points": c.points[None]})
        t = crop_transform(c.points, spec.input_size, spec.target_size)
        cm = confidence_map(t.to_crop(c.points), (SIZE, SIZE))
        np.testing.assert_allclose(net_in[0, 1], cm, atol=1e-4, err_msg=c.name)
    model = onnx.load(str(result.path))
    double = onnx.TensorProto.DOUBLE
    assert all(t.data_type != double for t in model.graph.initializer)
    for node in model.graph.node:
        for a in node.attribute:
            assert not (node.op_type == "Cast" and a.name == "to" and a.i == double), node.name
            assert not (a.name == "value" and a.t.data_type == double), node.name
    assert result.metadata["cmdeploy.fused_geometry_dtype"] == "float32"


def test_cli_fused_export(fused_model) -> None:
    from cmdeploy.cli import app

    d = fused_model[3]
    out = d / "cli_fused.onnx"
    res = CliRunner().invoke(
        app, ["export", "--checkpoint", str(d / "tiny.pt"), "--output", str(out), "--fused"]
    )
    assert res.exit_code == 0, res.output
    assert "fused graph" in res.output and "parity:" in res.output and "float64" in res.output
    names = [i.name for i in onnx.load(str(out)).graph.input]
    assert names == ["slices", "points"]


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 30),
    st.integers(2, 30),
    st.lists(st.floats(-5.0, 35.0), min_size=1, max_size=20),
    st.lists(st.floats(-5.0, 35.0), min_size=1, max_size=20),
    st.sampled_from([0.0, -1024.0]),
)
def test_graph_sampling_equals_numpy_sample_grid(h: int, w: int, xs: list, ys: list, fill: float) -> None:
    """The fused graph's separable sampler (crop and paste-back) is geometry.sample_grid, bit for bit,
    with float64 coordinates; two items with different grids in one batch."""
    rng = np.random.default_rng(h * 31 + w)
    imgs = rng.normal(0, 400, (2, h, w)).astype(np.float32)
    xs2 = np.stack([np.array(xs), np.array(xs)[::-1] + 0.37])
    ys2 = np.stack([np.array(ys), np.array(ys)[::-1] - 0.61])
    got = _sample_grid_t(torch.from_numpy(imgs), torch.from_numpy(xs2), torch.from_numpy(ys2), fill).numpy()
    for b in range(2):
        np.testing.assert_array_equal(got[b], sample_grid(imgs[b], xs2[b], ys2[b], fill=fill))
