"""Benchmark: click-to-mask latency of ``cmdeploy serve`` over HTTP on a real 512 x 512 CT slice
(issue target: p50 <= 40 ms with the INT8 model on the 2-core build machine).

Usage::

    .venv/bin/python benchmarks/bench_serve.py [--model M.onnx --model M.int8.onnx] \
        [--input CT.dcm|CT.nii.gz] [--slice K] [--requests 60] [--clients 1,8] [--json out.json]

What it does, per model:

1. Starts ``cmdeploy serve --data <input>`` in a child process on a free localhost port (so the
   load generator does not share the server's interpreter), and waits until it answers.
2. Per client count: every client thread holds one keep-alive HTTP connection and posts
   ``POST /api/v1/series/{id}/segment`` with four clicks (a fixed structure, each click jittered
   by up to 2 px so no two requests are alike, in a shuffled order) back to back, ``--requests``
   times in all (after 5 untimed warm-up requests). Latency = wall time from sending the request to
   having parsed the JSON answer (mask RLE + contour), i.e. what the page waits for after the
   fourth click.
3. Reports p50 / p95 latency, requests/s, the server-side model time (p50) and the mean batch size
   the micro-batcher formed; and, side by side in the same run, ``Segmenter.predict`` in this
   process on the same slice and clicks (p50), so the HTTP serving overhead is
   ``HTTP p50 - predict p50`` measured under the same machine load.
4. ``--stub`` adds a row for the same server with an instant model (a stand-in returning the
   INT8 model's probabilities for these clicks, computed once): the pure serving cost (HTTP,
   validation, batcher hand-off, RLE, contour, JSON) without any model time.

Default input: pydicom's bundled ``J2K_pixelrep_mismatch.dcm``, a real 512 x 512 head CT
(JPEG 2000; needs the ``[dicom]`` extra's decoders); the clicks outline the left cerebellar
hemisphere (about 120 x 110 px).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "cmdeploy" / "models"
# left, right, top, bottom (x = column, y = row) of the left cerebellar hemisphere
POINTS = np.array([[140, 340], [250, 350], [200, 290], [215, 405]], dtype=np.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _InstantSegmenter:
    """A stand-in with ``predict_batch`` that returns fixed probabilities at once (``--stub``)."""

    batch_size = 8

    def __init__(self, probabilities: np.ndarray, spec, threshold: float) -> None:
        self.probabilities, self.spec, self.threshold = probabilities, spec, threshold

    def predict_batch(self, slices, points, *, return_probabilities=False):
        return [self.probabilities for _ in slices]

    def to_mask(self, probs, points, origin=(0, 0)):
        return probs > np.float32(self.threshold)


def _serve_stub(data: Path, model: Path, port: int) -> None:
    """Child-process entry of ``--stub``: the real app around :class:`_InstantSegmenter`."""
    import uvicorn

    from cmdeploy.io import open_series
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.serve.app import create_app
    from cmdeploy.serve.catalog import Catalog

    seg = Segmenter.load(model)
    probs = seg.predict(open_series(data).slice_hu(0), POINTS, return_probabilities=True)
    stub = _InstantSegmenter(probs, seg.spec, seg.threshold)
    app = create_app(Catalog(data), stub, Path(tempfile.mkdtemp()))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _start_server(
    data: Path, model: Path, port: int, threads: int | None, out: Path, stub: bool = False
) -> subprocess.Popen:
    cli = Path(sys.executable).parent / "cmdeploy"
    cmd = [str(cli), "serve", "--data", str(data), "--model", str(model)]
    cmd += ["--port", str(port), "--output", str(out)]
    if stub:
        cmd = [
            sys.executable,
            __file__,
            "--stub-child",
            str(port),
            "--input",
            str(data),
            "--model",
            str(model),
        ]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/api/v1/series")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def _client(port: int, sid: str, k: int, n: int, seed: int, out: list) -> None:
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(n):
        clicks = POINTS + rng.uniform(-2, 2, POINTS.shape)
        body = json.dumps({"slice_index": k, "points": clicks[rng.permutation(4)].round(2).tolist()})
        t0 = time.perf_counter()
        conn.request("POST", f"/api/v1/series/{sid}/segment", body, {"Content-Type": "application/json"})
        res = conn.getresponse()
        payload = json.loads(res.read())
        dt = time.perf_counter() - t0
        if res.status != 200:
            raise RuntimeError(f"segment failed: {payload}")
        out.append((dt * 1000.0, payload["model_ms"], payload["batch_size"], payload["area_px"]))


def run_load(port: int, sid: str, k: int, clients: int, requests: int) -> dict:
    _client(port, sid, k, 5, 999, [])  # warm-up
    per = max(requests // clients, 1)
    results: list[list] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=_client, args=(port, sid, k, per, i, results[i])) for i in range(clients)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rows = np.array([r for res in results for r in res])
    lat = rows[:, 0]
    return {
        "clients": clients,
        "requests": int(len(rows)),
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "requests_per_s": float(len(rows) / wall),
        "model_p50_ms": float(np.percentile(rows[:, 1], 50)),
        "mean_batch": float(rows[:, 2].mean()),
        "mask_px": int(np.median(rows[:, 3])),
    }


def predict_p50(model: Path, hu: np.ndarray, threads: int | None, n: int = 30) -> float:
    """In-process ``Segmenter.predict`` p50 (ms) on the same clicks, after 3 warm-up calls."""
    from cmdeploy.segmenter import Segmenter

    seg = Segmenter.load(model, threads=threads)
    rng = np.random.default_rng(0)
    times = []
    for i in range(n + 3):
        pts = POINTS + rng.uniform(-2, 2, POINTS.shape)
        t0 = time.perf_counter()
        seg.predict(hu, pts)
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.percentile(times, 50))


def main() -> None:
    ap = argparse.ArgumentParser(description="click-to-mask latency of cmdeploy serve over HTTP")
    ap.add_argument(
        "--model",
        type=Path,
        action="append",
        help="model(s) to compare (default: the shipped FP32 and INT8 models)",
    )
    ap.add_argument("--input", type=Path, default=None, help="CT file (DICOM or NIfTI); default: see --help")
    ap.add_argument("--slice", type=int, default=0, help="slice index in --input")
    ap.add_argument("--requests", type=int, default=60, help="timed requests per configuration")
    ap.add_argument("--clients", default="1,8", help="comma-separated concurrent client counts")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads of the server")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--stub", action="store_true", help="also time the server with an instant model")
    ap.add_argument("--stub-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stub_child is not None:
        return _serve_stub(args.input, args.model[0], args.stub_child)

    if args.input is None:
        from pydicom.data import get_testdata_file

        args.input = Path(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    models = args.model or [MODELS / "cmdeploy-default.onnx", MODELS / "cmdeploy-default.int8.onnx"]
    client_counts = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()[0]
    print(f"input {args.input.name} slice {args.slice}; {os.cpu_count()} CPUs, load average {load:.1f}")
    from cmdeploy.io import open_series

    hu = open_series(args.input).slice_hu(args.slice)
    results = []
    baseline = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            baseline[model.name] = predict_p50(model, hu, args.threads)
            port = _free_port()
            proc = _start_server(args.input, model, port, args.threads, Path(tmp) / "out")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/api/v1/series")
                series = json.loads(conn.getresponse().read())
                sid, shape = series[0]["id"], (series[0]["rows"], series[0]["columns"])
                for c in client_counts:
                    r = run_load(port, sid, args.slice, c, args.requests)
                    r.update(
                        model=model.name, slice=f"{shape[0]}x{shape[1]}", predict_p50_ms=baseline[model.name]
                    )
                    results.append(r)
            finally:
                proc.terminate()
                proc.wait(timeout=20)
        if args.stub:
            port = _free_port()
            int8 = next((m for m in models if "int8" in m.name), models[-1])
            proc = _start_server(args.input, int8, port, args.threads, Path(tmp) / "out", stub=True)
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", "/api/v1/series")
                sid = json.loads(conn.getresponse().read())[0]["id"]
                for c in client_counts:
                    r = run_load(port, sid, args.slice, c, args.requests)
                    r.update(model="instant stand-in", slice=results[0]["slice"], predict_p50_ms=0.0)
                    results.append(r)
            finally:
                proc.terminate()
                proc.wait(timeout=20)

    print(
        "| model | clients | requests | HTTP p50 ms | HTTP p95 ms | requests/s | server model p50 ms "
        "| mean batch | in-process predict p50 ms |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['model']} | {r['clients']} | {r['requests']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['requests_per_s']:.1f} | {r['model_p50_ms']:.1f} | {r['mean_batch']:.2f} | "
            f"{r['predict_p50_ms']:.1f} |"
        )
    print(
        f"mask {results[0]['mask_px']} px on a {results[0]['slice']} slice; load average at the end "
        f"{os.getloadavg()[0]:.1f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"load_average_start": load, "results": results}, indent=2))


if __name__ == "__main__":
    main()
