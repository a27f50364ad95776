"""The runtime stays importable and light without the ``[triton]`` extra: Triton modules load lazily."""

from __future__ import annotations

import subprocess
import sys


def test_triton_modules_import_without_pytriton_or_tritonclient():
    code = (
        "import sys\n"
        "sys.modules['pytriton'] = None\n"  # make any import of them fail, as without the extra
        "sys.modules['tritonclient'] = None\n"
        "import cmdeploy, cmdeploy.cli, cmdeploy.triton_server, cmdeploy.backends.triton\n"
        "from cmdeploy.backends.triton import TritonRunner\n"
        "from cmdeploy.errors import InputError\n"
        "try:\n"
        "    TritonRunner('127.0.0.1:1')\n"
        "except InputError as exc:\n"
        "    print('refused:', exc)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "refused: a Triton server needs tritonclient: pip install 'cmdeploy[triton]'" in res.stdout
