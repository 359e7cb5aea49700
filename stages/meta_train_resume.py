"""Resuming run=meta_train: what its per-epoch checkpoint holds besides the metanetwork, the check that a rerun
may continue it, and the newest readable one.

A checkpoint ``checkpoints/epoch_{k:04d}.pt`` (``stages.artifacts.checkpoint_path``, written through
``nn.apply.save_metanetwork``) holds the weights, the optimiser and scheduler states, the loss history (one row per
epoch: the metrics CSV's), ``steps`` (per optimiser step ``[epoch, store index (or step within the epoch), CE, R,
|grad|]``), the RNG states (torch, CUDA, python, numpy and the loader's generator) and ``meta``: what a resumed run
must share with it (task, store, training data models, metanetwork knobs, seed, the ``task.meta_train`` values of
:data:`RESUME_KEYS`, under torchrun the number of ranks). Restored, they make a resumed run continue bit for bit
on the CPU. See [docs/stages.md](../docs/stages.md), "Meta-training".
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn as tnn

from nn.apply import save_metanetwork
from nn.graph import GraphCodec
from stages.artifacts import CHECKPOINT_DIR, checkpoint_path, list_checkpoints
from utils.checkpoint import CheckpointError, load_checkpoint, load_scheduler_state, plain_scheduler_state
from utils.seed import restore_rng, rng_state

log = logging.getLogger(__name__)

# task.meta_train values that a resumed run must share with the checkpoint (epochs may grow)
RESUME_KEYS = ("lr", "weight_decay", "milestones", "gamma", "pruner_reg", "alpha", "bias", "train_split",
               "reference_batches", "batches_per_step", "batch_size", "bn_mode", "iterations_per_step",
               "reg_projection", "max_batches_per_step", "max_steps_per_epoch")
# keys added later: what older checkpoints ran with
RESUME_DEFAULTS = {"bn_mode": "eval", "iterations_per_step": None, "reg_projection": "none",
                   "max_batches_per_step": None, "max_steps_per_epoch": None}


def save_epoch_checkpoint(run_dir: Path, epoch: int, metanetwork: tnn.Module, codec: GraphCodec,
                          options: Mapping[str, Any], task: str, *, optimizer: torch.optim.Optimizer,
                          scheduler: torch.optim.lr_scheduler.LRScheduler, history: list[dict], steps: list[list],
                          loader_generator: torch.Generator, meta: Mapping[str, Any]) -> Path:
    """Epoch ``epoch``'s checkpoint (module docstring), written atomically; the RNG states include
    ``loader_generator``'s (the meta-training loader's)."""
    return save_metanetwork(checkpoint_path(run_dir, epoch), metanetwork, codec, options, task, epoch,
                            optimizer=optimizer.state_dict(), scheduler=plain_scheduler_state(scheduler),
                            history=history, steps=steps, rng=rng_state(loader_generator), meta=meta)


def restore_checkpoint(path: Path, checkpoint: Mapping[str, Any], meta: Mapping[str, Any], codec: GraphCodec,
                       metanetwork: tnn.Module, optimizer: torch.optim.Optimizer,
                       scheduler: torch.optim.lr_scheduler.LRScheduler,
                       loader_generator: torch.Generator) -> tuple[list[dict], list[list]]:
    """Weights, optimiser, scheduler and RNG states of ``checkpoint`` (read from ``path``) loaded in place, after
    :func:`check_resumable` and the codec's layout check; returns its ``(history, steps)``."""
    check_resumable(path, checkpoint, meta)
    codec.check_layout(checkpoint["spec"]["layout"])
    metanetwork.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    load_scheduler_state(scheduler, checkpoint["scheduler"])
    history, steps = list(checkpoint["history"]), [list(s) for s in checkpoint["steps"]]
    restore_rng(checkpoint["rng"], loader_generator)  # iterations_per_step: reseeded per epoch anyway
    return history, steps


def newest_checkpoint(run_dir: Path) -> tuple[int, Path, dict] | None:
    for epoch, path in reversed(list_checkpoints(run_dir)):
        try:
            return epoch, path, load_checkpoint(path, map_location="cpu")
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None


def pick_checkpoint(run_dir: Path, resume: bool) -> tuple[int, str] | None:
    """(epoch, path) of the newest readable checkpoint, None for a fresh run (rank 0 under torchrun)."""
    found = list_checkpoints(run_dir)
    if found and not resume:
        raise FileExistsError(f"{run_dir / CHECKPOINT_DIR} already holds meta_train checkpoints and "
                              "meta_train.resume=false; use a fresh hydra.run.dir or meta_train.resume=true")
    newest = newest_checkpoint(run_dir) if found else None
    return None if newest is None else (newest[0], str(newest[1]))


def check_resumable(path: Path, checkpoint: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Refuse to continue a checkpoint made with other data, settings or metanetwork knobs."""
    saved = checkpoint.get("meta")
    required = ("optimizer", "scheduler", "history", "steps", "rng", "meta")
    missing = [k for k in required if k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a resumable meta_train checkpoint (lacks {missing}); use a fresh "
                              "hydra.run.dir")
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {meta[k]!r}" for k in ("task", "store", "train_indices",
                                                                               "options", "seed")
             if saved.get(k) != meta[k]]
    diffs += [f"task.meta_train.{k}: checkpoint {saved['settings'].get(k)!r}, now {v!r}"
              for k, v in meta["settings"].items() if saved["settings"].get(k, RESUME_DEFAULTS.get(k)) != v]
    if "world_size" in meta and saved.get("world_size", 1) != meta["world_size"]:
        diffs.append(f"ranks: checkpoint {saved.get('world_size', 1)}, now {meta['world_size']} (the shards and each "
                     f"rank's data model depend on it; relaunch with torchrun --nproc_per_node="
                     f"{saved.get('world_size', 1)})")
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run was started with other settings ({'; '.join(diffs)}). "
                         "Use a fresh hydra.run.dir, or restore the original settings (only task.meta_train.epochs "
                         "may change)")
