"""Network inputs from (slice, extreme points) pairs and slice-space outputs from network logits.

The single implementation of the paper's preprocessing, used by training (``cmdeploy.train``),
export parity checks, INT8 calibration and the runtime:

1. crop + zoom the slice with :func:`cmdeploy.geometry.crop_transform` (bilinear, ``spec.pad_hu``
   outside the slice),
2. window to ``spec.window`` HU, scale to [0, 1], then ``(v - norm_mean) / norm_std``,
3. guidance channel(s) computed *in crop coordinates* from the transformed points,
4. stack as ``(C, S, S)`` float32 in the order of ``spec.channels``.

Points are (4, 2) left, right, top, bottom, each (x = column, y = row) in slice pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from cmdeploy.geometry import CropTransform, crop_image, crop_transform, paste_back
from cmdeploy.guidance import confidence_map, gaussian_heatmap, validate_points
from cmdeploy.spec import ModelSpec


def window_normalize(hu: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Window HU values to ``spec.window``, scale to [0, 1] and normalise; float32."""
    lo, hi = spec.window
    v = (np.clip(np.asarray(hu, dtype=np.float32), lo, hi) - np.float32(lo)) / np.float32(hi - lo)
    return (v - np.float32(spec.norm_mean)) / np.float32(spec.norm_std)


def guidance_channels(points_crop: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Guidance channel(s) for (N, 4, 2) crop-space points: (N, G, S, S) float32."""
    s = spec.input_size
    maps = []
    for name in spec.channels[1:]:
        if name == "cm":
            maps.append(
                confidence_map(points_crop, (s, s), variant=spec.cm_variant, **spec.cm_params)
            )
        elif name == "ep":
            maps.append(gaussian_heatmap(points_crop, (s, s), sigma=spec.ep_sigma))
        else:  # pragma: no cover - ModelSpec validates guidance
            raise ValueError(f"unknown guidance channel {name!r}")
    return np.stack(maps, axis=1)


def prepare_one(
    slice_hu: np.ndarray, points: np.ndarray, spec: ModelSpec, *, target_size: float | None = None
) -> tuple[np.ndarray, CropTransform]:
    """Network input (C, S, S) float32 and the crop transform for one object on one slice."""
    pts = validate_points(points)[0]
    img = np.asarray(slice_hu)
    if img.ndim != 2:
        raise ValueError(f"slice must be 2-D (H, W) HU, got shape {img.shape}")
    t = crop_transform(pts, spec.input_size, spec.target_size if target_size is None else target_size)
    image = window_normalize(crop_image(img, t, fill=spec.pad_hu), spec)
    guide = guidance_channels(t.to_crop(pts)[None], spec)[0]
    return np.concatenate([image[None], guide], axis=0), t


def prepare_batch(
    slices_hu: Sequence[np.ndarray] | np.ndarray,
    points: Sequence[np.ndarray] | np.ndarray,
    spec: ModelSpec,
) -> tuple[np.ndarray, list[CropTransform]]:
    """Stack :func:`prepare_one` over items: returns (N, C, S, S) float32 and N transforms.

    ``slices_hu[i]`` is the (H_i, W_i) slice for object ``points[i]`` (slices may repeat and may
    differ in size).
    """
    if len(slices_hu) != len(points):
        raise ValueError(f"got {len(slices_hu)} slices but {len(points)} point sets")
    s = spec.input_size
    out = np.empty((len(points), spec.num_channels, s, s), dtype=np.float32)
    transforms = []
    for i, (img, pts) in enumerate(zip(slices_hu, points, strict=True)):
        out[i], t = prepare_one(img, pts, spec)
        transforms.append(t)
    return out, transforms


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
