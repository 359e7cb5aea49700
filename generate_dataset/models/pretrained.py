"""Pretrained starts (``task.pretrained``): torchvision's published weights or a local weights file, loaded into a
registered architecture with every key and shape checked, and never a network download unless asked for.

``task.pretrained`` is either

* a torchvision weights name of the task's architecture (``IMAGENET1K_V1``, ``DEFAULT``, or the qualified
  ``ResNet50_Weights.IMAGENET1K_V1``): read from ``torch.hub.get_dir()/checkpoints/<file of the weights' url>``,
  the file torchvision itself caches there (``$TORCH_HOME/hub/checkpoints/``). When it is missing it is downloaded
  only with ``download=True`` (``task.pretrained_download``); otherwise :class:`PretrainedWeightsError` names both
  ways out (put the file at that exact path, or give a local file);
* a path to a local ``.pth`` / ``.pt`` file: a plain state dict, a ``{"state_dict": ...}`` or ``{"model": ...}``
  wrapper of one, or this project's checkpoint (``utils.checkpoint``; its architecture must be the task's).

Files are read with ``torch.load(weights_only=True)``: a weights file cannot run code.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from utils.checkpoint import load_checkpoint
from utils.io import FileError, describe_os_error

from .registry import _is_optional_key

__all__ = ["PretrainedWeightsError", "WEIGHT_SUFFIXES", "is_weights_file", "resolve_pretrained",
           "pretrained_state_dict", "load_pretrained", "torchvision_weights_path"]

# File names that make ``task.pretrained`` a path rather than a torchvision weights name.
WEIGHT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".bin")
# How many mismatching keys an error lists.
_SHOWN = 8


class PretrainedWeightsError(ValueError):
    """``task.pretrained`` cannot be used: unknown name, file not there, or weights that do not fit the model."""


def is_weights_file(source: str | os.PathLike) -> bool:
    """True when ``source`` names a file (a path separator, a weights suffix, or an existing file), False for a
    torchvision weights name such as ``IMAGENET1K_V1``."""
    text = str(source)
    return (isinstance(source, os.PathLike) or os.sep in text or "/" in text or text.endswith(WEIGHT_SUFFIXES)
            or Path(text).expanduser().is_file())


def _weights_enum_member(name: str, weights: str):
    """The torchvision ``WeightsEnum`` member ``weights`` (plain or ``Class.MEMBER``) of architecture ``name``."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError:
        raise PretrainedWeightsError(
            f"task.pretrained={weights}: torchvision publishes no weights for architecture {name!r}. Give a local "
            f"weights file instead (task.pretrained=/path/to/file.pth) or task.pretrained=null for a random start"
        ) from None
    member = weights.rpartition(".")[2]
    prefix = weights.rpartition(".")[0]
    if (prefix and prefix != enum.__name__) or member not in enum.__members__:
        raise PretrainedWeightsError(
            f"task.pretrained={weights}: unknown torchvision weights for {name}; valid: "
            f"{', '.join(enum.__members__)} (or a local weights file, task.pretrained=/path/to/file.pth)")
    return enum[member]


def torchvision_weights_path(name: str, weights: str) -> Path:
    """Where torchvision caches the weights file of ``weights`` for architecture ``name``:
    ``torch.hub.get_dir()/checkpoints/<file name of the weights' url>`` (set ``$TORCH_HOME`` to move it)."""
    member = _weights_enum_member(name, weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def resolve_pretrained(name: str, source: str | os.PathLike, download: bool = False) -> Path:
    """The weights file ``source`` stands for (see the module doc), without reading it.

    A torchvision name whose file is not in the hub cache is downloaded there only when ``download``; else
    :class:`PretrainedWeightsError` says where to put the file and how to give a local one instead.
    """
    if not isinstance(source, (str, os.PathLike)) or isinstance(source, bool) or not str(source):
        raise PretrainedWeightsError(
            f"task.pretrained={source!r}: give a torchvision weights name (e.g. IMAGENET1K_V1), a path to a "
            f"weights file (.pth/.pt), or null for a random start")
    if is_weights_file(source):
        path = Path(source).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(
                f"task.pretrained={source}: no such file. Give an existing weights file (.pth/.pt: a state dict or "
                f"a checkpoint of this project), a torchvision weights name such as IMAGENET1K_V1, or null")
        return path.resolve()
    weights = str(source)
    path = torchvision_weights_path(name, weights)
    if path.is_file():
        return path
    url = _weights_enum_member(name, weights).url
    if not download:
        raise PretrainedWeightsError(
            f"task.pretrained={weights}: the torchvision weights file for {name} is not in the torch hub cache and "
            f"downloading is off (task.pretrained_download=false). Either put the file {url} at exactly {path} "
            f"(the cache is torch.hub.get_dir()/checkpoints; set TORCH_HOME to move it), or give the file itself "
            f"with task.pretrained=/path/to/file.pth. (task.pretrained_download=true downloads it there.)")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(path), progress=True)
    return path


def _unwrap(loaded: Any, path: Path, name: str) -> Mapping[str, torch.Tensor]:
    """The state dict inside a loaded weights file (plain, ``{"state_dict"}`` / ``{"model"}`` wrapped, or a
    project checkpoint whose architecture must be ``name``)."""
    if isinstance(loaded, Mapping) and "spec" in loaded and "state_dict" in loaded:
        spec_name = loaded["spec"].get("name") if isinstance(loaded["spec"], Mapping) else None
        if spec_name not in (None, name):
            raise PretrainedWeightsError(
                f"task.pretrained={path} is a checkpoint of architecture {spec_name!r}, but the task's model is "
                f"{name!r}; give weights of a {name} (or change task.model)")
        return load_checkpoint(path, map_location="cpu")["state_dict"]  # format checks of utils.checkpoint
    for key in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        found = sorted(map(str, loaded))[:_SHOWN] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise PretrainedWeightsError(
            f"task.pretrained={path} holds no state dict (found {found}); save model.state_dict() with torch.save")
    return strip_wrapper_prefix(loaded)


def strip_wrapper_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` without a ``module.`` prefix on every key (a DataParallel / DistributedDataParallel save),
    else unchanged."""
    if state_dict and all(str(k).startswith("module.") for k in state_dict):
        return {str(k)[len("module."):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def pretrained_state_dict(path: str | os.PathLike, name: str) -> Mapping[str, torch.Tensor]:
    """The state dict stored in weights file ``path`` (read weights-only, on the CPU)."""
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except OSError as err:  # a truncated file gives a bare "[Errno 22] Invalid argument" that names nothing
        raise FileError(f"task.pretrained={path} cannot be read ({describe_os_error(err)}); the file is truncated "
                        "or damaged: download or copy it again", errno=err.errno, strerror=err.strerror,
                        filename=path) from err
    except Exception as err:  # UnpicklingError, zip errors: not a safe weights file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PretrainedWeightsError(
            f"task.pretrained={path} cannot be read as weights (torch.load(weights_only=True): {first}); save the "
            f"weights with torch.save(model.state_dict(), path)") from err
    return _unwrap(loaded, path, name)


def _check_fits(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, name: str) -> None:
    """Raise :class:`PretrainedWeightsError` naming every missing / unexpected / wrongly shaped key (first few)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not _is_optional_key(k)]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
              for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, keys in (("wrong shapes", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
        if keys:
            more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
            parts.append(f"{len(keys)} {label} ({'; '.join(keys[:_SHOWN])}{more})")
    raise PretrainedWeightsError(
        f"task.pretrained={source} does not fit the task's {name} (num_classes / input channels / widths must be "
        f"those of the task): {', '.join(parts)}")


def load_pretrained(model: nn.Module, name: str, source: str | os.PathLike, download: bool = False) -> Path:
    """Load ``task.pretrained=source`` into ``model`` (a registered ``name`` architecture) after checking every key
    and shape; returns the weights file used. See the module doc for what ``source`` may be."""
    path = resolve_pretrained(name, source, download=download)
    state_dict = pretrained_state_dict(path, name)
    canonical = getattr(model, "canonical_state_dict", None)
    if canonical is not None:  # e.g. torchvision's legacy ViT MLP key names
        state_dict = canonical(state_dict)
    _check_fits(model, state_dict, str(source), name)
    # strict=False only forgives what _check_fits allows: a missing num_batches_tracked (BatchNorm fills it in)
    model.load_state_dict(dict(state_dict), strict=False)
    return path
