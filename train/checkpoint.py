"""Training checkpoints: one ``torch.save`` file holding the weights and everything needed to
rebuild, export and describe the model.

File content (a plain dict, loadable with ``torch.load(..., weights_only=True)``)::

    {"format": "cmdeploy-checkpoint", "version": 1,
     "model_config": ModelConfig.to_dict(), "spec": ModelSpec.to_dict(),
     "state_dict": {name: tensor}, "optimizer": optimizer state dict or None,
     "epoch": int or None, "metrics": {name: number}, "train": {data, split, seed, command, ...}}

Files are written atomically (:func:`cmdeploy.writers.atomic.atomic_path`: temp file in the same
folder, fsync, then ``os.replace``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmdeploy.hashing import file_sha256  # re-exported: older callers import it from here
from cmdeploy.spec import ModelSpec
from cmdeploy.writers.atomic import atomic_path

from .model import ModelConfig, ResNetPSP, build_model

FORMAT = "cmdeploy-checkpoint"
VERSION = 1
_REQUIRED = ("format", "version", "model_config", "spec", "state_dict", "epoch", "metrics", "train")
_OPTIONAL = ("optimizer",)


@dataclass
class Checkpoint:
    """In-memory checkpoint; :meth:`save` / :meth:`load` convert to and from the file format.

    Attributes:
        model_config: architecture the weights belong to.
        spec: preprocessing contract (input size and channels must agree with ``model_config``).
        state_dict: model weights and BN statistics (CPU tensors).
        train_info: how the model was trained (data, split, seed, command, ...); plain values.
        metrics: e.g. ``{"val_dice": 0.91}``.
        epoch: last completed epoch, or None.
        optimizer_state: ``optimizer.state_dict()`` to resume training, or None.
    """

    model_config: ModelConfig
    spec: ModelSpec
    state_dict: dict[str, torch.Tensor]
    train_info: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    optimizer_state: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        check_consistent(self.model_config, self.spec)

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        spec: ModelSpec,
        *,
        model_config: ModelConfig | None = None,
        train_info: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        epoch: int | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> Checkpoint:
        """Snapshot ``model`` (a :class:`ResNetPSP`, possibly wrapped by ``torch.compile``)."""
        model = getattr(model, "_orig_mod", model)
        if model_config is None:
            if not isinstance(model, ResNetPSP):
                raise ValueError(
                    f"model_config is required for a {type(model).__name__}, not a ResNetPSP"
                )
            model_config = model.config
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        check_state_dict(model_config, state, source=f"model {type(model).__name__}")
        return cls(
            model_config=model_config,
            spec=spec,
            state_dict=state,
            train_info=dict(train_info or {}),
            metrics=dict(metrics or {}),
            epoch=epoch,
            optimizer_state=optimizer.state_dict() if optimizer is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The file's dict (see module docstring); ``ValueError`` if metrics/train info hold
        values that ``torch.load(weights_only=True)`` could not read back."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "model_config": self.model_config.to_dict(),
            "spec": self.spec.to_dict(),
            "state_dict": self.state_dict,
            "optimizer": self.optimizer_state,
            "epoch": self.epoch,
            "metrics": _plain(self.metrics, "metrics"),
            "train": _plain(self.train_info, "train"),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically to ``path`` (parent folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.to_dict(), tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, check_weights: bool = True) -> Checkpoint:
        """Read and validate a checkpoint file (tensors on CPU).

        Raises ``FileNotFoundError`` if absent and ``ValueError`` naming the file and the offending
        key if it is not a cmdeploy checkpoint, has missing/unknown/invalid keys, or (with
        ``check_weights``) its ``state_dict`` does not fit its ``model_config``.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle/zip errors of arbitrary type
            raise ValueError(f"{path}: not a cmdeploy checkpoint (torch.load failed: {e})") from e
        ckpt = cls.from_dict(raw, source=str(path))
        if check_weights:
            check_state_dict(ckpt.model_config, ckpt.state_dict, source=str(path))
        return ckpt

    @classmethod
    def from_dict(cls, raw: Any, *, source: str = "<dict>") -> Checkpoint:
        """Validate a loaded file dict; errors name ``source`` and the bad key."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{source}: not a cmdeploy checkpoint (key 'format' is {found!r})")
        missing = [k for k in _REQUIRED if k not in raw]
        if missing:
            raise ValueError(f"{source}: checkpoint is missing key(s) {missing}")
        unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
        if unknown:
            raise ValueError(f"{source}: checkpoint has unknown key(s) {unknown}")
        if raw["version"] != VERSION:
            raise ValueError(
                f"{source}: checkpoint key 'version' is {raw['version']!r}; "
                f"this cmdeploy reads version {VERSION}"
            )
        for key, kind in (
            ("state_dict", dict),
            ("metrics", dict),
            ("train", dict),
            ("model_config", dict),
            ("spec", dict),
        ):
            if not isinstance(raw[key], kind):
                raise ValueError(
                    f"{source}: checkpoint key {key!r} must be a {kind.__name__}, "
                    f"got {type(raw[key]).__name__}"
                )
        if raw["epoch"] is not None and not isinstance(raw["epoch"], int):
            raise ValueError(f"{source}: checkpoint key 'epoch' must be an int or None")
        optimizer = raw.get("optimizer")
        if optimizer is not None and not isinstance(optimizer, dict):
            raise ValueError(f"{source}: checkpoint key 'optimizer' must be a dict or None")
        bad = [k for k, v in raw["state_dict"].items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise ValueError(f"{source}: checkpoint key 'state_dict' has non-tensor entries {bad}")
        try:
            model_config = ModelConfig.from_dict(raw["model_config"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: checkpoint key 'model_config' is invalid: {e}") from e
        try:
            spec = ModelSpec.from_dict(raw["spec"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: checkpoint key 'spec' is invalid: {e}") from e
        try:
            return cls(
                model_config=model_config,
                spec=spec,
                state_dict=raw["state_dict"],
                train_info=raw["train"],
                metrics=raw["metrics"],
                epoch=raw["epoch"],
                optimizer_state=optimizer,
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def build_model(self) -> ResNetPSP:
        """A :class:`ResNetPSP` with these weights loaded, in eval mode, on CPU."""
        check_state_dict(self.model_config, self.state_dict)
        model = build_model(self.model_config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def check_consistent(model_config: ModelConfig, spec: ModelSpec) -> None:
    """``ValueError`` unless the spec's input size and channel count match the architecture."""
    if spec.input_size != model_config.input_size:
        raise ValueError(
            f"spec.input_size={spec.input_size} differs from "
            f"model_config.input_size={model_config.input_size}"
        )
    if spec.num_channels != model_config.in_channels:
        raise ValueError(
            f"spec has {spec.num_channels} input channels {spec.channels} but "
            f"model_config.in_channels={model_config.in_channels}"
        )


def check_state_dict(
    model_config: ModelConfig, state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint"
) -> None:
    """``ValueError`` naming missing, unexpected and mis-shaped keys of ``state_dict``.

    The reference model is built on the ``meta`` device, so no weights are allocated.
    """
    with torch.device("meta"):
        reference = build_model(model_config).state_dict()
    missing = [k for k in reference if k not in state_dict]
    unexpected = [k for k in state_dict if k not in reference]
    shapes = [
        f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in reference.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {_clip(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_clip(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches {_clip(shapes)}")
        raise ValueError(
            f"{source}: state_dict does not match model_config {model_config}: " + "; ".join(parts)
        )


def _plain(value: Any, key: str) -> Any:
    """``value`` as plain Python (numpy scalars/arrays and paths converted), else ``ValueError``."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise ValueError(f"checkpoint key {key!r}: dict key {k!r} must be a str")
            out[k] = _plain(v, f"{key}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy scalar or array
        return value.tolist()
    raise ValueError(
        f"checkpoint key {key!r}: {type(value).__name__} cannot be stored; "
        "use plain numbers, strings, lists, dicts or tensors"
    )


def _clip(items: list[str], n: int = 8) -> str:
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return str(items[:n]) + more


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    config: dict[str, Any],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``'s checkpoint atomically to ``path``.

    ``config`` holds ``"spec"`` (ModelSpec or its dict), optionally ``"model_config"``
    (ModelConfig or dict; default: ``model.config``) and ``"train"`` (data, split, seed, command,
    ...). Unknown keys raise ``ValueError``.
    """
    unknown = sorted(set(config) - {"spec", "model_config", "train"})
    if unknown:
        raise ValueError(f"save_checkpoint config has unknown key(s) {unknown}")
    if "spec" not in config:
        raise ValueError("save_checkpoint config is missing key 'spec'")
    spec = config["spec"]
    spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
    model_config = config.get("model_config")
    if isinstance(model_config, dict):
        model_config = ModelConfig.from_dict(model_config)
    ckpt = Checkpoint.from_model(
        model,
        spec,
        model_config=model_config,
        train_info=config.get("train"),
        metrics=metrics,
        epoch=epoch,
        optimizer=optimizer,
    )
    return ckpt.save(path)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Same as :meth:`Checkpoint.load`."""
    return Checkpoint.load(path)


def save_weights_only(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Copy of checkpoint ``source`` without the optimiser state (what is shipped and what
    ``cmdeploy train --init`` needs: weights, architecture, spec, metrics, training record)."""
    import dataclasses

    ckpt = Checkpoint.load(source)
    info = dict(ckpt.train_info, weights_only_of=file_sha256(source))
    return dataclasses.replace(ckpt, optimizer_state=None, train_info=info).save(target)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cmdeploy.train.checkpoint", description="Checkpoint tools.")
    ap.add_argument("--weights-only", nargs=2, metavar=("SOURCE", "TARGET"), required=True,
                    help="write SOURCE without its optimiser state to TARGET")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing TARGET file")
    args = ap.parse_args(argv)
    from cmdeploy.errors import InputError
    from cmdeploy.writers.atomic import check_output_file

    source, target = args.weights_only
    try:
        check_output_file(target, overwrite=args.overwrite, folder_may_be_missing=True)
    except InputError as exc:  # exists without --overwrite, not a regular file, unwritable folder
        ap.error(str(exc))
    try:
        out = save_weights_only(source, target)
    except (FileNotFoundError, ValueError) as exc:  # absent, or not a cmdeploy checkpoint
        ap.error(str(exc))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


__all__ = [
    "FORMAT",
    "VERSION",
    "Checkpoint",
    "check_consistent",
    "check_state_dict",
    "file_sha256",
    "load_checkpoint",
    "save_checkpoint",
    "save_weights_only",
]


if __name__ == "__main__":
    _main()
