"""Training-sample construction: geometric augmentation, simulated annotator clicks, intensity noise.

Geometry (all coordinates ``(x, y)`` = (column, row), pixel centres at integers):

1. ``A``: augmentation affine in slice space about the object's bounding-box centre: rotation
   U(-30, 30) degrees (screen counter-clockwise) and a horizontal flip with p = 0.5.
2. The component's pixel centres are mapped through ``A``; their extreme coordinates give the
   augmented extreme points (the same pixel-centre convention as
   :func:`cmdeploy.guidance.extreme_points` at run time), plus jitter U(-j, j) slice pixels per
   coordinate, ``j = min(jitter_px, jitter_frac * object extent)``; or, with probability
   ``annotator_p``, the clicks of the simulated annotator (:mod:`cmdeploy.annotator`, the same one
   ``cmdeploy evaluate --clicks annotator`` uses) with its tolerance band and hand error drawn from
   ``click_tolerance_px`` and ``click_jitter_mm``.
3. ``T`` = :func:`cmdeploy.geometry.crop_transform` of those points with ``b_m`` drawn from
   ``spec.train_target_range`` times a scale U(0.9, 1.1) (scaling *after* the zoom normalisation,
   otherwise the zoom would cancel it). The total map is ``T o A``; image (bilinear, ``pad_hu``
   outside the slice) and mask (bilinear > 0.5) are warped through it, and the crop-space points
   are ``T(points)``, so image, mask and points share one transform.

Intensity (generalisation to other scanners, spacings and contrast phases), on the HU crop:
blur, or down/up-resampling to a pixel spacing drawn from ``resample_mm`` (when it is coarser than
the slice's own spacing; a factor from ``resample_factor`` when the spacing is unknown), Gaussian
noise correlated at the slice-pixel scale (sigma U(0, 30) HU), HU scale U(0.9, 1.1) and shift
U(-40, 40) (``hu_shift``); after windowing an occasional gamma. Validation uses none of this
(see :mod:`cmdeploy.train.data`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from cmdeploy.annotator import ClickModel, simulate_clicks
from cmdeploy.geometry import compose_affine, crop_transform, sample_bilinear, warp_affine
from cmdeploy.preprocess import guidance_channels, image_channels
from cmdeploy.spec import ModelSpec


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation parameters (probabilities in [0, 1]; ``*_px`` in slice pixels)."""

    rotation_deg: float = 30.0
    flip_p: float = 0.5
    scale_range: tuple[float, float] = (0.9, 1.1)
    jitter_px: float = 2.0
    jitter_frac: float = 0.05
    blur_p: float = 0.2
    blur_sigma_px: tuple[float, float] = (0.3, 0.8)
    resample_p: float = 0.2
    resample_factor: tuple[float, float] = (1.3, 2.0)
    resample_mm: tuple[float, float] = (0.6, 3.0)
    noise_p: float = 0.5
    noise_sigma_hu: tuple[float, float] = (0.0, 30.0)
    hu_p: float = 0.8
    hu_shift: tuple[float, float] = (-40.0, 40.0)
    hu_scale: tuple[float, float] = (0.9, 1.1)
    gamma_p: float = 0.2
    gamma_log_range: float = 0.3
    annotator_p: float = 0.0
    click_tolerance_px: tuple[float, float] = (0.0, 4.0)
    click_jitter_mm: tuple[float, float] = (0.0, 4.0)

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = AugmentConfig(
    rotation_deg=0.0, flip_p=0.0, scale_range=(1.0, 1.0), jitter_px=0.0, jitter_frac=0.0,
    blur_p=0.0, resample_p=0.0, noise_p=0.0, hu_p=0.0, gamma_p=0.0, annotator_p=0.0,
)

#: The robust recipe's augmentation: simulated annotator clicks on 80 % of samples, spacing
#: resampling on 30 %, wider HU offsets (``cmdeploy train --clicks annotator``, the default).
ROBUST_AUGMENT = AugmentConfig(annotator_p=0.8, resample_p=0.3, hu_shift=(-60.0, 60.0))


def augmentation_affine(centre: np.ndarray, rotation_deg: float, flip: bool) -> np.ndarray:
    """(2, 3) slice -> slice map: rotation (screen CCW) then optional left-right flip about ``centre``."""
    theta = np.deg2rad(rotation_deg)
    c, s = np.cos(theta), np.sin(theta)
    lin = np.array([[c, s], [-s, c]])
    if flip:
        lin = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ lin
    centre = np.asarray(centre, dtype=np.float64)
    return np.concatenate([lin, (centre - lin @ centre)[:, None]], axis=1)


def cloud_extreme_points(coords: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Left, right, top, bottom points (4, 2) float64 of a (P, 2) point cloud (x, y).

    Ties (points within ``tol`` of the extreme coordinate) resolve to the lower median of the other
    coordinate, as :func:`cmdeploy.guidance.extreme_points` does for pixel masks.
    """
    xs, ys = coords[:, 0], coords[:, 1]

    def pick(sel: np.ndarray, other: np.ndarray) -> float:
        s = np.sort(other[sel])
        return float(s[(s.size - 1) // 2])

    x_min, x_max, y_min, y_max = xs.min(), xs.max(), ys.min(), ys.max()
    return np.array(
        [
            [x_min, pick(xs <= x_min + tol, ys)],
            [x_max, pick(xs >= x_max - tol, ys)],
            [pick(ys <= y_min + tol, xs), y_min],
            [pick(ys >= y_max - tol, xs), y_max],
        ],
        dtype=np.float64,
    )


def jitter_points(points: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    """Add U(-amount, amount) to every coordinate, keeping left <= right and top <= bottom."""
    if amount <= 0:
        return points.copy()
    out = points + rng.uniform(-amount, amount, size=points.shape)
    if out[0, 0] > out[1, 0]:
        out[[0, 1]] = out[[1, 0]]
    if out[2, 1] > out[3, 1]:
        out[[2, 3]] = out[[3, 2]]
    return out


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _resample_clamped(img: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    h, w = img.shape
    return sample_bilinear(img, np.clip(xs, 0, w - 1), np.clip(ys, 0, h - 1))


def _coarse_noise(size: int, step: float, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """(size, size) Gaussian noise of std ~``sigma`` correlated over ``step`` crop pixels."""
    if step <= 1.5:
        return rng.normal(0.0, sigma, size=(size, size)).astype(np.float32)
    n = int(np.ceil((size - 1) / step)) + 2
    coarse = rng.normal(0.0, sigma, size=(n, n)).astype(np.float32)
    grid = np.arange(size, dtype=np.float64) / step
    return _resample_clamped(coarse, grid[None, :], grid[:, None])


def augment_hu(
    crop_hu: np.ndarray,
    zoom: float,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    spacing_mm: float | None = None,
) -> np.ndarray:
    """Intensity augmentation of an (S, S) HU crop whose slice pixels are ``zoom`` crop pixels wide.

    ``spacing_mm``: the slice's in-plane pixel spacing (mean of x and y); the resampling branch then
    simulates a pixel spacing drawn from ``cfg.resample_mm``.
    """
    out = crop_hu
    s = out.shape[0]
    r = rng.random()
    if r < cfg.blur_p:
        sigma = rng.uniform(*cfg.blur_sigma_px) * zoom
        out = ndimage.gaussian_filter(out, sigma, mode="nearest")
    elif r < cfg.blur_p + cfg.resample_p:
        if spacing_mm is not None and spacing_mm > 0:
            factor = rng.uniform(*cfg.resample_mm) / spacing_mm
        else:
            factor = rng.uniform(*cfg.resample_factor)
        step = factor * zoom  # crop pixels per coarse pixel
        if step > 1.2:
            n = int(np.ceil((s - 1) / step)) + 1
            grid = np.arange(n, dtype=np.float64) * step
            small = _resample_clamped(out, grid[None, :], grid[:, None])
            back = np.arange(s, dtype=np.float64) / step
            out = _resample_clamped(small, back[None, :], back[:, None])
    if rng.random() < cfg.noise_p:
        out = out + _coarse_noise(s, zoom, rng.uniform(*cfg.noise_sigma_hu), rng)
    if rng.random() < cfg.hu_p:
        out = out * np.float32(rng.uniform(*cfg.hu_scale)) + np.float32(rng.uniform(*cfg.hu_shift))
    return out.astype(np.float32, copy=False)


def augmented_image_channels(
    crop_hu: np.ndarray, spec: ModelSpec, cfg: AugmentConfig, rng: np.random.Generator | None
) -> np.ndarray:
    """Windowed, normalised (K, S, S) image channels (one per ``spec.windows``), with an occasional
    gamma (the same for every window) when ``rng`` is given."""
    img = image_channels(crop_hu, spec)
    if rng is not None and rng.random() < cfg.gamma_p:
        g = float(np.exp(rng.uniform(-cfg.gamma_log_range, cfg.gamma_log_range)))
        v = np.clip(img * np.float32(spec.norm_std) + np.float32(spec.norm_mean), 0.0, 1.0)
        img = (v ** np.float32(g) - np.float32(spec.norm_mean)) / np.float32(spec.norm_std)
    return img.astype(np.float32, copy=False)


def training_sample(
    slice_hu: np.ndarray,
    mask_box: np.ndarray,
    box_origin: tuple[int, int],
    spec: ModelSpec,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    spacing_xy: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """One augmented training example.

    Args:
        slice_hu: (H, W) HU slice.
        mask_box: boolean mask of the object inside its bounding box.
        box_origin: (x0, y0) slice position of ``mask_box[0, 0]``.
        spec: model spec (input size, guidance, window, ``train_target_range``, ``pad_hu``).
        cfg: augmentation parameters.
        rng: the sample's random generator.
        spacing_xy: pixel spacing (x, y) of the slice in mm (simulated clicks' hand error, spacing
            resampling); None = unknown (1 mm for clicks, ``resample_factor`` for resampling).

    Returns:
        ``input`` (C, S, S) float32, ``mask`` (1, S, S) float32 in {0, 1}, ``points`` (4, 2)
        float32 crop-space extreme points, ``matrix`` (2, 3) float64 slice -> crop map, ``zoom``.
    """
    s = spec.input_size
    x0, y0 = box_origin
    ys, xs = np.nonzero(mask_box)
    coords = np.stack([xs + x0, ys + y0], axis=1).astype(np.float64)
    centre = (coords.min(axis=0) + coords.max(axis=0)) / 2.0
    rot = rng.uniform(-cfg.rotation_deg, cfg.rotation_deg) if cfg.rotation_deg > 0 else 0.0
    flip = bool(rng.random() < cfg.flip_p)
    aug = augmentation_affine(centre, rot, flip)
    moved = coords @ aug[:, :2].T + aug[:, 2]
    if cfg.annotator_p > 0 and rng.random() < cfg.annotator_p:
        clicks = ClickModel(
            tolerance_px=rng.uniform(*cfg.click_tolerance_px), jitter_mm=rng.uniform(*cfg.click_jitter_mm)
        )
        pts = simulate_clicks(moved, spacing_xy, clicks, rng)
    else:
        pts = cloud_extreme_points(moved)
        extent = float((moved.max(axis=0) - moved.min(axis=0)).max())
        pts = jitter_points(pts, min(cfg.jitter_px, cfg.jitter_frac * extent), rng)
    lo_t, hi_t = spec.train_target_range
    target = rng.uniform(lo_t, hi_t) * rng.uniform(*cfg.scale_range)
    crop_t = crop_transform(pts, s, target)
    total = compose_affine(crop_t.matrix, aug)
    zoom = float(np.sqrt(abs(np.linalg.det(total[:, :2]))))

    crop_hu = warp_affine(slice_hu, total, (s, s), fill=spec.pad_hu)
    padded = np.pad(mask_box.astype(np.float32), 1)
    mask_m = compose_affine(total, _translate(x0 - 1, y0 - 1))
    mask = warp_affine(padded, mask_m, (s, s), fill=0.0) > 0.5

    spacing_mm = None if spacing_xy is None else float(np.mean(spacing_xy))
    crop_hu = augment_hu(crop_hu, zoom, cfg, rng, spacing_mm)
    image = augmented_image_channels(crop_hu, spec, cfg, rng)
    pts_crop = crop_t.to_crop(pts)
    guide = guidance_channels(pts_crop[None], spec)[0]
    return {
        "input": np.concatenate([image, guide], axis=0),
        "mask": mask[None].astype(np.float32),
        "points": pts_crop.astype(np.float32),
        "matrix": total,
        "zoom": np.float32(zoom),
    }
