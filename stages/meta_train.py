"""Run mode ``meta_train``: meta-training of the graph metanetwork on the store's training data models
(reference §6, §9).

The gradient of one data model (the method's core: one backward through the GNN per step, the CE/regulariser
balance ``pruner_reg / reference_batches``) is ``training.meta_gradient``. This module runs it, in one of two
schemes:

* ``task.meta_train.iterations_per_step: null`` (the CIFAR-scale tasks; one process): one AdamW step per training
  data model, the data models in a seeded order every epoch; a step takes the next ``batches_per_step`` batches
  (null: one pass) of one stream of reshuffled passes over the task's training split (:class:`_BatchStream`);
* ``iterations_per_step: N`` (the authors' ImageNet step, under torchrun): rank r meta-trains training data model
  ``r mod count`` on its ``DistributedSampler`` shard with a step every N batches (gradients averaged over the
  ranks, ``training.meta_gradient.accumulated_step``), the trailing batches skipped, each epoch's batches seeded
  from (seed, epoch, rank).

MultiStepLR steps once per epoch. Outputs under the run dir: ``checkpoints/epoch_{k:04d}.pt`` every epoch (1-based;
``stages.artifacts``; with all that resuming needs, ``stages.meta_train_resume``), ``meta_train_metrics.csv`` and
``meta_train_diagnostics.png`` (``stages.meta_train_metrics``; rank 0 writes) and ``results.json``. A run dir that
holds checkpoints continues after the newest one (``meta_train.resume=true``), on the CPU bit-identical to an
uninterrupted run. A NaN/inf loss, regulariser or gradient raises ``FloatingPointError`` before the optimiser
step; the last checkpoint is the last good epoch. Each data model's codec and regulariser are built once per run
without touching the global RNG (:class:`_EntryCache`).

Reference: [docs/stages.md](../docs/stages.md), "Meta-training"; under torchrun:
[docs/distributed.md](../docs/distributed.md).
"""
from __future__ import annotations

import logging
import math
import random
import time
from itertools import islice
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn as tnn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from data_loaders.store import DataModelStore
from nn.apply import build_metanetwork
from nn.graph import GraphCodecError
from pruning.regularizer import REG_PROJECTIONS
from stages import ddp
from stages.artifacts import list_checkpoints
from stages.common import codec_options, example_input, setup, task_data
from stages.meta_train_metrics import DIAGNOSTICS_PNG, METRICS_CSV, plot_quietly, write_metrics
from stages.meta_train_resume import RESUME_KEYS, pick_checkpoint, restore_checkpoint, save_epoch_checkpoint
from training.meta_gradient import (BN_MODES, DIAGNOSTIC_COLUMNS, DataModelEntry, StepResult, accumulated_step,
                                    build_entry, grad_norm, meta_gradient)
from utils.checkpoint import load_checkpoint
from utils.distributed import (all_gather_objects, is_distributed, is_main_process, rank, run_on_every_rank,
                               run_on_main, world_size)
from utils.seed import derive_seed, seed_worker
from utils.tracking import log_metrics

log = logging.getLogger(__name__)

__all__ = [
    "MetaTrainSettings",
    "meta_loader",
    "sharded_loader",
    "rank_data_model",
    "run",
]

# every key task.meta_train may hold (a misspelt one is refused instead of silently ignored)
_SECTION_KEYS = frozenset({"epochs", "optimizer", "lr", "weight_decay", "milestones", "gamma", "pruner_reg", "alpha",
                           "bias", "train_split", "reference_batches", "batches_per_step", "batch_size", "bn_mode",
                           "iterations_per_step", "reg_projection", "max_batches_per_step", "max_steps_per_epoch"})


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaTrainSettings:
    """``task.meta_train`` (see configs/task/*.yaml) with defaults resolved."""

    epochs: int
    lr: float
    weight_decay: float
    milestones: tuple[int, ...]
    gamma: float
    pruner_reg: float
    alpha: float
    bias: bool
    train_split: float
    reference_batches: int | None
    batches_per_step: int | None
    batch_size: int
    # BatchNorm in the CE forward: "eval" (the reference: the data model's running statistics) or "batch"
    # (each batch's statistics, as the after_metanetwork fine-tune will see them; running stats untouched)
    bn_mode: str = "eval"
    # the authors' ImageNet step (module docstring): accumulate this many batches of the rank's shard per
    # optimiser step, one data model per rank, gradients averaged over the ranks; None = one step per data model
    iterations_per_step: int | None = None
    # not the paper's ("none"): scale_free / shrink_only drop each tensor's own-direction component of the
    # regulariser gradient (pruning.regularizer, "Projected variants"), so R cannot be lowered by shrinking whole
    # layers alike
    reg_projection: str = "none"
    # caps for a quick check of a run (configs/debug/): batches per optimiser step in either scheme (the smaller of
    # this and batches_per_step / iterations_per_step / one pass), and optimiser steps per epoch; None = no cap
    max_batches_per_step: int | None = None
    max_steps_per_epoch: int | None = None

    @classmethod
    def from_task(cls, task: DictConfig) -> "MetaTrainSettings":
        where = f"configs/task/{task.get('name', '<task>')}.yaml"
        section = task.get("meta_train")
        if section is None:
            raise KeyError(f"{where} has no `task.meta_train` section; meta_train needs one")
        required = ("epochs", "lr", "weight_decay", "milestones", "gamma", "pruner_reg", "alpha", "bias",
                    "train_split", "reference_batches")
        missing = [k for k in required if k not in section]
        if missing:
            raise KeyError(f"{where}: task.meta_train lacks {missing}; add them (see configs/task/resnet56_on_CIFAR10.yaml)")
        unknown = sorted(set(section) - _SECTION_KEYS)
        if unknown:
            raise KeyError(f"{where}: unknown key(s) task.meta_train.{', task.meta_train.'.join(unknown)}; valid: "
                           f"{', '.join(sorted(_SECTION_KEYS))}")
        optimizer = str(section.get("optimizer", "adamw")).lower()
        if optimizer != "adamw":
            raise ValueError(f"{where}: task.meta_train.optimizer={optimizer!r}; meta-training uses adamw (reference §6)")

        def read(key, kind, default=None, optional=False):
            value = section.get(key, default)
            if optional and value is None:
                return None
            try:
                if kind is tuple:  # milestones: a list, or the reference's "3,10" string
                    items = value.split(",") if isinstance(value, str) else list(value)
                    return tuple(int(x) for x in items if str(x).strip())
                if kind is bool and not isinstance(value, bool):
                    raise ValueError("expected true or false")
                if kind is int and (isinstance(value, bool) or (isinstance(value, float) and not value.is_integer())):
                    raise ValueError("expected a whole number")
                converted = kind(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{where}: task.meta_train.{key}={value!r} is not a valid {kind.__name__} "
                                 f"({err})") from None
            if kind is float and not math.isfinite(converted):
                raise ValueError(f"{where}: task.meta_train.{key}={value!r} must be finite")
            return converted

        settings = cls(
            epochs=read("epochs", int), lr=read("lr", float), weight_decay=read("weight_decay", float),
            milestones=read("milestones", tuple), gamma=read("gamma", float), pruner_reg=read("pruner_reg", float),
            alpha=read("alpha", float), bias=read("bias", bool), train_split=read("train_split", float),
            reference_batches=read("reference_batches", int, optional=True),
            batches_per_step=read("batches_per_step", int, optional=True),
            batch_size=read("batch_size", int) if section.get("batch_size") is not None else int(task.batch_size),
            bn_mode=str(section.get("bn_mode", "eval")),
            iterations_per_step=read("iterations_per_step", int, optional=True),
            reg_projection=str(section.get("reg_projection", "none")),
            max_batches_per_step=read("max_batches_per_step", int, optional=True),
            max_steps_per_epoch=read("max_steps_per_epoch", int, optional=True),
        )
        if settings.bn_mode not in BN_MODES:
            raise ValueError(f"{where}: task.meta_train.bn_mode={settings.bn_mode!r}; valid: {', '.join(BN_MODES)}")
        if settings.reg_projection not in REG_PROJECTIONS:
            raise ValueError(f"{where}: task.meta_train.reg_projection={settings.reg_projection!r}; valid: "
                             f"{', '.join(REG_PROJECTIONS)}")
        for key in ("epochs", "batch_size", "reference_batches", "batches_per_step", "iterations_per_step",
                    "max_batches_per_step", "max_steps_per_epoch"):
            value = getattr(settings, key)
            if value is not None and value < 1:
                raise ValueError(f"{where}: task.meta_train.{key}={value} must be >= 1 (or null where allowed)")
        if settings.iterations_per_step is not None and settings.batches_per_step is not None:
            raise ValueError(
                f"{where}: task.meta_train.iterations_per_step={settings.iterations_per_step} and "
                f"task.meta_train.batches_per_step={settings.batches_per_step} are both set; batches_per_step belongs "
                "to the one-step-per-data-model scheme, iterations_per_step to the authors' ImageNet step (one data "
                "model per rank): set one of them to null")
        if settings.lr <= 0 or settings.pruner_reg < 0 or not 0 < settings.train_split <= 1:
            raise ValueError(f"{where}: task.meta_train needs lr > 0, pruner_reg >= 0 and 0 < train_split <= 1; got "
                             f"lr={settings.lr}, pruner_reg={settings.pruner_reg}, train_split={settings.train_split}")
        if settings.alpha < 1:
            raise ValueError(f"{where}: task.meta_train.alpha={settings.alpha} must be >= 1 (gamma lies in [1, alpha])")
        return settings

    def resume_view(self) -> dict:
        values = asdict(self)
        values["milestones"] = list(self.milestones)
        return {k: values[k] for k in RESUME_KEYS}

    def capped(self, batches: int) -> int:
        """A step of ``batches`` batches after ``max_batches_per_step``."""
        return batches if self.max_batches_per_step is None else min(batches, self.max_batches_per_step)

    def steps(self, steps: int) -> int:
        """``steps`` optimiser steps per epoch after ``max_steps_per_epoch``."""
        return steps if self.max_steps_per_epoch is None else min(steps, self.max_steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# The training split, one stream of passes (iterations_per_step: null)
# ----------------------------------------------------------------------------------------------
def meta_loader(dataset: Any, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """Shuffled loader of the training split for meta-training, its order from a seeded generator.

    One pass per iterator; meta-training reads it through :class:`_BatchStream` (one iterator per epoch over
    successive passes). Workers are not persistent: every iterator starts workers seeded from the generator, so
    the generator's state (saved in each checkpoint) fixes all later batches and augmentations and a resumed run
    is exact.
    """
    generator = torch.Generator().manual_seed(derive_seed(seed, "meta_train_loader"))
    return DataLoader(dataset, batch_size=int(batch_size), shuffle=True, generator=generator,
                      num_workers=int(num_workers), worker_init_fn=seed_worker, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


class _Passes(torch.utils.data.Sampler):
    """Batches of index lists over successive shuffled passes of ``size`` items, without end.

    Each pass is the batch sampler of a ``DataLoader(shuffle=True, generator=generator)`` (torch's own
    ``BatchSampler(RandomSampler)``, the last batch short); before every pass but the first it draws the one number
    a fresh loader iterator draws from the generator (its workers' base seed), so the generator's stream, hence
    every batch, equals that of one iterator per pass, and so does the generator's state between batches (draws
    stay lazy, as torch's). ``len`` is the batches of one pass.
    """

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = int(size), int(batch_size), generator

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.size == 0:
            raise ValueError("the meta-training loader yields no batch (empty training split)")
        one_pass = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(self.size),
                                                                                generator=self.generator),
                                                 self.batch_size, drop_last=False)
        yield from one_pass
        while True:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # what a fresh iterator draws
            yield from one_pass


class _BatchStream:
    """Successive batches of ``loader``'s passes (each reshuffled), read through one iterator per epoch.

    ``loader``: a :func:`meta_loader` (shuffled, seeded generator, last batch kept). The stream reads the same
    dataset with the same workers, collation and generator through :class:`_Passes`, so a new pass does not start
    new workers; :meth:`restart` (every epoch start) does, as a fresh loader iterator would. A step's batches
    run on across a pass boundary.
    """

    def __init__(self, loader: DataLoader):
        if not isinstance(loader.sampler, torch.utils.data.RandomSampler) or loader.drop_last:
            raise ValueError("_BatchStream needs a shuffled loader that keeps its last batch (meta_loader)")
        self.loader = loader
        self._passes = DataLoader(
            loader.dataset, batch_sampler=_Passes(len(loader.dataset), int(loader.batch_size), loader.generator),
            num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn, generator=loader.generator, timeout=loader.timeout,
            multiprocessing_context=loader.multiprocessing_context)
        self._it: Iterator | None = None

    def restart(self) -> None:
        """Start over with a new (reshuffled) pass and fresh workers; the unread rest is dropped."""
        self._it = None  # the old iterator's workers shut down once it is released

    def take(self, count: int) -> Iterator:
        for _ in range(count):
            if self._it is None:
                self._it = iter(self._passes)
            yield next(self._it)


# ----------------------------------------------------------------------------------------------
# iterations_per_step: the authors' ImageNet step (one data model per rank, gradients averaged)
# ----------------------------------------------------------------------------------------------
def rank_data_model(train_idx: list[int], rank_: int) -> int:
    """The store index rank ``rank_`` meta-trains on: training data model ``rank_ mod count`` (reference §9)."""
    return train_idx[rank_ % len(train_idx)]


def sharded_loader(dataset: Any, batch_size: int, num_workers: int, seed: int, rank_: int = 0,
                   world: int = 1) -> DataLoader:
    """Rank ``rank_``'s shard of the training split: a ``DistributedSampler`` (shuffled, padded so every rank has
    as many batches, call ``sampler.set_epoch`` per epoch) and an own generator for the workers' seeds, which
    :func:`_seed_epoch` reseeds every epoch. Works without torchrun (``world=1``: the whole split)."""
    sampler = DistributedSampler(dataset, num_replicas=int(world), rank=int(rank_), shuffle=True,
                                 seed=derive_seed(seed, "meta_train_sampler"), drop_last=False)
    return DataLoader(dataset, batch_size=int(batch_size), sampler=sampler, generator=torch.Generator(),
                      num_workers=int(num_workers), worker_init_fn=seed_worker, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False)


def _seed_epoch(loader: DataLoader, seed: int, epoch: int) -> None:
    """Make an epoch's batches and augmentations a function of (seed, epoch, rank) only: what makes a run
    resumed at an epoch start identical to an uninterrupted one, whatever the RNGs did before."""
    value = derive_seed(seed, "meta_train_epoch", epoch, rank())
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)
    loader.generator.manual_seed(derive_seed(seed, "meta_train_loader", epoch, rank()))
    loader.sampler.set_epoch(epoch)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def _epoch_order(indices: list[int], seed: int, epoch: int) -> list[int]:
    """The data models' order in ``epoch``: a permutation from a seed derived from (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "meta_train_order", epoch))
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


class _EntryCache:
    """Store index -> :class:`DataModelEntry`, built on first use without touching the global RNG."""

    def __init__(self, store: DataModelStore, device: torch.device, task: DictConfig, method: Mapping[str, Any],
                 settings: MetaTrainSettings, codec: Mapping[str, Any]):
        self.store, self.device, self.task, self.method, self.settings = store, device, task, method, settings
        self.codec = dict(codec)  # GraphCodec keywords (stages.common.codec_options), input_shape included
        self.entries: dict[int, DataModelEntry] = {}
        self.layout: dict | None = None

    def __call__(self, index: int) -> DataModelEntry:
        entry = self.entries.get(index)
        if entry is not None:
            return entry
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # model building initialises weights randomly
            record = self.store[index]
            name = f"{record.shard}#{record.position}"
            model = record.build_model().to(self.device)
            entry = build_entry(index, model, example_input(self.task, self.device), self.method, self.settings,
                                iterative_steps=int(self.task.get("pruning", {}).get("iterative_steps", 200)),
                                name=name, **self.codec)
        if self.layout is None:
            self.layout = entry.codec.layout
        else:
            try:
                entry.codec.check_layout(self.layout)
            except GraphCodecError as err:
                raise GraphCodecError(f"data model {name} of store {self.store.path} has another graph layout than "
                                      f"the first training data model: {err}") from None
        self.entries[index] = entry
        return entry


@dataclass
class _Training:
    """The state of a meta-training run: what every epoch updates and every checkpoint saves."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    settings: MetaTrainSettings
    store: DataModelStore
    train_idx: list[int]
    loader: DataLoader
    batches_per_step: int
    entries: _EntryCache
    # the first training data model (iterations_per_step: this rank's own): its codec sizes the metanetwork and
    # its layout is saved
    first: DataModelEntry
    options: dict  # the metanetwork's constructor knobs (configs/metanetwork)
    metanetwork: tnn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR
    meta: dict  # what a resumed run must share with the checkpoint (_check_resumable)
    history: list[dict] = field(default_factory=list)  # one row per epoch (meta_train_metrics.csv)
    steps: list[list] = field(default_factory=list)  # [epoch, store index (or step), CE, R, |grad|] per step
    sharded: bool = False  # iterations_per_step mode (module docstring)
    steps_per_epoch: int = 0  # iterations_per_step mode: optimiser steps per epoch


def _meta_train_data(cfg: DictConfig, settings: MetaTrainSettings) -> tuple[DataModelStore, list[int], list[int],
                                                                          DataLoader, int]:
    """The store's training / held-out data models and the seeded loader of the task's training split."""
    task = cfg.task
    store = DataModelStore(cfg.store, expect={"task": task.name, "architecture": task.model})
    train_idx, val_idx = store.split(settings.train_split)
    if not train_idx:
        raise ValueError(f"store {store.path} has no training data model for train_split={settings.train_split}")
    splits, _ = task_data(task, cfg.seed)
    if settings.iterations_per_step is not None:
        loader = _sharded_data(cfg, settings, store, train_idx, val_idx, splits.train)
        return store, train_idx, val_idx, loader, settings.capped(settings.iterations_per_step)
    loader = meta_loader(splits.train, settings.batch_size, int(task.dataset.get("num_workers", 0)), cfg.seed)
    batches_per_step = settings.capped(settings.batches_per_step or len(loader))
    scale_note = ("plain sum over batches (reference_batches=null)" if settings.reference_batches is None else
                  f"{settings.reference_batches} x mean batch CE")
    log.info("meta_train: %d training data models (store %s), %d held out; %d batches of %d per step "
             "(%d per pass); gradient = %s + regulariser (pruner_reg=%g, alpha=%g)", len(train_idx), store.path,
             len(val_idx), batches_per_step, settings.batch_size, len(loader), scale_note, settings.pruner_reg,
             settings.alpha)
    return store, train_idx, val_idx, loader, batches_per_step


def _sharded_data(cfg: DictConfig, settings: MetaTrainSettings, store: DataModelStore, train_idx: list[int],
                  val_idx: list[int], train_split: Any) -> DataLoader:
    """iterations_per_step mode: this rank's shard loader; refuses a shard shorter than one step."""
    world = world_size()
    loader = sharded_loader(train_split, settings.batch_size, int(cfg.task.dataset.get("num_workers", 0)),
                            int(cfg.seed), rank(), world)
    batches, step = len(loader), settings.capped(int(settings.iterations_per_step))
    if batches < step:
        raise ValueError(
            f"configs/task/{cfg.task.name}.yaml: task.meta_train.iterations_per_step={step} is more than the {batches} "
            f"batches of a rank's shard ({len(train_split)} training images / {world} rank(s) / batch_size "
            f"{settings.batch_size}): an epoch would take no step. Lower task.meta_train.iterations_per_step or "
            "task.meta_train.batch_size, or run fewer ranks")
    if is_main_process():
        models = [rank_data_model(train_idx, r) for r in range(world)]
        log.info("meta_train: %d rank(s), rank r meta-trains training data model r mod %d (store indices %s; "
                 "store %s, %d held out); shard of %d images = %d batches of %d, %d optimiser step(s) of %d "
                 "batches per epoch (%d trailing batch(es) skipped); gradient = %s + regulariser (pruner_reg=%g, "
                 "alpha=%g), averaged over the ranks", world, len(train_idx), models, store.path, len(val_idx),
                 len(loader.sampler), batches, settings.batch_size, settings.steps(batches // step), step,
                 batches - step * settings.steps(batches // step),
                 "plain sum over batches" if settings.reference_batches is None else
                 f"{settings.reference_batches} x mean batch CE", settings.pruner_reg, settings.alpha)
        if world < len(train_idx):
            log.warning("meta_train: %d rank(s) but %d training data models: only store indices %s are meta-trained "
                        "(each rank takes data model rank mod %d, as the reference); launch torchrun with "
                        "--nproc_per_node >= %d to use them all", world, len(train_idx), models, len(train_idx),
                        len(train_idx))
    return loader


def _start_training(cfg: DictConfig, run_dir: Path, device: torch.device, settings: MetaTrainSettings,
                    store: DataModelStore, train_idx: list[int], loader: DataLoader,
                    batches_per_step: int) -> _Training:
    """The metanetwork (sized by the first training data model's codec), AdamW and MultiStepLR."""
    task = cfg.task
    method = OmegaConf.to_container(cfg.method, resolve=True)
    options = OmegaConf.to_container(cfg.metanetwork, resolve=True)
    entries = _EntryCache(store, device, task, method, settings, codec_options(cfg))
    sharded = settings.iterations_per_step is not None
    if not sharded:
        first = entries(train_idx[0])
    else:  # this rank's own data model; every rank's must have rank 0's graph layout
        own = rank_data_model(train_idx, rank())
        first = run_on_every_rank(lambda: entries(own), f"building data model {own} of store {store.path}")
        if is_distributed():
            layouts = all_gather_objects(first.codec.layout)
            run_on_every_rank(lambda: first.codec.check_layout(layouts[0]),
                           f"graph layout of data model {first.name} vs rank 0's")
    metanetwork = build_metanetwork(first.codec, options).to(device)
    ddp.same_weights_everywhere(metanetwork)  # under torchrun every rank starts from rank 0's initial weights
    optimizer = torch.optim.AdamW(metanetwork.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(settings.milestones),
                                                     gamma=settings.gamma)
    meta = {"task": str(task.name), "store": str(store.path), "train_indices": list(train_idx),
            "settings": settings.resume_view(), "options": options, "seed": int(cfg.seed)}
    state = _Training(cfg, run_dir, device, settings, store, train_idx, loader, batches_per_step, entries, first,
                      options, metanetwork, optimizer, scheduler, meta)
    if sharded:
        state.sharded = True
        state.steps_per_epoch = settings.steps(len(loader) // batches_per_step)
        meta["world_size"] = world_size()  # the shards and each rank's data model depend on it
    return state


def _resume(state: _Training, resume: bool) -> int:
    """Continue from the newest readable checkpoint of the run dir (weights, optimiser, scheduler, history, RNG);
    returns the epoch it finished (0 for a fresh run)."""
    picked = run_on_main(pick_checkpoint, state.run_dir, resume)  # under torchrun: rank 0 picks, all ranks load it
    if picked is None:
        return 0
    start_epoch, path = picked[0], Path(picked[1])
    checkpoint = run_on_every_rank(lambda: load_checkpoint(path, map_location="cpu"), f"reading {path}")
    run_on_every_rank(lambda: _load_checkpoint_state(state, path, checkpoint), f"resuming from {path}")
    if is_main_process():
        log.info("resuming from %s (epoch %d of %d)", path, start_epoch, state.settings.epochs)
    return start_epoch


def _load_checkpoint_state(state: _Training, path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Weights, optimiser, scheduler, history and RNG states of ``checkpoint`` into ``state`` (after checks)."""
    state.history, state.steps = restore_checkpoint(path, checkpoint, state.meta, state.first.codec,
                                                    state.metanetwork, state.optimizer, state.scheduler,
                                                    state.loader.generator)


def _step(state: _Training, epoch: int, index: int, stream: _BatchStream) -> tuple[StepResult, float]:
    """One optimiser step on store data model ``index``; returns the step's scalars and gradient norm."""
    settings, metanetwork = state.settings, state.metanetwork
    entry = state.entries(index)
    metanetwork.train()
    state.optimizer.zero_grad(set_to_none=True)
    result = meta_gradient(metanetwork, entry, stream.take(state.batches_per_step), settings.reference_batches,
                           settings.alpha, settings.bias, state.device, bn_mode=settings.bn_mode,
                           reg_projection=settings.reg_projection)
    norm = grad_norm(metanetwork)
    bad = [what for what, v in (("cross-entropy", result.ce), ("regulariser", result.reg),
                                ("metanetwork gradient norm", norm)) if not math.isfinite(v)]
    if bad:
        last = list_checkpoints(state.run_dir)
        raise FloatingPointError(
            f"meta_train: non-finite {', '.join(bad)} (CE={result.ce}, R={result.reg}, |grad|={norm}) at "
            f"epoch {epoch}, data model {entry.name} (store index {index}, store {state.store.path}); the "
            f"metanetwork was not updated by this step. Last good checkpoint: "
            f"{last[-1][1] if last else 'none (failed in the first epoch)'}. Lower task.meta_train.lr "
            "or check that data model."
        )
    state.optimizer.step()
    state.steps.append([epoch, int(index), result.ce, result.reg, norm])
    return result, norm


def _throughput(state: _Training, started: float, batches: int) -> dict:
    """An epoch's seconds, images/s (``batches`` of batch_size on every rank) and, on CUDA, peak memory."""
    seconds = time.time() - started
    row = {"seconds": round(seconds, 3),
           "images_per_s": batches * state.settings.batch_size * world_size() / max(seconds, 1e-9)}
    if state.device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(state.device) / 2**30
    return row


def _epoch_started(state: _Training) -> float:
    if state.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(state.device)
    return time.time()


def _epoch(state: _Training, epoch: int, stream: _BatchStream) -> dict:
    """One epoch: a step per training data model (seeded order), then the scheduler; returns the epoch's row."""
    epoch_started = _epoch_started(state)
    lr = float(state.optimizer.param_groups[0]["lr"])
    stream.restart()
    records = []
    order = _epoch_order(state.train_idx, state.cfg.seed, epoch)
    bar = tqdm(order[:state.settings.steps(len(order))], desc=f"epoch {epoch} data models",
               leave=False, disable=None)
    for index in bar:
        result, norm = _step(state, epoch, index, stream)
        records.append({"ce": result.ce, "reg": result.reg, "grad_norm": norm, "batches": result.batches,
                        **{key: getattr(result, key) for key in DIAGNOSTIC_COLUMNS}})
        bar.set_postfix(ce=f"{result.ce:.4f}", reg=f"{result.reg:.4g}")
    state.scheduler.step()
    means = {key: float(np.mean([r[key] for r in records])) for key in ("ce", "reg", *DIAGNOSTIC_COLUMNS, "grad_norm")}
    return {"epoch": epoch, "lr": lr, **means,
            **_throughput(state, epoch_started, sum(r["batches"] for r in records))}


def _sharded_epoch(state: _Training, epoch: int) -> dict:
    """iterations_per_step mode: one pass over this rank's shard, a step every ``iterations_per_step`` batches
    (trailing ones skipped), then the scheduler; returns the epoch's row (means over steps of rank means)."""
    epoch_started = _epoch_started(state)
    settings, metanetwork, entry = state.settings, state.metanetwork, state.first
    lr = float(state.optimizer.param_groups[0]["lr"])
    _seed_epoch(state.loader, int(state.cfg.seed), epoch)
    records = []
    batches = iter(state.loader)
    bar = tqdm(range(1, state.steps_per_epoch + 1), desc=f"epoch {epoch} steps", leave=False,
               disable=None if is_main_process() else True)
    try:
        for step in bar:
            metanetwork.train()
            result, norm = accumulated_step(metanetwork, entry, islice(batches, state.batches_per_step),
                                            settings.reference_batches, settings.alpha, settings.bias, state.device,
                                            bn_mode=settings.bn_mode, reg_projection=settings.reg_projection)
            if result.batches != state.batches_per_step:  # the sampler promised len(loader) batches
                raise RuntimeError(f"meta_train: the shard loader ran out after {result.batches} of "
                                   f"{state.batches_per_step} batches in step {step} of epoch {epoch}")
            bad = [what for what, v in (("cross-entropy", result.ce), ("regulariser", result.reg),
                                        ("metanetwork gradient norm", norm)) if not math.isfinite(v)]
            if bad:  # the values are rank means / the averaged gradient: every rank stops here together
                last = list_checkpoints(state.run_dir)
                raise FloatingPointError(
                    f"meta_train: non-finite {', '.join(bad)} (mean over ranks: CE={result.ce}, R={result.reg}, "
                    f"|grad|={norm}) at epoch {epoch}, step {step} of {state.steps_per_epoch} (this rank's data "
                    f"model {entry.name}, store index {entry.index}, store {state.store.path}); the metanetwork "
                    f"was not updated by this step. Last good checkpoint: "
                    f"{last[-1][1] if last else 'none (failed in the first epoch)'}. Lower task.meta_train.lr "
                    "or check the data models")
            state.optimizer.step()
            state.steps.append([epoch, step, result.ce, result.reg, norm])
            records.append({"ce": result.ce, "reg": result.reg, "grad_norm": norm,
                            **{key: getattr(result, key) for key in DIAGNOSTIC_COLUMNS}})
            bar.set_postfix(ce=f"{result.ce:.4f}", reg=f"{result.reg:.4g}")
    finally:
        del batches  # shuts its workers down (the trailing batches are never read)
    state.scheduler.step()
    means = {key: float(np.mean([r[key] for r in records])) for key in ("ce", "reg", *DIAGNOSTIC_COLUMNS, "grad_norm")}
    return {"epoch": epoch, "lr": lr, **means, "steps": len(records),
            **_throughput(state, epoch_started, len(records) * state.batches_per_step)}


def _save_epoch(state: _Training, epoch: int, row: dict) -> None:
    """Checkpoint (weights, optimiser, scheduler, history, steps, RNG), metrics CSV and diagnostics plot; under
    torchrun rank 0 writes them (its failure ends every rank)."""
    state.history.append(row)
    run_on_main(_write_epoch, state, epoch, row)


def _write_epoch(state: _Training, epoch: int, row: dict) -> None:
    save_epoch_checkpoint(state.run_dir, epoch, state.metanetwork, state.first.codec, state.options,
                          str(state.cfg.task.name), optimizer=state.optimizer, scheduler=state.scheduler,
                          history=state.history, steps=state.steps, loader_generator=state.loader.generator,
                          meta=state.meta)
    write_metrics(state.run_dir / METRICS_CSV, state.history)
    log_metrics("meta_train", row, step=epoch)  # the CSV row, to the logger= experiment tracker
    plot_quietly(state.history, state.run_dir / DIAGNOSTICS_PNG)
    log.info("meta_train epoch %d/%d: lr %.3g, CE %.4f, R %.4g, small groups %.3f (input %.3f), "
             "weight change %.4g, channel norm ratio p10/p90 %.3g/%.3g, |grad| %.4g (CE part %.4g, regulariser "
             "part %.4g), %.1f s, %.0f img/s", epoch, state.settings.epochs, row["lr"], row["ce"], row["reg"],
             row["small_group_share"], row["small_group_share_input"], row["weight_change"],
             row.get("norm_ratio_p10", math.nan), row.get("norm_ratio_p90", math.nan), row["grad_norm"], row["grad_ce_norm"],
             row["grad_reg_norm"], row["seconds"], row["images_per_s"])
    if "steps" in row:
        log.info("meta_train epoch %d: %d optimiser step(s) of %d batches per rank on %d rank(s)", epoch,
                 row["steps"], state.batches_per_step, world_size())


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``meta_train``: meta-train the metanetwork on the store's training data models (module
    docstring); returns ``results.json`` (history, checkpoints, the CE/regulariser balance)."""
    run_dir = Path(run_dir)
    device = setup(cfg)
    settings = MetaTrainSettings.from_task(cfg.task)
    if is_distributed() and settings.iterations_per_step is None:
        raise ValueError(
            f"run=meta_train under torchrun needs task.meta_train.iterations_per_step (the authors' ImageNet step: one "
            f"data model per rank, gradients averaged over the ranks); configs/task/{cfg.task.name}.yaml has null (one "
            "step per data model, a single-process scheme). Set task.meta_train.iterations_per_step=N (and "
            "task.meta_train.batches_per_step=null), or launch with python instead of torchrun")
    resume = bool(cfg.get("meta_train", {}).get("resume", True))
    store, train_idx, val_idx, loader, batches_per_step = _meta_train_data(cfg, settings)
    state = _start_training(cfg, run_dir, device, settings, store, train_idx, loader, batches_per_step)
    start_epoch = _resume(state, resume)

    main = is_main_process()
    epochs = tqdm(range(start_epoch + 1, settings.epochs + 1), desc="meta_train epochs",
                  disable=None if main else True, initial=start_epoch, total=settings.epochs)
    if state.sharded:
        for epoch in epochs:
            _save_epoch(state, epoch, _sharded_epoch(state, epoch))
    else:
        stream = _BatchStream(loader)
        for epoch in epochs:
            _save_epoch(state, epoch, _epoch(state, epoch, stream))

    history = state.history
    if main and not (run_dir / METRICS_CSV).exists() and history:
        write_metrics(run_dir / METRICS_CSV, history)
    if main and history and not (run_dir / DIAGNOSTICS_PNG).exists():
        plot_quietly(history, run_dir / DIAGNOSTICS_PNG)
    checkpoints = [str(p.relative_to(run_dir)) for _e, p in list_checkpoints(run_dir)]
    if main:
        log.info("meta_train done: %d epochs", len(history))
    summary = {
        "run": "meta_train",
        "task": str(cfg.task.name),
        "store": str(store.path),
        "seed": int(cfg.seed),
        "device": str(device),
        "train_data_models": list(train_idx),
        "val_data_models": list(val_idx),
        "epochs": len(history),
        "resumed_from_epoch": start_epoch or None,
        "balance": {"reference_batches": settings.reference_batches, "batches_per_step": batches_per_step,
                    "batch_size": settings.batch_size, "pruner_reg": settings.pruner_reg, "alpha": settings.alpha,
                    "reg_per_mean_ce": (settings.pruner_reg / settings.reference_batches
                                        if settings.reference_batches else None)},
        "final": history[-1] if history else None,
        "history": history,
        "checkpoints": checkpoints,
        "last_checkpoint": checkpoints[-1] if checkpoints else None,
        "metrics_csv": METRICS_CSV,
        "diagnostics_png": DIAGNOSTICS_PNG if (run_dir / DIAGNOSTICS_PNG).exists() else None,
    }
    if state.sharded:
        used = [rank_data_model(train_idx, r) for r in range(world_size())]
        summary["iterations_per_step"] = {
            "world_size": world_size(), "iterations_per_step": batches_per_step,
            "steps_per_epoch": state.steps_per_epoch, "batches_per_epoch": len(loader),
            "skipped_batches_per_epoch": len(loader) % batches_per_step, "rank_data_models": used,
            "unused_train_data_models": [i for i in train_idx if i not in used],
        }
    return summary


