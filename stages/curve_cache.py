"""run=select's and run=visualize's curve cache (``curves.json``): one entry per curve with the settings that
produced it, and what the curves of one run share (:class:`CurveContext`).

An entry holds one curve (one checkpoint, ``origin``, ``control`` or a sparse-learning reference x one validation
data model) and its *settings*: the checkpoint's and data model's content hashes (SHA-256, so moved files stay
valid and overwritten ones are detected), the fine-tune recipe, seed, dataset split settings, batch size, input
size, pruning method, ``iterative_steps``, ``max_batches`` (and under torchrun the world size), and the
``max_speed_up`` it was pruned to. A cached curve is reused when all settings are equal and its ``max_speed_up`` is
at least the requested one, cut at the first point reaching the request (:func:`cut_curve`: exactly what a fresh
computation returns); anything else is recomputed. Every run writes the merged cache to its own run dir.
See [docs/stages.md](../docs/stages.md), "Choosing the checkpoint".
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig

from training.config import TrainConfig
from utils.io import is_null, write_json

CACHE_FILE = "curves.json"
CACHE_VERSION = 1


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of a state dict (identifies a stored data model by content)."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def json_round_trip(value: Any) -> Any:
    """JSON round trip, so settings compare equal to what a cache file gives back."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class CurveJob:
    """One curve to produce. ``checkpoint`` None: the untouched data model (label ``origin``, ``finetune``
    False) or the control (label ``control``: fine-tuned like the checkpoints, no metanetwork applied)."""

    label: str
    epoch: int | None
    checkpoint: Path | None
    model_index: int
    base_speed_up: float
    settings: dict  # everything the points depend on, except max_speed_up
    max_speed_up: float
    entry: dict | None = None  # what the cache file keeps (from the cache or computed)
    points: list | None = None  # the curve for this request (the entry's points cut at max_speed_up)
    reused: bool = False
    finetune: bool = True  # fine-tune with the after_metanetwork recipe before pruning (all but origin)
    sparse_reg: float | None = None  # sparse-learning reference: that fine-tune with DepGraph's regulariser


class CurveCache:
    """Entries ``{label, epoch, checkpoint, model_index, base_speed_up, settings, max_speed_up, points, ...}``."""

    def __init__(self, entries: Sequence[dict] = (), source: Path | None = None, meta: Mapping | None = None):
        self.entries = list(entries)
        self.source = source
        self.meta = dict(meta or {})

    @classmethod
    def load(cls, location: str | Path | None) -> "CurveCache":
        """Read ``curves.json`` from a run dir or a file path; None gives an empty cache."""
        if is_null(location):
            return cls()
        path = Path(str(location)).expanduser()
        file = path / CACHE_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"select.cache={location}: no {CACHE_FILE} there; pass a select/visualize run "
                                    f"dir (it holds {CACHE_FILE}) or the file itself, or select.cache=null")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"select.cache: {file} is not valid JSON ({err}); delete it or use select.cache=null") \
                from None
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or "entries" not in data:
            raise ValueError(f"select.cache: {file} is not a curve cache of version {CACHE_VERSION}; "
                             "use select.cache=null to recompute")
        meta = {k: v for k, v in data.items() if k not in ("entries", "version")}
        return cls(data["entries"], source=file, meta=meta)

    def find(self, settings: dict, max_speed_up: float) -> tuple[dict, list] | None:
        """``(entry, points cut at max_speed_up)`` of a cached curve with equal settings pruned at least to
        ``max_speed_up`` (the one pruned furthest if several), else None."""
        matches = [e for e in self.entries
                   if e.get("settings") == settings and float(e.get("max_speed_up", -math.inf)) >= max_speed_up]
        if not matches:
            return None
        entry = max(matches, key=lambda e: float(e["max_speed_up"]))
        return entry, cut_curve(entry["points"], max_speed_up)

    def save(self, path: Path, used: Sequence[dict], meta: Mapping) -> None:
        """Write ``used`` entries plus the loaded ones they do not repeat (so the cache only grows)."""
        def key(e):
            return json.dumps([e.get("settings"), e.get("max_speed_up")], sort_keys=True)

        seen = {key(e) for e in used}
        kept = [e for e in self.entries if key(e) not in seen]
        write_json(path, {"version": CACHE_VERSION, **dict(meta), "entries": list(used) + kept})


def cut_curve(points: Sequence[Sequence[float]], max_speed_up: float) -> list[list[float]]:
    """The points up to and including the first one reaching ``max_speed_up`` (what a fresh curve returns)."""
    cut = []
    for x, acc in points:
        cut.append([float(x), float(acc)])
        if x >= max_speed_up:
            break
    return cut


@dataclass
class CurveContext:
    """What the curves of one run share; data and device are set up only when a curve must be computed."""

    cfg: DictConfig
    run_dir: Path
    store: Any
    val_indices: list[int]
    records: dict[int, Any]
    finetune: TrainConfig
    method: dict
    common: dict  # settings shared by every curve
    device: torch.device | None = None
    splits: Any = None
    val_loader: Any = None
    # select.score=finetuned: the total speed-ups and the after-pruning recipe of the score (None otherwise)
    finetuned_targets: list[float] | None = None
    after_pruning: TrainConfig | None = None
