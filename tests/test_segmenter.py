"""Segmenter: loading, plain/fused layouts, geometry end to end, input validation, torch-free runtime."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_INPUT_SIZE, build_random_plain_model

from cmdeploy.errors import InputError, ModelError
from cmdeploy.guidance import confidence_map
from cmdeploy.preprocess import prepare_batch, probabilities_to_slice, sigmoid
from cmdeploy.segmenter import Segmenter
from cmdeploy.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
# left, right, top, bottom, each (x = column, y = row)
PTS = np.array([[30, 52], [88, 50], [60, 21], [57, 80]], dtype=np.float32)


def _slice(shape=(96, 128), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 150.0, shape).astype(np.float32)


@pytest.fixture(scope="module")
def seg(plain_model_path: Path) -> Segmenter:
    return Segmenter.load(plain_model_path, threads=1, batch_size=3)


def test_load_reads_spec_and_properties(seg: Segmenter, plain_model_path: Path) -> None:
    assert seg.spec == ModelSpec.for_input_size(TEST_INPUT_SIZE)
    assert seg.backend == "onnxruntime"
    assert not seg.fused
    assert seg.model_path == plain_model_path
    assert seg.model_sha256 == hashlib.sha256(plain_model_path.read_bytes()).hexdigest()
    assert seg.threshold == seg.spec.threshold
    assert "plain" in repr(seg)


def test_predict_shapes_and_dtypes(seg: Segmenter) -> None:
    img = _slice((96, 128))
    mask = seg.predict(img, PTS)
    assert mask.dtype == np.bool_ and mask.shape == (96, 128)
    probs = seg.predict(img, PTS, return_probabilities=True)
    assert probs.dtype == np.float32 and probs.shape == (96, 128)
    assert probs.min() >= 0.0 and probs.max() <= 1.0
    assert probs.max() > 0.0
    np.testing.assert_array_equal(mask, probs > seg.spec.threshold)
    # integer HU and a list of points are accepted too
    hu16 = np.rint(img).astype(np.int16)
    np.testing.assert_array_equal(seg.predict(hu16, PTS.tolist()), seg.predict(hu16.astype(np.float32), PTS))


def test_predict_equals_predict_batch(seg: Segmenter) -> None:
    rng = np.random.default_rng(3)
    slices = [_slice((96, 128), 1), _slice((96, 128), 2), _slice((70, 90), 3)]
    items_s, items_p = [], []
    for i in range(7):  # more than batch_size (3): several model calls, mixed slice sizes
        img = slices[i % 3]
        h, w = img.shape
        x0, y0 = rng.uniform(2, w / 3), rng.uniform(2, h / 3)
        x1, y1 = rng.uniform(w / 2, w - 3), rng.uniform(h / 2, h - 3)
        items_s.append(img)
        items_p.append(
            np.array(
                [[x0, (y0 + y1) / 2], [x1, (y0 + y1) / 2 + 1], [(x0 + x1) / 2, y0], [(x0 + x1) / 2 - 1, y1]],
                np.float32,
            )
        )
    batch = seg.predict_batch(items_s, items_p, return_probabilities=True)
    masks = seg.predict_batch(items_s, np.stack(items_p))
    assert len(batch) == len(masks) == 7
    for img, pts, pb, mb in zip(items_s, items_p, batch, masks, strict=True):
        np.testing.assert_array_equal(seg.predict(img, pts, return_probabilities=True), pb)
        np.testing.assert_array_equal(seg.predict(img, pts), mb)
        # masks are thresholded on the crop's footprint only: the same as on the whole slice
        np.testing.assert_array_equal(mb, pb > seg.threshold)
        assert mb.dtype == bool and mb.shape == img.shape
    # stacked (N, H, W) slices and one shared 2-D slice give the same as lists
    same = [slices[0]] * 3
    ref = seg.predict_batch(same, items_p[:3])
    for a, b, c in zip(
        ref,
        seg.predict_batch(np.stack(same), items_p[:3]),
        seg.predict_batch(slices[0], items_p[:3]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert seg.predict_batch([], []) == []


def test_overlapped_preparation_gives_the_same_results(seg: Segmenter) -> None:
    """predict_batch prepares batch k+1 in a worker thread while batch k runs: same outputs, same order."""
    rng = np.random.default_rng(8)
    img = _slice((96, 128), 4)
    pts = []
    for _ in range(8):  # batch_size 3: three batches
        x0, y0 = rng.uniform(4, 40, 2)
        corners = [[x0, y0 + 20], [x0 + 50, y0 + 21], [x0 + 25, y0], [x0 + 24, y0 + 45]]
        pts.append(np.array(corners, np.float32))
    assert seg.batch_size < len(pts)
    try:
        seg.overlap = True
        overlapped = seg.predict_batch([img] * len(pts), pts, return_probabilities=True)
        seg.overlap = False
        sequential = seg.predict_batch([img] * len(pts), pts, return_probabilities=True)
    finally:
        del seg.overlap  # back to the class default
    for a, b in zip(overlapped, sequential, strict=True):
        np.testing.assert_array_equal(a, b)


def test_plain_model_matches_numpy_reference(seg: Segmenter, plain_model_path: Path) -> None:
    """Probabilities = sigmoid(onnxruntime(prepare_batch(...))) pasted back with geometry.paste_back."""
    import onnxruntime as ort

    img = _slice((96, 128), 5)
    x, transforms = prepare_batch([img], PTS[None], seg.spec)
    logits = ort.InferenceSession(str(plain_model_path)).run(None, {"input": x})[0]
    ref = probabilities_to_slice(sigmoid(logits[0, 0]), transforms[0], img.shape)
    got = seg.predict(img, PTS, return_probabilities=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_probabilities_zero_far_from_the_crop(seg: Segmenter) -> None:
    img = _slice((200, 200), 7)
    pts = np.array([[10, 20], [40, 22], [25, 8], [24, 36]], np.float32)  # small object, top left
    probs = seg.predict(img, pts, return_probabilities=True)
    # the crop covers the box (32 x 28 px) zoomed to 46.9 of 64 crop px: at most ~44 px of slice
    assert probs[:, 90:].max() == 0.0
    assert probs[90:, :].max() == 0.0
    assert probs[:60, :60].max() > 0.0
    assert not seg.predict(img, pts)[90:, 90:].any()


@pytest.mark.parametrize(
    ("shape", "pts"),
    [
        ((96, 128), PTS),
        ((120, 100), np.array([[20, 70], [75, 60], [40, 35], [50, 100]], np.float32)),  # tilted
        ((64, 64), np.array([[10.5, 30], [50, 31.5], [30, 12], [31, 50]], np.float32)),  # sub-pixel
    ],
)
def test_identity_model_reproduces_the_confidence_map_region(
    identity_model_path: Path, shape: tuple[int, int], pts: np.ndarray
) -> None:
    """logits = 20 (cm - 0.5): the mask is the crop-space cm > 0.5 region pasted into the slice."""
    seg = Segmenter.load(identity_model_path, threads=1)
    img = _slice(shape, 11)
    mask = seg.predict(img, pts)
    # 1) exactly the NumPy path: crop-space confidence map -> logits -> sigmoid -> paste back
    x, transforms = prepare_batch([img], pts[None], seg.spec)
    cm_crop = x[0, seg.spec.channels.index("cm")]
    np.testing.assert_allclose(cm_crop, confidence_map(transforms[0].to_crop(pts), cm_crop.shape), atol=1e-6)
    ref = probabilities_to_slice(sigmoid(20.0 * (cm_crop - 0.5)), transforms[0], shape) > 0.5
    np.testing.assert_array_equal(mask, ref)
    # 2) geometry end to end: the confidence map is zoom/shift invariant, so the pasted-back region
    # matches the slice-space map up to resampling at the region's boundary
    cm_slice = confidence_map(pts, shape) > 0.5
    dice = 2 * np.count_nonzero(mask & cm_slice) / (mask.sum() + cm_slice.sum())
    assert dice > 0.98, dice
    assert cm_slice.sum() > 200
    # every disagreement sits on the boundary of the slice-space region
    diff = mask ^ cm_slice
    edge = np.zeros(shape, bool)
    padded = np.pad(cm_slice, 1, mode="edge")
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            edge |= padded[1 + dy : 1 + dy + shape[0], 1 + dx : 1 + dx + shape[1]] != cm_slice
    assert not (diff & ~edge).any()


def test_threshold_comes_from_the_spec(tmp_path: Path) -> None:
    spec = ModelSpec.for_input_size(TEST_INPUT_SIZE, threshold=0.3)
    seg = Segmenter.load(build_random_plain_model(tmp_path / "t03.onnx", spec), threads=1)
    img = _slice((96, 128), 2)
    probs = seg.predict(img, PTS, return_probabilities=True)
    assert np.count_nonzero((probs > 0.3) & (probs <= 0.5)) > 0  # the choice matters here
    np.testing.assert_array_equal(seg.predict(img, PTS), probs > 0.3)


def test_static_batch_axis_is_padded(tmp_path: Path, plain_model_path: Path) -> None:
    import onnx

    model = onnx.load(str(plain_model_path))
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    path = tmp_path / "static4.onnx"
    onnx.save(model, str(path))
    fixed = Segmenter.load(path, threads=1, batch_size=16)
    dynamic = Segmenter.load(plain_model_path, threads=1)
    img = _slice((96, 128), 4)
    pts = [PTS + i for i in range(5)]  # 5 objects: one full chunk of 4 + one padded chunk
    for a, b in zip(
        fixed.predict_batch(img, pts, return_probabilities=True),
        dynamic.predict_batch(img, pts, return_probabilities=True),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_fused_model_groups_items_by_slice_shape(fused_model_path: Path) -> None:
    seg = Segmenter.load(fused_model_path, batch_size=2)
    assert seg.fused
    slices = [
        _slice((96, 128), 1),
        _slice((70, 90), 2),
        _slice((96, 128), 3),
        _slice((70, 90), 4),
        _slice((96, 128), 5),
    ]
    pts = [PTS * 0.6 + i for i in range(5)]  # the fake model thresholds each slice at left_x
    masks = seg.predict_batch(slices, pts)
    for img, p, m in zip(slices, pts, masks, strict=True):
        assert m.shape == img.shape
        np.testing.assert_array_equal(m, img > p[0, 0])
    probs = seg.predict(slices[0], pts[0], return_probabilities=True)
    np.testing.assert_allclose(probs, sigmoid(slices[0] - pts[0][0, 0]), atol=1e-6)


@pytest.mark.parametrize(
    ("slice_", "pts", "match"),
    [
        (np.zeros((2, 64, 64)), PTS, "2-D"),
        (np.full((96, 128), np.nan), PTS, "NaN"),
        (np.zeros((96, 128), dtype=object), PTS, "numeric"),
        (np.zeros((96, 128)), PTS[:3], r"\(4, 2\)"),
        (np.zeros((96, 128)), PTS[[1, 0, 2, 3]], "order"),
        (np.zeros((96, 128)), np.full((4, 2), 5.0), "identical"),
        (np.zeros((96, 128)), PTS + [0, 60], "outside"),
        (np.zeros((96, 128)), np.where([[0, 0], [0, 0], [0, 0], [1, 0]], np.inf, PTS), "NaN or inf"),
    ],
)
def test_invalid_inputs_raise_input_error(seg: Segmenter, slice_, pts, match: str) -> None:
    with pytest.raises(InputError, match=match):
        seg.predict(slice_, pts)


def test_batch_length_mismatch(seg: Segmenter) -> None:
    with pytest.raises(InputError, match="2 slices but 3 point sets"):
        seg.predict_batch([_slice(), _slice()], [PTS, PTS, PTS])
    with pytest.raises(InputError, match="points 1"):  # names the bad item
        seg.predict_batch([_slice(), _slice()], [PTS, PTS[[1, 0, 2, 3]]])


def test_load_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import onnx

    import cmdeploy.models

    monkeypatch.setattr(cmdeploy.models, "DEFAULT_MODEL_NAME", "no-such-model.onnx")
    with pytest.raises(ModelError, match="no embedded default model"):
        Segmenter.load()
    with pytest.raises(InputError, match="not found"):  # a wrong path is the user's input
        Segmenter.load(tmp_path / "missing.onnx")
    # a model without the cmdeploy spec in its metadata
    path = build_random_plain_model(tmp_path / "nospec.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="cmdeploy.spec"):
        Segmenter.load(path)
    # a spec that disagrees with the graph (3 channels asked, graph takes 2)
    bad = build_random_plain_model(tmp_path / "bad.onnx")
    model = onnx.load(str(bad))
    for p in model.metadata_props:
        p.value = p.value.replace('"guidance": "cm"', '"guidance": "cm+ep"')
    onnx.save(model, str(bad))
    with pytest.raises(ModelError, match="channels"):
        Segmenter.load(bad)
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ModelError, match="tensorrt"):
        Segmenter.load(engine, backend="onnxruntime")
    with pytest.raises(InputError, match="backend"):
        Segmenter.load(path, backend="torch")  # type: ignore[arg-type]


def test_tensorrt_backend_without_tensorrt(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed: this checks the message shown without it")
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(ModelError, match="TensorRT not installed"):
        Segmenter.load(engine)


def test_runtime_works_with_torch_unimportable(plain_model_path: Path) -> None:
    """Import cmdeploy and run a prediction in a process where ``import torch`` fails."""
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import cmdeploy
        assert "onnxruntime" not in sys.modules, "cmdeploy must import onnxruntime lazily"
        import numpy as np
        from cmdeploy import Segmenter
        seg = Segmenter.load({str(plain_model_path)!r}, threads=1)
        img = np.zeros((96, 128), np.float32)
        pts = np.array([[30, 52], [88, 50], [60, 21], [57, 80]], np.float32)
        mask = seg.predict(img, pts)
        assert mask.shape == (96, 128) and mask.dtype == bool
        import cmdeploy.pipeline, cmdeploy.commands.infer, cmdeploy.cli
        print("ok", sys.modules["torch"])
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok None"


class _FakeEngineRunner:
    """Stands in for TensorRTRunner: identity-cm logits, a batch profile [lo, hi], records calls."""

    input_names = ["input"]
    output_names = ["logits"]

    input_shapes: dict = {}  # shapes unknown: the spec check is skipped

    def __init__(self, lo: int, hi: int) -> None:
        self.batch_range = (lo, hi)
        self.lo, self.hi = lo, hi
        self.calls: list[int] = []

    def run(self, feeds: dict) -> dict:
        x = feeds["input"]
        assert self.lo <= len(x) <= self.hi
        self.calls.append(len(x))
        return {"logits": 20.0 * (x[:, 1:2] - 0.5)}


def test_engine_batch_profile_is_respected(identity_model_path: Path) -> None:
    ref = Segmenter.load(identity_model_path, threads=1)
    runner = _FakeEngineRunner(2, 4)
    seg = Segmenter(runner, ref.spec, model_path=Path("fake.plan"), backend="tensorrt", batch_size=16)
    img = _slice((96, 128), 6)
    pts = [PTS + i for i in range(5)]
    got = seg.predict_batch(img, pts, return_probabilities=True)
    assert runner.calls == [4, 2]  # capped at the profile's max, last call padded to its min
    for a, b in zip(got, ref.predict_batch(img, pts, return_probabilities=True), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert len(seg.predict_batch(img, pts[:1])) == 1 and runner.calls[-1] == 2


def _mirror(img: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from cmdeploy.segmenter import mirror_points

    return np.ascontiguousarray(img[:, ::-1]), mirror_points(pts[None], img.shape[1])[0]


def test_mirror_points_keeps_the_point_order() -> None:
    from cmdeploy.guidance import validate_points

    img, m = _mirror(_slice((96, 128)), PTS)
    np.testing.assert_array_equal(m[0], [127 - 88, 50])  # the right point becomes the left one
    np.testing.assert_array_equal(m[:, 1], PTS[[1, 0, 2, 3], 1])
    validate_points(m)
    np.testing.assert_array_equal(_mirror(img, m)[1], PTS)


def test_flip_tta_is_the_mean_with_the_mirror_image(plain_model_path: Path) -> None:
    """tta="flip" = the mean of an object's probabilities and the mirrored probabilities of its
    mirror image (the definition benchmarks/tune_inference.py measured), hence mirror-equivariant."""
    img = _slice((96, 128), 7)
    plain = Segmenter.load(plain_model_path, threads=1)
    tta = Segmenter.load(plain_model_path, threads=1, batch_size=3, tta="flip")
    assert tta.tta == "flip" and "tta='flip'" in repr(tta)
    m_img, m_pts = _mirror(img, PTS)
    p = plain.predict(img, PTS, return_probabilities=True)
    p_m = plain.predict(m_img, m_pts, return_probabilities=True)[:, ::-1]
    assert np.abs(p - p_m).max() > 1e-2  # a random model is not symmetric: the mean matters
    got = tta.predict(img, PTS, return_probabilities=True)
    np.testing.assert_allclose(got, (p + p_m) / 2, atol=1e-4)
    np.testing.assert_allclose(tta.predict(m_img, m_pts, return_probabilities=True)[:, ::-1], got, atol=1e-4)
    # masks and batches go through the same path (4 objects, batches of 3, doubled inside)
    masks = tta.predict_batch([img] * 4, [PTS] * 4)
    for m in masks:
        np.testing.assert_array_equal(m, tta.predict(img, PTS))


def test_flip_tta_on_a_fused_model(fused_model_path: Path) -> None:
    img = _slice((96, 128), 8)
    seg = Segmenter.load(fused_model_path, tta="flip")
    got = seg.predict(img, PTS, return_probabilities=True)
    # the fake fused model returns sigmoid(slice - left_x); its mirror image's left point is the
    # mirror of the right one
    want = (sigmoid(img - PTS[0, 0]) + sigmoid(img - (127 - PTS[1, 0]))) / 2
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_unknown_tta_is_refused(plain_model_path: Path) -> None:
    with pytest.raises(InputError, match="tta"):
        Segmenter.load(plain_model_path, tta="rotate")
