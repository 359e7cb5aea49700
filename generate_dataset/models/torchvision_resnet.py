"""torchvision ResNet18 / ResNet50 (original-method.md §3.1 "Others") at any per-layer width.

The model *is* a ``torchvision.models.resnet.ResNet`` (same classes, module tree and key names, so
torchvision pretrained state dicts load), built once on the ``meta`` device and then given resized
convs / BNs / fc. Structure is torchvision's: stem conv 7x7/2 (no bias), bn1, relu, maxpool 3x3/2;
layer1..layer4; AdaptiveAvgPool2d(1); fc. Projection shortcuts (``downsample = Sequential(conv1x1, BN)``)
exist where the *unpruned* torchvision model has them: first block of layers 2-4 for ResNet18, first
block of every layer for ResNet50 (never decided from the, possibly pruned, widths). ResNet50 uses
Bottleneck v1.5 (stride on the 3x3 conv).

``widths`` (flat):
    ResNet18 (BasicBlock [2, 2, 2, 2]), length 17: ``[stem, mid_1, out_1, ..., mid_8, out_8]``
        block i = layer1.0, layer1.1, layer2.0, ...; conv1 out = mid_i, conv2 out = out_i.
    ResNet50 (Bottleneck [3, 4, 6, 3]), length 49: ``[stem, w1_1, w2_1, out_1, ..., w1_16, w2_16, out_16]``
        conv1 (1x1) out = w1_i, conv2 (3x3) out = w2_i, conv3 (1x1) out = out_i.
Identity residuals couple channels: the ``out`` widths of one layer are equal, and for ResNet18 (no
projection in layer1.0) layer1's equal ``stem``.

Input [B, in_channels, H, W] (H, W >= 32) -> logits [B, num_classes].
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .registry import Rebuildable, register_model

__all__ = ["TorchvisionResNet"]

# name -> (block class, blocks per layer)
_CONFIGS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}
_LAYER_PLANES = (64, 128, 256, 512)


def _default_widths(block: type[nn.Module], layers: tuple[int, ...]) -> list[int]:
    widths = [64]
    for planes, n in zip(_LAYER_PLANES, layers):
        per_block = [planes, planes] if block is BasicBlock else [planes, planes, planes * Bottleneck.expansion]
        widths += per_block * n
    return widths


class TorchvisionResNet(Rebuildable, ResNet):
    """A torchvision ``ResNet`` with per-layer ``widths`` (order in the module docstring)."""

    in_channels_source = ("conv1.weight", 1)
    classifier_key = "fc.weight"

    def __init__(self, arch: str, num_classes: int = 1000, widths: list[int] | None = None, in_channels: int = 3):
        block, layers = _CONFIGS[arch]
        convs_per_block = 2 if block is BasicBlock else 3
        widths = _default_widths(block, layers) if widths is None else [int(w) for w in widths]
        expected_len = 1 + convs_per_block * sum(layers)
        if len(widths) != expected_len:
            raise ValueError(
                f"{arch} needs {expected_len} widths (stem, then {convs_per_block} per block), got {len(widths)}"
            )
        if any(w < 1 for w in widths):
            raise ValueError(f"{arch} widths must all be >= 1, got {widths}")
        # The standard module tree, free of memory and init cost; every tensor-holding module is replaced below.
        with torch.device("meta"):
            ResNet.__init__(self, block, list(layers), num_classes=num_classes)
        self.arch = arch

        stem = widths[0]
        self.conv1 = nn.Conv2d(in_channels, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        in_planes, k = stem, 1
        for s in range(4):
            layer = getattr(self, f"layer{s + 1}")
            stage_outs = [in_planes] if layer[0].downsample is None else []
            for blk in layer:
                w = widths[k:k + convs_per_block]
                k += convs_per_block
                stride = blk.stride
                if block is BasicBlock:
                    blk.conv1 = nn.Conv2d(in_planes, w[0], 3, stride=stride, padding=1, bias=False)
                    blk.bn1 = nn.BatchNorm2d(w[0])
                    blk.conv2 = nn.Conv2d(w[0], w[1], 3, padding=1, bias=False)
                    blk.bn2 = nn.BatchNorm2d(w[1])
                else:
                    blk.conv1 = nn.Conv2d(in_planes, w[0], 1, bias=False)
                    blk.bn1 = nn.BatchNorm2d(w[0])
                    blk.conv2 = nn.Conv2d(w[0], w[1], 3, stride=stride, padding=1, bias=False)
                    blk.bn2 = nn.BatchNorm2d(w[1])
                    blk.conv3 = nn.Conv2d(w[1], w[2], 1, bias=False)
                    blk.bn3 = nn.BatchNorm2d(w[2])
                if blk.downsample is not None:
                    blk.downsample[0] = nn.Conv2d(in_planes, w[-1], 1, stride=stride, bias=False)
                    blk.downsample[1] = nn.BatchNorm2d(w[-1])
                stage_outs.append(w[-1])
                in_planes = w[-1]
            if len(set(stage_outs)) != 1:
                what = "the stem and the block outputs" if layer[0].downsample is None else "the block outputs"
                raise ValueError(
                    f"{arch}: identity shortcuts require {what} of layer{s + 1} to have equal widths, got {stage_outs}"
                )
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():  # torchvision's initialisation (zero_init_residual=False)
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        device = self.conv1.weight.device
        stale = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.device != device]
        if stale:  # a module left on the meta device would silently produce garbage
            raise RuntimeError(f"{arch}: tensors not rebuilt from the meta template: {stale}")

    def width_sources(self) -> list[tuple[str, int]]:
        convs = ("conv1", "conv2") if self.arch == "resnet18" else ("conv1", "conv2", "conv3")
        sources = [("conv1.weight", 0)]
        for s in range(4):
            for b in range(len(getattr(self, f"layer{s + 1}"))):
                sources += [(f"layer{s + 1}.{b}.{c}.weight", 0) for c in convs]
        return sources


@register_model("resnet18")
def resnet18(num_classes: int = 1000, widths: list[int] | None = None, in_channels: int = 3) -> TorchvisionResNet:
    """torchvision ResNet18 (BasicBlock [2, 2, 2, 2]); widths = [stem, mid_1, out_1, ..., mid_8, out_8]."""
    return TorchvisionResNet("resnet18", num_classes=num_classes, widths=widths, in_channels=in_channels)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, widths: list[int] | None = None, in_channels: int = 3) -> TorchvisionResNet:
    """torchvision ResNet50 (Bottleneck [3, 4, 6, 3]); widths = [stem, w1_1, w2_1, out_1, ..., out_16]."""
    return TorchvisionResNet("resnet50", num_classes=num_classes, widths=widths, in_channels=in_channels)
