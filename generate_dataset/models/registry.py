"""Name -> architecture registry, and rebuilding models from (pruned) state dicts.

A registered *builder* is a function ``fn(num_classes, widths=None, in_channels=3) -> nn.Module``
decorated with :func:`register_model`. The module it returns must implement the small
:class:`Rebuildable` protocol below: it says which state-dict tensor dimension holds each entry of
its flat ``widths`` list. That single table is all that is needed to

* read the widths of a live (possibly torch-pruning-pruned) model or of a state dict,
* rebuild a model of identical shapes with :func:`model_from_state_dict`,
* produce a JSON spec with :func:`model_spec` that :func:`build_model` turns back into the same shapes,
* rebuild the model saved in a weights-only checkpoint (``utils.checkpoint``) with :func:`load_model`.

Structure (which blocks exist, where projection shortcuts are) is fixed by the *name*, never by the
widths: the set of state-dict keys of an architecture does not depend on its widths. The expected key
set is taken from a template built on the ``meta`` device (no memory, no initialisation cost).
"""
from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from utils.checkpoint import CheckpointError, load_checkpoint

__all__ = [
    "ArchitectureMismatchError",
    "UnknownModelError",
    "Rebuildable",
    "register_model",
    "list_models",
    "get_builder",
    "build_model",
    "model_from_state_dict",
    "model_spec",
    "widths_from_state_dict",
]


class ArchitectureMismatchError(ValueError):
    """A state dict does not belong to the requested architecture (keys or shapes disagree)."""


class UnknownModelError(KeyError, ValueError):
    """An architecture name is not registered. Subclasses both KeyError and ValueError."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else ""


class Rebuildable:
    """Mixin for registered model classes.

    Subclasses implement :meth:`width_sources`: one ``(state_dict_key, dim)`` pair per entry of the
    flat ``widths`` list, in the documented order of the family. ``in_channels_source`` and
    ``classifier_key`` name the tensors holding the input channels (dim 1) and the class count (dim 0).
    """

    in_channels_source: tuple[str, int] = ("", 1)
    classifier_key: str = ""

    def width_sources(self) -> list[tuple[str, int]]:
        raise NotImplementedError

    def canonical_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """``state_dict`` with legacy key names renamed to this class's (default: unchanged)."""
        return state_dict

    @property
    def widths(self) -> list[int]:
        """Current per-layer widths read from the parameter shapes (valid after in-place pruning)."""
        return _read_widths(self.width_sources(), self.state_dict())  # type: ignore[attr-defined]


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``fn(num_classes, widths=None, in_channels=3) -> nn.Module`` as ``name``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        old = _REGISTRY.get(name)
        # Re-registering the same function (module reload) is fine; a different one is a name clash.
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"model name '{name}' is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted names of all registered architectures."""
    return sorted(_REGISTRY)


def get_builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder for ``name``; raises :class:`UnknownModelError` listing valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model name {name!r}.{hint} Valid names: {', '.join(list_models())}"
        ) from None


def build_model(name: str, num_classes: int, widths: list[int] | None = None, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised ``name`` model (train mode). ``widths=None`` = the paper's unpruned widths."""
    model = get_builder(name)(num_classes=int(num_classes), widths=widths, in_channels=int(in_channels))
    if not isinstance(model, Rebuildable):
        raise TypeError(f"builder of '{name}' returned {type(model).__name__}, which is not a Rebuildable model")
    return model


def _template(name: str, num_classes: int = 10) -> nn.Module:
    """Default-width model on the meta device: gives the key set and width table at no memory cost."""
    builder = get_builder(name)
    with torch.device("meta"):
        return builder(num_classes=num_classes, widths=None, in_channels=3)


def _read_widths(sources: list[tuple[str, int]], tensors: Mapping[str, torch.Tensor]) -> list[int]:
    return [int(tensors[key].shape[dim]) for key, dim in sources]


def _is_optional_key(key: str) -> bool:
    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints, some torchvision weights).
    return key.endswith("num_batches_tracked")


def _matching_architectures(keys: set[str]) -> list[str]:
    matches = []
    for other in list_models():
        other_keys = {k for k in _template(other).state_dict() if not _is_optional_key(k)}
        if other_keys == {k for k in keys if not _is_optional_key(k)}:
            matches.append(other)
    return matches


def _check_keys(name: str, template: nn.Module, state_dict: Mapping[str, Any]) -> None:
    expected = list(template.state_dict())
    given = list(state_dict)
    # Report in state-dict order, so the first key named is where the two structures diverge.
    missing = [k for k in expected if k not in state_dict and not _is_optional_key(k)]
    expected_set = set(expected)
    unexpected = [k for k in given if k not in expected_set]
    if not missing and not unexpected:
        return
    parts = [f"state dict does not match architecture '{name}'"]
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
    msg = "; ".join(parts) + "."
    if given and all(k.startswith("module.") for k in given):
        msg += " All keys start with 'module.' (a DistributedDataParallel checkpoint): strip that prefix first."
    else:
        others = [m for m in _matching_architectures(set(given)) if m != name]
        if others:
            msg += f" The keys match architecture(s) {others}: pass one of those names instead."
        else:
            msg += f" Registered architectures: {', '.join(list_models())}."
    raise ArchitectureMismatchError(msg)


def _inspect(name: str, state_dict: Mapping[str, torch.Tensor], num_classes: int | None):
    """Canonical state dict, widths, in_channels and class count of a ``name`` state dict (keys checked)."""
    template = _template(name)
    assert isinstance(template, Rebuildable)
    state_dict = template.canonical_state_dict(state_dict)
    _check_keys(name, template, state_dict)
    widths = _read_widths(template.width_sources(), state_dict)
    in_key, in_dim = template.in_channels_source
    in_channels = int(state_dict[in_key].shape[in_dim])
    classifier = state_dict[template.classifier_key]
    found_classes = int(classifier.shape[0])
    if num_classes is not None and found_classes != int(num_classes):
        raise ArchitectureMismatchError(
            f"state dict for '{name}' has {found_classes} classes ({template.classifier_key} has shape "
            f"{tuple(classifier.shape)}) but num_classes={num_classes} was requested"
        )
    return state_dict, widths, in_channels, found_classes


def widths_from_state_dict(name: str, state_dict: Mapping[str, torch.Tensor]) -> tuple[list[int], int, int]:
    """``(widths, in_channels, num_classes)`` read from the tensor shapes of a ``name`` state dict.

    Raises :class:`ArchitectureMismatchError` when the keys are not those of ``name``.
    """
    _, widths, in_channels, found_classes = _inspect(name, state_dict, None)
    return widths, in_channels, found_classes


def model_from_state_dict(name: str, state_dict: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
    """Rebuild a ``name`` model whose shapes fit ``state_dict``, load it strictly, return it in eval mode.

    Works for any per-layer widths (e.g. a torch-pruning-pruned model's ``state_dict()``); the result
    computes exactly the same outputs as the model the state dict came from. The model is created on
    the CPU (or the current default device) and the tensors are copied into it; move it with ``.to()``.

    Raises:
        UnknownModelError: ``name`` is not registered.
        ArchitectureMismatchError: missing/unexpected keys, a classifier with a class count other than
            ``num_classes``, or tensor shapes no ``name`` model can have.
    """
    state_dict, widths, in_channels, _ = _inspect(name, state_dict, num_classes)
    try:
        model = build_model(name, num_classes, widths=widths, in_channels=in_channels)
    except ValueError as err:
        raise ArchitectureMismatchError(
            f"state dict shapes are not a valid '{name}' (inferred widths {widths}): {err}"
        ) from None
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as err:
        raise ArchitectureMismatchError(
            f"state dict tensors do not fit a '{name}' with inferred widths {widths}: {err}"
        ) from None
    return model.eval()


def model_spec(name: str, model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], num_classes: int) -> dict:
    """JSON-serialisable ``{"name", "num_classes", "in_channels", "widths"}`` of a model or state dict.

    ``build_model(**spec)`` rebuilds a model with the same tensor shapes.

    The order of ``widths`` is documented per family (see the family modules' docstrings).
    """
    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    _, widths, in_channels, _ = _inspect(name, state_dict, num_classes)
    return {"name": name, "num_classes": int(num_classes), "in_channels": in_channels, "widths": widths}


def load_model(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a checkpoint; returns ``(model in eval mode, checkpoint)``.

    The architecture comes from ``spec["name"]`` and ``spec["num_classes"]``; widths are inferred
    from the tensor shapes, so pruned checkpoints load too.
    """
    checkpoint = load_checkpoint(path, map_location=map_location)
    spec = checkpoint["spec"]
    missing = [key for key in ("name", "num_classes") if key not in spec]
    if missing:
        raise CheckpointError(f"{path}: spec lacks {missing}; cannot tell which architecture to rebuild")
    model = model_from_state_dict(spec["name"], checkpoint["state_dict"], spec["num_classes"])
    if isinstance(map_location, (str, torch.device)):
        model = model.to(map_location)
    model.eval()
    return model, checkpoint
