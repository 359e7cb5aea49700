"""Networks from outside this project: the authors' released ``model.pth`` and Torch-Pruning's base models.

Key names (checked against the sources, Yewei-Liu/MetaPruning HEAD and VainF/Torch-Pruning v1.6.1):

* resnet56 / resnet110: the authors' ``generate_dataset/resnet_family.py`` ``ResNet`` and ``MyResNet`` (any widths),
  Torch-Pruning's ``reproduce/engine/models/cifar/resnet_tiny.py`` ``ResNet`` (the same file, which the authors
  vendor). Keys ``conv1``, ``bn1``, ``layer{s}.{b}.{conv1,bn1,conv2,bn2}``, ``layer{2,3}.0.downsample.{0,1}``, ``fc``:
  ours, no renaming.
* vgg19: the authors' ``generate_dataset/VGG_family.py`` ``VGG`` (cfg 'E' with batch norm) and ``MyVGG`` (any
  widths), Torch-Pruning's ``reproduce/engine/models/cifar/vgg.py`` ``vgg19_bn``. Keys ``block{b}.{3j}`` (conv),
  ``block{b}.{3j+1}`` (BN), ``classifier``: ours, no renaming.

So a state dict of theirs loads into ours unchanged (``model_from_state_dict`` reads the widths off the shapes, so an
init-pruned ``model.pth`` loads too); what this module adds is the check and one clear error naming the file, the
class it held and what the task expects. (Torch-Pruning's ``shortcut`` keys belong to its ImageNet-style CIFAR
``resnet.py`` ResNet-18/34/50, which the paper does not use; its ResNet-56 has ``downsample``.) Two differences
carry no parameters and give the same outputs on 32x32 inputs: their ResNets pool with ``AvgPool2d(8)`` where ours
use ``AdaptiveAvgPool2d(1)``, and their VGG holds an unused ``pool3`` module where ours calls a function.

Torch-Pruning's released base models (``cifar10_resnet56.pth``, ``cifar100_vgg19.pth``) are plain state dicts:
``task.pretrained=<file>`` loads them (``pretrained.load_pretrained``, weights-only), or
``main/convert_release.py --model-file <file>`` writes them as this project's checkpoint for ``final.model``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .pretrained import strip_wrapper_prefix
from .registry import ArchitectureMismatchError, model_from_state_dict, model_spec, widths_from_state_dict

__all__ = ["ExternalModelError", "EXTERNAL_CLASSES", "external_model"]

# Classes of the external code bases (qualified name without module) -> this project's architecture family.
EXTERNAL_CLASSES = {
    "ResNet": "CIFAR ResNet (resnet56, resnet110, ...)",
    "MyResNet": "CIFAR ResNet (resnet56, resnet110, ...) at any widths",
    "VGG": "VGG (vgg19 with batch norm)",
    "MyVGG": "VGG-19 with batch norm at any widths",
    "ResNetDeep": "ImageNet ResNet (resnet18/26/50)",
    "MyResNetDeep": "ImageNet ResNet (resnet18/26/50) at any widths",
    "VisionTransformer": "ViT-B/16",
    "MyGNN": "a metanetwork, not a network to prune",
    "MyGNN_resnet50": "a metanetwork, not a network to prune",
    "MyGNN_ViT": "a metanetwork, not a network to prune",
}


class ExternalModelError(ValueError):
    """An external weights file does not hold the task's architecture."""


def external_model(name: str, state_dict: Mapping[str, torch.Tensor], source: str,
                   class_name: str | None = None) -> tuple[nn.Module, dict]:
    """``(model in eval mode, spec)`` of architecture ``name`` from an external state dict (authors' or
    Torch-Pruning's key names, module docstring); widths and class count are read off the shapes.

    ``source`` (the file) and ``class_name`` (the class the file held, when it was a pickled module) go into the
    :class:`ExternalModelError` raised when the tensors are not a ``name``.
    """
    state_dict = strip_wrapper_prefix(state_dict)
    held = f" (it held a {class_name.rpartition('.')[2]}" if class_name else ""
    if class_name:
        family = EXTERNAL_CLASSES.get(class_name.rpartition(".")[2])
        held += f": {family})" if family else f", class {class_name})"
    try:
        _widths, _in_channels, num_classes = widths_from_state_dict(name, state_dict)
        model = model_from_state_dict(name, state_dict, num_classes)
    except ArchitectureMismatchError as err:
        raise ExternalModelError(f"{source}: expected the weights of a {name}{held}, but {err}") from None
    return model, model_spec(name, model, num_classes)
