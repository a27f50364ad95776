"""Training data: layouts, LPS orientation, samples, splits, augmented and validation examples."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cmdeploy.errors import InputError
from cmdeploy.geometry import CropTransform
from cmdeploy.guidance import extreme_points
from cmdeploy.preprocess import prepare_one, probabilities_to_slice
from cmdeploy.spec import ModelSpec
from cmdeploy.train.augment import NO_AUGMENT, AugmentConfig, cloud_extreme_points, training_sample
from cmdeploy.train.data import (
    TrainDataset,
    ValDataset,
    build_samples,
    check_disjoint,
    find_cases,
    select_cases,
    slice_samples,
    split_cases,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct-organs"
SPEC = ModelSpec.for_input_size(64)


def ellipse_volume(seed: int, shape=(64, 64, 6)) -> tuple[np.ndarray, np.ndarray]:
    """(X, Y, Z) int16 HU and uint8 labels: two ellipses (labels 1, 2) per slice, HU 100 / 300."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    image = np.full(shape, -100, np.int16)
    labels = np.zeros(shape, np.uint8)
    for z in range(nz):
        for lab, (cx, cy) in ((1, (20, 22)), (2, (42, 40))):
            cx, cy = cx + rng.integers(-3, 4), cy + rng.integers(-3, 4)
            a, b = rng.uniform(6, 11), rng.uniform(5, 9)
            inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
            labels[..., z][inside] = lab
            image[..., z][inside] = 100 * lab
    return image, labels


def write_pair(img_path: Path, lab_path: Path, seed: int, affine=None) -> None:
    image, labels = ellipse_volume(seed)
    aff = np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine
    img_path.parent.mkdir(parents=True, exist_ok=True)
    lab_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, aff), str(img_path))
    nib.save(nib.Nifti1Image(labels, aff), str(lab_path))


def generic_dataset(root: Path, n: int = 5) -> Path:
    for i in range(n):
        write_pair(root / f"case{i}_image.nii.gz", root / f"case{i}_label.nii.gz", seed=i)
    return root


# ------------------------------------------------------------------------------------------ layouts


def test_find_cases_ct_organs_layout(tmp_path: Path) -> None:
    for name in ("b_case", "a_case"):
        write_pair(tmp_path / name / "image.nii.gz", tmp_path / name / "labels.nii.gz", seed=1)
    (tmp_path / "labels.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["a_case", "b_case"]
    assert cases[0].label_names == {1: "liver", 2: "spleen"}
    vol = cases[0].load()
    assert vol.image.shape == (6, 64, 64) and vol.labels.shape == (6, 64, 64)
    assert vol.spacing_xy == (1.5, 1.5)
    assert {s.label_name for s in build_samples([vol])} == {"liver", "spleen"}


def test_find_cases_segthor_layout(tmp_path: Path) -> None:
    for i in (1, 2):
        d = tmp_path / f"Patient_0{i}"
        write_pair(d / f"Patient_0{i}.nii.gz", d / "GT.nii.gz", seed=i)
    cases = find_cases(tmp_path)
    assert [c.name for c in cases] == ["Patient_01", "Patient_02"]
    assert cases[0].label_names[2] == "heart" and cases[0].label_names[4] == "aorta"


def test_find_cases_generic_layouts(tmp_path: Path) -> None:
    generic_dataset(tmp_path / "flat", n=2)
    assert [c.name for c in find_cases(tmp_path / "flat")] == ["case0", "case1"]
    for i in range(2):
        split = tmp_path / "split"
        write_pair(split / "images" / f"p{i}.nii.gz", split / "labels" / f"p{i}.nii.gz", i)
    assert [c.name for c in find_cases(tmp_path / "split")] == ["p0", "p1"]


def test_volumes_are_reoriented_to_lps(tmp_path: Path) -> None:
    """The same physical content stored RAS or LPS loads identically; right-anterior is at (0, 0)."""
    image, labels = ellipse_volume(3)
    image[-1, -1, :] = 999  # RAS storage: last i = most right, last j = most anterior
    ras = np.diag([2.0, 1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(image, ras), str(tmp_path / "r_image.nii.gz"))
    nib.save(nib.Nifti1Image(labels, ras), str(tmp_path / "r_label.nii.gz"))
    lps = np.diag([-2.0, -1.0, 3.0, 1.0])
    lps[:3, 3] = [126.0, 63.0, 0.0]  # same world positions as the RAS grid
    nib.save(nib.Nifti1Image(image[::-1, ::-1].copy(), lps), str(tmp_path / "l_image.nii.gz"))
    nib.save(nib.Nifti1Image(labels[::-1, ::-1].copy(), lps), str(tmp_path / "l_label.nii.gz"))
    cases = {c.name: c.load() for c in find_cases(tmp_path)}
    r, lp = cases["r"], cases["l"]
    np.testing.assert_array_equal(r.image, lp.image)
    np.testing.assert_array_equal(r.labels, lp.labels)
    assert r.image[0, 0, 0] == 999  # row 0 = anterior, column 0 = patient right
    assert r.spacing_xy == (2.0, 1.0)  # (column, row) mm


# ------------------------------------------------------------------------------------------ samples


def test_slice_samples_components_and_min_pixels() -> None:
    lab = np.zeros((40, 40), np.uint8)
    lab[2:8, 2:8] = 3  # 36 px
    lab[8:14, 8:14] = 3  # touches the first square diagonally: one 8-connected component
    lab[20:24, 20:24] = 3  # 16 px: below min_pixels
    lab[30:36, 20:36] = 5
    out = slice_samples(lab, volume=0, case="c", slice_index=4, label_names={5: "liver"}, min_pixels=25)
    assert sorted((s.label, s.num_pixels) for s in out) == [(3, 72), (5, 96)]
    liver = next(s for s in out if s.label == 5)
    assert liver.label_name == "liver" and liver.bbox == (30, 36, 20, 36)
    np.testing.assert_array_equal(liver.full_mask(lab.shape), lab == 5)
    assert next(s for s in out if s.label == 3).label_name == "label_3"


def test_split_is_patient_level_and_reproducible(tmp_path: Path) -> None:
    cases = find_cases(generic_dataset(tmp_path, n=10))
    a = split_cases(cases, seed=7)
    b = split_cases(list(reversed(cases)), seed=7)
    assert [[c.name for c in s] for s in a] == [[c.name for c in s] for s in b]
    assert [len(s) for s in a] == [6, 2, 2]
    names = [c.name for s in a for c in s]
    assert sorted(names) == sorted(c.name for c in cases) and len(set(names)) == 10
    assert [c.name for c in split_cases(cases, seed=8)[0]] != [c.name for c in a[0]]
    two = split_cases(cases[:2], seed=0)
    assert [len(s) for s in two] == [1, 1, 0]
    check_disjoint(train=a[0], val=a[1], test=a[2])
    with pytest.raises(InputError, match="both"):
        check_disjoint(train=a[0], val=a[0][:1])
    with pytest.raises(InputError, match="nope"):
        select_cases(cases, ["case1", "nope"], what="--val-cases")


# ------------------------------------------------------------------------------------- augmentation


def test_cloud_extreme_points_matches_mask_extreme_points() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((30, 30)) > 0.6
    ys, xs = np.nonzero(mask)
    pts = cloud_extreme_points(np.stack([xs, ys], 1).astype(float))
    np.testing.assert_array_equal(pts, extreme_points(mask))


@pytest.mark.parametrize("seed", range(12))
def test_augmented_points_image_and_mask_agree(seed: int) -> None:
    """Crop-space points are the crop mask's extremes (within jitter + interpolation), and the
    image is warped by the same transform as the mask."""
    rng = np.random.default_rng(seed)
    h, w = 70, 80
    yy, xx = np.mgrid[:h, :w]
    cx, cy, a, b = rng.uniform(25, 55), rng.uniform(25, 45), rng.uniform(5, 20), rng.uniform(4, 15)
    t = rng.uniform(0, np.pi)
    u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
    v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
    mask = u**2 + v**2 <= 1
    slice_hu = np.where(mask, 200.0, -200.0).astype(np.float32)
    ys, xs = np.nonzero(mask)
    y0, x0 = ys.min(), xs.min()
    box = mask[y0 : ys.max() + 1, x0 : xs.max() + 1]
    cfg = AugmentConfig(blur_p=0, resample_p=0, noise_p=0, hu_p=0, gamma_p=0, jitter_px=2.0, jitter_frac=1.0)
    out = training_sample(slice_hu, box, (x0, y0), SPEC, cfg, rng)
    assert out["input"].shape == (2, 64, 64) and out["input"].dtype == np.float32
    crop_mask = out["mask"][0] > 0.5
    z = float(out["zoom"])
    pts = out["points"].astype(float)
    ref = extreme_points(crop_mask).astype(float)
    # extreme coordinate of each point: left x, right x, top y, bottom y
    got = np.array([pts[0, 0], pts[1, 0], pts[2, 1], pts[3, 1]])
    want = np.array([ref[0, 0], ref[1, 0], ref[2, 1], ref[3, 1]])
    tol = (2.0 + 0.75) * z + 1.5  # jitter + half a (rotated) slice pixel, in crop px
    assert np.all(np.abs(got - want) <= tol), (got, want, z)
    # the image channel is bright exactly where the mask is (same warp)
    bright = out["input"][0] > 0.0
    inter = (bright & crop_mask).sum()
    assert 2 * inter / (bright.sum() + crop_mask.sum()) > 0.9
    # the object fills roughly b_m of the crop
    side = max(np.ptp(np.nonzero(crop_mask)[0]), np.ptp(np.nonzero(crop_mask)[1]))
    assert 0.6 * SPEC.train_target_range[0] < side < 1.6 * SPEC.train_target_range[1]


def test_train_dataset_deterministic_per_epoch_and_index(tmp_path: Path) -> None:
    vols = [c.load() for c in find_cases(generic_dataset(tmp_path, n=1))]
    samples = build_samples(vols)
    ds = TrainDataset(vols, samples, SPEC, seed=3)
    a, b, c = ds[(1, 2)], ds[(1, 2)], ds[(2, 2)]
    np.testing.assert_array_equal(a["input"], b["input"])
    np.testing.assert_array_equal(a["mask"], b["mask"])
    assert not np.array_equal(a["input"], c["input"])
    assert set(a) == {"input", "mask", "points", "zoom", "index"}
    assert a["mask"].shape == (1, 64, 64) and 0 < a["mask"].mean() < 1


def test_no_augment_sample_matches_runtime_preprocessing(tmp_path: Path) -> None:
    """With augmentation off and b_m fixed, the training input equals prepare_one's."""
    vols = [c.load() for c in find_cases(generic_dataset(tmp_path, n=1))]
    smp = build_samples(vols)[0]
    spec = ModelSpec.for_input_size(64, train_target_range=(SPEC.target_size, SPEC.target_size))
    y0, _, x0, _ = smp.bbox
    sl = vols[0].image[smp.slice_index]
    out = training_sample(sl, smp.mask, (x0, y0), spec, NO_AUGMENT, np.random.default_rng(0))
    ref, _ = prepare_one(sl, extreme_points(smp.full_mask(sl.shape)), spec)
    np.testing.assert_allclose(out["input"], ref, atol=1e-4)


def test_val_dataset_is_runtime_path_and_pastes_back(tmp_path: Path) -> None:
    vols = [c.load() for c in find_cases(generic_dataset(tmp_path, n=1))]
    samples = build_samples(vols)
    ds = ValDataset(vols, samples, SPEC)
    item = ds[3]
    smp = samples[3]
    sl = vols[0].image[smp.slice_index]
    full = smp.full_mask(sl.shape)
    ref, t = prepare_one(sl, extreme_points(full), SPEC)
    np.testing.assert_array_equal(item["input"], ref)
    np.testing.assert_allclose(item["matrix"], t.matrix)
    # the true mask warped into the crop and pasted back recovers the component
    from cmdeploy.geometry import crop_image

    crop_mask = crop_image(full.astype(np.float32), t)
    back = probabilities_to_slice(crop_mask, CropTransform(item["matrix"], 64), sl.shape) > 0.5
    assert 2 * (back & full).sum() / (back.sum() + full.sum()) > 0.95


# -------------------------------------------------------------------------------------- shared data


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED.is_dir(), reason=f"shared data not found at {SHARED}")
def test_ct_organs_cases_and_samples() -> None:
    cases = find_cases(SHARED)
    assert [c.name for c in cases] == ["abdomen_3mm", "thorax_1p5mm"]
    vol = cases[0].load()
    assert vol.spacing_xy == (3.0, 3.0)
    samples = build_samples([vol])
    assert len(samples) > 1000
    assert "liver" in {s.label_name for s in samples}


def test_annotator_clicks_in_training_samples() -> None:
    """annotator_p = 1: points are simulated clicks (near, not at, the extremes), mask unchanged."""
    from cmdeploy.train.augment import ROBUST_AUGMENT

    h, w = 60, 70
    mask = np.zeros((h, w), bool)
    mask[15:45, 10:60] = True  # flat sides: clicks spread along them
    slice_hu = np.where(mask, 100.0, -100.0).astype(np.float32)
    box = mask[15:45, 10:60]
    base = dict(rotation_deg=0.0, flip_p=0.0, scale_range=(1.0, 1.0), blur_p=0, resample_p=0, noise_p=0,
                hu_p=0, gamma_p=0)
    exact_cfg = AugmentConfig(**base, jitter_px=0.0)
    click_cfg = AugmentConfig(
        **base, annotator_p=1.0, click_tolerance_px=(2.0, 2.0), click_jitter_mm=(0.0, 0.0)
    )
    rows = []
    for seed in range(20):
        ex = training_sample(slice_hu, box, (10, 15), SPEC, exact_cfg, np.random.default_rng(seed))
        ck = training_sample(slice_hu, box, (10, 15), SPEC, click_cfg, np.random.default_rng(seed),
                             spacing_xy=(0.7, 0.7))
        z = float(ck["zoom"])
        # left x within the 2 px band of the extreme (crop px = slice px * zoom), on the flat side
        t_crop = ck["points"][0, 0] - (ck["matrix"][0, 2] + 10 * ck["matrix"][0, 0])
        assert -1e-3 <= t_crop <= 2.0 * z + 1e-3
        rows.append(float(ck["points"][0, 1]))
        assert ex["mask"].sum() > 0
    assert np.ptp(rows) > 0.2 * SPEC.input_size  # the left click moves along the flat side
    assert ROBUST_AUGMENT.annotator_p > 0.5


def test_find_cases_in_several_roots(tmp_path: Path) -> None:
    from cmdeploy.train.data import find_cases_in

    a = generic_dataset(tmp_path / "a", n=2)
    b = generic_dataset(tmp_path / "b", n=1)
    with pytest.raises(InputError, match="both"):
        find_cases_in([a, b])  # same case names in both
    (tmp_path / "c").mkdir()
    for p in Path(b).iterdir():
        (tmp_path / "c" / p.name.replace("case", "other")).symlink_to(p)
    names = [c.name for c in find_cases_in([a, tmp_path / "c"])]
    assert len(names) == 3 and len(set(names)) == 3
