"""The pieces of ``cmdeploy serve`` that need no HTTP: click sorting, RLE, contours, the batcher,
the catalog, the CLI's safety checks, and the runtime staying importable without FastAPI."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cmdeploy.guidance import extreme_points, sort_extreme_points, validate_points
from cmdeploy.serve.masks import mask_to_rle, outer_contour, rle_to_mask

masks = hnp.arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24)))


# ----------------------------------------------------------------------- sort_extreme_points
@given(masks, st.permutations(range(4)))
@settings(max_examples=150, deadline=None)
def test_sort_recovers_extreme_points_of_any_mask(mask: np.ndarray, perm: list[int]) -> None:
    """Shuffled extreme points of a mask come back as a valid left/right/top/bottom assignment
    that spans the full x and y extent, and the answer does not depend on the click order."""
    if not mask.any():
        return
    pts = extreme_points(mask)
    got = sort_extreme_points(pts[perm])
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, pts.tolist()))
    if not np.all(got == got[0]):  # one pixel: no extent to validate
        validate_points(got)
    assert got[1, 0] - got[0, 0] == pts[1, 0] - pts[0, 0]  # full x extent
    assert got[3, 1] - got[2, 1] == pts[3, 1] - pts[2, 1]  # full y extent
    np.testing.assert_array_equal(got, sort_extreme_points(pts))


def test_sort_distinct_extremes_exactly() -> None:
    pts = np.array([[2, 10], [30, 12], [15, 1], [17, 25]], np.float32)  # left, right, top, bottom
    for perm in ([3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]):
        np.testing.assert_array_equal(sort_extreme_points(pts[perm]), pts)


@pytest.mark.parametrize("bad", [np.zeros((3, 2)), np.zeros((4, 3)), [[0, 0], [1, 1], [2, np.nan], [3, 3]]])
def test_sort_rejects_bad_input(bad) -> None:
    with pytest.raises(ValueError):
        sort_extreme_points(bad)


# --------------------------------------------------------------------------- RLE and contour
@given(masks)
@settings(max_examples=150, deadline=None)
def test_rle_round_trip(mask: np.ndarray) -> None:
    rle = mask_to_rle(mask)
    assert sum(rle) == mask.size and all(r > 0 for r in rle[1:])
    np.testing.assert_array_equal(rle_to_mask(rle, mask.shape), mask)


def test_rle_rejects_wrong_length() -> None:
    from cmdeploy.errors import InputError

    with pytest.raises(InputError):
        rle_to_mask([3, 2], (2, 2))
    with pytest.raises(InputError):
        rle_to_mask([5, -1], (2, 2))


RING_THEN_BLOCK = (
    np.pad(np.ones((6, 6), bool), ((0, 0), (0, 5))) ^ np.pad(np.ones((4, 4), bool), ((1, 1), (1, 6)))
) | np.pad(np.ones((6, 4), bool), ((0, 0), (7, 0)))


@given(masks)
@settings(max_examples=400, deadline=None)
@example(mask=np.array([[True, False, True, True]]))  # a 1-pixel piece first, the 2-pixel one largest
@example(mask=RING_THEN_BLOCK)  # a 20-pixel ring (16-pixel hole) first, a 24-pixel block largest
def test_contour_is_a_closed_boundary_of_the_largest_piece(mask: np.ndarray) -> None:
    from cmdeploy.labels_to_points import connected_components

    c = outer_contour(mask)
    if not mask.any():
        assert c == []
        return
    pts = np.asarray(c)
    comp, n = connected_components(mask.astype(np.int32), connectivity=8)
    sizes = np.bincount(comp.ravel())[1:]
    piece = comp == comp[pts[0, 1], pts[0, 0]]
    assert piece.sum() == sizes.max()  # the largest piece
    assert piece[pts[:, 1], pts[:, 0]].all()  # on the piece
    if len(c) > 1:  # consecutive points (and the closing step) are 8-neighbours
        steps = np.abs(np.diff(np.vstack([pts, pts[:1]]), axis=0))
        assert (steps.max(axis=1) == 1).all()
    on = {(int(x), int(y)) for x, y in c}
    for x, y in extreme_points(piece).astype(int):  # the outer boundary passes the extreme pixels
        assert (int(x), int(y)) in on


# ---------------------------------------------------------------------------------- batching
class _CountingSegmenter:
    """Stand-in with predict_batch: probability = HU / 100 (so a mask is HU > 50)."""

    threshold = 0.5

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.gate = threading.Event()

    def predict_batch(self, slices, points, *, return_probabilities=False):
        self.gate.wait(5)
        self.calls.append(len(slices))
        if any(np.asarray(p)[0, 0] < 0 for p in points):
            raise ValueError("bad points")
        return [np.asarray(s, np.float32) / 100 for s in slices]


def test_batcher_gathers_concurrent_requests_and_isolates_failures() -> None:
    from cmdeploy.serve.batching import MicroBatcher

    seg = _CountingSegmenter()
    b = MicroBatcher(seg, max_wait_ms=300, max_batch=8)
    try:
        futs = [b.submit(np.full((4, 4), i, np.float32), np.zeros((4, 2)) + (i != 3)) for i in range(6)]
        futs[3] = b.submit(np.zeros((4, 4), np.float32), -np.ones((4, 2)))  # a bad one among them
        seg.gate.set()
        for i, f in enumerate(futs):
            if i == 3:
                with pytest.raises(ValueError):
                    f.result(5)
            else:
                assert f.result(5).probabilities[0, 0] == pytest.approx(i / 100)
        assert seg.calls[0] == 7  # one model call for everything queued together ...
        assert seg.calls[1:] == [1] * 7  # ... which failed, so each was retried alone
        seg.calls.clear()
        futs = [b.submit(np.full((4, 4), i, np.float32), np.ones((4, 2))) for i in range(5)]
        assert [f.result(5).batch_size for f in futs] == [5] * 5 and seg.calls == [5]
    finally:
        b.close()


def test_batcher_matches_predict_on_the_shipped_model() -> None:
    from cmdeploy.segmenter import Segmenter
    from cmdeploy.serve.batching import MicroBatcher

    seg = Segmenter.load(threads=1)
    rng = np.random.default_rng(0)
    slices = [rng.normal(40, 30, (96, 96)).astype(np.float32) for _ in range(3)]
    pts = np.array([[20, 50], [70, 48], [45, 22], [47, 80]], np.float32)
    b = MicroBatcher(seg, max_wait_ms=20)
    try:
        futs = [b.submit(s, pts) for s in slices]
        got = [f.result(30) for f in futs]
    finally:
        b.close()
    for s, r in zip(slices, got, strict=True):
        np.testing.assert_allclose(r.probabilities, seg.predict(s, pts, return_probabilities=True), atol=1e-5)


# ----------------------------------------------------------------------------------- catalog
def test_catalog_lists_ct_series_by_opaque_id(tmp_path: Path) -> None:
    from serve_helpers import write_ct_series

    from cmdeploy.serve.catalog import Catalog, series_id

    write_ct_series(tmp_path / "a" / "ct", n=2)
    (tmp_path / "labels.nii.gz").write_bytes(b"skipped by name")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    cat = Catalog(tmp_path)
    assert [e.name for e in cat.entries.values()] == ["a/ct"]
    entry = cat.get(series_id("a/ct"))
    assert len(entry.id) == 12 and "/" not in entry.slug and entry.series.num_slices == 2
    with pytest.raises(KeyError):
        cat.get("../a/ct")
    s0 = entry.slice_hu(0)
    assert entry.slice_hu(0) is s0 and not s0.flags.writeable  # cached, read-only
    with pytest.raises(IndexError):
        entry.slice_hu(2)


def test_orientation_labels() -> None:
    from types import SimpleNamespace

    from cmdeploy.serve.api import orientation_labels

    def lab(kind, o):
        return orientation_labels(
            SimpleNamespace(kind=kind, orientation=None if o is None else np.array(o, float))
        )

    assert lab("dicom-series", [1, 0, 0, 0, 1, 0]) == ["R", "L", "A", "P"]  # axial
    assert lab("dicom-series", [0, 1, 0, 0, 0, -1]) == ["A", "P", "H", "F"]  # sagittal
    assert lab("dicom-series", [-1, 0, 0, 0, -1, 0]) == ["L", "R", "P", "A"]  # rotated 180 degrees
    assert lab("nifti", None) == ["R", "L", "A", "P"] and lab("png", None) is None


# ----------------------------------------------------------------------------------------- CLI
def test_cli_refuses_public_host_without_token(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cmdeploy.cli import app

    res = CliRunner().invoke(app, ["serve", "--data", str(tmp_path), "--host", "0.0.0.0"])
    assert res.exit_code == 2 and "--token" in res.output
    res = CliRunner().invoke(app, ["serve", "--data", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_runtime_and_cvat_adapter_import_without_fastapi() -> None:
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "import cmdeploy, cmdeploy.cli, cmdeploy.serve, cmdeploy.serve.cvat, cmdeploy.serve.store\n"
        "from cmdeploy import Segmenter, sort_extreme_points\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_gzipped_nifti_is_read_once_and_equals_the_reader(tmp_path: Path) -> None:
    """The whole-volume path for .nii.gz gives exactly the reader's slices (scaled, reoriented)."""
    nib = pytest.importorskip("nibabel")

    from cmdeploy.io import open_series
    from cmdeploy.serve import catalog

    rng = np.random.default_rng(3)
    data = rng.integers(-1000, 1500, (7, 9, 4)).astype(np.int16)
    affine = np.array([[0, -0.8, 0, 10], [-0.7, 0, 0, 5], [0, 0, 2.5, -30], [0, 0, 0, 1]], float)  # permuted
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(0.5, -1024)
    nib.save(img, tmp_path / "ct.nii.gz")
    cat = catalog.Catalog(tmp_path)
    (entry,) = cat.entries.values()
    series = open_series(tmp_path / "ct.nii.gz")
    for k in range(series.num_slices):
        np.testing.assert_array_equal(entry.slice_hu(k), series.slice_hu(k))
    assert entry.id in catalog._volumes
