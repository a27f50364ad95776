"""CVAT's serverless interactor contract (what CVAT's DEXTR function answers), without FastAPI.

Request (JSON, as CVAT posts it to the function's root URL): ``image`` = base64 PNG or JPEG of the
frame, ``pos_points`` = ``[[x, y], ...]`` in click order (exactly four here: the extreme points,
any order; sorted by :func:`cmdeploy.guidance.sort_extreme_points`), optional ``neg_points``,
``obj_bbox`` and ``threshold`` (accepted and ignored: the model takes no negative clicks or boxes,
and its mask is the model's own, ``Segmenter.to_mask``: its threshold and post-processing, as
everywhere else). Answer: ``{"mask": (H, W) nested lists of 0/255, "points": [[x, y], ...] outer
contour}``.

**8-bit pixels are not Hounsfield units.** A CVAT frame is 8-bit (RGB or grey; colour is reduced
to luma, ITU-R 601 as Pillow's ``convert("L")``; a 16-bit grey PNG is read as ``HU + 1024``, the
runtime's PNG convention). Grey value ``v`` in 0..255 is mapped back to
``HU = lo + v * (hi - lo) / 255`` with the model's own CT window ``(lo, hi)`` (-200..250 HU for
the default model, a soft-tissue window). A frame exported with that window gives the model
the same input it sees from DICOM, up to 8-bit quantisation; a frame exported with another window
(lung, bone) gives it a wrong picture, and a model with ``extra_windows`` sees nothing outside
``(lo, hi)`` in them. Use DICOM (``cmdeploy serve --data``) whenever you can.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.guidance import sort_extreme_points
from cmdeploy.serve.masks import outer_contour

MAX_PIXELS = 8192 * 8192


def eight_bit_to_hu(grey: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 (H, W) grey values -> float32 HU on the window ``(lo, hi)``: ``lo + v (hi - lo) / 255``."""
    lo, hi = float(window[0]), float(window[1])
    return (lo + np.asarray(grey, np.float32) * np.float32((hi - lo) / 255.0)).astype(np.float32)


def decode_image(b64: str, window: tuple[float, float]) -> np.ndarray:
    """A CVAT ``image`` field -> float32 (H, W) HU (see the module docstring for the mapping)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(b64, validate=False)
        img = Image.open(io.BytesIO(raw))
        if img.width * img.height > MAX_PIXELS:
            raise InputError(f"image of {img.width} x {img.height} pixels is too large")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.asarray(img, dtype=np.float32) - np.float32(1024.0)
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError("image: not a base64-encoded PNG or JPEG") from None
    return eight_bit_to_hu(grey, window)


def parse_request(body: Any, window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Validate a CVAT request -> (HU slice, (4, 2) sorted points)."""
    if not isinstance(body, dict):
        raise InputError("request body must be a JSON object")
    if not isinstance(body.get("image"), str):
        raise InputError("'image' (base64 PNG/JPEG) is required")
    pos = body.get("pos_points")
    try:
        clicks = np.asarray(pos, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("'pos_points' must be a list of [x, y] pairs") from None
    if clicks.shape != (4, 2):
        raise InputError(
            "'pos_points' must hold exactly four [x, y] extreme points, "
            f"got {len(pos) if isinstance(pos, list) else 0}"
        )
    try:
        points = sort_extreme_points(clicks)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    return decode_image(body["image"], window), points


def cvat_response(mask: np.ndarray) -> dict[str, Any]:
    """``{"mask": 0/255 nested lists, "points": contour}`` of a bool (H, W) mask."""
    mask = np.asarray(mask, dtype=bool)
    return {"mask": (mask.astype(np.uint8) * 255).tolist(), "points": outer_contour(mask)}


def handle(segmenter: Any, body: Any) -> dict[str, Any]:
    """The whole contract for one request on a :class:`~cmdeploy.Segmenter` (used by the nuclio
    handler in ``examples/cvat/``; the server goes through its batcher instead)."""
    hu, points = parse_request(body, segmenter.spec.window)
    return cvat_response(segmenter.predict(hu, points))
