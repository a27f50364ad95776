"""``cmdeploy triton`` on a REAL Triton server (PyTriton's bundled tritonserver, CPU) and the Triton
client path (``cmdeploy infer --triton``, :class:`cmdeploy.backends.triton.TritonRunner`).

The server runs as a ``cmdeploy triton`` subprocess on free localhost ports. Skipped only when the
``[triton]`` extra is missing; CI sets ``CMDEPLOY_REQUIRE_TRITON=1`` so a missing extra fails there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from cmdeploy import Segmenter
from cmdeploy.backends.base import Runner
from cmdeploy.cli import app
from cmdeploy.errors import InputError, ModelError
from cmdeploy.models import default_model_path

if not os.environ.get("CMDEPLOY_REQUIRE_TRITON"):
    pytest.importorskip("pytriton", reason="needs the [triton] extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.grpc", reason="needs the [triton] extra (tritonclient)")

from cmdeploy.backends.triton import TritonRunner, connect_segmenter, parse_url  # noqa: E402
from cmdeploy.pipeline import IncompleteRunError, run_pipeline  # noqa: E402
from cmdeploy.points_csv import read_points_csv  # noqa: E402

MODEL = default_model_path().with_name("cmdeploy-default.int8.onnx")
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


# --------------------------------------------------------------------------- server fixtures


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """A ``cmdeploy triton`` subprocess (its own process group) on free ports."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.log = tmp / f"triton-{self.http}.log"
        cmd = [
            sys.executable,
            "-c",
            "from cmdeploy.cli import app; app()",
            "triton",
            "--model",
            str(MODEL),
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
            *extra,
        ]
        env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}  # the command sets it
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cmdeploy triton exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            if self.ready():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"cmdeploy triton not ready after 120 s:\n{self.log.read_text()[-3000:]}")

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc}"

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.http}/v2/models/cmdeploy/ready"
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            return r.read().decode()

    def crash(self) -> None:
        """SIGKILL the ``tritonserver`` process under ``cmdeploy triton`` (a crash, not a stop)."""
        victims = []
        for child in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"tritonserver" in cmdline.split(b"\0")[0]:
                    victims.append(int(pid))
        assert victims, "no tritonserver child found"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a clean stop), SIGKILL to the process group if it hangs; returns the exit code."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # leftovers of a crashed tritonserver (its Python backend stub outlives it)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("triton"), "--max-queue-delay-us", "20000")
    yield srv
    code = srv.stop()
    assert code == 0, f"server did not stop cleanly ({code}):\n{srv.log.read_text()[-3000:]}"
    assert "server stopped" in srv.log.read_text()


@pytest.fixture(scope="module")
def local() -> Segmenter:
    return Segmenter.load(MODEL, threads=1)


def _objects(seed: int, n: int) -> tuple[list[np.ndarray], np.ndarray]:
    """n (slice, points) pairs on random 'CT' slices of two shapes (an organ-like disc in noise)."""
    rng = np.random.default_rng(seed)
    slices, pts = [], []
    for _ in range(n):
        h, w = (96, 128) if rng.random() < 0.5 else (120, 100)
        yy, xx = np.mgrid[:h, :w]
        cy, cx, r = rng.uniform(40, 60), rng.uniform(40, 60), rng.uniform(12, 25)
        s = rng.normal(-100, 60, (h, w)) + 200 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r)
        slices.append(np.round(s).astype(np.float32))
        pts.append([[cx - r, cy], [cx + r, cy], [cx, cy - r], [cx, cy + r]])
    return slices, np.asarray(pts, np.float32)


# --------------------------------------------------------------------------- tests without a server


def test_parse_url():
    assert parse_url("localhost:8000") == ("http", "localhost:8000")
    assert parse_url("http://10.0.0.5:8000/") == ("http", "10.0.0.5:8000")
    assert parse_url("grpc://node-3:8001") == ("grpc", "node-3:8001")
    for bad in ("localhost", "grpc://host", "host:port", "http://h:80/v2", "h:70000"):
        with pytest.raises(InputError, match="HOST:PORT"):
            parse_url(bad)


def test_stub_library_env_puts_libdir_first():
    import sysconfig

    from cmdeploy.triton_server import stub_library_env

    libdir = sysconfig.get_config_var("LIBDIR")
    env = stub_library_env({"LD_LIBRARY_PATH": f"/x:{libdir}", "A": "1"})
    assert env["A"] == "1"
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        assert env["LD_LIBRARY_PATH"] == f"{libdir}:/x"
        assert stub_library_env({})["LD_LIBRARY_PATH"] == libdir
    else:
        assert env["LD_LIBRARY_PATH"] == f"/x:{libdir}"


def test_infer_function_batches_requests_through_the_segmenter(local):
    """The server's callable: several requests -> one predict_batch, outputs as asked, per request."""
    from cmdeploy.triton_server import InferFunction

    class Req(dict):
        """Like pytriton's Request: a mapping of inputs plus ``requested_output_names``."""

        def __init__(self, data, wanted):
            super().__init__(data)
            self.requested_output_names = wanted

    slices, pts = _objects(1, 3)
    fn = InferFunction(local)
    reqs = [
        Req({"slices": np.stack(slices[:1]), "points": pts[:1]}, ["masks"]),
        Req({"slices": np.stack([slices[1]] * 2), "points": np.stack([pts[1]] * 2)}, None),
    ]
    res = fn(reqs)
    assert fn.calls == 1 and len(res) == 2
    assert set(res[0]) == {"masks"} and set(res[1]) == {"masks", "probabilities"}
    np.testing.assert_array_equal(res[0]["masks"][0], local.predict(slices[0], pts[0]))
    np.testing.assert_array_equal(
        res[1]["probabilities"][1], local.predict(slices[1], pts[1], return_probabilities=True)
    )
    with pytest.raises(InputError, match="same B"):
        fn([Req({"slices": np.stack(slices[:1]), "points": pts[:2]}, None)])
    # masks come from Segmenter.to_mask, so a spec's post-processing applies as in predict
    from dataclasses import replace

    clicked = Segmenter(
        local._runner, replace(local.spec, postprocess="clicked"), model_path=MODEL, backend="onnxruntime"
    )
    res = InferFunction(clicked)(
        [Req({"slices": s[None], "points": p[None]}, ["masks"]) for s, p in zip(slices, pts, strict=True)]
    )
    for k in range(3):
        np.testing.assert_array_equal(res[k]["masks"][0], clicked.predict(slices[k], pts[k]))


def test_server_not_running(tmp_path):
    (port,) = _free_ports(1)
    for url in (f"127.0.0.1:{port}", f"grpc://127.0.0.1:{port}"):
        with pytest.raises(ModelError, match="cannot reach the Triton server"):
            connect_segmenter(url, timeout_s=5)
    csv = tmp_path / "p.csv"
    csv.write_text(
        "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        "0,aorta,73,5,107,5,89,0,90,22\n"
    )
    out = tmp_path / "out"
    res = CliRunner().invoke(
        app,
        ["infer", "-i", str(CT_SMALL), "-p", str(csv), "-o", str(out), "--triton", f"127.0.0.1:{port}"],
        env=ENV,
    )
    assert res.exit_code == 3, res.output
    assert "cannot reach the Triton server" in res.output
    assert not out.exists() or not any(out.rglob("*"))
    res = CliRunner().invoke(
        app, ["infer", "-i", str(CT_SMALL), "-p", str(csv), "-o", str(out), "--triton", "nohostport"], env=ENV
    )
    assert res.exit_code == 2 and "HOST:PORT" in res.output


def test_triton_command_refuses_bad_options():
    res = CliRunner().invoke(app, ["triton", "--http-port", "9000", "--grpc-port", "9000"], env=ENV)
    assert res.exit_code == 2 and "must differ" in res.output
    res = CliRunner().invoke(app, ["triton", "--preferred-batch-sizes", "4,64"], env=ENV)
    assert res.exit_code == 2 and "1..16" in res.output


# --------------------------------------------------------------------------- the real server


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_eight_concurrent_clients_get_exactly_the_local_masks(server, local, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    errors: list[BaseException] = []
    checked = []

    def client(k: int) -> None:
        try:
            seg = connect_segmenter(url, batch_size=3)
            slices, pts = _objects(100 + k, 7)
            got = seg.predict_batch(slices, pts)  # requests of 3, 3 and 1 objects (grouped by shape)
            for s, p, m in zip(slices, pts, got, strict=True):
                want = local.predict(s, p)
                assert m.dtype == bool and want.any()
                np.testing.assert_array_equal(m, want)
            checked.append(len(got))
            seg._runner.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    assert checked == [7] * 8


def test_dynamic_batching_merges_requests_and_metrics_count_them(server):
    """After the concurrent clients: Triton ran fewer model executions than it got requests."""
    text = server.metrics_text()

    def metric(name: str) -> float:
        m = re.search(rf'^{name}{{model="cmdeploy",version="1"}} (\S+)$', text, re.M)
        assert m, f"{name} missing from /metrics"
        return float(m.group(1))

    requests = metric("nv_inference_request_success")
    executions = metric("nv_inference_exec_count")
    assert requests >= 2 * 8 * 3  # at least the concurrent test's requests
    assert executions < requests, (executions, requests)


def test_masks_output_for_a_plain_tritonclient(server, local):
    """A raw tritonclient request (no cmdeploy client) gets the same masks via the `masks` output."""
    import tritonclient.http as th

    slices, pts = _objects(7, 2)
    client = th.InferenceServerClient(server.http_url)
    a = th.InferInput("slices", [2, *slices[0].shape], "FP32")
    a.set_data_from_numpy(np.stack([slices[0]] * 2))
    b = th.InferInput("points", [2, 4, 2], "FP32")
    b.set_data_from_numpy(np.stack([pts[0], pts[0]]))
    res = client.infer("cmdeploy", [a, b], outputs=[th.InferRequestedOutput("masks")])
    masks = res.as_numpy("masks")
    assert masks.dtype == bool and masks.shape == (2, *slices[0].shape)
    assert res.as_numpy("probabilities") is None  # not asked for, not sent
    np.testing.assert_array_equal(masks[1], local.predict(slices[0], pts[0]))


def test_wrong_shapes_get_a_clear_error_and_the_server_keeps_serving(server, local):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    client = tg.InferenceServerClient(server.grpc_url[len("grpc://") :])
    slices, pts = _objects(3, 1)

    def send(s: np.ndarray, p: np.ndarray) -> str:
        a = tg.InferInput("slices", list(s.shape), "FP32")
        a.set_data_from_numpy(s)
        b = tg.InferInput("points", list(p.shape), "FP32")
        b.set_data_from_numpy(p)
        with pytest.raises(InferenceServerException) as info:
            client.infer("cmdeploy", [a, b])
        return str(info.value)

    s1 = np.stack(slices[:1])
    msg = send(s1, np.zeros((1, 3, 2), np.float32))  # 3 points instead of 4
    assert "points" in msg and "[1,3,2]" in msg.replace(" ", "")
    msg = send(s1[0], pts)  # slices without a batch axis
    assert "slices" in msg
    msg = send(np.stack([slices[0]] * 2), pts)  # 2 slices, 1 point set
    assert "batch" in msg.lower() or "same B" in msg
    bad = pts.copy()
    bad[0, 1, 0] = 500  # right point far outside the slice
    msg = send(s1, bad)
    assert "outside" in msg
    # still serving, and still right
    seg = connect_segmenter(server.grpc_url)
    np.testing.assert_array_equal(seg.predict(slices[0], pts[0]), local.predict(slices[0], pts[0]))


def test_client_timeout(server):
    slices, pts = _objects(5, 16)
    for url in (server.http_url, server.grpc_url):
        runner = TritonRunner(url, timeout_s=0.002)
        with pytest.raises(ModelError, match=r"failed a request of 16 object\(s\)") as info:
            runner.run({"slices": np.stack([slices[0]] * 16), "points": np.stack([pts[0]] * 16)})
        assert re.search("time|deadline", str(info.value), re.I), str(info.value)
    assert server.ready()


def test_infer_cli_over_triton_writes_what_a_local_run_writes(server, tmp_path):
    uid = pydicom.dcmread(CT_SMALL, stop_before_pixels=True).SOPInstanceUID
    csv = tmp_path / "points.csv"
    csv.write_text(
        "slice_index,sop_instance_uid,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        "0,,liver,30,60,70,62,50,35,51,85\n"
        f",{uid},liver#2,75,20,110,22,92,8,93,40\n"
        "0,,spleen,60,70,100,72,80,55,81,100\n"
    )
    runs = {}
    for name, extra in (
        ("local", ["-m", str(MODEL), "--threads", "1"]),
        ("http", ["--triton", server.http_url]),
        ("grpc", ["--triton", server.grpc_url]),
    ):
        out = tmp_path / name
        res = CliRunner().invoke(
            app,
            [
                "infer",
                "-i",
                str(CT_SMALL),
                "-p",
                str(csv),
                "-o",
                str(out),
                "--format",
                "png",
                "--batch-size",
                "2",
                *extra,
            ],
            env=ENV,
        )
        assert res.exit_code == 0, res.output
        runs[name] = out
    local_report = json.loads((runs["local"] / "report.json").read_text())
    for name in ("http", "grpc"):
        out = runs[name]
        assert sorted(p.name for p in out.rglob("*")) == sorted(p.name for p in runs["local"].rglob("*"))
        for png in (runs["local"] / "overlays").iterdir():
            assert (out / "overlays" / png.name).read_bytes() == png.read_bytes()
        report = json.loads((out / "report.json").read_text())
        assert report["backend"].startswith("triton (")
        assert report["model"]["sha256"] == local_report["model"]["sha256"]
        assert report["objects"] == local_report["objects"]
        assert report["extra"]["rows"] == local_report["extra"]["rows"]


def test_int16_wire_then_server_stopped_mid_run(tmp_path, monkeypatch, local):
    """A server taking int16 slices gives the same masks (whole-HU slices; others are refused).
    Then it goes away after the first request of a run: ``cmdeploy infer --triton`` exits 3,
    names the objects (CSV lines) that were not done and writes nothing."""
    srv = Server(tmp_path, "--max-queue-delay-us", "0", "--slice-dtype", "int16")
    try:
        seg = connect_segmenter(srv.http_url)
        assert seg._runner.slice_dtype == np.int16
        assert isinstance(seg._runner, Runner) and seg._runner.batch_range == (1, 16)
        slices, pts = _objects(11, 2)
        for s, p, m in zip(slices, pts, seg.predict_batch(slices, pts), strict=True):
            np.testing.assert_array_equal(m, local.predict(s, p))
        with pytest.raises(InputError, match="int16"):
            seg.predict(slices[0] + 0.25, pts[0])

        csv = tmp_path / "points.csv"
        csv.write_text(
            "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
            "0,aorta,73,5,107,5,89,0,90,22\n"
            "0,vertebra,41,37,79,36,59,6,64,43\n"
            "0,liver,30,60,70,62,50,35,51,85\n"
        )
        calls = []
        real_run = TritonRunner.run

        def run_then_stop(self, feeds):
            calls.append(len(feeds["points"]))
            if len(calls) == 2:  # the server crashes between the first and the second request
                srv.crash()
            return real_run(self, feeds)

        monkeypatch.setattr(TritonRunner, "run", run_then_stop)
        out = tmp_path / "out"
        res = CliRunner().invoke(
            app,
            [
                "infer",
                "-i",
                str(CT_SMALL),
                "-p",
                str(csv),
                "-o",
                str(out),
                "--format",
                "png",
                "--batch-size",
                "1",
                "--triton",
                srv.grpc_url,
            ],
            env=ENV,
        )
        assert res.exit_code == 3, res.output
        assert calls == [1, 1]
        flat = " ".join(res.output.split())
        assert "2 of 3 object(s) not done (CSV lines 3, 4)" in flat, res.output
        assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()], "partial outputs written"
        # and `cmdeploy triton` notices that its server died: exit 3 with the reason
        assert srv.proc.wait(timeout=60) == 3
        assert "stopped without being asked" in srv.log.read_text()
        deadline = time.monotonic() + 15  # the stubs outlive a crashed tritonserver unless killed
        while True:
            left = [st.parent.name for st in Path("/proc").glob("[0-9]*/stat") if _pgrp(st) == srv.proc.pid]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert not left, f"processes left behind by the crashed server: {left}"
    finally:
        srv.stop()


def _pgrp(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def test_pipeline_names_pending_rows(tmp_path, local):
    """IncompleteRunError lists exactly the rows without a result (no server needed: a failing runner)."""
    from cmdeploy.io import open_series

    series = open_series(CT_SMALL)
    csv = tmp_path / "p.csv"
    csv.write_text(
        "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        + "".join(f"0,a{k},73,5,107,5,89,0,90,22\n" for k in range(5))
    )
    rows = read_points_csv(csv, series)

    class Flaky:
        input_names, output_names = ["slices", "points"], ["probabilities"]
        input_shapes = {"slices": (None, None, None), "points": (None, 4, 2)}
        batch_range = (1, None)

        def close(self):
            pass

        def __init__(self):
            self.n = 0

        def run(self, feeds):
            self.n += 1
            if self.n > 2:
                raise ModelError("connection refused")
            return {"probabilities": np.zeros(np.shape(feeds["slices"]), np.float32)}

    seg = Segmenter(Flaky(), local.spec, model_path=MODEL, backend="flaky", batch_size=2)
    with pytest.raises(IncompleteRunError) as info:
        run_pipeline(seg, series, rows)
    assert info.value.pending == [4] and info.value.lines == [6] and info.value.total == 5
    assert "1 of 5 object(s) not done (CSV lines 6): connection refused" in str(info.value)


def test_gpu_check_scripts_compare_against_a_live_server(server, capsys):
    """The NGC-container check (examples/triton_gpu_check.sh) runs examples/triton_compare.py; the
    comparison itself is exercised here against the PyTriton server (same fused contract)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1] / "examples"
    assert subprocess.run(["bash", "-n", str(root / "triton_gpu_check.sh")]).returncode == 0
    spec = importlib.util.spec_from_file_location("triton_compare", root / "triton_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    code = mod.main(["--url", server.grpc_url, "--reference", str(MODEL), "--objects", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS: lowest Dice 1.000000" in out and out.count("max|dp| 0.00e+00") == 4
    (port,) = _free_ports(1)
    assert mod.main(["--url", f"127.0.0.1:{port}", "--reference", str(MODEL)]) == 3
