"""Tests of cmdeploy.geometry: crop transforms, their inverses, bilinear warps and paste-back.

Coordinates are (x, y) = (column, row); an image is indexed [y, x].
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdeploy.geometry import (
    CropTransform,
    apply_affine,
    bounding_box,
    compose_affine,
    crop_image,
    crop_transform,
    crop_transforms,
    invert_affine,
    paste_back,
    paste_window,
    sample_bilinear,
    sample_grid,
    warp_affine,
    zoom_factor,
)

PROPS = settings(max_examples=50, deadline=None)
IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@st.composite
def object_points(draw):
    """(4, 2) extreme points (left, right, top, bottom) of a box with sides >= 1 px."""
    x0 = draw(st.floats(-50.0, 400.0))
    y0 = draw(st.floats(-50.0, 400.0))
    w = draw(st.floats(1.0, 300.0))
    h = draw(st.floats(1.0, 300.0))
    fx = draw(st.floats(0.0, 1.0))
    fy = draw(st.floats(0.0, 1.0))
    return np.array(
        [[x0, y0 + fy * h], [x0 + w, y0 + (1 - fy) * h], [x0 + fx * w, y0], [x0 + (1 - fx) * w, y0 + h]]
    )


augment = st.fixed_dictionaries(
    {
        "rotation_deg": st.floats(-180.0, 180.0),
        "flip": st.booleans(),
        "scale": st.floats(0.5, 2.0),
    }
)


# ----------------------------------------------------------------------------- crop_transform


@PROPS
@given(object_points(), st.integers(16, 512), st.floats(0.1, 1.0), augment)
def test_bbox_centre_to_crop_centre_and_longer_side_to_target(pts, size, frac, aug):
    target = frac * size
    t = crop_transform(pts, size, target, **aug)
    assert t.matrix.shape == (2, 3) and t.crop_size == size
    (cx, cy), (w, h) = bounding_box(pts)
    half = (size - 1) / 2
    np.testing.assert_allclose(t.to_crop(np.array([cx, cy])), [half, half], atol=1e-7)
    # box sides after the transform: the longer one is target * scale crop pixels
    mapped_w = np.linalg.norm(t.to_crop(np.array([cx + w / 2, cy])) - t.to_crop(np.array([cx - w / 2, cy])))
    mapped_h = np.linalg.norm(t.to_crop(np.array([cx, cy + h / 2])) - t.to_crop(np.array([cx, cy - h / 2])))
    assert max(mapped_w, mapped_h) == pytest.approx(target * aug["scale"], rel=1e-9)
    assert mapped_w / mapped_h == pytest.approx(w / h, rel=1e-9)  # no anisotropy


@PROPS
@given(object_points(), st.integers(16, 512), st.floats(0.1, 1.0), augment)
def test_inverse_is_exact(pts, size, frac, aug):
    t = crop_transform(pts, size, frac * size, **aug)
    rng = np.random.default_rng(0)
    probe = np.concatenate([pts, rng.uniform(-600, 600, (20, 2))])
    np.testing.assert_allclose(t.to_slice(t.to_crop(probe)), probe, rtol=0, atol=1e-9)
    crop_pts = rng.uniform(-10, size + 10, (20, 2))
    np.testing.assert_allclose(t.to_crop(t.to_slice(crop_pts)), crop_pts, rtol=0, atol=1e-9)
    np.testing.assert_allclose(compose_affine(t.matrix, t.inverse), IDENTITY, atol=1e-9)


def test_rotation_is_counter_clockwise_on_screen_and_flip_mirrors():
    pts = np.array([[10.0, 20.0], [30.0, 20.0], [20.0, 10.0], [20.0, 30.0]])  # centre (20, 20), side 20
    half = (64 - 1) / 2
    plain = crop_transform(pts, 64, 40)  # zoom 2
    np.testing.assert_allclose(plain.to_crop(pts[1]), [half + 20, half])
    rot = crop_transform(pts, 64, 40, rotation_deg=90)
    # the right-most point turns up (smaller row) on screen, the top-most point turns left
    np.testing.assert_allclose(rot.to_crop(pts[1]), [half, half - 20], atol=1e-12)
    np.testing.assert_allclose(rot.to_crop(pts[2]), [half - 20, half], atol=1e-12)
    flipped = crop_transform(pts, 64, 40, flip=True)
    np.testing.assert_allclose(flipped.to_crop(pts[1]), [half - 20, half])
    np.testing.assert_allclose(flipped.to_crop(pts[3]), [half, half + 20])


def test_zoom_factor_and_bounding_box():
    pts = np.array([[2.0, 5.0], [12.0, 6.0], [7.0, 1.0], [6.0, 9.0]])
    centre, size = bounding_box(pts)
    np.testing.assert_allclose(centre, [7.0, 5.0])
    np.testing.assert_allclose(size, [10.0, 8.0])
    assert zoom_factor(pts, 50.0) == pytest.approx(5.0)
    flat = np.array([[3.0, 4.0], [3.5, 4.0], [3.2, 4.0], [3.2, 4.2]])  # 0.5 x 0.2 px: side clamped to 1
    assert zoom_factor(flat, 50.0) == pytest.approx(50.0)
    batch_centre, batch_size = bounding_box(np.stack([pts, pts + 1]))
    np.testing.assert_allclose(batch_centre, [[7.0, 5.0], [8.0, 6.0]])
    np.testing.assert_allclose(batch_size, [[10.0, 8.0], [10.0, 8.0]])


def test_affine_helpers():
    m = np.array([[2.0, 0.5, 3.0], [-0.25, 1.5, -1.0]])
    n = np.array([[0.0, -1.0, 7.0], [1.0, 0.0, 2.0]])
    p = np.array([[1.0, 2.0], [-3.0, 0.5], [10.0, -4.0]])
    np.testing.assert_allclose(apply_affine(compose_affine(m, n), p), apply_affine(m, apply_affine(n, p)))
    np.testing.assert_allclose(apply_affine(invert_affine(m), apply_affine(m, p)), p, atol=1e-12)
    assert apply_affine(m, np.zeros((3, 4, 2))).shape == (3, 4, 2)
    with pytest.raises(ValueError, match="singular"):
        invert_affine(np.array([[1.0, 2.0, 0.0], [2.0, 4.0, 1.0]]))


# ------------------------------------------------------------------------- sampling and warps


def test_sample_bilinear_at_integer_points_equals_pixels():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(9, 13)).astype(np.float32)
    ys, xs = np.mgrid[0:9, 0:13]
    np.testing.assert_array_equal(sample_bilinear(img, xs.astype(float), ys.astype(float)), img)
    # midpoints are the mean of the two neighbours; outside the grid gets `fill`
    assert sample_bilinear(img, np.array(2.5), np.array(4.0)) == pytest.approx((img[4, 2] + img[4, 3]) / 2)
    out = sample_bilinear(img, np.array([-0.01, 12.01, 3.0, 3.0]), np.array([0.0, 0.0, -0.5, 8.5]), fill=-7.0)
    np.testing.assert_array_equal(out, [-7.0] * 4)
    assert sample_bilinear(img, np.array([12.0]), np.array([8.0]))[0] == img[8, 12]


def test_identity_warp_and_crop_return_the_image():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(24, 31)).astype(np.float32)
    np.testing.assert_array_equal(warp_affine(img, IDENTITY, img.shape), img)
    np.testing.assert_array_equal(warp_affine(img, IDENTITY, img.shape, order=0), img)
    square = img[:, :24]
    np.testing.assert_array_equal(crop_image(square, CropTransform(IDENTITY, 24)), square)


def test_integer_translation_shifts_and_fills():
    rng = np.random.default_rng(3)
    img = rng.normal(size=(10, 12)).astype(np.float32)
    m = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0]])  # (x, y) -> (x + 3, y - 2)
    out = warp_affine(img, m, (10, 12), fill=-5.0)
    np.testing.assert_array_equal(out[:8, 3:], img[2:, :9])
    assert np.all(out[:, :3] == -5.0) and np.all(out[8:] == -5.0)


def test_nearest_order_and_bad_order():
    img = np.arange(20, dtype=np.float32).reshape(4, 5)
    m = np.array([[1.0, 0.0, -0.3], [0.0, 1.0, 0.2]])  # samples at (u + 0.3, v - 0.2): rounds back
    out = warp_affine(img, m, (4, 5), order=0, fill=-1.0)
    np.testing.assert_array_equal(out[1:, :4], img[1:, :4])
    with pytest.raises(ValueError, match="order"):
        warp_affine(img, m, (4, 5), order=3)


@PROPS
@given(
    st.floats(-2.0, 2.0),
    st.floats(-2.0, 2.0),
    st.floats(-50.0, 50.0),
    st.floats(-180.0, 180.0),
    st.floats(0.4, 3.0),
    st.floats(-10.0, 10.0),
    st.floats(-10.0, 10.0),
)
def test_bilinear_warp_reproduces_a_linear_ramp(a, b, c0, angle, zoom, tx, ty):
    # bilinear interpolation of a linear function is exact, so any affine warp of a ramp is the ramp
    # evaluated at the source points (to float32 rounding)
    h, w = 40, 50
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = (a * xs + b * ys + c0).astype(np.float32)
    th = math.radians(angle)
    lin = zoom * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m = np.concatenate([lin, [[tx + 15.0], [ty + 15.0]]], axis=1)
    out = warp_affine(img, m, (36, 36), fill=np.nan)
    inv = invert_affine(m)
    vs, us = np.mgrid[0:36, 0:36].astype(np.float64)
    sx = inv[0, 0] * us + inv[0, 1] * vs + inv[0, 2]
    sy = inv[1, 0] * us + inv[1, 1] * vs + inv[1, 2]
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    assert np.array_equal(np.isfinite(out), inside)
    np.testing.assert_allclose(out[inside], (a * sx + b * sy + c0)[inside], atol=2e-4)


@pytest.mark.parametrize("rotation", [0.0, 30.0, -115.0])
def test_paste_back_of_crop_reproduces_smooth_image(rotation):
    h, w = 96, 110
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    img = (np.sin(xs / 9.0) + np.cos(ys / 13.0) + 0.01 * xs).astype(np.float32)
    pts = np.array([[40.0, 50.0], [72.0, 47.0], [55.0, 36.0], [58.0, 66.0]])
    t = crop_transform(pts, 64, 48, rotation_deg=rotation)  # zoom 48/32 = 1.5
    crop = crop_image(img, t)
    assert crop.shape == (64, 64) and crop.dtype == np.float32
    back = paste_back(crop, t, (h, w))
    assert back.shape == (h, w) and back.dtype == np.float32
    uv = t.to_crop(np.stack([xs, ys], axis=-1))
    footprint = np.all((uv >= 0) & (uv <= 63), axis=-1)
    interior = np.all((uv >= 1) & (uv <= 62), axis=-1)
    assert interior.sum() > 0.2 * (64 / 1.5) ** 2
    assert np.all(back[~footprint] == 0.0)
    assert np.abs(back - img)[interior].max() < 0.01  # two bilinear resamplings of a smooth image


def test_paste_back_errors_and_empty_footprint():
    t = crop_transform(np.array([[0.0, 5.0], [10.0, 5.0], [5.0, 0.0], [5.0, 10.0]]), 32, 20)
    with pytest.raises(ValueError, match="crop_values"):
        paste_back(np.zeros((31, 32), np.float32), t, (40, 40))
    far = CropTransform(np.array([[1.0, 0.0, -500.0], [0.0, 1.0, -500.0]]), 32)  # crop far outside
    assert not paste_back(np.ones((32, 32), np.float32), far, (40, 40)).any()


# ------------------------------------------------------------------ separable fast paths (issue 18)


@PROPS
@given(
    st.integers(2, 40),
    st.integers(2, 40),
    st.lists(st.floats(-6.0, 46.0), min_size=1, max_size=30),
    st.lists(st.floats(-6.0, 46.0), min_size=1, max_size=30),
    st.sampled_from([0.0, -1024.0]),
    st.integers(0, 2**31 - 1),
)
def test_sample_grid_equals_sample_bilinear_bit_for_bit(h, w, xs, ys, fill, seed):
    img = np.random.default_rng(seed).normal(0, 500, (h, w)).astype(np.float32)
    xs, ys = np.array(xs), np.array(ys)
    want = sample_bilinear(img, xs[None, :], ys[:, None], fill=fill)
    got = sample_grid(img, xs, ys, fill=fill)
    assert got.dtype == np.float32 and got.shape == (len(ys), len(xs))
    np.testing.assert_array_equal(got, want)


def _warp_2d(image, matrix, size, fill):
    """warp_affine's general path, spelt out: every output pixel's source through the inverse."""
    inv = invert_affine(matrix)
    us = np.arange(size, dtype=np.float64)[None, :]
    vs = np.arange(size, dtype=np.float64)[:, None]
    xs = inv[0, 0] * us + inv[0, 1] * vs + inv[0, 2]
    ys = inv[1, 0] * us + inv[1, 1] * vs + inv[1, 2]
    return sample_bilinear(image, xs, ys, fill=fill)


@PROPS
@given(object_points(), st.sampled_from([16, 33, 64]), st.floats(0.05, 1.0), st.booleans())
def test_unrotated_crops_and_paste_back_equal_the_2d_path(pts, size, frac, flip):
    # zoom from strong minification (frac * size / 300 px, the rows-subset branch) to magnification
    img = np.random.default_rng(1).normal(0, 300, (120, 90)).astype(np.float32)
    t = crop_transform(pts, size, frac * size, flip=flip)
    crop = crop_image(img, t, fill=-1024.0)
    np.testing.assert_array_equal(crop, _warp_2d(img, t.matrix, size, -1024.0))
    out = np.empty((size, size), np.float32)
    assert crop_image(img, t, fill=-1024.0, out=out) is out
    np.testing.assert_array_equal(out, crop)
    # paste-back: the footprint window equals sampling every slice pixel through the forward map
    values, (rows, cols) = paste_window(crop, t, img.shape)
    full = np.zeros(img.shape, np.float32)
    full[rows, cols] = values
    np.testing.assert_array_equal(full, paste_back(crop, t, img.shape))
    m = t.matrix
    xs = np.arange(img.shape[1], dtype=np.float64)[None, :]
    ys = np.arange(img.shape[0], dtype=np.float64)[:, None]
    ref = sample_bilinear(crop, m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2])
    np.testing.assert_array_equal(full, ref)


def test_rotated_warp_still_takes_the_general_path():
    img = np.random.default_rng(2).normal(0, 300, (50, 60)).astype(np.float32)
    t = crop_transform(np.array([[5.0, 20], [40, 22], [22, 3], [21, 41]]), 32, 20.0, rotation_deg=17.0)
    np.testing.assert_array_equal(crop_image(img, t), _warp_2d(img, t.matrix, 32, 0.0))
    values, window = paste_window(crop_image(img, t), t, img.shape)
    assert values.shape == (window[0].stop - window[0].start, window[1].stop - window[1].start)


@PROPS
@given(st.lists(object_points(), min_size=1, max_size=6), st.integers(16, 512), st.floats(0.1, 1.0))
def test_crop_transforms_equal_crop_transform_per_item(sets, size, frac):
    pts = np.stack(sets)
    got = crop_transforms(pts, size, frac * size)
    for p, t in zip(pts, got, strict=True):
        want = crop_transform(p, size, frac * size)
        np.testing.assert_array_equal(t.matrix, want.matrix)
        assert t.crop_size == want.crop_size
