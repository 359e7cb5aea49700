"""Rebuildable model architectures (original-method.md §3.1) and their name registry.

Every architecture is built at arbitrary per-layer widths, so a torch-pruning-pruned state dict can be
turned back into a model (:func:`model_from_state_dict`) and described by a small JSON spec
(:func:`model_spec`); :func:`load_model` rebuilds the model of a saved checkpoint. :func:`load_pretrained`
(``pretrained.py``) starts a model from ``task.pretrained``: torchvision weights from the local hub cache, or a
local weights file. Importing this package registers all architectures.
"""
from .registry import (
    ArchitectureMismatchError,
    Rebuildable,
    UnknownModelError,
    build_model,
    get_builder,
    list_models,
    load_model,
    model_from_state_dict,
    model_spec,
    register_model,
    widths_from_state_dict,
)

# Imported for their @register_model side effects.
from . import cifar_resnet, torchvision_resnet, vgg, vit  # noqa: E402,F401
from .cifar_resnet import CifarBasicBlock, CifarResNet  # noqa: E402
from .torchvision_resnet import TorchvisionResNet  # noqa: E402
from .vgg import VGG  # noqa: E402
from .vit import RebuildableViT  # noqa: E402
from .pretrained import (  # noqa: E402
    PretrainedWeightsError,
    load_pretrained,
    resolve_pretrained,
    torchvision_weights_path,
)

__all__ = [
    "ArchitectureMismatchError",
    "UnknownModelError",
    "Rebuildable",
    "register_model",
    "list_models",
    "get_builder",
    "build_model",
    "model_from_state_dict",
    "load_model",
    "model_spec",
    "widths_from_state_dict",
    "CifarBasicBlock",
    "CifarResNet",
    "VGG",
    "TorchvisionResNet",
    "RebuildableViT",
    "PretrainedWeightsError",
    "load_pretrained",
    "resolve_pretrained",
    "torchvision_weights_path",
]
