"""File output shared by every stage: THE atomic file write, JSON results, and reading "nothing" from a config.

Atomic write: the content goes to a temporary file next to the target (``.<name>.<host>.<pid>.tmp``: hidden,
unique per writing process, recognisable as a leftover if that process dies) and is renamed over the target
with ``os.replace``, so a reader sees the old file or the complete new one, never a partial write. On any
failure (KeyboardInterrupt included) the temporary file is removed and the old file is left as it was.
``durable=True`` also fsyncs the file before the rename and its folder after it (checkpoints, the data-model
store: the rename itself survives a power cut).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

# What a config value that means "nothing" looks like once it has been through a command line or a YAML file.
NULL_STRINGS = ("", "null", "None")


def is_null(value: Any) -> bool:
    """True for None and for the strings a command line or YAML gives for "nothing" (``""``, ``null``, ``None``)."""
    return value is None or str(value).strip() in NULL_STRINGS


def temporary_path(path: str | os.PathLike) -> Path:
    """``<folder>/.<name>.<host>.<pid>.tmp``: where :func:`atomic_path` writes before renaming."""
    path = Path(path)
    host = socket.gethostname() or "unknown-host"
    return path.with_name(f".{path.name}.{host}.{os.getpid()}.tmp")


def fsync_dir(directory: str | os.PathLike) -> None:
    """Persist a rename inside ``directory`` (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` completely (a loop over partial writes); the one low-level write of
    :func:`atomic_write` (tests replace it to simulate a full disk)."""
    view = memoryview(data)
    with open(path, "wb", buffering=0) as handle:
        while view:
            written = handle.write(view)
            view = view[written:]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, durable: bool = False) -> Iterator[Path]:
    """Yield the temporary path to write to; when the block succeeds it is renamed over ``path``.

    The parent folder is created. ``durable``: fsync the written file before the rename and the folder after.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure: nothing half-written is left behind
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, durable: bool = False) -> Path:
    """Write ``data`` (text is UTF-8 encoded) to ``path`` atomically (module docstring); returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, durable=durable) as tmp:
        write_bytes(tmp, payload)
    return Path(path)


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as indented JSON (one trailing newline), written atomically; returns ``path``."""
    return atomic_write(path, json.dumps(payload, indent=2) + "\n")
