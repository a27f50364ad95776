"""The study's compact U-Net and its fully supervised recipe (cmdeploy.train.unet / .supervised)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cmdeploy.train.supervised import (  # noqa: E402
    UNetRecipe,
    dice,
    evaluate_volumes,
    from_logits,
    predict_volume,
    select_slices,
    to_input,
    to_target,
    train_unet,
)
from cmdeploy.train.unet import UNet  # noqa: E402


def test_unet_shapes_and_input_check() -> None:
    net = UNet(in_channels=1, width=4, depth=3)
    assert net(torch.zeros(2, 1, 32, 24)).shape == (2, 1, 32, 24)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.zeros(1, 1, 30, 32))
    with pytest.raises(ValueError):
        UNet(depth=1)


def test_preprocessing_round_trip_keeps_the_grid() -> None:
    # a non-square slice: padded at the bottom/right, resized, and mapped back exactly
    mask = np.zeros((1, 40, 24), dtype=bool)
    mask[0, 10:30, 4:20] = True
    t = to_target(mask, 32)
    assert t.shape == (1, 1, 32, 32) and set(torch.unique(t).tolist()) <= {0.0, 1.0}
    back = from_logits(t * 20 - 10, (40, 24))  # logits > 0 exactly on the target
    assert back.shape == (1, 40, 24)
    assert dice(back, mask) > 0.95
    assert not back[0, :, 22:].any()  # nothing leaks from the padding
    x = to_input(np.full((2, 40, 24), 25.0, dtype=np.float32), 32)
    assert x.shape == (2, 1, 32, 32)
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0
    assert abs(float(x[0, 0, 5, 5]) - 0.5) < 1e-5  # 25 HU is the middle of [-200, 250]


def test_select_slices_takes_every_positive_and_a_share_of_negatives() -> None:
    target = np.zeros((20, 4, 4), dtype=bool)
    target[[3, 4, 5, 10], 1, 1] = True
    idx = select_slices(target, 0.5, np.random.default_rng(0))
    assert set(idx.tolist()) >= {3, 4, 5, 10}
    assert len(idx) == 6 and np.all(np.diff(idx) > 0)
    again = select_slices(target, 0.5, np.random.default_rng(0))
    np.testing.assert_array_equal(idx, again)


def test_evaluation_over_patients_and_objects() -> None:
    ref = np.zeros((3, 4, 4), dtype=bool)
    ref[1, :2, :2] = True
    pred = ref.copy()
    pred[2, 0, 0] = True  # a false positive on a tumour-free slice: counts for the patient only
    res = evaluate_volumes([("p", pred, ref)])
    assert res["over_objects"] == {"mean": 1.0, "std": 0.0, "n": 1}
    assert res["over_patients"]["mean"] == pytest.approx(2 * 4 / 9)


def test_training_is_seeded_and_learns_a_bright_square() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(-100, 30, (12, 32, 32)).astype(np.float32)
    ref = np.zeros_like(hu, dtype=bool)
    for i in range(12):
        y, x = rng.integers(4, 18, 2)
        ref[i, y : y + 10, x : x + 10] = True
    hu[ref] = 150.0
    recipe = UNetRecipe(size=32, width=4, depth=3, epochs=15, batch_size=4, lr=1e-2, seed=3, threads=1)
    x, y = to_input(hu, 32), to_target(ref, 32)
    net_a, hist = train_unet(x, y, recipe, log=lambda _m: None)
    net_b, _ = train_unet(x, y, recipe, log=lambda _m: None)
    for pa, pb in zip(net_a.state_dict().values(), net_b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert hist[-1]["loss"] < hist[0]["loss"]
    pred = predict_volume(net_a, hu, 32)
    assert pred.shape == hu.shape
    assert dice(pred, ref) > 0.8
