"""Plain-array CT readers: 16-bit PNG and NPY -> :class:`~cmdeploy.io.series.Series`.

* PNG (kind "png"): one 16-bit greyscale slice whose stored value is ``HU + 1024`` (0 -> -1024 HU,
  1024 -> 0 HU). 8-bit PNGs are refused (they hold windowed display values, not HU), and so are
  colour/alpha PNGs. Rows = y, columns = x. No spacing.
* NPY (kind "npy"): a real-valued (integer or float) array of HU, shape ``(H, W)`` (one slice) or
  ``(N, H, W)`` (slice k = ``arr[k]``), memory-mapped so only the slices asked for are read.
  Slices with NaN/inf are refused when read. No spacing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cmdeploy.errors import InputError
from cmdeploy.io.series import Series

PNG_HU_OFFSET = 1024.0
_PNG_16BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I"})


def read_png(path: str | Path) -> Series:
    """Open a 16-bit greyscale PNG (values = HU + 1024) as a one-slice Series."""
    from PIL import Image

    p = Path(path)
    try:
        with Image.open(p) as im:
            mode, (w, h) = im.mode, im.size
    except Exception as exc:
        raise InputError(f"'{p}': cannot read as PNG ({type(exc).__name__})") from None
    if mode in ("L", "1", "P", "LA"):
        raise InputError(
            f"'{p}': 8-bit PNG (mode {mode}); cmdeploy needs HU, stored as 16-bit greyscale PNG "
            "values HU + 1024 (or use .npy with HU floats)"
        )
    if mode not in _PNG_16BIT_MODES:
        raise InputError(f"'{p}': PNG mode {mode} is not 16-bit greyscale (values HU + 1024)")

    def loader(_k: int) -> np.ndarray:
        try:
            with Image.open(p) as im:
                arr = np.asarray(im)
        except Exception as exc:
            raise InputError(f"'{p}': cannot decode PNG ({type(exc).__name__})") from None
        return arr.astype(np.float32) - np.float32(PNG_HU_OFFSET)

    return Series(
        kind="png",
        path=p,
        num_slices=1,
        shape=(int(h), int(w)),
        spacing_xy_mm=None,
        slice_uids=(None,),
        loader=loader,
    )


def read_npy(path: str | Path) -> Series:
    """Open a .npy array of HU, (H, W) or (N, H, W), as a memory-mapped Series."""
    p = Path(path)
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise InputError(f"'{p}': cannot read as .npy ({type(exc).__name__}: {exc})") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"'{p}': expected one array in .npy format")
    if arr.dtype.kind not in "iuf" or arr.dtype.names is not None:
        raise InputError(f"'{p}': array dtype {arr.dtype} is not a real number type (HU)")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise InputError(
            f"'{p}': array shape {arr.shape} is not (H, W) or (N, H, W) with every size >= 1"
        )
    vol = arr

    def loader(k: int) -> np.ndarray:
        out = np.asarray(vol[k], dtype=np.float32)
        if not np.all(np.isfinite(out)):
            raise InputError(f"'{p}': slice {k} contains NaN or inf")
        return out

    return Series(
        kind="npy",
        path=p,
        num_slices=int(vol.shape[0]),
        shape=(int(vol.shape[1]), int(vol.shape[2])),
        spacing_xy_mm=None,
        slice_uids=(None,) * int(vol.shape[0]),
        loader=loader,
    )
