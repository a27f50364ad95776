"""Batched pipeline: merging by label, #k pieces, overlaps, slice reads, batching invariance, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from cmdeploy.errors import InputError
from cmdeploy.io.series import Series
from cmdeploy.pipeline import base_label, run_pipeline
from cmdeploy.points_csv import PointsRow
from cmdeploy.segmenter import Segmenter

REPO = Path(__file__).resolve().parents[1]
SHAPE = (96, 112)
SPACING = (0.5, 0.8)


class CountingSeries:
    """A Series over synthetic slices that counts how often each slice is read."""

    def __init__(self, n: int = 6, shape=SHAPE, fail_on: int | None = None) -> None:
        rng = np.random.default_rng(0)
        self.data = rng.normal(0.0, 150.0, (n, *shape)).astype(np.float32)
        self.reads: dict[int, int] = {}
        self.fail_on = fail_on
        self.lock = threading.Lock()
        self.series = Series(
            kind="npy",
            path=Path("synthetic.npy"),
            num_slices=n,
            shape=shape,
            spacing_xy_mm=SPACING,
            slice_uids=(None,) * n,
            loader=self._load,
        )

    def _load(self, k: int) -> np.ndarray:
        with self.lock:
            self.reads[k] = self.reads.get(k, 0) + 1
        if k == self.fail_on:
            raise InputError(f"slice {k} is unreadable")
        return self.data[k]


def box(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Extreme points of a diamond-ish object in the box [x0, x1] x [y0, y1]."""
    xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
    return np.array([[x0, ym], [x1, ym + 1], [xm, y0], [xm - 1, y1]], dtype=np.float32)


ROWS = [
    PointsRow(3, "liver", box(10, 10, 50, 45), line=2),
    PointsRow(1, "liver", box(20, 20, 60, 70), line=3),
    PointsRow(3, "liver#2", box(60, 50, 100, 90), line=4),
    PointsRow(3, "spleen", box(35, 30, 75, 70), line=5),  # overlaps both liver pieces
    PointsRow(5, "spleen", box(30, 30, 80, 80), line=6),
    PointsRow(1, "kidney", box(70, 10, 105, 40), line=7),
]


@pytest.fixture(scope="module")
def seg(identity_model_path: Path) -> Segmenter:
    return Segmenter.load(identity_model_path, threads=1, batch_size=4)


def test_base_label() -> None:
    assert base_label("liver#2") == "liver"
    assert base_label(" liver # 13 ") == "liver"
    assert base_label("liver") == "liver"
    assert base_label("a#b") == "a#b"
    assert base_label("#2") == "#2"


def test_merges_labels_pieces_and_overlaps(seg: Segmenter) -> None:
    src = CountingSeries()
    res = run_pipeline(seg, src.series, ROWS)
    assert res.label_values == {"liver": 1, "spleen": 2, "kidney": 3}  # first appearance order
    assert res.annotated_slices == [1, 3, 5]
    assert all(m.dtype == np.uint16 and m.shape == SHAPE for m in res.label_maps.values())

    probs = {
        i: seg.predict(src.data[r.slice_index], r.points, return_probabilities=True)
        for i, r in enumerate(ROWS)
    }
    thr = seg.spec.threshold
    values = {"liver": 1, "spleen": 2, "kidney": 3}

    def expected_map(idx: list[int]) -> np.ndarray:
        """Reference rule: a pixel goes to the masked object of highest probability (first on ties)."""
        stack = np.stack([np.where(probs[i] > thr, probs[i], -1.0) for i in idx])
        win = np.argmax(stack, axis=0)
        vals = np.array([values[base_label(ROWS[i].label)] for i in idx])
        return np.where(stack.max(axis=0) > 0, vals[win], 0)

    # slice 3: liver = OR of "liver" and "liver#2"; spleen overlaps, the higher probability wins
    liver_mask = (probs[0] > thr) | (probs[2] > thr)
    spleen_mask = probs[3] > thr
    assert (liver_mask & spleen_mask).any(), "the test needs an overlap"
    expected = expected_map([0, 2, 3])
    assert (expected == 2).any() and ((expected == 1) & spleen_mask).any()  # both win somewhere
    np.testing.assert_array_equal(res.label_maps[3], expected)
    np.testing.assert_array_equal(res.mask("liver#2", 3), expected == 1)
    np.testing.assert_array_equal((expected == 1) | (expected == 2), liver_mask | spleen_mask)
    # pieces of one label are OR-ed: no liver pixel of either piece is lost except to spleen
    assert not (liver_mask & (expected == 0)).any()
    np.testing.assert_array_equal(res.label_maps[1], expected_map([1, 5]))
    np.testing.assert_array_equal(res.label_maps[5], expected_map([4]))
    assert not res.mask("spleen", 1).any() and not res.mask("liver", 0).any()

    # per-object results in input order, areas of each object's own mask
    assert [o.line for o in res.objects] == [2, 3, 4, 5, 6, 7]
    assert [o.base_label for o in res.objects] == ["liver", "liver", "liver", "spleen", "spleen", "kidney"]
    assert res.objects[2].label == "liver#2"
    for i, o in enumerate(res.objects):
        m = probs[i] > thr
        assert o.area_px == int(m.sum()) > 0
        assert o.area_mm2 == pytest.approx(o.area_px * SPACING[0] * SPACING[1])
        assert o.prob_mean == pytest.approx(float(probs[i][m].mean()), rel=1e-5)
        assert o.prob_max == pytest.approx(float(probs[i].max()))

    dense = res.dense()
    assert dense.shape == (6, *SHAPE) and dense.dtype == np.uint16
    assert not dense[[0, 2, 4]].any()
    np.testing.assert_array_equal(dense[3], res.label_maps[3])
    summary = {s["label"]: s for s in res.label_summary()}
    assert summary["liver"]["slices"] == [1, 3]
    assert summary["liver"]["area_px"] == int((dense == 1).sum())
    objs = res.label_masks(ROWS)
    assert [(o.slice_index, o.label) for o in objs] == [
        (1, "liver"),
        (1, "kidney"),
        (3, "liver"),
        (3, "spleen"),
        (5, "spleen"),
    ]
    np.testing.assert_array_equal(objs[2].mask, expected == 1)
    np.testing.assert_array_equal(objs[2].points, ROWS[0].points)  # first piece's points


@pytest.mark.parametrize(("batch_size", "prefetch"), [(1, 1), (2, 2), (4, 1), (16, 2)])
def test_batching_does_not_change_results_and_reads_each_slice_once(
    seg: Segmenter, batch_size: int, prefetch: int
) -> None:
    ref = run_pipeline(seg, CountingSeries().series, ROWS, batch_size=16)
    src = CountingSeries()
    seen: list[int] = []
    res = run_pipeline(seg, src.series, ROWS, batch_size=batch_size, prefetch=prefetch, progress=seen.append)
    assert src.reads == {1: 1, 3: 1, 5: 1}  # only annotated slices, each once
    assert seen[-1] == len(ROWS) and seen == sorted(seen)
    assert len(seen) == -(-len(ROWS) // batch_size)
    assert res.label_maps.keys() == ref.label_maps.keys()
    for k in ref.label_maps:
        np.testing.assert_array_equal(res.label_maps[k], ref.label_maps[k])
    assert [o.area_px for o in res.objects] == [o.area_px for o in ref.objects]


def test_timings(seg: Segmenter) -> None:
    res = run_pipeline(seg, CountingSeries().series, ROWS, batch_size=2)
    t = res.timings
    assert min(t.read, t.preprocess, t.model, t.postprocess, t.stall) >= 0
    assert t.model > 0 and t.preprocess > 0
    assert t.total >= t.model + t.postprocess
    assert t.overhead_share == pytest.approx((t.total - t.model) / t.model)
    assert set(t.to_dict()) >= {"read", "preprocess", "model", "postprocess", "total", "overhead_share"}


def test_fused_model_in_the_pipeline(fused_model_path: Path) -> None:
    seg = Segmenter.load(fused_model_path, batch_size=2)
    src = CountingSeries()
    rows = [PointsRow(2, "a", box(10, 10, 50, 50)), PointsRow(4, "b", box(20, 20, 60, 60))]
    res = run_pipeline(seg, src.series, rows)
    np.testing.assert_array_equal(res.mask("a", 2), src.data[2] > 10)  # fake model: hu > left_x
    np.testing.assert_array_equal(res.mask("b", 4), src.data[4] > 20)


def test_invalid_rows_fail_before_inference(seg: Segmenter) -> None:
    src = CountingSeries()
    rows = [
        PointsRow(9, "liver", box(10, 10, 50, 45), line=2),
        PointsRow(1, "liver", box(10, 10, 50, 45) + [0, 80], line=3),
        PointsRow(1, "ok", box(10, 10, 50, 45), line=4),
    ]
    with pytest.raises(InputError) as info:
        run_pipeline(seg, src.series, rows)
    msg = str(info.value)
    assert "2 invalid object(s)" in msg and "line 2" in msg and "line 3" in msg and "outside" in msg
    assert src.reads == {}


def test_reader_error_in_background_thread_propagates(seg: Segmenter) -> None:
    src = CountingSeries(fail_on=3)
    with pytest.raises(InputError, match="slice 3 is unreadable"):
        run_pipeline(seg, src.series, ROWS, batch_size=1)
    assert not any(t.name == "cmdeploy-prefetch" and t.is_alive() for t in threading.enumerate())


def test_empty_rows(seg: Segmenter) -> None:
    res = run_pipeline(seg, CountingSeries().series, [])
    assert res.label_maps == {} and res.objects == [] and res.label_values == {}


@pytest.mark.slow
def test_300_slice_series_memory(plain_model_path: Path) -> None:
    """A 300-slice 512 x 512 series with one object per slice stays far below 1.5 GB peak RSS."""
    code = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        import numpy as np
        from cmdeploy.io.series import Series
        from cmdeploy.pipeline import run_pipeline
        from cmdeploy.points_csv import PointsRow
        from cmdeploy.segmenter import Segmenter
        base = np.random.default_rng(0).normal(0, 200, (512, 512)).astype(np.float32)
        s = Series(kind="npy", path=Path("x.npy"), num_slices=300, shape=(512, 512),
                   spacing_xy_mm=None, slice_uids=(None,) * 300, loader=lambda k: base + k)
        pts = np.array([[100, 260], [400, 262], [250, 100], [252, 420]], np.float32)
        rows = [PointsRow(k, "organ", pts) for k in range(300)]
        res = run_pipeline(Segmenter.load({str(plain_model_path)!r}, threads=1), s, rows)
        assert len(res.label_maps) == 300
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) < 1536, f"peak RSS {proc.stdout.strip()} MB"
