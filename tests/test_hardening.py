"""Regression tests of the red-team pass (issue 11): one per reproduced defect, then the same class
of fault closed elsewhere. Each test names the defect it reproduces."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from cmdeploy.cli import app
from cmdeploy.errors import InputError
from cmdeploy.writers.atomic import TEMP_PREFIX

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
CT5N = CT_SMALL.parent / "dicomdirtests" / "98892001" / "CT5N"
HEADER = "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}
highdicom = pytest.importorskip("highdicom")


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def write_series(folder: Path, edit=None, *, drop: int | None = None) -> Path:
    """The 5-slice, 16 x 16 CT5N series (2.5 mm apart) copied to ``folder``, each dataset passed
    through ``edit(ds, k)`` first; ``drop`` leaves slice k out."""
    folder.mkdir(parents=True, exist_ok=True)
    files = sorted(CT5N.iterdir(), key=lambda p: -float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k, src in enumerate(files):
        if k == drop:
            continue
        ds = pydicom.dcmread(src)
        if edit is not None:
            edit(ds, k)
        ds.save_as(folder / f"im{k}.dcm")
    return folder


def points_csv(path: Path, rows: str = "1,liver,2,8,13,8,7,2,7,13\n") -> Path:
    path.write_text(HEADER + rows)
    return path


# ------------------------------------------------------------------ defect 1: data loss


def test_points_from_labels_never_overwrites_a_hand_edited_csv(tmp_path: Path) -> None:
    labels = tmp_path / "labels.npy"
    vol = np.zeros((2, 16, 16), np.uint8)
    vol[0, 2:9, 3:12] = 1
    np.save(labels, vol)
    target = tmp_path / "p.csv"
    target.write_text("MY HAND-EDITED POINTS\n")
    res = cli("points-from-labels", labels, "-o", target)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert target.read_text() == "MY HAND-EDITED POINTS\n"
    res = cli("points-from-labels", labels, "-o", target, "--overwrite")
    assert res.exit_code == 0 and target.read_text().startswith("slice_index,label")


@pytest.mark.parametrize(
    "command",
    [
        ["guidance", "-i", CT_SMALL, "-p", "{csv}", "-o", "{target}"],
        ["bench", "-m", "{model}", "--iterations", "1", "--warmup", "0", "--batch-sizes", "1",
         "--cm-sizes", "16", "--peak-size", "16", "--peak-repeats", "1", "--no-flops", "-o", "{target}"],
        ["calibrate", "-m", "{model}", "--data", CT_SMALL, "-o", "{target}"],
    ],
    ids=["guidance", "bench", "calibrate"],
)
def test_every_writing_command_refuses_an_existing_target(tmp_path: Path, command, plain_model_path) -> None:
    """Same class as defect 1: every command that writes a file refuses an existing one."""
    target = tmp_path / ("t.png" if command[0] == "guidance" else "t.onnx" if command[0] == "calibrate"
                         else "t.json")
    target.write_text("users data")
    csv = points_csv(tmp_path / "p.csv", "0,liver,30,60,70,62,50,35,51,85\n")
    args = [str(a).format(csv=csv, target=target, model=plain_model_path) for a in command]
    res = cli(*args)
    assert res.exit_code == 2, res.output
    assert "already exist" in res.output and "--overwrite" in res.output
    assert target.read_text() == "users data"


# ------------------------------------------------- defect 2: --overwrite hid a user's folder


def test_overwrite_never_moves_a_users_folder(tmp_path: Path, identity_model_path: Path) -> None:
    out = tmp_path / "out"
    (out / "report.json").mkdir(parents=True)
    (out / "report.json" / "mine.txt").write_text("keep me")
    csv = points_csv(tmp_path / "p.csv", "0,liver,30,60,70,62,50,35,51,85\n")
    res = cli("infer", "-i", CT_SMALL, "-p", csv, "-o", out, "-m", identity_model_path, "--overwrite")
    assert res.exit_code == 2, res.output
    assert "is a folder" in res.output and "model:" not in res.output  # found before the work
    assert (out / "report.json" / "mine.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["report.json"] and temp_files(out) == []


@pytest.mark.parametrize("kind", ["folder", "symlink", "fifo"])
def test_non_regular_targets_are_refused_even_with_overwrite(tmp_path: Path, kind: str) -> None:
    """Same class: a folder, a symbolic link or a FIFO at any output path is bad input."""
    from cmdeploy.writers.atomic import OutputDir, atomic_write_text, check_output_file

    target = tmp_path / "x.json"
    if kind == "folder":
        target.mkdir()
    elif kind == "symlink":
        (tmp_path / "elsewhere.json").write_text("theirs")
        target.symlink_to(tmp_path / "elsewhere.json")
    else:
        os.mkfifo(target)
    with pytest.raises(InputError, match="only replaces regular files"):
        check_output_file(target, overwrite=True)
    with pytest.raises(InputError, match="only replaces regular files"):
        OutputDir(tmp_path, overwrite=True).check(["x.json"])
    with pytest.raises(InputError):
        atomic_write_text(target, "new")
    if kind == "symlink":
        assert (tmp_path / "elsewhere.json").read_text() == "theirs" and target.is_symlink()


def test_a_folder_appearing_before_the_commit_is_refused_and_nothing_moved(tmp_path: Path) -> None:
    from cmdeploy.writers.atomic import OutputDir

    out = OutputDir(tmp_path, overwrite=True)
    out.check(["report.json"])
    out.write_text("report.json", "new")
    (tmp_path / "report.json").mkdir()  # created by someone else meanwhile
    with pytest.raises(InputError, match="is a folder"):
        out.commit()
    assert (tmp_path / "report.json").is_dir() and temp_files(tmp_path) == []


def test_overwrite_leaves_exactly_this_runs_outputs(tmp_path: Path, identity_model_path: Path) -> None:
    """Rough edge: --overwrite left overlays of slices no longer annotated; only files listed in
    the earlier report are removed, never the user's."""
    out = tmp_path / "out"
    series = write_series(tmp_path / "s")
    run1 = points_csv(tmp_path / "a.csv", "0,liver,2,8,13,8,7,2,7,13\n1,liver,2,8,13,8,7,2,7,13\n")
    assert cli("infer", "-i", series, "-p", run1, "-o", out, "-m", identity_model_path).exit_code == 0
    assert (out / "overlays" / "slice_0001.png").is_file()
    (out / "overlays" / "my_notes.txt").write_text("mine")
    run2 = points_csv(tmp_path / "b.csv", "0,liver,2,8,13,8,7,2,7,13\n")
    res = cli("infer", "-i", series, "-p", run2, "-o", out, "-m", identity_model_path, "--overwrite")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted([*report["outputs"], "overlays/my_notes.txt"])
    assert not (out / "overlays" / "slice_0001.png").exists()


# ---------------------------------- defect 3: failures found only after inference, wrong code


def _make_read_only(folder: Path) -> bool:
    """Make ``folder`` refuse new files, even to root (chattr +i); False when impossible here."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def _undo_read_only(folder: Path) -> None:
    if os.geteuid() == 0 and shutil.which("chattr"):
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_read_only_output_folder_is_found_before_inference(tmp_path, identity_model_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if not _make_read_only(out):
        pytest.skip("cannot make a folder read-only for root here (no chattr on this file system)")
    try:
        csv = points_csv(tmp_path / "p.csv", "0,liver,30,60,70,62,50,35,51,85\n")
        res = cli("infer", "-i", CT_SMALL, "-p", csv, "-o", out, "-m", identity_model_path)
        assert res.exit_code == 2, res.output
        assert "not writable" in res.output and "model:" not in res.output
        assert list(out.iterdir()) == []
        res = cli("infer", "-i", CT_SMALL, "-p", csv, "-o", out / "sub", "-m", identity_model_path)
        assert res.exit_code == 2 and "not writable" in res.output  # a folder to be created in it
    finally:
        _undo_read_only(out)


@pytest.mark.parametrize("emptied", [("SOPClassUID",), ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID",
                                                         "StudyInstanceUID")], ids=["sop-class", "all-four"])
def test_series_without_uids_is_refused_before_inference(tmp_path, identity_model_path, emptied) -> None:
    def edit(ds, _k):
        for kw in emptied:
            setattr(ds, kw, "")

    series = write_series(tmp_path / "s", edit)
    csv = points_csv(tmp_path / "p.csv")
    out = tmp_path / "out"
    res = cli("infer", "-i", series, "-p", csv, "-o", out, "-m", identity_model_path)
    assert res.exit_code == 2, res.output
    assert "use --format png,nifti" in res.output and "model:" not in res.output
    assert not out.exists()
    res = cli("infer", "-i", series, "-p", csv, "-o", out, "-m", identity_model_path, "--format", "png")
    assert res.exit_code == 0, res.output  # the advice works


def test_private_sop_class_is_refused_without_echoing_it(tmp_path, identity_model_path) -> None:
    series = write_series(tmp_path / "s", lambda ds, k: setattr(ds, "SOPClassUID", "1.2.3.4.5.6.7.8"))
    res = cli("infer", "-i", series, "-p", points_csv(tmp_path / "p.csv"), "-o", tmp_path / "o",
              "-m", identity_model_path)
    assert res.exit_code == 2 and "not a standard image storage class" in res.output
    assert "1.2.3.4.5.6.7.8" not in res.output


def test_a_seg_with_empty_references_is_never_written(tmp_path: Path) -> None:
    """The SEG writer's own guard (PACS code calls it directly, without infer's pre-check)."""
    from cmdeploy.io import open_series
    from cmdeploy.writers import ObjectMask
    from cmdeploy.writers.dicom_seg import build_dicom_seg, check_written_references, write_dicom_seg

    series = open_series(write_series(tmp_path / "s"))
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    sources[2].SOPInstanceUID = ""
    mask = np.zeros(series.shape, bool)
    mask[3:9, 3:9] = True
    target = tmp_path / "seg.dcm"
    with pytest.raises(InputError, match="SOPInstanceUID"):
        write_dicom_seg(target, series, [ObjectMask(1, "liver", mask)], source_datasets=sources)
    assert not target.exists() and temp_files(tmp_path) == []
    seg = build_dicom_seg(series, [ObjectMask(1, "liver", mask)])
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID = ""
    with pytest.raises(InputError, match="not written"):
        check_written_references(seg)


# ---------------------------------------------------------------------- defect 4: tracebacks


def test_points_from_labels_into_a_folder_is_bad_input(tmp_path: Path) -> None:
    np.save(tmp_path / "l.npy", np.pad(np.ones((1, 5, 5), np.uint8), ((0, 0), (2, 2), (2, 2))))
    (tmp_path / "dir.csv").mkdir()
    res = cli("points-from-labels", tmp_path / "l.npy", "-o", tmp_path / "dir.csv")
    assert res.exit_code == 2 and "is a folder" in res.output
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize("command", ["infer", "verify", "bench", "calibrate"])
def test_corrupt_model_is_exit_3_in_every_command(tmp_path, command, plain_model_path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is not protobuf" * 10)
    csv = points_csv(tmp_path / "p.csv", "0,liver,30,60,70,62,50,35,51,85\n")
    args = {
        "infer": ["-i", CT_SMALL, "-p", csv, "-o", tmp_path / "o", "-m", corrupt],
        "verify": [plain_model_path, corrupt],
        "bench": ["-m", corrupt, "--iterations", "1", "--warmup", "0", "--batch-sizes", "1",
                  "--cm-sizes", "16", "--peak-size", "16", "--peak-repeats", "1"],
        "calibrate": ["-m", corrupt, "--data", CT_SMALL, "-o", tmp_path / "i8.onnx"],
    }[command]
    res = cli(command, *args)
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)


@pytest.mark.parametrize(
    "args",
    [
        ["export", "--checkpoint", "{junk}", "--output", "{tmp}/m.onnx"],
        ["train", "--data", "{tmp}", "--epochs", "1", "--out", "{tmp}/run"],
        ["evaluate", "-m", "{junk}", "--data", "{tmp}"],
        ["guidance", "-i", "{junk}", "-p", "{junk}", "-o", "{tmp}/g.png"],
        ["verify", "{junk}", "{junk}"],
    ],
    ids=["export", "train", "evaluate", "guidance", "verify"],
)
def test_no_command_ends_in_a_traceback(tmp_path: Path, args: list[str]) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(256))
    res = cli(*[a.format(junk=junk, tmp=tmp_path) for a in args])
    assert res.exit_code in (1, 2, 3), res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)


# ------------------------------------------------------------- defect 5: identifiers leaked


@pytest.mark.parametrize(
    ("keyword", "value"),
    [("PatientBirthDate", "03/14/1961"), ("PatientSex", "female"), ("StudyDate", "2024-13-45"),
     ("StudyTime", "25:61:00")],
)
def test_malformed_header_values_are_not_echoed_and_dropped_from_the_seg(
    tmp_path, identity_model_path, keyword, value
) -> None:
    def edit(ds, _k):
        setattr(ds, keyword, value)
        ds.PatientName = "Doe^Jane"

    with pytest.warns(UserWarning):  # pydicom, while the test writes the bad value
        series = write_series(tmp_path / "s", edit)
    out = tmp_path / "out"
    csv = points_csv(tmp_path / "p.csv")
    res = cli("infer", "-i", series, "-p", csv, "-o", out, "-m", identity_model_path)
    assert res.exit_code == 0, res.output
    assert value not in res.output and "Doe" not in res.output
    assert f"left out of the DICOM SEG: {keyword} (values not shown)" in res.output
    seg = pydicom.dcmread(out / "seg.dcm")
    assert str(seg.get(keyword, "")) == "" and str(seg.PatientName) == "Doe^Jane"


def test_scrubber_redacts_registered_identifiers_uids_and_library_quotes() -> None:
    from cmdeploy.privacy import register_identifiers, scrub

    register_identifiers(["Zebulon^Quixotic", "PID-778812"])
    text = "patient ZEBULON Quixotic PID-778812 in 1.2.840.113619.2.55.3 'raw value' v1.2.3"
    out = scrub(text, library=True)
    assert "Zebulon" not in out.title() and "778812" not in out and "113619" not in out
    assert "raw value" not in out and "v1.2.3" in out  # versions are not UIDs
    assert scrub("file '/data/x.dcm'") == "file '/data/x.dcm'"  # cmdeploy's own quotes are kept
    register_identifiers(["Doe^Jane"])
    assert scrub("the file does not exist; DOE JANE") == "the file does not exist; <redacted>"
    assert scrub("'/data/DOE_JANE/ct'") == "'/data/<redacted>_<redacted>/ct'"  # folder names too


def test_library_log_records_and_warnings_are_scrubbed(capsys) -> None:
    import warnings

    from cmdeploy.privacy import install_log_scrubber

    install_log_scrubber()  # what every command does first (cmdeploy.cli.main)
    logging.getLogger("highdicom.seg.sop").warning('created "1.2.826.0.1.3680043.8.498.77"')
    logging.getLogger("highdicom.base").info("copy attributes from 1.2.3.4.5.6")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(False)  # re-route inside this block, whatever pytest installed
        install_log_scrubber()
        warnings.warn("Invalid value for VR DA: '03/14/1961'", UserWarning, stacklevel=1)
        logging.captureWarnings(False)
    text = capsys.readouterr().err
    assert "3680043" not in text and "1.2.3.4.5.6" not in text and "03/14/1961" not in text
    assert "highdicom.seg.sop: created" in text and "UserWarning: Invalid value for VR DA" in text


# ------------------------------------------------------------- defect 6: SIGTERM leftovers


def test_rerun_removes_stale_temp_files_of_its_own_pattern_only(tmp_path, identity_model_path) -> None:
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = [out / f"{TEMP_PREFIX}{dead}-0123456789ab-report.json",
             out / "overlays" / f"{TEMP_PREFIX}{dead}-0123456789ab-slice_0000.png",
             out / "overlays" / f"{TEMP_PREFIX}a1b2c3d4e5f6-slice_0000.png"]  # older naming
    keep = [out / f"{TEMP_PREFIX}{os.getpid()}-0123456789ab-report.json",  # a live process's
            out / ".cmdeploy-tmp-notes.txt", out / "overlays" / "x.cmdeploy-tmp-1-0123456789ab-y"]
    for p in stale + keep:
        p.write_text("x")
    csv = points_csv(tmp_path / "p.csv", "0,liver,30,60,70,62,50,35,51,85\n")
    res = cli("infer", "-i", CT_SMALL, "-p", csv, "-o", out, "-m", identity_model_path)
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)


def test_sigterm_is_handled_like_sigint() -> None:
    import signal

    from cmdeploy.commands._common import install_signal_handlers

    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        install_signal_handlers()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    finally:
        signal.signal(signal.SIGTERM, old)


def test_signals_wait_until_the_commit_is_done(tmp_path: Path) -> None:
    import signal

    from cmdeploy.writers.atomic import OutputDir

    out = OutputDir(tmp_path)
    out.write_text("a.txt", "a")
    out.write_text("b.txt", "b")
    real = os.replace
    calls = []

    def replace_then_interrupt(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives between the two renames

    os.replace = replace_then_interrupt
    try:
        with pytest.raises(KeyboardInterrupt):
            out.commit()
    finally:
        os.replace = real
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "b.txt").read_text() == "b"
    assert temp_files(tmp_path) == []


# ------------------------------------------------------ defect 7: truncated file, slice gaps


def test_truncated_file_is_a_named_error(tmp_path, identity_model_path) -> None:
    series = write_series(tmp_path / "s")
    victim = series / "im1.dcm"
    victim.write_bytes(victim.read_bytes()[:400])
    csv = points_csv(tmp_path / "p.csv")
    res = cli("infer", "-i", series, "-p", csv, "-o", tmp_path / "o", "-m", identity_model_path)
    assert res.exit_code == 2 and "im1.dcm" in res.output and "truncated" in res.output
    uid = str(pydicom.dcmread(series / "im0.dcm").SeriesInstanceUID)
    res = cli("infer", "-i", series, "-p", csv, "-o", tmp_path / "o", "-m", identity_model_path,
              "--series-uid", uid)
    assert res.exit_code == 2 and "im1.dcm" in res.output  # never silently dropped


def test_pixel_data_cut_short_is_a_named_error(tmp_path: Path) -> None:
    from cmdeploy.io import open_series

    series = write_series(tmp_path / "s")
    victim = series / "im3.dcm"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"im3\.dcm.*truncated"):
        open_series(series)


def test_gap_in_slice_positions_is_refused_naming_it(tmp_path, identity_model_path) -> None:
    series = write_series(tmp_path / "s", drop=2)
    csv = points_csv(tmp_path / "p.csv")
    res = cli("infer", "-i", series, "-p", csv, "-o", tmp_path / "o", "-m", identity_model_path)
    assert res.exit_code == 2, res.output
    assert "gap in the slice positions" in res.output and "im1.dcm" in res.output and "im3.dcm" in res.output
    assert "5.00 mm" in res.output and "2.50 mm" in res.output
    res = cli("infer", "-i", series, "-p", csv, "-o", tmp_path / "o", "-m", identity_model_path,
              "--allow-gaps", "--format", "png")
    assert res.exit_code == 0, res.output


# --------------------------------------------------------------------------- rough edges


def test_seg_labels_keep_non_ascii_and_long_names_stay_distinct(tmp_path, identity_model_path) -> None:
    long_a, long_b = "x" * 60 + "-left-part", "x" * 60 + "-right-part"
    csv = points_csv(tmp_path / "p.csv", f"1,Leber-ü,2,8,7,8,4,4,4,12\n1,{long_a},8,3,13,3,10,2,10,6\n"
                     f"1,{long_b},8,10,13,10,10,9,10,13\n")
    out = tmp_path / "out"
    res = cli("infer", "-i", write_series(tmp_path / "s"), "-p", csv, "-o", out, "-m", identity_model_path)
    assert res.exit_code == 0, res.output
    assert "shortened to DICOM SEG segment labels" in res.output
    seg = pydicom.dcmread(out / "seg.dcm")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert "Leber-ü" in labels and seg.SpecificCharacterSet == "ISO_IR 192"
    assert len(set(labels)) == len(labels) == 3 and all(len(x) <= 64 for x in labels)


@pytest.mark.parametrize("label", ["liver\x00", "a\x1bb", "line\u2028break"])
def test_control_characters_in_labels_are_refused(tmp_path: Path, label: str) -> None:
    from cmdeploy.points_csv import parse_points_csv

    with pytest.raises(InputError, match="control characters"):
        parse_points_csv(HEADER + f'0,"{label}",1,5,9,5,5,1,5,9\n')
    with pytest.raises(InputError, match="control characters"):
        parse_points_csv(HEADER + '0,"two\nlines",1,5,9,5,5,1,5,9\n')


@pytest.mark.parametrize(
    ("row", "what"), [("3,5,3,9,3,1,3,12", "zero-width"), ("1,5,9,5,5,5,5,5", "zero-height")]
)
def test_zero_width_or_height_box_is_refused(row: str, what: str) -> None:
    from cmdeploy.points_csv import parse_points_csv

    with pytest.raises(InputError, match=what):
        parse_points_csv(HEADER + f"0,liver,{row}\n")


def test_points_from_labels_writes_only_rows_infer_accepts(tmp_path: Path) -> None:
    from cmdeploy.labels_to_points import points_from_label_slice

    lab = np.zeros((40, 40), np.uint8)
    lab[2:32, 5] = 1  # a 30-pixel line one pixel wide: no real extent
    lab[10:20, 10:20] = 2
    assert [r.label for r in points_from_label_slice(lab)] == ["2"]


def test_label_limit_is_checked_with_the_csv_before_the_model(tmp_path, plain_model_path) -> None:
    from cmdeploy.points_csv import MAX_LABELS

    rows = "".join(f"0,L{i},1,5,9,5,5,1,5,9\n" for i in range(MAX_LABELS + 1))
    csv = points_csv(tmp_path / "p.csv", rows)
    res = cli("infer", "-i", CT_SMALL, "-p", csv, "-o", tmp_path / "o", "-m", plain_model_path)
    assert res.exit_code == 2 and f"{MAX_LABELS + 1} distinct labels" in res.output
    assert "model:" not in res.output


def test_writers_never_expand_cropped_masks(tmp_path: Path) -> None:
    """Rough edge: masks stay cropped to their boxes until written (no full-slice mask per object)."""
    from cmdeploy.io import open_series
    from cmdeploy.pipeline import PipelineResult
    from cmdeploy.writers.atomic import OutputDir
    from cmdeploy.writers.dicom_seg import write_dicom_seg
    from cmdeploy.writers.nifti import write_nifti_labels
    from cmdeploy.writers.png_overlay import write_series_overlays
    from cmdeploy.writers.report import describe_objects

    series = open_series(CT_SMALL)
    lm = np.zeros(series.shape, np.uint16)
    lm[10:20, 30:50], lm[60:64, 5:9] = 1, 2
    result = PipelineResult(series.shape, 1, {0: lm}, {"a": 1, "b": 2}, [])
    objects = result.label_masks()
    assert [o.mask_crop().crop.shape for o in objects] == [(10, 20), (4, 4)]

    class NoFullMask:
        def __init__(self, obj):
            self.slice_index, self.label, self.points = obj.slice_index, obj.label, None
            self.mask_crop = obj.mask_crop

        @property
        def mask(self):
            raise AssertionError("a writer expanded a cropped mask to its full slice")

    guarded = [NoFullMask(o) for o in objects]
    values = result.label_values
    with OutputDir(tmp_path / "o") as out:
        write_series_overlays(out, series, guarded, values=values)
        with out.stage("l.nii.gz") as p:
            write_nifti_labels(p, series, guarded, values=values)
        with out.stage("s.dcm") as p:
            write_dicom_seg(p, series, guarded, values=values)
    assert [o["area_px"] for o in describe_objects(guarded, values, None)] == [200, 16]
    seg = pydicom.dcmread(tmp_path / "o" / "s.dcm")
    assert int(seg.pixel_array.astype(bool).sum()) == 216


@pytest.mark.parametrize(
    ("slices", "points", "match"),
    [
        (np.zeros((32, 32), bool), "pts", "a mask, not an image"),
        (np.zeros((32, 32)), np.ones((4, 2), bool), "integer or float"),
        (np.zeros((32, 32)), np.ones((4, 2), complex), "integer or float"),
        ((np.zeros((32, 32)) for _ in range(1)), "pts", "generator"),
    ],
)
def test_api_refuses_wrong_types_with_input_error(plain_model_path, slices, points, match) -> None:
    from cmdeploy import Segmenter

    seg = Segmenter.load(plain_model_path, threads=1)
    pts = np.array([[2, 10], [20, 10], [10, 2], [10, 20]], np.float32)
    points = pts if isinstance(points, str) else points
    with pytest.raises(InputError, match=match):
        if isinstance(slices, np.ndarray) and slices.dtype != bool:
            seg.predict(slices, points)
        else:
            seg.predict_batch(slices if not isinstance(slices, np.ndarray) else [slices], [points])


def test_api_predict_batch_of_one_slice_and_threads(plain_model_path) -> None:
    from cmdeploy import Segmenter

    seg = Segmenter.load(plain_model_path, threads=1)
    pts = np.array([[2, 10], [20, 10], [10, 2], [10, 20]], np.float32)
    with pytest.raises(InputError, match="list of slices"):
        seg.predict_batch(np.zeros((32, 32)), pts)
    for bad in (-1, 0, True, 1.5):
        with pytest.raises(InputError, match="threads"):
            Segmenter.load(plain_model_path, threads=bad)


def test_outputs_of_an_earlier_report_never_reach_outside_the_folder(tmp_path: Path) -> None:
    """A report.json edited to list foreign files: nothing outside the folder, nothing through a
    symbolic link and no folder is removed."""
    from cmdeploy.writers.atomic import OutputDir

    root = tmp_path / "out"
    (root / "overlays").mkdir(parents=True)
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "x.png").write_text("mine too")
    (root / "via").symlink_to(tmp_path / "linked")
    (root / "overlays" / "old.png").write_text("old output")
    (root / "afolder").mkdir()
    with OutputDir(root, overwrite=True) as out:
        out.check(["report.json"])
        out.remove_on_commit(["../precious.txt", str(outside), "via/x.png", "afolder", "overlays/old.png"])
        out.write_text("report.json", "{}")
    assert outside.read_text() == "mine" and (tmp_path / "linked" / "x.png").exists()
    assert (root / "afolder").is_dir() and not (root / "overlays").exists()
    assert out.removed == [root / "overlays" / "old.png"]


def test_an_interrupted_command_exits_130_like_infer() -> None:
    import io

    import typer
    from rich.console import Console

    from cmdeploy.commands._common import EXIT_INTERRUPTED, guarded

    buf = io.StringIO()
    with pytest.raises(typer.Exit) as info, guarded(Console(file=buf)):
        raise KeyboardInterrupt
    assert info.value.exit_code == EXIT_INTERRUPTED == 130 and "interrupted" in buf.getvalue()
