"""``cmdeploy train``: train a ResNet-PSP on NIfTI cases (needs the ``train`` extra: torch)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in value.split(",") if n.strip()) if value else ()


def train(
    data: list[Path] = typer.Option(
        ..., "--data",
        help="Data folder (ct-organs, SegTHOR or *_image/*_label); repeat to train on several folders.",
    ),
    guidance: str = typer.Option(
        None, "--guidance",
        help="Guidance channel(s): cm, ep or cm+ep [default: cm, or the --init checkpoint's].",
    ),
    extra_windows: str = typer.Option(
        None, "--extra-windows",
        help="More HU windows as image channels after the paper's [-200, 250], as LOW:HIGH pairs "
        "separated by commas (e.g. --extra-windows=-1000:0,150:1500) [default: none, or the "
        "--init checkpoint's].",
    ),
    ep_sigma: float = typer.Option(
        None, "--ep-sigma",
        help="Standard deviation of the extreme-point Gaussians, crop pixels [default: the paper's 10 "
        "px of 512, scaled to the input size].",
    ),
    config: str = typer.Option("compact", "--config", help="Model config: compact or paper."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Number of epochs."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Batch size per process."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (Adam; warm-up then cosine)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (split, sampling, augmentation)."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Output folder for best.pt / last.pt."),
    train_cases: str = typer.Option(None, "--train-cases", help="Comma-separated training case names."),
    val_cases: str = typer.Option(None, "--val-cases", help="Comma-separated validation case names."),
    samples_per_epoch: int = typer.Option(None, "--samples-per-epoch", min=1, help="Samples per epoch."),
    val_samples: int = typer.Option(None, "--val-samples", min=1, help="Cap on validation samples."),
    resume: Path = typer.Option(None, "--resume", help="Checkpoint to continue from."),
    init: Path = typer.Option(
        None, "--init",
        help="Fine-tune: start from this checkpoint's weights (its architecture and spec) with a new "
        "optimiser, schedule and split.",
    ),
    freeze_backbone: bool = typer.Option(
        False, "--freeze-backbone", help="With --init: train only the PSP head (backbone and its BN fixed).",
    ),
    base_width: int = typer.Option(None, "--base-width", min=1, help="Override the config's width."),
    input_size: int = typer.Option(None, "--input-size", min=16, help="Override the crop size (px)."),
    threads: int = typer.Option(None, "--threads", min=1, help="torch intra-op threads."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    val_every: int = typer.Option(1, "--val-every", min=1, help="Validate every N epochs."),
    no_validation: bool = typer.Option(
        False, "--no-validation",
        help="Final model: train on all --train-cases (default all cases) with no held-out case; "
        "best.pt = last epoch. Pair with --recipe-checkpoint.",
    ),
    recipe_checkpoint: Path = typer.Option(
        None, "--recipe-checkpoint",
        help="With --no-validation: last.pt of the validated run of the same recipe (its full history).",
    ),
    clicks: str = typer.Option(
        "annotator", "--clicks",
        help="Training clicks: 'annotator' (simulated imprecise clicks on 80% of samples, spacing "
        "resampling; the robust recipe) or 'exact' (extreme pixels with a small jitter).",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
    overwrite: bool = typer.Option(
        False, "--overwrite",
        help="Replace best.pt/last.pt of an earlier run in --out (--resume continues one).",
    ),
) -> None:
    """Train a model from NIfTI image/label cases; writes best.pt and last.pt to --out."""
    from cmdeploy.commands._common import error_console, guarded

    with guarded(error_console()):
        _train(**{k: v for k, v in locals().items() if k not in ("error_console", "guarded")})


def parse_windows(value: str) -> tuple[tuple[float, float], ...]:
    """``"LOW:HIGH,LOW:HIGH"`` (HU) -> ((low, high), ...); ValueError naming the bad pair."""
    windows = []
    for part in value.split(","):
        lo_hi = part.strip().split(":")
        try:
            lo, hi = (float(v) for v in lo_hi)
        except ValueError:
            raise ValueError(f"{part.strip()!r} is not LOW:HIGH in HU") from None
        if not hi > lo:
            raise ValueError(f"{part.strip()!r}: HIGH must be greater than LOW")
        windows.append((lo, hi))
    return tuple(windows)


def _train(*, data: list[Path], guidance: str, extra_windows: str | None, ep_sigma: float | None,
           config: str, epochs: int, batch_size: int, lr: float, seed: int, out: Path,
           train_cases: str | None, val_cases: str | None,
           samples_per_epoch: int | None, val_samples: int | None, resume: Path | None,
           init: Path | None, freeze_backbone: bool, base_width: int | None, input_size: int | None,
           threads: int | None, workers: int, device: str, val_every: int, no_validation: bool,
           recipe_checkpoint: Path | None, clicks: str, progress: bool, overwrite: bool) -> None:
    from cmdeploy.commands._common import fail, require

    require("torch", "train", "training")
    from cmdeploy.spec import GUIDANCE_MODES
    from cmdeploy.train.augment import ROBUST_AUGMENT, AugmentConfig
    from cmdeploy.train.loop import TrainConfig, format_metrics, run_training
    from cmdeploy.train.model import NAMED_CONFIGS

    for folder in data:
        if not folder.exists():
            fail(f"--data {folder} does not exist")
    if clicks not in ("annotator", "exact"):
        fail(f"--clicks must be 'annotator' or 'exact', got {clicks!r}")
    if guidance is not None and guidance not in GUIDANCE_MODES:
        fail(f"--guidance must be one of {', '.join(GUIDANCE_MODES)}, got {guidance!r}")
    if ep_sigma is not None and not ep_sigma > 0:
        fail(f"--ep-sigma must be > 0 crop pixels, got {ep_sigma}")
    if ep_sigma is not None and (guidance or "cm") == "cm" and init is None:
        fail("--ep-sigma needs extreme-point Gaussians: pass --guidance ep or cm+ep")
    windows = None
    if extra_windows is not None:
        try:
            windows = parse_windows(extra_windows)
        except ValueError as exc:
            fail(f"--extra-windows: {exc}")
    if config not in NAMED_CONFIGS:
        fail(f"--config must be one of {', '.join(sorted(NAMED_CONFIGS))}, got {config!r}")
    if resume is not None and not resume.is_file():
        fail(f"--resume {resume} is not a file")
    if init is not None and not init.is_file():
        fail(f"--init {init} is not a file")
    if init is not None and resume is not None:
        fail("--init and --resume exclude each other: --resume continues a run, --init starts a new one")
    if freeze_backbone and init is None:
        fail("--freeze-backbone needs --init (a randomly initialised backbone cannot stay fixed)")
    if init is not None and (base_width or input_size):
        fail("--init fixes the architecture: drop --base-width/--input-size")
    if recipe_checkpoint is not None and not (no_validation and recipe_checkpoint.is_file()):
        fail(f"--recipe-checkpoint {recipe_checkpoint} needs --no-validation and an existing file")
    if no_validation and val_cases:
        fail("--no-validation and --val-cases exclude each other")
    from cmdeploy.writers.atomic import check_output_files

    if (out.exists() or out.is_symlink()) and not out.is_dir():
        fail(f"--out '{out}' exists and is not a folder")
    check_output_files(  # --resume continues the run in --out
        [out / "best.pt", out / "last.pt"], overwrite=overwrite or resume is not None, what="--out",
        folder_may_be_missing=True,
    )
    cfg = TrainConfig(
        data=[str(d) for d in data],
        augment=ROBUST_AUGMENT if clicks == "annotator" else AugmentConfig(),
        out_dir=str(out),
        guidance=guidance,
        extra_windows=windows,
        ep_sigma=ep_sigma,
        config=config,
        base_width=base_width,
        input_size=input_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        samples_per_epoch=samples_per_epoch,
        val_samples=val_samples,
        train_cases=_names(train_cases),
        val_cases=_names(val_cases),
        num_workers=workers,
        threads=threads,
        device=device,
        val_every=val_every,
        validate=not no_validation,
        recipe_checkpoint=str(recipe_checkpoint) if recipe_checkpoint else None,
        resume=str(resume) if resume else None,
        init=str(init) if init else None,
        freeze_backbone=freeze_backbone,
        progress=progress,
        command="cmdeploy " + shlex.join(sys.argv[1:]),
    )
    result = run_training(cfg)
    if result.best_path is not None:
        m = result.best_metrics
        if "validated_by" in m:
            typer.echo(
                f"final checkpoint (no validation): {result.best_path}\n"
                f"recipe validation from {m['validated_by']['checkpoint']} (epoch {m.get('epoch')}):"
            )
        else:
            typer.echo(f"best checkpoint (epoch {m.get('epoch')}): {result.best_path}")
        if m and "val_dice_per_label" in m:
            typer.echo(format_metrics({
                "val_dice": m["val_dice"], "val_dice_samples": m["val_dice_samples"],
                "dice": m["val_dice_per_label"], "dice_std": m["val_dice_std_per_label"],
                "count": m["val_count_per_label"], "num_samples": sum(m["val_count_per_label"].values()),
            }))
