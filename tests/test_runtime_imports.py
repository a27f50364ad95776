"""The runtime's import boundary: loading the default model pulls in no tooling dependency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = (
    "onnx", "scipy", "matplotlib", "torch", "highdicom",  # tooling
    "fastapi", "uvicorn", "pytriton", "tritonclient", "dicomweb_client", "pynetdicom",  # extras
)


def test_segmenter_load_imports_no_tooling() -> None:
    """``import cmdeploy; cmdeploy.Segmenter.load()`` imports none of onnx, scipy, matplotlib,
    torch, highdicom, nor the evaluation/training tooling. Read from ``-X importtime`` plus the
    final ``sys.modules`` (importtime does not report modules loaded by ``importlib.import_module``,
    which ``cmdeploy``'s lazy attributes use)."""
    code = "import sys, cmdeploy; cmdeploy.Segmenter.load(); print('\\n'.join(sys.modules))"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # lines look like "import time:       123 |        456 |     package.module"
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    } | set(proc.stdout.split())
    assert "cmdeploy.segmenter" in modules and "onnxruntime" in modules  # the parse found imports
    tops = {m.split(".")[0] for m in modules}
    assert not tops & set(FORBIDDEN), sorted(tops & set(FORBIDDEN))
    tooling = sorted(m for m in modules if m.startswith(("cmdeploy.evaluation", "cmdeploy.train",
                                                         "cmdeploy.export", "cmdeploy.calibration")))
    assert not tooling, tooling
