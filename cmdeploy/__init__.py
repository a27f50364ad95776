"""cmdeploy: class-agnostic CT segmentation from four extreme points.

    >>> from cmdeploy import Segmenter
    >>> mask = Segmenter.load().predict(slice_hu, points)  # (H, W) HU, (4, 2) left/right/top/bottom

The re-exported names are imported on first use (PEP 562), so ``import cmdeploy`` (and
``cmdeploy --help``) loads neither NumPy nor onnxruntime.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Segmenter": "cmdeploy.segmenter",
    "ModelSpec": "cmdeploy.spec",
    "confidence_map": "cmdeploy.guidance",
    "gaussian_heatmap": "cmdeploy.guidance",
    "extreme_points": "cmdeploy.guidance",
    "sort_extreme_points": "cmdeploy.guidance",
}

__all__ = [
    "ModelSpec",
    "Segmenter",
    "__version__",
    "confidence_map",
    "extreme_points",
    "gaussian_heatmap",
    "sort_extreme_points",
]

if TYPE_CHECKING:
    from cmdeploy.guidance import confidence_map, extreme_points, gaussian_heatmap, sort_extreme_points
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.spec import ModelSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cmdeploy' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
