"""CIFAR ResNet family (depth 6n+2, "RepDistiller" style, original-method.md §3.1) at any per-layer width.

Layout (keys as in the reference):
    conv1 (3x3, in_channels -> stem, no bias), bn1, relu
    layer1..layer3: n BasicBlocks each; base widths 16/32/64; first-block stride 1/2/2
        block: conv1 3x3 (stride s) -> bn1 -> relu -> conv2 3x3 -> bn2; + shortcut; relu
        shortcut: identity, or ``downsample = Sequential(Conv1x1 stride s no bias, BN)`` in the first
        block of layer2 and layer3 only. Where a projection exists is decided by position (where the
        *unpruned* network changes shape), never by comparing widths, so a pruned model whose stage
        widths happen to coincide keeps its projections.
    avgpool (AdaptiveAvgPool2d(1), so 8x8 and 28x28 inputs work too) -> flatten -> fc: Linear(C_last, C)

``widths`` (flat, length 1 + 6n): ``[stem, mid_1, out_1, mid_2, out_2, ..., mid_3n, out_3n]`` where block
``i`` (layer1.0, layer1.1, ..., layer3.{n-1}) has conv1 out = ``mid_i`` and conv2 out = ``out_i``.
Identity residuals couple channels: every ``out`` of a stage is equal, and stage 1's equals ``stem``.

Input [B, in_channels, H, W] -> logits [B, num_classes].
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Rebuildable, register_model

__all__ = ["CifarBasicBlock", "CifarResNet", "cifar_resnet_default_widths"]

_STAGE_BASE = (16, 32, 64)
_STAGE_STRIDE = (1, 2, 2)


class CifarBasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU. [B, in, H, W] -> [B, out, H/s, W/s]."""

    def __init__(self, in_planes: int, mid_planes: int, out_planes: int, stride: int, projection: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, mid_planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(mid_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )
            if projection
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        # Functional ReLU after the add, as in the reference: torch-pruning's op counter counts nn.ReLU
        # modules only, so this keeps MAC counts (and hence measured speed-ups) identical to the reference.
        return F.relu(out + shortcut)


def cifar_resnet_default_widths(depth: int) -> list[int]:
    """The unpruned widths of a depth-``depth`` CIFAR ResNet: ``[16] + [16, 16]*n + [32, 32]*n + [64, 64]*n``."""
    n = _blocks_per_stage(depth)
    widths = [_STAGE_BASE[0]]
    for base in _STAGE_BASE:
        widths += [base, base] * n
    return widths


def _blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110, ...), got {depth}")
    return (depth - 2) // 6


class CifarResNet(Rebuildable, nn.Module):
    """Depth-``depth`` CIFAR ResNet with per-layer ``widths`` (see the module docstring for the order)."""

    in_channels_source = ("conv1.weight", 1)
    classifier_key = "fc.weight"

    def __init__(self, depth: int, num_classes: int = 10, widths: list[int] | None = None, in_channels: int = 3):
        super().__init__()
        n = _blocks_per_stage(depth)
        self.depth = depth
        widths = cifar_resnet_default_widths(depth) if widths is None else [int(w) for w in widths]
        _validate_widths(depth, n, widths)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes, k = widths[0], 1
        for s, stride in enumerate(_STAGE_STRIDE):
            blocks = []
            for b in range(n):
                mid, out = widths[k], widths[k + 1]
                # Projection exactly where the unpruned net changes shape: first block of stages 2 and 3.
                projection = b == 0 and s > 0
                blocks.append(CifarBasicBlock(in_planes, mid, out, stride if b == 0 else 1, projection))
                in_planes, k = out, k + 2
            self.add_module(f"layer{s + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def width_sources(self) -> list[tuple[str, int]]:
        sources = [("conv1.weight", 0)]
        for s in range(3):
            for b in range(len(getattr(self, f"layer{s + 1}"))):
                sources += [(f"layer{s + 1}.{b}.conv1.weight", 0), (f"layer{s + 1}.{b}.conv2.weight", 0)]
        return sources

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_channels, H, W] -> logits [B, num_classes]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


def _validate_widths(depth: int, n: int, widths: list[int]) -> None:
    expected_len = 1 + 6 * n
    if len(widths) != expected_len:
        raise ValueError(
            f"resnet{depth} needs {expected_len} widths [stem, mid_1, out_1, ..., mid_{3 * n}, out_{3 * n}], "
            f"got {len(widths)}"
        )
    if any(w < 1 for w in widths):
        raise ValueError(f"resnet{depth} widths must all be >= 1, got {widths}")
    for s in range(3):
        outs = [widths[2 + 2 * (s * n + b)] for b in range(n)]
        coupled = outs if s > 0 else [widths[0]] + outs
        if len(set(coupled)) != 1:
            what = "the stem and the block outputs of layer1" if s == 0 else f"the block outputs of layer{s + 1}"
            raise ValueError(
                f"resnet{depth}: identity shortcuts require {what} to have equal widths, got {coupled}"
            )


def _make_builder(depth: int):
    def builder(num_classes: int = 10, widths: list[int] | None = None, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, widths=widths, in_channels=in_channels)

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = f"CIFAR ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage); widths as in {__name__}."
    return builder


for _depth in (8, 20, 32, 44, 56, 110):
    register_model(f"resnet{_depth}")(_make_builder(_depth))
