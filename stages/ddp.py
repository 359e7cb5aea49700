"""The torchrun / DDP glue every stage shares, in one place, so that each run mode follows the same rules:

* whatever sets weights or structure outside training (init pruning, final pruning, a metanetwork pass, a model
  loaded from rank 0's file) is computed on rank 0 and broadcast (:func:`make_on_main`, :func:`change_on_main`);
  every rank then rebuilds rank 0's model and checks its layer widths against rank 0's
  (:func:`check_same_structure`), so all ranks train one structure. A change that keeps the widths may instead
  run on every rank followed by :func:`same_weights_everywhere` (select's metanetwork pass: rank 0's weights are
  all the other ranks need);
* training is a DDP training on the rank's ``DistributedSampler`` shard (:func:`train`), after which
  every rank takes rank 0's weights and buffers (:func:`same_weights_everywhere`);
* only rank 0 logs (:func:`main_process_only`, :func:`quiet`).

Why rank 0 and broadcast rather than the same computation on every rank: pruning ranks channels by the weights and,
with ``method=random``, by each rank's random generator; a metanetwork pass sums in an order that may differ between
processes and devices. Computed once, the ranks cannot diverge, at the same wall time (the reference, too, prunes
in a single process: its ``prune`` step runs with ``no_distribution=True``). A failure on rank 0 ends every rank
with its message (``utils.distributed.run_on_main``).

Without torchrun every helper is a plain call (or a no-op), so the stages run the same code in one process.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from generate_dataset.models import model_from_state_dict, model_spec
from training.config import TrainConfig
from training import loop
from training.loop import TrainResult
from utils import distributed


def main_process_only(_record: logging.LogRecord) -> bool:
    """A logging filter (``log.addFilter(main_process_only)``): under torchrun only rank 0's records pass, so a
    stage's log reads as one run's."""
    return distributed.is_main_process()


def quiet(_message: str) -> None:
    """``training.loop.train``'s per-epoch log lines on ranks other than 0 (rank 0 logs the all-reduced ones)."""


def sync_bn_setting(cfg: DictConfig) -> bool:
    """``distributed.sync_bn`` of a run; False when the config has no ``distributed`` section (``main.yaml``)."""
    return bool((cfg.get("distributed") or {}).get("sync_bn", False))


def check_same_structure(model: nn.Module, architecture: str, num_classes: int, when: str) -> None:
    """Under torchrun: raise on every rank (naming both) unless every rank's model has rank 0's layer widths;
    ``when`` names the step in the error."""
    if distributed.is_distributed():
        widths = model_spec(architecture, model, num_classes)["widths"]
        distributed.check_same_on_all_ranks(widths, f"the layer widths {when}")


def same_weights_everywhere(model: nn.Module) -> None:
    """Under torchrun every rank takes rank 0's parameters and buffers: DDP keeps the parameters equal, but each
    rank's BatchNorm statistics end on its own last batches (and a start model may differ per rank)."""
    if distributed.is_distributed():
        for tensor in model.state_dict().values():  # views of the model's own tensors: filled in place
            dist.broadcast(tensor, src=0)


def make_on_main(make: Callable[[], tuple[nn.Module, Any]], architecture: str, num_classes: int,
                 device: torch.device, when: str) -> tuple[nn.Module, Any]:
    """``make() -> (model, result)`` on rank 0 only (load, prune, ...); returns rank 0's model and ``result``
    (picklable; keep tensors on the CPU) on every rank. Under torchrun every rank, rank 0 included, gets a NEW model
    rebuilt from rank 0's state dict (``model_from_state_dict``, eval mode, on ``device``), checked to have rank 0's
    widths. Rebuilding rank 0's too gives every rank the same parameter order, which DDP requires and in-place
    pruning does not keep (``torch.nn.utils.prune.remove`` re-registers a weight after its bias)."""
    if not distributed.is_distributed():
        return make()

    def run() -> tuple[dict, Any]:
        model, result = make()
        return {key: value.detach().cpu() for key, value in model.state_dict().items()}, result

    state, result = distributed.run_on_main(run)
    model = model_from_state_dict(architecture, state, num_classes).to(device)
    check_same_structure(model, architecture, num_classes, when)
    return model, result


def change_on_main(model: nn.Module, change: Callable[[nn.Module], Any], architecture: str, num_classes: int,
                   device: torch.device, when: str) -> tuple[nn.Module, Any]:
    """``change(model)`` (in place: pruning, a metanetwork pass) on rank 0 only; returns ``(model, result)`` with
    rank 0's changed model (in ``model``'s train/eval mode) and ``change``'s result on every rank. Under torchrun
    the model is a new one (:func:`make_on_main`): use the returned model."""
    if not distributed.is_distributed():
        return model, change(model)
    training = model.training
    changed, result = make_on_main(lambda: (model, change(model)), architecture, num_classes, device, when)
    changed.train(training)
    return changed, result


def _put_back(model: nn.Module, originals: dict[str, nn.Module]) -> None:
    """Reinstall ``{name: module}`` where SyncBatchNorm replaced them, with the trained statistics and weights."""
    for name, original in originals.items():
        current = model.get_submodule(name)
        if current is original:
            continue
        original.load_state_dict(current.state_dict())  # (SyncBatchNorm shares them already: a no-op copy)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, original)


def train(model: nn.Module, loaders: Any, config: TrainConfig, device: torch.device,
          run_dir: str | Path | None = None, desc: str = "train", sync_bn: bool = False,
          after_backward: Callable[[nn.Module], Any] | None = None, resume: bool = True) -> TrainResult:
    """``training.loop.train`` on ``model`` in place (metrics in ``<run_dir>/<desc>_metrics.csv``, rank 0), the way
    every stage trains under torchrun.

    Under torchrun: a DDP training on ``loaders`` (their ``DistributedSampler`` shards); with ``sync_bn`` the
    BatchNorm modules are SyncBatchNorm for its duration and the original modules are put back after it, so the
    pruner, the codec and the checkpoints keep seeing plain BatchNorm. Afterwards every rank takes rank 0's weights
    and buffers. ``after_backward(model)`` gets the plain model and runs after DDP's gradient all-reduce (the same
    on every rank). Only rank 0 logs the epochs.

    ``resume`` (with ``run_dir``): the training writes its resume checkpoint every epoch and a re-run continues it
    (``training.loop.train``; rank 0 writes, every rank reads). ``channels_last`` is applied before DDP wraps the
    model, so DDP's buckets see the layout the training uses.
    """
    if config.channels_last and torch.device(device).type == "cuda":
        model.to(memory_format=torch.channels_last)
    if not distributed.is_distributed():
        return loop.train(model, loaders, config, device, run_dir=run_dir, desc=desc, after_backward=after_backward,
                          resume=resume)
    originals = ({name: module for name, module in model.named_modules()
                  if name and isinstance(module, nn.modules.batchnorm._BatchNorm)} if sync_bn else {})
    wrapped = distributed.wrap_for_training(model, device, sync_bn=bool(originals))
    hook = None
    if after_backward is not None:
        def hook(_wrapped: nn.Module) -> None:
            after_backward(model)
    try:
        result = loop.train(wrapped, loaders, config, device, run_dir=run_dir, desc=desc, after_backward=hook,
                            log=None if distributed.is_main_process() else quiet, resume=resume)
    finally:
        del wrapped
        _put_back(model, originals)
    same_weights_everywhere(model)
    return result
