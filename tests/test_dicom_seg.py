"""DICOM SEG writer: read back with highdicom, per source instance, from CT_small and a 3-slice series."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest

from cmdeploy.errors import InputError
from cmdeploy.writers import ObjectMask
from cmdeploy.writers.atomic import TEMP_PREFIX

hd = pytest.importorskip("highdicom")
pydicom = pytest.importorskip("pydicom")

from cmdeploy.writers.dicom_seg import research_description, write_dicom_seg  # noqa: E402


def _ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture()
def three_slice_series(tmp_path: Path):
    """Copies of CT_small at z = -65.7, -75.7, -70.7 (file names not in z order) and their UIDs by z."""
    from pydicom.uid import generate_uid

    from cmdeploy.io import read_dicom_series

    src = pydicom.dcmread(_ct_small())
    folder = tmp_path / "ct"
    folder.mkdir()
    series_uid = generate_uid()
    by_z = {}
    for n, z in enumerate([-65.7, -75.7, -70.7]):
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.ImagePositionPatient = [-158.135803, -179.035797, z]
        ds.InstanceNumber = n + 1
        ds.save_as(folder / f"file{n}.dcm")
        by_z[z] = str(ds.SOPInstanceUID)
    series = read_dicom_series(folder)
    uids = [by_z[z] for z in sorted(by_z)]
    assert list(series.slice_uids) == uids  # the reader sorts by position: slice 0 = lowest z
    return series, uids


def _masks(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    a = np.zeros((h, w), bool)
    a[10:30, 60:100] = True
    a[5, w - 3] = True  # asymmetric: a lone pixel at the top right
    b = np.zeros((h, w), bool)
    b[20:50, 20:70] = True  # overlaps a
    return a, b


def _read(path: Path):
    return hd.seg.segread(str(path))


def _segment(seg, number: int):
    return seg.get_segment_description(number)


def _pixels(seg, uid: str, numbers: list[int]) -> np.ndarray:
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=numbers)[0]


def test_seg_from_single_ct_small(tmp_path: Path) -> None:
    from cmdeploy.io import read_dicom_file

    series = read_dicom_file(_ct_small())
    a, _ = _masks(series.shape)
    out = tmp_path / "seg.dcm"
    values = write_dicom_seg(out, series, [ObjectMask(0, "heart", a)])
    assert values == {"heart": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]  # no temp files left

    seg = _read(out)
    src = pydicom.dcmread(_ct_small(), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.number_of_segments == 1
    assert "research use only" in seg.SeriesDescription.lower()
    assert seg.Manufacturer == "cmdeploy"
    desc = _segment(seg, 1)
    assert desc.SegmentLabel == "heart"
    assert desc.SegmentAlgorithmType == "SEMIAUTOMATIC"
    alg = desc.SegmentationAlgorithmIdentificationSequence[0]
    assert alg.AlgorithmName == "cmdeploy"
    assert alg.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"  # SCT heart
    assert desc.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    ref_uids = [uid for _, _, uid in seg.get_source_image_uids()]
    assert ref_uids == [str(src.SOPInstanceUID)]
    np.testing.assert_array_equal(_pixels(seg, str(src.SOPInstanceUID), [1])[..., 0], a)


def test_seg_from_three_slice_series(tmp_path: Path, three_slice_series) -> None:
    series, uids = three_slice_series
    a, b = _masks(series.shape)
    objects = [
        ObjectMask(0, "Kidney_Left", a),
        ObjectMask(2, "liver", b),
        ObjectMask(2, "Kidney_Left", a),
        ObjectMask(2, "my lesion", a[::-1].copy()),
    ]
    out = tmp_path / "seg.dcm"
    values = write_dicom_seg(out, series, objects, series_description="organ masks")
    assert values == {"Kidney_Left": 1, "liver": 2, "my lesion": 3}

    seg = _read(out)
    assert seg.number_of_segments == 3
    labels = [_segment(seg, n).SegmentLabel for n in (1, 2, 3)]
    assert labels == ["Kidney_Left", "liver", "my lesion"]
    assert all(_segment(seg, n).SegmentAlgorithmType == "SEMIAUTOMATIC" for n in (1, 2, 3))
    assert seg.SeriesDescription == "organ masks - research use only"
    kidney_type = _segment(seg, 1).SegmentedPropertyTypeCodeSequence[0]
    assert kidney_type.CodeValue == "64033007"
    assert kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"  # left
    assert _segment(seg, 3).SegmentedPropertyTypeCodeSequence[0].CodeValue == "85756007"  # tissue

    # every source slice is referenced; pixels per source instance equal the input masks
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(uids)
    expected = {
        uids[0]: [a, np.zeros_like(a), np.zeros_like(a)],
        uids[1]: [np.zeros_like(a)] * 3,
        uids[2]: [a, b, a[::-1]],
    }
    for uid, masks in expected.items():
        got = _pixels(seg, uid, [1, 2, 3])
        for n, m in enumerate(masks):
            np.testing.assert_array_equal(got[..., n], m, err_msg=f"segment {n + 1}")


def test_seg_without_image_position(tmp_path: Path) -> None:
    """No ImagePositionPatient: frames are matched to the source images one to one."""
    from cmdeploy.io import read_dicom_file

    ds = pydicom.dcmread(_ct_small())
    del ds.ImagePositionPatient
    ds.save_as(tmp_path / "noipp.dcm")
    series = read_dicom_file(tmp_path / "noipp.dcm")
    a, _ = _masks(series.shape)
    write_dicom_seg(tmp_path / "seg.dcm", series, [ObjectMask(0, "aorta", a)])
    seg = _read(tmp_path / "seg.dcm")
    np.testing.assert_array_equal(_pixels(seg, str(ds.SOPInstanceUID), [1])[..., 0], a)


def test_seg_refuses_non_dicom_input_and_empty_objects(tmp_path: Path, three_slice_series) -> None:
    from cmdeploy.io import read_npy

    np.save(tmp_path / "ct.npy", np.zeros((2, 8, 8), np.float32))
    npy = read_npy(tmp_path / "ct.npy")
    with pytest.raises(InputError, match="DICOM input"):
        write_dicom_seg(tmp_path / "a.dcm", npy, [ObjectMask(0, "x", np.ones((8, 8), bool))])
    series, _ = three_slice_series
    with pytest.raises(ValueError, match="no objects"):
        write_dicom_seg(tmp_path / "b.dcm", series, [])
    with pytest.raises(ValueError, match="mask shape"):
        write_dicom_seg(tmp_path / "c.dcm", series, [ObjectMask(0, "x", np.ones((8, 8), bool))])
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_seg_missing_highdicom_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from cmdeploy.io import read_dicom_file

    series = read_dicom_file(_ct_small())
    monkeypatch.setitem(sys.modules, "highdicom", None)
    with pytest.raises(InputError, match=r"cmdeploy\[dicom\]"):
        write_dicom_seg(tmp_path / "seg.dcm", series, [ObjectMask(0, "heart", np.ones(series.shape, bool))])


def test_research_description_is_kept_within_64_chars() -> None:
    assert research_description("x") == "x - research use only"
    long = research_description("a" * 100)
    assert len(long) == 64 and long.endswith("research use only")
    assert research_description("Research Use Only masks") == "Research Use Only masks"


def test_source_without_type2_patient_attributes(tmp_path) -> None:
    """Exported/anonymised series often lack PatientBirthDate etc.; the SEG is still written, empty there,
    and the source file is left untouched."""
    import pydicom
    from pydicom.data import get_testdata_file

    from cmdeploy.io import open_series
    from cmdeploy.writers import ObjectMask
    from cmdeploy.writers.dicom_seg import write_dicom_seg

    hd = pytest.importorskip("highdicom")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName"):
        if keyword in ds:
            delattr(ds, keyword)
    src = tmp_path / "src.dcm"
    ds.save_as(src)
    before = src.read_bytes()
    series = open_series(src)
    mask = np.zeros(series.shape, bool)
    mask[40:60, 50:70] = True
    write_dicom_seg(tmp_path / "seg.dcm", series, [ObjectMask(0, "aorta", mask)])
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert seg.PatientBirthDate == "" and [s.SegmentLabel for s in seg.SegmentSequence] == ["aorta"]
    assert src.read_bytes() == before
