"""Checkpoint file format: round trip, atomic write, validation errors naming key and file."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmdeploy.spec import ModelSpec
from cmdeploy.train.checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)
from cmdeploy.train.model import ModelConfig, build_model

torch.set_num_threads(1)

CONFIG = ModelConfig(
    depth=18, base_width=8, input_size=64, in_channels=2, psp_channels=8, dropout=0.1
)
SPEC = ModelSpec.for_input_size(64, guidance="cm")
TRAIN = {"data": "ct-organs", "split": {"train": ["p1"], "val": ["p2"]}, "seed": 7, "command": "x"}


@pytest.fixture
def trained(tmp_path):
    """A model after two Adam steps (BN stats and optimizer state are non-trivial), saved."""
    torch.manual_seed(0)
    model = build_model(CONFIG).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(2, 2, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.5).float()
    for _ in range(2):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(x), target).backward()
        opt.step()
    model.eval()
    path = save_checkpoint(
        tmp_path / "sub" / "model.pt",
        model,
        {"spec": SPEC, "train": TRAIN},
        optimizer=opt,
        epoch=3,
        metrics={"val_dice": np.float32(0.5), "loss": torch.tensor(0.25).item()},
    )
    return model, opt, path


def test_round_trip_identical_outputs(trained) -> None:
    model, _, path = trained
    ckpt = load_checkpoint(path)
    assert ckpt.model_config == CONFIG
    assert ckpt.spec == SPEC
    assert ckpt.epoch == 3
    assert ckpt.metrics == {"val_dice": 0.5, "loss": 0.25}
    assert ckpt.train_info == TRAIN
    restored = ckpt.build_model()
    assert not restored.training
    x = torch.randn(3, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(restored(x), model(x))


def test_file_is_plain_weights_only_content(trained) -> None:
    _, opt, path = trained
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["version"] == VERSION
    assert set(raw) == {
        "format", "version", "model_config", "spec", "state_dict", "optimizer", "epoch",
        "metrics", "train",
    }  # fmt: skip
    assert raw["model_config"] == CONFIG.to_dict()
    assert raw["spec"] == SPEC.to_dict()
    assert raw["train"]["seed"] == 7
    # optimizer state resumes
    opt2 = torch.optim.Adam(build_model(CONFIG).parameters(), lr=1e-3)
    opt2.load_state_dict(raw["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_atomic_write_leaves_no_temp_files(trained, tmp_path) -> None:
    _, _, path = trained
    assert sorted(os.listdir(path.parent)) == ["model.pt"]
    # overwrite in place; the old file is replaced whole
    Checkpoint.load(path).save(path)
    assert sorted(os.listdir(path.parent)) == ["model.pt"]


def test_failed_save_keeps_old_file_and_no_temp(trained) -> None:
    _, _, path = trained
    before = path.read_bytes()
    ckpt = Checkpoint.load(path)
    ckpt.metrics = {"bad": object()}
    with pytest.raises(ValueError, match="metrics.bad"):
        ckpt.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["model.pt"]


def _rewrite(path, mutate) -> None:
    raw = torch.load(path, weights_only=True)
    mutate(raw)
    torch.save(raw, path)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda r: r.pop("spec"), r"missing key\(s\) \['spec'\]"),
        (lambda r: r.pop("state_dict"), r"missing key\(s\) \['state_dict'\]"),
        (lambda r: r.update(extra=1), r"unknown key\(s\) \['extra'\]"),
        (lambda r: r.update(format="something"), r"key 'format' is 'something'"),
        (lambda r: r.update(version=99), r"key 'version' is 99"),
        (lambda r: r.update(epoch="3"), r"key 'epoch'"),
        (lambda r: r["model_config"].pop("depth"), r"'model_config'.*missing \['depth'\]"),
        (lambda r: r["spec"].update(colour=1), r"'spec'.*colour"),
        (lambda r: r["model_config"].update(in_channels=3), r"in_channels=3"),
        (lambda r: r["state_dict"].pop("head.classifier.bias"), r"missing keys.*classifier\.bias"),
        (lambda r: r["state_dict"].update(bogus=torch.zeros(1)), r"unexpected keys \['bogus'\]"),
        (
            lambda r: r["state_dict"].update({"head.classifier.bias": torch.zeros(2)}),
            r"head\.classifier\.bias: \(2,\) != \(1,\)",
        ),
    ],
)
def test_bad_checkpoint_names_key_and_file(trained, mutate, pattern) -> None:
    _, _, path = trained
    _rewrite(path, mutate)
    with pytest.raises(ValueError, match=pattern) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_not_a_checkpoint(tmp_path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.pt: not a cmdeploy checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.pt"
    torch.save(build_model(CONFIG).state_dict(), plain)  # bare state dict, no envelope
    with pytest.raises(ValueError, match="plain.pt: not a cmdeploy checkpoint.*'format'"):
        load_checkpoint(plain)
    with pytest.raises(FileNotFoundError, match="absent.pt"):
        load_checkpoint(tmp_path / "absent.pt")


def test_save_rejects_inconsistent_spec_and_bad_config(tmp_path) -> None:
    model = build_model(CONFIG)
    with pytest.raises(ValueError, match="input_size"):
        save_checkpoint(tmp_path / "a.pt", model, {"spec": ModelSpec.for_input_size(128)})
    with pytest.raises(ValueError, match="input channels"):
        spec = ModelSpec.for_input_size(64, guidance="cm+ep")
        save_checkpoint(tmp_path / "a.pt", model, {"spec": spec})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['optimiser'\]"):
        save_checkpoint(tmp_path / "a.pt", model, {"spec": SPEC, "optimiser": 1})
    wrong = ModelConfig(**{**CONFIG.to_dict(), "base_width": 4})
    with pytest.raises(ValueError, match="shape mismatches"):
        save_checkpoint(tmp_path / "a.pt", model, {"spec": SPEC, "model_config": wrong})
    assert not (tmp_path / "a.pt").exists()


def test_file_sha256(tmp_path) -> None:
    p = tmp_path / "f.bin"
    data = os.urandom(3 * (1 << 20) + 5)  # spans several read chunks
    p.write_bytes(data)
    assert file_sha256(p) == hashlib.sha256(data).hexdigest()


def test_weights_only_copy_keeps_everything_but_the_optimiser(trained, tmp_path) -> None:
    from cmdeploy.train.checkpoint import _main

    _, _, path = trained
    _main(["--weights-only", str(path), str(tmp_path / "w.pt")])
    full, light = Checkpoint.load(path), Checkpoint.load(tmp_path / "w.pt")
    assert full.optimizer_state is not None and light.optimizer_state is None
    assert light.spec == full.spec and light.epoch == full.epoch and light.metrics == full.metrics
    assert all(torch.equal(light.state_dict[k], v) for k, v in full.state_dict.items())
    assert light.train_info["weights_only_of"] == file_sha256(path)
    assert (tmp_path / "w.pt").stat().st_size < path.stat().st_size
    before = (tmp_path / "w.pt").read_bytes()
    for bad in (["--weights-only", str(path), str(tmp_path / "w.pt")],  # exists: needs --overwrite
                ["--weights-only", str(tmp_path / "none.pt"), str(tmp_path / "v.pt")]):
        with pytest.raises(SystemExit) as exc:
            _main(bad)
        assert exc.value.code == 2
    assert (tmp_path / "w.pt").read_bytes() == before and not (tmp_path / "v.pt").exists()
    _main(["--weights-only", str(path), str(tmp_path / "w.pt"), "--overwrite"])
