"""The data-model store: trained (init-pruned) networks that meta-training learns from, in HDF5 shards.

Layout of a store folder::

    DIR/shard_0000.h5      written only by generator shard 0
    DIR/shard_0001.h5      ...

All shard files in the folder together are the store: there is no merge step. Inside a shard, file
attributes name the task, architecture, class count and pruning method; each data model is a group
``models/<position>`` holding its state dict (one dataset per tensor, under ``state_dict/``) and
attributes: architecture spec, metrics, achieved speed-up, seed, the resolved config (JSON) and a
completion flag.

Crash safety: a shard is never modified in place. Adding a model copies the shard to a temporary file
in the same folder, appends the model there, flushes and fsyncs it, then atomically renames it over the
shard. A SIGKILL at any moment leaves either the old shard or the new one, never half a model.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import h5py
import numpy as np
import torch

FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard_(\d+)\.h5$")
# File attributes that must agree across the shards of one store.
IDENTITY_KEYS = ("task", "architecture", "num_classes", "method")


class StoreError(RuntimeError):
    """A problem with the data-model store that the user must fix (names the file)."""


@dataclass
class DataModelRecord:
    """One stored data model. ``state_dict`` is on the CPU; ``spec`` rebuilds the architecture."""

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
        from generate_dataset.models import model_from_state_dict

        return model_from_state_dict(self.spec["name"], self.state_dict, self.spec["num_classes"])


def shard_path(store_dir: str | os.PathLike, index: int) -> Path:
    return Path(store_dir) / f"shard_{int(index):04d}.h5"


def _wrap_h5_error(path: Path, err: Exception) -> StoreError:
    return StoreError(
        f"data-model shard {path} cannot be read ({err.__class__.__name__}: {err}); the file is corrupt or "
        f"truncated. Delete it and re-run the generator for that shard index to regenerate it."
    )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
class ShardWriter:
    """Appends data models to one shard file, crash-safely (copy, append, fsync, atomic rename)."""

    def __init__(self, store_dir: str | os.PathLike, index: int, identity: Mapping[str, Any]):
        missing = [k for k in IDENTITY_KEYS if k not in identity]
        if missing:
            raise ValueError(f"shard identity lacks {missing}")
        self.path = shard_path(store_dir, index)
        self.identity = {k: identity[k] for k in IDENTITY_KEYS}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        if self.path.exists():
            check_identity(self.path, read_identity(self.path), self.identity)

    def completed_positions(self) -> set[int]:
        """Positions already stored in this shard (a re-run skips them)."""
        if not self.path.exists():
            return set()
        return {position for position, _ in _read_index(self.path)}

    def append(self, position: int, state_dict: Mapping[str, torch.Tensor], spec: Mapping[str, Any],
               metrics: Mapping[str, float], speed_up: float, seed: int, config: Mapping[str, Any]) -> None:
        """Publish one data model; it becomes visible only after the atomic rename."""
        if position in self.completed_positions():
            raise StoreError(f"{self.path} already holds data model {position}; refusing to duplicate it")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
            with h5py.File(tmp, "a") as f:
                if "format_version" not in f.attrs:
                    f.attrs["format_version"] = FORMAT_VERSION
                    for key, value in self.identity.items():
                        f.attrs[key] = value
                group = f.require_group("models").create_group(f"{position:06d}")
                tensors = group.create_group("state_dict")
                for order, (key, tensor) in enumerate(state_dict.items()):
                    data = tensors.create_dataset(key, data=tensor.detach().cpu().numpy())
                    data.attrs["order"] = order  # HDF5 lists names alphabetically; keep the state-dict order
                    data.attrs["dtype"] = str(tensor.dtype).removeprefix("torch.")
                group.attrs["spec"] = json.dumps(dict(spec))
                group.attrs["metrics"] = json.dumps({k: float(v) for k, v in metrics.items()})
                group.attrs["speed_up"] = float(speed_up)
                group.attrs["seed"] = int(seed)
                group.attrs["config"] = json.dumps(dict(config), default=str)
                group.attrs["complete"] = True
                f.flush()
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _remove_stale_temporaries(self) -> None:
        """Temporary copies left by a killed writer of this shard are garbage."""
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            stale.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def read_identity(path: Path) -> dict[str, Any]:
    try:
        with h5py.File(path, "r") as f:
            if "format_version" not in f.attrs:
                raise StoreError(f"{path} is not a data-model shard (no format_version attribute)")
            if int(f.attrs["format_version"]) > FORMAT_VERSION:
                raise StoreError(f"{path} was written by a newer version of this code (format "
                                 f"{int(f.attrs['format_version'])} > {FORMAT_VERSION}); upgrade to read it")
            return {k: _plain(f.attrs[k]) for k in IDENTITY_KEYS}
    except (OSError, KeyError) as err:
        raise _wrap_h5_error(path, err) from None


def check_identity(path: Path, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    diff = {k: (found.get(k), expected[k]) for k in expected if expected[k] is not None and found.get(k) != expected[k]}
    if diff:
        details = ", ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
        raise StoreError(f"data-model shard {path} was made for another task/architecture ({details}). "
                         f"Use a separate store folder per task and method.")


def _read_index(path: Path) -> list[tuple[int, str]]:
    """(position, group name) of every complete data model in a shard."""
    try:
        with h5py.File(path, "r") as f:
            models = f.get("models")
            if models is None:
                return []
            return sorted((int(name), name) for name, group in models.items() if group.attrs.get("complete", False))
    except (OSError, KeyError, ValueError) as err:
        raise _wrap_h5_error(path, err) from None


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode()
    return value


class DataModelStore(Sequence[DataModelRecord]):
    """Read access to a store folder: ``len(store)``, ``store[i]`` -> :class:`DataModelRecord`.

    Data models are ordered by (shard index, position), so the order does not depend on which shard
    finished first. ``expect`` (e.g. ``{"task": ..., "architecture": ...}``) rejects a shard made for
    another task.
    """

    def __init__(self, path: str | os.PathLike, expect: Mapping[str, Any] | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"data-model store {self.path} does not exist; generate data models first "
                             f"(python generate_dataset/generate.py task=... store={self.path})")
        shards = sorted((int(m.group(1)), p) for p in self.path.iterdir() if (m := SHARD_PATTERN.match(p.name)))
        self._entries: list[tuple[Path, str]] = []
        self.identity: dict[str, Any] | None = None
        for _index, shard in shards:
            identity = read_identity(shard)
            if expect:
                check_identity(shard, identity, dict(expect))
            if self.identity is None:
                self.identity = identity
            else:
                check_identity(shard, identity, self.identity)
            self._entries.extend((shard, name) for _position, name in _read_index(shard))
        if not self._entries:
            raise StoreError(f"data-model store {self.path} is empty (no complete data model in "
                             f"{len(shards)} shard file(s)); run the generator first")

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> DataModelRecord:  # type: ignore[override]
        if isinstance(index, slice):
            raise TypeError("DataModelStore does not support slices; use split() or a list of indices")
        shard, name = self._entries[index]
        try:
            with h5py.File(shard, "r") as f:
                group = f["models"][name]
                datasets = sorted(group["state_dict"].items(), key=lambda item: int(item[1].attrs["order"]))
                state_dict = {key: torch.from_numpy(np.array(data[()])) for key, data in datasets}
                attrs = {k: _plain(v) for k, v in group.attrs.items()}
        except (OSError, KeyError, ValueError) as err:
            raise _wrap_h5_error(shard, err) from None
        return DataModelRecord(
            state_dict=state_dict,
            spec=json.loads(attrs["spec"]),
            metrics=json.loads(attrs["metrics"]),
            speed_up=float(attrs["speed_up"]),
            seed=int(attrs["seed"]),
            config=json.loads(attrs["config"]),
            shard=shard.name,
            position=int(name),
        )

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

    def models_and_graphs(self, indices: Sequence[int] | None = None, device: str | torch.device = "cpu",
                          shuffle_seed: int | None = None) -> Iterator[tuple[torch.nn.Module, Any, DataModelRecord]]:
        """Yield ``(model, graph, record)`` ready for meta-training: the model in eval mode on ``device``
        and its graph from :class:`nn.graph.GraphCodec` (structure analysis cached per architecture)."""
        from nn.graph import GraphCodec

        order = list(range(len(self))) if indices is None else list(indices)
        if shuffle_seed is not None:
            generator = torch.Generator().manual_seed(shuffle_seed)
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        for index in order:
            record = self[index]
            model = record.build_model().to(device)
            yield model, GraphCodec(model).encode(model), record
