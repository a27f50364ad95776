"""Servers for the PACS tests: a real Orthanc (Debian packages ``orthanc`` + ``orthanc-dicomweb``),
a socket server that accepts connections and never answers (a slow PACS), a free port nobody listens
on (a PACS that is down), and a CT series written from pydicom's ``CT_small.dcm``.

Orthanc runs from a config written here: free HTTP and DICOM ports, storage and index in a temporary
folder, the DICOMweb plugin, no remote access, no authentication, ``DicomCheckCalledAet`` on (a wrong
called AE title is rejected) and our test AE in ``DicomModalities`` (so it may C-GET).
"""

from __future__ import annotations

import copy
import glob
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CALLING_AET = "CMDEPLOYTEST"
ORTHANC_AET = "ORTHANC"
PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so*",
)
# Orthanc refuses STOW-RS (HTTP 403) when this Lua filter is loaded: a PACS that rejects the SEG
REJECT_STOW_LUA = """
function IncomingHttpRequestFilter(method, uri, ip, username, httpHeaders)
  if method == 'POST' and string.find(uri, '/dicom-web/', 1, true) == 1 then return false end
  return true
end
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or next(iter(glob.glob("/usr/sbin/Orthanc")), None)


def dicomweb_plugin() -> str | None:
    for pattern in PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def orthanc_missing_reason() -> str | None:
    """Why Orthanc cannot run here (None when it can)."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


@dataclass
class Orthanc:
    """A running Orthanc: REST at ``http``, DICOMweb at ``dicomweb``, DICOM at ``dimse``."""

    http_port: int
    dicom_port: int
    folder: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"dicomweb:{self.http}/dicom-web"

    def dimse(self, aet: str = ORTHANC_AET) -> str:
        return f"dimse:{aet}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body: bytes | dict) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.http + path, data=data, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def upload(self, files: list[Path]) -> None:
        for f in files:
            self.post("/instances", f.read_bytes())

    def find(self, level: str, **query: str) -> list[str]:
        """Orthanc ids of the resources at ``level`` whose main tags match ``query``."""
        return self.post("/tools/find", {"Level": level, "Query": query})

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_orthanc(folder: Path, *, lua: str | None = None, **config: Any) -> Orthanc:
    """Write a config into ``folder``, start Orthanc, wait for ``GET /system`` (30 s at most)."""
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    cfg: dict[str, Any] = {
        "Name": "cmdeploy-test",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AET,
        "DicomCheckCalledAet": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "Plugins": [dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {
            "cmdeploy": {
                "AET": CALLING_AET, "Host": "127.0.0.1", "Port": free_port(),
                "AllowEcho": True, "AllowFind": True, "AllowGet": True, "AllowMove": False,
                "AllowStore": True,
            }
        },
        "DicomScpTimeout": 30,
        "StableAge": 1,
        "SaveJobs": False,
    }
    if lua is not None:
        (folder / "filter.lua").write_text(lua)
        cfg["LuaScripts"] = [str(folder / "filter.lua")]
    cfg.update(config)
    (folder / "orthanc.json").write_text(json.dumps(cfg, indent=1))
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [orthanc_binary(), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
        cwd=folder,
    )
    server = Orthanc(http_port, dicom_port, folder, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({proc.returncode}); see {folder / 'orthanc.log'}")
        try:
            server.get("/system")
            return server
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer GET /system within 30 s; see {folder / 'orthanc.log'}")


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (a PACS that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            self._conns.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for c in self._conns:
            c.close()
        self.sock.close()

    def __enter__(self) -> SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_ct_series(
    folder: Path, num_slices: int = 20, *, spacing_mm: float = 5.0, transfer_syntax: str | None = None
) -> tuple[str, str, list[Path]]:
    """Write ``num_slices`` CT slices made from pydicom's CT_small.dcm (128 x 128, real CT) as one
    new series (fresh study/series/instance UIDs, positions ``spacing_mm`` apart), compressed to
    ``transfer_syntax`` if given (e.g. JPEG 2000 Lossless, needs pylibjpeg-openjpeg); returns
    (study UID, series UID, files in slice order)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    files = []
    z0 = float(src.ImagePositionPatient[2])
    for k in range(num_slices):
        ds = copy.deepcopy(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.ImagePositionPatient = [float(src.ImagePositionPatient[0]), float(src.ImagePositionPatient[1]),
                                   z0 + spacing_mm * k]
        ds.InstanceNumber = k + 1
        if transfer_syntax is not None:
            ds.compress(transfer_syntax)
        path = folder / f"ct_{k:03d}.dcm"
        ds.save_as(path)
        files.append(path)
    return study, series, files
