"""Tests of cmdeploy.guidance: the paper's confidence map, DEXTR Gaussians, extreme points.

Pixel (x, y) of a map ``f`` is ``f[y, x]`` (x = column, y = row). Points are left, right, top, bottom.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cmdeploy.guidance import (
    confidence_map,
    cross_centre,
    extreme_points,
    gaussian_heatmap,
    validate_points,
)

ROOT = Path(__file__).resolve().parents[1]
PROPS = settings(max_examples=60, deadline=None)
GRID = (48, 48)  # (H, W) of the property-test grids


def _load_literal():
    """benchmarks/literal_algorithm1.py (not a package), imported by path."""
    path = ROOT / "benchmarks" / "literal_algorithm1.py"
    spec = importlib.util.spec_from_file_location("literal_algorithm1", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


literal = _load_literal()


# ---------------------------------------------------------------------------------------- strategies


@st.composite
def integer_crosses(draw):
    """Crossing segments with integer end points through an integer centre ``c`` on GRID.

    A = c - a1*ua .. c + a2*ua, B = c - b1*ub .. c + b2*ub, with small integer direction vectors
    (ua_x >= 1 keeps left_x <= right_x, ub_y >= 1 keeps top_y <= bottom_y), so every
    ``c + k*ua`` (k = -a1..a2) is a pixel centre on A, and likewise for B.
    Returns (points (4, 2) float64, c, ua, ub, (a1, a2, b1, b2)).
    """
    c = np.array([draw(st.integers(16, 31)), draw(st.integers(16, 31))])
    ua = np.array([draw(st.integers(1, 3)), draw(st.integers(-3, 3))])
    ub = np.array([draw(st.integers(-3, 3)), draw(st.integers(1, 3))])
    assume(ua[0] * ub[1] - ua[1] * ub[0] != 0)
    ext = [draw(st.integers(1, 5)) for _ in range(4)]
    pts = np.array([c - ext[0] * ua, c + ext[1] * ua, c - ext[2] * ub, c + ext[3] * ub], np.float64)
    return pts, c, ua, ub, ext


@st.composite
def generic_points(draw):
    """Off-grid crossing segments: float centre, directions and extents (>= 1.5 px) inside GRID."""
    c = np.array([draw(st.floats(14.0, 34.0)), draw(st.floats(14.0, 34.0))])
    theta_a = math.radians(draw(st.floats(-55.0, 55.0)))
    theta_b = math.radians(draw(st.floats(35.0, 145.0)))  # y points down: B runs top -> bottom
    assume(abs(math.sin(theta_b - theta_a)) > 0.25)
    ua = np.array([math.cos(theta_a), math.sin(theta_a)])
    ub = np.array([math.cos(theta_b), math.sin(theta_b)])
    ext = [draw(st.floats(1.5, 12.0)) for _ in range(4)]
    return np.array([c - ext[0] * ua, c + ext[1] * ua, c - ext[2] * ub, c + ext[3] * ub])


def level_band(points: np.ndarray, shape: tuple[int, int], tol: float = 1e-3) -> np.ndarray:
    """Pixels within ``tol`` px of the line through c perpendicular to A or to B.

    sigma_S switches from |c-p| to |c-q| across that line, so the paper's f is discontinuous there;
    comparisons between two float32 evaluations of transformed inputs skip it.
    """
    pts = np.asarray(points, np.float64)
    c = cross_centre(pts[None])[0]
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    band = np.zeros(shape, bool)
    for i, j in ((0, 1), (2, 3)):
        d = pts[j] - pts[i]
        n = math.hypot(*d)
        if n > 0:
            band |= np.abs((xx - c[0]) * d[0] + (yy - c[1]) * d[1]) / n < tol
    return band


def assert_maps_close(actual, expected, skip, atol=2e-5):
    diff = np.where(skip, 0.0, np.abs(np.asarray(actual, np.float64) - expected))
    assert diff.max() <= atol, (
        f"max diff {diff.max():.3g} at (y, x) = {np.unravel_index(diff.argmax(), diff.shape)}"
    )


# ------------------------------------------------------------------------- hand-computed values


def test_perpendicular_cross_hand_values():
    # A: (3,5)-(11,5) horizontal, B: (5,2)-(5,9) vertical, c = (5,5).
    # sigma_A = |c-left| = 2 for x < 5, |c-right| = 6 for x > 5; sigma_B = 3 above (y<5), 4 below.
    pts = [[3, 5], [11, 5], [5, 2], [5, 9]]
    f = confidence_map(pts, (14, 13))
    assert f.dtype == np.float32 and f.shape == (14, 13)
    # (7,3): dist_A = 2, right side -> d_A = 2/6 = 1/3; dist_B = 2, top side -> d_B = 2/3.
    # d1 = 1/3, d2 = sqrt(1/9 + 4/9) = sqrt(5)/3, f = 1 / (1 + sqrt(5)/9) = 9 / (9 + sqrt(5))
    assert f[3, 7] == pytest.approx(9 / (9 + math.sqrt(5)), abs=1e-6)
    # (0,5): dist_A = 3 (to left end (3,5)), sigma 2 -> 3/2. dist_B = 5, pixel level with c along B
    # (tie) -> sigma_B = (3 + 4)/2 = 3.5 -> d_B = 10/7. d1 = 10/7,
    # d2 = sqrt(9/4 + 100/49) = sqrt(841/196) = 29/14, d1*d2 = 290/98 = 145/49, f = 49/194
    assert f[5, 0] == pytest.approx(49 / 194, abs=1e-6)
    # (3,12): dist_B = |(3,12)-(5,9)| = sqrt(13), bottom side sigma 4 -> sqrt(13)/4.
    # dist_A = 12 - 5 = 7 (x = 3 is A's left end column), sigma 2 -> 7/2.
    # d1 = sqrt(13)/4, d2 = sqrt(13/16 + 196/16) = sqrt(209)/4, d1*d2 = sqrt(2717)/16
    assert f[12, 3] == pytest.approx(16 / (16 + math.sqrt(2717)), abs=1e-6)
    # (12,0): dist_A = |(12,0)-(11,5)| = sqrt(26), sigma 6; dist_B = |(12,0)-(5,2)| = sqrt(53),
    # sigma 3. d1 = sqrt(26)/6, d2 = sqrt(26/36 + 212/36) = sqrt(238)/6, d1*d2 = sqrt(6188)/36
    assert f[0, 12] == pytest.approx(36 / (36 + math.sqrt(6188)), abs=1e-6)
    # on the segments and at c: exactly 1
    for x, y in [(5, 5), (3, 5), (11, 5), (8, 5), (5, 2), (5, 9), (5, 7)]:
        assert f[y, x] == 1.0


def test_non_perpendicular_pair_hand_values():
    # A: (0,2)-(12,8), direction (2,1)/sqrt(5); B: (4,0)-(4,10) vertical.
    # c: line A is y = 2 + x/2, at x = 4 -> c = (4,4).
    # sigma_A = |c-left| = |(4,2)| = sqrt(20) on the left, |(12,8)-(4,4)| = sqrt(80) on the right;
    # sigma_B = 4 above c, 6 below.
    pts = [[0, 2], [12, 8], [4, 0], [4, 10]]
    f = confidence_map(pts, (12, 16))
    # (8,2): r = (8,0) from left; perp = |8*1 - 0*2|/sqrt(5) = 8/sqrt(5); projection 16/sqrt(5) is
    # inside [0, 6 sqrt(5)]. (x-c).(q-p) = (4,-2).(12,6) = 36 > 0 -> sigma = sqrt(80) = 4 sqrt(5):
    # d_A = 8/20 = 0.4. B: dist 4, above c -> d_B = 1. f = 1/(1 + 0.4*sqrt(0.16 + 1))
    assert f[2, 8] == pytest.approx(1 / (1 + 0.4 * math.sqrt(1.16)), abs=1e-6)
    # (0,8): r = (0,6); perp = |0*1 - 6*2|/sqrt(5) = 12/sqrt(5); (x-c).(12,6) = -48 + 24 < 0 ->
    # sigma = 2 sqrt(5): d_A = 12/10 = 1.2. B: dist 4, below c -> 4/6 = 2/3.
    # d1 = 2/3, d2 = sqrt(1.44 + 4/9) = sqrt(16.96)/3, d1*d2 = 2 sqrt(16.96)/9
    assert f[8, 0] == pytest.approx(1 / (1 + 2 * math.sqrt(16.96) / 9), abs=1e-6)
    # (14,10): projection (28 + 8)/sqrt(5) > length 6 sqrt(5) -> nearest is right end (12,8):
    # dist = 2 sqrt(2), sigma 4 sqrt(5): d_A = sqrt(8/80) = sqrt(0.1). B: dist 10, below -> 10/6.
    # d1 = sqrt(0.1), d2 = sqrt(0.1 + 25/9), d1*d2 = sqrt(0.01 + 2.5/9)
    assert f[10, 14] == pytest.approx(1 / (1 + math.sqrt(0.01 + 2.5 / 9)), abs=1e-6)
    for x, y in [(4, 4), (0, 2), (2, 3), (10, 7), (12, 8), (4, 0), (4, 9)]:
        assert f[y, x] == pytest.approx(1.0, abs=1e-6)


def test_parallel_lines_use_mean_centre_hand_values():
    # A: (0,0)-(12,0) and B: (2,4)-(8,4) are parallel -> c = mean = (22/4, 8/4) = (5.5, 2).
    # sigma_A: |c-(0,0)| = sqrt(5.5^2 + 2^2) = sqrt(34.25) left, |c-(12,0)| = sqrt(46.25) right.
    # sigma_B: |c-(2,4)| = sqrt(3.5^2 + 2^2) = sqrt(16.25) on the top point's side (x < 5.5),
    #          |c-(8,4)| = sqrt(2.5^2 + 2^2) = sqrt(10.25) on the bottom point's side.
    pts = [[0, 0], [12, 0], [2, 4], [8, 4]]
    np.testing.assert_allclose(cross_centre(np.asarray(pts, float)[None]), [[5.5, 2.0]])
    f = confidence_map(pts, (6, 14))
    # (3,2): dist_A = 2, left -> 2/sqrt(34.25); dist_B = 2, top side -> 2/sqrt(16.25).
    d_a, d_b = 2 / math.sqrt(34.25), 2 / math.sqrt(16.25)
    assert f[2, 3] == pytest.approx(1 / (1 + min(d_a, d_b) * math.hypot(d_a, d_b)), abs=1e-6)
    assert 1 / (1 + min(d_a, d_b) * math.hypot(d_a, d_b)) == pytest.approx(0.829268, abs=1e-6)
    # (10,4): dist_A = 4, right -> 4/sqrt(46.25); B: beyond (8,4) by 2, bottom side -> 2/sqrt(10.25)
    d_a, d_b = 4 / math.sqrt(46.25), 2 / math.sqrt(10.25)
    assert f[4, 10] == pytest.approx(1 / (1 + min(d_a, d_b) * math.hypot(d_a, d_b)), abs=1e-6)
    assert f[0, 6] == 1.0 and f[4, 5] == 1.0


def test_zero_length_segment_hand_values():
    # A is a single point (5,5): lines undefined -> c = mean = (5, (5+5+2+10)/4) = (5, 5.5).
    # sigma_A = |c-(5,5)| = 0.5, clamped to 1; sigma_B = 3.5 above c, 4.5 below.
    pts = [[5, 5], [5, 5], [5, 2], [5, 10]]
    f = confidence_map(pts, (13, 10))
    # (8,5): dist_A = 3 -> 3; dist_B = 3, above -> 3/3.5 = 6/7. d1 = 6/7,
    # d2 = sqrt(9 + 36/49) = sqrt(477)/7, f = 1/(1 + 6 sqrt(477)/49) = 49/(49 + 6 sqrt(477))
    assert f[5, 8] == pytest.approx(49 / (49 + 6 * math.sqrt(477)), abs=1e-6)
    # (5,0): B beyond top by 2 -> 2/3.5 = 4/7; dist_A = 5 -> 5. d2 = sqrt(25 + 16/49) = sqrt(1241)/7
    assert f[0, 5] == pytest.approx(49 / (49 + 4 * math.sqrt(1241)), abs=1e-6)
    # (2,12): B beyond bottom (5,10): sqrt(13)/4.5; A: |(2,12)-(5,5)| = sqrt(58), sigma 1.
    d_a, d_b = math.sqrt(58), math.sqrt(13) / 4.5
    assert f[12, 2] == pytest.approx(1 / (1 + d_b * math.sqrt(58 + 13 / 20.25)), abs=1e-6)
    assert f[12, 2] == pytest.approx(1 / (1 + min(d_a, d_b) * math.hypot(d_a, d_b)), abs=1e-6)
    assert f[5, 5] == 1.0 and f[10, 5] == 1.0


# ------------------------------------------------------------------- literal Algorithm 1 parity


def test_matches_literal_algorithm1_small_grid():
    rng = np.random.default_rng(7)
    sets = [np.array([[3.3, 20.7], [44.1, 17.2], [25.6, 2.4], [21.9, 37.5]])]
    for _ in range(3):  # off-grid points: no pixel lies exactly on a sigma switch line
        c = rng.uniform(16, 30, 2)
        ua, ub = np.array([1.0, rng.uniform(-0.6, 0.6)]), np.array([rng.uniform(-0.6, 0.6), 1.0])
        e = rng.uniform(3, 14, 4)
        sets.append(np.array([c - e[0] * ua, c + e[1] * ua, c - e[2] * ub, c + e[3] * ub]))
    batch = confidence_map(np.stack(sets), (40, 48))
    for pts, f in zip(sets, batch, strict=True):
        ref = np.array(literal.confidence_map_literal(pts, (40, 48)))
        assert np.abs(f - ref).max() <= 1e-5


# --------------------------------------------------------------------------------- properties


@PROPS
@given(integer_crosses())
def test_one_on_both_segments_and_at_centre(case):
    pts, c, ua, ub, (a1, a2, b1, b2) = case
    f = confidence_map(pts, GRID)
    assert f[c[1], c[0]] == pytest.approx(1.0, abs=1e-5)
    for k in range(-a1, a2 + 1):
        x, y = c + k * ua
        assert f[y, x] == pytest.approx(1.0, abs=1e-5), (k, "A")
    for k in range(-b1, b2 + 1):
        x, y = c + k * ub
        assert f[y, x] == pytest.approx(1.0, abs=1e-5), (k, "B")


def test_axis_aligned_segments_exactly_one():
    f = confidence_map([[2, 9], [30, 9], [11, 1], [11, 20]], (24, 32))
    assert np.all(f[9, 2:31] == 1.0) and np.all(f[1:21, 11] == 1.0)
    assert np.all(f[9, :2] < 1.0) and np.all(f[9, 31:] < 1.0) and f[0, 11] < 1.0


@PROPS
@given(generic_points())
def test_values_in_open_unit_interval(pts):
    f = confidence_map(pts, GRID)
    assert f.dtype == np.float32
    assert np.all(f > 0.0) and np.all(f <= 1.0)
    # the pixel nearest c is <= sqrt(0.5) px from both segments and every sigma is >= 1.5 px, so
    # d_A, d_B <= 0.48 there and f >= 1 / (1 + 0.48 * 0.48 * sqrt(2)) > 0.75
    cx, cy = np.rint(cross_centre(pts[None])[0]).astype(int)
    assert f[cy, cx] > 0.75


_RAYS = [
    (1, 0),
    (0, 1),
    (-1, 0),
    (0, -1),
    (1, 1),
    (-1, 1),
    (1, -1),
    (-1, -1),
    (2, 1),
    (1, 2),
    (-2, 1),
    (1, -2),
    (-1, -2),
    (2, -1),
    (-2, -1),
    (3, 1),
    (-1, 3),
    (3, -2),
    (-3, 2),
]


@PROPS
@given(integer_crosses())
def test_non_increasing_along_rays_from_centre(case):
    pts, c, ua, ub, _ = case
    f = confidence_map(pts, GRID).astype(np.float64)
    h, w = GRID
    checked = 0
    for v in map(np.array, _RAYS):
        vals = []
        k = 0
        while 0 <= c[0] + k * v[0] < w and 0 <= c[1] + k * v[1] < h:
            x, y = c + k * v
            vals.append(f[y, x])
            k += 1
        steps = np.diff(vals)
        assert np.all(steps <= 1e-6), (tuple(v), vals)
        checked += 1
    assert checked >= 10


@PROPS
@given(generic_points(), st.integers(0, 9), st.integers(0, 9))
def test_translation(pts, tx, ty):
    h, w = GRID
    f = confidence_map(pts, GRID)
    g = confidence_map(pts + [tx, ty], (h + ty, w + tx))[ty:, tx:]
    assert_maps_close(g, f, level_band(pts, GRID))


@PROPS
@given(generic_points())
def test_rot90(pts):
    # np.rot90 (counter-clockwise): new[i, j] = old[j, W-1-i], i.e. (x, y) -> (y, W-1-x).
    # New left (min x' = min y) is the old top, new right the old bottom, new top (min y' = max x)
    # the old right, new bottom the old left.
    h, w = 40, 48
    f = confidence_map(pts, (h, w))

    def rot(p):
        return [p[1], w - 1 - p[0]]

    left, right, top, bottom = pts
    rotated = np.array([rot(top), rot(bottom), rot(right), rot(left)])
    g = confidence_map(rotated, (w, h))
    assert_maps_close(g, np.rot90(f), np.rot90(level_band(pts, (h, w))))


@PROPS
@given(generic_points())
def test_flips(pts):
    h, w = GRID
    f = confidence_map(pts, GRID)
    skip = level_band(pts, GRID)
    left, right, top, bottom = pts
    # fliplr: x -> W-1-x; left and right swap roles
    mx = np.array([-1.0, 1.0]), np.array([w - 1.0, 0.0])
    lr = np.array([right, left, top, bottom]) * mx[0] + mx[1]
    assert_maps_close(confidence_map(lr, GRID), np.fliplr(f), np.fliplr(skip))
    # flipud: y -> H-1-y; top and bottom swap roles
    my = np.array([1.0, -1.0]), np.array([0.0, h - 1.0])
    ud = np.array([left, right, bottom, top]) * my[0] + my[1]
    assert_maps_close(confidence_map(ud, GRID), np.flipud(f), np.flipud(skip))


@PROPS
@given(generic_points(), st.integers(2, 3))
def test_integer_scaling(pts, k):
    # d_S = dist/sigma is scale invariant (every sigma >= 1.5 px here, so the 1 px clamp is inactive):
    # f(k x; k points) == f(x; points) at the pixels x of the small grid
    h, w = GRID
    f = confidence_map(pts, GRID)
    g = confidence_map(pts * k, (k * (h - 1) + 1, k * (w - 1) + 1))[::k, ::k]
    assert_maps_close(g, f, level_band(pts, GRID))


@PROPS
@given(st.lists(generic_points(), min_size=1, max_size=4))
def test_batch_equals_per_item(sets):
    batch = confidence_map(np.stack(sets), (32, 40))
    assert batch.shape == (len(sets), 32, 40) and batch.dtype == np.float32
    for pts, f in zip(sets, batch, strict=True):
        np.testing.assert_array_equal(f, confidence_map(pts, (32, 40)))


def test_tie_rule_on_tilted_integer_segment():
    # A: (9,6)-(13,12), direction (2,3); B: (15,9)-(7,21), direction (-2,3); c = (13,12) = right end.
    # Pixel (7,16): (x-c).(q-p) = (-6,4).(4,6) = 0 -> level with c along A: documented tie sigma_A
    # = (|c-p| + max(|c-q|, 1))/2 = (sqrt(52) + 1)/2. dist_A = |(7,16)-(13,12)| = sqrt(52).
    # B: (x-c).(-8,12) = 48 + 48 > 0 -> bottom side, sigma_B = |c-(7,21)| = sqrt(117);
    # dist_B = perpendicular distance |(-6,4) x (-2,3)|/sqrt(13) = |-18 + 8|/sqrt(13) = 10/sqrt(13).
    pts = [[9, 6], [13, 12], [15, 9], [7, 21]]
    d_a = math.sqrt(52) / ((math.sqrt(52) + 1) / 2)
    d_b = (10 / math.sqrt(13)) / math.sqrt(117)
    expected = 1 / (1 + min(d_a, d_b) * math.hypot(d_a, d_b))
    assert literal.confidence_map_literal(pts, (24, 28))[16][7] == pytest.approx(expected, abs=1e-9)
    assert confidence_map(pts, (24, 28))[16, 7] == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------------------ other variants


def test_other_variants():
    pts = [[3, 10], [28, 12], [14, 2], [16, 21]]
    authors = confidence_map(pts, (24, 32), variant="authors")
    assert authors.min() == 0.0 and authors.max() == 1.0  # min-max scaled
    for variant in ("chebyshev", "mahalanobis"):
        region = confidence_map(pts, (24, 32), variant=variant)
        assert set(np.unique(region)) <= {0.0, 1.0}
        assert region[11, 15] == 1.0 and region[0, 31] == 0.0
    cheb = confidence_map(pts, (24, 32), variant="chebyshev")
    maha = confidence_map(pts, (24, 32), variant="mahalanobis")
    assert np.all(maha <= cheb)  # sqrt(a^2 + b^2) >= max(a, b)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("points", "match"),
    [
        (np.zeros((3, 2)), "shape"),
        (np.zeros((4, 3)), "shape"),
        (np.zeros((2, 4, 2, 1)), "shape"),
        ([[1, 1], [5, np.nan], [3, 0], [3, 4]], "NaN or inf"),
        ([[1, 1], [5, 1], [np.inf, 0], [3, 4]], "NaN or inf"),
        ([[5, 1], [1, 1], [3, 0], [3, 4]], "order"),
        ([[1, 1], [5, 1], [3, 4], [3, 0]], "order"),
        ([[2, 2]] * 4, "identical"),
    ],
)
def test_validation_errors(points, match):
    with pytest.raises(ValueError, match=match):
        validate_points(points)
    with pytest.raises(ValueError, match=match):
        confidence_map(points, (8, 8))
    with pytest.raises(ValueError, match=match):
        gaussian_heatmap(points, (8, 8))


def test_validation_names_bad_batch_item_and_other_arguments():
    batch = np.array([[[1, 1], [5, 1], [3, 0], [3, 4]], [[5, 1], [1, 1], [3, 0], [3, 4]]], float)
    with pytest.raises(ValueError, match=r"items \[1\]"):
        confidence_map(batch, (8, 8))
    good = [[1, 1], [5, 1], [3, 0], [3, 4]]
    with pytest.raises(ValueError, match="variant"):
        confidence_map(good, (8, 8), variant="nope")
    with pytest.raises(ValueError, match="shape"):
        confidence_map(good, (0, 8))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_heatmap(good, (8, 8), sigma=0.0)


# --------------------------------------------------------------------------- gaussian_heatmap


def test_gaussian_heatmap_one_at_integer_points():
    pts = np.array([[2, 7], [20, 9], [11, 1], [12, 15]], float)
    g = gaussian_heatmap(pts, (18, 24), sigma=3.0)
    assert g.dtype == np.float32 and g.shape == (18, 24)
    for x, y in pts.astype(int):
        assert g[y, x] == 1.0
    assert g.max() == 1.0 and g.min() > 0.0


@PROPS
@given(generic_points(), st.floats(1.0, 12.0))
def test_gaussian_heatmap_equals_direct_formula(pts, sigma):
    g = gaussian_heatmap(pts, GRID, sigma=sigma)
    yy, xx = np.mgrid[: GRID[0], : GRID[1]].astype(np.float64)
    direct = np.max([np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * sigma**2)) for px, py in pts], axis=0)
    np.testing.assert_allclose(g, direct, rtol=1e-5, atol=1e-6)  # float32 points and exps
    batch = gaussian_heatmap(np.stack([pts + [1.0, -0.5], pts]), GRID, sigma)
    np.testing.assert_array_equal(batch[1], g)
    np.testing.assert_array_equal(batch[0], gaussian_heatmap(pts + [1.0, -0.5], GRID, sigma))


# ---------------------------------------------------------------------------- extreme_points


def _brute_extreme_points(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    cols = [x for x in range(w) if mask[:, x].any()]
    rows = [y for y in range(h) if mask[y].any()]

    def lower_median(values):
        values = sorted(values)
        return values[(len(values) - 1) // 2]

    x_lo, x_hi, y_lo, y_hi = cols[0], cols[-1], rows[0], rows[-1]
    return np.array(
        [
            [x_lo, lower_median([y for y in range(h) if mask[y, x_lo]])],
            [x_hi, lower_median([y for y in range(h) if mask[y, x_hi]])],
            [lower_median([x for x in range(w) if mask[y_lo, x]]), y_lo],
            [lower_median([x for x in range(w) if mask[y_hi, x]]), y_hi],
        ],
        np.float32,
    )


masks = st.builds(
    lambda seed, h, w, p: np.random.default_rng(seed).random((h, w)) < p,
    st.integers(0, 2**31),
    st.integers(1, 14),
    st.integers(1, 14),
    st.floats(0.05, 0.9),
).filter(lambda m: m.any())


@PROPS
@given(masks)
def test_extreme_points_brute_force(mask):
    pts = extreme_points(mask)
    assert pts.dtype == np.float32 and pts.shape == (4, 2)
    np.testing.assert_array_equal(pts, _brute_extreme_points(mask))
    for x, y in pts.astype(int):
        assert mask[y, x]


def test_extreme_points_tie_is_lower_median():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 1] = True  # left column rows 2..5 -> lower median 3
    mask[4, 1:9] = True
    mask[1, 3:7] = True  # top row x = 3..6 -> lower median 4
    mask[1:9, 5] = True
    np.testing.assert_array_equal(extreme_points(mask), [[1, 3], [8, 4], [4, 1], [5, 8]])


@PROPS
@given(masks, st.floats(0.1, 3.0), st.integers(0, 2**31))
def test_extreme_points_jitter(mask, jitter, seed):
    exact = extreme_points(mask)
    h, w = mask.shape
    got = extreme_points(mask, jitter=jitter, rng=np.random.default_rng(seed))
    again = extreme_points(mask, jitter=jitter, rng=np.random.default_rng(seed))
    np.testing.assert_array_equal(got, again)
    assert got[0, 0] <= got[1, 0] and got[2, 1] <= got[3, 1]
    assert np.all(got >= 0) and np.all(got[:, 0] <= w - 1) and np.all(got[:, 1] <= h - 1)
    # each jittered pair is within `jitter` of the exact pair (as a set: the pair may be re-sorted)
    for i, j in ((0, 1), (2, 3)):
        straight = np.abs(got[[i, j]] - exact[[i, j]]).max()
        swapped = np.abs(got[[j, i]] - exact[[i, j]]).max()
        assert min(straight, swapped) <= jitter + 1e-5
    if exact[1, 0] - exact[0, 0] > 2 * jitter and exact[3, 1] - exact[2, 1] > 2 * jitter:
        assert np.abs(got - exact).max() <= jitter + 1e-5  # no re-sorting needed: order kept as is


def test_extreme_points_errors():
    with pytest.raises(ValueError, match="empty"):
        extreme_points(np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="2-D"):
        extreme_points(np.ones((2, 4, 4), bool))


# --------------------------------------------------------------------- the `guidance` command


def _guidance_app():
    import typer

    from cmdeploy.commands.guidance import guidance

    app = typer.Typer()
    app.command()(guidance)
    return app


def test_guidance_command_renders_example_points(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    from PIL import Image
    from typer.testing import CliRunner

    dcm = pydicom_data.get_testdata_file("CT_small.dcm")
    csv_path = ROOT / "examples" / "ct_small_points.csv"
    out = tmp_path / "sub" / "cm.png"
    result = CliRunner().invoke(
        _guidance_app(), ["--input", dcm, "--points", str(csv_path), "--output", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "2 object(s)" in result.output
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (128, 128, 3)  # the slice's own grid
    assert [p.name for p in out.parent.iterdir()] == ["cm.png"]  # temp file renamed away
    # vertebral body between its segments (x=60, y=30): f ~ 1 -> the pixel is recoloured
    r, g, b = img[30, 60]
    assert max(r, g, b) - min(r, g, b) > 60
    # far from both objects (x=20, y=110): f ~ 0 -> grey
    r, g, b = img[110, 20]
    assert max(r, g, b) - min(r, g, b) < 25


def test_guidance_command_variants_match_library():
    from cmdeploy.commands.guidance import _VARIANTS
    from cmdeploy.guidance import VARIANTS

    assert _VARIANTS == VARIANTS


def test_guidance_command_bad_inputs_exit_2(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    from typer.testing import CliRunner

    dcm = pydicom_data.get_testdata_file("CT_small.dcm")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "slice_index,label,left_x,left_y,right_x,right_y,top_x,top_y,bottom_x,bottom_y\n"
        "0,x,50,5,10,5,30,0,30,20\n"
    )
    runner = CliRunner()
    args = ["--input", dcm, "--points", str(bad), "--output", str(tmp_path / "o.png")]
    assert runner.invoke(_guidance_app(), args).exit_code == 2
    good = str(ROOT / "examples" / "ct_small_points.csv")
    args = ["--input", dcm, "--points", good, "--output", str(tmp_path / "o.png"), "--variant", "nope"]
    result = runner.invoke(_guidance_app(), args)
    assert result.exit_code == 2 and "variant" in result.output
    assert not (tmp_path / "o.png").exists()


# ------------------------------------------------------------- fast path (issue 18): exactness


def _dense_reference(points: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The paper map with the same float32 operations as confidence_map, every pixel tested densely
    for its side of c (no band, no sparse level pixels): the implementation must equal it exactly."""
    from cmdeploy.guidance import segment_frame

    pts = validate_points(points)
    c = cross_centre(pts)
    h, w = shape
    sq = []
    frames = (segment_frame(pts[:, 0], pts[:, 1], c, "side"), segment_frame(pts[:, 2], pts[:, 3], c, "side"))
    for fr in frames:
        f32 = np.float32
        rx = np.arange(w, dtype=f32) - f32(fr.px[0])
        ry = np.arange(h, dtype=f32) - f32(fr.py[0])
        along = (ry * f32(fr.uy[0]))[:, None] + (rx * f32(fr.ux[0]))[None, :]
        perp = (ry * f32(fr.ux[0]))[:, None] - (rx * f32(fr.uy[0]))[None, :]
        beyond = along - np.clip(along, f32(0), f32(fr.length[0]))
        lo, hi = f32(fr.t_c[0] - 1e-3), f32(fr.t_c[0] + 1e-3)
        k = np.where(along < lo, f32(fr.k_p[0]), np.where(along > hi, f32(fr.k_q[0]), f32(fr.k_tie[0])))
        sq.append((perp * perp + beyond * beyond) * k)
    a, b = sq
    return (f32(1) / (f32(1) + np.sqrt(np.minimum(a, b) * (a + b)))).astype(np.float32)


@PROPS
@given(integer_crosses())
def test_band_and_sparse_level_pixels_equal_the_dense_side_test_on_integer_points(case):
    # integer points put whole lines of pixels exactly level with c: the tie rule must hit them all
    pts = case[0]
    np.testing.assert_array_equal(confidence_map(pts, GRID), _dense_reference(pts, GRID))


@PROPS
@given(generic_points(), st.integers(0, 3))
def test_band_and_sparse_level_pixels_equal_the_dense_side_test(pts, k):
    pts = np.asarray(pts) * (1 + k)  # larger grids: the band is a small part of the map
    shape = (GRID[0] * (1 + k), GRID[1] * (1 + k))
    np.testing.assert_array_equal(confidence_map(pts, shape), _dense_reference(pts, shape))


def test_out_argument_writes_strided_network_input_and_checks_it():
    sets = np.array([[[3.3, 20.7], [44.1, 17.2], [25.6, 2.4], [21.9, 37.5]],
                     [[5.0, 9.0], [30.0, 12.0], [14.0, 1.0], [16.0, 21.0]]])
    x = np.zeros((2, 3, 40, 48), np.float32)
    res = confidence_map(sets, (40, 48), out=x[:, 1])
    assert np.shares_memory(res, x)
    np.testing.assert_array_equal(x[:, 1], confidence_map(sets, (40, 48)))
    assert not x[:, 0].any() and not x[:, 2].any()  # nothing else touched
    one = np.empty((40, 48), np.float32)
    np.testing.assert_array_equal(confidence_map(sets[0], (40, 48), out=one), x[0, 1])
    with pytest.raises(ValueError, match="shape"):
        confidence_map(sets, (40, 48), out=np.empty((2, 40, 47), np.float32))
    with pytest.raises(ValueError, match="float32"):
        confidence_map(sets, (40, 48), out=np.empty((2, 40, 48), np.float64))
    with pytest.raises(ValueError, match="contiguous"):
        confidence_map(sets, (40, 48), out=np.empty((2, 48, 40), np.float32).transpose(0, 2, 1))


def test_per_thread_scratch_buffers_give_the_same_maps_concurrently():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    sets = []
    for _ in range(8):
        c = rng.uniform(20, 44, 2)
        e = rng.uniform(4, 18, 4)
        sets.append(np.array([c - [e[0], 1], c + [e[1], 2], c - [1, e[2]], c + [2, e[3]]]))
    want = [confidence_map(p, (64, 64)) for p in sets]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: confidence_map(p, (64, 64)), sets * 4))
    for i, g in enumerate(got):
        np.testing.assert_array_equal(g, want[i % len(sets)])
