"""Dice and HD95 (cmdeploy.metrics) against hand-computed cases and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cmdeploy.evaluation.metrics import dice, erode, hausdorff, hd95, score_masks, surface, surface_distances


def square(shape, y0, y1, x0, x1) -> np.ndarray:
    """bool mask with rows y0..y1 and columns x0..x1 (inclusive) set."""
    m = np.zeros(shape, dtype=bool)
    m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_surface_of_square_is_its_ring():
    m = square((7, 7), 1, 5, 1, 5)
    ring = m & ~square((7, 7), 2, 4, 2, 4)
    np.testing.assert_array_equal(surface(m), ring)
    np.testing.assert_array_equal(erode(m), square((7, 7), 2, 4, 2, 4))


def test_surface_at_image_border_counts_outside_as_background():
    m = np.ones((4, 5), dtype=bool)
    s = surface(m)
    assert s[0].all() and s[-1].all() and s[:, 0].all() and s[:, -1].all()
    assert not s[1:-1, 1:-1].any()


def test_identical_masks():
    m = square((20, 20), 3, 12, 5, 15)
    assert dice(m, m) == 1.0
    assert hd95(m, m, (0.7, 1.3)) == 0.0
    assert hausdorff(m, m, percentile=100) == 0.0


def test_disjoint_squares_hand_computed():
    # A: rows 0..2, cols 0..2; B: rows 0..2, cols 10..12. A's surface pixels at columns 0, 1, 2 are
    # 10, 9, 8 px from B's left column; sorted [8, 8, 8, 9, 9, 10, 10, 10] -> P95 = 10 (index 6.65).
    a = square((5, 20), 0, 2, 0, 2)
    b = square((5, 20), 0, 2, 10, 12)
    assert dice(a, b) == 0.0
    assert hd95(a, b) == pytest.approx(10.0)
    assert hausdorff(a, b, percentile=100) == pytest.approx(10.0)
    assert hausdorff(a, b, percentile=0) == pytest.approx(8.0)
    assert hd95(a, b, (0.5, 3.0)) == pytest.approx(5.0)  # a shift along x scales with sx only


def test_partial_overlap_dice():
    a = square((10, 10), 0, 3, 0, 3)  # 16 px
    b = square((10, 10), 2, 5, 0, 3)  # 16 px, overlap rows 2..3 = 8 px
    assert dice(a, b) == pytest.approx(2 * 8 / 32)


@pytest.mark.parametrize(("dy", "dx", "expected"), [(0, 1, 0.7), (1, 0, 2.5), (0, -1, 0.7), (-1, 0, 2.5)])
def test_one_pixel_shift_anisotropic(dy, dx, expected):
    # half of the 16 surface pixels of a 5 x 5 square move by one pixel, so P95 = that pixel's size
    a = square((12, 12), 3, 7, 3, 7)
    b = np.roll(a, (dy, dx), axis=(0, 1))
    spacing = (0.7, 2.5)  # (sx, sy): columns 0.7 mm apart, rows 2.5 mm apart
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert hd95(b, a, spacing) == pytest.approx(expected)
    assert dice(a, b) == pytest.approx(2 * 20 / 50)


def test_spacing_is_x_then_y():
    a = np.zeros((6, 6), bool)
    b = np.zeros((6, 6), bool)
    a[0, 0] = True
    b[3, 4] = True  # 3 rows down, 4 columns right
    assert hd95(a, b, (2.0, 1.0)) == pytest.approx(math.sqrt((4 * 2.0) ** 2 + (3 * 1.0) ** 2))
    assert hd95(a, b) == pytest.approx(5.0)


def test_empty_mask_conventions():
    e = np.zeros((8, 8), bool)
    m = square((8, 8), 2, 4, 2, 4)
    assert dice(e, e) == 1.0 and hd95(e, e) == 0.0
    assert dice(m, e) == 0.0 and dice(e, m) == 0.0
    assert hd95(m, e) == math.inf and hd95(e, m) == math.inf
    s = score_masks(e, m, (1.0, 1.0))
    assert (s.dice, s.hd95_mm, s.pred_area_px, s.ref_area_px) == (0.0, math.inf, 0, 9)
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(e, m)


def test_percentile_ignores_a_small_outlier():
    ref = square((40, 40), 2, 11, 2, 11)  # 36 surface pixels
    pred = ref.copy()
    pred[35, 35] = True  # one far pixel: 1 of 37 pred surface distances
    d = math.hypot(35 - 11, 35 - 11)
    assert hausdorff(pred, ref, percentile=100) == pytest.approx(d)
    assert hd95(pred, ref) == 0.0


def test_bad_inputs():
    m = square((8, 8), 2, 4, 2, 4)
    with pytest.raises(ValueError, match="shape"):
        dice(m, m[:4])
    with pytest.raises(ValueError, match="2-D"):
        hd95(m[None], m[None])
    with pytest.raises(ValueError, match="spacing"):
        hd95(m, m, (0.0, 1.0))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff(m, m, percentile=101)


def _nearest(src: np.ndarray, dst: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Brute force: distance (mm) from each True pixel of ``src`` to the nearest one of ``dst``."""
    sx, sy = spacing
    a = np.argwhere(src) * np.array([sy, sx])
    b = np.argwhere(dst) * np.array([sy, sx])
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1).min(axis=1))


masks = arrays(np.bool_, st.tuples(st.integers(3, 24), st.integers(3, 24)))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), sx=st.floats(0.2, 4.0), sy=st.floats(0.2, 4.0))
def test_invariants(data, sx, sy):
    a = data.draw(masks)
    b = data.draw(arrays(np.bool_, a.shape))
    spacing = (sx, sy)
    d = dice(a, b)
    assert 0.0 <= d <= 1.0 and d == pytest.approx(dice(b, a))
    h = hd95(a, b, spacing)
    assert h == pytest.approx(hd95(b, a, spacing))
    assert h >= 0.0
    if a.any() and b.any():
        assert h <= hausdorff(a, b, spacing, percentile=100) + 1e-9
        # SciPy's EDT gives the exact nearest-surface distances of a brute-force search
        sa, sb = surface(a), surface(b)
        brute = (_nearest(sa, sb, spacing), _nearest(sb, sa, spacing))
        for x, y in zip(surface_distances(a, b, spacing), brute, strict=True):
            np.testing.assert_allclose(np.sort(x), np.sort(y), rtol=1e-9, atol=1e-9)
        # moving both masks together changes nothing
        pa, pb = np.pad(a, ((3, 0), (0, 5))), np.pad(b, ((3, 0), (0, 5)))
        assert hd95(pa, pb, spacing) == pytest.approx(h)
        assert dice(pa, pb) == pytest.approx(d)
    s = score_masks(a, b, spacing)
    assert s.dice == pytest.approx(d) and s.hd95_mm == pytest.approx(h)
    assert (s.pred_area_px, s.ref_area_px) == (int(a.sum()), int(b.sum()))
    assert dice(a, a) == 1.0 and hd95(a, a, spacing) == 0.0
