"""The data-model store: trained (init-pruned) networks that meta-training learns from, in HDF5 files.

Layout of a store folder::

    DIR/shard_0000/shard.json          identity of shard 0: task, architecture, class count, method
    DIR/shard_0000/model_000000.h5     one data model per HDF5 file, named by its position in the shard
    DIR/shard_0000/model_000001.h5     ...
    DIR/shard_0000.lock                the lock of shard 0's writer (pid and host of the holder inside)
    DIR/shard_0001/...                 written only by generator shard 1

All shard folders in the store folder together are the store: there is no merge step. A model file
holds the state dict (one dataset per tensor, under ``state_dict/``) and attributes: the shard
identity, its position, architecture spec, metrics, achieved speed-up, seed, the resolved config (JSON)
and SHA-256 checksums of every tensor and of the whole model, checked on every read.

One writer per shard: :class:`ShardWriter` holds an exclusive ``flock`` on ``shard_XXXX.lock`` for its
lifetime (the OS releases it when the process dies, even by SIGKILL); a second writer is refused up
front with the holder's pid and host. Appending writes only the new model: the HDF5 image is built in
memory, written to a temporary file named after the writer's host and pid, fsynced and atomically
renamed to ``model_XXXXXX.h5``. A SIGKILL at any moment loses at most the model being written, and
earlier model files are never touched again. If the write fails (disk full, ...), the temporary file is
removed, the model is saved with ``torch.save`` to the caller's ``rescue_dir`` and a :class:`StoreError`
names the store, the space needed and the rescue file.

The old layout (format 1: one HDF5 file ``DIR/shard_XXXX.h5`` holding every data model of a shard, no
checksums) is still read. A writer for such a shard converts it to the folder layout first.

Positions of a shard run from 0 without gaps (the generator fills them in order). A model file missing from
the middle of a shard (deleted by hand, lost in a copy) is an error when the store is opened, naming the file:
the data models after it would otherwise shift to other indices. Re-running the generator for that shard with
its original settings fills the gap (it skips stored positions and makes the missing one with the same seed).
A file missing at the end of a shard looks like an unfinished shard and cannot be told apart.

``verify_store(path)`` (or ``python -m data_loaders.store PATH``) reads and checks every data model and lists
the missing ones.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np
import torch

from generate_dataset.models import model_from_state_dict
from utils import locking
from utils.io import FileError, atomic_path, atomic_write, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: one HDF5 file per shard (read, and converted by writers); 2: one file per data model
SHARD_DIR_PATTERN = re.compile(r"^shard_(\d+)$")
LEGACY_SHARD_PATTERN = re.compile(r"^shard_(\d+)\.h5$")
MODEL_PATTERN = re.compile(r"^model_(\d+)\.h5$")
SHARD_META = "shard.json"
# Attributes that must agree across the shards of one store.
IDENTITY_KEYS = ("task", "architecture", "num_classes", "method")
RESCUE_FORMAT = "meta-pruning rescued data model 1"
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


class StoreError(RuntimeError):
    """A problem with the data-model store that the user must fix (names the file)."""


@dataclass
class DataModelRecord:
    """One stored data model. ``state_dict`` is on the CPU; ``spec`` rebuilds the architecture.

    ``shard`` names the shard (``shard_0000``, or ``shard_0000.h5`` in the old layout), ``position`` the
    data model inside it."""

    state_dict: dict[str, torch.Tensor]
    spec: dict[str, Any]
    metrics: dict[str, float]
    speed_up: float
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    shard: str = ""
    position: int = -1

    def build_model(self) -> torch.nn.Module:
        """The network itself, in eval mode, with exactly the stored weights."""
        return model_from_state_dict(self.spec["name"], self.state_dict, self.spec["num_classes"])


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------
def shard_path(store_dir: str | os.PathLike, index: int) -> Path:
    """The folder of shard ``index``."""
    return Path(store_dir) / f"shard_{int(index):04d}"


def legacy_shard_path(store_dir: str | os.PathLike, index: int) -> Path:
    """The single file of shard ``index`` in the old layout (format 1)."""
    return Path(store_dir) / f"shard_{int(index):04d}.h5"


def lock_path(store_dir: str | os.PathLike, index: int) -> Path:
    return Path(store_dir) / f"shard_{int(index):04d}.lock"


def model_path(store_dir: str | os.PathLike, index: int, position: int) -> Path:
    return shard_path(store_dir, index) / f"model_{int(position):06d}.h5"


def rescue_path(rescue_dir: str | os.PathLike, index: int, position: int) -> Path:
    """Where :meth:`ShardWriter.append` saves a model it could not store."""
    return Path(rescue_dir) / f"rescued_shard_{int(index):04d}_model_{int(position):06d}.pt"


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _why(err: BaseException) -> str:
    """An error for a message in parentheses: a FileError's own text (it names its file and the OS error),
    else ``Class: text``."""
    return str(err) if isinstance(err, FileError) else f"{err.__class__.__name__}: {err}"


def _is_disk_full(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL:
            return True
        text = str(err)
        if "No space left on device" in text or "Disk quota exceeded" in text or "errno = 28," in text:
            return True
        err = err.__cause__ or err.__context__
    return False


# ----------------------------------------------------------------------------------------------
# One data model <-> one HDF5 file image
# ----------------------------------------------------------------------------------------------
def _as_array(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    tensor = tensor.detach().cpu().contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: store the bits
        return tensor.view(torch.int16).numpy(), dtype
    return tensor.numpy(), dtype


def _as_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(array))
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    if str(tensor.dtype).removeprefix("torch.") != dtype:
        raise ValueError(f"tensor stored as {dtype} reads back as {tensor.dtype}")
    return tensor


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _model_digest(attrs: Mapping[str, Any], tensors: Sequence[Sequence[Any]]) -> str:
    """Checksum of a whole data model: its metadata attributes and the (name, dtype, shape, SHA-256)
    of every tensor, in state-dict order."""
    described = {"attrs": {k: attrs[k] for k in sorted(attrs)}, "tensors": [list(t) for t in tensors]}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _metadata(identity: Mapping[str, Any], position: int, spec: Mapping[str, Any], metrics: Mapping[str, float],
              speed_up: float, seed: int, config: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        **{k: identity[k] for k in IDENTITY_KEYS},
        "position": int(position),
        "spec": json.dumps(dict(spec)),
        "metrics": json.dumps({k: float(v) for k, v in metrics.items()}),
        "speed_up": float(speed_up),
        "seed": int(seed),
        "config": json.dumps(dict(config), default=str),
    }


def _model_image(metadata: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """The HDF5 file of one data model, built in memory (so that HDF5 itself never meets a full disk)."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for key, value in metadata.items():
            f.attrs[key] = value
        group = f.create_group("state_dict")
        described = []
        for order, (key, tensor) in enumerate(state_dict.items()):
            array, dtype = _as_array(tensor)
            digest = _sha256(array)
            data = group.create_dataset(key, data=array)
            data.attrs["order"] = order  # HDF5 lists names alphabetically; keep the state-dict order
            data.attrs["dtype"] = dtype
            data.attrs["sha256"] = digest
            described.append((key, dtype, list(array.shape), digest))
        f.attrs["sha256"] = _model_digest(metadata, described)
    return buffer.getvalue()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


def _read_model_file(path: Path, shard: Path, position: int, identity: Mapping[str, Any] | None) -> DataModelRecord:
    """Read one data model and check its checksums; a StoreError names the shard, position and file."""
    where = f"data model at position {position} of shard {shard} (file {path})"
    advice = (f"Delete that file and re-run the generator for this shard index; it regenerates only the "
              f"missing data model.")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _plain(v) for k, v in f.attrs.items()}
            items = sorted(f["state_dict"].items(), key=lambda item: int(item[1].attrs["order"]))
            tensors = [(key, np.array(data[()]), _plain(data.attrs["dtype"]), _plain(data.attrs["sha256"]))
                       for key, data in items]
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise StoreError(f"{where} cannot be read ({err.__class__.__name__}: {err}); the file is corrupt or "
                         f"truncated. {advice}") from None
    if "format_version" not in attrs:
        raise StoreError(f"{where} is not a data-model file (no format_version attribute). {advice}")
    if int(attrs["format_version"]) > FORMAT_VERSION:
        raise StoreError(f"{where} was written by a newer version of this code (format {attrs['format_version']} "
                         f"> {FORMAT_VERSION}); upgrade to read it")
    for key, array, dtype, stored in tensors:
        if _sha256(array) != stored:
            raise StoreError(f"{where} is corrupt: tensor {key!r} does not match its SHA-256 checksum. {advice}")
    stored_digest = attrs.pop("sha256", None)
    described = [(key, dtype, list(array.shape), digest) for key, array, dtype, digest in tensors]
    if stored_digest != _model_digest(attrs, described):
        raise StoreError(f"{where} is corrupt: its metadata or tensor list does not match the model's SHA-256 "
                         f"checksum. {advice}")
    if int(attrs.get("position", -1)) != position:
        raise StoreError(f"{where} holds the data model of position {attrs.get('position')}; model files must "
                         f"not be renamed")
    if identity is not None:
        check_identity(path, {k: attrs.get(k) for k in IDENTITY_KEYS}, identity)
    try:
        state_dict = {key: _as_tensor(array, dtype) for key, array, dtype, _ in tensors}
        return DataModelRecord(state_dict=state_dict, spec=json.loads(attrs["spec"]),
                               metrics=json.loads(attrs["metrics"]), speed_up=float(attrs["speed_up"]),
                               seed=int(attrs["seed"]), config=json.loads(attrs["config"]), shard=shard.name,
                               position=position)
    except (KeyError, ValueError, TypeError) as err:
        raise StoreError(f"{where} is corrupt ({err.__class__.__name__}: {err}). {advice}") from None


# ----------------------------------------------------------------------------------------------
# Shard identity
# ----------------------------------------------------------------------------------------------
def _wrap_h5_error(path: Path, err: Exception) -> StoreError:
    return StoreError(
        f"data-model shard {path} cannot be read ({err.__class__.__name__}: {err}); the file is corrupt or "
        f"truncated. Delete it and re-run the generator for that shard index to regenerate it."
    )


def read_identity(path: Path) -> dict[str, Any]:
    """Identity of a shard: from ``shard.json`` of a shard folder, or the attributes of an old shard file."""
    path = Path(path)
    if path.is_dir():
        return _read_shard_meta(path)
    try:
        with h5py.File(path, "r") as f:
            if "format_version" not in f.attrs:
                raise StoreError(f"{path} is not a data-model shard (no format_version attribute)")
            if int(f.attrs["format_version"]) > 1:
                raise StoreError(f"{path} was written by a newer version of this code (format "
                                 f"{int(f.attrs['format_version'])} in a single shard file); upgrade to read it")
            return {k: _plain(f.attrs[k]) for k in IDENTITY_KEYS}
    except (OSError, KeyError) as err:
        raise _wrap_h5_error(path, err) from None


def _read_shard_meta(folder: Path) -> dict[str, Any]:
    meta = folder / SHARD_META
    try:
        content = json.loads(meta.read_text())
        version = int(content["format_version"])
        identity = {k: content["identity"][k] for k in IDENTITY_KEYS}
    except FileNotFoundError:
        raise StoreError(f"data-model shard {folder} has no {SHARD_META}; it is not a shard folder of this "
                         f"store, or it was damaged") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"data-model shard {folder} has an unreadable {meta.name} ({err.__class__.__name__}: "
                         f"{err}); the file is corrupt") from None
    if version > FORMAT_VERSION:
        raise StoreError(f"data-model shard {folder} was written by a newer version of this code (format "
                         f"{version} > {FORMAT_VERSION}); upgrade to read it")
    return identity


def check_identity(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    diff = {k: (found.get(k), expected[k]) for k in expected if expected[k] is not None and found.get(k) != expected[k]}
    if diff:
        details = ", ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
        raise StoreError(f"data-model shard {path} was made for another task/architecture ({details}). "
                         f"Use a separate store folder per task and method.")


def _model_positions(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := MODEL_PATTERN.match(p.name)))


# ----------------------------------------------------------------------------------------------
# The old layout (format 1): one HDF5 file per shard
# ----------------------------------------------------------------------------------------------
def _read_index(path: Path) -> list[tuple[int, str]]:
    """(position, group name) of every complete data model in an old-layout shard file."""
    try:
        with h5py.File(path, "r") as f:
            models = f.get("models")
            if models is None:
                return []
            return sorted((int(name), name) for name, group in models.items() if group.attrs.get("complete", False))
    except (OSError, KeyError, ValueError) as err:
        raise _wrap_h5_error(path, err) from None


def _read_legacy_model(path: Path, name: str) -> DataModelRecord:
    try:
        with h5py.File(path, "r") as f:
            group = f["models"][name]
            datasets = sorted(group["state_dict"].items(), key=lambda item: int(item[1].attrs["order"]))
            state_dict = {key: torch.from_numpy(np.array(data[()])) for key, data in datasets}
            attrs = {k: _plain(v) for k, v in group.attrs.items()}
        return DataModelRecord(state_dict=state_dict, spec=json.loads(attrs["spec"]),
                               metrics=json.loads(attrs["metrics"]), speed_up=float(attrs["speed_up"]),
                               seed=int(attrs["seed"]), config=json.loads(attrs["config"]), shard=path.name,
                               position=int(name))
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise StoreError(f"data model at position {int(name)} of shard {path} cannot be read "
                         f"({err.__class__.__name__}: {err}); the file is corrupt or truncated. Delete it and "
                         f"re-run the generator for that shard index to regenerate it.") from None


# ----------------------------------------------------------------------------------------------
# Rescue files: a model that could not be stored
# ----------------------------------------------------------------------------------------------
def save_rescue(path: Path, payload: Mapping[str, Any]) -> Path:
    """``torch.save`` a data model that could not be stored (atomically: temporary file, then rename)."""
    path = Path(path)
    with atomic_path(path, durable=True) as tmp:
        torch.save(dict(payload), tmp)
    return path


def load_rescued(path: str | os.PathLike) -> dict[str, Any]:
    """A rescued data model: ``identity, index, position, state_dict, spec, metrics, speed_up, seed, config``
    (loaded with ``weights_only=True``)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file cannot be used
        raise StoreError(f"rescued data model {path} cannot be read ({err.__class__.__name__}: {err}); delete it "
                         f"and re-run the generator to retrain that data model") from None
    if not isinstance(payload, dict) or payload.get("format") != RESCUE_FORMAT:
        raise StoreError(f"{path} is not a rescued data model")
    return payload


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
class ShardWriter:
    """The only writer of one shard while it lives: holds the shard's lock, appends data models.

    Use it as a context manager or call :meth:`close` (the lock is released then, or when the process
    ends). A second writer of the same shard, in this process or another, gets a :class:`StoreError`
    naming the holder.
    """

    def __init__(self, store_dir: str | os.PathLike, index: int, identity: Mapping[str, Any]):
        missing = [k for k in IDENTITY_KEYS if k not in identity]
        if missing:
            raise ValueError(f"shard identity lacks {missing}")
        self._lock_fd: int | None = None
        self.store_dir = Path(store_dir)
        self.index = int(index)
        self.path = shard_path(store_dir, index)
        self.lock_path = lock_path(store_dir, index)
        self.identity = {k: _plain(identity[k]) for k in IDENTITY_KEYS}
        if self.store_dir.is_file():
            raise StoreError(f"data-model store {self.store_dir} is a file, not a store folder")
        try:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreError(f"cannot create data-model store {self.store_dir} "
                             f"({err.__class__.__name__}: {err})") from None
        self._acquire_lock()
        try:
            self._remove_stale_temporaries()
            self._open_shard()
        except BaseException:
            self.close()
            raise

    # -- lock --------------------------------------------------------------------------------------
    def _acquire_lock(self) -> None:
        try:
            fd = locking.acquire(self.lock_path)
        except OSError as err:
            raise StoreError(f"cannot write to data-model store {self.store_dir}: lock file {self.lock_path} "
                             f"cannot be created ({err.__class__.__name__}: {err})") from None
        except locking.LockHeldError as err:
            if err.holder is None:
                raise StoreError(f"cannot lock shard {self.index} of data-model store {self.store_dir} ({err})") from None
            hint = ": close() the other ShardWriter of this shard first" if err.holder.endswith("this very process") else ""
            raise StoreError(f"shard {self.index} of data-model store {self.store_dir} is being written by another "
                             f"writer ({err.holder}{hint}; lock file {self.lock_path}). A shard has one writer at a "
                             "time: wait for that one to finish, or give this run another shard index.") from None
        self._lock_fd = fd
        self._lock_inode = os.fstat(fd).st_ino

    def _check_lock(self) -> None:
        if self._lock_fd is None:
            raise StoreError(f"the writer of {self.path} is closed")
        try:
            same = os.stat(self.lock_path).st_ino == self._lock_inode
        except OSError:
            same = False
        if not same:
            raise StoreError(f"lock file {self.lock_path} was deleted or replaced while this writer held it; another "
                             f"writer may have taken shard {self.index}. Stopping; re-run to resume the shard.")

    def close(self) -> None:
        """Release the shard's lock (idempotent)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            locking.release(fd)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- shard folder --------------------------------------------------------------------------------
    def _remove_stale_temporaries(self) -> None:
        """Temporary files in the shard folder belong to a writer that died (we hold the lock)."""
        if self.path.is_dir():
            for stale in self.path.iterdir():
                if stale.name.startswith(".") and stale.name.endswith(".tmp"):
                    log.info("removing %s, left by a killed writer of shard %d", stale, self.index)
                    stale.unlink(missing_ok=True)

    def _open_shard(self) -> None:
        legacy = legacy_shard_path(self.store_dir, self.index)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"{self.path} is a file; shard {self.index} must be a folder")
        has_meta = (self.path / SHARD_META).exists()
        if has_meta:
            check_identity(self.path, _read_shard_meta(self.path), self.identity)
        if legacy.is_file():
            check_identity(legacy, read_identity(legacy), self.identity)
        if not has_meta:
            content = {"format_version": FORMAT_VERSION, "identity": self.identity}
            try:
                self.path.mkdir(exist_ok=True)
                atomic_write(self.path / SHARD_META, json.dumps(content, indent=1) + "\n", durable=True)
            except OSError as err:
                full = " (the disk is full)" if _is_disk_full(err) else ""
                raise StoreError(f"cannot write shard {self.index} of data-model store {self.store_dir}{full} "
                                 f"({err.__class__.__name__}: {err})") from None
            fsync_dir(self.store_dir)  # the new shard folder itself
        if legacy.is_file():
            self._convert_legacy(legacy)

    def _convert_legacy(self, legacy: Path) -> None:
        """Copy every data model of an old single-file shard into the shard folder, then delete the file.

        Each copy is published like an append; a crash leaves both, and readers and the next writer take
        each position from the folder first."""
        done = set(self.completed_positions())
        for position, name in _read_index(legacy):
            if position not in done:
                r = _read_legacy_model(legacy, name)
                self._publish(position, r.state_dict, r.spec, r.metrics, r.speed_up, r.seed, r.config, None)
        os.remove(legacy)
        fsync_dir(self.store_dir)
        log.info("converted old-layout shard %s to the folder %s", legacy, self.path)

    # -- appending ----------------------------------------------------------------------------------
    def completed_positions(self) -> set[int]:
        """Positions already stored in this shard (a re-run skips them)."""
        return set(_model_positions(self.path))

    def stored(self, position: int) -> DataModelRecord:
        """The data model stored at ``position`` (checksum verified), e.g. to compare its recipe and seed."""
        return _read_model_file(self.path / f"model_{int(position):06d}.h5", self.path, int(position), self.identity)

    def append(self, position: int, state_dict: Mapping[str, torch.Tensor], spec: Mapping[str, Any],
               metrics: Mapping[str, float], speed_up: float, seed: int, config: Mapping[str, Any],
               rescue_dir: str | os.PathLike | None = None) -> Path:
        """Publish one data model as its own file; it becomes visible only after the atomic rename.

        If that fails, the model is saved to ``rescue_path(rescue_dir, index, position)`` (when
        ``rescue_dir`` is given) and a :class:`StoreError` says why and where it went. Returns the
        model's file."""
        self._check_lock()
        if model_path(self.store_dir, self.index, position).exists():
            raise StoreError(f"{self.path} already holds data model {position}; refusing to duplicate it")
        return self._publish(position, state_dict, spec, metrics, speed_up, seed, config, rescue_dir)

    def _publish(self, position: int, state_dict: Mapping[str, torch.Tensor], spec: Mapping[str, Any],
                 metrics: Mapping[str, float], speed_up: float, seed: int, config: Mapping[str, Any],
                 rescue_dir: str | os.PathLike | None) -> Path:
        final = model_path(self.store_dir, self.index, position)
        needed = sum(t.numel() * t.element_size() for t in state_dict.values())
        try:
            image = _model_image(_metadata(self.identity, position, spec, metrics, speed_up, seed, config),
                                 state_dict)
            needed = len(image)
            atomic_write(final, image, durable=True)  # a failure leaves no temporary file behind
        except Exception as err:
            rescue = self._rescue(rescue_dir, position, state_dict, spec, metrics, speed_up, seed, config)
            if _is_disk_full(err):
                try:
                    free = shutil.disk_usage(self.path).free
                except OSError:
                    free = None
                raise StoreError(f"data-model store {self.store_dir} is full: data model {position} of shard "
                                 f"{self.index} needs {_size(needed)} of free space (its tensors and metadata) in "
                                 f"{self.path}, {_size(free)} is free ({_why(err)}). "
                                 f"Nothing of it was written to the store. {rescue}".rstrip()) from err
            if isinstance(err, (OSError, RuntimeError)):
                raise StoreError(f"data-model store {self.store_dir}: cannot write data model {position} of shard "
                                 f"{self.index} to {final} ({_why(err)}). {rescue}".rstrip()) from err
            if rescue:
                err.add_note(rescue)
            raise
        return final

    def _rescue(self, rescue_dir: str | os.PathLike | None, position: int, state_dict: Mapping[str, torch.Tensor],
                spec: Mapping[str, Any], metrics: Mapping[str, float], speed_up: float, seed: int,
                config: Mapping[str, Any]) -> str:
        """Save a model that could not be stored; returns the sentence for the error message."""
        if rescue_dir is None:
            return ""
        path = rescue_path(rescue_dir, self.index, position)
        payload = {"format": RESCUE_FORMAT, "store": str(self.store_dir), "index": self.index,
                   "position": int(position), "identity": dict(self.identity),
                   "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "spec": dict(spec),
                   "metrics": {k: float(v) for k, v in metrics.items()}, "speed_up": float(speed_up),
                   "seed": int(seed), "config": json.loads(json.dumps(dict(config), default=str))}
        try:
            save_rescue(path, payload)
        except Exception as err:  # noqa: BLE001 - report, the original error is raised
            return f"Saving the model to {path} failed as well ({err.__class__.__name__}: {err}); it is lost."
        return (f"The trained model was saved to {path}; re-running the same generator command in the run dir "
                f"that holds it (hydra.run.dir=...) stores it without retraining.")


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    shard: Path  # shard folder, or old-layout shard file
    position: int
    legacy_name: str | None  # group name inside an old-layout shard file
    identity: Mapping[str, Any]


_SHOWN_MISSING = 5  # missing files named per shard (the rest are counted)


def _ranges(positions: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    parts, start = [], None
    for i, p in enumerate(positions):
        start = p if start is None else start
        if i + 1 == len(positions) or positions[i + 1] != p + 1:
            parts.append(str(p) if p == start else f"{start}-{p}")
            start = None
    return ", ".join(parts)


def _stored_config(entry: _Entry) -> dict[str, Any]:
    """The resolved generator config stored with a data model (attributes only, no tensors); {} if unreadable."""
    try:
        with h5py.File(entry.shard if entry.legacy_name else entry.shard / f"model_{entry.position:06d}.h5", "r") as f:
            attrs = f["models"][entry.legacy_name].attrs if entry.legacy_name else f.attrs
            config = json.loads(_plain(attrs["config"]))
    except Exception:  # noqa: BLE001 - only a hint for the message; the read itself reports damage
        return {}
    return config if isinstance(config, dict) else {}


def _generator_advice(store: Path, index: int, last: int, present: Mapping[int, _Entry]) -> str:
    """How to regenerate the missing data models of shard ``index``: stages/generate.py skips the positions a
    shard holds and makes every other position below ``num`` (seeded by seed, index and position), so a re-run
    with the original settings fills a gap in the middle."""
    config = _stored_config(present[min(present)])
    task = config.get("task", {}).get("name") if isinstance(config.get("task"), dict) else None
    method = config.get("method", {}).get("name") if isinstance(config.get("method"), dict) else None
    num = config.get("num")
    num = max(int(num), last + 1) if isinstance(num, int) else None
    if task and num is not None and "seed" in config:
        command = (f"python generate_dataset/generate.py task={task}" + (f" method={method}" if method else "")
                   + f" num={num} index={index} seed={config['seed']}"
                   + (" no_init_pruning=true" if config.get("no_init_pruning") else "") + f" store={store}")
        settings = ("plus any other override that run used: the stored data models record its settings, and the "
                    "generator refuses (and names) a recipe setting that differs")
    else:
        command = f"python generate_dataset/generate.py task=... num={last + 1} (or more) index={index} store={store}"
        settings = ("with the task, method, seed and every other override of the run that made this shard: the "
                    "generator refuses (and names) a recipe setting that differs")
    return (f"re-run the generator for shard {index}, {command} ({settings}). It keeps the stored data models "
            f"and trains only the missing position(s), each with the seed it had. Do not rename the later model "
            f"files to close the gap: each file records its position.")


class DataModelStore(Sequence[DataModelRecord]):
    """Read access to a store folder: ``len(store)``, ``store[i]`` -> :class:`DataModelRecord`.

    Data models are ordered by (shard index, position), so the order does not depend on which shard
    finished first. ``expect`` (e.g. ``{"task": ..., "architecture": ...}``) rejects a shard made for
    another task. Every read checks the data model's checksums; :meth:`verify` checks all of them.

    A shard whose positions have a gap (a model file missing before the shard's last one) is a
    :class:`StoreError` naming the missing files and the generator command that fills them, unless
    ``missing_ok`` (used by :func:`verify_store` to list them along with damaged files): then
    :attr:`missing` lists the missing files and :attr:`gaps` one problem line per shard with a gap.
    """

    def __init__(self, path: str | os.PathLike, expect: Mapping[str, Any] | None = None, *,
                 missing_ok: bool = False):
        self.path = Path(path)
        if self.path.is_file():
            raise StoreError(f"data-model store {self.path} is a file, not a store folder; pass the folder that "
                             f"holds the shard_XXXX folders (store=DIR)")
        if not self.path.is_dir():
            raise StoreError(f"data-model store {self.path} does not exist; generate data models first "
                             f"(python generate_dataset/generate.py task=... store={self.path})")
        shards: dict[int, dict[str, Path]] = {}
        for p in self.path.iterdir():
            if (m := SHARD_DIR_PATTERN.match(p.name)) and p.is_dir():
                shards.setdefault(int(m.group(1)), {})["dir"] = p
            elif (m := LEGACY_SHARD_PATTERN.match(p.name)) and p.is_file():
                shards.setdefault(int(m.group(1)), {})["file"] = p
        self._entries: list[_Entry] = []
        self.identity: dict[str, Any] | None = None
        self.missing: list[str] = []  # the missing data models' files (inside a shard, before its last one)
        self.gaps: list[str] = []  # one message per shard with missing data models
        for index, found in sorted(shards.items()):
            by_position: dict[int, _Entry] = {}
            folder, legacy = found.get("dir"), found.get("file")
            if legacy is not None:
                identity = self._accept(legacy, read_identity(legacy), expect)
                for position, name in _read_index(legacy):
                    by_position[position] = _Entry(legacy, position, name, identity)
            if folder is not None:
                positions = _model_positions(folder)
                if positions or (folder / SHARD_META).exists():  # else a writer died before its first write
                    identity = self._accept(folder, _read_shard_meta(folder), expect)
                    for position in positions:
                        by_position[position] = _Entry(folder, position, None, identity)
            self._entries.extend(by_position[p] for p in sorted(by_position))
            absent = sorted(set(range(max(by_position, default=-1) + 1)) - set(by_position))
            if absent:
                self._report_gap(index, folder, legacy, absent, by_position)
        if self.gaps and not missing_ok:
            raise StoreError("\n".join(self.gaps) if len(self.gaps) == 1 else
                             f"data-model store {self.path} has missing data models in {len(self.gaps)} shards:\n"
                             + "\n".join(f"  - {gap}" for gap in self.gaps))
        if not self._entries:
            raise StoreError(f"data-model store {self.path} is empty (no complete data model in "
                             f"{len(shards)} shard(s)); run the generator first")

    def _report_gap(self, index: int, folder: Path | None, legacy: Path | None, absent: list[int],
                    present: Mapping[int, _Entry]) -> None:
        """Record the data models missing from shard ``index`` (positions ``absent``, each before its last one)."""
        if folder is not None or legacy is None:
            files = [str(model_path(self.path, index, p)) for p in absent]
            shard = shard_path(self.path, index)
        else:  # old single-file layout: a data model is a group of the shard file
            files = [f"{legacy} (group models/{p:06d})" for p in absent]
            shard = legacy
        self.missing.extend(files)
        shown = ", ".join(files[:_SHOWN_MISSING]) + (f" and {len(files) - _SHOWN_MISSING} more"
                                                     if len(files) > _SHOWN_MISSING else "")
        positions = _ranges(absent)
        last = max(present)
        self.gaps.append(
            f"data-model shard {shard} lacks {len(absent)} data model(s) before its last one: position(s) "
            f"{positions} of 0-{last} (missing: {shown}). A data model missing from the middle of a shard is an "
            f"error: the models after it would move to other indices of the store (and of the meta-training "
            f"split). Fill the gap: {_generator_advice(self.path, index, last, present)}")

    def _accept(self, shard: Path, identity: dict[str, Any], expect: Mapping[str, Any] | None) -> dict[str, Any]:
        if expect:
            check_identity(shard, identity, dict(expect))
        if self.identity is None:
            self.identity = identity
        else:
            check_identity(shard, identity, self.identity)
        return identity

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> DataModelRecord:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("DataModelStore does not support slices; use split() or a list of indices")
        entry = self._entries[index]
        if entry.legacy_name is not None:
            return _read_legacy_model(entry.shard, entry.legacy_name)
        return _read_model_file(entry.shard / f"model_{entry.position:06d}.h5", entry.shard, entry.position,
                                entry.identity)

    def verify(self) -> list[str]:
        """Read every data model and check its checksums; returns one line per problem (empty: all good): first
        one per shard with missing data models (see ``missing_ok``), then one per damaged data model.

        Old-layout shards carry no checksums: their models are only checked to be readable."""
        problems = list(self.gaps)
        for index in range(len(self)):
            try:
                self[index]
            except StoreError as err:
                problems.append(str(err))
        return problems

    def split(self, train_fraction: float = 0.8) -> tuple[list[int], list[int]]:
        """Deterministic split: the first ``train_fraction`` of the data models meta-train, the rest validate.

        The validation part has ``ceil((1 - train_fraction) * n)`` data models, as the reference's
        ``train_test_split(test_size=1 - train_fraction)``; at least one data model lands in each part when
        the store holds two or more.
        """
        if not 0.0 < train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        n = len(self)
        n_train = n - math.ceil(round((1.0 - train_fraction) * n, 9))
        if n >= 2:
            n_train = min(max(n_train, 1), n - 1) if train_fraction < 1.0 else n
        else:  # a single data model can only meta-train
            n_train = n
        return list(range(n_train)), list(range(n_train, n))


def verify_store(path: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> int:
    """Check every data model of a store (readable, checksums match, one identity); returns how many.

    Raises :class:`StoreError` listing every damaged data model and every missing one (a model file missing
    from the middle of a shard)."""
    store = DataModelStore(path, expect=expect, missing_ok=True)
    problems = store.verify()
    if problems:
        damaged = len(problems) - len(store.gaps)
        found = []
        if damaged or not store.missing:
            found.append(f"{damaged} of {len(store)} data model(s) are damaged")
        if store.missing:
            found.append(f"{len(store.missing)} data model file(s) are missing")
        listed = "\n".join(f"  - {p}" for p in problems)
        raise StoreError(f"data-model store {store.path}: {' and '.join(found)}:\n{listed}")
    return len(store)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_loaders.store",
                                     description="Check every data model of a data-model store.")
    parser.add_argument("store", nargs="+", help="store folder(s)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.store:
        try:
            print(f"{path}: {verify_store(path)} data model(s) OK")
        except StoreError as err:
            print(err, file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
