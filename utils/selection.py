"""Choosing the metanetwork checkpoint (``run=select``) and plotting accuracy-vs-speed-up curves (``run=visualize``).

The authors pick "the metanetwork at epoch k" by eye from curves measured on the TEST set (reference §6, §8).
This module automates that choice honestly: everything here is measured on the VALIDATION split of the
image dataset and on VALIDATION data models (``DataModelStore(cfg.store).split(task.meta_train.train_split)[1]``,
the data models meta-training never saw); the test loader is never built into the fine-tune or the curve.

For every requested checkpoint ``<select.meta_train_dir>/checkpoints/epoch_{k:04d}.pt`` and each of the first
``select.num_val_models`` validation data models:

1. apply the metanetwork once (``utils.metanet_io.apply_metanetwork``);
2. fine-tune with ``task.finetune.after_metanetwork`` (``select.finetune_epochs`` shortens it, milestones scaled
   in proportion; ``select.max_batches`` caps batches per epoch). Under ``protocol=paper`` that recipe would keep
   the best-TEST epoch; here it keeps the best-validation epoch instead, because selection never reads test;
3. prune progressively WITHOUT fine-tuning (``utils.curves.accuracy_speed_up_curve``) up to
   ``select.max_speed_up`` (default ``task.visualize.max_speed_up``) and record validation accuracy.

Each checkpoint's score is the mean over the validation data models of ``select.score``: ``auc`` (mean accuracy
over ``[data model speed-up, max_speed_up]``, step-wise, see ``utils.curves``) or ``acc_at`` (accuracy at
``select.target_speed_up``). Ties go to the earlier epoch. The curve labelled ``origin`` is the untouched data
model, NOT fine-tuned (as the reference plots it): a reference line, never a candidate.

``select.checkpoints``: ``all`` (every ``epoch_*.pt``), an epoch or a list of epochs (each must exist), or a string
``"start:stop:step"`` (inclusive ``stop``; empty parts mean first / last / 1) filtering the existing epochs.

Outputs of ``run=select`` (in its run dir): ``selection.json`` (``chosen`` = absolute path of the checkpoint,
``epoch``, ``score``, ``score_kind``, ``split="val"``, ``ranking``...), ``ranking.json``, ``curves.json`` (every
point, see below), ``curves.png`` and ``results.json``. Later runs find the choice by path:
``chosen_checkpoint(select_run_dir)`` or ``final.metanetwork=<select run dir>``.

Cache (``curves.json``; used by both runs). Each entry holds one curve (one checkpoint or ``origin`` x one data
model) with the *settings* that produced it: the checkpoint's and data model's content hashes (SHA-256, so moved
files stay valid and overwritten ones are detected), the fine-tune recipe, seed, dataset split settings, batch
size, input size, pruning method, ``iterative_steps`` and ``max_batches``, and the ``max_speed_up`` it was
pruned to. A cached curve is reused when all settings are equal and its ``max_speed_up`` is at least the
requested one (the curve is cut at the first point reaching the request, which is exactly what a fresh
computation returns); anything else is recomputed. ``select.cache`` names a select/visualize run dir or a
``curves.json`` file; null means "nothing cached". Every run writes the merged cache to its OWN run dir
(outputs stay under the run dir), so the next run can point ``select.cache`` at it.

``run=visualize`` re-plots: ``select.cache=<select run dir>`` alone re-plots that run's checkpoints (the
``meta_train_dir`` is read from the cache when ``select.meta_train_dir`` is null) without recomputing; adding
``select.checkpoints=[...]`` or changing a setting computes only what the cache lacks. It writes
``curves.png``, ``curves.json`` and ``results.json`` (scores, how many curves were reused / computed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from utils import curves as curves_lib
from utils import meta_train
from utils.experiment import recipe, setup, write_json
from utils.run_registry import register_run

log = logging.getLogger(__name__)

CACHE_FILE = "curves.json"
SELECTION_FILE = "selection.json"
CACHE_VERSION = 1
SCORE_KINDS = ("auc", "acc_at")
ORIGIN = "origin"


class SelectionError(ValueError):
    """A configuration or input problem of run=select / run=visualize that the user must fix."""


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def list_checkpoints(meta_train_dir: str | Path) -> dict[int, Path]:
    """``{epoch: absolute path}`` of every ``<meta_train_dir>/checkpoints/epoch_*.pt`` (clear errors if none)."""
    if meta_train_dir is None or str(meta_train_dir).strip() in ("", "null", "None"):
        raise SelectionError("select.meta_train_dir is not set; pass select.meta_train_dir=<run dir of a finished "
                             "run=meta_train> (or select.cache=<select run dir> for run=visualize)")
    root = Path(str(meta_train_dir)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"select.meta_train_dir={meta_train_dir}: no such folder; pass the run dir of a "
                                "run=meta_train (it holds checkpoints/epoch_XXXX.pt)")
    folder = root / meta_train.CHECKPOINT_DIR
    found = {epoch: path.resolve() for epoch, path in meta_train.list_checkpoints(root) if path.is_file()}
    if not found:
        raise FileNotFoundError(f"no metanetwork checkpoints (epoch_XXXX.pt) in {folder}; is {root} the run dir of "
                                "a run=meta_train that finished at least one epoch?")
    return dict(sorted(found.items()))


def parse_checkpoints(spec: Any, available: Mapping[int, Path], where: str = "") -> list[tuple[int, Path]]:
    """Resolve ``select.checkpoints`` (``all`` | epoch | list of epochs | ``"start:stop:step"``) to (epoch, path)."""
    where = where or "the meta_train checkpoints"
    if isinstance(spec, (ListConfig, DictConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return sorted(available.items())
    if isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SelectionError(f"select.checkpoints={spec!r}: use 'start:stop:step' (e.g. '5:30:5')")
        try:
            start, stop, step = (int(p) if p.strip() else None for p in parts + [""] * (3 - len(parts)))
        except ValueError:
            raise SelectionError(f"select.checkpoints={spec!r}: start, stop and step must be integers") from None
        start = min(available) if start is None else start
        stop = max(available) if stop is None else stop
        step = 1 if step is None else step
        if step < 1:
            raise SelectionError(f"select.checkpoints={spec!r}: step must be >= 1")
        chosen = [(k, p) for k, p in available.items() if start <= k <= stop and (k - start) % step == 0]
        if not chosen:
            raise SelectionError(f"select.checkpoints={spec!r} matches none of the epochs {sorted(available)} "
                                 f"in {where}")
        return sorted(chosen)
    epochs = spec if isinstance(spec, (list, tuple)) else [spec]
    result = []
    for value in epochs:
        try:
            epoch = int(value)
        except (TypeError, ValueError):
            raise SelectionError(f"select.checkpoints={spec!r}: expected 'all', an epoch, a list of epochs or "
                                 "'start:stop:step'") from None
        if epoch not in available:
            raise FileNotFoundError(f"select.checkpoints asks for epoch {epoch} but {where} has no "
                                    f"epoch_{epoch:04d}.pt "
                                    f"(available epochs: {sorted(available)})")
        result.append((epoch, available[epoch]))
    if not result:
        raise SelectionError("select.checkpoints is an empty list; use 'all' or name some epochs")
    return sorted(set(result))


def chosen_checkpoint(select_run_dir: str | Path) -> Path:
    """The checkpoint a finished ``run=select`` chose (from its ``selection.json``; a folder or the file itself)."""
    path = Path(str(select_run_dir)).expanduser()
    selection = path if path.is_file() else path / SELECTION_FILE
    if not selection.is_file():
        raise FileNotFoundError(f"{selection} does not exist: {path} is not a finished run=select run dir "
                                "(run=select writes selection.json when it finishes)")
    try:
        data = json.loads(selection.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{selection} is not valid JSON ({err}); re-run run=select") from None
    if not data.get("chosen"):
        raise KeyError(f"{selection} has no 'chosen' entry naming the selected metanetwork checkpoint")
    chosen = Path(data["chosen"])
    if not chosen.is_absolute():
        chosen = selection.parent / chosen
    if not chosen.is_file():
        raise FileNotFoundError(f"the metanetwork checkpoint chosen in {selection} ({chosen}) no longer exists")
    return chosen


# ----------------------------------------------------------------------------------------------
# Fingerprints and cache
# ----------------------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Hash of names, dtypes, shapes and bytes of a state dict (identifies a stored data model by content)."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _plain(value: Any) -> Any:
    """JSON round trip, so settings compare equal to what a cache file gives back."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


@dataclass
class CurveJob:
    """One curve to produce: ``checkpoint`` None is the untouched data model (label ``origin``)."""

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


class CurveCache:
    """Entries ``{label, epoch, checkpoint, model_index, base_speed_up, settings, max_speed_up, points, ...}``."""

    def __init__(self, entries: Sequence[dict] = (), source: Path | None = None, meta: Mapping | None = None):
        self.entries = list(entries)
        self.source = source
        self.meta = dict(meta or {})

    @classmethod
    def load(cls, location: str | Path | None) -> "CurveCache":
        """Read ``curves.json`` from a run dir or a file path; None gives an empty cache."""
        if location is None or str(location).strip() in ("", "null", "None"):
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


# ----------------------------------------------------------------------------------------------
# Planning and computing curves
# ----------------------------------------------------------------------------------------------
@dataclass
class _Context:
    """What the curves of one run share; data and device are set up only when a curve must be computed."""

    cfg: DictConfig
    run_dir: Path
    store: Any
    val_indices: list[int]
    records: dict[int, Any]
    finetune: Any  # TrainConfig
    method: dict
    common: dict  # settings shared by every curve
    device: torch.device | None = None
    splits: Any = None
    val_loader: Any = None


def _select_section(cfg: DictConfig) -> DictConfig:
    section = cfg.get("select")
    if section is None:
        raise SelectionError("the config has no `select:` section (configs/main.yaml); compose with main.yaml")
    return section


def _finetune_recipe(cfg: DictConfig):
    """``after_metanetwork`` recipe, epochs optionally shortened (milestones scaled), never selecting on test."""
    section = _select_section(cfg)
    train_cfg = recipe(cfg.task.finetune.after_metanetwork, cfg.protocol)
    if train_cfg.select == "test":
        log.info("select: the after_metanetwork fine-tune keeps the best-VALIDATION epoch here (protocol=%s would "
                 "use test); checkpoint selection never reads the test set", cfg.protocol)
        train_cfg = dataclasses.replace(train_cfg, select="val")
    epochs = section.get("finetune_epochs")
    if epochs is not None:
        epochs = int(epochs)
        if epochs < 0:
            raise SelectionError(f"select.finetune_epochs must be >= 0 or null, got {epochs}")
        old = max(train_cfg.epochs, 1)
        scaled = sorted({max(1, round(m * epochs / old)) for m in train_cfg.milestones if m <= old})
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs, milestones=[m for m in scaled if m <= epochs])
    max_batches = section.get("max_batches")
    if max_batches is not None:
        train_cfg = dataclasses.replace(train_cfg, max_batches_per_epoch=int(max_batches))
    return train_cfg


def _validation_models(cfg: DictConfig) -> tuple[Any, list[int]]:
    from data_loaders.store import DataModelStore

    section = _select_section(cfg)
    task = cfg.task
    store = DataModelStore(cfg.store, expect={"task": task.name, "architecture": task.model})
    train_fraction = float(task.meta_train.train_split)
    _train_idx, val_idx = store.split(train_fraction)
    if not val_idx:
        raise SelectionError(
            f"the data-model store {store.path} holds {len(store)} data model(s) and task.meta_train.train_split="
            f"{train_fraction} leaves none for validation; generate more data models (at least 2) or lower "
            "task.meta_train.train_split")
    wanted = int(section.get("num_val_models", 1))
    if wanted < 1:
        raise SelectionError(f"select.num_val_models must be >= 1, got {wanted}")
    if wanted > len(val_idx):
        log.warning("select.num_val_models=%d but the store %s has only %d validation data model(s); using %d",
                    wanted, store.path, len(val_idx), len(val_idx))
    return store, val_idx[:wanted]


def _common_settings(cfg: DictConfig, finetune, method: dict) -> dict:
    task = cfg.task
    section = _select_section(cfg)
    dataset = OmegaConf.to_container(task.dataset, resolve=True)
    # where the files live and how they are read do not change the numbers
    dataset = {k: v for k, v in dataset.items() if k not in ("root", "download", "num_workers")}
    if int(section.iterative_steps) < 1 or float(section.max_speed_up) <= 0:
        raise SelectionError(f"select.iterative_steps must be >= 1 and select.max_speed_up > 0, got "
                             f"{section.iterative_steps} and {section.max_speed_up}")
    return _plain({
        "task": task.name,
        "architecture": task.model,
        "dataset": dataset,
        "batch_size": task.batch_size,
        "input_size": list(task.input_size),
        "seed": cfg.seed,
        "method": method,
        "iterative_steps": int(section.iterative_steps),
        "max_batches": section.get("max_batches"),
        "split": "val",
        "finetune": dataclasses.asdict(finetune),
    })


def _plan(cfg: DictConfig, run_dir: Path, meta_train_dir: Any) -> tuple[_Context, list[CurveJob]]:
    """Resolve checkpoints and validation data models into curve jobs (cheap: hashes only, no training)."""
    from nn.graph import GraphCodec
    from utils.metanet_io import load_metanetwork

    section = _select_section(cfg)
    if cfg.method.get("kind", "structured") != "structured":
        raise SelectionError(
            f"run=select/visualize scores checkpoints by structured pruning curves, but method={cfg.method.name} is "
            f"{cfg.method.kind}; select the checkpoint of an unstructured metanetwork by hand (pass a checkpoint "
            f"file as final.metanetwork) or run select with a structured method"
        )
    max_speed_up = float(section.max_speed_up)
    available = list_checkpoints(meta_train_dir)
    checkpoints = parse_checkpoints(section.get("checkpoints", "all"), available,
                                    where=str(Path(str(meta_train_dir)) / meta_train.CHECKPOINT_DIR))
    store, val_indices = _validation_models(cfg)
    records = {index: store[index] for index in val_indices}
    finetune = _finetune_recipe(cfg)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    common = _common_settings(cfg, finetune, method)
    ctx = _Context(cfg=cfg, run_dir=run_dir, store=store, val_indices=val_indices, records=records,
                   finetune=finetune, method=method, common=common)

    # Refuse a checkpoint of another layout before any (long) computation; the error names the checkpoint.
    first = records[val_indices[0]].build_model()
    codec = GraphCodec(first, input_shape=tuple(cfg.task.input_size))
    hashes = {}
    for epoch, path in checkpoints:
        _net, checkpoint = load_metanetwork(path, codec)
        if checkpoint["spec"].get("task") not in (None, cfg.task.name):
            log.warning("checkpoint %s was trained on task %r, selecting for %r", path,
                        checkpoint["spec"].get("task"), cfg.task.name)
        hashes[epoch] = file_sha256(path)

    jobs = []
    for index in val_indices:
        record = records[index]
        model_settings = {"index": index, "sha256": state_dict_sha256(record.state_dict), "spec": record.spec,
                          "speed_up": record.speed_up}
        if section.get("origin", True):
            settings = _plain({k: v for k, v in common.items() if k != "finetune"}
                              | {"checkpoint": None, "data_model": model_settings, "finetune": None})
            jobs.append(CurveJob(ORIGIN, None, None, index, record.speed_up, settings, max_speed_up))
        for epoch, path in checkpoints:
            settings = _plain(common | {"checkpoint": {"sha256": hashes[epoch]}, "data_model": model_settings})
            jobs.append(CurveJob(f"epoch_{epoch}", epoch, path, index, record.speed_up, settings, max_speed_up))
    return ctx, jobs


def _ensure_data(ctx: _Context) -> None:
    """Device, datasets and the validation loader, built on the first curve that must be computed."""
    if ctx.device is not None:
        return
    from utils.experiment import task_data

    ctx.device = setup(ctx.cfg)
    ctx.splits, loaders = task_data(ctx.cfg.task, ctx.cfg.seed)
    if loaders.val is None:
        raise SelectionError("selection measures on the validation split but the task has none; set "
                             "task.dataset.val_size > 0")
    ctx.val_loader = loaders.val


def _train_and_val_loaders(ctx: _Context):
    """Fresh loaders seeded the same way for every curve (so a curve does not depend on which came before),
    WITHOUT the test loader: the fine-tune cannot evaluate on test."""
    from data_loaders.image_datasets import build_loaders

    task = ctx.cfg.task
    loaders = build_loaders(ctx.splits, batch_size=task.batch_size, eval_batch_size=task.eval_batch_size,
                            num_workers=task.dataset.get("num_workers", 0), seed=ctx.cfg.seed)
    return dataclasses.replace(loaders, test=None)


def _compute(job: CurveJob, ctx: _Context) -> dict:
    """Apply the metanetwork, fine-tune and prune progressively: one curve (all on validation data)."""
    from generate_dataset.generation import example_input
    from nn.graph import GraphCodec
    from utils.metanet_io import apply_metanetwork, load_metanetwork
    from utils.seed import seed_everything
    from utils.training import train

    _ensure_data(ctx)
    cfg, device = ctx.cfg, ctx.device
    section = _select_section(cfg)
    started = time.time()
    record = ctx.records[job.model_index]
    model = record.build_model().to(device)
    finetune_info = None
    if job.checkpoint is not None:
        codec = GraphCodec(model, input_shape=tuple(cfg.task.input_size))
        net, _ = load_metanetwork(job.checkpoint, codec, map_location=device)
        apply_metanetwork(model, net, codec)
        del net
        seed_everything(cfg.seed, deterministic=cfg.get("deterministic", False))
        result = train(model, _train_and_val_loaders(ctx), ctx.finetune, device, run_dir=ctx.run_dir / "finetune",
                       desc=f"{job.label}_model{job.model_index}")
        finetune_info = {"epochs": result.epochs, "selected_epoch": result.selected_epoch,
                         "selection": result.selection, "metrics": result.final_metrics}
    model.eval()
    points = curves_lib.accuracy_speed_up_curve(
        model, ctx.val_loader, device, ctx.method, example_input(cfg.task, device), job.max_speed_up,
        base_speed_up=job.base_speed_up, iterative_steps=int(section.iterative_steps),
        max_batches=section.get("max_batches"), desc=f"{job.label} model {job.model_index}")
    return {"label": job.label, "epoch": job.epoch, "checkpoint": str(job.checkpoint) if job.checkpoint else None,
            "model_index": job.model_index, "base_speed_up": job.base_speed_up, "settings": job.settings,
            "max_speed_up": job.max_speed_up, "points": [[x, a] for x, a in points], "finetune": finetune_info,
            "seconds": round(time.time() - started, 2)}


def score_points(points: Sequence[Sequence[float]], kind: str, max_speed_up: float, target_speed_up: float) -> float:
    """``auc``: step-wise mean accuracy up to ``max_speed_up``; ``acc_at``: accuracy at ``target_speed_up``."""
    if kind == "auc":
        return curves_lib.area_under_curve(points, max_speed_up, kind="step")
    if kind == "acc_at":
        return curves_lib.accuracy_at(points, target_speed_up)
    raise SelectionError(f"select.score={kind!r} is unknown; valid: {', '.join(SCORE_KINDS)}")


def _produce(ctx: _Context, jobs: list[CurveJob], cache: CurveCache) -> dict[str, dict]:
    """Fill every job from the cache or by computing it; returns per-label summaries (scores, curves)."""
    section = _select_section(ctx.cfg)
    kind = str(section.score)
    if kind not in SCORE_KINDS:
        raise SelectionError(f"select.score={kind!r} is unknown; valid: {', '.join(SCORE_KINDS)}")
    max_speed_up, target = float(section.max_speed_up), float(section.target_speed_up)
    labels: dict[str, list[CurveJob]] = {}
    for job in jobs:
        labels.setdefault(job.label, []).append(job)
    from tqdm.auto import tqdm

    summary = {}
    for label, group in tqdm(labels.items(), desc="checkpoints", total=len(labels)):
        for job in group:
            cached = cache.find(job.settings, job.max_speed_up)
            if cached is not None:
                # keep the full cached curve in the new cache file; label/path may have changed
                job.entry = dict(cached[0], label=job.label, epoch=job.epoch,
                                 checkpoint=str(job.checkpoint) if job.checkpoint else None)
                job.points, job.reused = cached[1], True
            else:
                job.entry = _compute(job, ctx)
                job.points = job.entry["points"]
        scores = [score_points(job.points, kind, max_speed_up, target) for job in group]
        score = sum(scores) / len(scores)
        summary[label] = {"label": label, "epoch": group[0].epoch,
                          "checkpoint": str(group[0].checkpoint) if group[0].checkpoint else None,
                          "score": score, "per_model": dict(zip([j.model_index for j in group], scores)),
                          "curve": curves_lib.mean_curve([j.points for j in group], max_speed_up),
                          "reused": sum(j.reused for j in group)}
        log.info("%s: %s = %.4f (mean over %d validation data model(s)%s)", label, kind, score, len(group),
                 ", from cache" if all(j.reused for j in group) else "")
    return summary


def _plot(ctx: _Context, summary: dict[str, dict], path: Path) -> Path:
    cfg = ctx.cfg
    section = _select_section(cfg)
    kind = str(section.score)
    shown = {f"{label} ({kind} {item['score']:.4f})": item["curve"] for label, item in summary.items()}
    n = len(ctx.val_indices)
    title = (f"{cfg.task.name}: validation accuracy vs speed-up, no fine-tune after pruning\n"
             f"(mean over {n} validation data model(s); origin = untouched data model)")
    ylim = cfg.task.get("visualize", {}).get("ylim")
    return curves_lib.plot_curves(shown, path, float(section.max_speed_up),
                                  ylim=list(ylim) if ylim is not None else None, title=title)


def _run_curves(cfg: DictConfig, run_dir: Path, meta_train_dir: Any, cache: CurveCache):
    ctx, jobs = _plan(cfg, run_dir, meta_train_dir)
    summary = _produce(ctx, jobs, cache)
    meta = {"task": cfg.task.name, "meta_train_dir": str(Path(str(meta_train_dir)).expanduser().resolve()),
            "store": str(ctx.store.path.resolve()), "split": "val"}
    cache.save(run_dir / CACHE_FILE, [job.entry for job in jobs], meta)
    _plot(ctx, summary, run_dir / "curves.png")
    reused = sum(job.reused for job in jobs)
    return ctx, jobs, summary, {"curves_reused": reused, "curves_computed": len(jobs) - reused}


# ----------------------------------------------------------------------------------------------
# Run modes
# ----------------------------------------------------------------------------------------------
@register_run("select")
def select_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Score every requested metanetwork checkpoint on validation data models; write selection.json."""
    started = time.time()
    run_dir = Path(run_dir)
    section = _select_section(cfg)
    cache = CurveCache.load(section.get("cache"))
    ctx, jobs, summary, counts = _run_curves(cfg, run_dir, section.get("meta_train_dir"), cache)
    candidates = [item for label, item in summary.items() if label != ORIGIN]
    ranking = sorted(candidates, key=lambda item: (-item["score"], item["epoch"]))  # ties: earlier epoch
    ranked = [{"rank": i + 1, "epoch": item["epoch"], "checkpoint": item["checkpoint"], "score": item["score"],
               "per_model": item["per_model"]} for i, item in enumerate(ranking)]
    best = ranking[0]
    origin = summary.get(ORIGIN)
    kind = str(section.score)
    selection = {
        "chosen": best["checkpoint"], "epoch": best["epoch"], "score": best["score"], "score_kind": kind,
        "split": "val", "ranking": ranked,
        "origin_score": origin["score"] if origin else None,
        "max_speed_up": float(section.max_speed_up), "target_speed_up": float(section.target_speed_up),
        "validation_models": ctx.val_indices, "store": str(ctx.store.path.resolve()),
        "meta_train_dir": str(Path(str(section.meta_train_dir)).expanduser().resolve()),
        "finetune": dataclasses.asdict(ctx.finetune),
        "note": ("honest selection: validation data models, validation split of the image data; the test set "
                 "was not used. origin = untouched data model without fine-tuning (reference line, not a candidate)"),
    }
    write_json(run_dir / "ranking.json", {"score_kind": kind, "split": "val", "ranking": ranked})
    write_json(run_dir / SELECTION_FILE, selection)
    if origin and best["score"] < origin["score"]:
        log.warning("the best checkpoint (epoch %d, %s %.4f) scores below the untouched data model (%.4f)",
                    best["epoch"], kind, best["score"], origin["score"])
    log.info("chose epoch %d (%s) with %s %.4f", best["epoch"], best["checkpoint"], kind, best["score"])
    results = {"run": "select", "task": cfg.task.name, "seed": cfg.seed, **{k: selection[k] for k in (
        "chosen", "epoch", "score", "score_kind", "split", "origin_score", "validation_models")},
               "ranking": [{"epoch": r["epoch"], "score": r["score"]} for r in ranked], **counts,
               "seconds": round(time.time() - started, 1)}
    write_json(run_dir / "results.json", results)
    print(f"[{cfg.task.name}] select: epoch {best['epoch']} ({kind} {best['score']:.4f} on validation) -> "
          f"{run_dir / SELECTION_FILE}")
    return results


@register_run("visualize")
def visualize_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Plot the curves of the requested checkpoints + origin, reusing cached curves whose settings match."""
    started = time.time()
    run_dir = Path(run_dir)
    section = _select_section(cfg)
    cache = CurveCache.load(section.get("cache"))
    meta_train_dir = section.get("meta_train_dir") or cache.meta.get("meta_train_dir")
    if not meta_train_dir:
        raise SelectionError("run=visualize needs select.meta_train_dir=<meta_train run dir> or "
                             "select.cache=<select run dir> (whose curves.json records the meta_train dir)")
    _ctx, _jobs, summary, counts = _run_curves(cfg, run_dir, meta_train_dir, cache)
    results = {"run": "visualize", "task": cfg.task.name, "score_kind": str(section.score), "split": "val",
               "scores": {label: item["score"] for label, item in summary.items()}, **counts,
               "plot": str(run_dir / "curves.png"), "seconds": round(time.time() - started, 1)}
    write_json(run_dir / "results.json", results)
    print(f"[{cfg.task.name}] visualize: {counts['curves_computed']} curve(s) computed, "
          f"{counts['curves_reused']} reused -> {run_dir / 'curves.png'}")
    return results
