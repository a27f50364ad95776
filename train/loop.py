"""Training and validation loop (single process, or DDP under ``torchrun``).

* Optimiser: Adam (betas 0.9, 0.99) with L2 ``weight_decay`` 5e-4 (Adam's coupled decay, as in the
  paper). Schedule: linear warm-up over the first ``warmup_frac`` of the steps, then **cosine**
  decay to 0, set per step from the global step (so resuming needs no scheduler state).
* Loss: class-balanced BCE on the one-logit map (:func:`cmdeploy.train.losses.balanced_bce_with_logits`).
* Each epoch draws ``samples_per_epoch`` training samples (all when unset) from a permutation that is
  a pure function of (seed, epoch); sample ``i`` of epoch ``e`` is augmented with its own generator
  (seed, e, i). Under DDP the epoch's list is sharded across ranks (the job of a
  ``DistributedSampler``, done by :class:`EpochSampler`).
* Validation (rank 0 only): the run-time path: :func:`cmdeploy.preprocess.prepare_one` with
  ``spec.target_size``, logits -> sigmoid -> pasted back into the full slice -> threshold -> Dice
  against the full-slice component. Reported per label as mean +- std over slices, and
  ``val_dice`` = mean over labels of the per-label means (the model-selection score).
* ``best.pt`` (highest ``val_dice``) and ``last.pt`` in ``out_dir``; ``resume`` continues from a
  checkpoint's epoch with its model, optimiser, split and settings; ``init`` fine-tunes: the
  checkpoint's weights, architecture and spec, with a new optimiser, schedule and split
  (optionally a frozen backbone).
* CUDA: mixed precision (``torch.autocast`` float16 + ``GradScaler``).
"""

from __future__ import annotations

import math
import os
import resource
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cmdeploy.errors import InputError
from cmdeploy.geometry import CropTransform
from cmdeploy.hashing import file_sha256
from cmdeploy.preprocess import probabilities_to_slice
from cmdeploy.spec import ModelSpec

from .augment import AugmentConfig
from .checkpoint import Checkpoint
from .data import (
    TrainDataset,
    ValDataset,
    build_samples,
    check_disjoint,
    find_cases_in,
    select_cases,
    split_cases,
)
from .losses import balanced_bce_with_logits, dice_score
from .model import build_model, count_parameters, make_config


@dataclass
class TrainConfig:
    """Everything that defines a training run (lengths in pixels, lr per step)."""

    data: str | list[str]
    out_dir: str = "runs/train"
    guidance: str | None = "cm"  # None: the --init checkpoint's (else "cm")
    # further HU windows as image channels (ModelSpec.extra_windows); None: the checkpoint's (else none)
    extra_windows: tuple[tuple[float, float], ...] | None = None
    ep_sigma: float | None = None  # extreme-point Gaussians' sigma, crop px; None: the paper's, scaled
    config: str = "compact"
    base_width: int | None = None
    input_size: int | None = None
    epochs: int = 20
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_frac: float = 0.03
    seed: int = 0
    samples_per_epoch: int | None = None
    val_samples: int | None = None
    min_pixels: int = 25
    train_cases: tuple[str, ...] = ()
    val_cases: tuple[str, ...] = ()
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    num_workers: int = 0
    threads: int | None = None
    device: str = "auto"
    amp: bool = True
    val_every: int = 1
    # False: train on every selected case with no held-out validation (a final model once the
    # recipe is validated); best.pt is then the last epoch and carries ``recipe_metrics`` from the
    # checkpoint of the validated run (``recipe_checkpoint``), marked as such.
    validate: bool = True
    recipe_checkpoint: str | None = None
    resume: str | None = None
    # Fine-tuning: start from this checkpoint's weights (architecture and spec too) with a new
    # optimiser and its own schedule; ``freeze_backbone`` keeps the ResNet (and its BN statistics)
    # fixed and trains only the PSP head.
    init: str | None = None
    freeze_backbone: bool = False
    progress: bool = True
    command: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    best_path: Path | None
    last_path: Path | None
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]


# ---------------------------------------------------------------------------------------------
# helpers


class EpochSampler:
    """Yields ``(epoch, index)`` keys: this rank's share of the epoch's samples.

    The epoch's list is the first ``per_epoch`` entries of a (seed, epoch) permutation (repeated if
    the data set is smaller), trimmed to a multiple of ``batch_size * world_size`` and sharded
    ``[rank::world_size]``.
    """

    def __init__(
        self, n: int, per_epoch: int | None, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        if n < 1:
            raise ValueError("no training samples")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        want = n if per_epoch is None else int(per_epoch)
        unit = batch_size * world
        self.total = max(unit, (want // unit) * unit)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, epoch, 0x5A])
        reps = math.ceil(self.total / self.n)
        perm = np.concatenate([rng.permutation(self.n) for _ in range(reps)])[: self.total]
        return perm[self.rank :: self.world]

    def __len__(self) -> int:
        return self.total // self.world

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, int(i)) for i in self.indices(self.epoch)])


def freeze_backbone(model: torch.nn.Module) -> None:
    """Fix the ResNet backbone: no gradients, and its BatchNorm layers stay in eval mode (their
    running statistics are those of the initial checkpoint) even under ``model.train()``."""
    backbone = model.backbone
    for p in backbone.parameters():
        p.requires_grad_(False)
    original_train = backbone.train

    def train(mode: bool = True) -> torch.nn.Module:
        original_train(mode)
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        return backbone

    backbone.train = train  # type: ignore[method-assign]
    backbone.train(model.training)


def lr_at(step: int, total: int, base: float, warmup_frac: float) -> float:
    """Linear warm-up then cosine decay to 0 (step 0-based, ``total`` steps in the run)."""
    warm = max(1, int(round(warmup_frac * total)))
    if step < warm:
        return base * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def _dist_info() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return rank, world, local


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("device 'cuda' requested but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def peak_rss_mb() -> float:
    """Peak resident memory of this process plus its finished children, MiB (Linux ru_maxrss KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + kids) / 1024.0


def _log(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, flush=True)


def _collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in items[0]}


# ---------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    dataset: ValDataset,
    device: torch.device,
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    amp: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Dice of every validation sample after pasting back into the full slice.

    Returns ``val_dice`` (mean of per-label means), ``val_dice_samples`` (mean over samples),
    ``dice`` / ``dice_std`` / ``count`` per label name, and ``num_samples``.
    """
    spec = dataset.spec
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate
    )
    was_training = model.training
    model.eval()
    per_label: dict[str, list[float]] = defaultdict(list)
    if progress:
        from tqdm import tqdm

        loader = tqdm(loader, desc="validate", leave=False, dynamic_ncols=True)
    for batch in loader:
        x = batch["input"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda"):
            logits = model(x)
        probs = torch.sigmoid(logits.float())[:, 0].cpu().numpy()
        for p, m, idx in zip(probs, batch["matrix"].numpy(), batch["index"].numpy(), strict=True):
            smp = dataset.samples[int(idx)]
            shape = dataset.slice_shape(int(idx))
            full = probabilities_to_slice(p, CropTransform(m, spec.input_size), shape) > spec.threshold
            per_label[smp.label_name].append(dice_score(full, smp.full_mask(shape)))
    model.train(was_training)
    all_scores = [d for v in per_label.values() for d in v]
    means = {k: float(np.mean(v)) for k, v in sorted(per_label.items())}
    return {
        "val_dice": float(np.mean(list(means.values()))) if means else 0.0,
        "val_dice_samples": float(np.mean(all_scores)) if all_scores else 0.0,
        "dice": means,
        "dice_std": {k: float(np.std(v)) for k, v in sorted(per_label.items())},
        "count": {k: len(v) for k, v in sorted(per_label.items())},
        "num_samples": len(all_scores),
    }


def format_metrics(m: dict[str, Any]) -> str:
    rows = [
        f"  {k:<28s} {100 * m['dice'][k]:6.2f} +- {100 * m['dice_std'][k]:5.2f}  (n={m['count'][k]})"
        for k in m["dice"]
    ]
    head = (
        f"  val Dice: {100 * m['val_dice']:.2f} (mean over labels), "
        f"{100 * m['val_dice_samples']:.2f} (mean over {m['num_samples']} samples)"
    )
    return "\n".join([head, *rows])


# ---------------------------------------------------------------------------------------------
# training


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> float:
    """One optimisation step on ``batch``; returns the loss value."""
    x = batch["input"].to(device, non_blocking=True)
    y = batch["mask"].to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=scaler is not None):
        logits = model(x)
    loss = balanced_bce_with_logits(logits, y)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def _resolve_splits(cfg: TrainConfig) -> dict[str, list]:
    cases = find_cases_in(cfg.data)
    if not cfg.validate:
        train = select_cases(cases, cfg.train_cases, what="--train-cases") if cfg.train_cases else cases
        return {"train": list(train), "val": [], "test": [c for c in cases if c not in train]}
    if cfg.train_cases:
        train = select_cases(cases, cfg.train_cases, what="--train-cases")
        if cfg.val_cases:
            val = select_cases(cases, cfg.val_cases, what="--val-cases")
        else:
            val = [c for c in cases if c.name not in set(cfg.train_cases)]
        test = [c for c in cases if c not in train and c not in val]
    elif cfg.val_cases:
        val = select_cases(cases, cfg.val_cases, what="--val-cases")
        train = [c for c in cases if c not in val]
        test = []
    else:
        train, val, test = split_cases(cases, cfg.split_fractions, cfg.seed)
    check_disjoint(train=train, val=val, test=test)
    if not train:
        raise InputError(f"no training cases (found {[c.name for c in cases]})")
    if not val:
        raise InputError("no validation cases: give --val-cases or more than one case")
    return {"train": train, "val": val, "test": test}


def _subsample(samples: list, cap: int | None, seed: int) -> list:
    if cap is None or cap >= len(samples):
        return samples
    keep = np.sort(np.random.default_rng([seed & 0xFFFFFFFF, 0xA1]).choice(len(samples), cap, replace=False))
    return [samples[i] for i in keep]


@dataclass
class _Progress:
    """What survives from epoch to epoch (and through a resume): the last finished epoch, the best
    validation Dice and its metrics, and one record per finished epoch."""

    start_epoch: int = 0
    best: float = -1.0
    best_metrics: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Threads, device and (under torchrun) the process group; returns (rank, world, device)."""
    rank, world, local = _dist_info()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = _device(cfg.device, local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, world, device


def _load_checkpoint(path: str | None, option: str) -> Checkpoint | None:
    """The checkpoint given by ``option`` (None when not given); a missing or foreign file is an
    InputError (bad input, before any work)."""
    if not path:
        return None
    try:
        return Checkpoint.load(path)
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{option}: {exc}") from exc


# TrainConfig fields that define the model's spec: (name in messages, train option)
SPEC_OPTIONS = {
    "guidance": ("guidance", "--guidance"),
    "extra_windows": ("extra windows", "--extra-windows"),
    "ep_sigma": ("ep_sigma", "--ep-sigma"),
}


def _spec_options(spec: ModelSpec) -> dict[str, Any]:
    """A checkpoint's values of the :data:`SPEC_OPTIONS` fields (what --init and --resume keep)."""
    return {name: getattr(spec, name) for name in SPEC_OPTIONS}


def _model_spec(
    cfg: TrainConfig, resume: Checkpoint | None, init: Checkpoint | None = None
) -> tuple[TrainConfig, Any, ModelSpec]:
    """(cfg, model config, spec): a resumed run keeps its checkpoint's architecture, split and
    frozen backbone; a fine-tuned run (``init``) keeps its checkpoint's architecture and spec."""
    if init is not None:
        kept = _spec_options(init.spec)
        for name, (label, option) in SPEC_OPTIONS.items():
            asked = getattr(cfg, name)
            if asked not in (None, kept[name]):
                raise InputError(
                    f"the --init checkpoint has {label} {kept[name]!r}, this run asks for {asked!r}: "
                    f"drop {option} or pass the checkpoint's value"
                )
        cfg = replace(cfg, **kept)
        return cfg, init.model_config, init.spec
    if cfg.guidance is None:
        cfg = replace(cfg, guidance="cm")
    if resume is not None:
        info = resume.train_info
        cfg = replace(
            cfg,
            train_cases=tuple(info.get("split", {}).get("train", cfg.train_cases)),
            val_cases=tuple(info.get("split", {}).get("val", cfg.val_cases)),
            **_spec_options(resume.spec),
            freeze_backbone=bool((info.get("init") or {}).get("freeze_backbone", False)),
        )
        return cfg, resume.model_config, resume.spec
    overrides = {k: v for k, v in (("base_width", cfg.base_width), ("input_size", cfg.input_size)) if v}
    probe = make_config(cfg.config, 1, **overrides)
    sigma = {"ep_sigma": cfg.ep_sigma} if cfg.ep_sigma else {}
    spec = ModelSpec.for_input_size(
        probe.input_size, guidance=cfg.guidance, extra_windows=tuple(cfg.extra_windows or ()), **sigma
    )
    return cfg, make_config(cfg.config, spec.num_channels, **overrides), spec


def _load_data(cfg: TrainConfig, rank: int) -> tuple[dict[str, list], list, list, list, list]:
    """(splits, train volumes, val volumes, train samples, val samples); InputError when empty."""
    splits = _resolve_splits(cfg)
    t0 = time.perf_counter()
    train_vols = [c.load() for c in splits["train"]]
    val_vols = [c.load() for c in splits["val"]]
    train_samples = build_samples(train_vols, min_pixels=cfg.min_pixels)
    val_samples = _subsample(build_samples(val_vols, min_pixels=cfg.min_pixels), cfg.val_samples, cfg.seed)
    if not train_samples:
        raise InputError(f"training cases {[c.name for c in splits['train']]} hold no labelled object")
    if cfg.validate and not val_samples:
        raise InputError(f"validation cases {[c.name for c in splits['val']]} hold no labelled object")
    _log(
        f"data: train {[c.name for c in splits['train']]} ({len(train_samples)} samples), "
        f"val {[c.name for c in splits['val']]} ({len(val_samples)} samples), "
        f"loaded in {time.perf_counter() - t0:.1f} s",
        rank,
    )
    return splits, train_vols, val_vols, train_samples, val_samples


def _recipe_metrics(cfg: TrainConfig) -> dict[str, Any]:
    """Without validation: the validation metrics of the same recipe's held-out run, if given."""
    if cfg.validate or not cfg.recipe_checkpoint:
        return {}
    recipe = Checkpoint.load(cfg.recipe_checkpoint)
    metrics = dict(recipe.metrics)
    history_tail = recipe.train_info.get("history", [])[-1:]
    if history_tail:  # this model keeps its last epoch: the recipe's last-epoch validation applies
        metrics["last_epoch"] = history_tail[0]
    metrics["validated_by"] = {
        "checkpoint": str(Path(cfg.recipe_checkpoint).resolve()),
        "checkpoint_sha256": file_sha256(cfg.recipe_checkpoint),
        "split": recipe.train_info.get("split", {}),
        "note": "validation Dice of the same recipe trained without the validation case(s); "
        "this model was trained on all cases, so no held-out data remained",
    }
    return metrics


def _resume(
    ckpt: Checkpoint | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
    rank: int,
) -> _Progress:
    """Restore weights, optimiser state and progress from ``ckpt`` (a fresh start when None)."""
    if ckpt is None:
        return _Progress()
    model.load_state_dict(ckpt.state_dict)
    if ckpt.optimizer_state is not None:
        optimizer.load_state_dict(ckpt.optimizer_state)
    info = ckpt.train_info
    state = _Progress(
        start_epoch=int(ckpt.epoch or 0),
        best=float(info.get("best_val_dice", -1.0)),
        best_metrics=dict(info.get("best_metrics", {})),
        history=list(info.get("history", [])),
    )
    _log(f"resumed from {cfg.resume} after epoch {state.start_epoch}", rank)
    return state


def _train_info(
    cfg: TrainConfig, splits: dict[str, list], spec: ModelSpec, model_config: Any, *,
    samples_per_epoch: int, num_train: int, num_val: int, world: int,
    resumed_init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's provenance, stored in every checkpoint (history and best metrics are added);
    ``resumed_init``: the fine-tuning record of the run being resumed."""
    init = resumed_init
    if cfg.init:
        init = {"checkpoint": str(Path(cfg.init).resolve()), "checkpoint_sha256": file_sha256(cfg.init),
                "freeze_backbone": cfg.freeze_backbone}
    return {
        "data": [str(Path(d).resolve()) for d in ([cfg.data] if isinstance(cfg.data, str) else cfg.data)],
        "init": init,
        "split": {k: [c.name for c in v] for k, v in splits.items()},
        "command": cfg.command or shlex.join(sys.argv),
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "guidance": spec.guidance,
        "config": cfg.config,
        "model_config": model_config.to_dict(),
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "betas": list(cfg.betas),
        "schedule": f"linear warm-up {cfg.warmup_frac:g} then cosine",
        "samples_per_epoch": samples_per_epoch,
        "num_train_samples": num_train,
        "num_val_samples": num_val,
        "min_pixels": cfg.min_pixels,
        "augment": cfg.augment.to_dict(),
        "world_size": world,
        "torch": str(torch.__version__),
    }


def _train_epoch(
    cfg: TrainConfig, epoch: int, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
    loader: Any, sampler: EpochSampler, device: torch.device, scaler: Any, *,
    steps_per_epoch: int, rank: int, world: int,
) -> dict[str, Any]:
    """One epoch of optimisation (learning rate per step); returns its history record."""
    sampler.set_epoch(epoch)
    torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout stream: resumable without RNG state
    total_steps = steps_per_epoch * cfg.epochs
    t_epoch = time.perf_counter()
    losses = []
    it = loader
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        it = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True, leave=False)
    for step, batch in enumerate(it):
        lr = lr_at(epoch * steps_per_epoch + step, total_steps, cfg.lr, cfg.warmup_frac)
        for g in optimizer.param_groups:
            g["lr"] = lr
        losses.append(train_step(net, optimizer, batch, device, scaler))
        if cfg.progress and rank == 0:
            it.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.2e}")
    train_time = time.perf_counter() - t_epoch
    n_seen = len(losses) * cfg.batch_size * world
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "loss": float(np.mean(losses)) if losses else float("nan"),
        "train_s": round(train_time, 2),
        "samples_per_s": round(n_seen / max(train_time, 1e-9), 2),
    }
    _log(
        f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, {train_time:.1f} s, "
        f"{record['samples_per_s']:.2f} samples/s",
        rank,
    )
    return record


def _end_epoch(
    cfg: TrainConfig, epoch: int, record: dict[str, Any], state: _Progress, *, model: torch.nn.Module,
    optimizer: torch.optim.Optimizer, val_ds: ValDataset, device: torch.device, use_amp: bool,
    spec: ModelSpec, model_config: Any, train_info: dict[str, Any], recipe_metrics: dict[str, Any],
    out: Path,
) -> None:
    """Rank 0 after an epoch: validate when due, update the best, write ``last.pt`` (and
    ``best.pt`` when validation improved, or at the final epoch of a run without validation)."""
    do_val = cfg.validate and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
    metrics: dict[str, Any] = {}
    if do_val:
        t_val = time.perf_counter()
        metrics = validate(
            model, val_ds, device, batch_size=max(cfg.batch_size, 8),
            num_workers=cfg.num_workers, amp=use_amp, progress=cfg.progress,
        )
        record["val_s"] = round(time.perf_counter() - t_val, 2)
        record["val_dice"] = metrics["val_dice"]
        record["val_dice_per_label"] = metrics["dice"]
        _log(f"  validation {record['val_s']:.1f} s\n{format_metrics(metrics)}", 0)
    state.history.append(record)
    improved = do_val and metrics["val_dice"] > state.best
    if not cfg.validate and epoch + 1 == cfg.epochs:  # no validation: keep the final epoch
        improved, state.best_metrics = True, recipe_metrics
    elif improved:
        state.best = metrics["val_dice"]
        state.best_metrics = {
            "val_dice": metrics["val_dice"],
            "val_dice_samples": metrics["val_dice_samples"],
            "val_dice_per_label": metrics["dice"],
            "val_dice_std_per_label": metrics["dice_std"],
            "val_count_per_label": metrics["count"],
            "epoch": epoch + 1,
        }
    info = dict(train_info, history=state.history, best_val_dice=state.best, best_metrics=state.best_metrics)
    ckpt = Checkpoint.from_model(
        model, spec, model_config=model_config, train_info=info,
        metrics=state.best_metrics, epoch=epoch + 1, optimizer=optimizer,
    )
    ckpt.save(out / "last.pt")
    if improved:
        ckpt.save(out / "best.pt")
        if cfg.validate:
            _log(f"  new best val Dice {100 * state.best:.2f} -> {out / 'best.pt'}", 0)
        else:
            _log(f"  final epoch (no validation) -> {out / 'best.pt'}", 0)


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train per ``cfg``; returns the checkpoint paths (rank 0) and metrics history.

    Steps: setup (device, process group), model and spec (or the resumed checkpoint's), data,
    model and optimiser, resume, then per epoch :func:`_train_epoch` and :func:`_end_epoch`
    (validation and checkpoints, rank 0).
    """
    rank, world, device = _setup(cfg)
    distributed = world > 1
    if cfg.resume and cfg.init:
        raise InputError("--resume and --init exclude each other (resume continues a run, init starts one)")
    resume_ckpt = _load_checkpoint(cfg.resume, "--resume")
    init_ckpt = _load_checkpoint(cfg.init, "--init")
    cfg, model_config, spec = _model_spec(cfg, resume_ckpt, init_ckpt)
    splits, train_vols, val_vols, train_samples, val_samples = _load_data(cfg, rank)

    torch.manual_seed(cfg.seed)
    model = build_model(model_config).to(device)
    if init_ckpt is not None:
        model.load_state_dict(init_ckpt.state_dict)
        _log(f"fine-tuning from {cfg.init} (epoch {init_ckpt.epoch})"
             f"{', backbone frozen' if cfg.freeze_backbone else ''}", rank)
    if cfg.freeze_backbone:
        freeze_backbone(model)
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.betas),
        weight_decay=cfg.weight_decay,
    )
    recipe_metrics = _recipe_metrics(cfg)
    state = _resume(resume_ckpt, model, optimizer, cfg, rank)
    net: torch.nn.Module = model
    if distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    train_ds = TrainDataset(train_vols, train_samples, spec, cfg.augment, seed=cfg.seed)
    val_ds = ValDataset(val_vols, val_samples, spec)
    sampler = EpochSampler(len(train_ds), cfg.samples_per_epoch, cfg.batch_size, cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=cfg.num_workers > 0,
    )
    steps_per_epoch = len(sampler) // cfg.batch_size
    _log(
        f"model: {cfg.config} {model_config} ({count_parameters(model) / 1e6:.2f} M params), "
        f"spec input {spec.input_size} channels {spec.channels}; device {device}"
        f"{' (AMP)' if use_amp else ''}, world {world}; {steps_per_epoch} steps/epoch x "
        f"{cfg.epochs} epochs, batch {cfg.batch_size}",
        rank,
    )
    out = Path(cfg.out_dir)
    best_path, last_path = out / "best.pt", out / "last.pt"
    train_info = _train_info(
        cfg, splits, spec, model_config, samples_per_epoch=len(sampler) * world,
        num_train=len(train_samples), num_val=len(val_samples), world=world,
        resumed_init=resume_ckpt.train_info.get("init") if resume_ckpt is not None else None,
    )

    net.train()
    for epoch in range(state.start_epoch, cfg.epochs):
        record = _train_epoch(
            cfg, epoch, net, optimizer, loader, sampler, device, scaler,
            steps_per_epoch=steps_per_epoch, rank=rank, world=world,
        )
        if rank == 0:
            _end_epoch(
                cfg, epoch, record, state, model=model, optimizer=optimizer, val_ds=val_ds,
                device=device, use_amp=use_amp, spec=spec, model_config=model_config,
                train_info=train_info, recipe_metrics=recipe_metrics, out=out,
            )
        if distributed:
            dist.barrier()

    _log(f"peak RSS {peak_rss_mb():.0f} MiB", rank)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(
        best_path if rank == 0 and best_path.exists() else None,
        last_path if rank == 0 and last_path.exists() else None,
        state.best_metrics,
        state.history,
    )


# ---------------------------------------------------------------------------------------------
# local multi-process launch (CPU DDP, what torchrun does)


def _ddp_entry(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
         "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    run_training(cfg)


def launch_local(cfg: TrainConfig, world_size: int, port: int | None = None) -> None:
    """Run ``cfg`` in ``world_size`` spawned processes with the gloo backend (CPU DDP)."""
    import socket

    import torch.multiprocessing as mp

    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    mp.spawn(_ddp_entry, args=(world_size, port, cfg), nprocs=world_size, join=True)
