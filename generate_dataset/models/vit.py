"""Vision Transformers (torchvision ``VisionTransformer``) with a prunable hidden dim and per-layer MLP widths.

The model *is* a ``torchvision.models.vision_transformer.VisionTransformer`` (torchvision key names:
``conv_proj``, ``class_token``, ``encoder.pos_embedding``, ``encoder.layers.encoder_layer_{i}.{ln_1,
self_attention, ln_2, mlp.0, mlp.3}``, ``encoder.ln``, ``heads.head``), so torchvision pretrained state
dicts load. Two things may differ from the standard model, both produced by torch-pruning:

* the hidden dim (torch-pruning with ``unwrapped_parameters=[(class_token, 2), (encoder.pos_embedding, 2)]``
  and ``round_to=num_heads`` shrinks it everywhere; the number of heads is kept, so it must stay a
  multiple of ``num_heads``; after pruning in place set ``model.hidden_dim`` to the new value);
* the MLP hidden width of each encoder layer (``mlp.0`` out / ``mlp.3`` in).

``widths`` (flat, length 1 + num_layers): ``[hidden_dim, mlp_1, ..., mlp_L]``.
Image size, patch size, depth and number of heads are fixed by the registered name:

    vit_b_16: 224x224, patch 16, 12 layers, 12 heads, hidden 768, MLP 3072, LayerNorm eps 1e-6
    vit_tiny: 32x32,   patch 8,  2 layers,  2 heads,  hidden 16,  MLP 32   (for tests)

Input [B, in_channels, image_size, image_size] -> logits [B, num_classes].
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from .registry import Rebuildable, register_model

__all__ = ["ViTConfig", "RebuildableViT", "VIT_CONFIGS"]


@dataclass(frozen=True)
class ViTConfig:
    image_size: int
    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int

    def default_widths(self) -> list[int]:
        return [self.hidden_dim] + [self.mlp_dim] * self.num_layers


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_b_16": ViTConfig(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "vit_tiny": ViTConfig(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32),
}


_LEGACY_MLP = re.compile(r"\.mlp\.linear_([12])\.")


def _mlp_linear(in_features: int, out_features: int) -> nn.Linear:
    """A Linear initialised like torchvision's ``MLPBlock`` (Xavier-uniform weight, N(0, 1e-6) bias)."""
    linear = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(linear.weight)
    nn.init.normal_(linear.bias, std=1e-6)
    return linear


class RebuildableViT(Rebuildable, VisionTransformer):
    """torchvision ViT with ``widths = [hidden_dim, mlp_1, ..., mlp_L]`` (see the module docstring)."""

    in_channels_source = ("conv_proj.weight", 1)
    classifier_key = "heads.head.weight"

    def __init__(self, arch: str, num_classes: int = 1000, widths: list[int] | None = None, in_channels: int = 3):
        cfg = VIT_CONFIGS[arch]
        widths = cfg.default_widths() if widths is None else [int(w) for w in widths]
        if len(widths) != 1 + cfg.num_layers:
            raise ValueError(
                f"{arch} needs {1 + cfg.num_layers} widths [hidden_dim, mlp_1, ..., mlp_{cfg.num_layers}], "
                f"got {len(widths)}"
            )
        if any(w < 1 for w in widths):
            raise ValueError(f"{arch} widths must all be >= 1, got {widths}")
        hidden, mlps = widths[0], widths[1:]
        if hidden % cfg.num_heads != 0:
            raise ValueError(
                f"{arch}: hidden_dim {hidden} must be a multiple of num_heads={cfg.num_heads} "
                "(prune it with torch-pruning round_to=num_heads)"
            )
        VisionTransformer.__init__(
            self,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_layers=cfg.num_layers,
            num_heads=cfg.num_heads,
            hidden_dim=hidden,
            mlp_dim=mlps[0],
            num_classes=num_classes,
        )
        self.arch = arch
        if in_channels != 3:
            self.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=cfg.patch_size, stride=cfg.patch_size)
            fan_in = in_channels * cfg.patch_size * cfg.patch_size  # torchvision's patchify-stem init
            nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
            nn.init.zeros_(self.conv_proj.bias)
        for i, mlp_dim in enumerate(mlps):
            mlp = self.encoder.layers[i].mlp
            if mlp[0].out_features != mlp_dim:
                mlp[0] = _mlp_linear(hidden, mlp_dim)
                mlp[3] = _mlp_linear(mlp_dim, hidden)

    def canonical_state_dict(self, state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """Rename torchvision's legacy MLP keys (``mlp.linear_1`` / ``mlp.linear_2``, still used by some
        hosted weights) to ``mlp.0`` / ``mlp.3``, as torchvision's own ``MLPBlock`` loader does."""
        if not any(_LEGACY_MLP.search(k) for k in state_dict):
            return state_dict
        return {_LEGACY_MLP.sub(lambda m: f".mlp.{3 * (int(m.group(1)) - 1)}.", k): v for k, v in state_dict.items()}

    def width_sources(self) -> list[tuple[str, int]]:
        return [("conv_proj.weight", 0)] + [
            (f"encoder.layers.encoder_layer_{i}.mlp.0.weight", 0) for i in range(len(self.encoder.layers))
        ]


def _make_builder(arch: str):
    def builder(num_classes: int = 1000, widths: list[int] | None = None, in_channels: int = 3) -> RebuildableViT:
        return RebuildableViT(arch, num_classes=num_classes, widths=widths, in_channels=in_channels)

    builder.__name__ = builder.__qualname__ = arch
    builder.__doc__ = f"{arch}: {VIT_CONFIGS[arch]}; widths = [hidden_dim, mlp_1, ..., mlp_L]."
    return builder


for _arch in VIT_CONFIGS:
    register_model(_arch)(_make_builder(_arch))
