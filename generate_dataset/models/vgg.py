"""VGG19-BN, CIFAR variant ("RepDistiller" cfg 'E', original-method.md §3.1) at any per-layer width.

Layout (keys as in the reference):
    block0: conv 3x3 pad 1 (bias) -> BN -> ReLU -> conv -> BN          keys block0.0/.1, block0.3/.4
    block1: the same with 2 convs; block2, block3, block4: 4 convs each (keys block{b}.{3j}, block{b}.{3j+1})
    After each block: ReLU. As in the reference, the block's last ReLU is the functional ``F.relu`` outside
    the Sequential (key indices, and torch-pruning's MAC count, which counts ReLU modules only, match).
    MaxPool 2x2 (pool0, pool1, pool2) after blocks 0, 1, 2. ``pool3`` after block 3 runs only when the
    *network input* is 64 pixels high (the reference quirk): on 32x32 CIFAR, blocks 3 and 4 both run at 4x4.
    pool4 = AdaptiveAvgPool2d(1) -> flatten -> classifier: Linear(w_16, C).

The pool3 condition is evaluated at run time inside :func:`_pool3_if_input_is_64`, which is registered
with ``torch.fx.wrap``: a ``torch.fx.symbolic_trace`` of the model records it as one opaque call instead of
failing on a data-dependent ``if``. It changes no channel count, so graph conversion can ignore it.

``widths`` (flat, length 16): the output channels of the 16 convs in forward order (default
``[64, 64, 128, 128, 256 x4, 512 x4, 512 x4]``). VGG has no residuals, so the widths are independent.

Input [B, in_channels, H, W] -> logits [B, num_classes].
"""
from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Rebuildable, register_model

__all__ = ["VGG", "VGG19_DEFAULT_WIDTHS"]

_BLOCK_CONVS = (2, 2, 4, 4, 4)
VGG19_DEFAULT_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512]
_POOL3_TRIGGER_HEIGHT = 64


def _pool3_if_input_is_64(x: Tensor, input_height: int) -> Tensor:
    """MaxPool 2x2 of ``x`` [B, C, H, W] when the network input was 64 high, else ``x`` unchanged."""
    if input_height == _POOL3_TRIGGER_HEIGHT:
        return F.max_pool2d(x, kernel_size=2, stride=2)
    return x


torch.fx.wrap("_pool3_if_input_is_64")


class VGG(Rebuildable, nn.Module):
    """VGG19-BN for small images with per-conv ``widths`` (see the module docstring)."""

    in_channels_source = ("block0.0.weight", 1)
    classifier_key = "classifier.weight"

    def __init__(self, num_classes: int = 100, widths: list[int] | None = None, in_channels: int = 3):
        super().__init__()
        widths = list(VGG19_DEFAULT_WIDTHS) if widths is None else [int(w) for w in widths]
        if len(widths) != sum(_BLOCK_CONVS):
            raise ValueError(f"vgg19 needs {sum(_BLOCK_CONVS)} conv widths, got {len(widths)}")
        if any(w < 1 for w in widths):
            raise ValueError(f"vgg19 widths must all be >= 1, got {widths}")
        prev, k = in_channels, 0
        for b, n_convs in enumerate(_BLOCK_CONVS):
            layers: list[nn.Module] = []
            for _ in range(n_convs):
                layers += [nn.Conv2d(prev, widths[k], 3, padding=1, bias=True), nn.BatchNorm2d(widths[k]), nn.ReLU()]
                prev, k = widths[k], k + 1
            # Drop the trailing ReLU so the key indices match the reference (it is applied functionally in forward).
            self.add_module(f"block{b}", nn.Sequential(*layers[:-1]))
        self.pool0 = nn.MaxPool2d(2, 2)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.pool4 = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def width_sources(self) -> list[tuple[str, int]]:
        return [
            (f"block{b}.{3 * j}.weight", 0) for b, n_convs in enumerate(_BLOCK_CONVS) for j in range(n_convs)
        ]

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_channels, H, W] -> logits [B, num_classes]."""
        input_height = x.shape[2]
        x = self.pool0(F.relu(self.block0(x)))
        x = self.pool1(F.relu(self.block1(x)))
        x = self.pool2(F.relu(self.block2(x)))
        x = _pool3_if_input_is_64(F.relu(self.block3(x)), input_height)
        x = F.relu(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


@register_model("vgg19")
def vgg19(num_classes: int = 100, widths: list[int] | None = None, in_channels: int = 3) -> VGG:
    """VGG19-BN (CIFAR variant); ``widths`` = the 16 conv output widths in order."""
    return VGG(num_classes=num_classes, widths=widths, in_channels=in_channels)
