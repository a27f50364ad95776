"""``cmdeploy generate-labels`` on tiny synthetic NIfTI cases with the tiny identity model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cmdeploy.cli import app
from cmdeploy.labelgen import case_seed, label_ids

nib = pytest.importorskip("nibabel")

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}
SHAPE = (48, 40, 6)  # stored (X, Y, Z)
AFFINE = np.array([[-0.8, 0, 0, 10.0], [0, 0.9, 0, -5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1]])


def _disk(shape_xy: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    xx, yy = np.meshgrid(np.arange(shape_xy[0]), np.arange(shape_xy[1]), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _make_case(root: Path, name: str, seed: int, *, with_labels: bool = True) -> None:
    rng = np.random.default_rng(seed)
    img = rng.normal(-50, 20, SHAPE).astype(np.int16)
    lab = np.zeros(SHAPE, dtype=np.uint8)
    for k in range(1, SHAPE[2] - 1):  # first and last slice stay empty
        m = _disk(SHAPE[:2], 20 + k + seed, 18 + seed, 6 + k % 3)
        lab[:, :, k][m] = 1
        img[:, :, k][m] = 60
    folder = root / name
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(img, AFFINE), str(folder / "image.nii.gz"))
    if with_labels:
        nib.save(nib.Nifti1Image(lab, AFFINE), str(folder / "labels.nii.gz"))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for i, name in enumerate(("case_a", "case_b")):
        _make_case(root, name, i)
    (root / "labels.json").write_text('{"1": "tumour"}')
    return root


def _gen(*args: str | Path, model: Path):
    return CliRunner().invoke(
        app, ["generate-labels", *map(str, args), "--model", str(model), "--threads", "1", "--no-progress"],
        env=ENV,
    )


def _labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_simulated_clicks_write_labels_on_each_case_grid(
    data: Path, tmp_path: Path, identity_model_path: Path
) -> None:
    out = tmp_path / "out"
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 0, res.output
    for name in ("case_a", "case_b"):
        files = sorted(p.name for p in (out / name).iterdir())
        assert files == ["labels.nii.gz", "points.csv", "report.json"]
        lab, aff = _labels(out / name / "labels.nii.gz")
        assert lab.shape == SHAPE
        np.testing.assert_allclose(aff, AFFINE)
        assert set(np.unique(lab).tolist()) <= {0, 1}  # the ground truth's id for "tumour"
        assert lab[:, :, 0].sum() == 0 and lab[:, :, 2].sum() > 0
        rep = json.loads((out / name / "report.json").read_text())
        ext = rep["extra"]
        assert ext["clicks"]["source"] == "simulated-annotator"
        assert ext["clicks"]["objects"] == SHAPE[2] - 2 and ext["clicks"]["clicks"] == 4 * (SHAPE[2] - 2)
        assert ext["label_ids"] == {"tumour": 1}
        assert len(ext["dice"]["objects"]) == SHAPE[2] - 2
        assert all(0.0 <= o["dice"] <= 1.0 for o in ext["dice"]["objects"])
        ref = np.asarray(nib.load(str(data / name / "labels.nii.gz")).dataobj)
        assert ext["reference_voxels"] == int((ref > 0).sum())
        assert "case_total" in rep["timings_s"]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["case_a", "case_b"]
    assert summary["clicks"] == 4 * summary["objects"] == 8 * (SHAPE[2] - 2)
    assert summary["dice_over_cases"]["n"] == 2
    assert "case_a" not in res.output and "case_b" not in res.output  # logs name positions only


def test_resume_skips_finished_cases(data: Path, tmp_path: Path, identity_model_path: Path) -> None:
    out = tmp_path / "out"
    res = _gen("--data", data, "--simulate", "--cases", "case_a", "--output", out, model=identity_model_path)
    assert res.exit_code == 0, res.output
    before = {p.name: p.stat().st_mtime_ns for p in (out / "case_a").iterdir()}
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 0, res.output
    assert "1 finished before, skipped; 1 to label" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in (out / "case_a").iterdir()} == before
    assert (out / "case_b" / "report.json").is_file()
    # everything finished: nothing to do, the model is not even loaded
    res = _gen("--data", data, "--simulate", "--output", out, model=tmp_path / "missing.onnx")
    assert res.exit_code == 2  # a missing --model is still a bad input
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 0 and "2 finished before, skipped; 0 to label" in res.output
    # --overwrite redoes finished cases
    res = _gen("--data", data, "--simulate", "--output", out, "--overwrite", model=identity_model_path)
    assert res.exit_code == 0 and "0 finished before" in res.output


def test_killed_case_leaves_no_finished_looking_output(
    data: Path, tmp_path: Path, identity_model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cmdeploy.writers.report as report_mod

    out = tmp_path / "out"

    def boom(path, report):  # the run dies while writing the report
        raise KeyboardInterrupt

    monkeypatch.setattr(report_mod, "write_report", boom)
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 130 and "interrupted" in res.output  # Ctrl-C: the command stops
    assert not list(out.rglob("report.json")) and not list(out.rglob("labels.nii.gz"))
    assert not [p for p in out.rglob("*") if p.is_file()]  # no temp file left behind either
    monkeypatch.undo()
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 0 and "0 finished before, skipped; 2 to label" in res.output


def test_unfinished_leftover_is_refused_without_overwrite(
    data: Path, tmp_path: Path, identity_model_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "case_b").mkdir(parents=True)
    (out / "case_b" / "labels.nii.gz").write_bytes(b"someone else's file")
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 2 and "without report.json" in res.output
    assert not (out / "case_a").exists()  # checked before any work
    assert (out / "case_b" / "labels.nii.gz").read_bytes() == b"someone else's file"
    res = _gen("--data", data, "--simulate", "--output", out, "--overwrite", model=identity_model_path)
    assert res.exit_code == 0, res.output
    assert _labels(out / "case_b" / "labels.nii.gz")[0].shape == SHAPE


def test_outputs_match_infer_on_the_same_points(
    data: Path, tmp_path: Path, identity_model_path: Path
) -> None:
    # 1. simulated clicks; 2. the same clicks as a points folder; 3. infer on each case
    sim = tmp_path / "sim"
    assert _gen("--data", data, "--simulate", "--output", sim, model=identity_model_path).exit_code == 0
    pts = tmp_path / "points"
    pts.mkdir()
    for name in ("case_a", "case_b"):
        (pts / f"{name}.csv").write_bytes((sim / name / "points.csv").read_bytes())
    from_csv = tmp_path / "from_csv"
    res = _gen("--data", data, "--points", pts, "--output", from_csv, "--batch-size", "3",
               model=identity_model_path)
    assert res.exit_code == 0, res.output
    for name in ("case_a", "case_b"):
        inf = tmp_path / f"infer_{name}"
        res = CliRunner().invoke(app, [
            "infer", "--input", str(data / name / "image.nii.gz"), "--points", str(pts / f"{name}.csv"),
            "--output", str(inf), "--format", "nifti", "--model", str(identity_model_path),
            "--threads", "1",
        ], env=ENV)
        assert res.exit_code == 0, res.output
        want, want_aff = _labels(inf / "labels.nii.gz")
        for folder in (sim, from_csv):
            got, got_aff = _labels(folder / name / "labels.nii.gz")
            np.testing.assert_array_equal(got, want)
            np.testing.assert_allclose(got_aff, want_aff)
        assert want.any()
        rep = json.loads((from_csv / name / "report.json").read_text())
        assert rep["extra"]["clicks"]["source"] == "points-csv"
        assert "dice" in rep["extra"]  # the case has labels: compared even with given points


def test_points_mode_needs_no_labels(tmp_path: Path, identity_model_path: Path) -> None:
    root = tmp_path / "data"
    _make_case(root, "only_image", 3, with_labels=False)
    pts = tmp_path / "points"
    pts.mkdir()
    (pts / "only_image.csv").write_text(
        "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        "2,lesion,10,20,30,21,20,10,21,30\n"
    )
    out = tmp_path / "out"
    res = _gen("--data", root, "--points", pts, "--output", out, model=identity_model_path)
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "only_image" / "report.json").read_text())
    assert "dice" not in rep["extra"] and rep["extra"]["label_ids"] == {"lesion": 1}
    res = _gen("--data", root, "--simulate", "--output", tmp_path / "o2", model=identity_model_path)
    assert res.exit_code == 2 and "no cases found" in res.output  # nothing to simulate clicks on


@pytest.mark.parametrize(
    "args, message",
    [
        (["--simulate", "--points", "{pts}"], "exclude each other"),
        ([], "--simulate"),
        (["--points", "{pts}"], "does not exist"),  # case_b.csv is missing
        (["--simulate", "--cases", "nope"], "unknown case"),
        (["--simulate", "--backend", "gpu"], "--backend"),
    ],
)
def test_bad_inputs_exit_2_and_write_nothing(
    data: Path, tmp_path: Path, identity_model_path: Path, args: list[str], message: str
) -> None:
    pts = tmp_path / "points"
    pts.mkdir()
    (pts / "case_a.csv").write_text(
        "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        "1,tumour,10,10,20,11,15,5,16,20\n"
    )
    out = tmp_path / "out"
    res = _gen("--data", data, "--output", out, *[a.format(pts=pts) for a in args], model=identity_model_path)
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_foreign_summary_is_refused(data: Path, tmp_path: Path, identity_model_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"mine": true}')
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 2 and "did not write" in res.output
    assert (out / "summary.json").read_text() == '{"mine": true}' and not (out / "case_a").exists()


def test_output_that_is_a_file_is_refused(data: Path, tmp_path: Path, identity_model_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("x")
    res = _gen("--data", data, "--simulate", "--output", out, model=identity_model_path)
    assert res.exit_code == 2 and "not a folder" in res.output
    assert out.read_text() == "x"


def test_label_ids_follow_the_names_file() -> None:
    assert label_ids(["tumour"], {1: "tumour"}) == {"tumour": 1}
    assert label_ids(["liver", "kidney"], {5: "Kidney", 2: "liver"}) == {"liver": 2, "kidney": 5}
    assert label_ids(["new", "liver"], {2: "liver"}) == {"new": 3, "liver": 2}  # unknown: next free id
    assert label_ids(["a", "b", "a"], {}) == {"a": 1, "b": 2}  # no names: order of appearance
    assert label_ids(["7", "x"], {}) == {"7": 7, "x": 8}


def test_case_seed_is_stable_and_differs_between_cases() -> None:
    assert case_seed(0, "a") == case_seed(0, "a")
    assert len({case_seed(0, n) for n in "abcdefgh"} | {case_seed(1, "a")}) == 9
