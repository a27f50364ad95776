"""Helpers for the ``cmdeploy serve`` tests: a multi-slice DICOM series from pydicom's CT slice,
and a real uvicorn server on a free localhost port (in a thread, always stopped)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

# the vertebral body of CT_small.dcm (examples/ct_small_points.csv): left, right, top, bottom (x, y)
VERTEBRA = np.array([[41, 37], [79, 36], [59, 6], [64, 43]], dtype=np.float32)
SHIFT_PX = 1  # slice i is CT_small rolled i * SHIFT_PX columns to the right


def write_ct_series(folder: Path, n: int = 5) -> Path:
    """``n`` axial slices (2.5 mm apart) made from pydicom's real ``CT_small.dcm``, slice i rolled
    ``i`` columns right, one new SeriesInstanceUID; returns ``folder``."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pixels = src.pixel_array
    series_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    z0 = float(src.ImagePositionPatient[2])
    for i in range(n):
        ds = src.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [*src.ImagePositionPatient[:2], z0 + 2.5 * i]
        ds.SliceLocation = z0 + 2.5 * i
        ds.PixelData = np.roll(pixels, i * SHIFT_PX, axis=1).astype(pixels.dtype).tobytes()
        ds.save_as(folder / f"slice{i:03d}.dcm")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on 127.0.0.1:<free port> in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def call(
    url: str,
    method: str = "GET",
    body: Any = None,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request -> (status, parsed JSON or bytes)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            status, payload, ctype = res.status, res.read(), res.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, payload, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(payload)
    return status, payload


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def chromium_driver(width: int = 1600, height: int = 1000) -> Any:
    """Headless Chromium (Debian's package) driven by Selenium through chromium-driver, with a
    ``width`` x ``height`` CSS-pixel viewport at device scale 1; None when either is missing."""
    import shutil

    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    browser = next((p for p in CHROMIUM if Path(p).is_file()), None)
    driver_path = next((p for p in CHROMEDRIVER if Path(p).is_file()), None) or shutil.which("chromedriver")
    if browser is None or driver_path is None:
        return None
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        f"--window-size={width},{height + 200}",
        "--force-device-scale-factor=1",
        "--disable-extensions",
        "--no-first-run",
        "--lang=en-US",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
    )
    return driver


def wait_for(driver: Any, script: str, timeout: float = 30.0) -> Any:
    """Poll ``return <script>`` in the page until it is truthy; its value."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"page never satisfied: {script}")


def click_image_point(driver: Any, x: float, y: float, button: str = "left") -> None:
    """A real mouse click (pointer events) at image pixel (x, y) of the page's slice view."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.mouse_button import MouseButton

    cx, cy = driver.execute_script(f"return window.cmdeploy.imageToClient({x}, {y})")
    ab = ActionBuilder(driver)
    ab.pointer_action.move_to_location(int(round(cx)), int(round(cy)))
    ab.pointer_action.click(button=MouseButton.LEFT if button == "left" else MouseButton.RIGHT)
    ab.perform()
