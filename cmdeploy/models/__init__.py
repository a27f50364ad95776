"""The model shipped inside the package: ``cmdeploy/models/cmdeploy-default.onnx``.

The file is produced by training + export (``cmdeploy export``) and copied here for release; a
source checkout without it still works with an explicit ``--model``/``Segmenter.load(path)``.
"""

from __future__ import annotations

from pathlib import Path

from cmdeploy.errors import ModelError

DEFAULT_MODEL_NAME = "cmdeploy-default.onnx"


def default_model_path() -> Path:
    """Path of the embedded default ONNX model; :class:`ModelError` when it is not installed."""
    path = Path(__file__).resolve().parent / DEFAULT_MODEL_NAME
    if not path.is_file():
        raise ModelError(
            f"no embedded default model: {DEFAULT_MODEL_NAME} is not installed in {path.parent}. "
            "Pass a model explicitly (--model PATH / Segmenter.load(PATH)) or export one with "
            "'cmdeploy export' and copy it there."
        )
    return path
