"""A compact 2-D U-Net: the fully supervised network of the label-generation study (issue 17).

The paper trains a U-Net (Ronneberger et al. 2015) on ground-truth vs generated labels; this is the
same architecture at a size a CPU trains in minutes: ``depth`` levels of two 3x3 conv + BatchNorm +
ReLU blocks, ``width * 2**k`` channels at level ``k``, 2x2 max-pooling down, bilinear upsampling and
skip concatenation up, one output logit per pixel. Input ``(N, in_channels, S, S)`` with ``S``
divisible by ``2**(depth - 1)``; output ``(N, 1, S, S)`` logits.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` levels (``depth - 1`` poolings) and ``width`` channels at the top."""

    def __init__(self, in_channels: int = 1, width: int = 16, depth: int = 4) -> None:
        super().__init__()
        if depth < 2 or width < 1 or in_channels < 1:
            raise ValueError(
                f"need depth >= 2, width >= 1, in_channels >= 1; got {depth}, {width}, {in_channels}"
            )
        self.depth = depth
        chans = [width * 2**k for k in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList(_block(chans[k + 1] + chans[k], chans[k]) for k in reversed(range(depth - 1)))
        self.head = nn.Conv2d(chans[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = 2 ** (self.depth - 1)
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(f"input side {tuple(x.shape[-2:])} must be divisible by {step}")
        skips = []
        for k, block in enumerate(self.down):
            x = block(x if k == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)
