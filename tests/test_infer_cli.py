"""``cmdeploy infer`` end to end on pydicom's bundled CT files with the tiny test models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from cmdeploy.cli import app

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
CT5N = CT_SMALL.parent / "dicomdirtests" / "98892001" / "CT5N"
HEADER = "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


def _identifiers(ds: pydicom.Dataset) -> list[str]:
    return [
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
    ]


def _invoke(*args: str | Path):
    return CliRunner().invoke(app, ["infer", *map(str, args)], env=ENV)


def _has_highdicom() -> bool:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture()
def ct_small_csv(tmp_path: Path) -> Path:
    uid = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID
    p = tmp_path / "points.csv"
    p.write_text(
        "slice_index,sop_instance_uid,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        "0,,liver,30,60,70,62,50,35,51,85\n"
        f",{uid},liver#2,75,20,110,22,92,8,93,40\n"  # slice given by its SOPInstanceUID
        "0,,spleen,60,70,100,72,80,55,81,100\n"
    )
    return p


def test_ct_small_end_to_end(tmp_path: Path, ct_small_csv: Path, identity_model_path: Path) -> None:
    out = tmp_path / "out"
    res = _invoke(
        "--input",
        CT_SMALL,
        "--points",
        ct_small_csv,
        "--output",
        out,
        "--model",
        identity_model_path,
        "--batch-size",
        "2",
        "--threads",
        "1",
    )
    assert res.exit_code == 0, res.output
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    expected = ["overlays/slice_0000.png", "report.json"] + (["seg.dcm"] if _has_highdicom() else [])
    assert files == sorted(expected)

    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == {"liver": 1, "spleen": 2}
    assert report["backend"] == "onnxruntime"
    rows = report["extra"]["rows"]
    assert [r["label"] for r in rows] == ["liver", "liver#2", "spleen"]
    assert [r["line"] for r in rows] == [2, 3, 4]
    assert all(r["area_px"] > 0 and r["slice_index"] == 0 for r in rows)
    merged = {o["label"]: o for o in report["objects"]}
    assert set(merged) == {"liver", "spleen"}
    # liver = OR of its two pieces (which do not touch) minus what spleen takes where they overlap
    assert rows[0]["area_px"] < merged["liver"]["area_px"] <= rows[0]["area_px"] + rows[1]["area_px"]
    assert merged["liver"]["area_mm2"] == pytest.approx(merged["liver"]["area_px"] * 0.661468**2, rel=1e-4)
    for key in ("read", "preprocess", "model", "postprocess", "total"):
        assert report["timings_s"][key] >= 0

    ds = pydicom.dcmread(CT_SMALL, stop_before_pixels=True)
    text = (out / "report.json").read_text() + res.output
    for ident in _identifiers(ds):
        assert ident not in text, "a patient identifier or UID leaked"
    assert "objects/s" in res.output

    if _has_highdicom():
        seg = pydicom.dcmread(out / "seg.dcm")
        assert seg.Modality == "SEG"
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "spleen"]


def test_bad_csv_exits_2_listing_every_problem(tmp_path: Path, plain_model_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text(
        HEADER
        + "0,liver,30,60,90,62,60,30,61,95\n"
        + "0,spleen,30,60,200,62,60,30,61,95\n"  # right point outside the 128 x 128 slice
        + "3,kidney,30,60,90,62,60,30,61,95\n"  # slice 3 does not exist
        + "0,heart,90,60,30,62,60,30,61,95\n"  # left/right swapped
    )
    out = tmp_path / "out"
    res = _invoke("-i", CT_SMALL, "-p", csv, "-o", out, "-m", plain_model_path)
    assert res.exit_code == 2, res.output
    for line in ("line 3", "line 4", "line 5"):
        assert line in res.output
    assert "line 2" not in res.output
    assert not out.exists(), "nothing may be written for a bad CSV"


def test_refuses_to_overwrite(tmp_path: Path, ct_small_csv: Path, plain_model_path: Path) -> None:
    out = tmp_path / "out"
    args = ["-i", CT_SMALL, "-p", ct_small_csv, "-o", out, "-m", plain_model_path, "--format", "png"]
    assert _invoke(*args).exit_code == 0
    before = (out / "report.json").read_bytes()
    res = _invoke(*args)
    assert res.exit_code == 2
    assert "already exist" in res.output and "report.json" in res.output
    assert (out / "report.json").read_bytes() == before
    res = _invoke(*args, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "report.json").read_bytes() != before  # rewritten (new timings)
    assert not [p for p in out.rglob(".cmdeploy-tmp-*")], "temp files left behind"


def test_model_failures_exit_3(tmp_path: Path, ct_small_csv: Path, plain_model_path: Path) -> None:
    import onnx

    out = tmp_path / "out"
    res = _invoke("-i", CT_SMALL, "-p", ct_small_csv, "-o", out, "-m", tmp_path / "missing.onnx")
    assert res.exit_code == 2 and "not found" in res.output  # a wrong --model path is bad input
    nospec = tmp_path / "nospec.onnx"
    model = onnx.load(str(plain_model_path))
    del model.metadata_props[:]
    onnx.save(model, str(nospec))
    res = _invoke("-i", CT_SMALL, "-p", ct_small_csv, "-o", out, "-m", nospec)
    assert res.exit_code == 3 and "cmdeploy.spec" in res.output
    assert not out.exists()


def test_format_option(tmp_path: Path, ct_small_csv: Path, identity_model_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    out = tmp_path / "out"
    res = _invoke(
        "-i", CT_SMALL, "-p", ct_small_csv, "-o", out, "-m", identity_model_path, "--format", "nifti"
    )
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["labels.nii.gz", "report.json"]
    vol = np.asarray(nib.load(out / "labels.nii.gz").dataobj)
    assert vol.shape == (128, 128, 1)  # (W, H, Z): slice k = data[:, :, k].T
    report = json.loads((out / "report.json").read_text())
    for obj in report["objects"]:
        assert int((vol == obj["label_value"]).sum()) == obj["area_px"]

    res = _invoke(
        "-i",
        CT_SMALL,
        "-p",
        ct_small_csv,
        "-o",
        tmp_path / "o2",
        "-m",
        identity_model_path,
        "--format",
        "png,stl",
    )
    assert res.exit_code == 2 and "unknown format 'stl'" in res.output
    npy = tmp_path / "ct.npy"
    np.save(npy, pydicom.dcmread(CT_SMALL).pixel_array.astype(np.float32) - 1024)
    res = _invoke(
        "-i",
        npy,
        "-p",
        ct_small_csv,
        "-o",
        tmp_path / "o3",
        "-m",
        identity_model_path,
        "--format",
        "dicom-seg",
    )
    assert res.exit_code == 2 and "dicom-seg needs a DICOM input" in res.output


def test_nifti_input_defaults_to_nifti_output(tmp_path: Path, identity_model_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    hu = pydicom.dcmread(CT_SMALL).pixel_array.astype(np.int16) - 1024
    vol = np.stack([hu, hu[::-1]], axis=-1).transpose(1, 0, 2)  # (X, Y, Z); slice k = data[:, :, k].T
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.7, 2.0, 1.0])), nii)
    csv = tmp_path / "p.csv"
    csv.write_text(HEADER + "1,heart,30,60,70,62,50,35,51,85\n")
    out = tmp_path / "out"
    res = _invoke("-i", nii, "-p", csv, "-o", out, "-m", identity_model_path)
    assert res.exit_code == 0, res.output
    assert (out / "labels.nii.gz").is_file() and (out / "overlays" / "slice_0001.png").is_file()
    assert not (out / "seg.dcm").exists()
    labels = np.asarray(nib.load(out / "labels.nii.gz").dataobj)
    assert labels.shape == (128, 128, 2) and not labels[:, :, 0].any() and labels[:, :, 1].any()


def test_dicom_series_folder(tmp_path: Path, identity_model_path: Path) -> None:
    """pydicom's 5-slice 16 x 16 CT series; slices chosen by SOPInstanceUID and by index."""
    if not CT5N.is_dir():
        pytest.skip("pydicom's dicomdirtests series is not installed")
    from cmdeploy.io import open_series

    series = open_series(CT5N)
    uid = series.slice_uids[3]
    csv = tmp_path / "p.csv"
    csv.write_text(
        "slice_index,sop_instance_uid,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        f"1,,a,2,8,13,8,7,2,8,14\n"
        f",{uid},a,3,7,12,8,7,3,7,12\n"
        f"3,,b,1,1,5,2,3,0,3,5\n"
    )
    out = tmp_path / "out"
    res = _invoke("-i", CT5N, "-p", csv, "-o", out, "-m", identity_model_path)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [r["slice_index"] for r in report["extra"]["rows"]] == [1, 3, 3]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["slice_0001.png", "slice_0003.png"]
    if _has_highdicom():
        seg = pydicom.dcmread(out / "seg.dcm")
        assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 2
    ds = pydicom.dcmread(next(p for p in CT5N.iterdir()), stop_before_pixels=True)
    text = (out / "report.json").read_text() + res.output
    for ident in _identifiers(ds):
        assert ident not in text
    assert uid not in text


def test_infer_help() -> None:
    res = CliRunner().invoke(app, ["infer", "--help"], env=ENV)
    assert res.exit_code == 0
    for opt in (
        "--input",
        "--points",
        "--output",
        "--model",
        "--backend",
        "--batch-size",
        "--threads",
        "--format",
        "--overwrite",
        "--series-uid",
    ):
        assert opt in res.output


def test_cli_help_and_demo_inference_run_without_torch(tmp_path: Path) -> None:
    """`cmdeploy --help` and `cmdeploy infer` with the shipped model, in a process where torch cannot load."""
    import subprocess
    import sys
    import textwrap

    from cmdeploy.models import default_model_path

    try:
        default_model_path()
    except Exception:
        pytest.skip("no shipped default model")
    repo = Path(__file__).resolve().parents[1]
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        from cmdeploy.cli import app
        for argv in (["--help"], ["infer", "-i", {str(CT_SMALL)!r},
                     "-p", {str(repo / "examples" / "ct_small_points.csv")!r},
                     "-o", {str(tmp_path / "out")!r}, "--format", "png"]):
            try:
                app(argv, standalone_mode=False)
            except SystemExit as exc:
                assert exc.code in (0, None), exc.code
        assert sys.modules["torch"] is None
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["objects"]) == 2 and all(o["area_px"] > 0 for o in report["objects"])


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs"


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED / "thorax_1p5mm").is_dir(), reason="../shared/data/ct-organs not present")
def test_infer_on_a_dicom_series_written_from_shared_data(tmp_path: Path) -> None:
    """A 12-slice DICOM series written here from the thorax case, segmented with the shipped model:
    the DICOM SEG and the NIfTI agree with each other and with the reference masks."""
    import importlib.util
    import sys

    import nibabel as nib

    from cmdeploy.io import open_series
    from cmdeploy.labels_to_points import open_label_volume
    from cmdeploy.models import default_model_path

    try:
        default_model_path()
    except Exception:
        pytest.skip("no shipped default model")
    highdicom = pytest.importorskip("highdicom")
    spec = importlib.util.spec_from_file_location(
        "bench_infer", Path(__file__).resolve().parents[1] / "benchmarks" / "bench_infer.py"
    )
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_infer"] = bench
    spec.loader.exec_module(bench)
    built = bench.build_series(SHARED / "thorax_1p5mm", tmp_path / "series", 12, None)
    out = tmp_path / "out"
    res = _invoke("-i", built["dicom"], "-p", built["points"], "-o", out, "--format", "dicom-seg,nifti,png")
    assert res.exit_code == 0, res.output

    series = open_series(built["dicom"])
    labels = nib.load(str(out / "labels.nii.gz"))
    assert labels.shape[2] == series.num_slices == 12
    report = json.loads((out / "report.json").read_text())
    values = {name: v for name, v in report["labels"].items()} if "labels" in report else None
    seg = highdicom.seg.segread(out / "seg.dcm")
    seg_labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert {"aorta", "heart"} <= set(seg_labels)
    # reference: the label slices the series was written from (same window of the volume)
    ref_labels = open_label_volume(SHARED / "thorax_1p5mm" / "labels.nii.gz")
    first_hu = series.slice_hu(0)
    src = [k for k in range(ref_labels.num_slices) if np.array_equal(
        np.clip(np.rint(open_series(SHARED / "thorax_1p5mm" / "image.nii.gz").slice_hu(k)), -32768, 32767),
        first_hu)]
    assert src, "could not locate the source slice"
    aorta_id = 52
    pred_vol = np.asarray(labels.dataobj)
    ref_slices = [ref_labels.slice(src[0] + i) == aorta_id for i in range(12)]
    uids = series.slice_uids
    seg_number = seg_labels.index("aorta") + 1
    inter = total = 0
    for i, ref in enumerate(ref_slices):
        pred_nifti = pred_vol[:, :, i].T > 0
        frames = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uids[i]], segment_numbers=[seg_number],
            assert_missing_frames_are_empty=True,
        )[0, :, :, 0].astype(bool)
        assert not (frames & ~pred_nifti).any()  # the SEG's aorta lies inside the NIfTI's labels
        inter += (frames & ref).sum()
        total += frames.sum() + ref.sum()
    assert values is None or "aorta" in values
    assert total > 0 and 2 * inter / total > 0.85
