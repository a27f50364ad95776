"""Post-processing from the clicks: components the segments touch, hole filling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cmdeploy.postprocess import fill_holes, keep_clicked_components, postprocess_mask

PTS = np.array([[10, 20], [30, 20], [20, 10], [20, 30]], dtype=np.float32)


def test_keeps_the_clicked_component_and_drops_a_distant_blob() -> None:
    m = np.zeros((50, 60), bool)
    m[10:31, 10:31] = True  # the object, crossed by both segments
    m[40:45, 50:55] = True  # a stray blob elsewhere
    out = keep_clicked_components(m, PTS)
    assert out[10:31, 10:31].all() and not out[40:45, 50:55].any()
    assert out.sum() == 21 * 21


def test_no_component_touched_leaves_mask_unchanged() -> None:
    m = np.zeros((50, 60), bool)
    m[40:45, 50:55] = True
    m[0:3, 0:3] = True
    np.testing.assert_array_equal(keep_clicked_components(m, PTS), m)


def test_fill_holes_fills_enclosed_but_not_open_background() -> None:
    m = np.zeros((40, 40), bool)
    m[5:25, 5:25] = True
    m[10:15, 10:15] = False  # enclosed hole
    m[20:25, 12:16] = False  # notch open to the outside (touches the box border)
    out = fill_holes(m)
    assert out[10:15, 10:15].all()
    assert not out[20:25, 12:16].any()
    assert (out & ~m).sum() == 25


def test_modes() -> None:
    m = np.zeros((50, 60), bool)
    m[10:31, 10:31] = True
    m[15:18, 15:18] = False
    m[40:45, 50:55] = True
    np.testing.assert_array_equal(postprocess_mask(m, PTS, "none"), m)
    out = postprocess_mask(m, PTS, "clicked")
    assert out.sum() == 21 * 21
    with pytest.raises(ValueError, match="postprocess"):
        postprocess_mask(m, PTS, "magic")


@settings(max_examples=80, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 20), st.integers(1, 20))),
       st.lists(st.floats(0, 19), min_size=8, max_size=8))
def test_invariants(mask: np.ndarray, coords: list[float]) -> None:
    pts = np.array(coords, dtype=np.float32).reshape(4, 2)
    kept = keep_clicked_components(mask, pts)
    assert not (kept & ~mask).any()  # only removes
    filled = fill_holes(mask)
    assert not (mask & ~filled).any()  # only adds
    np.testing.assert_array_equal(fill_holes(filled), filled)  # idempotent
    both = postprocess_mask(mask, pts, "clicked")
    assert both.shape == mask.shape and both.dtype == bool


def test_segmenter_applies_the_specs_postprocessing(tmp_path) -> None:
    """A model whose spec says 'clicked' drops the blob the clicks do not delimit, in predict and in
    the batched pipeline's to_mask alike."""
    from conftest import build_fake_fused_model

    from cmdeploy import Segmenter
    from cmdeploy.spec import ModelSpec

    slice_hu = np.zeros((64, 64), np.float32)
    slice_hu[10:30, 10:30] = 500.0  # the object
    slice_hu[40:50, 40:50] = 500.0  # another bright blob inside the crop
    slice_hu[14:18, 14:18] = 0.0  # a hole
    pts = np.array([[10, 20], [29, 20], [20, 10], [20, 29]], np.float32)  # fake model: hu > 10
    plain = Segmenter.load(build_fake_fused_model(tmp_path / "a.onnx", ModelSpec.for_input_size(64)))
    post = Segmenter.load(build_fake_fused_model(
        tmp_path / "b.onnx", ModelSpec.for_input_size(64, postprocess="clicked")))
    raw = plain.predict(slice_hu, pts)
    assert raw[40:50, 40:50].all() and not raw[14:18, 14:18].any()
    got = post.predict(slice_hu, pts)
    assert got[10:30, 10:30].all() and got.sum() == 400
    probs = post.predict(slice_hu, pts, return_probabilities=True)
    np.testing.assert_array_equal(post.to_mask(probs[5:60, 5:60], pts, origin=(5, 5)), got[5:60, 5:60])
    with pytest.raises(ValueError, match="postprocess"):
        ModelSpec.for_input_size(64, postprocess="magic")
