"""ResNet-PSP segmentation network (paper sec. 3.1), written for clean ONNX export.

Backbone: ResNet (BasicBlock for depth 18/34, Bottleneck for 50/101) with the last two stages
atrous (stride 1, dilation 2 and 4), so the feature map of an ``S x S`` input is
``ceil(S / 8) x ceil(S / 8)`` (output stride 8). Head: Pyramid Scene Parsing with bins
(1, 2, 3, 6) and one output logit channel, upsampled to the input size.

Both the adaptive average pooling and the bilinear upsampling of the head are constant matrices
built for the model's fixed ``input_size`` (``P_h @ x @ P_w^T``, :mod:`cmdeploy.psp_matrices`),
registered as non-persistent buffers. They reproduce ``F.adaptive_avg_pool2d`` and
``F.interpolate(mode="bilinear", align_corners=False)`` exactly and export to ONNX as plain
``MatMul`` nodes: no adaptive pooling, no ``Resize``, no shape arithmetic (no ``Shape``/``Gather``)
in the graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
from torch import nn

from cmdeploy.psp_matrices import adaptive_pool_matrix, bilinear_matrix  # re-exported

OUTPUT_STRIDE = 8
PSP_BINS = (1, 2, 3, 6)
DEPTHS = (18, 34, 50, 101)
# blocks per stage, and whether the depth uses Bottleneck blocks
_STAGES: dict[int, tuple[tuple[int, int, int, int], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
}
FINAL_BIAS_PRIOR = -1.0  # initial foreground logit: sigmoid(-1) ~ 0.27


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a :class:`ResNetPSP`.

    Attributes:
        depth: ResNet depth, one of 18, 34, 50, 101.
        base_width: channels of the stem and the first stage (64 = standard ResNet); stage k has
            ``base_width * 2**k`` planes (times 4 for Bottleneck outputs).
        input_size: side S of the square input, pixels; the head's matrices are built for it.
        in_channels: input channels (image + guidance channel(s)).
        psp_channels: channels of each pyramid branch and of the fusing 3x3 conv.
        dropout: channel dropout probability before the final 1x1 conv.
    """

    depth: int
    base_width: int
    input_size: int
    in_channels: int
    psp_channels: int
    dropout: float

    def __post_init__(self) -> None:
        if self.depth not in DEPTHS:
            raise ValueError(f"depth must be one of {DEPTHS}, got {self.depth!r}")
        for name in ("base_width", "in_channels", "psp_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.input_size, int) or self.input_size < 16:
            raise ValueError(f"input_size must be an int >= 16 pixels, got {self.input_size!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def feature_size(self) -> int:
        """Side of the backbone feature map, ``ceil(input_size / 8)``."""
        return feature_size(self.input_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming unknown or missing keys."""
        if not isinstance(d, dict):
            raise ValueError(f"model config must be a dict, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [n for n in names if n not in d]
        if unknown or missing:
            raise ValueError(f"bad model config keys: unknown {unknown}, missing {missing}")
        return cls(**d)


NAMED_CONFIGS: dict[str, ModelConfig] = {
    # the paper: ResNet-101, PSPNet head widths, 512 x 512 crops
    "paper": ModelConfig(
        depth=101, base_width=64, input_size=512, in_channels=2, psp_channels=512, dropout=0.1
    ),
    # CPU-trainable: ResNet-18 at 3/8 width, 256 x 256 crops (step times: docs/results.md, Training)
    "compact": ModelConfig(
        depth=18, base_width=24, input_size=256, in_channels=2, psp_channels=64, dropout=0.1
    ),
}


def make_config(name: str, in_channels: int, **overrides: Any) -> ModelConfig:
    """Named config with ``in_channels`` set and any other field overridden."""
    if name not in NAMED_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose from {sorted(NAMED_CONFIGS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model config overrides: {unknown}")
    return replace(NAMED_CONFIGS[name], in_channels=in_channels, **overrides)


def feature_size(input_size: int) -> int:
    """Backbone feature side for an input side: stem, max-pool and stage 2 each halve (ceil)."""
    return math.ceil(input_size / OUTPUT_STRIDE)


# --------------------------------------------------------------------------------------------
# constant-matrix pooling and resizing


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class MatrixAdaptiveAvgPool2d(nn.Module):
    """``F.adaptive_avg_pool2d(x, bins)`` for a fixed input size, as ``P_h @ x @ P_w^T``."""

    def __init__(self, in_size: int | tuple[int, int], bins: int | tuple[int, int]) -> None:
        super().__init__()
        (h, w), (bh, bw) = _pair(in_size), _pair(bins)
        self.in_size = (h, w)
        self.register_buffer("p_h", torch.from_numpy(adaptive_pool_matrix(h, bh)), persistent=False)
        self.register_buffer(
            "p_wt", torch.from_numpy(adaptive_pool_matrix(w, bw).T.copy()), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.p_h, x), self.p_wt)


class MatrixBilinearResize(nn.Module):
    """Bilinear resize (``align_corners=False``) between fixed sizes, as ``U_h @ x @ U_w^T``."""

    def __init__(self, in_size: int | tuple[int, int], out_size: int | tuple[int, int]) -> None:
        super().__init__()
        (h, w), (oh, ow) = _pair(in_size), _pair(out_size)
        self.in_size, self.out_size = (h, w), (oh, ow)
        self.register_buffer("u_h", torch.from_numpy(bilinear_matrix(h, oh)), persistent=False)
        self.register_buffer(
            "u_wt", torch.from_numpy(bilinear_matrix(w, ow).T.copy()), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(torch.matmul(self.u_h, x), self.u_wt)


# --------------------------------------------------------------------------------------------
# backbone


def _conv_bn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, dilation, dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNetBackbone(nn.Module):
    """ResNet with output stride 8: stages 3 and 4 use stride 1, dilation 2 and 4."""

    def __init__(self, depth: int, base_width: int, in_channels: int) -> None:
        super().__init__()
        counts, bottleneck = _STAGES[depth]
        block: type[BasicBlock] | type[Bottleneck] = Bottleneck if bottleneck else BasicBlock
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = base_width
        stages = []
        strides, dilations = (1, 2, 1, 1), (1, 1, 2, 4)
        for k, (n, stride, dilation) in enumerate(zip(counts, strides, dilations, strict=True)):
            planes = base_width * 2**k
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, stride if j == 0 else 1, dilation))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


# --------------------------------------------------------------------------------------------
# head and full network


class PSPBranch(nn.Module):
    """Pool to ``bins x bins``, 1x1 conv + BN + ReLU, bilinear upsample back to the feature size."""

    def __init__(self, cin: int, cout: int, feature: int, bins: int) -> None:
        super().__init__()
        self.pool = MatrixAdaptiveAvgPool2d(feature, bins)
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.up = MatrixBilinearResize(bins, feature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.relu(self.bn(self.conv(self.pool(x)))))


class PSPHead(nn.Module):
    """Pyramid pooling (bins 1, 2, 3, 6), concat with the features, 3x3 fuse, 1x1 to one logit."""

    def __init__(self, cin: int, channels: int, feature: int, dropout: float) -> None:
        super().__init__()
        self.branches = nn.ModuleList(PSPBranch(cin, channels, feature, b) for b in PSP_BINS)
        self.fuse = _conv_bn_relu(cin + channels * len(PSP_BINS), channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([x] + [branch(x) for branch in self.branches], dim=1)
        return self.classifier(self.dropout(self.fuse(x)))


class ResNetPSP(nn.Module):
    """ResNet-PSP: ``(N, C, S, S)`` float input -> ``(N, 1, S, S)`` foreground logits.

    ``S`` and ``C`` are fixed by the :class:`ModelConfig` the model is built from.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        feat = config.feature_size
        self.backbone = ResNetBackbone(config.depth, config.base_width, config.in_channels)
        self.head = PSPHead(self.backbone.out_channels, config.psp_channels, feat, config.dropout)
        self.upsample = MatrixBilinearResize(feat, config.input_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.head.classifier.weight, std=0.01)
        nn.init.constant_(self.head.classifier.bias, FINAL_BIAS_PRIOR)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config.in_channels, self.config.input_size
        # shape check only (never data-dependent); skipped while the ONNX tracer records the graph
        if not torch.jit.is_tracing() and (x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s)):
            raise ValueError(
                f"ResNetPSP expects input (N, {c}, {s}, {s}) (in_channels, input_size from its "
                f"ModelConfig), got {tuple(x.shape)}"
            )
        return self.upsample(self.head(self.backbone(x)))


def build_model(config: ModelConfig) -> ResNetPSP:
    """A freshly initialised :class:`ResNetPSP` for ``config``."""
    return ResNetPSP(config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "DEPTHS",
    "NAMED_CONFIGS",
    "OUTPUT_STRIDE",
    "PSP_BINS",
    "BasicBlock",
    "Bottleneck",
    "MatrixAdaptiveAvgPool2d",
    "MatrixBilinearResize",
    "ModelConfig",
    "PSPHead",
    "ResNetBackbone",
    "ResNetPSP",
    "adaptive_pool_matrix",
    "bilinear_matrix",
    "build_model",
    "count_parameters",
    "feature_size",
    "make_config",
]
