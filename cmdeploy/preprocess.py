"""Network inputs from (slice, extreme points) pairs and slice-space outputs from network logits.

The single implementation of the paper's preprocessing, used by training (``cmdeploy.train``),
export parity checks, INT8 calibration and the runtime:

1. crop + zoom the slice with :func:`cmdeploy.geometry.crop_transform` (bilinear, ``spec.pad_hu``
   outside the slice),
2. window to ``spec.window`` HU (and each of ``spec.extra_windows``, one image channel each), scale
   to [0, 1], then ``(v - norm_mean) / norm_std``,
3. guidance channel(s) computed *in crop coordinates* from the transformed points,
4. stack as ``(C, S, S)`` float32 in the order of ``spec.channels``.

Points are (4, 2) left, right, top, bottom, each (x = column, y = row) in slice pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmdeploy.geometry import CropTransform, crop_image, crop_transforms, paste_back
from cmdeploy.guidance import confidence_map, gaussian_heatmap, validate_points
from cmdeploy.spec import ModelSpec


def window_normalize(
    hu: np.ndarray,
    spec: ModelSpec,
    *,
    window: tuple[float, float] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Window HU values to ``window`` (default ``spec.window``), scale to [0, 1], normalise; float32.

    ``out`` (float32, ``hu``'s shape; may be ``hu`` itself) receives the result when given.
    """
    lo, hi = spec.window if window is None else window
    v = np.clip(np.asarray(hu, dtype=np.float32), lo, hi, out=out)
    v -= np.float32(lo)
    v /= np.float32(hi - lo)
    v -= np.float32(spec.norm_mean)
    v /= np.float32(spec.norm_std)
    return v


def image_channels(crop_hu: np.ndarray, spec: ModelSpec, *, out: np.ndarray | None = None) -> np.ndarray:
    """Image channels (K, S, S) float32 of an (S, S) HU crop, one per window of ``spec.windows``.

    ``out`` (e.g. ``x[i, :K]`` of a network input) receives them when given; ``crop_hu`` may be
    ``out[0]`` itself (the extra windows are computed before channel 0 is overwritten).
    """
    k = spec.num_image_channels
    if out is None:
        out = np.empty((k,) + np.shape(crop_hu), dtype=np.float32)
    for j in range(k - 1, -1, -1):  # channel 0 last: crop_hu may be out[0]
        window_normalize(crop_hu, spec, window=spec.windows[j], out=out[j])
    return out


def guidance_channels(
    points_crop: np.ndarray, spec: ModelSpec, *, out: np.ndarray | None = None
) -> np.ndarray:
    """Guidance channel(s) for (N, 4, 2) crop-space points: (N, G, S, S) float32.

    ``out`` (e.g. ``x[:, K:]`` of a network input, K image channels) receives the maps when given.
    """
    s = spec.input_size
    n = len(points_crop)
    if out is None:
        out = np.empty((n, len(spec.guidance_channels), s, s), dtype=np.float32)
    for j, name in enumerate(spec.guidance_channels):
        if name == "cm":
            confidence_map(
                points_crop, (s, s), variant=spec.cm_variant, **spec.cm_params, out=out[:, j]
            )
        elif name == "ep":
            out[:, j] = gaussian_heatmap(points_crop, (s, s), sigma=spec.ep_sigma)
        else:  # pragma: no cover - ModelSpec validates guidance
            raise ValueError(f"unknown guidance channel {name!r}")
    return out


def _prepare(
    slices_hu: Sequence[np.ndarray], points: np.ndarray, spec: ModelSpec, target_size: float
) -> tuple[np.ndarray, list[CropTransform]]:
    """Network inputs of validated (N, 4, 2) float64 points, written in place channel by channel."""
    s, k = spec.input_size, spec.num_image_channels
    n = len(points)
    out = np.empty((n, spec.num_channels, s, s), dtype=np.float32)
    if n == 0:
        return out, []
    transforms = crop_transforms(points, s, target_size)
    for i, (img, t) in enumerate(zip(slices_hu, transforms, strict=True)):
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f"slice must be 2-D (H, W) HU, got shape {arr.shape}")
        image_channels(crop_image(arr, t, fill=spec.pad_hu, out=out[i, 0]), spec, out=out[i, :k])
    mats = np.stack([t.matrix for t in transforms])
    points_crop = points @ np.swapaxes(mats[:, :, :2], 1, 2) + mats[:, None, :, 2]  # = to_crop
    guidance_channels(points_crop, spec, out=out[:, k:])
    return out, transforms


def prepare_one(
    slice_hu: np.ndarray, points: np.ndarray, spec: ModelSpec, *, target_size: float | None = None
) -> tuple[np.ndarray, CropTransform]:
    """Network input (C, S, S) float32 and the crop transform for one object on one slice."""
    pts = validate_points(points)[:1]
    x, (t,) = _prepare([slice_hu], pts, spec, spec.target_size if target_size is None else target_size)
    return x[0], t


def prepare_batch(
    slices_hu: Sequence[np.ndarray] | np.ndarray,
    points: Sequence[np.ndarray] | np.ndarray,
    spec: ModelSpec,
) -> tuple[np.ndarray, list[CropTransform]]:
    """:func:`prepare_one` over items: returns (N, C, S, S) float32 and N transforms.

    ``slices_hu[i]`` is the (H_i, W_i) slice for object ``points[i]`` (slices may repeat and may
    differ in size). The work is per object only where it must be (the crop); transforms,
    crop-space points and guidance maps are computed for the batch, straight into the output.
    """
    if len(slices_hu) != len(points):
        raise ValueError(f"got {len(slices_hu)} slices but {len(points)} point sets")
    if len(points) == 0:
        return _prepare([], np.zeros((0, 4, 2)), spec, spec.target_size)
    pts = validate_points(np.asarray(points, dtype=np.float64))
    return _prepare(slices_hu, pts, spec, spec.target_size)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function, float32."""
    x = np.asarray(logits, dtype=np.float32)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(np.float32)


def probabilities_to_slice(
    crop_probs: np.ndarray, transform: CropTransform, slice_shape: tuple[int, int]
) -> np.ndarray:
    """Paste an (S, S) crop probability map back into an (H, W) slice (0 outside the crop)."""
    return paste_back(np.asarray(crop_probs, dtype=np.float32), transform, slice_shape)
