"""File output shared by every stage: THE atomic file write, JSON results, and reading "nothing" from a config.

Atomic write: the content goes to a temporary file next to the target (``.<name>.<host>.<pid>.tmp``: hidden,
unique per writing process, recognisable as a leftover if that process dies) and is renamed over the target
with ``os.replace``, so a reader sees the old file or the complete new one, never a partial write. On any
failure (KeyboardInterrupt included) the temporary file is removed and the old file is left as it was.
``durable=True`` also fsyncs the file before the rename and its folder after it (checkpoints, the data-model
store: the rename itself survives a power cut). An ``OSError`` on the way (disk full, no permission, ...) is
raised again as a :class:`FileError` (an ``OSError``: callers that catch ``OSError`` still do) that names the
target file and says what to do.
"""
from __future__ import annotations

import contextlib
import hashlib
import errno as errno_codes
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator

DISK_FULL_ERRNOS = (errno_codes.ENOSPC, errno_codes.EDQUOT)


class FileError(OSError):
    """An ``OSError`` whose message names the file concerned and says what to do.

    ``errno``, ``strerror`` and ``filename`` are set as for the ``OSError`` it replaces (``filename``: the file
    concerned, not a temporary file), so code that checks ``err.errno`` keeps working; ``str(err)`` is the
    message alone. ``FileError(message)`` with one argument works too (the DataLoader rebuilds a worker's
    exception that way)."""

    def __init__(self, message: str, *, errno: int | None = None, strerror: str | None = None,
                 filename: str | os.PathLike | None = None):
        super().__init__(message)
        self.errno, self.strerror = errno, strerror
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()

    def __reduce__(self):  # pickles with its message and the OSError attributes
        return (type(self), (str(self),), {"errno": self.errno, "strerror": self.strerror, "filename": self.filename})


def is_disk_full(err: BaseException) -> bool:
    """True for an ``OSError`` that says the disk (or the user's quota) is full."""
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def describe_os_error(err: BaseException) -> str:
    """``OSError: [Errno 28] No space left on device``: the class and what went wrong, without the file names an
    ``OSError`` adds to its text (the caller names the file); a :class:`FileError`'s own message as it is."""
    if isinstance(err, FileError):
        return str(err)
    if isinstance(err, OSError) and err.errno is not None and err.strerror:
        return f"{type(err).__name__}: [Errno {err.errno}] {err.strerror}"
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def write_error(path: str | os.PathLike, err: OSError) -> FileError:
    """The error to raise when writing ``path`` (atomically) failed with ``err``: names ``path`` and says what
    to do; the previous file is unchanged (an atomic write leaves it so)."""
    path = Path(path)
    if isinstance(err, FileError):
        return err
    kept = f"The previous {path.name} (if there was one) is unchanged and no temporary file was left behind."
    if is_disk_full(err):
        message = (f"cannot write {path}: the disk is full ({describe_os_error(err)}). Free space on the disk "
                   f"that holds {path.parent} (or write elsewhere), then re-run. {kept}")
    else:
        message = f"cannot write {path} ({describe_os_error(err)}). {kept}"
    return FileError(message, errno=err.errno, strerror=err.strerror, filename=path)


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
    An ``OSError`` raised here or inside the block is raised again as :func:`write_error` (a :class:`FileError`
    naming ``path``, with the same ``errno``); other exceptions pass unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(path, err) from err
    tmp = temporary_path(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from err
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


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
