"""PACS addresses, retries, error mapping, option checks, and the network faults that need no PACS:
a PACS that is down (connection refused), one that accepts and never answers (timeout), and Ctrl-C /
SIGTERM while waiting for it. Each fault: a clear message, its own exit status, no output files,
no temporary folder left behind. (Round trips and PACS-side refusals: test_pacs_orthanc.py.)
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pacs_servers import SilentServer, free_port, write_ct_series
from typer.testing import CliRunner

from cmdeploy.cli import app
from cmdeploy.errors import InputError
from cmdeploy.pacs.endpoints import DicomWebEndpoint, DimseEndpoint, PacsOptions, parse_endpoint
from cmdeploy.pacs.errors import (
    EXIT_CODES,
    PacsError,
    PacsNotFound,
    PacsProtocolError,
    PacsRefused,
    PacsStoreRejected,
    PacsTimeout,
    PacsUnreachable,
)
from cmdeploy.pacs.retry import backoff_delays, with_retries

ENV = {"COLUMNS": "250", "NO_COLOR": "1"}
STUDY = "1.2.826.0.1.3680043.8.498.1111"
SERIES = "1.2.826.0.1.3680043.8.498.2222"
needs_pacs = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("dicomweb_client", "pynetdicom")),
    reason="needs the pacs extra (dicomweb-client, pynetdicom)",
)


# ------------------------------------------------------------------ addresses and options
def test_parse_endpoint() -> None:
    assert parse_endpoint("dicomweb:http://pacs:8042/dicom-web/") == DicomWebEndpoint("http://pacs:8042/dicom-web")
    assert parse_endpoint("DIMSE:ORTHANC@10.0.0.5:4242") == DimseEndpoint("ORTHANC", "10.0.0.5", 4242)
    assert parse_endpoint("dimse:PACS@[::1]:104") == DimseEndpoint("PACS", "::1", 104)
    assert parse_endpoint("dimse:A B@host:11112").aet == "A B"  # spaces are legal inside AE titles
    ep = parse_endpoint("dicomweb:https://user:secret@pacs.example/wado")
    assert "secret" not in ep.display and "user" not in ep.display
    assert ep.display == "DICOMweb https://pacs.example/wado"


@given(
    aet=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\@"),
                min_size=1, max_size=16),
    host=st.from_regex(r"[a-z][a-z0-9.-]{0,30}", fullmatch=True),
    port=st.integers(1, 65535),
)
def test_dimse_address_round_trip(aet: str, host: str, port: int) -> None:
    ep = parse_endpoint(f"dimse:{aet}@{host}:{port}")
    assert ep == DimseEndpoint(aet, host, port)
    assert ep.display == f"DIMSE {aet}@{host}:{port}"


@pytest.mark.parametrize(
    "text",
    [
        "dicomweb:ftp://pacs/x", "dicomweb:pacs:8042", "dicomweb:http://pacs:99999/x", "dimse:pacs:4242",
        "dimse:ORTHANC@pacs", "dimse:ORTHANC@pacs:0", "dimse:ORTHANC@pacs:http", "dimse:@pacs:4242",
        "dimse:AN_AE_TITLE_OF_17C@pacs:4242", "dimse:BACK\\SLASH@pacs:4242", "pacs:4242",
    ],
)
def test_parse_endpoint_refuses(text: str) -> None:
    with pytest.raises(InputError):
        parse_endpoint(text)


def test_options_are_checked() -> None:
    for bad in ({"timeout": 0}, {"retries": -1}, {"backoff": -1.0}, {"calling_aet": ""}):
        with pytest.raises(InputError):
            PacsOptions(**bad)


def test_every_exit_code_is_distinct_and_documented() -> None:
    kinds = [PacsUnreachable, PacsTimeout, PacsNotFound, PacsRefused, PacsStoreRejected, PacsProtocolError]
    codes = [k.exit_code for k in kinds]
    assert len(set(codes)) == len(codes) and set(codes) == set(EXIT_CODES)
    assert not set(codes) & {0, 1, 2, 3, 130}
    assert [k for k in kinds if k.transient] == [PacsUnreachable, PacsTimeout]
    assert not issubclass(PacsError, RuntimeError | OSError)  # else the CLI would say exit 3


@needs_pacs
@pytest.mark.parametrize(
    "status,store,kind,transient",
    [
        (404, False, PacsNotFound, False), (403, False, PacsRefused, False), (401, False, PacsRefused, False),
        (500, False, PacsProtocolError, False), (503, False, PacsProtocolError, True),
        (504, False, PacsTimeout, True), (403, True, PacsStoreRejected, False),
        (409, True, PacsStoreRejected, False), (429, True, PacsProtocolError, True),
    ],
)
def test_http_status_mapping(status: int, store: bool, kind: type, transient: bool) -> None:
    from cmdeploy.pacs.dicomweb import http_error

    exc = http_error(status, "Reason", "DICOMweb x STOW-RS", store=store)
    assert type(exc) is kind and exc.transient is transient
    assert f"HTTP {status}" in str(exc)


# ------------------------------------------------------------------ retries
@given(retries=st.integers(0, 6), backoff=st.floats(0, 10, allow_nan=False))
def test_backoff_doubles(retries: int, backoff: float) -> None:
    d = backoff_delays(retries, backoff)
    assert len(d) == retries
    assert all(b == pytest.approx(2 * a) for a, b in zip(d, d[1:], strict=False))
    assert not d or d[0] == backoff


def test_with_retries_retries_transient_errors_only() -> None:
    waits: list[float] = []
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise PacsUnreachable("down")
        return "ok"

    assert with_retries(flaky, retries=2, backoff=0.5, sleep=waits.append) == "ok"
    assert calls["n"] == 3 and waits == [0.5, 1.0]

    def always(exc: PacsError):
        def f() -> None:
            calls["n"] += 1
            raise exc
        return f

    calls["n"] = 0
    with pytest.raises(PacsTimeout):
        with_retries(always(PacsTimeout("slow")), retries=3, backoff=0, sleep=waits.append)
    assert calls["n"] == 4
    calls["n"] = 0
    with pytest.raises(PacsNotFound):
        with_retries(always(PacsNotFound("gone")), retries=3, backoff=0, sleep=waits.append)
    assert calls["n"] == 1
    calls["n"] = 0
    with pytest.raises(PacsProtocolError):  # a transient instance of a non-transient type is retried
        busy = PacsProtocolError("busy", transient=True)
        with_retries(always(busy), retries=1, backoff=0, sleep=waits.append)
    assert calls["n"] == 2


def test_importing_the_cli_loads_no_pacs_library() -> None:
    code = (
        "import sys, cmdeploy.cli, cmdeploy.commands.infer, cmdeploy.pacs, cmdeploy.pacs.cli\n"
        "from cmdeploy.pacs import PacsOptions, PacsError\n"
        "bad = [m for m in ('dicomweb_client', 'pynetdicom', 'requests') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ CLI option checks (exit 2)
def _infer(*args: str | Path):
    return CliRunner().invoke(app, ["infer", *map(str, args)], env=ENV)


@pytest.fixture()
def points_csv(tmp_path: Path) -> Path:
    p = tmp_path / "points.csv"
    p.write_text("slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
                 "0,aorta,73,5,107,5,89,0,90,22\n")
    return p


@pytest.fixture()
def tmpdir_watch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--input", "dicomweb:http://127.0.0.1:9/dw", "--series", SERIES], "--study UID and --series UID"),
        (["--input", "dimse:PACS@127.0.0.1:9", "--study", STUDY], "--study UID and --series UID"),
        (["--input", "dimse:PACS@127.0.0.1", "--study", STUDY, "--series", SERIES], "dimse:AET@HOST:PORT"),
        (["--input", "dicomweb:http://127.0.0.1:9/dw", "--study", STUDY, "--series", SERIES,
          "--send", "dicomweb:http://127.0.0.1:9/dw", "--format", "png"], "include dicom-seg"),
        (["--input", "dicomweb:http://127.0.0.1:9/dw", "--study", STUDY, "--series", SERIES,
          "--calling-aet", "WAY_TOO_LONG_AE_TITLE"], "not a valid DICOM AE title"),
        (["--input", "nowhere", "--study", STUDY], "--study applies to a PACS --input"),
        (["--input", "ct.nii.gz", "--send", "dimse:PACS@127.0.0.1:9"], "needs a DICOM input"),
    ],
)
def test_bad_pacs_options_exit_2(tmp_path: Path, points_csv: Path, tmpdir_watch: Path, extra, needle) -> None:
    out = tmp_path / "out"
    res = _infer(*extra, "--points", points_csv, "--output", out)
    assert res.exit_code == 2, res.output
    assert needle in res.output
    assert STUDY not in res.output and SERIES not in res.output
    assert not out.exists() and list(tmpdir_watch.iterdir()) == []


def test_existing_outputs_are_refused_before_retrieval(tmp_path: Path, points_csv: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with SilentServer() as server:  # would hang if contacted
        res = _infer("--input", f"dicomweb:http://127.0.0.1:{server.port}/dw", "--study", STUDY,
                     "--series", SERIES, "--points", points_csv, "--output", out)
        assert server.accepted == 0
    assert res.exit_code == 2 and "already exist" in res.output
    assert (out / "report.json").read_text() == "{}"


# ------------------------------------------------------------------ PACS down / slow
def _address(kind: str, port: int) -> str:
    if kind == "dicomweb":
        return f"dicomweb:http://127.0.0.1:{port}/dicom-web"
    return f"dimse:PACS@127.0.0.1:{port}"


def _outputs(out: Path) -> list[Path]:
    return sorted(out.rglob("*")) if out.exists() else []


@needs_pacs
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_pacs_down_exits_4(tmp_path: Path, points_csv: Path, tmpdir_watch: Path, kind: str) -> None:
    port = free_port()  # nobody listens there
    address = _address(kind, port)
    out = tmp_path / "out"
    res = _infer("--input", address, "--study", STUDY, "--series", SERIES, "--points", points_csv,
                 "--output", out, "--pacs-retries", "1", "--pacs-timeout", "5")
    assert res.exit_code == 4, res.output
    assert "connection refused" in res.output and "retry 1 of 1" in res.output
    assert STUDY not in res.output and SERIES not in res.output
    assert _outputs(out) == [] and list(tmpdir_watch.iterdir()) == []


@needs_pacs
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_send_to_a_pacs_that_is_down_fails_before_inference(
    tmp_path: Path, tmpdir_watch: Path, kind: str
) -> None:
    pytest.importorskip("highdicom")
    _, _, files = write_ct_series(tmp_path / "series", 2)
    csv = tmp_path / "points.csv"
    csv.write_text("slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
                   "0,aorta,73,5,107,5,89,0,90,22\n")
    port = free_port()
    address = _address(kind, port)
    out = tmp_path / "out"
    res = _infer("--input", tmp_path / "series", "--points", csv, "--output", out, "--send", address,
                 "--pacs-retries", "0")
    assert res.exit_code == 4, res.output
    assert "model:" not in res.output  # nothing was segmented
    assert _outputs(out) == [] and list(tmpdir_watch.iterdir()) == []


@needs_pacs
@pytest.mark.parametrize("kind", ["dicomweb", "dimse"])
def test_slow_pacs_times_out_exits_5(tmp_path: Path, points_csv: Path, tmpdir_watch: Path, kind: str) -> None:
    out = tmp_path / "out"
    with SilentServer() as server:
        address = _address(kind, server.port)
        t0 = time.monotonic()
        res = _infer("--input", address, "--study", STUDY, "--series", SERIES, "--points", points_csv,
                     "--output", out, "--pacs-timeout", "0.5", "--pacs-retries", "1")
        took = time.monotonic() - t0
        accepted = server.accepted
    assert res.exit_code == 5, res.output
    assert "within 0.5 s" in res.output and "retry 1 of 1" in res.output
    assert accepted == 2  # tried, backed off, tried again
    assert took < 15
    assert _outputs(out) == [] and list(tmpdir_watch.iterdir()) == []


@needs_pacs
def test_slow_pacs_as_destination_times_out_before_inference(
    tmp_path: Path, points_csv: Path, tmpdir_watch: Path
) -> None:
    pytest.importorskip("highdicom")
    write_ct_series(tmp_path / "series", 2)
    out = tmp_path / "out"
    with SilentServer() as server:
        res = _infer("--input", tmp_path / "series", "--points", points_csv, "--output", out,
                     "--send", f"dimse:PACS@127.0.0.1:{server.port}", "--pacs-timeout", "0.5",
                     "--pacs-retries", "0")
    assert res.exit_code == 5, res.output
    assert "association request" in res.output
    assert _outputs(out) == [] and list(tmpdir_watch.iterdir()) == []


@needs_pacs
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_while_waiting_removes_the_temporary_folder(tmp_path: Path, points_csv: Path, sig) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "out"
    with SilentServer() as server:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from cmdeploy.cli import app; app()", "infer",
             "--input", f"dicomweb:http://127.0.0.1:{server.port}/dicom-web", "--study", STUDY,
             "--series", SERIES, "--points", str(points_csv), "--output", str(out), "--pacs-timeout", "120"],
            env={**os.environ, **ENV, "TMPDIR": str(tmp)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not (server.accepted and list(tmp.iterdir())):
                time.sleep(0.05)
            assert list(tmp.iterdir()), "the run never created its temporary folder"
            proc.send_signal(sig)
            output = proc.communicate(timeout=30)[0].decode()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, output
    assert "interrupted" in output and "Traceback" not in output
    assert list(tmp.iterdir()) == []
    assert _outputs(out) == []
