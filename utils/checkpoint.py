"""Safe checkpoints: state dict + small architecture spec, written atomically, read weights-only.

A checkpoint file holds one plain dict::

    {"state_dict": {name: Tensor}, "spec": {"name", "num_classes", "widths", ...},
     "format_version": 1, **extra}

Only tensors and plain containers (dict, list, tuple, str, int, float, bool, None) are allowed, so
``torch.load(..., weights_only=True)`` can read every checkpoint we write and refuses anything that
would need arbitrary code to unpickle (a checkpoint from a stranger must not be able to run code).
"""
from __future__ import annotations

import errno
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from utils.io import FileError, atomic_path, describe_os_error

FORMAT_VERSION = 1
_RESERVED_KEYS = ("state_dict", "spec", "format_version")
# Exact types: subclasses such as numpy.float64 (a float) pickle through numpy and would be refused.
_SCALARS = (str, int, float, bool, type(None))
_DICTS = (dict, OrderedDict)
_SEQUENCES = (list, tuple)


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class CheckpointError(RuntimeError):
    """A file exists but is not a checkpoint this code base can load safely."""


class UnreadableCheckpointError(FileError, CheckpointError):
    """``torch.load`` met an ``OSError`` reading a checkpoint (a truncated file gives ``[Errno 22] Invalid
    argument``). Both an ``OSError`` (as this error was before: same ``errno``; ``filename`` is the checkpoint) and
    a :class:`CheckpointError`, like the other damaged-file errors (code that skips an unreadable checkpoint, such
    as meta-training's resume, skips this one too)."""


# What torch.load's errors say when a checkpoint file was cut short (a killed copy, a full disk, ...).
_TRUNCATION_SIGNS = ("failed finding central directory", "failed reading zip archive", "unexpected eof",
                     "file read failed", "ran out of input")
_DELETE_AND_RERUN = "Delete it and re-run the step that wrote it (a killed copy or a full disk leaves such a file)"
# OSError numbers of a damaged file (others, e.g. EACCES, are about access, not content).
_DAMAGED_ERRNOS = (None, errno.EINVAL, errno.EIO)


def _check_plain(value: Any, where: str) -> None:
    """Raise ``TypeError`` if ``value`` holds anything ``weights_only`` loading would refuse."""
    if isinstance(value, torch.Tensor) or type(value) in _SCALARS:
        return
    if type(value).__module__.startswith("omegaconf"):
        raise TypeError(
            f"{where} is an OmegaConf container; convert it first with "
            "OmegaConf.to_container(cfg, resolve=True)"
        )
    if type(value) in _DICTS:
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in _SEQUENCES:
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]")
        return
    hint = " (save its state_dict() instead)" if isinstance(value, torch.nn.Module) else ""
    raise TypeError(
        f"{where} has type {type(value).__module__}.{type(value).__qualname__}, which a weights-only "
        f"checkpoint cannot hold{hint}; allowed: tensors, dict, list, tuple, str, int, float, bool, "
        "None (convert numpy values with .item() / .tolist())"
    )


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor],
                    spec: Mapping[str, Any], **extra: Any) -> Path:
    """Write ``{"state_dict", "spec", "format_version", **extra}`` to ``path`` atomically.

    The file is written to a temporary file in the same directory, fsync'ed, then moved over
    ``path`` with ``os.replace``: readers see either the old file or the complete new one, never a
    partial write. Parent directories are created. Returns the path.
    """
    path = Path(path)
    for key in _RESERVED_KEYS:
        if key in extra:
            raise TypeError(f"save_checkpoint: extra key {key!r} is reserved; pick another name")
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"save_checkpoint({path}): state_dict must be a mapping of tensors, got "
            f"{type(state_dict).__name__}; pass model.state_dict(), not the model"
        )
    if not isinstance(spec, Mapping):
        raise TypeError(f"save_checkpoint({path}): spec must be a dict, got {type(spec).__name__}")
    payload = {"state_dict": dict(state_dict), "spec": dict(spec), "format_version": FORMAT_VERSION}
    payload.update(extra)
    for key, value in payload.items():
        _check_plain(value, f"checkpoint {path}: {key!r}")

    # utils.io.atomic_path: temporary file, fsync, os.replace, fsync of the folder; a failure (even
    # KeyboardInterrupt) removes the temporary file and leaves the previous checkpoint untouched.
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as handle:
        torch.save(payload, handle)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`CheckpointError` if the file
    cannot be read weights-only (a pickled module or custom class, a corrupted file) or lacks the
    ``state_dict``/``spec`` entries. An ``OSError`` while reading (a truncated file) is raised again as
    :class:`UnreadableCheckpointError` (an ``OSError`` and a ``CheckpointError``) naming ``path``. Every message
    names ``path`` and says what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:  # a truncated file: [Errno 22] Invalid argument, naming no file
        if err.errno in _DAMAGED_ERRNOS:
            what = f"the file is truncated or damaged. {_DELETE_AND_RERUN}"
        else:
            what = f"make it readable, or {_DELETE_AND_RERUN[0].lower()}{_DELETE_AND_RERUN[1:]}"
        raise UnreadableCheckpointError(f"checkpoint {path} cannot be read ({describe_os_error(err)}); {what}",
                                        errno=err.errno, strerror=err.strerror, filename=path) from err
    except Exception as err:  # UnpicklingError, zip/EOF errors, ... all mean "not a safe checkpoint"
        text = _ANSI_ESCAPE.sub("", str(err)).strip()  # torch bolds parts of this message for terminals
        first_line = text.splitlines()[0] if text else type(err).__name__
        if isinstance(err, EOFError) or any(sign in text.lower() for sign in _TRUNCATION_SIGNS):
            raise CheckpointError(
                f"checkpoint {path} is truncated or damaged: torch.load failed ({type(err).__name__}: "
                f"{first_line}). {_DELETE_AND_RERUN}") from err
        raise CheckpointError(
            f"{path} is not a valid checkpoint: torch.load(weights_only=True) failed "
            f"({type(err).__name__}: {first_line}). This loader refuses to unpickle arbitrary objects "
            "(pickled modules, custom classes), so a checkpoint cannot run code; re-save the weights "
            "with utils.checkpoint.save_checkpoint(path, model.state_dict(), spec)"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "spec" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a checkpoint written by save_checkpoint: expected a dict with 'state_dict' "
            f"and 'spec', found {found}"
        )
    version = checkpoint.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version={version!r}; this code reads versions <= "
            f"{FORMAT_VERSION}. Update the code base or re-save the checkpoint"
        )
    return checkpoint


def plain_scheduler_state(scheduler: Any) -> dict:
    """``scheduler.state_dict()`` with MultiStepLR's ``Counter`` milestones (also inside a SequentialLR) as plain
    dicts, which a weights-only checkpoint can hold; :func:`load_scheduler_state` puts them back."""
    def plain(value: Any) -> Any:
        if isinstance(value, Counter):
            return {int(k): int(v) for k, v in value.items()}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value
    return plain(scheduler.state_dict())


def load_scheduler_state(scheduler: Any, state: Mapping[str, Any]) -> None:
    """Load what :func:`plain_scheduler_state` saved (milestones become ``Counter`` again: MultiStepLR indexes missing
    epochs, which a plain dict would not allow)."""
    scheduler.load_state_dict(dict(state))
    for each in [scheduler, *getattr(scheduler, "_schedulers", [])]:
        milestones = getattr(each, "milestones", None)
        if isinstance(milestones, dict) and not isinstance(milestones, Counter):
            each.milestones = Counter({int(k): int(v) for k, v in milestones.items()})
