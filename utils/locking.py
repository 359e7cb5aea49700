"""One writer at a time: an exclusive OS lock (``flock``) on a lock file, naming its holder.

The holder writes ``{"pid", "host", "since"}`` into the lock file right after it locks it, so a refused process can
say who holds it. The lock goes with the process: a killed holder leaves the file behind but not the lock (the
kernel releases a ``flock`` when its file is closed), so the next run takes it without any clean-up.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator


class LockHeldError(RuntimeError):
    """Another process (named in the message) holds the lock."""


def _host() -> str:
    return socket.gethostname() or "unknown-host"


def lock_holder(fd: int) -> str:
    """Who holds the lock of the open lock file ``fd``, as it says inside (the holder writes it just after locking)."""
    text = ""
    for _ in range(20):
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            holder = json.loads(text)
            pid, host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
            continue
        described = f"pid {pid} on host {host}, since {holder.get('since', '?')}"
        if pid == os.getpid() and host == _host():
            described += " - this very process"
        return described
    return f"holder unknown, the lock file reads {text[:200]!r}"


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, advice: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block. A lock another process holds raises
    :class:`LockHeldError`: "<what> is in use by pid P on host H, since T (lock file ...). <advice>"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = lock_holder(fd) if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        os.close(fd)
        if holder is None:
            raise LockHeldError(f"cannot lock {what} ({path}: {err}); the filesystem must support flock") from None
        raise LockHeldError(f"{what} is in use by {holder} (lock file {path}). {advice}") from None
    record = json.dumps({"pid": os.getpid(), "host": _host(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        os.pwrite(fd, record.encode() + b"\n", 0)
        os.ftruncate(fd, len(record) + 1)
    except OSError:
        pass  # locked all the same; a refused process then cannot name the holder
    try:
        yield path
    finally:
        try:
            os.ftruncate(fd, 0)  # still locked: nobody reads a finished holder as the current one
        except OSError:
            pass
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
