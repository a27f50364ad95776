"""Evaluation loop, ``cmdeploy evaluate`` and ``cmdeploy bench`` on tiny synthetic data and models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nibabel")
pytest.importorskip("onnx")

from typer.testing import CliRunner  # noqa: E402

from cmdeploy.cli import app  # noqa: E402
from cmdeploy.errors import InputError  # noqa: E402
from cmdeploy.evaluation import (  # noqa: E402
    evaluate,
    flops,
    label_stats,
    reconstruct,
    size_stats,
    summarize,
    timing,
    worst,
)
from cmdeploy.io.cases import find_cases  # noqa: E402

H, W, Z = 40, 48, 3
ZOOMS = (0.8, 1.2, 2.0)  # sx, sy, sz in mm
PX_MM2 = ZOOMS[0] * ZOOMS[1]


def _label_slices() -> np.ndarray:
    """(Z, H, W) labels: 1 = disc on every slice (+ a 25 px second piece on slice 0 and a 24 px
    strip on slice 2), 2 = box on slices 0-1 (+ a 25 px second piece on slice 1).

    25 px is exactly the default min size (kept), 24 px just below it (dropped)."""
    yy, xx = np.mgrid[0:H, 0:W]
    lab = np.zeros((Z, H, W), np.uint8)
    disc = (xx - 14) ** 2 + (yy - 20) ** 2 <= 36
    lab[:, disc] = 1
    lab[0, 33:38, 4:9] = 1  # disc piece 2 (25 px)
    lab[2, 1:4, 30:38] = 1  # 24 px: below min_size
    lab[0:2, 5:15, 30:42] = 2  # box, 120 px
    lab[1, 28:33, 34:39] = 2  # box piece 2 (25 px)
    return lab


def _write_case(folder: Path) -> Path:
    import nibabel as nib

    folder.mkdir(parents=True)
    lab = _label_slices()
    img = np.full((Z, H, W), -1000.0, np.float32)
    img[:, 2:-2, 2:-2] = 40.0
    img[lab > 0] = 150.0
    # an LPS-stored grid (i -> patient left, j -> posterior): cmdeploy reads slice k as data[:, :, k].T
    affine = np.diag([-ZOOMS[0], -ZOOMS[1], ZOOMS[2], 1.0])
    nib.save(nib.Nifti1Image(np.ascontiguousarray(img.transpose(2, 1, 0)).astype(np.int16), affine),
             str(folder / "image.nii.gz"))
    nib.save(nib.Nifti1Image(np.ascontiguousarray(lab.transpose(2, 1, 0)), affine),
             str(folder / "labels.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ct")
    _write_case(root / "case_a")
    (root / "labels.json").write_text(json.dumps({"1": "disc", "2": "box"}))
    return root


class FakeSegmenter:
    """Predicts ``slice > 100 HU`` inside the points' bounding box (= the reference here), or an
    empty mask for objects whose left point lies at x >= ``empty_from_x``."""

    backend = "fake"

    def __init__(self, name: str = "oracle", empty_from_x: float = math.inf) -> None:
        self.model_path = Path(f"{name}.onnx")
        self.empty_from_x = empty_from_x
        self.calls = 0

    def predict_batch(self, slices, points):
        self.calls += 1
        out = []
        for s, p in zip(slices, points, strict=True):
            m = np.zeros(s.shape, bool)
            if p[0, 0] < self.empty_from_x:
                x0, x1 = int(np.floor(p[:, 0].min())), int(np.ceil(p[:, 0].max()))
                y0, y1 = int(np.floor(p[:, 1].min())), int(np.ceil(p[:, 1].max()))
                m[y0 : y1 + 1, x0 : x1 + 1] = s[y0 : y1 + 1, x0 : x1 + 1] > 100
            out.append(m)
        return out

    def predict(self, image, points):
        return self.predict_batch([image], [points])[0]


def test_oracle_scores_perfectly(data_root: Path):
    seg = FakeSegmenter()
    ev = evaluate([seg], find_cases(data_root), chunk=2)
    assert ev.labels() == ["disc", "box"]
    assert ev.distance_unit == "mm"
    got = [(o.slice_index, o.label, o.piece, o.area_px) for o in ev.objects]
    assert got == [(0, "disc", 1, 113), (0, "disc", 2, 25), (0, "box", 1, 120), (1, "disc", 1, 113),
                   (1, "box", 1, 120), (1, "box", 2, 25), (2, "disc", 1, 113)]
    assert ev.objects[2].area_mm2 == pytest.approx(120 * PX_MM2)
    # box extreme points: left column 30, right 41, top row 5, bottom row 14 (ties -> median)
    np.testing.assert_allclose(ev.objects[2].points[:, 0][[0, 1]], [30, 41])
    np.testing.assert_allclose(ev.objects[2].points[:, 1][[2, 3]], [5, 14])
    assert seg.calls >= 2  # chunked
    for s in label_stats(ev, "oracle"):
        assert (s.dice_mean, s.hd95_mean, s.n_empty) == (1.0, 0.0, 0)
    sm = summarize(ev, "oracle")
    assert (sm.dice_label_mean, sm.dice_object_mean, sm.n_objects, sm.n_labels) == (1.0, 1.0, 7, 2)
    assert (ev.settings["min_size_px"], ev.settings["connectivity"]) == (25, 8)
    low = evaluate([seg], find_cases(data_root), min_size=24, labels=["disc"])  # the 24 px strip now counts
    got = [(o.slice_index, o.piece, o.area_px) for o in low.objects]
    assert got == [(0, 1, 113), (0, 2, 25), (1, 1, 113), (2, 1, 113), (2, 2, 24)]


def test_aggregates_with_failed_label(data_root: Path):
    ev = evaluate([FakeSegmenter("ok"), FakeSegmenter("nobox", empty_from_x=29.0)], find_cases(data_root))
    per = {s.name: s for s in label_stats(ev, "nobox")}
    assert (per["disc"].n, per["disc"].dice_mean) == (4, 1.0)
    assert (per["box"].n, per["box"].dice_mean, per["box"].n_empty) == (3, 0.0, 3)
    assert math.isnan(per["box"].hd95_mean)
    sm = summarize(ev, "nobox")
    assert sm.dice_label_mean == pytest.approx(0.5)  # the headline: mean over labels
    assert sm.dice_object_mean == pytest.approx(4 / 7)
    assert sm.hd95_label_mean == 0.0 and sm.n_empty == 3
    assert {ev.objects[i].label for i in worst(ev, "nobox", 3)} == {"box"}
    bins = size_stats(ev, "nobox")  # 25 px = 24 mm2 -> "<100"; 113-120 px = 108-115 mm2 -> "100-300"
    assert [(b.name, b.n) for b in bins if b.n] == [("<100 mm2", 2), ("100-300 mm2", 5)]
    assert summarize(ev, "ok").dice_label_mean == 1.0


def test_jitter_is_seeded_and_selection_independent(data_root: Path):
    cases = find_cases(data_root)
    a = evaluate([FakeSegmenter()], cases, jitter=2.0, seed=1)
    b = evaluate([FakeSegmenter()], cases, jitter=2.0, seed=1)
    c = evaluate([FakeSegmenter()], cases, jitter=2.0, seed=2)
    only_box = evaluate([FakeSegmenter()], cases, jitter=2.0, seed=1, labels=["box"])
    exact = evaluate([FakeSegmenter()], cases)
    pa = np.stack([o.points for o in a.objects])
    np.testing.assert_array_equal(pa, np.stack([o.points for o in b.objects]))
    assert not np.array_equal(pa, np.stack([o.points for o in c.objects]))
    d = np.abs(pa - np.stack([o.points for o in exact.objects]))
    assert d.max() <= 2.0 + 1e-6 and d.max() > 0
    box_a = [o.points for o in a.objects if o.label == "box"]
    np.testing.assert_array_equal(np.stack(box_a), np.stack([o.points for o in only_box.objects]))
    with pytest.raises(InputError, match="unknown label"):
        evaluate([FakeSegmenter()], cases, labels=["liver"])


def test_annotator_clicks_are_seeded_in_mm_and_refuse_jitter(data_root: Path):
    """--clicks annotator: points from cmdeploy.annotator, seeded per object, hand error in mm."""
    from cmdeploy.annotator import ClickModel

    cases = find_cases(data_root)
    model = ClickModel(tolerance_px=2.0, jitter_mm=1.6)
    a = evaluate([FakeSegmenter()], cases, clicks="annotator", click_model=model, seed=3)
    b = evaluate([FakeSegmenter()], cases, clicks="annotator", click_model=model, seed=3)
    exact = evaluate([FakeSegmenter()], cases)
    pa = np.stack([o.points for o in a.objects])
    np.testing.assert_array_equal(pa, np.stack([o.points for o in b.objects]))
    pe = np.stack([o.points for o in exact.objects])
    assert not np.array_equal(pa, pe)
    # the extreme coordinate moves by at most the band + the hand error in pixels (x: 0.8 mm, y: 1.2 mm)
    assert np.abs(pa[:, :2, 0] - pe[:, :2, 0]).max() <= 2.0 + 1.6 / ZOOMS[0] + 1e-4
    assert np.abs(pa[:, 2:, 1] - pe[:, 2:, 1]).max() <= 2.0 + 1.6 / ZOOMS[1] + 1e-4
    assert a.settings["clicks"] == "annotator" and a.settings["click_model"]["jitter_mm"] == 1.6
    with pytest.raises(InputError, match="jitter"):
        evaluate([FakeSegmenter()], cases, clicks="annotator", jitter=1.0)
    with pytest.raises(InputError, match="--clicks"):
        evaluate([FakeSegmenter()], cases, clicks="sloppy")


def test_reconstruct_matches_scored_object(data_root: Path):
    seg = FakeSegmenter()
    ev = evaluate([seg], find_cases(data_root))
    i = next(k for k, o in enumerate(ev.objects) if o.label == "box" and o.piece == 2)
    image, ref, pred = reconstruct(ev, i, seg)
    assert image.shape == (H, W) and int(ref.sum()) == 25 and ref[28:33, 34:39].all()
    np.testing.assert_array_equal(pred, ref)


# -------------------------------------------------------------------------------------------- CLI
def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_cli_evaluate_writes_outputs(data_root: Path, identity_model_path: Path, plain_model_path: Path,
                                     tmp_path: Path):
    out = tmp_path / "eval"
    res = CliRunner().invoke(app, [
        "evaluate", "--model", str(identity_model_path), "--model", str(plain_model_path),
        "--data", str(data_root), "--cases", "case_a", "--by-size", "--output", str(out),
        "--threads", "1", "--worst", "3",
    ])
    assert res.exit_code == 0, res.output
    for name in ("results.csv", "results.md", "objects.csv", "summary.json", "plots/dice_vs_size.png",
                 "plots/worst_identity_cm.png", "plots/worst_random_plain.png"):
        assert (out / name).is_file(), name
    rows = _csv(out / "results.csv")
    assert {r["model"] for r in rows} == {"identity_cm", "random_plain"}
    head = next(r for r in rows if r["model"] == "identity_cm" and r["name"] == "mean over labels")
    per_label = [float(r["dice_mean"]) for r in rows if r["model"] == "identity_cm" and r["group"] == "label"]
    assert float(head["dice_mean"]) == pytest.approx(np.mean(per_label), abs=1e-5)
    assert 0.0 <= float(head["dice_mean"]) <= 1.0
    assert any(r["group"] == "size" for r in rows)
    objects = _csv(out / "objects.csv")
    assert len(objects) == 7
    assert {"identity_cm:dice", "random_plain:hd95_mm"} <= set(objects[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"]["identity_cm"]["n_objects"] == 7
    assert "Headline" in (out / "results.md").read_text()
    assert (out / "plots/dice_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses to overwrite
    again = CliRunner().invoke(app, ["evaluate", "--model", str(identity_model_path),
                                     "--data", str(data_root), "--output", str(out)])
    assert again.exit_code == 2


def test_cli_evaluate_bad_case(data_root: Path, identity_model_path: Path):
    res = CliRunner().invoke(app, ["evaluate", "--model", str(identity_model_path), "--data", str(data_root),
                                   "--cases", "nope"])
    assert res.exit_code == 2 and "unknown case" in res.output


# ------------------------------------------------------------------------------------------ bench
def test_count_flops_and_precision(plain_model_path: Path, tmp_path: Path):
    from onnx import TensorProto, helper, numpy_helper

    fc = flops.count_flops(plain_model_path)
    s, hidden, c = 64, 8, 2  # conftest's random plain model
    expected = 2 * s * s * (hidden * c * 9 + hidden * hidden * 9 + hidden)
    assert fc.total == expected and fc.by_op == {"Conv": expected} and not fc.unknown
    assert flops.model_precision(plain_model_path) == "fp32"

    w = numpy_helper.from_array(np.ones((7, 3), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"]),
             helper.make_node("MatMul", ["dq", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 7])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 3])],
                              initializer=[w, scale, zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "qdq.onnx"
    import onnx

    onnx.save(model, str(path))
    assert flops.count_flops(path, batch=2).total == 2 * 2 * 5 * 3 * 7
    assert flops.model_precision(path) == "int8"


def test_latency_stats():
    lat = timing.latency(np.array([0.001, 0.002, 0.003, 0.004]), items_per_call=2)
    assert lat.p50_ms == pytest.approx(2.5) and lat.min_ms == pytest.approx(1.0)
    assert lat.p95_ms == pytest.approx(3.85) and lat.items_per_s == pytest.approx(8 / 0.01)


def test_cli_bench_json(plain_model_path: Path, fused_model_path: Path):
    res = CliRunner().invoke(app, [
        "bench", "--model", str(plain_model_path), "--model", str(fused_model_path), "--iterations", "2",
        "--warmup", "0", "--batch-sizes", "1,2", "--slice-size", "64", "--cm-sizes", "32",
        "--peak-size", "64", "--peak-repeats", "1", "--threads", "1", "--json",
    ])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["machine"]["numpy"] == np.__version__ and d["peak"]["gflops"] > 0
    plain, fused = d["models"]
    assert (plain["precision"], plain["fused"], fused["fused"]) == ("fp32", False, True)
    assert [r["batch"] for r in plain["results"]] == [1, 2]
    r = plain["results"][1]
    assert r["model"]["iterations"] == 2 and r["model"]["p50_ms"] > 0 and r["end_to_end"]["p95_ms"] > 0
    assert r["gflops"] > 0 and plain["flops"]["gflop"] > 0
    assert [(c["size"], c["batch"]) for c in d["confidence_map"]] == [(32, 1), (32, 2)]
    assert [f["path"] for f in d["fused_vs_numpy"]] == [
        "fused graph", "numpy prepare_batch", "numpy prepare + plain model + paste back"]


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs"


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "thorax_1p5mm").is_dir(), reason="../shared/data/ct-organs not present")
def test_evaluate_on_shared_thorax(identity_model_path: Path):
    from cmdeploy.segmenter import Segmenter

    cases = find_cases(SHARED, cases=["thorax_1p5mm"])
    assert [c.name for c in find_cases(SHARED)] == ["abdomen_3mm", "thorax_1p5mm"]
    seg = Segmenter.load(identity_model_path, threads=1)
    ev = evaluate([seg], cases, labels=["pulmonary_artery"], min_size=20)
    assert ev.labels() == ["pulmonary_artery"] and ev.distance_unit == "mm"
    assert len(ev.objects) > 5 and all(o.area_px >= 20 for o in ev.objects)
    assert all(o.area_mm2 == pytest.approx(o.area_px * 1.5 * 1.5) for o in ev.objects)
    sm = summarize(ev, seg.model_path.stem)
    assert 0.0 < sm.dice_label_mean <= 1.0 and sm.n_objects == len(ev.objects)


def test_model_names_disambiguate_by_folder_then_counter():
    from cmdeploy.evaluation import model_names

    assert model_names(["a/x.onnx", "b/y.onnx"]) == ["x", "y"]
    assert model_names(["runs/cm/model.onnx", "runs/ep/model.onnx"]) == ["cm/model", "ep/model"]
    assert model_names(["m.onnx", "m.onnx"]) == ["m", "m#2"]
