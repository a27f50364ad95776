"""PACS round trips against a real Orthanc (with its DICOMweb plugin), started by these fixtures.

A 20-slice CT series is uploaded through Orthanc's REST API; ``cmdeploy infer`` pulls it (WADO-RS or
C-GET), segments two objects keyed by ``sop_instance_uid`` with the shipped model, and pushes the
SEG (STOW-RS or C-STORE). Orthanc's REST API then shows exactly one SEG in the study, referencing
the source series, whose frames equal the SEG of the same run on a local folder. Fault tests: a
series that is not there, wrong AE titles, and an Orthanc that refuses stores.

Skipped (with the reason) only where Orthanc or its DICOMweb plugin is not installed; ``.ci/run``
installs both.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pacs_servers import (
    CALLING_AET,
    REJECT_STOW_LUA,
    Orthanc,
    orthanc_missing_reason,
    start_orthanc,
    write_ct_series,
)
from typer.testing import CliRunner

from cmdeploy.cli import app

pytest.importorskip("highdicom", reason="DICOM SEG output needs highdicom (the dicom extra)")
pytest.importorskip("dicomweb_client", reason="needs the pacs extra")
pytest.importorskip("pynetdicom", reason="needs the pacs extra")
_MISSING = orthanc_missing_reason()
pytestmark = pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}
POINTS_HEADER = "sop_instance_uid,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
ANNOTATED = (3, 12)
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rejecting_orthanc(tmp_path_factory: pytest.TempPathFactory):
    """An Orthanc that refuses every store from us: STOW-RS -> HTTP 403 (Lua filter), C-STORE ->
    our AE may not store (association aborted by Orthanc)."""
    from pacs_servers import free_port

    server = start_orthanc(
        tmp_path_factory.mktemp("orthanc_reject"),
        lua=REJECT_STOW_LUA,
        DicomAlwaysAllowStore=False,
        DicomModalities={
            "cmdeploy": {"AET": CALLING_AET, "Host": "127.0.0.1", "Port": free_port(),
                         "AllowEcho": True, "AllowFind": True, "AllowGet": True, "AllowStore": False}
        },
    )
    yield server
    server.stop()


@pytest.fixture()
def tmpdir_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point tempfile at an empty folder so a test can check that nothing is left there."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _uploaded_series(
    orthanc: Orthanc, folder: Path, transfer_syntax: str | None = None
) -> tuple[str, str, list[Path], Path]:
    """A fresh 20-slice series on ``orthanc`` and its points CSV (two objects by SOP UID)."""
    study, series, files = write_ct_series(folder / "series", transfer_syntax=transfer_syntax)
    orthanc.upload(files)
    uids = [pydicom.dcmread(files[k], stop_before_pixels=True).SOPInstanceUID for k in ANNOTATED]
    csv = folder / "points.csv"
    csv.write_text(
        POINTS_HEADER
        + f"{uids[0]},aorta,73,5,107,5,89,0,90,22\n"
        + f"{uids[1]},vertebral_body,41,37,79,36,59,6,64,43\n"
    )
    return study, series, files, csv


def _infer(*args: str | Path):
    return CliRunner().invoke(app, ["infer", *map(str, args)], env=ENV)


def _segs_in_study(orthanc: Orthanc, study: str) -> list[pydicom.Dataset]:
    series_ids = orthanc.find("Series", StudyInstanceUID=study, Modality="SEG")
    out = []
    for sid in series_ids:
        for iid in orthanc.get(f"/series/{sid}")["Instances"]:
            out.append(pydicom.dcmread(io.BytesIO(orthanc.instance_file(iid))))
    return out


def _frames(ds: pydicom.Dataset) -> dict[tuple[str, int], np.ndarray]:
    """(referenced SOP instance, segment number) -> frame mask of a SEG."""
    pixels = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    out = {}
    for i, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        out[(str(ref), number)] = pixels[i].astype(bool)
    return out


def _local_seg(tmp_path: Path, series_folder: Path, csv: Path) -> pydicom.Dataset:
    out = tmp_path / "local_out"
    res = _infer("--input", series_folder, "--points", csv, "--output", out, "--format", "dicom-seg")
    assert res.exit_code == 0, res.output
    return pydicom.dcmread(out / "seg.dcm")


def _check_round_trip(orthanc: Orthanc, study: str, series: str, files: list[Path], local: pydicom.Dataset):
    segs = _segs_in_study(orthanc, study)
    assert len(segs) == 1, f"expected exactly one SEG in the study, found {len(segs)}"
    seg = segs[0]
    assert seg.SOPClassUID == SEG_CLASS
    assert seg.StudyInstanceUID == study
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    refs = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    referenced = {r.ReferencedSOPInstanceUID for r in refs}
    assert referenced == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [s.SegmentLabel for s in local.SegmentSequence]
    got, want = _frames(seg), _frames(local)
    assert got.keys() == want.keys() and len(got) == len(ANNOTATED)
    for key in want:
        assert want[key].any()
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("source_kind,dest_kind", [("dicomweb", "dicomweb"), ("dimse", "dimse")])
def test_round_trip_equals_local_run(
    orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path, source_kind: str, dest_kind: str
) -> None:
    study, series, files, csv = _uploaded_series(orthanc, tmp_path)
    address = {"dicomweb": orthanc.dicomweb, "dimse": orthanc.dimse()}
    out = tmp_path / "out"
    res = _infer(
        "--input", address[source_kind], "--study", study, "--series", series, "--points", csv,
        "--output", out, "--send", address[dest_kind], "--calling-aet", CALLING_AET,
        "--pacs-timeout", "20",
    )
    assert res.exit_code == 0, res.output
    assert "retrieved 20 instance(s)" in res.output and "stored the SEG" in res.output
    for uid in (study, series):
        assert uid not in res.output
    assert (out / "seg.dcm").is_file() and (out / "report.json").is_file()
    assert list(tmpdir_watch.iterdir()) == []  # the retrieved instances are gone
    _check_round_trip(orthanc, study, series, files, _local_seg(tmp_path, tmp_path / "series", csv))


@pytest.mark.parametrize("source_kind", ["dicomweb", "dimse"])
def test_jpeg2000_series_is_pulled_as_stored(
    orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path, source_kind: str
) -> None:
    """Orthanc without its GDCM plugin cannot transcode JPEG 2000: WADO-RS asks for
    transfer-syntax=* and C-GET offers a JPEG 2000 context, so the series comes as stored."""
    j2k = "1.2.840.10008.1.2.4.90"
    study, series, files, csv = _uploaded_series(orthanc, tmp_path, transfer_syntax=j2k)
    first = orthanc.find("Instance", SeriesInstanceUID=series)[0]
    assert orthanc.get(f"/instances/{first}/metadata/TransferSyntax") == j2k.encode()
    if source_kind == "dicomweb":  # the condition this guards against: asking for the default fails
        import requests
        from dicomweb_client import DICOMwebClient

        client = DICOMwebClient(orthanc.http + "/dicom-web")
        client.set_http_retry_params(retry=False)
        with pytest.raises(requests.exceptions.HTTPError):
            client.retrieve_series(study, series)
    source = orthanc.dicomweb if source_kind == "dicomweb" else orthanc.dimse()
    out = tmp_path / "out"
    res = _infer("--input", source, "--study", study, "--series", series, "--points", csv, "--output", out,
                 "--send", orthanc.dicomweb, "--calling-aet", CALLING_AET, "--pacs-timeout", "20")
    assert res.exit_code == 0, res.output
    assert list(tmpdir_watch.iterdir()) == []
    _check_round_trip(orthanc, study, series, files, _local_seg(tmp_path, tmp_path / "series", csv))


def test_python_api_round_trip(orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path) -> None:
    """The script-facing API: C-GET from Orthanc, segment, STOW-RS the SEG back."""
    from cmdeploy.pacs import connect, segment_series

    study, series, files, csv = _uploaded_series(orthanc, tmp_path)
    source = connect(orthanc.dimse(), calling_aet=CALLING_AET, timeout=20, retries=1)
    dest = connect(orthanc.dicomweb, timeout=20)
    result = segment_series(source, study, series, csv, send_to=dest)
    assert result.sent and result.num_instances == 20 and result.num_objects == 2
    assert set(result.timings) == {"fetch", "segment", "seg", "send", "total"}
    assert list(tmpdir_watch.iterdir()) == []
    _check_round_trip(orthanc, study, series, files, _local_seg(tmp_path, tmp_path / "series", csv))


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_series_not_on_the_pacs_exits_6(
    orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path, kind: str
) -> None:
    study, _, _, csv = _uploaded_series(orthanc, tmp_path)
    address = orthanc.dicomweb if kind == "dicomweb" else orthanc.dimse()
    missing = "1.2.826.0.1.3680043.8.498.99999999999999999999"
    out = tmp_path / "out"
    res = _infer("--input", address, "--study", study, "--series", missing, "--points", csv,
                 "--output", out, "--calling-aet", CALLING_AET, "--pacs-timeout", "20")
    assert res.exit_code == 6, res.output
    assert "not on the PACS" in res.output
    assert missing not in res.output and study not in res.output
    assert not out.exists()
    assert list(tmpdir_watch.iterdir()) == []


def test_wrong_called_ae_title_exits_7_before_inference(
    orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path
) -> None:
    study, series, _, csv = _uploaded_series(orthanc, tmp_path)
    out = tmp_path / "out"
    # the destination is checked (C-ECHO) before the series is pulled or segmented
    res = _infer("--input", orthanc.dicomweb, "--study", study, "--series", series, "--points", csv,
                 "--output", out, "--send", orthanc.dimse("NOTORTHANC"), "--calling-aet", CALLING_AET)
    assert res.exit_code == 7, res.output
    assert "association rejected" in res.output and "Called AE title not recognised" in res.output
    assert "retrieved" not in res.output
    assert not out.exists()
    assert list(tmpdir_watch.iterdir()) == []
    # as the source, too
    res = _infer("--input", orthanc.dimse("NOTORTHANC"), "--study", study, "--series", series,
                 "--points", csv, "--output", out, "--calling-aet", CALLING_AET)
    assert res.exit_code == 7, res.output
    assert not out.exists()


def test_unknown_calling_ae_title_may_not_retrieve_exits_7(
    orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path
) -> None:
    study, series, _, csv = _uploaded_series(orthanc, tmp_path)
    out = tmp_path / "out"
    res = _infer("--input", orthanc.dimse(), "--study", study, "--series", series, "--points", csv,
                 "--output", out, "--calling-aet", "STRANGER", "--pacs-timeout", "20")
    assert res.exit_code == 7, res.output
    assert "'STRANGER'" in res.output
    assert not out.exists()
    assert list(tmpdir_watch.iterdir()) == []


@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pacs_rejecting_the_seg_exits_8(
    orthanc: Orthanc, rejecting_orthanc: Orthanc, tmp_path: Path, tmpdir_watch: Path, kind: str
) -> None:
    study, series, _, csv = _uploaded_series(orthanc, tmp_path)
    dest = rejecting_orthanc.dicomweb if kind == "dicomweb" else rejecting_orthanc.dimse()
    out = tmp_path / "out"
    res = _infer("--input", orthanc.dicomweb, "--study", study, "--series", series, "--points", csv,
                 "--output", out, "--send", dest, "--calling-aet", CALLING_AET, "--pacs-timeout", "20")
    assert res.exit_code == 8, res.output
    assert ("HTTP 403" in res.output) if kind == "dicomweb" else ("C-STORE" in res.output)
    assert study not in res.output and series not in res.output
    # the local outputs are complete (seg.dcm can be resent), nothing half-written, no temp files
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert "seg.dcm" in names and "report.json" in names
    assert not [n for n in names if ".tmp" in n or n.startswith(".")]
    assert list(tmpdir_watch.iterdir()) == []
    assert rejecting_orthanc.find("Series", StudyInstanceUID=study) == []


def test_example_inbox_script(orthanc: Orthanc, tmp_path: Path) -> None:
    """examples/pacs_watch.py --once: a CSV keyed by sop_instance_uid becomes a SEG on the PACS and
    a result file next to the CSV; a CSV whose instance is not on the PACS is marked failed (exit 6)."""
    import json
    import subprocess
    import sys

    study, series, _, csv = _uploaded_series(orthanc, tmp_path)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "job1.csv").write_text(csv.read_text())
    unknown = "1.2.826.0.1.3680043.8.498.424242"
    (inbox / "job2.csv").write_text(POINTS_HEADER + f"{unknown},aorta,73,5,107,5,89,0,90,22\n")
    script = Path(__file__).resolve().parents[1] / "examples" / "pacs_watch.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--pacs", orthanc.dicomweb, "--inbox", str(inbox), "--once",
         "--timeout", "20"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    ok = json.loads((inbox / "job1.csv.result.json").read_text())
    assert ok["status"] == "ok" and ok["instances"] == 20 and ok["objects"] == 2
    failed = json.loads((inbox / "job2.csv.result.json").read_text())
    assert failed["status"] == "failed" and failed["exit_code"] == 6
    assert study not in proc.stderr and series not in proc.stderr
    assert (inbox / "job1.csv").read_text() == csv.read_text()  # inputs untouched
    segs = _segs_in_study(orthanc, study)
    assert len(segs) == 1 and segs[0].ReferencedSeriesSequence[0].SeriesInstanceUID == series
