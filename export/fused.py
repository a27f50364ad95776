r"""Fused-preprocessing ONNX: raw HU slices and extreme points in, full-slice probabilities out.

:class:`FusedSegmenter` wraps a trained network with the whole runtime path of
:mod:`cmdeploy.preprocess` written as tensor operations, so one ONNX graph does what
``prepare_batch -> network -> sigmoid -> probabilities_to_slice`` does in NumPy:

1. bounding box of the points, ``z = target_size / max(max(w, h), 1)``, the crop matrix of
   :func:`cmdeploy.geometry.crop_transform` (box centre -> crop centre ``((S-1)/2, (S-1)/2)``),
2. the slice coordinates of the crop's columns and rows (1-D, per object) -> separable bilinear
   sampling exactly as :func:`cmdeploy.geometry.sample_grid` (the same float32 operations in the
   same order: along x over every slice row, then along y, by whole-row ``Gather``\s); samples
   whose source lies outside ``[0, W-1] x [0, H-1]`` get ``spec.pad_hu``,
3. window + normalisation (:func:`cmdeploy.preprocess.window_normalize`),
4. the guidance channel(s) from the crop-space points: the confidence map of
   :func:`cmdeploy.guidance.confidence_map` (line intersection with the parallel fallback,
   side-dependent sigma with the tie rule, sigma >= 1 px; every variant) and/or the Gaussians of
   :func:`cmdeploy.guidance.gaussian_heatmap`,
5. the network, sigmoid,
6. paste-back: the crop coordinates of the slice's columns and rows through the forward matrix ->
   the same separable sampling of the crop probabilities, 0 outside the crop
   (:func:`cmdeploy.geometry.paste_back`).

Issue 18 removed the two ``GridSample``\s: they worked on per-pixel coordinate tensors (float64 at
slice size for the paste-back), and with the confidence map's broadcast ``Where``\s they made the
graph slower on CPU than NumPy + the plain model (timings in docs/results.md).

ONNX interface: inputs ``slices`` (B, H, W) float32 HU and ``points`` (B, 4, 2) float32 slice pixels
(order left, right, top, bottom; each (x = column, y = row)); output ``probabilities`` (B, H, W)
float32. B, H and W are dynamic. The debug variant adds ``network_input`` (B, C, S, S) and
``crop_probabilities`` (B, S, S), used by the tests to check the in-graph preprocessing.

Precision: per-object scalars (box, zoom, crop matrix, crop-space points, line intersection, unit
vectors, sigmas) run in ``geometry_dtype`` with the NumPy path's operation order, per-pixel maps in
float32 as there. With ``"float64"`` (default) the in-graph confidence map equals
:func:`cmdeploy.guidance.confidence_map` to float32 rounding (torch's float32 ``sqrt`` is not
correctly rounded, onnxruntime's is), and the crop and paste-back samplers equal NumPy's bit for bit;
``"float32"`` gives a graph without FP64 tensors for TensorRT (maps within the 1e-4 tolerance of
``tests/test_fused.py``; measured differences in docs/results.md); TensorRT has no FP64 and its
parser would cast a float64 graph to float32 silently.

TensorRT-parsable by construction (checked by :mod:`cmdeploy.export.trt_lint` in the tests):
no ``AffineGrid`` or ``GridSample`` (1-D coordinates, ``Gather`` of whole rows), opset 16..19
(:data:`MAX_FUSED_OPSET`, kept from the ``GridSample`` graph), the dynamic pixel grids as an integer
``Range`` followed by a ``Cast``, and with ``"float32"`` geometry no FP64.

Built with ``torch.onnx.export(dynamo=False)`` (the TorchScript exporter traces the dynamic H/W
arithmetic into ``Shape``/``Range`` nodes), then constant-folded with onnx-graphsurgeon.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmdeploy.export.parity import ParityCase, ParityReport, compare_outputs, footprints
from cmdeploy.export.trt_ops import MAX_GRIDSAMPLE_OPSET
from cmdeploy.spec import ModelSpec

FUSED_INPUTS = ("slices", "points")
FUSED_OUTPUT = "probabilities"
DEBUG_OUTPUTS = ("network_input", "crop_probabilities")
DEFAULT_FUSED_OPSET = 17  # GridSample exists from opset 16
MAX_FUSED_OPSET = MAX_GRIDSAMPLE_OPSET  # GridSample's mode is spelt "linear" from opset 20
FUSED_MIN_MASK_AGREEMENT = 0.995  # vs the NumPy runtime path, fraction of footprint pixels
FUSED_MIN_DICE = 0.995

_PARALLEL_EPS = 1e-6  # as cmdeploy.guidance
_MIN_SIGMA = 1.0
_TIE_EPS = 1e-3  # pixels: as cmdeploy.guidance, positions this close to c count as level with c
_MIN_EXTENT = 1.0  # as cmdeploy.geometry


# ------------------------------------------------------------------------------ geometry
# Per-object scalars (box, zoom, crop-space points, line intersection, unit vectors, sigmas) run in
# ``geometry_dtype`` with the NumPy path's operation order; per-pixel maps run in float32 as there.
# With float64 (default) the guidance maps match cmdeploy.guidance to float32 rounding. float32
# geometry is for TensorRT (no FP64); it moves points by ~1e-6 px, which only matters for a pixel
# within that distance of the 1e-3 px tie band of the sigma side rule.


def crop_geometry(
    points: torch.Tensor, target_size: float, crop_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zoom ``z`` (B,) and offset (B, 2) of the crop matrix of :func:`cmdeploy.geometry.crop_transform`.

    ``points`` is (B, 4, 2). The matrix is ``[[z, 0, off_x], [0, z, off_y]]``: slice ``(x, y)`` ->
    crop ``(x * z + off_x, y * z + off_y)``, ``off = (S - 1) / 2 - z * box_centre``.
    """
    lo = points.min(dim=1).values
    hi = points.max(dim=1).values
    centre = (lo + hi) / 2.0
    side = torch.clamp((hi - lo).max(dim=1).values, min=_MIN_EXTENT)
    zoom = torch.tensor(float(target_size), dtype=side.dtype) / side  # a true Div, not Reciprocal*Mul
    offset = (crop_size - 1) / 2.0 - zoom[:, None] * centre
    return zoom, offset


def _axis_taps_t(coords: torch.Tensor, n: Any) -> tuple[torch.Tensor, ...]:
    """1-D bilinear taps along an axis of ``n`` pixels for (B, k) coordinates, as
    :func:`cmdeploy.geometry.sample_grid` makes them: ``(lo, hi, w_lo, w_hi, inside)``.

    ``lo``/``hi`` are int64 pixel indices, ``w_lo = (1 - frac) * inside`` and ``w_hi = frac *
    inside`` float32 weights (exactly ``1 - frac`` and ``frac`` inside, 0 outside, so a sample
    outside the axis comes out 0 without a per-pixel select); ``inside`` float32 0/1. Inside-ness
    is tested in the coordinates' own dtype.
    """
    nm1 = (n - 1).to(coords.dtype) if torch.is_tensor(n) else float(n - 1)
    inside = ((coords >= 0) & (coords <= nm1)).to(torch.float32)
    c = torch.minimum(torch.clamp(coords, min=0.0), torch.full_like(coords, 1.0) * nm1)
    top = torch.clamp(n - 2, min=0) if torch.is_tensor(n) else max(n - 2, 0)
    lo = torch.minimum(torch.floor(c).to(torch.int64), torch.ones_like(c, dtype=torch.int64) * top)
    hi = torch.minimum(lo + 1, torch.ones_like(lo) * (n - 1))
    frac = (c - lo.to(c.dtype)).to(torch.float32)
    return lo, hi, (1 - frac) * inside, frac * inside, inside


def _gather_rows(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, i, :] = rows[b, index[b, i], :]`` for (B, R, L) ``rows`` and (B, k) int64 ``index``.

    One ``Gather`` of whole rows from the (B * R, L) view (flat index ``b * R + index``): no
    per-element index tensors (``GatherElements`` would need a (B, k, L) int64 index).
    """
    b, r, length = rows.shape[0], rows.shape[1], rows.shape[2]
    flat = index + torch.arange(b, dtype=torch.int64)[:, None] * r
    picked = torch.index_select(rows.reshape(b * r, length), 0, flat.reshape(-1))
    return picked.reshape(b, index.shape[1], length)


def _sample_grid_t(image: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, fill: float) -> torch.Tensor:
    """Bilinear samples of (B, H, W) float32 ``image`` on each item's grid ``ys[b] x xs[b]`` ->
    (B, len(ys), len(xs)) float32; ``fill`` outside ``[0, W-1] x [0, H-1]``.

    The separable scheme and float32 operation order of :func:`cmdeploy.geometry.sample_grid`
    (along x over every row first, then along y): whole-row ``Gather`` ops on the transposed image,
    then of the x-interpolated rows; outside samples are zeroed through the tap weights and get
    ``fill`` added. No ``GridSample``, no per-pixel coordinates or selects.
    """
    x0, x1, wx0, wx1, in_x = _axis_taps_t(xs, image.shape[2])
    y0, y1, wy0, wy1, in_y = _axis_taps_t(ys, image.shape[1])
    columns = image.transpose(1, 2)  # (B, W, H): a column of the image per row
    along_x = _gather_rows(columns, x0) * wx0[:, :, None] + _gather_rows(columns, x1) * wx1[:, :, None]
    rows = along_x.transpose(1, 2)  # (B, H, nx)
    out = _gather_rows(rows, y0) * wy0[:, :, None] + _gather_rows(rows, y1) * wy1[:, :, None]
    if fill != 0.0:
        out = out + fill * (1.0 - in_y[:, :, None] * in_x[:, None, :])
    return out


# ------------------------------------------------------------------------------ guidance
def _norm(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((v * v).sum(dim=-1))


def _f32(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32)


def cross_centre_t(points: torch.Tensor) -> torch.Tensor:
    """Tensor version of :func:`cmdeploy.guidance.cross_centre`: (B, 4, 2) -> (B, 2), points' dtype."""
    p_a, q_a, p_b, q_b = points[:, 0], points[:, 1], points[:, 2], points[:, 3]
    d_a = q_a - p_a
    d_b = q_b - p_b
    cross = d_a[:, 0] * d_b[:, 1] - d_a[:, 1] * d_b[:, 0]
    norms = _norm(d_a) * _norm(d_b)
    tiny = 1e-300 if points.dtype == torch.float64 else 1e-30
    parallel = torch.abs(cross) <= _PARALLEL_EPS * torch.clamp(norms, min=tiny)
    safe = torch.where(parallel, torch.ones_like(cross), cross)
    w = p_b - p_a
    t = (w[:, 0] * d_b[:, 1] - w[:, 1] * d_b[:, 0]) / safe
    centre = p_a + t[:, None] * d_a
    return torch.where(parallel[:, None], points.mean(dim=1), centre)


def _segment_sq_distance(
    p: torch.Tensor,
    q: torch.Tensor,
    c: torch.Tensor,
    xs: torch.Tensor,
    ys: torch.Tensor,
    sigma_mode: str,
) -> torch.Tensor:
    """``(dist / sigma)**2`` to segment (p, q), float32 (B, S, S), as
    :func:`cmdeploy.guidance.segment_sq_distance`.

    ``p``, ``q``, ``c`` are (B, 2) in the geometry dtype; ``xs`` (1, 1, S), ``ys`` (1, S, 1) float32.
    The same float32 operations as the NumPy path (outer sums, clip, ``1 / sigma**2`` by side of c
    with the 1e-3 px level band), densely.
    """
    d = q - p
    length = _norm(d)
    has_len = length > 0
    unit = d / torch.where(has_len, length, torch.ones_like(length))[:, None]
    x_axis = torch.tensor([1.0, 0.0], dtype=d.dtype)
    unit = torch.where(has_len[:, None], unit, x_axis)
    ux = _f32(unit[:, 0])[:, None, None]
    uy = _f32(unit[:, 1])[:, None, None]
    rx = xs - _f32(p[:, 0])[:, None, None]  # (B, 1, S)
    ry = ys - _f32(p[:, 1])[:, None, None]  # (B, S, 1)
    along = ry * uy + rx * ux  # (B, S, S): position along S from p
    perp = ry * ux - rx * uy
    length32 = _f32(length)[:, None, None]
    beyond = along - torch.minimum(torch.clamp(along, min=0.0), length32)
    dist2 = perp * perp + beyond * beyond
    if sigma_mode == "half":
        half = torch.clamp(length / 2.0, min=_MIN_SIGMA)
        return dist2 * _f32(1.0 / (half * half))[:, None, None]
    sig_p = torch.clamp(_norm(c - p), min=_MIN_SIGMA)
    sig_q = torch.clamp(_norm(c - q), min=_MIN_SIGMA)
    tie = (sig_p + sig_q) / 2.0
    # position of c along S from p; pixels before t_c - 1e-3 are on p's side, after t_c + 1e-3 on q's
    t_c = (c[:, 0] - p[:, 0]) * unit[:, 0] + (c[:, 1] - p[:, 1]) * unit[:, 1]
    lo = _f32(t_c - _TIE_EPS)[:, None, None]
    hi = _f32(t_c + _TIE_EPS)[:, None, None]
    k_p = _f32(1.0 / (sig_p * sig_p))[:, None, None]
    k_q = _f32(1.0 / (sig_q * sig_q))[:, None, None]
    k_tie = _f32(1.0 / (tie * tie))[:, None, None]
    # the side's 1 / sigma**2 by 0/1 masks (exact: one product is k, the others 0), which onnxruntime
    # runs far faster than a broadcast Where
    on_p = (along < lo).to(torch.float32)
    on_q = (along > hi).to(torch.float32)
    k = on_p * k_p + on_q * k_q + (1.0 - on_p - on_q) * k_tie
    return dist2 * k


def confidence_map_t(
    points: torch.Tensor, size: int, *, variant: str = "paper", tau: float | None = None
) -> torch.Tensor:
    """Tensor version of :func:`cmdeploy.guidance.confidence_map` on an (S, S) grid: float32 (B, S, S).

    ``points`` (B, 4, 2), order left, right, top, bottom, each (x, y) in crop pixels; float64 for
    the NumPy path's exact arithmetic, float32 for a TensorRT-friendly graph. With ``a = d_A**2``,
    ``b = d_B**2`` the paper's map is ``1 / (1 + sqrt(min(a, b) * (a + b)))``, as in NumPy.
    """
    xs = torch.arange(size, dtype=torch.float32)[None, None, :]
    ys = torch.arange(size, dtype=torch.float32)[None, :, None]
    c = cross_centre_t(points)
    sigma_mode = "half" if variant == "authors" else "side"
    a = _segment_sq_distance(points[:, 0], points[:, 1], c, xs, ys, sigma_mode)
    b = _segment_sq_distance(points[:, 2], points[:, 3], c, xs, ys, sigma_mode)
    if variant == "paper":
        return 1.0 / (1.0 + torch.sqrt(torch.minimum(a, b) * (a + b)))
    if variant == "authors":
        t = 7.0 if tau is None else float(tau)
        d_a, d_b = torch.sqrt(a), torch.sqrt(b)
        out = 1.0 / (1.0 + torch.minimum(d_a, d_b) * t * (d_a + d_b))
        lo = out.amin(dim=(1, 2), keepdim=True)
        hi = out.amax(dim=(1, 2), keepdim=True)
        return (out - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    t = 1.0 if tau is None else float(tau)
    if variant == "chebyshev":
        d = torch.sqrt(torch.maximum(a, b))
    elif variant == "mahalanobis":
        d = torch.sqrt(a + b)
    else:
        raise ValueError(f"unknown confidence-map variant {variant!r}")
    return (d <= t).to(torch.float32)


def gaussian_heatmap_t(points: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Tensor version of :func:`cmdeploy.guidance.gaussian_heatmap` on an (S, S) grid: (B, S, S)."""
    pts = _f32(points)
    grid = torch.arange(size, dtype=torch.float32)
    inv = float(np.float32(-0.5 / sigma**2))
    dx = grid[None, None, :] - pts[:, :, 0:1]  # (B, 4, S)
    dy = grid[None, None, :] - pts[:, :, 1:2]
    gx = torch.exp(inv * (dx * dx))
    gy = torch.exp(inv * (dy * dy))
    return (gy[:, :, :, None] * gx[:, :, None, :]).amax(dim=1)


def guidance_t(points_crop: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """Guidance channel(s) float32 (B, G, S, S) in the order of ``spec.guidance_channels``."""
    s = spec.input_size
    maps = []
    for name in spec.guidance_channels:
        if name == "cm":
            maps.append(confidence_map_t(points_crop, s, variant=spec.cm_variant, **spec.cm_params))
        else:
            maps.append(gaussian_heatmap_t(points_crop, s, spec.ep_sigma))
    return torch.stack(maps, dim=1)


# ------------------------------------------------------------------------------ the module
GEOMETRY_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class FusedSegmenter(nn.Module):
    """Slices (B, H, W) HU + points (B, 4, 2) -> slice probabilities (B, H, W), all in one graph.

    Args:
        network: ``(N, C, S, S) -> (N, 1, S, S)`` logits, with ``C``, ``S`` from ``spec``.
        spec: the model card whose preprocessing is reproduced.
        debug: also return ``network_input`` (B, C, S, S) and ``crop_probabilities`` (B, S, S).
        geometry_dtype: ``"float64"`` (NumPy-exact per-object geometry; onnxruntime) or
            ``"float32"`` (for TensorRT, which has no FP64).
    """

    def __init__(
        self, network: nn.Module, spec: ModelSpec, *, debug: bool = False, geometry_dtype: str = "float64"
    ) -> None:
        super().__init__()
        if geometry_dtype not in GEOMETRY_DTYPES:
            raise ValueError(
                f"geometry_dtype must be one of {sorted(GEOMETRY_DTYPES)}, got {geometry_dtype!r}"
            )
        self.network = network
        self.spec = spec
        self.debug = debug
        self.gdtype = GEOMETRY_DTYPES[geometry_dtype]
        s = spec.input_size
        self.register_buffer("crop_grid", torch.arange(s, dtype=self.gdtype), persistent=False)

    def forward(self, slices: torch.Tensor, points: torch.Tensor) -> Any:
        spec = self.spec
        s = spec.input_size
        height, width = slices.shape[1], slices.shape[2]
        pts = points.to(self.gdtype)
        zoom, offset = crop_geometry(pts, spec.target_size, s)  # (B,), (B, 2)
        # crop: slice coordinates of the crop's columns and rows, through the inverse matrix
        # (1/z, -(1/z) * off), as cmdeploy.geometry.warp_affine; then separable sampling
        rz = 1.0 / zoom[:, None]
        u = self.crop_grid[None, :]
        xs = rz * u + (-(rz * offset[:, 0, None]))  # (B, S)
        ys = rz * u + (-(rz * offset[:, 1, None]))
        crop_hu = _sample_grid_t(slices, xs, ys, spec.pad_hu)

        images = []
        for lo, hi in spec.windows:
            image = (torch.clamp(crop_hu, lo, hi) - lo) / (hi - lo)
            images.append((image - spec.norm_mean) / spec.norm_std)

        points_crop = pts * zoom[:, None, None] + offset[:, None, :]
        net_in = torch.cat([torch.stack(images, dim=1), guidance_t(points_crop, spec)], dim=1)
        crop_probs = torch.sigmoid(self.network(net_in))  # (B, 1, S, S)

        # paste back: crop coordinates of the slice's columns and rows, through the forward matrix,
        # then separable sampling of the crop probabilities (cmdeploy.geometry.paste_window)
        # integer Range + Cast: TensorRT's parser takes a float Range only with constant bounds
        gx = torch.arange(width).to(self.gdtype)
        gy = torch.arange(height).to(self.gdtype)
        us = zoom[:, None] * gx[None, :] + offset[:, 0, None]  # (B, W)
        vs = zoom[:, None] * gy[None, :] + offset[:, 1, None]  # (B, H)
        probs = _sample_grid_t(crop_probs[:, 0], us, vs, 0.0)
        if self.debug:
            return probs, net_in, crop_probs[:, 0]
        return probs


def export_fused_graph(
    network: nn.Module,
    spec: ModelSpec,
    output_path: str | Path,
    *,
    opset: int = DEFAULT_FUSED_OPSET,
    debug: bool = False,
    geometry_dtype: str = "float64",
    example_shape: tuple[int, int] = (96, 80),
) -> Path:
    """Trace ``FusedSegmenter(network, spec)`` to ONNX at ``output_path`` (no metadata, no checks).

    B, H and W are dynamic (the traced example slice, ``example_shape`` (H, W), fixes only the
    rank). Returns the path.
    """
    import warnings

    module = FusedSegmenter(network, spec, debug=debug, geometry_dtype=geometry_dtype).eval()
    h, w = example_shape
    slices = torch.full((2, h, w), -500.0)
    pts = torch.tensor(
        [[[10.0, 40.0], [50.0, 42.0], [30.0, 20.0], [31.0, 70.0]]] * 2, dtype=torch.float32
    )
    outputs = [FUSED_OUTPUT, *(DEBUG_OUTPUTS if debug else ())]
    dyn: dict[str, dict[int, str]] = {
        "slices": {0: "batch", 1: "height", 2: "width"},
        "points": {0: "batch"},
        FUSED_OUTPUT: {0: "batch", 1: "height", 2: "width"},
    }
    if debug:
        dyn["network_input"] = {0: "batch"}
        dyn["crop_probabilities"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (slices, pts),
            str(output_path),
            input_names=list(FUSED_INPUTS),
            output_names=outputs,
            dynamic_axes=dyn,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return Path(output_path)


def numpy_reference(
    run_network: Any, slices: list[np.ndarray], points: np.ndarray, spec: ModelSpec
) -> list[np.ndarray]:
    """The NumPy runtime path: ``prepare_batch -> run_network -> sigmoid -> probabilities_to_slice``.

    ``run_network`` maps (N, C, S, S) float32 to (N, 1, S, S) logits. Returns N (H_i, W_i) float32
    probability maps.
    """
    from cmdeploy.preprocess import prepare_batch, probabilities_to_slice, sigmoid

    x, transforms = prepare_batch(slices, points, spec)
    probs = sigmoid(np.asarray(run_network(x))[:, 0])
    return [
        probabilities_to_slice(p, t, img.shape)
        for p, t, img in zip(probs, transforms, slices, strict=True)
    ]


def run_fused(
    run: Any, slices: Sequence[np.ndarray], points: np.ndarray, *, batch: int = 8
) -> list[np.ndarray]:
    """Call a fused model ``run({"slices", "points"}) -> {"probabilities", ...}`` on N objects.

    Items are grouped by slice shape (one (B, H, W) batch per shape and chunk). Returns N float32
    (H_i, W_i) probability maps in input order.
    """
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 4, 2)
    out: list[np.ndarray | None] = [None] * len(slices)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(slices):
        groups.setdefault(tuple(np.shape(img)), []).append(i)
    for idx in groups.values():
        for a in range(0, len(idx), batch):
            sel = idx[a : a + batch]
            stack = np.stack([np.asarray(slices[i], dtype=np.float32) for i in sel])
            probs = run({"slices": stack, "points": pts[sel]})[FUSED_OUTPUT]
            for j, i in enumerate(sel):
                out[i] = np.asarray(probs[j], dtype=np.float32)
    return out  # type: ignore[return-value]


def fused_parity(
    torch_network: nn.Module, run: Any, spec: ModelSpec, cases: Sequence[ParityCase]
) -> ParityReport:
    """Fused model vs the NumPy runtime path with ``torch_network``, on each object's crop footprint.

    Reference: ``prepare_batch -> torch_network -> sigmoid -> probabilities_to_slice``. Compared:
    slice probabilities on the pixels the crop covers (both are 0 elsewhere by construction).
    """
    slices = [c.slice_hu for c in cases]
    points = np.stack([c.points for c in cases]).astype(np.float32)

    def run_network(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch_network(torch.from_numpy(x)).numpy()

    ref = numpy_reference(run_network, slices, points, spec)
    test = run_fused(run, slices, points)
    regions = footprints(cases, spec.input_size, spec.target_size)
    return compare_outputs(ref, test, spec.threshold, regions=regions)


def export_fused(
    checkpoint_path: str | Path,
    output_path: str | Path,
    *,
    opset: int = DEFAULT_FUSED_OPSET,
    parity_slices: Sequence[ParityCase] | None = None,
    check_parity: bool = True,
    min_mask_agreement: float = FUSED_MIN_MASK_AGREEMENT,
    min_dice: float = FUSED_MIN_DICE,
    debug: bool = False,
    geometry_dtype: str = "float64",
    runtime_options: dict[str, Any] | None = None,
) -> Any:
    """Export a checkpoint as a fused-preprocessing ONNX model (see the module docstring).

    The network inside is the checkpoint's model with BatchNorm folded; the graph is
    constant-folded with onnx-graphsurgeon, carries the model card (``cmdeploy.graph`` =
    ``"fused"``) and passes ``onnx.checker``.

    Args:
        checkpoint_path: a ``cmdeploy.train`` checkpoint.
        output_path: the ``.onnx`` file to write.
        opset: ONNX opset (>= 16 for GridSample).
        parity_slices: real (slice, points) cases; None = CT_small.dcm point sets plus shared-data
            objects when present.
        check_parity: compare with the NumPy runtime path (on by default).
        min_mask_agreement: least fraction of identical mask pixels (crop footprints).
        min_dice: least Dice between the two masks.
        debug: add the ``network_input`` and ``crop_probabilities`` outputs.
        geometry_dtype: ``"float64"`` (default; per-object geometry exactly as the NumPy path) or
            ``"float32"`` (a graph without FP64 tensors, for TensorRT).
        runtime_options: spec fields to replace in the exported model
            (:func:`cmdeploy.export.onnx_export.load_checkpoint`).

    Returns an :class:`cmdeploy.export.onnx_export.ExportResult`; raises
    :class:`cmdeploy.export.parity.ParityError` (nothing written) when parity fails.
    """
    from cmdeploy.export.onnx_export import (
        fuse_batchnorm,
        load_checkpoint,
        parity_cases,
        run_onnx,
        traced_model,
        write_export,
    )

    if not 16 <= opset <= MAX_FUSED_OPSET:
        raise ValueError(
            f"the fused graph needs opset 16..{MAX_FUSED_OPSET} (GridSample from 16; from 20 its "
            f"bilinear mode is named 'linear', which older TensorRT parsers read as nearest), "
            f"got {opset}"
        )
    ckpt, model, sha = load_checkpoint(checkpoint_path, runtime_options)
    spec = ckpt.spec
    network, n_fused = fuse_batchnorm(model)
    proto, meta = traced_model(
        lambda raw_path: export_fused_graph(
            network, spec, raw_path, opset=opset, debug=debug, geometry_dtype=geometry_dtype
        ),
        ckpt,
        sha,
        "fused",
        "cmdeploy fused model: slices (B, H, W) float32 HU + points (B, 4, 2) float32 "
        "(left, right, top, bottom; each (x = column, y = row) in slice pixels) -> probabilities "
        "(B, H, W) float32 (0 outside the crop)",
        {"cmdeploy.fused_geometry_dtype": geometry_dtype},
    )
    report = None
    if check_parity:
        report = fused_parity(
            model, lambda feeds: run_onnx(proto, feeds), spec, parity_cases(parity_slices)
        )
        report.check(
            max_mask_mismatch=1.0 - min_mask_agreement,
            min_dice=min_dice,
            what="fused graph vs NumPy runtime path",
        )
    return write_export(
        proto,
        output_path,
        graph="fused",
        opset=opset,
        checkpoint_sha256=sha,
        parity=report,
        batchnorm_fused=n_fused,
        metadata=meta,
    )


__all__ = [
    "DEBUG_OUTPUTS",
    "DEFAULT_FUSED_OPSET",
    "FUSED_INPUTS",
    "FUSED_MIN_DICE",
    "FUSED_MIN_MASK_AGREEMENT",
    "FUSED_OUTPUT",
    "GEOMETRY_DTYPES",
    "FusedSegmenter",
    "MAX_FUSED_OPSET",
    "confidence_map_t",
    "crop_geometry",
    "cross_centre_t",
    "export_fused",
    "export_fused_graph",
    "fused_parity",
    "gaussian_heatmap_t",
    "guidance_t",
    "numpy_reference",
    "run_fused",
]

