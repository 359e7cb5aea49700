"""One writer at a time: an exclusive OS lock (``flock``) on a lock file, naming its holder.

The holder writes ``{"pid", "host", "since"}`` into the lock file right after it locks it, so a refused process can
say who holds it. The lock goes with the process: a killed holder leaves the file behind but not the lock (the
kernel releases a ``flock`` when its file is closed), so the next run takes it without any clean-up. Used by the
data-model store (one writer per shard) and by every run (one writer per run dir, ``stages.common.run_recorded``).
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
    """Another process, or another lock of this one, holds the lock; ``holder`` says who."""

    def __init__(self, message: str, holder: str | None = None):
        super().__init__(message)
        self.holder = holder


def host() -> str:
    return socket.gethostname() or "unknown-host"


def lock_holder(fd: int) -> str:
    """Who holds the lock of the open lock file ``fd``, as it says inside (the holder writes it just after locking)."""
    text = ""
    for _ in range(20):
        try:
            text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            holder = json.loads(text)
            pid, holder_host = int(holder["pid"]), str(holder["host"])
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
            continue
        described = f"pid {pid} on host {holder_host}, since {holder.get('since', '?')}"
        if pid == os.getpid() and holder_host == host():
            described += " - this very process"
        return described
    return f"holder unknown, the lock file reads {text[:200]!r}"


def acquire(path: str | os.PathLike) -> int:
    """Lock ``path`` (created if missing) and write this process into it; returns the open file to :func:`release`.

    Raises :class:`LockHeldError` (``.holder`` set) when another lock holds it, ``LockHeldError`` without a holder
    when the filesystem cannot lock, and ``OSError`` when the file cannot be created."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = lock_holder(fd) if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else None
        os.close(fd)
        reason = f"held by {holder}" if holder else f"{err}; the filesystem must support flock"
        raise LockHeldError(f"{path}: {reason}", holder) from None
    record = json.dumps({"pid": os.getpid(), "host": host(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    try:
        os.pwrite(fd, record.encode() + b"\n", 0)
        os.ftruncate(fd, len(record) + 1)
    except OSError:
        pass  # locked all the same; a refused process then cannot name the holder
    return fd


def release(fd: int) -> None:
    """Unlock and close what :func:`acquire` returned; the file is emptied first, so nobody reads a finished holder
    as the current one."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str, advice: str) -> Iterator[Path]:
    """Hold the lock of ``path`` for the block. A lock held elsewhere raises :class:`LockHeldError`:
    "<what> is in use by pid P on host H, since T (lock file ...). <advice>"."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = acquire(path)
    except LockHeldError as err:
        if err.holder is None:
            raise LockHeldError(f"cannot lock {what} ({err})") from None
        raise LockHeldError(f"{what} is in use by {err.holder} (lock file {path}). {advice}", err.holder) from None
    try:
        yield path
    finally:
        release(fd)
