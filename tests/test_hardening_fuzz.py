"""Fuzzing and interruption of ``infer`` end to end (issue 11).

* A hypothesis target writes random header values (malformed dates and times, wrong VRs, empty,
  private and malformed UIDs, non-ASCII names) into a small CT series and runs ``infer`` in process:
  never a traceback, exit status 0, 2 or 3 only, and no value of the patient attributes in stdout,
  stderr, report.json or any file name.
* A signal test sends SIGINT or SIGTERM to an ``infer --overwrite`` subprocess at random moments:
  the output folder holds either the complete previous outputs or the complete new ones, never a
  mix, and no temp file.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from cmdeploy.cli import app
from cmdeploy.writers.atomic import TEMP_PREFIX

CT5N = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
HEADER = "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}
pytest.importorskip("highdicom")

# ------------------------------------------------------------------------------ strategies
_letters = st.sampled_from(list("abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ") + list("äöüéñßøÅЖжλ漢字"))
# every drawn text starts with "Zq", which no normal output contains, so a hit is a real leak
_name_part = st.text(_letters, min_size=2, max_size=10).map(lambda t: "Zq" + t)
names = st.builds(lambda a, b: f"{a}^{b}", _name_part, _name_part)
dates = st.one_of(
    st.sampled_from(["03/14/1961", "1961-03-14", "31.12.1999", "20240230", "19610314x", "yesterday",
                     "00000000", ""]),
    st.dates().map(lambda d: d.strftime("%Y%m%d")),
)
times = st.sampled_from(["25:61:00", "12:30", "noon-ish", "101010.123456", "", "246060"])
ids = st.text(_letters, min_size=2, max_size=14).map(lambda t: "Zq" + t)
sexes = st.sampled_from(["M", "F", "O", "", "female", "unknown", "X"])


def _uid(kind: str, n: int) -> str:
    from pydicom.uid import generate_uid

    return {"empty": "", "private": f"1.3.6.1.4.1.99999.{n}.7", "malformed": f"abc.{n}..x",
            "valid": str(generate_uid())}[kind]


uid_kinds = st.sampled_from(["valid"] * 6 + ["empty", "private", "malformed"])
headers = st.fixed_dictionaries(
    {
        "PatientName": names, "PatientID": ids, "PatientBirthDate": dates, "PatientSex": sexes,
        "StudyDate": dates, "StudyTime": times, "AccessionNumber": ids, "StudyID": ids,
        "ReferringPhysicianName": names,
        "sop_class": st.sampled_from(["valid"] * 6 + ["empty", "private"]),
        "formats": st.sampled_from([None, "png,nifti", "dicom-seg"]),
        "sop_instance": uid_kinds, "series": uid_kinds, "study": uid_kinds,
        "wrong_vr": st.sampled_from([None, "PatientBirthDate", "StudyDate", "PatientSex", "PatientID"]),
    }
)
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime",
                "AccessionNumber", "StudyID", "ReferringPhysicianName")


def _write(folder: Path, h: dict) -> list[str]:
    """The CT5N slices with the drawn header values; returns the values that must not leak."""
    from pydicom.datadict import tag_for_keyword

    series_uid, study_uid = _uid(h["series"], 1), _uid(h["study"], 2)
    secret: list[str] = []
    files = sorted(CT5N.iterdir())
    for k, src in enumerate(files):
        ds = pydicom.dcmread(src)
        ds.SpecificCharacterSet = "ISO_IR 192"
        for kw in (*PATIENT_KEYS, "PatientSex"):
            if kw == h["wrong_vr"]:
                tag = tag_for_keyword(kw)
                if tag in ds:
                    del ds[tag]
                ds.add_new(tag, "UT", h[kw])  # a wrong VR, as written by a broken exporter
            else:
                setattr(ds, kw, h[kw])
        ds.SOPClassUID = {"valid": "1.2.840.10008.5.1.4.1.1.2", "empty": "",
                          "private": "1.3.6.1.4.1.99999.5.1.1"}[h["sop_class"]]
        ds.SOPInstanceUID = _uid(h["sop_instance"], 10 + k)
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, study_uid
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID or "1.2.3"
        ds.save_as(folder / f"im{k}.dcm")
        secret.append(str(ds.SOPInstanceUID))
    secret += [h[kw] for kw in PATIENT_KEYS] + [series_uid, study_uid]
    secret += [p for kw in ("PatientName", "ReferringPhysicianName") for p in h[kw].split("^")]
    return [s for s in secret if len(s) >= 4 and not s.isdigit() or len(s) >= 8]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=headers)
def test_infer_on_random_headers_never_leaks_or_crashes(h: dict, identity_model_path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns while the test writes bad values
            secret = _write(root / "in", h)
        csv = root / "p.csv"
        csv.write_text(HEADER + "1,liver,2,8,13,8,7,2,7,13\n")
        out = root / "out"
        fmt = ["--format", h["formats"]] if h["formats"] else []
        res = CliRunner().invoke(app, ["infer", "-i", str(root / "in"), "-p", str(csv), "-o", str(out),
                                       "-m", str(identity_model_path), *fmt], env=ENV)
        assert res.exit_code in (0, 2, 3), res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        assert "Traceback" not in res.output
        report = (out / "report.json").read_text() if (out / "report.json").is_file() else ""
        names = " ".join(str(p.relative_to(root)) for p in root.rglob("*"))
        for value in secret:
            assert value not in res.output, (value, res.output)
            assert value not in report, value
            assert value not in names, value
        if res.exit_code == 0 and (out / "seg.dcm").exists():
            seg = pydicom.dcmread(out / "seg.dcm")  # a SEG is only written with valid references
            ref = seg.ReferencedSeriesSequence[0]
            assert ref.SeriesInstanceUID and all(
                i.ReferencedSOPInstanceUID and i.ReferencedSOPClassUID for i in ref.ReferencedInstanceSequence
            )


# ------------------------------------------------------------------------------- signals


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _infer_cmd(series: Path, csv: Path, out: Path, model: Path) -> list[str]:
    return [sys.executable, "-c", "from cmdeploy.cli import app; app()", "infer", "-i", str(series),
            "-p", str(csv), "-o", str(out), "-m", str(model), "--threads", "1", "--overwrite"]


def test_sigint_and_sigterm_leave_old_or_new_outputs_never_a_mix(tmp_path: Path, identity_model_path) -> None:
    series = tmp_path / "s"
    series.mkdir()
    for k, src in enumerate(sorted(CT5N.iterdir())):
        pydicom.dcmread(src).save_as(series / f"im{k}.dcm")
    old_csv, new_csv = tmp_path / "old.csv", tmp_path / "new.csv"
    old_csv.write_text(HEADER + "".join(f"{k},liver,2,8,13,8,7,2,7,13\n" for k in range(5)))
    new_csv.write_text(HEADER + "".join(f"{k},spleen,3,6,12,6,8,3,8,11\n" for k in range(5)))
    out = tmp_path / "out"
    env = {**os.environ, **ENV}
    first = subprocess.run(_infer_cmd(series, old_csv, out, identity_model_path), env=env,
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    old = _snapshot(out)
    t0 = time.perf_counter()
    probe = subprocess.run(_infer_cmd(series, new_csv, tmp_path / "probe", identity_model_path), env=env,
                           capture_output=True, text=True, timeout=120)
    duration = time.perf_counter() - t0
    assert probe.returncode == 0, probe.stderr
    rng = random.Random(11)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(_infer_cmd(series, new_csv, out, identity_model_path), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        proc.send_signal(sig)
        proc.communicate(timeout=120)
        now = _snapshot(out)
        assert not [n for n in now if Path(n).name.startswith(TEMP_PREFIX)], sorted(now)
        if now == old:
            continue
        report = json.loads(now["report.json"])
        assert sorted(now) == sorted(report["outputs"]), sorted(now)  # exactly the new outputs
        assert all(now[n] != old.get(n) for n in now), "a mix of old and new outputs"
        subprocess.run(_infer_cmd(series, old_csv, out, identity_model_path), env=env, check=True,
                       capture_output=True, timeout=120)  # back to the old state for the next round
        old = _snapshot(out)
    np.testing.assert_equal(sorted(old), sorted(_snapshot(out)))
