"""Training loop: loss, schedule, sampler, a learning step, a full run, resume, DDP and the CLI."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cmdeploy.errors import InputError
from cmdeploy.train.checkpoint import Checkpoint
from cmdeploy.train.loop import EpochSampler, TrainConfig, launch_local, lr_at, run_training, train_step
from cmdeploy.train.losses import balanced_bce_with_logits
from cmdeploy.train.model import build_model, make_config

torch.set_num_threads(1)
TINY = {"base_width": 8, "input_size": 64}


def write_dataset(root: Path, n: int = 3, nz: int = 4) -> Path:
    """``n`` generic-layout cases of 64 x 64 x ``nz`` with two ellipses per slice."""
    xx, yy = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")
    for i in range(n):
        rng = np.random.default_rng(i)
        image = np.full((64, 64, nz), -100, np.int16)
        labels = np.zeros((64, 64, nz), np.uint8)
        for z in range(nz):
            for lab, (cx, cy) in ((1, (20, 22)), (2, (42, 40))):
                a, b = rng.uniform(6, 11), rng.uniform(5, 9)
                inside = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
                labels[..., z][inside] = lab
                image[..., z][inside] = 100 * lab
        aff = np.diag([1.5, 1.5, 3.0, 1.0])
        nib.save(nib.Nifti1Image(image, aff), str(root / f"c{i}_image.nii.gz"))
        nib.save(nib.Nifti1Image(labels, aff), str(root / f"c{i}_label.nii.gz"))
    return root


def tiny_cfg(tmp_path: Path, **kw) -> TrainConfig:
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir()
        write_dataset(data)
    base = TrainConfig(
        data=str(data), out_dir=str(tmp_path / "run"), epochs=1, batch_size=4, samples_per_epoch=8,
        train_cases=("c0", "c1"), val_cases=("c2",), threads=1, progress=False, command="test",
        **TINY,
    )
    return replace(base, **kw)


def test_balanced_bce_is_mean_of_class_means() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.8).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    want = 0.5 * (bce[target > 0].mean() + bce[target == 0].mean())
    assert torch.allclose(balanced_bce_with_logits(logits, target), want)
    zeros = torch.zeros_like(target)
    plain = torch.nn.functional.binary_cross_entropy_with_logits(logits, zeros)
    assert torch.allclose(balanced_bce_with_logits(logits, zeros), plain)


def test_lr_schedule_warmup_then_cosine() -> None:
    total = 100
    lrs = [lr_at(s, total, 1e-3, 0.05) for s in range(total)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] < 1e-5 and lrs[52] == pytest.approx(0.5e-3, rel=0.05)


def test_epoch_sampler_shards_are_disjoint_and_reproducible() -> None:
    shards = [EpochSampler(50, 24, 4, seed=1, rank=r, world=2) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    keys = [list(s) for s in shards]
    assert all(len(k) == 12 and all(e == 3 for e, _ in k) for k in keys)
    idx = [i for k in keys for _, i in k]
    assert len(set(idx)) == 24
    again = EpochSampler(50, 24, 4, seed=1, rank=0, world=2)
    again.set_epoch(3)
    assert list(again) == keys[0]
    again.set_epoch(4)
    assert list(again) != keys[0]
    assert len(EpochSampler(3, None, 4, seed=0)) == 4  # at least one full batch


def test_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(make_config("compact", 2, dropout=0.0, **TINY))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    discs = [((xx - c) ** 2 + (yy - 32) ** 2 < r**2).float() for c, r in ((24, 10), (40, 14))]
    y = torch.stack(discs * 2)
    x = torch.cat([y[:, None] + 0.3 * torch.randn(4, 1, 64, 64), y[:, None]], dim=1)  # image + guide
    batch = {"input": x, "mask": y[:, None]}
    losses = [train_step(model, opt, batch, torch.device("cpu")) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_run_writes_best_then_resume_continues(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    result = run_training(cfg)
    assert result.best_path is not None and result.best_path.is_file()
    ckpt = Checkpoint.load(result.best_path)
    assert ckpt.epoch == 1
    assert set(ckpt.metrics["val_dice_per_label"]) == {"label_1", "label_2"}
    assert 0.0 <= ckpt.metrics["val_dice"] <= 1.0
    info = ckpt.train_info
    assert info["split"] == {"train": ["c0", "c1"], "val": ["c2"], "test": []}
    assert info["seed"] == 0 and info["epochs"] == 1 and info["guidance"] == "cm"
    assert info["command"] == "test" and info["config"] == "compact"
    assert ckpt.spec.input_size == 64 and ckpt.model_config.base_width == 8
    assert ckpt.optimizer_state is not None

    resumed = run_training(replace(cfg, epochs=2, resume=str(tmp_path / "run" / "last.pt")))
    last = Checkpoint.load(tmp_path / "run" / "last.pt")
    assert last.epoch == 2
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    key = "head.classifier.weight"
    assert not torch.equal(last.state_dict[key], ckpt.state_dict[key])


def test_final_model_without_validation_records_recipe_metrics(tmp_path: Path) -> None:
    recipe = run_training(tiny_cfg(tmp_path))  # validated run: train c0, c1; validate on c2
    final = run_training(
        replace(
            tiny_cfg(tmp_path), out_dir=str(tmp_path / "final"), train_cases=(), val_cases=(),
            validate=False, recipe_checkpoint=str(recipe.best_path),
        )
    )
    ckpt = Checkpoint.load(final.best_path)
    assert ckpt.train_info["split"]["train"] == ["c0", "c1", "c2"]  # every case, none held out
    assert ckpt.train_info["split"]["val"] == []
    assert ckpt.epoch == 1 and "val_s" not in final.history[-1]  # no validation ran
    validated = Checkpoint.load(recipe.best_path).metrics
    assert ckpt.metrics["val_dice"] == validated["val_dice"]
    assert ckpt.metrics["validated_by"]["split"]["val"] == ["c2"]
    assert ckpt.metrics["last_epoch"]["epoch"] == 1 and "val_dice" in ckpt.metrics["last_epoch"]


def test_init_fine_tunes_from_weights_with_a_new_schedule(tmp_path: Path) -> None:
    base = run_training(tiny_cfg(tmp_path, guidance="cm+ep"))
    start = Checkpoint.load(base.best_path)
    ft = run_training(
        tiny_cfg(tmp_path, out_dir=str(tmp_path / "ft"), guidance=None, init=str(base.best_path),
                 freeze_backbone=True, base_width=None, input_size=None, epochs=1)
    )
    ckpt = Checkpoint.load(ft.last_path)
    assert ckpt.epoch == 1 and [h["epoch"] for h in ft.history] == [1]  # its own schedule
    assert ckpt.spec.channels == ("image", "cm", "ep")  # architecture and spec of the checkpoint
    assert ckpt.train_info["init"]["checkpoint_sha256"] and ckpt.train_info["init"]["freeze_backbone"]
    for key, value in start.state_dict.items():  # backbone (and its BN statistics) fixed, head trained
        if key.startswith("backbone."):
            assert torch.equal(ckpt.state_dict[key], value), key
    head = "head.classifier.weight"
    assert not torch.equal(ckpt.state_dict[head], start.state_dict[head])
    resumed = run_training(replace(  # a frozen fine-tune resumes frozen (no flag needed)
        tiny_cfg(tmp_path, out_dir=str(tmp_path / "ft"), guidance=None, base_width=None, input_size=None),
        epochs=2, resume=str(ft.last_path),
    ))
    again = Checkpoint.load(resumed.last_path)
    assert again.epoch == 2 and again.train_info["init"] == ckpt.train_info["init"]
    frozen = [k for k in start.state_dict if k.startswith("backbone.")]
    assert all(torch.equal(again.state_dict[k], start.state_dict[k]) for k in frozen)
    with pytest.raises(InputError, match="guidance"):
        run_training(tiny_cfg(tmp_path, out_dir=str(tmp_path / "x"), guidance="cm", init=str(base.best_path)))


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, out_dir=str(tmp_path / "ddp"), samples_per_epoch=8, batch_size=2)
    launch_local(cfg, world_size=2)
    ckpt = Checkpoint.load(tmp_path / "ddp" / "last.pt")
    assert ckpt.train_info["world_size"] == 2 and ckpt.train_info["samples_per_epoch"] == 8
    assert (tmp_path / "ddp" / "best.pt").is_file()


def test_cli_train_and_bad_inputs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cmdeploy.cli import app

    cfg = tiny_cfg(tmp_path)
    runner = CliRunner()
    base = ["train", "--data", cfg.data, "--base-width", "8", "--input-size", "64", "--threads", "1",
            "--no-progress", "--batch-size", "4", "--samples-per-epoch", "4", "--val-samples", "4"]
    res = runner.invoke(app, ["train", "--data", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, [*base, "--train-cases", "c0,zz", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "zz" in res.output
    res = runner.invoke(app, [*base, "--guidance", "xx"])
    assert res.exit_code == 2
    for bad in ("-1000", "0:-10", "a:b", "-1000:0,"):
        res = runner.invoke(app, [*base, f"--extra-windows={bad}", "--out", str(tmp_path / "w")])
        assert res.exit_code == 2 and "--extra-windows" in res.output, (bad, res.output)
    assert not (tmp_path / "w").exists()
    res = runner.invoke(app, [*base, "--val-cases", "c2", "--guidance", "ep", "--extra-windows=-1000:0",
                              "--ep-sigma", "3.5", "--epochs", "1", "--out", str(tmp_path / "w")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*base, "--ep-sigma", "8"])
    assert res.exit_code == 2 and "--guidance ep" in res.output
    res = runner.invoke(app, [*base, "--guidance", "ep", "--ep-sigma", "0"])
    assert res.exit_code == 2
    mw = Checkpoint.load(tmp_path / "w" / "best.pt")
    assert mw.spec.extra_windows == ((-1000.0, 0.0),) and mw.model_config.in_channels == 3
    assert mw.spec.ep_sigma == 3.5
    out = str(tmp_path / "o")
    res = runner.invoke(app, [*base, "--val-cases", "c2", "--guidance", "cm+ep", "--out", out])
    assert res.exit_code == 0, res.output
    assert "best checkpoint" in res.output and str(tmp_path / "o" / "best.pt") in res.output
    ckpt = Checkpoint.load(tmp_path / "o" / "best.pt")
    assert ckpt.spec.channels == ("image", "cm", "ep") and ckpt.model_config.in_channels == 3
    assert ckpt.train_info["split"]["val"] == ["c2"] and math.isfinite(ckpt.metrics["val_dice"])
    res = runner.invoke(app, [*base, "--freeze-backbone"])
    assert res.exit_code == 2 and "--init" in res.output
    res = runner.invoke(app, [*base, "--init", out + "/best.pt", "--resume", out + "/last.pt"])
    assert res.exit_code == 2 and "exclude" in res.output
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    res = runner.invoke(app, ["train", "--data", cfg.data, "--init", str(junk), "--no-progress",
                              "--out", str(tmp_path / "j")])
    assert res.exit_code == 2 and "--init" in res.output and "not a cmdeploy checkpoint" in res.output
    assert not (tmp_path / "j" / "last.pt").exists()
    res = runner.invoke(app, ["train", "--data", cfg.data, "--init", out + "/best.pt", "--threads", "1",
                              "--no-progress", "--batch-size", "4", "--samples-per-epoch", "4",
                              "--val-samples", "4", "--val-cases", "c2", "--epochs", "1",
                              "--out", str(tmp_path / "ft")])
    assert res.exit_code == 0, res.output
    assert Checkpoint.load(tmp_path / "ft" / "best.pt").spec.channels == ("image", "cm", "ep")
    res = runner.invoke(app, ["train", "--data", cfg.data, "--init", out + "/best.pt",
                              "--extra-windows=-1000:0", "--no-progress", "--val-cases", "c2",
                              "--out", str(tmp_path / "ft2")])
    assert res.exit_code == 2 and "extra windows" in res.output


@pytest.mark.slow
def test_paper_config_takes_training_steps_on_cpu() -> None:
    """The paper's ResNet-101 / 512 px configuration trains (slowly) on CPU: two real Adam steps."""
    torch.manual_seed(0)
    model = build_model(make_config("paper", 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.99), weight_decay=5e-4)
    yy, xx = torch.meshgrid(torch.arange(512.0), torch.arange(512.0), indexing="ij")
    disc = ((xx - 256) ** 2 + (yy - 256) ** 2 < 120.0**2).float()
    y = torch.stack([disc, disc.flip(1)])
    x = torch.cat([y[:, None] + 0.3 * torch.randn(2, 1, 512, 512), y[:, None]], dim=1)
    before = model.head.classifier.weight.detach().clone()
    losses = [train_step(model, opt, {"input": x, "mask": y[:, None]}, torch.device("cpu")) for _ in range(2)]
    assert all(np.isfinite(losses)), losses
    assert not torch.equal(before, model.head.classifier.weight)
