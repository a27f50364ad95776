"""Tests of cmdeploy.preprocess: network inputs from (slice, points) pairs and the output path back."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from cmdeploy.geometry import crop_image, crop_transform, paste_back
from cmdeploy.guidance import confidence_map, gaussian_heatmap
from cmdeploy.preprocess import (
    guidance_channels,
    prepare_batch,
    prepare_one,
    probabilities_to_slice,
    sigmoid,
    window_normalize,
)
from cmdeploy.spec import ModelSpec

SIZE = 64


def _slice(h: int = 120, w: int = 100, seed: int = 0) -> np.ndarray:
    """A synthetic HU slice: noisy soft tissue with a bright disk (an 'organ') at (x=45, y=60), r=15."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    img = rng.normal(40.0, 30.0, (h, w))
    img[(xs - 45) ** 2 + (ys - 60) ** 2 <= 15**2] = 200.0
    img[:, :5] = -1000.0  # air at the left edge, outside the window
    return img.astype(np.float32)


DISK_POINTS = np.array([[30.0, 60.0], [60.0, 60.0], [45.0, 45.0], [45.0, 75.0]])


@pytest.mark.parametrize(
    ("guidance", "channels"),
    [("cm", ("image", "cm")), ("ep", ("image", "ep")), ("cm+ep", ("image", "cm", "ep"))],
)
def test_prepare_one_channels(guidance, channels):
    spec = ModelSpec.for_input_size(SIZE, guidance=guidance)
    assert spec.channels == channels
    img = _slice()
    x, t = prepare_one(img, DISK_POINTS, spec)
    assert x.shape == (len(channels), SIZE, SIZE) and x.dtype == np.float32
    expected_t = crop_transform(DISK_POINTS, SIZE, spec.target_size)
    np.testing.assert_array_equal(t.matrix, expected_t.matrix)
    np.testing.assert_array_equal(x[0], window_normalize(crop_image(img, t, fill=spec.pad_hu), spec))
    crop_pts = t.to_crop(DISK_POINTS)
    for name, channel in zip(channels[1:], x[1:], strict=True):
        if name == "cm":
            np.testing.assert_array_equal(channel, confidence_map(crop_pts, (SIZE, SIZE)))
        else:
            np.testing.assert_array_equal(channel, gaussian_heatmap(crop_pts, (SIZE, SIZE), spec.ep_sigma))
    np.testing.assert_array_equal(guidance_channels(crop_pts[None], spec)[0], x[1:])


def test_extra_windows_are_image_channels_of_the_same_crop():
    spec = ModelSpec.for_input_size(SIZE, guidance="ep", extra_windows=((-1000.0, 0.0), (150.0, 1500.0)))
    img = _slice()
    x, t = prepare_one(img, DISK_POINTS, spec)
    assert x.shape == (4, SIZE, SIZE)
    crop = crop_image(img, t, fill=spec.pad_hu)
    for j, window in enumerate(spec.windows):
        np.testing.assert_array_equal(x[j], window_normalize(crop, spec, window=window))
    np.testing.assert_array_equal(x[0], window_normalize(crop, spec))  # channel 0 = spec.window
    np.testing.assert_array_equal(x[3], gaussian_heatmap(t.to_crop(DISK_POINTS), (SIZE, SIZE), spec.ep_sigma))
    assert len({x[j].tobytes() for j in range(3)}) == 3  # three different views of one crop
    xb, _ = prepare_batch([img, img], [DISK_POINTS, DISK_POINTS], spec)
    np.testing.assert_array_equal(xb[1], x)


def test_prepare_one_puts_the_object_in_the_crop_centre_at_target_size():
    spec = ModelSpec.for_input_size(SIZE, guidance="cm")  # target 375/512 * 64 = 46.875 px
    x, t = prepare_one(_slice(), DISK_POINTS, spec)
    inside = x[0] > 0.5  # disk (200 HU) -> (200+200)/450 = 0.89 -> (0.89-0.5)/0.5 = 0.78; tissue <= 0.
    rows, cols = np.nonzero(inside)
    assert cols.max() - cols.min() + 1 == pytest.approx(spec.target_size, abs=2.5)
    assert rows.max() - rows.min() + 1 == pytest.approx(spec.target_size, abs=2.5)
    assert (cols.min() + cols.max()) / 2 == pytest.approx((SIZE - 1) / 2, abs=1.0)
    # the cross is at the crop centre (31.5, 31.5), half a pixel from the nearest pixel centres
    assert x[1].max() > 0.99 and x[1][31:33, 31:33].min() == x[1].max()


def test_prepare_one_pads_outside_the_slice_and_uses_target_override():
    spec = ModelSpec.for_input_size(SIZE, guidance="cm")
    corner = np.array([[0.0, 3.0], [8.0, 3.0], [4.0, 0.0], [4.0, 7.0]])  # object at the slice corner
    x, t = prepare_one(_slice(), corner, spec, target_size=16.0)
    assert t.matrix[0, 0] == pytest.approx(2.0)  # 16 px / 8 px box
    pad = window_normalize(np.float32(spec.pad_hu), spec)
    assert x[0, 0, 0] == pad and x[0, SIZE - 1, SIZE - 1] != pad


def test_prepare_one_rejects_bad_inputs():
    spec = ModelSpec.for_input_size(SIZE)
    with pytest.raises(ValueError, match="2-D"):
        prepare_one(np.zeros((2, 10, 10)), DISK_POINTS, spec)
    with pytest.raises(ValueError, match="order"):
        prepare_one(_slice(), DISK_POINTS[[1, 0, 2, 3]], spec)


def test_window_normalize_bounds_and_mapping():
    spec = ModelSpec(window=(-200.0, 250.0), norm_mean=0.5, norm_std=0.5)
    hu = np.array([-3000.0, -200.0, 25.0, 250.0, 4000.0, np.float32(-199.0)])
    out = window_normalize(hu, spec)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, -1.0, 0.0, 1.0, 1.0, (1 / 450 - 0.5) / 0.5], atol=1e-6)
    other = ModelSpec(window=(-100.0, 100.0), norm_mean=0.2, norm_std=0.25)
    wide = window_normalize(np.linspace(-500, 500, 1001), other)
    assert wide.min() == pytest.approx((0 - 0.2) / 0.25) and wide.max() == pytest.approx((1 - 0.2) / 0.25)
    assert np.all(np.diff(wide) >= 0)


def test_prepare_batch_equals_stacked_prepare_one():
    spec = ModelSpec.for_input_size(SIZE, guidance="cm+ep")
    a, b = _slice(seed=1), _slice(90, 130, seed=2)  # slices of different sizes, one used twice
    other = np.array([[10.0, 20.0], [70.0, 30.0], [40.0, 8.0], [35.0, 50.0]])
    slices, points = [a, b, a], [DISK_POINTS, other, other]
    x, transforms = prepare_batch(slices, points, spec)
    assert x.shape == (3, 3, SIZE, SIZE) and x.dtype == np.float32 and len(transforms) == 3
    for i, (img, pts) in enumerate(zip(slices, points, strict=True)):
        xi, ti = prepare_one(img, pts, spec)
        np.testing.assert_array_equal(x[i], xi)
        np.testing.assert_array_equal(transforms[i].matrix, ti.matrix)
    with pytest.raises(ValueError, match="2 point sets"):
        prepare_batch([a, b, a], points[:2], spec)


def test_sigmoid_is_stable_and_correct():
    x = np.array([-1000.0, -80.0, -3.0, 0.0, 3.0, 80.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):  # underflow to 0 is fine
            s = sigmoid(x)
    assert s.dtype == np.float32 and np.all(np.isfinite(s))
    assert s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    np.testing.assert_allclose(s[2:5], 1 / (1 + np.exp(-x[2:5])), rtol=1e-6)
    np.testing.assert_allclose(sigmoid(-x), 1 - s, atol=1e-7)
    assert np.all(np.diff(s) >= 0)


def test_probabilities_to_slice_is_paste_back():
    spec = ModelSpec.for_input_size(SIZE)
    _, t = prepare_one(_slice(), DISK_POINTS, spec)
    probs = np.random.default_rng(4).random((SIZE, SIZE))
    out = probabilities_to_slice(probs, t, (120, 100))
    np.testing.assert_array_equal(out, paste_back(probs.astype(np.float32), t, (120, 100)))
    # the disk's crop maps back over the disk
    assert out[60, 45] > 0 and out[0, 99] == 0
