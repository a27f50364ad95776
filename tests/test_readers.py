"""Readers: DICOM series/file, NIfTI, PNG, NPY -> Series (lazy float32 HU slices, [y, x])."""

from __future__ import annotations

import copy
import shutil
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from cmdeploy.errors import InputError, ModelError
from cmdeploy.io import Series, open_series
from cmdeploy.io import dicom_series as dicom_mod

CT_SMALL = Path(get_testdata_file("CT_small.dcm"))
DICOMDIR_TESTS = CT_SMALL.parent / "dicomdirtests"
CT5N = DICOMDIR_TESTS / "98892001" / "CT5N"


def _identifiers(ds: pydicom.Dataset) -> list[str]:
    return [
        str(ds.PatientName),
        str(ds.PatientID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.StudyInstanceUID),
    ]


def _assert_private(msg: str, ds: pydicom.Dataset) -> None:
    for ident in _identifiers(ds):
        assert ident not in msg, "an identifier leaked into an error message"


@pytest.fixture()
def base_ds() -> pydicom.Dataset:
    return pydicom.dcmread(CT_SMALL)


def _write(ds: pydicom.Dataset, path: Path, *, z: float, series_uid: str, number: int) -> Path:
    d = copy.deepcopy(ds)
    d.ImagePositionPatient = [0.0, 0.0, z]
    d.SeriesInstanceUID = series_uid
    d.SOPInstanceUID = generate_uid()
    d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
    d.InstanceNumber = number
    path.parent.mkdir(parents=True, exist_ok=True)
    d.save_as(path, enforce_file_format=True)
    return path


def _series_dir(base: pydicom.Dataset, folder: Path, zs: list[float]) -> tuple[Path, str]:
    uid = generate_uid()
    for i, z in enumerate(zs):
        _write(base, folder / f"im{i:02d}.dcm", z=z, series_uid=uid, number=i + 1)
    return folder, uid


def test_error_types() -> None:
    assert issubclass(InputError, ValueError)
    assert issubclass(ModelError, RuntimeError)


# ---------------------------------------------------------------- DICOM, real pydicom files


def test_ct_small_single_file(base_ds: pydicom.Dataset) -> None:
    s = open_series(CT_SMALL)
    assert s.kind == "dicom-file" and len(s) == 1 and s.shape == (128, 128)
    assert s.spacing_xy_mm == pytest.approx((0.661468, 0.661468))
    hu = s.slice_hu(0)
    assert hu.dtype == np.float32 and hu.flags.c_contiguous
    expected = base_ds.pixel_array * float(base_ds.RescaleSlope) + float(base_ds.RescaleIntercept)
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert s.slice_index_for_uid(str(base_ds.SOPInstanceUID)) == 0
    assert s.slice_index_for_uid("1.2.3") is None
    assert s.files == (CT_SMALL,)
    with pytest.raises(IndexError):
        s.slice_hu(1)


def test_dicomdir_ct_series_sorted_along_normal() -> None:
    s = open_series(CT5N)
    assert s.kind == "dicom-series" and len(s) == 5 and s.shape == (16, 16)
    # z positions 8.76 (2062) ... -1.24 (3353); normal = +z, so ascending z
    assert [f.name for f in s.files] == ["3353", "3023", "2693", "2392", "2062"]
    assert np.all(np.diff(s.positions_mm[:, 2]) > 0)
    np.testing.assert_allclose(s.slice_normal, [0, 0, 1])
    for k, hu in s.iter_slices():
        ds = pydicom.dcmread(s.files[k])
        np.testing.assert_array_equal(hu, ds.pixel_array.astype(np.float32) - 1024)
        assert s.slice_index_for_uid(str(ds.SOPInstanceUID)) == k
    assert s.read_slices([4, 0]).shape == (2, 16, 16)


def test_several_series_listed_without_uids_then_selected() -> None:
    folder = DICOMDIR_TESTS / "98892001"
    with pytest.raises(InputError) as exc:
        open_series(folder)
    msg = str(exc.value)
    assert "holds 2 DICOM series" in msg and "2 files" in msg and "5 files" in msg
    assert "series_uid" in msg
    uid = str(pydicom.dcmread(CT5N / "2062").SeriesInstanceUID)
    assert uid not in msg
    s = open_series(folder, series_uid=uid)
    assert len(s) == 5
    with pytest.raises(InputError, match="requested series_uid"):
        open_series(folder, series_uid="1.2.3.4")


# ---------------------------------------------------------------- DICOM, synthetic series


def test_synthetic_series_sorted_by_position_not_instance(base_ds, tmp_path) -> None:
    folder, _ = _series_dir(base_ds, tmp_path / "s", [5.0, -10.0, 0.0, 20.0])
    (folder / "README.txt").write_text("not dicom")
    (folder / ".hidden").write_bytes(b"junk")
    s = open_series(folder)
    assert [f.name for f in s.files] == ["im01.dcm", "im02.dcm", "im00.dcm", "im03.dcm"]
    np.testing.assert_allclose(s.positions_mm[:, 2], [-10, 0, 5, 20])


def test_sort_uses_slice_normal_for_sagittal(base_ds, tmp_path) -> None:
    uid = generate_uid()
    for i, x in enumerate([1.0, 3.0, 2.0]):
        d = copy.deepcopy(base_ds)
        d.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # normal = (-1, 0, 0)
        p = _write(d, tmp_path / f"{i}.dcm", z=0.0, series_uid=uid, number=i)
        d2 = pydicom.dcmread(p)
        d2.ImagePositionPatient = [x, 0.0, 0.0]
        d2.save_as(p)
    s = open_series(tmp_path)
    np.testing.assert_allclose(s.positions_mm[:, 0], [3.0, 2.0, 1.0])  # -x ascending


def test_per_slice_rescale_and_lazy_reads(base_ds, tmp_path) -> None:
    uid = generate_uid()
    d = copy.deepcopy(base_ds)
    d.RescaleSlope, d.RescaleIntercept = 2, -1000
    _write(base_ds, tmp_path / "a.dcm", z=0.0, series_uid=uid, number=1)
    _write(d, tmp_path / "b.dcm", z=1.0, series_uid=uid, number=2)
    _write(base_ds, tmp_path / "c.dcm", z=2.0, series_uid=uid, number=3)
    s = open_series(tmp_path)
    raw = base_ds.pixel_array.astype(np.float32)
    np.testing.assert_array_equal(s.slice_hu(1), raw * 2 - 1000)
    # pixels are read on demand: breaking slice 2's file after opening only affects slice 2
    (tmp_path / "c.dcm").write_bytes((tmp_path / "c.dcm").read_bytes()[:2000])
    np.testing.assert_array_equal(s.slice_hu(0), raw - 1024)
    with pytest.raises(InputError, match="c.dcm"):
        s.slice_hu(2)


def _expect_refusal(folder: Path, fragment: str, file_name: str, ds: pydicom.Dataset) -> None:
    with pytest.raises(InputError) as exc:
        open_series(folder)
    msg = str(exc.value)
    assert fragment in msg, msg
    assert file_name in msg, msg
    _assert_private(msg, ds)


def test_refuses_non_ct_modality(base_ds, tmp_path) -> None:
    folder, uid = _series_dir(base_ds, tmp_path, [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    d.Modality = "MR"
    _write(d, folder / "mr.dcm", z=2.0, series_uid=uid, number=3)
    _expect_refusal(folder, "Modality is 'MR'", "mr.dcm", base_ds)


def test_refuses_mismatched_rows(base_ds, tmp_path) -> None:
    folder, uid = _series_dir(base_ds, tmp_path, [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    d.Rows = 64
    d.PixelData = d.PixelData[: 64 * 128 * 2]
    _write(d, folder / "small.dcm", z=2.0, series_uid=uid, number=3)
    _expect_refusal(folder, "Rows x Columns 64 x 128", "small.dcm", base_ds)


def test_refuses_missing_pixel_data(base_ds, tmp_path) -> None:
    folder, uid = _series_dir(base_ds, tmp_path, [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    del d.PixelData
    _write(d, folder / "nopix.dcm", z=2.0, series_uid=uid, number=3)
    _expect_refusal(folder, "no pixel data", "nopix.dcm", base_ds)


def test_refuses_inconsistent_spacing_and_orientation(base_ds, tmp_path) -> None:
    folder, uid = _series_dir(base_ds, tmp_path / "sp", [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    d.PixelSpacing = [0.5, 0.5]
    _write(d, folder / "sp.dcm", z=2.0, series_uid=uid, number=3)
    _expect_refusal(folder, "PixelSpacing", "sp.dcm", base_ds)

    folder, uid = _series_dir(base_ds, tmp_path / "or", [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    d.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]
    _write(d, folder / "tilt.dcm", z=2.0, series_uid=uid, number=3)
    _expect_refusal(folder, "ImageOrientationPatient differs", "tilt.dcm", base_ds)


def test_refuses_duplicate_positions_and_missing_position(base_ds, tmp_path) -> None:
    folder, _ = _series_dir(base_ds, tmp_path / "dup", [0.0, 1.0, 1.0])
    _expect_refusal(folder, "same position", "im01.dcm", base_ds)

    folder, uid = _series_dir(base_ds, tmp_path / "nopos", [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    p = _write(d, folder / "nopos.dcm", z=2.0, series_uid=uid, number=3)
    d2 = pydicom.dcmread(p)
    del d2.ImagePositionPatient
    d2.save_as(p)
    _expect_refusal(folder, "ImagePositionPatient", "nopos.dcm", base_ds)


def test_refuses_multiframe(base_ds, tmp_path) -> None:
    d = copy.deepcopy(base_ds)
    d.NumberOfFrames = 2
    d.PixelData = d.PixelData * 2
    p = tmp_path / "mf.dcm"
    d.save_as(p)
    _expect_refusal(p, "multi-frame", "mf.dcm", base_ds)


def test_two_series_in_one_folder(base_ds, tmp_path) -> None:
    _, uid_a = _series_dir(base_ds, tmp_path / "a", [0.0, 1.0, 2.0])
    _, uid_b = _series_dir(base_ds, tmp_path / "b", [0.0, 1.0])
    with pytest.raises(InputError) as exc:
        open_series(tmp_path)
    msg = str(exc.value)
    assert "holds 2 DICOM series" in msg and "3 files" in msg and "2 files" in msg
    assert uid_a not in msg and uid_b not in msg
    assert len(open_series(tmp_path, series_uid=uid_b)) == 2


def test_annotation_objects_and_dicomdir_ignored(base_ds, tmp_path) -> None:
    folder, _ = _series_dir(base_ds, tmp_path, [0.0, 1.0])
    d = copy.deepcopy(base_ds)
    d.Modality = "SEG"
    _write(d, folder / "seg.dcm", z=0.0, series_uid=generate_uid(), number=1)
    shutil.copy(DICOMDIR_TESTS / "DICOMDIR", folder / "DICOMDIR")
    assert len(open_series(folder)) == 2


def test_empty_and_missing_inputs(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image files"):
        open_series(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        open_series(tmp_path / "nope")
    with pytest.raises(InputError, match="not a DICOM file"):
        open_series(tmp_path / "notes.txt")


# ---------------------------------------------------------------- compressed transfer syntaxes


def test_rle_compressed_reads_like_uncompressed(base_ds, tmp_path) -> None:
    from pydicom.uid import RLELossless

    d = copy.deepcopy(base_ds)
    d.compress(RLELossless)
    p = tmp_path / "rle.dcm"
    d.save_as(p)
    np.testing.assert_array_equal(open_series(p).slice_hu(0), open_series(CT_SMALL).slice_hu(0))


def test_jpeg2000_compressed_reads(base_ds, tmp_path) -> None:
    from pydicom.uid import JPEG2000Lossless

    d = copy.deepcopy(base_ds)
    try:
        d.compress(JPEG2000Lossless)
    except RuntimeError as exc:
        pytest.skip(f"no JPEG 2000 encoder installed: {exc}")
    p = tmp_path / "j2k.dcm"
    d.save_as(p)
    np.testing.assert_array_equal(open_series(p).slice_hu(0), open_series(CT_SMALL).slice_hu(0))


def test_missing_decoder_names_the_extra(base_ds, tmp_path, monkeypatch) -> None:
    from pydicom.uid import RLELossless

    d = copy.deepcopy(base_ds)
    d.compress(RLELossless)
    p = tmp_path / "rle.dcm"
    d.save_as(p)
    monkeypatch.setattr(dicom_mod, "_decoder_available", lambda ts: False)
    with pytest.raises(InputError) as exc:
        open_series(p)
    assert "pip install 'cmdeploy[dicom]'" in str(exc.value) and "rle.dcm" in str(exc.value)


def test_decode_time_missing_plugin_names_the_extra(monkeypatch) -> None:
    s = open_series(CT_SMALL)

    def broken(self):
        raise RuntimeError("Unable to decompress 'X' pixel data because all plugins are missing "
                           "dependencies:\n\tpylibjpeg - requires pylibjpeg>=2.0")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(broken))
    with pytest.raises(InputError, match=r"cmdeploy\[dicom\]"):
        s.slice_hu(0)


# ---------------------------------------------------------------- DICOM fuzz

_CT_BYTES = CT_SMALL.read_bytes()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=12
    ),
    cut=st.one_of(st.none(), st.integers(0, len(_CT_BYTES))),
)
def test_fuzz_mutated_dicom_is_read_or_refused(edits, cut, tmp_path_factory) -> None:
    data = bytearray(_CT_BYTES)
    for pos, val in edits:
        data[pos] = val
    if cut is not None:
        data = data[:cut]
    p = tmp_path_factory.mktemp("fuzz") / "f.dcm"
    p.write_bytes(bytes(data))
    try:
        s = open_series(p)
        hu = s.slice_hu(0)
    except InputError:
        return
    assert hu.shape == s.shape and hu.dtype == np.float32


# ---------------------------------------------------------------- NIfTI


def _nifti(tmp_path: Path, data: np.ndarray, name: str = "ct.nii.gz", **hdr) -> Path:
    import nibabel as nib

    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [-10, 20, 30]
    img = nib.Nifti1Image(data, affine)
    img.header.set_zooms((0.5, 0.7, 2.0)[: data.ndim] + (1.0,) * max(0, data.ndim - 3))
    if "slope" in hdr:
        img.header.set_slope_inter(hdr["slope"], hdr["inter"])
    p = tmp_path / name
    nib.save(img, p)
    return p


# A RAS-stored grid (voxel (i, j, k) -> RAS mm) and the same physical voxels stored other ways.
RAS_AFFINE = np.array([[0.5, 0, 0, -10], [0, 0.7, 0, 20], [0, 0, 2.0, 30], [0, 0, 0, 1.0]])


def _flip_ij(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel map (i', j', k) -> (X-1-i', Y-1-j', k): RAS storage -> LPS storage."""
    x, y, _ = shape
    return np.array([[-1, 0, 0, x - 1], [0, -1, 0, y - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])


def _coronal(shape: tuple[int, int, int]) -> np.ndarray:
    """Voxel map (a, b, c) -> (i, j, k) = (b, Y-1-c, a): stored axes (S, R, P), third axis not S/I."""
    _, y, _ = shape
    return np.array([[0, 1, 0, 0], [0, 0, -1, y - 1], [1, 0, 0, 0], [0, 0, 0, 1.0]])


def _stored_three_ways(tmp_path: Path, ras: np.ndarray, name: str = "ct") -> dict[str, Path]:
    """``ras`` (X, Y, Z) saved as RAS, as LPS (i and j reversed) and as (S, R, P) with permuted axes."""
    import nibabel as nib

    out = {}
    variants = {
        "ras": (ras, RAS_AFFINE),
        "lps": (ras[::-1, ::-1, :], RAS_AFFINE @ _flip_ij(ras.shape)),
        "srp": (ras.transpose(2, 0, 1)[:, :, ::-1], RAS_AFFINE @ _coronal(ras.shape)),
    }
    for key, (data, affine) in variants.items():
        out[key] = tmp_path / f"{name}_{key}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), out[key])
    return out


def _asymmetric(shape=(4, 3, 2)) -> np.ndarray:
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return (100 * i + 10 * j + k).astype(np.int16)  # every voxel distinct


def _nib_affine(path: Path) -> np.ndarray:
    import nibabel as nib

    return nib.load(path).affine


def test_nifti_slices_are_lps_whatever_the_storage(tmp_path) -> None:
    ras = _asymmetric()  # (X=4, Y=3, Z=2) in RAS: i -> patient right, j -> anterior
    paths = _stored_three_ways(tmp_path, ras)
    for key, path in paths.items():
        s = open_series(path)
        assert s.kind == "nifti" and len(s) == 2 and s.shape == (3, 4), key  # (H = Y, W = X)
        assert s.spacing_xy_mm == pytest.approx((0.5, 0.7)), key
        np.testing.assert_allclose(s.affine, _nib_affine(path), err_msg=key)  # original affine
        for kk, hu in s.iter_slices():
            # LPS slice: row y = anterior -> posterior (j reversed), column x = right -> left
            ys, xs = np.mgrid[0:3, 0:4]
            np.testing.assert_array_equal(hu, 100 * (3 - xs) + 10 * (2 - ys) + kk, err_msg=key)
            np.testing.assert_array_equal(hu, ras[::-1, ::-1, kk].T, err_msg=key)
    assert open_series(paths["srp"]).volume_shape == (2, 4, 3)  # the stored grid, not the LPS one
    assert open_series(paths["ras"]).volume_shape == (4, 3, 2)


def test_nifti_slices_match_the_training_loader(tmp_path) -> None:
    """The runtime's slice k is the training loader's slice k, and nibabel's canonical LPS."""
    import nibabel as nib

    from cmdeploy.train.data import Case, load_volume

    ras = _asymmetric((5, 4, 3))
    labels = (ras % 7).astype(np.uint8)
    images = _stored_three_ways(tmp_path, ras, "img")
    labs = _stored_three_ways(tmp_path, labels, "lab")
    lps_ornt = np.array([[0, -1], [1, -1], [2, 1]])
    for key in images:
        vol = load_volume(Case(key, images[key], labs[key]))
        ref = nib.as_closest_canonical(nib.load(images[key])).as_reoriented(lps_ornt)
        s = open_series(images[key])
        assert vol.image.shape == (len(s), *s.shape)
        assert vol.spacing_xy == pytest.approx(s.spacing_xy_mm)
        for k, hu in s.iter_slices():
            np.testing.assert_array_equal(hu, vol.image[k], err_msg=key)
            np.testing.assert_array_equal(hu, np.asarray(ref.dataobj)[:, :, k].T, err_msg=key)
            np.testing.assert_array_equal(vol.labels[k], (hu.astype(np.int64) % 7), err_msg=key)


def test_lps_orientation_round_trip_and_refusal() -> None:
    from cmdeploy.io.nifti import lps_orientation

    shape = (4, 3, 2)
    ras = _asymmetric(shape)
    o = lps_orientation(RAS_AFFINE @ _coronal(shape), (2, 4, 3))
    stored = ras.transpose(2, 0, 1)[:, :, ::-1]
    assert o.shape == shape and not o.is_identity
    np.testing.assert_array_equal(o.to_lps(stored), ras[::-1, ::-1, :])
    np.testing.assert_array_equal(o.to_stored(o.to_lps(stored)), stored)
    # the LPS affine puts every LPS voxel at the same mm position as its stored voxel
    lps_aff = o.lps_affine(RAS_AFFINE @ _coronal(shape))
    np.testing.assert_allclose(lps_aff @ [0, 0, 0, 1], RAS_AFFINE @ [3, 2, 0, 1])  # right-anterior
    assert lps_orientation(np.diag([-1.0, -1, 1, 1]), shape).is_identity
    with pytest.raises(InputError, match="degenerate"):
        lps_orientation(np.diag([1.0, 0.0, 1.0, 1.0]), shape, source="flat.nii")
    with pytest.raises(ValueError, match="LPS grid"):
        o.to_stored(np.zeros((2, 4, 3)))


def test_nifti_scaling_4d_and_errors(tmp_path, monkeypatch) -> None:
    data = np.zeros((5, 6, 3), np.int16)
    data[1, 2, 0] = 10  # RAS storage: LPS column x = 4 - i, row y = 5 - j
    s = open_series(_nifti(tmp_path, data, slope=2.0, inter=-1024.0))
    hu = s.slice_hu(0)
    assert hu[3, 3] == 2 * 10 - 1024 and hu[0, 0] == -1024
    s4 = open_series(_nifti(tmp_path, data[..., None], name="four.nii"))
    assert len(s4) == 3 and s4.shape == (6, 5)
    s2 = open_series(_nifti(tmp_path, data[:, :, 0], name="flat.nii"))  # 2-D: one slice
    assert len(s2) == 1 and s2.shape == (6, 5) and s2.slice_hu(0)[3, 3] == 10
    with pytest.raises(InputError, match="shape"):
        open_series(_nifti(tmp_path, np.zeros((5, 6, 3, 2), np.int16), name="two.nii"))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(InputError, match="bad.nii.gz"):
        open_series(bad)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(InputError, match=r"cmdeploy\[nifti\]"):
        open_series(tmp_path / "four.nii")


# ---------------------------------------------------------------- PNG and NPY


def test_png_16bit_is_hu_plus_1024_and_8bit_refused(tmp_path) -> None:
    from PIL import Image

    stored = np.array([[0, 1024, 2048], [1000, 1100, 65535]], dtype=np.uint16)
    Image.fromarray(stored).save(tmp_path / "s.png")
    s = open_series(tmp_path / "s.png")
    assert s.kind == "png" and s.shape == (2, 3) and s.spacing_xy_mm is None
    np.testing.assert_array_equal(s.slice_hu(0), stored.astype(np.float32) - 1024)
    Image.fromarray(stored.astype(np.uint8)).save(tmp_path / "e.png")
    with pytest.raises(InputError, match="8-bit PNG"):
        open_series(tmp_path / "e.png")
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match="not 16-bit greyscale"):
        open_series(tmp_path / "rgb.png")


def test_npy_2d_3d_and_refusals(tmp_path) -> None:
    vol = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 1000
    np.save(tmp_path / "v.npy", vol)
    s = open_series(tmp_path / "v.npy")
    assert s.kind == "npy" and len(s) == 2 and s.shape == (3, 4)
    np.testing.assert_array_equal(s.slice_hu(1), vol[1].astype(np.float32))
    np.save(tmp_path / "one.npy", vol[0].astype(np.float64))
    assert len(open_series(tmp_path / "one.npy")) == 1
    nan = vol.astype(np.float32)
    nan[1, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    s_nan = open_series(tmp_path / "nan.npy")
    s_nan.slice_hu(0)
    with pytest.raises(InputError, match="slice 1 contains NaN"):
        s_nan.slice_hu(1)
    np.save(tmp_path / "c.npy", np.zeros((2, 2), np.complex64))
    with pytest.raises(InputError, match="not a real number type"):
        open_series(tmp_path / "c.npy")
    np.save(tmp_path / "4d.npy", np.zeros((1, 2, 2, 2)))
    with pytest.raises(InputError, match="not \\(H, W\\) or \\(N, H, W\\)"):
        open_series(tmp_path / "4d.npy")
    np.save(tmp_path / "obj.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.npy"):
        open_series(tmp_path / "obj.npy")
    with pytest.raises(InputError, match="DICOM inputs only"):
        open_series(tmp_path / "v.npy", series_uid="1.2")


def test_series_guards_against_wrong_slice_shape() -> None:
    s = Series("npy", Path("x.npy"), 1, (2, 2), None, (None,), loader=lambda k: np.zeros((3, 2)))
    with pytest.raises(InputError, match="expected \\(2, 2\\)"):
        s.slice_hu(0)
