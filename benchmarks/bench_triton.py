"""Local runtime vs a real Triton server (``cmdeploy triton``), side by side in one run.

    python benchmarks/bench_triton.py --model M.int8.onnx --model M.onnx [--seconds 8] [--json out.json]

For each model, in interleaved rounds (medians reported): the local runtime
(``Segmenter.predict_batch`` of 16 and of 1 object, masks out) and a ``cmdeploy triton`` server on
free localhost ports with N concurrent clients (threads, one tritonclient each) that send one object
(a 512 x 512 HU slice + 4 points) per request and ask for ``masks``; plus one client sending 16 objects
per request (what ``cmdeploy infer --triton`` does). Reports objects/s, p50/p95 latency per call
and Triton@N as a share of the local batch-16 throughput. Clients and server share the machine.
Because a shared machine's throughput swings with other load, it also reports CPU seconds per object
(this process, plus for Triton every process of the server's group: ``cmdeploy triton``,
``tritonserver``, the Python backend stubs) and the efficiency local-CPU/Triton-CPU per object.

``--sweep`` instead measures 16 clients for several batching settings (instances x threads x queue
delay) on the first model, to choose the server defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from cmdeploy import Segmenter


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """``cmdeploy triton`` in a subprocess (own process group); ``stop()`` ends it."""

    def __init__(self, model: Path, *args: str) -> None:
        self.http, self.grpc, self.metrics = _free_ports(3)
        self.log = Path(tempfile.mkstemp(prefix="bench-triton-", suffix=".log")[1])
        cmd = [
            sys.executable,
            "-c",
            "from cmdeploy.cli import app; app()",
            "triton",
            "--model",
            str(model),
            "--http-port",
            str(self.http),
            "--grpc-port",
            str(self.grpc),
            "--metrics-port",
            str(self.metrics),
            *args,
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.http}/v2/models/cmdeploy/ready"
        for _ in range(600):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("server not ready after 120 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # anything left in the group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.unlink(missing_ok=True)


def make_objects(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n (size, size) HU slices with an elliptic organ each and its extreme points (x, y)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    slices, pts = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(0.4, 0.6) * size, rng.uniform(0.4, 0.6) * size, rng.uniform(0.05, 0.15) * size
        s = rng.normal(-100, 40, (size, size)) + 150 * (
            ((yy - cy) / r) ** 2 + ((xx - cx) / (0.8 * r)) ** 2 < 1
        )
        slices.append(np.round(s).astype(np.float32))
        pts.append([[cx - 0.8 * r, cy], [cx + 0.8 * r, cy], [cx, cy - r], [cx, cy + r]])
    return np.stack(slices), np.asarray(pts, np.float32)


def cpu_self() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def cpu_group(pgid: int | None) -> float:
    """CPU seconds of every live process in process group ``pgid`` (the server: ``cmdeploy triton``,
    ``tritonserver`` and its Python backend stubs); 0 for None."""
    if pgid is None:
        return 0.0
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "pid (comm)": state ppid pgrp ... utime(11) stime(12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _stats(latencies: list[float], objects: int, wall: float, cpu: float | None = None) -> dict[str, float]:
    lat = np.asarray(latencies) * 1e3
    return {
        "objects_per_s": objects / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "calls": len(lat),
        "cpu_ms_per_object": None if cpu is None else 1e3 * cpu / objects,
    }


def bench_local(seg: Segmenter, slices: np.ndarray, pts: np.ndarray, seconds: float, batch: int) -> dict:
    """Back-to-back ``predict_batch`` calls of ``batch`` objects for ``seconds``."""
    seg.predict_batch(list(slices[:batch]), pts[:batch])  # warm-up
    lat, done, k = [], 0, 0
    c0 = cpu_self()
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        sel = [(k + j) % len(slices) for j in range(batch)]
        t0 = time.perf_counter()
        seg.predict_batch([slices[i] for i in sel], pts[sel])
        lat.append(time.perf_counter() - t0)
        done += batch
        k += batch
    return _stats(lat, done, time.perf_counter() - t_start, cpu_self() - c0)


def bench_triton(
    url: str,
    slices: np.ndarray,
    pts: np.ndarray,
    clients: int,
    per_request: int,
    seconds: float,
    output: str,
    server_pgid: int | None = None,
) -> dict:
    """``clients`` closed-loop clients (one thread and one gRPC connection each), ``per_request``
    objects per request, for ``seconds`` after a common start."""
    import tritonclient.grpc as tg

    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    window: dict[str, float] = {}

    def open_window() -> None:  # runs once, before any thread passes the barrier
        window["cpu"] = cpu_self() + cpu_group(server_pgid)
        window["start"] = time.perf_counter()
        window["stop"] = window["start"] + seconds

    start = threading.Barrier(clients + 1, action=open_window)

    def client(c: int) -> None:
        try:
            cl = tg.InferenceServerClient(url)
            sel = [(c * per_request + j) % len(slices) for j in range(per_request)]
            a = tg.InferInput("slices", [per_request, *slices.shape[1:]], "FP32")
            a.set_data_from_numpy(np.ascontiguousarray(slices[sel]))
            b = tg.InferInput("points", [per_request, 4, 2], "FP32")
            b.set_data_from_numpy(np.ascontiguousarray(pts[sel]))
            outs = [tg.InferRequestedOutput(output)]
            cl.infer("cmdeploy", [a, b], outputs=outs)  # warm-up
            start.wait()
            while True:  # at least one timed call per client
                t0 = time.perf_counter()
                res = cl.infer("cmdeploy", [a, b], outputs=outs)
                res.as_numpy(output)
                t1 = time.perf_counter()
                lat[c].append(t1 - t0)
                if t1 >= window["stop"]:
                    break
            cl.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    wall = time.perf_counter() - window.get("start", time.perf_counter())
    cpu = cpu_self() + cpu_group(server_pgid) - window.get("cpu", 0.0)
    if errors:
        raise errors[0]
    flat = [x for per in lat for x in per]
    return _stats(flat, len(flat) * per_request, wall, cpu if server_pgid else None)


def server_args(a: argparse.Namespace, instances: int, threads: int, delay: int) -> list[str]:
    return [
        "--instances",
        str(instances),
        "--threads",
        str(threads),
        "--max-queue-delay-us",
        str(delay),
        "--max-batch-size",
        "16",
        "--preferred-batch-sizes",
        a.preferred,
    ]


def run_models(a: argparse.Namespace, slices: np.ndarray, pts: np.ndarray) -> list[dict]:
    """Per model, ``a.rounds`` interleaved rounds of local batch 16 and every Triton setting (the
    server idles during the local runs); each Triton number is divided by the local batch-16
    throughput of its own round, and the rows give the medians over rounds."""
    rows = []
    for model in a.model:
        name = Path(model).name
        seg = Segmenter.load(model, threads=a.threads, batch_size=16)
        srv = Server(model, *server_args(a, a.instances, a.server_threads, a.delay_us))
        url = f"127.0.0.1:{srv.grpc}"
        setups = [("local, batch 16", None, 16), ("local, batch 1", None, 1)]
        setups += [(f"Triton, {n} client(s) x 1 object", n, 1) for n in a.clients]
        setups += [("Triton, 1 client x 16 objects", 1, 16)]
        results: dict[str, list[dict]] = {s[0]: [] for s in setups}
        try:
            for _ in range(a.rounds):
                ref = ref_cpu = None
                for label, clients, size in setups:
                    if clients is None:
                        r = bench_local(seg, slices, pts, a.seconds, size)
                    else:
                        r = bench_triton(url, slices, pts, clients, size, a.seconds, a.output, srv.proc.pid)
                    ref = ref or r["objects_per_s"]
                    ref_cpu = ref_cpu or r["cpu_ms_per_object"]
                    cpu_share = ref_cpu / r["cpu_ms_per_object"]
                    results[label].append({**r, "share": r["objects_per_s"] / ref, "cpu_share": cpu_share})
        finally:
            srv.stop()
        for label, runs in results.items():
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            if label == "local, batch 16":
                med["share"] = med["cpu_share"] = None
            rows.append({"model": name, "setup": label, **med, "rounds": [r["objects_per_s"] for r in runs]})
    return rows


def run_sweep(a: argparse.Namespace, slices: np.ndarray, pts: np.ndarray) -> list[dict]:
    """For each INSTANCESxTHREADSxDELAY setting: a server, the local batch-16 reference measured
    right before (server idle), then the most clients; the share is against that reference."""
    model = a.model[0]
    seg = Segmenter.load(model, threads=a.threads, batch_size=16)
    rows = []
    n = max(a.clients)
    for spec in a.sweep:
        instances, threads, delay = (int(v) for v in spec.split("x"))
        srv = Server(model, *server_args(a, instances, threads, delay))
        try:
            ref = bench_local(seg, slices, pts, a.seconds, 16)
            r = bench_triton(f"127.0.0.1:{srv.grpc}", slices, pts, n, 1, a.seconds, a.output, srv.proc.pid)
        finally:
            srv.stop()
        setup = f"{instances} instance(s) x {threads} thread(s), delay {delay} us, {n} clients"
        rows.append(
            {"model": Path(model).name, "setup": f"local batch 16 (before: {setup})", **ref, "share": None}
        )
        rows.append(
            {
                "model": Path(model).name,
                "setup": setup,
                **r,
                "share": r["objects_per_s"] / ref["objects_per_s"],
                "cpu_share": ref["cpu_ms_per_object"] / r["cpu_ms_per_object"],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--slice-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime threads of the local runtime")
    ap.add_argument("--instances", type=int, default=2, help="server model instances")
    ap.add_argument("--server-threads", type=int, default=1, help="onnxruntime threads per instance")
    ap.add_argument("--delay-us", type=int, default=2000)
    ap.add_argument("--preferred", default="16")
    ap.add_argument("--output", default="masks", choices=["masks", "probabilities"])
    ap.add_argument(
        "--sweep", nargs="*", help="INSTANCESxTHREADSxDELAY_US settings, e.g. 1x2x0 1x2x2000 2x1x2000"
    )
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (medians reported)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    a.clients = [int(c) for c in a.clients.split(",")]
    slices, pts = make_objects(32, a.slice_size)
    rows = run_sweep(a, slices, pts) if a.sweep else run_models(a, slices, pts)
    load = os.getloadavg()[0]
    print(
        f"\n{os.cpu_count()} CPU(s), load average {load:.1f} at the end; {a.slice_size} x {a.slice_size} "
        f"slices; output {a.output}; gRPC; local: {a.threads} thread(s); server: {a.instances} instance(s) x "
        f"{a.server_threads} thread(s), "
        f"delay {a.delay_us} us, preferred {a.preferred}\n"
    )
    print(
        "| model | setup | objects/s | p50 ms | p95 ms | objects/s vs local batch 16 | CPU ms/object "
        "| CPU efficiency vs local batch 16 |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        share = "" if r.get("share") is None else f"{100 * r['share']:.0f} %"
        cpu_share = "" if r.get("cpu_share") is None else f"{100 * r['cpu_share']:.0f} %"
        print(
            f"| {r['model']} | {r['setup']} | {r['objects_per_s']:.1f} | {r['p50_ms']:.1f} | "
            f"{r['p95_ms']:.1f} | {share} | {r['cpu_ms_per_object']:.1f} | {cpu_share} |"
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
