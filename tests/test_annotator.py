"""The simulated annotator: clicks on the outline near each extreme, hand error in mm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdeploy.annotator import (
    DEFAULT_ANNOTATOR,
    ClickModel,
    annotator_points,
    object_clicks,
    simulate_clicks,
)
from cmdeploy.guidance import extreme_points


def _rect(h: int = 60, w: int = 80, box=(10, 30, 20, 61)) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    y0, y1, x0, x1 = box
    m[y0:y1, x0:x1] = True
    return m


def test_no_tolerance_no_jitter_hits_the_extreme_coordinates() -> None:
    m = _rect()
    rng = np.random.default_rng(0)
    pts = annotator_points(m, (1.0, 1.0), ClickModel(0.0, 0.0), rng)
    exact = extreme_points(m)
    # the extreme coordinate is exact; along a flat side the other coordinate is anywhere on it
    np.testing.assert_array_equal(pts[[0, 1], 0], exact[[0, 1], 0])
    np.testing.assert_array_equal(pts[[2, 3], 1], exact[[2, 3], 1])
    assert 10 <= pts[0, 1] <= 29 and 20 <= pts[2, 0] <= 60


def test_flat_side_clicks_spread_along_the_flat_part() -> None:
    """A flat left side: the left click's row is drawn along the whole side, not at its median."""
    m = _rect()
    exact_model = ClickModel(0.0, 0.0)
    rows = [annotator_points(m, None, exact_model, np.random.default_rng(s))[0, 1] for s in range(200)]
    assert min(rows) <= 12 and max(rows) >= 27


def test_tolerance_band_on_a_pointed_object() -> None:
    """A diamond: the left click stays within t px of the tip (outline pixels only)."""
    yy, xx = np.mgrid[:81, :81]
    m = np.abs(xx - 40) + np.abs(yy - 40) <= 30
    for s in range(100):
        p = annotator_points(m, None, ClickModel(3.0, 0.0), np.random.default_rng(s))
        assert 10 <= p[0, 0] <= 13 and abs(p[0, 1] - 40) <= 3
        # on the outline seen from the left: the left-most mask pixel of its row
        row = int(p[0, 1])
        assert p[0, 0] == np.nonzero(m[row])[0].min()


def test_jitter_is_in_millimetres() -> None:
    """The same radius in mm is twice as many pixels at 0.5 mm spacing as at 1 mm."""
    m = _rect()
    model = ClickModel(0.0, 3.0)

    def max_offset(spacing: float) -> float:
        off = []
        for s in range(300):
            rng = np.random.default_rng(s)
            base = annotator_points(m, (spacing, spacing), ClickModel(0.0, 0.0), np.random.default_rng(s))
            p = annotator_points(m, (spacing, spacing), model, rng)
            off.append(np.abs(p[0, 0] - base[0, 0]))
        return float(np.max(off))

    a, b = max_offset(1.0), max_offset(0.5)
    assert 2.5 < a <= 3.0 + 1e-6
    assert 5.0 < b <= 6.0 + 1e-6


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(5, 40), w=st.integers(5, 40), seed=st.integers(0, 2**31 - 1),
    t=st.floats(0, 6), j=st.floats(0, 5), sx=st.floats(0.5, 3.0), sy=st.floats(0.5, 3.0),
)
def test_clicks_inside_slice_ordered_and_near_object(h, w, seed, t, j, sx, sy) -> None:
    rng = np.random.default_rng(seed)
    m = rng.random((h, w)) > 0.5
    if not m.any():
        m[h // 2, w // 2] = True
    pts = annotator_points(m, (sx, sy), ClickModel(t, j), rng)
    assert pts.shape == (4, 2) and pts.dtype == np.float32
    assert np.all(pts[:, 0] >= 0) and np.all(pts[:, 0] <= w - 1)
    assert np.all(pts[:, 1] >= 0) and np.all(pts[:, 1] <= h - 1)
    assert pts[0, 0] <= pts[1, 0] and pts[2, 1] <= pts[3, 1]
    # every click is within t + hand error of the object's bounding box
    ys, xs = np.nonzero(m)
    slack_x, slack_y = t + j / sx + 1e-4, t + j / sy + 1e-4
    assert np.all(pts[:, 0] >= xs.min() - slack_x) and np.all(pts[:, 0] <= xs.max() + slack_x)
    assert np.all(pts[:, 1] >= ys.min() - slack_y) and np.all(pts[:, 1] <= ys.max() + slack_y)


def test_deterministic_for_a_seed_and_works_on_float_clouds() -> None:
    m = _rect()
    a = annotator_points(m, (0.8, 0.8), DEFAULT_ANNOTATOR, np.random.default_rng(5))
    b = annotator_points(m, (0.8, 0.8), DEFAULT_ANNOTATOR, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    ys, xs = np.nonzero(m)
    theta = 0.3
    c, s = np.cos(theta), np.sin(theta)
    cloud = np.stack([xs * c - ys * s, xs * s + ys * c], axis=1)
    p = simulate_clicks(cloud, None, ClickModel(2.0, 0.0), np.random.default_rng(1))
    assert p[0, 0] <= cloud[:, 0].min() + 2.0 + 1e-9 and p[1, 0] >= cloud[:, 0].max() - 2.0 - 1e-9


def test_object_clicks_protocols() -> None:
    m = _rect()
    np.testing.assert_array_equal(object_clicks(m, "exact"), extreme_points(m))
    with pytest.raises(ValueError, match="generator"):
        object_clicks(m, "annotator")
    with pytest.raises(ValueError, match="protocol"):
        object_clicks(m, "sloppy")
    with pytest.raises(ValueError, match="tolerance"):
        ClickModel(-1.0, 0.0)
