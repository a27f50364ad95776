"""Label volume -> extreme points: NumPy connected components, naming, CLI, shared data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from typer.testing import CliRunner

from cmdeploy.commands.points_from_labels import points_from_labels
from cmdeploy.errors import InputError
from cmdeploy.guidance import extreme_points
from cmdeploy.io import open_series
from cmdeploy.io.cases import load_label_names
from cmdeploy.labels_to_points import (
    connected_components,
    open_label_volume,
    points_from_label_slice,
    points_from_label_volume,
    resolve_label_ids,
)
from cmdeploy.points_csv import read_points_csv

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs"
_STRUCTURE = {4: ndimage.generate_binary_structure(2, 1), 8: np.ones((3, 3), bool)}


def _scipy_components(lab: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Reference: scipy per label value, renumbered in raster order of first pixel."""
    out = np.zeros(lab.shape, np.int64)
    n = 0
    for value in np.unique(lab[lab != 0]):
        comp, m = ndimage.label(lab == value, structure=_STRUCTURE[connectivity])
        out[comp > 0] = comp[comp > 0] + n
        n += m
    flat = out.ravel()
    ids, first = np.unique(flat[flat > 0], return_index=True)
    order = np.argsort(np.flatnonzero(flat > 0)[first])
    remap = np.zeros(n + 1, np.int64)
    remap[ids[order]] = np.arange(1, ids.size + 1)
    return remap[out], n


@settings(max_examples=60, deadline=None)
@given(
    lab=arrays(np.uint8, st.tuples(st.integers(1, 24), st.integers(1, 24)),
               elements=st.integers(0, 3)),
    connectivity=st.sampled_from([4, 8]),
)
def test_components_match_scipy(lab, connectivity) -> None:
    comp, n = connected_components(lab, connectivity=connectivity)
    ref, n_ref = _scipy_components(lab, connectivity)
    assert n == n_ref
    np.testing.assert_array_equal(comp, ref)  # same partition, same raster numbering
    assert comp.dtype == np.int32


def test_components_long_snake_and_diagonals() -> None:
    m = np.zeros((64, 64), np.uint8)
    m[::2] = 1
    m[1::4, -1] = 1
    m[3::4, 0] = 1  # one serpentine path through the whole array
    comp, n = connected_components(m)
    assert n == 1 and np.all((comp > 0) == (m > 0))
    diag = np.eye(5, dtype=np.uint8)
    assert connected_components(diag, connectivity=4)[1] == 5
    assert connected_components(diag, connectivity=8)[1] == 1
    with pytest.raises(ValueError, match="connectivity"):
        connected_components(diag, connectivity=6)


def test_slice_points_naming_and_filters() -> None:
    lab = np.zeros((40, 50), np.int64)
    lab[5:20, 3:15] = 5  # big piece of label 5 (180 px)
    lab[30:34, 40:47] = 5  # small piece of label 5 (28 px)
    lab[25:29, 8:14] = 7  # 24 px: just below the default min size (25)
    lab[0, 49] = 9  # one pixel
    lab[20:30, 20:23] = 7  # 30 px, touches nothing of its label
    lab[30:35, 24:29] = 8  # two 25 px squares of label 8 touching only at a corner:
    lab[35:40, 29:34] = 8  # one object with the default 8-connectivity, two with 4
    rows = points_from_label_slice(lab, slice_index=4, names={5: "liver"})
    assert [(r.slice_index, r.label) for r in rows] == [(4, "liver"), (4, "liver#2"), (4, "7"), (4, "8")]
    np.testing.assert_array_equal(rows[0].points, [[3, 12], [14, 12], [8, 5], [8, 19]])
    small = np.zeros_like(lab, bool)
    small[30:34, 40:47] = True
    np.testing.assert_array_equal(rows[1].points, extreme_points(small))
    for r in rows:  # every extreme point lies on its object
        xs, ys = r.points[:, 0].astype(int), r.points[:, 1].astype(int)
        assert np.all(lab[ys, xs] != 0)
    diag = lab == 8
    np.testing.assert_array_equal(rows[3].points, extreme_points(diag))
    assert rows[3].points[:, 0].min() == 24 and rows[3].points[:, 0].max() == 33  # spans both squares
    labels = [r.label for r in points_from_label_slice(lab, min_size=1)]
    assert "9" not in labels and labels.count("7") == 1 and "7#2" in labels  # pixel dropped
    only7 = points_from_label_slice(lab, label_ids={7}, min_size=24)
    assert [r.label for r in only7] == ["7", "7#2"]
    only8 = points_from_label_slice(lab, label_ids={8}, connectivity=4)
    assert [r.label for r in only8] == ["8", "8#2"]  # equal sizes: raster order of first pixel
    assert only8[0].points[:, 0].max() == 28 and only8[1].points[:, 0].min() == 29


def test_volume_array_and_on_slice() -> None:
    vol = np.zeros((3, 12, 12), np.uint8)
    vol[0, 2:8, 2:7] = 1  # 30 px
    vol[2, 1:5, 1:10] = 2  # 36 px
    seen: list[int] = []
    rows = points_from_label_volume(vol, on_slice=seen.append)
    assert [(r.slice_index, r.label) for r in rows] == [(0, "1"), (2, "2")]
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError, match="N, H, W"):
        points_from_label_volume(vol[0])


def test_nifti_label_volume_uses_ct_convention(tmp_path) -> None:
    """Labels stored RAS and CT stored LPS (same voxels in mm) give the same LPS slices and points."""
    import nibabel as nib

    ras_aff = np.diag([1.0, 1.0, 2.0, 1.0])
    lps_aff = ras_aff @ np.array([[-1, 0, 0, 11], [0, -1, 0, 8], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    data = np.zeros((12, 9, 2), np.uint8)  # (X, Y, Z) in RAS: i -> patient right, j -> anterior
    data[2:9, 1:6, 1] = 3  # i in 2..8, j in 1..5 on slice 1 (35 px, 34 after the next line)
    data[2, 1, 1] = 0  # asymmetric: the (left-most, posterior-most) corner is missing
    nib.save(nib.Nifti1Image(data, ras_aff), tmp_path / "lab.nii.gz")
    ct = data[::-1, ::-1, :].astype(np.int16)
    nib.save(nib.Nifti1Image(ct, lps_aff), tmp_path / "ct.nii.gz")
    vol = open_label_volume(tmp_path / "lab.nii.gz")
    series = open_series(tmp_path / "ct.nii.gz")
    assert (len(vol), vol.shape) == (len(series), series.shape) == (2, (9, 12))
    np.testing.assert_array_equal(vol.slice(1), series.slice_hu(1))
    expected = data[::-1, ::-1, 1].T  # LPS slice: x = 11 - i (right -> left), y = 8 - j (A -> P)
    np.testing.assert_array_equal(vol.slice(1), expected)
    assert vol.slice(1)[7, 9] == 0 and vol.slice(1)[7, 8] == 3  # the missing corner, mirrored
    (row,) = points_from_label_volume(vol.iter_slices())
    assert row.slice_index == 1
    np.testing.assert_array_equal(row.points, extreme_points(expected == 3))
    assert row.points[:, 0].min() == 3 and row.points[:, 0].max() == 9  # x = 11 - i for i 8..2
    assert row.points[:, 1].min() == 3 and row.points[:, 1].max() == 7  # y = 8 - j for j 5..1


def test_label_volume_refusals(tmp_path) -> None:
    np.save(tmp_path / "f.npy", np.full((1, 3, 3), 1.5))
    with pytest.raises(InputError, match="non-integer"):
        open_label_volume(tmp_path / "f.npy").slice(0)
    np.save(tmp_path / "neg.npy", np.full((3, 3), -1))
    with pytest.raises(InputError, match="negative"):
        open_label_volume(tmp_path / "neg.npy").slice(0)
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputError, match="expected a .nii"):
        open_label_volume(tmp_path / "x.txt")
    with pytest.raises(InputError, match="does not exist"):
        open_label_volume(tmp_path / "none.nii.gz")


def test_names_and_selection(tmp_path) -> None:
    p = tmp_path / "n.json"
    p.write_text(json.dumps({"5": "liver", "52": "aorta"}))
    names = load_label_names(p)
    assert names == {5: "liver", 52: "aorta"}
    assert resolve_label_ids(["Liver", " 52", "7"], names) == {5, 52, 7}
    with pytest.raises(InputError, match="'livr'"):
        resolve_label_ids(["livr"], names)
    for bad in ("[1, 2]", '{"x": "a"}', '{"1": "a#b"}', "{"):
        p.write_text(bad)
        with pytest.raises(InputError):
            load_label_names(p)


def _cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(points_from_labels)
    return app


def test_cli_writes_valid_csv_and_exits_2_on_bad_input(tmp_path) -> None:
    vol = np.zeros((2, 16, 16), np.uint8)
    vol[0, 2:9, 3:12] = 5  # 63 px
    vol[1, 9:14, 1:6] = 5  # 25 px: exactly the default --min-size, kept
    vol[1, 1:6, 10:16] = 5  # 30 px: the larger piece on slice 1
    np.save(tmp_path / "lab.npy", vol)
    (tmp_path / "names.json").write_text('{"5": "liver"}')
    out = tmp_path / "pts.csv"
    runner = CliRunner()
    res = runner.invoke(_cli(), [str(tmp_path / "lab.npy"), "-o", str(out),
                                 "--names", str(tmp_path / "names.json"), "--labels", "liver"])
    assert res.exit_code == 0, res.output
    np.save(tmp_path / "ct.npy", np.zeros((2, 16, 16), np.float32))
    rows = read_points_csv(out, open_series(tmp_path / "ct.npy"))
    assert [(r.slice_index, r.label) for r in rows] == [(0, "liver"), (1, "liver"),
                                                        (1, "liver#2")]
    assert rows[1].points[:, 0].min() == 10 and rows[2].points[:, 0].max() == 5  # 30 px, then 25 px
    res = runner.invoke(_cli(), [str(tmp_path / "lab.npy"), "-o", str(out), "--min-size", "26",
                                 "--connectivity", "4", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert [(r.slice_index, r.label) for r in read_points_csv(out, open_series(tmp_path / "ct.npy"))] == [
        (0, "5"), (1, "5")]  # the 25 px piece dropped; no names file: the id as text
    res = runner.invoke(_cli(), [str(tmp_path / "lab.npy"), "-o", str(out), "--labels", "liver"])
    assert res.exit_code == 2 and "unknown label" in res.output
    res = runner.invoke(_cli(), [str(tmp_path / "nope.nii"), "-o", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(_cli(), [str(tmp_path / "lab.npy"), "-o", str(out), "--min-size", "999",
                                 "--overwrite"])
    assert res.exit_code == 2 and "no object" in res.output


@pytest.mark.shared_data
def test_abdomen_labels_few_slices(tmp_path) -> None:
    labels = DATA / "abdomen_3mm" / "labels.nii.gz"
    if not labels.exists():
        pytest.skip(f"shared CT data not found at {DATA}")
    names = load_label_names(DATA / "labels.json")
    vol = open_label_volume(labels)
    ks = [50, 60, 70]
    rows = points_from_label_volume(((k, vol.slice(k)) for k in ks), names=names)
    assert rows and {r.slice_index for r in rows} <= set(ks)
    assert "liver" in {r.label for r in rows}
    for r in rows:
        lab = vol.slice(r.slice_index)
        base = r.label.split("#")[0]
        lid = next(i for i, n in names.items() if n == base)
        xs, ys = r.points[:, 0].astype(int), r.points[:, 1].astype(int)
        assert np.all(lab[ys, xs] == lid), r.label  # extreme points lie on the object
    from cmdeploy.points_csv import write_points_csv

    write_points_csv(tmp_path / "p.csv", rows)
    back = read_points_csv(tmp_path / "p.csv", open_series(DATA / "abdomen_3mm" / "image.nii.gz"))
    assert len(back) == len(rows)


def test_object_definition_is_shared_by_cli_training_and_library():
    """One definition of "an object": same min size and connectivity everywhere."""
    import inspect

    from cmdeploy.commands.evaluate import evaluate as evaluate_cmd
    from cmdeploy.commands.points_from_labels import points_from_labels as pfl_cmd
    from cmdeploy.labels_to_points import DEFAULT_CONNECTIVITY, DEFAULT_MIN_SIZE

    for cmd in (evaluate_cmd, pfl_cmd):
        params = inspect.signature(cmd).parameters
        assert params["min_size"].default.default == DEFAULT_MIN_SIZE
        assert params["connectivity"].default.default == DEFAULT_CONNECTIVITY
    assert DEFAULT_CONNECTIVITY == 8  # the paper's objects: 8-connected components


def _agreement_volume() -> np.ndarray:
    """(4, 40, 48) labels: pieces of one label, touching labels, a diagonal bridge, tiny bits."""
    vol = np.zeros((4, 40, 48), np.int16)
    vol[0, 2:12, 2:12] = 2  # 100 px, piece 1 of label 2
    vol[0, 20:26, 30:36] = 2  # 36 px, piece 2
    vol[0, 2:12, 12:20] = 5  # touches label 2 by an edge: a separate object
    vol[0, 30:34, 2:6] = 5  # 16 px: under DEFAULT_MIN_SIZE
    vol[0, 38, 46] = 3  # single pixel
    vol[1, 5:11, 5:11] = 7
    vol[1, 11:17, 11:17] = 7  # corner contact: one 8-connected object of 72 px
    rng = np.random.default_rng(3)
    vol[3] = np.where(rng.random((40, 48)) < 0.55, rng.integers(1, 3, (40, 48)), 0)  # ragged blobs
    return vol  # slice 2 is empty


def test_object_enumeration_agrees_across_callers() -> None:
    """points-from-labels, evaluation, calibration and training see the same objects."""
    from cmdeploy.calibration.slices import CaseVolume
    from cmdeploy.calibration.slices import slice_objects as calibration_objects
    from cmdeploy.evaluation import slice_objects as evaluation_objects
    from cmdeploy.labels_to_points import label_components
    from cmdeploy.train.data import slice_samples

    vol = _agreement_volume()

    def key(k: int, lid: int, area: int, pts: np.ndarray) -> tuple:
        return (k, lid, area, tuple(np.asarray(pts, np.float32).ravel().tolist()))

    ref = [
        key(k, c.label_id, c.area_px, extreme_points(c.mask()))
        for k in range(len(vol)) for c in label_components(vol[k])
    ]
    assert len(ref) == len(set(ref)) and {r[:3] for r in ref} >= {(0, 2, 100), (0, 2, 36), (1, 7, 72)}
    assert not any(r[1] == 3 or (r[1] == 5 and r[2] == 16) for r in ref)  # single pixel, under min
    assert sum(r[0] == 3 for r in ref) >= 2

    found = [(k, o, m) for k in range(len(vol)) for o, m in evaluation_objects(vol[k], slice_index=k)]
    assert all(int(m.sum()) == o.area_px for _, o, m in found)
    ev = [key(k, o.label_id, o.area_px, o.points) for k, o, _ in found]
    case = CaseVolume("syn", np.zeros(vol.shape, np.float32), vol)
    cal = [
        key(k, o.label, int(o.mask.sum()), o.points)
        for k in range(len(vol)) for o in calibration_objects(case, k)
    ]
    tr = [
        key(k, s.label, s.num_pixels, extreme_points(s.full_mask(vol.shape[1:])))
        for k in range(len(vol))
        for s in slice_samples(vol[k], volume=0, case="syn", slice_index=k, label_names={})
    ]
    pfl = [(r.slice_index, int(r.label.split("#")[0]), tuple(r.points.ravel().tolist()))
           for r in points_from_label_volume(vol)]
    assert ev == ref  # same order too: label id, then size
    assert sorted(cal) == sorted(ref) and sorted(tr) == sorted(ref)
    assert pfl == [(r[0], r[1], r[3]) for r in ref]
    names = [r.label for r in points_from_label_volume(vol) if r.slice_index == 0]
    assert names == ["2", "2#2", "5"]


def test_cli_simulate_writes_annotator_clicks(tmp_path) -> None:
    """--simulate: the points are the simulated annotator's (seeded per object), not the extremes."""
    from cmdeploy.annotator import ClickModel, annotator_points

    vol = np.zeros((1, 40, 40), np.uint8)
    vol[0, 5:30, 8:35] = 1
    np.save(tmp_path / "lab.npy", vol)
    np.save(tmp_path / "ct.npy", np.zeros((1, 40, 40), np.float32))
    runner = CliRunner()
    exact_csv, sim_csv = tmp_path / "exact.csv", tmp_path / "sim.csv"
    assert runner.invoke(_cli(), [str(tmp_path / "lab.npy"), "-o", str(exact_csv)]).exit_code == 0
    res = runner.invoke(_cli(), [str(tmp_path / "lab.npy"), "-o", str(sim_csv), "--simulate",
                                 "--click-tolerance", "2", "--click-jitter-mm", "1.5", "--seed", "7"])
    assert res.exit_code == 0, res.output
    series = open_series(tmp_path / "ct.npy")
    exact = read_points_csv(exact_csv, series)[0].points
    sim = read_points_csv(sim_csv, series)[0].points
    want = annotator_points(vol[0] == 1, None, ClickModel(2.0, 1.5), np.random.default_rng([7, 0, 1, 1]))
    np.testing.assert_allclose(sim, want, atol=1e-3)
    assert not np.allclose(sim, exact)
    assert abs(sim[0, 0] - exact[0, 0]) <= 2.0 + 1.5 and abs(sim[2, 1] - exact[2, 1]) <= 2.0 + 1.5
