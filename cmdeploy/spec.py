"""The model card: everything the runtime needs to prepare inputs for, and read outputs of, a model.

One :class:`ModelSpec` travels with every artifact: in a training checkpoint (``config["spec"]``),
in an ONNX file's ``metadata_props`` (flat string key/values, see :meth:`ModelSpec.to_metadata`),
and in an engine's JSON sidecar. Train, export, calibration and runtime all read the same fields,
so preprocessing cannot drift apart between them.

Units: ``window`` and ``extra_windows`` in Hounsfield units; ``input_size``, all target sizes and
``ep_sigma`` in crop pixels; ``threshold`` is a probability.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

GUIDANCE_MODES = ("cm", "ep", "cm+ep")
POSTPROCESS_MODES = ("none", "clicked")
METADATA_KEY = "cmdeploy.spec"
# ONNX metadata entry naming a model's numeric precision: "fp32", "fp16" or "int8"
PRECISION_KEY = "cmdeploy.precision"

# The paper's numbers for a 512 x 512 crop; smaller models scale them by input_size / 512.
PAPER_INPUT_SIZE = 512
PAPER_TRAIN_TARGET = (350.0, 400.0)


@dataclass(frozen=True)
class ModelSpec:
    """Preprocessing and post-processing contract of one model.

    Attributes:
        input_size: side S of the square network input, pixels.
        guidance: ``"cm"`` (confidence map), ``"ep"`` (four Gaussians) or ``"cm+ep"``.
        cm_variant: confidence-map variant passed to :func:`cmdeploy.guidance.confidence_map`.
        cm_params: extra keyword arguments of that variant (e.g. ``{"tau": 7.0}``).
        ep_sigma: standard deviation of the extreme-point Gaussians, crop pixels.
        window: (low, high) HU window; the image channel is ``clip(hu, low, high)``.
        extra_windows: further (low, high) HU windows, one more image channel each (``image2``,
            ``image3``, ...) after ``image``; empty = the paper's single window.
        norm_mean, norm_std: each windowed image is scaled to [0, 1], then ``(v - mean) / std``.
        target_size: inference zoom target ``b_m``: the longer side of the points' bounding box is
            zoomed to this many crop pixels.
        train_target_range: range of ``b_m`` drawn uniformly during training.
        threshold: probability above which a pixel is foreground.
        postprocess: mask post-processing from the clicks, ``"none"`` or ``"clicked"`` (keep the
            components the points' segments touch, fill holes; :mod:`cmdeploy.postprocess`).
        pad_hu: HU value used outside the slice when the crop extends past its border.
    """

    input_size: int = 256
    guidance: str = "cm"
    cm_variant: str = "paper"
    cm_params: dict[str, float] = field(default_factory=dict)
    ep_sigma: float = 5.0
    window: tuple[float, float] = (-200.0, 250.0)
    extra_windows: tuple[tuple[float, float], ...] = ()
    norm_mean: float = 0.5
    norm_std: float = 0.5
    target_size: float = 187.5
    train_target_range: tuple[float, float] = (175.0, 200.0)
    threshold: float = 0.5
    pad_hu: float = -1024.0
    postprocess: str = "none"

    def __post_init__(self) -> None:
        if self.guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {self.guidance!r}")
        if self.input_size < 16:
            raise ValueError(f"input_size must be >= 16 pixels, got {self.input_size}")
        lo, hi = self.window
        if not hi > lo:
            raise ValueError(f"window must be (low, high) with high > low, got {self.window}")
        extra = tuple((float(a), float(b)) for a, b in self.extra_windows)
        for a, b in extra:
            if not b > a:
                raise ValueError(f"extra window must be (low, high) with high > low, got {(a, b)}")
        object.__setattr__(self, "extra_windows", extra)
        if self.norm_std <= 0:
            raise ValueError(f"norm_std must be > 0, got {self.norm_std}")
        if self.postprocess not in POSTPROCESS_MODES:
            raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {self.postprocess!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 < self.target_size <= self.input_size:
            raise ValueError(
                f"target_size must be in (0, input_size={self.input_size}], got {self.target_size}"
            )
        # tuples survive a JSON round trip as lists; normalise
        object.__setattr__(self, "window", (float(lo), float(hi)))
        a, b = self.train_target_range
        object.__setattr__(self, "train_target_range", (float(a), float(b)))

    @classmethod
    def for_input_size(cls, input_size: int, **overrides: Any) -> ModelSpec:
        """The paper's zoom targets (350-400 px of 512) scaled to ``input_size``."""
        s = input_size / PAPER_INPUT_SIZE
        lo, hi = PAPER_TRAIN_TARGET
        defaults: dict[str, Any] = {
            "input_size": input_size,
            "target_size": (lo + hi) / 2 * s,
            "train_target_range": (lo * s, hi * s),
            "ep_sigma": 10.0 * s,
        }
        defaults.update(overrides)
        return cls(**defaults)

    @property
    def windows(self) -> tuple[tuple[float, float], ...]:
        """HU windows of the image channels, in channel order: ``window`` then ``extra_windows``."""
        return (self.window,) + self.extra_windows

    @property
    def num_image_channels(self) -> int:
        return len(self.windows)

    @property
    def channels(self) -> tuple[str, ...]:
        """Input channel names, in order: ``image`` (``image2``, ...), then the guidance channel(s)."""
        images = ("image",) + tuple(f"image{k}" for k in range(2, self.num_image_channels + 1))
        return images + tuple(self.guidance.split("+"))

    @property
    def guidance_channels(self) -> tuple[str, ...]:
        """Names of the guidance channels, in input order (after the image channels)."""
        return self.channels[self.num_image_channels:]

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window)
        if self.extra_windows:  # absent for the paper's single window: older readers keep working
            d["extra_windows"] = [list(w) for w in self.extra_windows]
        else:
            del d["extra_windows"]
        d["train_target_range"] = list(self.train_target_range)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model spec keys: {sorted(unknown)}")
        kw = dict(d)
        for key in ("window", "train_target_range"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "extra_windows" in kw:
            kw["extra_windows"] = tuple(tuple(w) for w in kw["extra_windows"])
        return cls(**kw)

    def to_metadata(self) -> dict[str, str]:
        """Flat string map for ONNX ``metadata_props`` (the spec as JSON plus readable keys)."""
        return {
            METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True),
            "cmdeploy.input_size": str(self.input_size),
            "cmdeploy.channels": ",".join(self.channels),
            "cmdeploy.guidance": self.guidance,
            "cmdeploy.threshold": str(self.threshold),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ModelSpec:
        """Inverse of :meth:`to_metadata`; raises ``ValueError`` naming the missing key."""
        if METADATA_KEY not in metadata:
            raise ValueError(
                f"model metadata has no {METADATA_KEY!r} entry: not a cmdeploy model "
                f"(keys found: {sorted(metadata)[:10]})"
            )
        return cls.from_dict(json.loads(metadata[METADATA_KEY]))
