"""Writers: atomic output, NIfTI labels, PNG overlays, report.json, SNOMED label codes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdeploy.errors import InputError
from cmdeploy.writers import ObjectMask, label_values, overlay_name
from cmdeploy.writers.atomic import (
    TEMP_PREFIX,
    OutputDir,
    OutputExistsError,
    atomic_path,
    atomic_write_bytes,
)

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")


def write_series_nifti(path: Path, series) -> Path:
    """The whole Series as an int16 HU NIfTI with its geometry (a CT to check labels against)."""
    from cmdeploy.writers.nifti import output_grid, series_geometry, write_nifti_volume

    h, w = series.shape
    vol = np.empty((w, h, series.num_slices), dtype=np.int16)
    for k, sl in series.iter_slices():
        vol[:, :, k] = np.clip(np.rint(sl), -32768, 32767).astype(np.int16).T
    affine, qcode, scode = series_geometry(series)
    return write_nifti_volume(path, output_grid(series, vol), affine, qform_code=qcode, sform_code=scode)


def write_overlay_png(path: Path, slice_hu: np.ndarray, objects, **kwargs) -> Path:
    """Render an overlay and write it as PNG."""
    from cmdeploy.writers.png_overlay import png_bytes, render_overlay

    path.write_bytes(png_bytes(render_overlay(slice_hu, objects, **kwargs)))
    return path


def _ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def write_ct_series(folder: Path, z_positions: list[float]) -> list[str]:
    """Copies of CT_small at the given z (files named in reverse z order); returns SOP UIDs by z."""
    from pydicom.uid import generate_uid

    src = pydicom.dcmread(_ct_small())
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    uids = []
    for n, z in enumerate(z_positions):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.ImagePositionPatient = [-158.135803, -179.035797, float(z)]
        ds.InstanceNumber = n + 1
        ds.save_as(folder / f"im{len(z_positions) - n:02d}.dcm")
        uids.append(str(ds.SOPInstanceUID))
    return uids


# ------------------------------------------------------------------------------------ atomic


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert _leftovers(tmp_path) == []


def test_atomic_path_failure_keeps_target_and_removes_temp(tmp_path: Path) -> None:
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith("labels.nii.gz")
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]


def test_atomic_path_requires_a_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_output_dir_refuses_existing_targets_listing_them(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "labels.nii.gz").write_text("x")
    out = OutputDir(tmp_path)
    with pytest.raises(OutputExistsError) as info:
        out.check(["report.json", "labels.nii.gz", "seg.dcm"])
    assert isinstance(info.value, InputError)
    msg = str(info.value)
    assert "report.json" in msg and "labels.nii.gz" in msg and "seg.dcm" not in msg
    assert "overwrite" in msg
    with pytest.raises(OutputExistsError):
        with OutputDir(tmp_path) as out2:
            out2.write_text("report.json", "new")
    assert (tmp_path / "report.json").read_text() == "{}"
    assert _leftovers(tmp_path) == []


def test_output_dir_commit_and_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "out"
    with OutputDir(root) as out:
        out.write_text("report.json", "v1")
        out.write_bytes("overlays/slice_0001.png", b"png")
        assert not (root / "report.json").exists()  # staged, not yet visible
    assert (root / "report.json").read_text() == "v1"
    assert (root / "overlays" / "slice_0001.png").read_bytes() == b"png"
    with OutputDir(root, overwrite=True) as out:
        out.write_text("report.json", "v2")
    assert (root / "report.json").read_text() == "v2"
    assert _leftovers(root) == []
    with pytest.raises(ValueError, match="relative"):
        OutputDir(root).target("../escape.txt")


def test_output_dir_failure_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError, match="model failed"):
        with OutputDir(root) as out:
            out.write_text("a.txt", "a")
            with out.stage("b.txt") as tmp:
                tmp.write_text("partial")
            raise RuntimeError("model failed")
    assert not (tmp_path / "new").exists()  # folders created for the outputs are removed again


def test_output_dir_failed_rename_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_text("old a")
    out = OutputDir(tmp_path, overwrite=True)
    out.write_text("a.txt", "new a")
    out.write_text("b.txt", "new b")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "b.txt":
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        out.commit()
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "a.txt").read_text() == "old a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


# ------------------------------------------------------------------------------------- NIfTI


def _asymmetric_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[1, w - 2] = True  # a single pixel near the top right
    m[h - 2 :, :2] = True  # a block at the bottom left
    return m


def test_nifti_labels_align_with_nifti_input(tmp_path: Path) -> None:
    """A sheared input stored (R, P, S): labels go back on its own grid and affine."""
    from cmdeploy.io import read_nifti
    from cmdeploy.writers.nifti import write_nifti_labels

    X, Y, Z = 7, 5, 3
    ct = np.arange(X * Y * Z, dtype=np.int16).reshape(X, Y, Z)  # every voxel distinct
    affine = np.array([[0.8, 0.1, 0, -10], [0, -0.7, 0, 20], [0.05, 0, 2.5, 30], [0, 0, 0, 1.0]])
    nib.save(nib.Nifti1Image(ct, affine), str(tmp_path / "ct.nii.gz"))
    series = read_nifti(tmp_path / "ct.nii.gz")
    assert series.shape == (Y, X)
    # i runs to patient right, j to posterior: LPS slice x = X-1-i, y = j
    np.testing.assert_array_equal(series.slice_hu(1), ct[::-1, :, 1].T)
    m1 = _asymmetric_mask(Y, X)
    m2 = np.zeros((Y, X), dtype=bool)
    m2[2, 3] = True
    objs = [ObjectMask(1, "liver", m1), ObjectMask(2, "heart", m2), ObjectMask(1, "heart", m2)]
    values = write_nifti_labels(tmp_path / "labels.nii.gz", series, objs)
    assert values == {"liver": 1, "heart": 2}

    img = nib.load(str(tmp_path / "labels.nii.gz"))
    data = np.asarray(img.dataobj)
    assert data.shape == (X, Y, Z) and data.dtype == np.uint8
    np.testing.assert_allclose(img.affine, affine, atol=1e-5)
    assert data[1, 1, 1] == 1  # mask[y=1, x=X-2] -> voxel (i=X-1-x, j=y, k)
    assert data[X - 1 - 3, 2, 2] == 2
    assert data[X - 1 - 3, 2, 1] == 2  # the later object wins where two overlap
    expected = np.zeros((Z, Y, X), np.uint8)
    expected[1][m1] = 1
    expected[1][m2] = 2
    expected[2][m2] = 2
    # the reader's convention gives back exactly the masks, and the CT voxel under each label pixel
    labels = read_nifti(tmp_path / "labels.nii.gz")
    for k in range(Z):
        np.testing.assert_array_equal(labels.slice_hu(k), expected[k])
        np.testing.assert_array_equal(np.sort(ct[:, :, k][data[:, :, k] > 0]),
                                      np.sort(series.slice_hu(k)[expected[k] > 0]))


def _same_voxels_stored(tmp_path: Path, ras: np.ndarray, ras_affine: np.ndarray) -> dict[str, Path]:
    """``ras`` saved as RAS, as LPS (i, j reversed) and as (S, R, P) (permuted, third axis A/P)."""
    x, y, _ = ras.shape
    flip = np.array([[-1, 0, 0, x - 1], [0, -1, 0, y - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    srp = np.array([[0, 1, 0, 0], [0, 0, -1, y - 1], [1, 0, 0, 0], [0, 0, 0, 1.0]])  # (a,b,c)->(b,Y-1-c,a)
    variants = {
        "ras": (ras, ras_affine),
        "lps": (ras[::-1, ::-1, :], ras_affine @ flip),
        "srp": (ras.transpose(2, 0, 1)[:, :, ::-1], ras_affine @ srp),
    }
    out = {}
    for key, (data, aff) in variants.items():
        out[key] = tmp_path / f"ct_{key}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), aff), str(out[key]))
    return out


def test_nifti_labels_overlay_ras_lps_and_permuted_inputs(tmp_path: Path) -> None:
    """One slice-frame mask -> labels on each input's own grid, at the same mm positions."""
    from cmdeploy.io import read_nifti
    from cmdeploy.writers.nifti import write_nifti_labels

    X, Y, Z = 6, 5, 4
    ras = np.arange(X * Y * Z, dtype=np.int16).reshape(X, Y, Z)  # i -> right, j -> anterior
    ras_affine = np.array([[0.9, 0, 0, -20], [0, 0.8, 0, 10], [0, 0, 3.0, 40], [0, 0, 0, 1.0]])
    mask = _asymmetric_mask(Y, X)  # in the LPS slice frame: row 0 anterior, column 0 patient right
    k = 2
    # hand-computed: slice pixel [y, x] is RAS voxel (X-1-x, Y-1-y, k)
    ys, xs = np.nonzero(mask)
    want_mm = (ras_affine @ np.stack([X - 1 - xs, Y - 1 - ys, np.full_like(xs, k), np.ones_like(xs)]))[:3]
    want_mm = want_mm[:, np.lexsort(want_mm)]
    for key, path in _same_voxels_stored(tmp_path, ras, ras_affine).items():
        series = read_nifti(path)
        np.testing.assert_array_equal(series.slice_hu(k), ras[::-1, ::-1, k].T, err_msg=key)
        out = tmp_path / f"labels_{key}.nii.gz"
        write_nifti_labels(out, series, [ObjectMask(k, "liver", mask)])
        src, img = nib.load(str(path)), nib.load(str(out))
        data = np.asarray(img.dataobj)
        assert data.shape == src.shape, key  # the input's stored grid
        np.testing.assert_allclose(img.affine, src.affine, atol=1e-6, err_msg=key)
        vox = np.nonzero(data == 1)
        got_mm = (img.affine @ np.stack([*vox, np.ones_like(vox[0])]))[:3]
        np.testing.assert_allclose(got_mm[:, np.lexsort(got_mm)], want_mm, atol=1e-5, err_msg=key)
        under = np.sort(np.asarray(src.dataobj)[data == 1])
        np.testing.assert_array_equal(under, np.sort(series.slice_hu(k)[mask]), err_msg=key)
        # the whole-volume writer round-trips a NIfTI input onto its own grid too
        write_series_nifti(tmp_path / f"copy_{key}.nii.gz", series)
        copy = nib.load(str(tmp_path / f"copy_{key}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(copy.dataobj), np.asarray(src.dataobj), err_msg=key)
        np.testing.assert_allclose(copy.affine, src.affine, atol=1e-6, err_msg=key)


def _lps_to_ras(p: np.ndarray) -> np.ndarray:
    return p * np.array([-1.0, -1.0, 1.0])


def test_dicom_affine_maps_voxels_to_patient_space() -> None:
    from cmdeploy.writers.nifti import dicom_affine

    row = np.array([np.cos(0.3), np.sin(0.3), 0.0])
    col = np.array([-np.sin(0.3) * 0.8, np.cos(0.3) * 0.8, 0.6])
    col /= np.linalg.norm(col)
    normal = np.cross(row, col)
    ipp0 = np.array([-100.0, 50.0, 20.0])
    positions = ipp0 + np.arange(4)[:, None] * 2.5 * normal
    sx, sy = 0.7, 0.9
    aff = dicom_affine(positions, np.concatenate([row, col]), (sx, sy))
    for i, j, k in [(0, 0, 0), (5, 0, 0), (0, 7, 0), (3, 2, 3)]:
        lps = positions[k] + i * sx * row + j * sy * col
        np.testing.assert_allclose((aff @ [i, j, k, 1])[:3], _lps_to_ras(lps), atol=1e-9)


def test_dicom_affine_warns_on_uneven_spacing() -> None:
    from cmdeploy.writers.nifti import dicom_affine

    pos = np.array([[0, 0, 0], [0, 0, 1.0], [0, 0, 5.0]])
    with pytest.warns(UserWarning, match="not evenly spaced"):
        dicom_affine(pos, np.array([1.0, 0, 0, 0, 1, 0]), (1.0, 1.0))


def test_nifti_labels_from_dicom_series(tmp_path: Path) -> None:
    from cmdeploy.io import read_dicom_series
    from cmdeploy.writers.nifti import write_nifti_labels

    write_ct_series(tmp_path / "dcm", [-70.7, -75.7, -65.7])
    series = read_dicom_series(tmp_path / "dcm")
    h, w = series.shape
    m = _asymmetric_mask(h, w)
    write_nifti_labels(tmp_path / "labels.nii", series, [ObjectMask(2, "aorta", m)])
    img = nib.load(str(tmp_path / "labels.nii"))
    data = np.asarray(img.dataobj)
    assert data.shape == (w, h, 3)
    np.testing.assert_array_equal(data[:, :, 2].T, m.astype(np.uint8))
    assert data[:, :, :2].max() == 0
    # voxel (i, j, k) -> RAS = (-(x0 + i sx), -(y0 + j sy), z_k)
    sx, sy = series.spacing_xy_mm
    x0, y0 = -158.135803, -179.035797
    for i, j, k in [(0, 0, 0), (w - 2, 1, 2), (10, 20, 1)]:
        expected = [-(x0 + i * sx), -(y0 + j * sy), -75.7 + 5.0 * k]
        np.testing.assert_allclose((img.affine @ [i, j, k, 1])[:3], expected, atol=1e-4)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    # the CT volume written from the same geometry holds the HU of each slice
    write_series_nifti(tmp_path / "ct.nii.gz", series)
    ct = nib.load(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(ct.affine, img.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ct.dataobj)[:, :, 1].T, np.rint(series.slice_hu(1)))


def test_nifti_single_dicom_slice_uses_slice_thickness(tmp_path: Path) -> None:
    from cmdeploy.io import read_dicom_file
    from cmdeploy.writers.nifti import series_geometry

    series = read_dicom_file(_ct_small())
    aff, q, s = series_geometry(series)
    np.testing.assert_allclose(aff[:3, 2], [0, 0, 5.0])  # normal (0, 0, 1) x SliceThickness 5 mm
    assert (q, s) == (1, 1)


def test_nifti_missing_nibabel_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import sys

    from cmdeploy.writers.nifti import write_nifti_volume

    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(InputError, match=r"cmdeploy\[nifti\]"):
        write_nifti_volume(tmp_path / "x.nii", np.zeros((2, 2, 1), np.uint8), np.eye(4))


def test_label_volume_rejects_bad_objects() -> None:
    from cmdeploy.writers.nifti import label_volume

    with pytest.raises(ValueError, match="mask shape"):
        label_volume([ObjectMask(0, "a", np.zeros((3, 3), bool))], 1, (4, 4))
    with pytest.raises(ValueError, match="slice index"):
        label_volume([ObjectMask(5, "a", np.zeros((4, 4), bool))], 2, (4, 4))


# --------------------------------------------------------------------------------------- PNG


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_mask_contour_properties(seed: int) -> None:
    from cmdeploy.writers.png_overlay import mask_contour

    rng = np.random.default_rng(seed)
    m = rng.random((9, 11)) < 0.6
    c = mask_contour(m)
    assert not (c & ~m).any()  # contour is inside the mask
    interior = m & ~c
    padded = np.pad(m, 1)
    # every interior pixel has all four neighbours in the mask; every contour pixel has not
    nb = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    np.testing.assert_array_equal(interior, m & nb)


def test_render_overlay_colours_the_mask(tmp_path: Path) -> None:
    from PIL import Image

    from cmdeploy.writers.png_overlay import color_for_value

    h, w = 40, 60
    hu = np.linspace(-300, 400, h * w, dtype=np.float32).reshape(h, w)
    mask = np.zeros((h, w), bool)
    mask[10:25, 30:50] = True
    pts = np.array([[30, 17], [49, 17], [40, 10], [40, 24]], np.float32)
    obj = ObjectMask(0, "heart", mask, pts)
    path = write_overlay_png(tmp_path / "s.png", hu, [obj], draw_labels=False, draw_points=False)
    img = Image.open(path)
    assert img.size == (w, h) and img.mode == "RGB"
    rgb = np.asarray(img).astype(int)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    assert not grey[mask].any()  # every mask pixel is tinted
    assert grey[~mask].all()  # and nothing else
    color = color_for_value(1)
    assert tuple(rgb[18, 30]) == color  # left edge of the mask = contour colour
    assert tuple(rgb[17, 40]) != color  # interior is a blend, not the pure colour
    # extreme points: a disc of the label colour with a white rim, centred on the pixel
    with_points = np.asarray(Image.open(write_overlay_png(tmp_path / "p.png", hu, [obj]))).astype(int)
    assert tuple(with_points[10, 40]) == color
    assert (with_points[6:15, 36:45] == 255).all(axis=-1).any()
    np.testing.assert_array_equal(with_points[:, :20], rgb[:, :20])  # away from the object: same
    assert _leftovers(tmp_path) == []


def test_window_to_uint8_uses_the_window() -> None:
    from cmdeploy.spec import ModelSpec
    from cmdeploy.writers.png_overlay import render_overlay, window_to_uint8

    g = window_to_uint8(np.array([[-1000.0, -200.0, 25.0, 250.0, 3000.0]]))
    np.testing.assert_array_equal(g, [[0, 0, 128, 255, 255]])
    spec = ModelSpec(window=(0.0, 100.0))
    rgb = render_overlay(np.array([[50.0, 100.0]]), [], spec=spec)
    np.testing.assert_array_equal(rgb[0, :, 0], [128, 255])


def test_series_overlays_one_png_per_annotated_slice(tmp_path: Path) -> None:
    from cmdeploy.io import read_npy
    from cmdeploy.writers.png_overlay import write_series_overlays

    vol = np.zeros((4, 16, 20), np.float32)
    np.save(tmp_path / "ct.npy", vol)
    series = read_npy(tmp_path / "ct.npy")
    m = np.zeros((16, 20), bool)
    m[4:9, 5:12] = True
    objs = [ObjectMask(3, "a", m), ObjectMask(1, "b", m), ObjectMask(3, "b", ~m)]
    with OutputDir(tmp_path / "out") as out:
        paths = write_series_overlays(out, series, objs)
    assert [p.name for p in paths] == [overlay_name(1), overlay_name(3)]
    assert all(p.is_file() and p.parent.name == "overlays" for p in paths)


def test_guidance_overlay(tmp_path: Path) -> None:
    from PIL import Image

    from cmdeploy.guidance import confidence_map
    from cmdeploy.writers.png_overlay import render_guidance_overlay

    h, w = 48, 64
    pts = np.array([[10, 20], [50, 24], [30, 8], [28, 40]], np.float32)
    cm = confidence_map(pts, (h, w))
    hu = np.zeros((h, w), np.float32)
    plain = render_guidance_overlay(hu, [], cm, None).astype(int)
    chroma = plain.max(axis=-1) - plain.min(axis=-1)
    assert chroma[cm > 0.9].min() > 40  # strong guidance is coloured
    low = cm <= np.quantile(cm, 0.05)
    assert chroma[low].mean() < chroma[cm > 0.5].mean() / 2  # weak guidance stays see-through
    rgb = render_guidance_overlay(hu, [pts], cm, tmp_path / "g.png")
    assert rgb.shape == (h, w, 3)
    assert Image.open(tmp_path / "g.png").size == (w, h)
    assert (rgb[20:23, 20] == 255).all(axis=-1).any()  # the left-right segment: a white line
    assert not (plain[20:23, 20] == 255).all(axis=-1).any()
    with pytest.raises(ValueError, match="maps"):
        render_guidance_overlay(hu, [pts], cm[:10], None)


# ------------------------------------------------------------------------------------ report


def test_report_has_no_patient_identifiers(tmp_path: Path) -> None:
    from cmdeploy.io import read_dicom_file
    from cmdeploy.spec import ModelSpec
    from cmdeploy.writers.report import build_report, hash_identifier, validate_report, write_report

    src = pydicom.dcmread(_ct_small())
    series = read_dicom_file(_ct_small())
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really a model")
    m = np.zeros(series.shape, bool)
    m[20:30, 40:45] = True
    pts = np.array([[40, 25], [44, 25], [42, 20], [42, 29]], np.float32)
    report = build_report(
        objects=[ObjectMask(0, "heart", m, pts)],
        series=series,
        model_path=model,
        spec=ModelSpec(),
        backend="onnxruntime:CPUExecutionProvider",
        timings={"infer": 0.25, "total": np.float64(1.5)},
        outputs=["report.json"],
    )
    assert validate_report(report) == []
    path = write_report(tmp_path / "report.json", report)
    text = path.read_text()
    for secret in (
        str(src.PatientName),
        "CompressedSamples",
        str(src.PatientID),
        str(src.SOPInstanceUID),
        str(src.SeriesInstanceUID),
        str(src.StudyInstanceUID),
        str(_ct_small().parent),
    ):
        assert secret not in text, secret
    data = json.loads(text)
    # the series id is random per run: unlinkable to the UID even by someone holding the UID
    assert data["input"]["series_id"] != hash_identifier(str(src.SeriesInstanceUID))
    assert len(data["input"]["series_id"]) == 16
    again = build_report(objects=[ObjectMask(0, "heart", m, pts)], series=series, model_path=model)
    assert again["input"]["series_id"] != data["input"]["series_id"]
    assert data["model"]["sha256"] == hashlib.sha256(b"not really a model").hexdigest()
    assert data["model"]["spec"]["input_size"] == 256
    obj = data["objects"][0]
    assert obj["area_px"] == 50 and obj["slice_index"] == 0 and obj["label"] == "heart"
    assert obj["area_mm2"] == pytest.approx(50 * 0.661468**2, rel=1e-4)
    assert data["timings_s"] == {"infer": 0.25, "total": 1.5}
    assert data["versions"]["onnxruntime"] and data["cmdeploy_version"]
    bad = dict(report, extra={"PatientID": "x"})
    assert any("PatientID" in p for p in validate_report(bad))
    with pytest.raises(ValueError, match="PatientID"):
        write_report(tmp_path / "bad.json", bad)


# ------------------------------------------------------------------------------------ SNOMED


REQUIRED_ORGANS = {
    "heart": "80891009",
    "Aorta": "15825003",
    "liver": "10200004",
    "spleen": "78961009",
    "kidney_left": "64033007",
    "Right Kidney": "64033007",
    "pancreas": "15776009",
    "stomach": "69695003",
    "esophagus": "32849002",
    "trachea": "44567001",
    "lung": "39607008",
    "pulmonary artery": "81040000",
    "gallbladder": "28231008",
    "urinary_bladder": "89837001",
    "vertebrae_L1": "51282000",
    "colon": "71854001",
    "small_bowel": "30315005",
}


@pytest.mark.parametrize(("label", "code"), sorted(REQUIRED_ORGANS.items()))
def test_snomed_organ_codes(label: str, code: str) -> None:
    from cmdeploy.writers.snomed import property_codes

    pc = property_codes(label)
    assert pc.known and pc.type.value == code and pc.type.scheme_designator == "SCT"
    assert pc.category.value == "91723000"  # Anatomical Structure


def test_snomed_laterality_and_generic() -> None:
    from cmdeploy.writers.snomed import property_codes

    assert property_codes("kidney_left").modifier.value == "7771000"
    assert property_codes("Right Kidney").modifier.value == "24028007"
    assert property_codes("heart").modifier is None
    generic = property_codes("my lesion 3")
    assert not generic.known and generic.type.value == "85756007" and generic.modifier is None


def test_label_values_first_appearance() -> None:
    m = np.zeros((2, 2), bool)
    objs = [ObjectMask(0, "b", m), ObjectMask(1, "a", m), ObjectMask(2, "b", m)]
    assert label_values(objs) == {"b": 1, "a": 2}


def test_overlay_scale_enlarges_pixels_and_keeps_colours() -> None:
    from cmdeploy.writers import ObjectMask
    from cmdeploy.writers.png_overlay import render_overlay

    hu = np.linspace(-300, 400, 20 * 30, dtype=np.float32).reshape(20, 30)
    mask = np.zeros((20, 30), bool)
    mask[5:12, 8:20] = True
    obj = ObjectMask(0, "liver", mask)
    plain = render_overlay(hu, [obj], draw_points=False, draw_labels=False)
    big = render_overlay(hu, [obj], draw_points=False, draw_labels=False, scale=4)
    assert big.shape == (80, 120, 3)
    np.testing.assert_array_equal(big[::4, ::4], plain)  # every 4x4 block is the original pixel
    with pytest.raises(ValueError, match="scale"):
        render_overlay(hu, [obj], scale=0)
