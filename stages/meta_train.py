"""Run mode ``meta_train``: meta-training of the graph metanetwork (reference §6, checkpoints as §9).

With ``task.meta_train.iterations_per_step: null`` (the CIFAR-scale tasks; single process): one optimiser
step per training data model, data models in a seeded random order every epoch::

    graph   = codec.encode(data model)                          # fixed input, no gradient
    θ'      = codec.decode(metanetwork(graph))                  # generated weights, graph to the GNN
    leaves  = θ'.detach().requires_grad_()
    for each of the step's n batches b (task training loader, BN in eval mode):
        CE_b = cross_entropy(functional_call(model, leaves + BN buffers, x_b), y_b); CE_b.backward()
    grad    = (ref_batches / n) * sum_b dCE_b/dθ'  +  dR/dθ'    # R: pruning regulariser (pruning.regularizer)
    torch.autograd.backward(θ', grad)                           # ONE backward through decoder + GNN
    optimizer.step()                                            # AdamW; MultiStepLR stepped per epoch

Why one backward: the authors call ``CE_b.backward(retain_graph=True)`` for every batch, so the GNN
graph is traversed n times per step. The GNN output θ' does not depend on the batch, so by linearity
backward(θ', sum_b dCE_b/dθ') gives the same metanetwork gradient with one traversal
(``tests/test_meta_train.py`` checks equality on every metanetwork parameter in float64).

The CE/regulariser balance (``task.meta_train``): the authors' gradient is ``sum_{b=1..100} dCE_b +
dR`` with ``R = (pruner_reg / 2) sum_g sum_c gamma_c ||θ_{g,c}||^2``: 100 batches of 500 = the CIFAR
training set, i.e. ``pruner_reg / 100 = 0.1`` regulariser per unit of *mean* CE. Here::

    gradient = reference_batches * mean_b(dCE_b/dθ') + dR/dθ'

``reference_batches`` (100 for CIFAR: the reference's batches per step) makes this exactly the paper's
gradient when a step sees that many batches, and keeps the balance ``pruner_reg / reference_batches``
per mean CE for any ``batches_per_step`` (null = one pass over the whole training loader, as the
reference; fewer batches = a cheaper, noisier estimate of the same objective). ``reference_batches:
null`` reproduces the authors' literal sum (balance then changes with the number of batches).

Data: ``task.meta_train.batch_size`` images per batch (null = ``task.batch_size``; 500 for the CIFAR
tasks, the reference's "big" loader) from the task's training split (augmented; the validation split is
held out). A step takes the next ``batches_per_step`` batches of one stream of passes over the split, each
pass reshuffled, that restarts at every epoch start. The stream is ONE loader iterator per epoch (its workers
start once per epoch, not once per pass, which with ``batches_per_step: null`` would be once per step). The
loader's order and its workers' seeds come from its own seeded generator, drawn exactly as a fresh iterator per
pass would draw them, so that generator's state (saved in each checkpoint) fixes every later batch; with
``num_workers: 0`` the batches are bit for bit those of one iterator per pass.

ImageNet scale, ``task.meta_train.iterations_per_step`` (the authors' ``optimize_every_iter``, reference §9;
null = the one-step-per-data-model scheme above, which the CIFAR-scale tasks keep bit for bit). Under torchrun
(or as rank 0 of 1 in a single process)::

    each rank r meta-trains ONE data model: train_idx[r mod len(train_idx)]     # the reference's rank % data_model_num
    epoch   = one pass over the rank's DistributedSampler shard of the training split (padded: every rank has
              L = ceil(ceil(N / world) / batch_size) batches), reshuffled per epoch (sampler.set_epoch)
    for each of the epoch's floor(L / iterations_per_step) steps:
        θ'   = codec.decode(metanetwork(graph))                 # once per step, as the reference
        grad = (ref_batches / n) * sum_b dCE_b/dθ' + dR/dθ'     # b: the shard's next n = iterations_per_step
        torch.autograd.backward(θ', grad)                       # ONE backward through decoder + GNN
        average_gradients(metanetwork)                          # mean over the ranks (the reference's DDP wrapper)
        optimizer.step()                                        # same gradient and AdamW state on every rank, so
                                                                # the parameters stay bit-identical across ranks
    scheduler.step()                                            # once per epoch, as the reference

The trailing ``L mod iterations_per_step`` batches of an epoch are skipped: the reference computes their CE but
never steps on them (its accumulation restarts with the next epoch), so here they are not even loaded. The
balance is the same formula per rank: with ``reference_batches = iterations_per_step = 200`` (the ImageNet task
files) a rank's gradient is the authors' literal sum of 200 batch-CE gradients plus the regulariser's, i.e.
``pruner_reg / 200`` (0.05) regulariser per unit of mean CE, and averaging over ranks keeps that balance. A
single process is rank 0 of 1 and meta-trains only the FIRST training data model, as the reference does on one
GPU (``0 % data_model_num``); a warning says so whenever fewer ranks than training data models run. Under
torchrun ``iterations_per_step`` is required (the null scheme would repeat the same work on every rank).

Mapping to the authors' ImageNet scripts (``meta_train.sh``, 8 GPUs x 32 images): their epochs are 0-based and
their ``epoch_{e}.pth`` is saved after epoch e; here epochs are 1-based, so their epoch e is our epoch e + 1 and
their checkpoint ``epoch_16.pth`` (ResNet-50's ``METANETWORK_INDEX=16``) is ``checkpoints/epoch_0017.pt``, ViT's
``epoch_22.pth`` is ``epoch_0023.pt``. MultiStepLR milestones count scheduler steps (= finished epochs) in both, so
the numbers are the same: milestone 2 = lr x gamma from the third epoch (their epoch 2, our epoch 3). Steps per
epoch: their 1 281 167 images / (8 x 32) = 5005 batches per rank = 25 steps; here ``task.dataset.val_size``
(10 000) is held out, so 4966 batches = 24 steps with 8 ranks. With fewer ranks a shard is larger and an epoch
has more steps (4 ranks: 49), each still 200 batches per rank; an epoch is always one pass over the training set.

Data in that mode: the rank's shard through a ``DistributedSampler`` (seed derived from ``seed``), batches of
``task.meta_train.batch_size``. Every epoch reseeds torch / python / numpy and the loader's generator from
(seed, epoch, rank), so an epoch's batches and augmentations depend only on those: a run killed mid-epoch
resumes (``meta_train.resume``) from the last finished epoch's checkpoint, which every rank loads (rank 0 picks
it), reruns the epoch and ends, on the CPU, bit-identical to an uninterrupted run. Resuming needs the same
number of ranks (refused otherwise: the shards and data models per rank would differ). Rank 0 alone writes the
checkpoints, the metrics CSV (with a ``steps`` column: optimiser steps in the epoch) and the plot, and shows
progress; CE, R and the diagnostics of a step are means over the ranks (``grad_ce_norm`` / ``grad_reg_norm``: the
mean of the ranks' own part norms), ``grad_norm`` the norm of the averaged gradient. ``steps`` in a checkpoint
holds ``[epoch, step within the epoch, CE, R, |grad|]`` there (``[epoch, store index, ...]`` in the null scheme).
A failure on one rank (a bad data model, a NaN, an error in a step) ends every rank with that rank's message.

Outputs under the run dir: ``checkpoints/epoch_{k:04d}.pt`` every epoch (1-based, via
``nn.apply.save_metanetwork``, with optimizer + scheduler state, RNG states and the loss
history, so a run resumes exactly), ``meta_train_metrics.csv`` (per epoch: lr, mean CE, mean
regulariser value, the diagnostics below, mean metanetwork gradient norm, seconds, images/s, peak GPU memory),
``meta_train_diagnostics.png`` (rewritten every epoch) and ``results.json``.

Diagnostics (per step from the step's generated weights, no extra metanetwork forward; the epoch's row is
the mean over its training data models; see ``pruning.regularizer``, "Diagnostics"):

* ``small_group_share``: share of the channels of all the pruner's dependency groups whose group norm
  ``sqrt(sum over the group's members of ||slice_c||^2)`` (un-normalised, biases excluded) is at most
  1 % of the largest such norm in the whole network (global, as the pruner ranks). Unstructured methods:
  share of Conv/Linear weight entries with ``|w|`` at most 1 % of the largest ``|w|``.
* ``small_group_share_input``: the same on the data model's own weights (the metanetwork's input).
* ``weight_change``: ``||θ' - θ||_2 / ||θ||_2`` over all the tensors the codec generates together.
* ``norm_ratio_p10``, ``norm_ratio_p50``, ``norm_ratio_p90``: quantiles over all channels of the ratio of each
  channel's group norm (as for ``small_group_share``) in the generated weights to the same norm in the data
  model's. They tell selective from uniform: a metanetwork that singles out channels to remove drives p10
  towards 0 while p90 stays near 1; p10 close to p90 (with both below 1) is a uniform shrink, which under
  batch-statistics BatchNorm lowers R at almost no cost in CE and leaves the network as prunable as before.
* ``grad_ce_norm`` and ``grad_reg_norm``: the norms of the two parts of the step's metanetwork gradient,
  the cross-entropy part (scaled by ``reference_batches`` as in the step) and the regulariser part. Their
  ratio is the CE/regulariser balance that ``pruner_reg`` sets: AdamW follows the larger part, so with
  ``grad_reg_norm`` tens of times ``grad_ce_norm`` the cross-entropy hardly constrains the metanetwork.
  Costs one extra backward through the metanetwork per step (``diagnostics=False`` skips it).

They do not change losses, gradients or resumption. Rows of an older checkpoint
without these columns resume, with the cells left blank.

Resuming: with ``meta_train.resume=true`` (default) a run dir that already holds checkpoints continues
after the newest one (pass ``hydra.run.dir=<that dir>``); the RNG states (torch, CUDA, python, numpy, the
loader's generator) are restored, so on the CPU the following losses and weights are bit-identical to an
uninterrupted run (CUDA scatter kernels are not bitwise deterministic). Raising ``task.meta_train.epochs``
continues a finished run. A NaN/inf loss, regulariser or gradient raises ``FloatingPointError`` naming
the epoch and data model before the optimiser step; the last checkpoint is the last good epoch.

Per data model (keyed by store index, built once per run and cached): the model on the device (eval
mode, its own weights), its ``GraphCodec`` (data models may differ in widths), BN buffers and the
regulariser (the torch-pruning ``GroupNormPruner``, whose dependency-graph tracing is the expensive
part). Building them never consumes the global RNG (``torch.random.fork_rng``), so a resumed run draws
the same random numbers as an uninterrupted one. Memory: one copy of every training data model on the
device.
"""
from __future__ import annotations

import csv
import io
import logging
import math
import random
import re
import time
from itertools import islice
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch import nn as tnn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from data_loaders.store import DataModelStore
from nn.apply import build_metanetwork, save_metanetwork
from nn.graph import GraphCodec, GraphCodecError
from pruning.regularizer import (REG_PROJECTIONS, build_regularizer, relative_change, small_share,
                                 without_scale_component)
from stages import ddp
from stages.common import codec_options, example_input, setup, task_data
from utils.checkpoint import CheckpointError, load_checkpoint, load_scheduler_state, plain_scheduler_state
from utils.distributed import (all_gather_objects, all_reduce_mean, average_gradients, is_distributed,
                               is_main_process, rank, run_on_every_rank, run_on_main, world_size)
from utils.io import atomic_path, atomic_write
from utils.seed import derive_seed, restore_rng, rng_state, seed_worker
from utils.tracking import log_metrics

log = logging.getLogger(__name__)

__all__ = [
    "MetaTrainSettings",
    "DataModelEntry",
    "StepResult",
    "meta_gradient",
    "build_entry",
    "meta_loader",
    "sharded_loader",
    "rank_data_model",
    "accumulated_step",
    "grad_norm",
    "run",
    "plot_diagnostics",
    "checkpoint_path",
    "list_checkpoints",
]

CHECKPOINT_DIR = "checkpoints"
METRICS_CSV = "meta_train_metrics.csv"
DIAGNOSTICS_PNG = "meta_train_diagnostics.png"
DIAGNOSTIC_COLUMNS = ("small_group_share", "small_group_share_input", "weight_change", "norm_ratio_p10",
                      "norm_ratio_p50", "norm_ratio_p90", "grad_ce_norm", "grad_reg_norm")
NORM_RATIO_QUANTILES = (0.1, 0.5, 0.9)
SMALL_FRACTION = 0.01  # a channel group is "small" at <= 1 % of the network's largest group norm
# images/s: images forwarded through the generated networks per second (all ranks); peak_mem_gb: CUDA only
CSV_COLUMNS = ("epoch", "lr", "ce", "reg", *DIAGNOSTIC_COLUMNS, "grad_norm", "seconds", "images_per_s", "peak_mem_gb")
_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)\.pt$")
# task.meta_train values that a resumed run must share with the checkpoint (epochs may grow)
_RESUME_KEYS = ("lr", "weight_decay", "milestones", "gamma", "pruner_reg", "alpha", "bias", "train_split",
                "reference_batches", "batches_per_step", "batch_size", "bn_mode", "iterations_per_step",
                "reg_projection", "max_batches_per_step", "max_steps_per_epoch")
BN_MODES = ("eval", "batch")
# keys added later: what older checkpoints ran with
_RESUME_DEFAULTS = {"bn_mode": "eval", "iterations_per_step": None, "reg_projection": "none",
                    "max_batches_per_step": None, "max_steps_per_epoch": None}
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
        return {k: values[k] for k in _RESUME_KEYS}

    def capped(self, batches: int) -> int:
        """A step of ``batches`` batches after ``max_batches_per_step``."""
        return batches if self.max_batches_per_step is None else min(batches, self.max_batches_per_step)

    def steps(self, steps: int) -> int:
        """``steps`` optimiser steps per epoch after ``max_steps_per_epoch``."""
        return steps if self.max_steps_per_epoch is None else min(steps, self.max_steps_per_epoch)


# ----------------------------------------------------------------------------------------------
# One data model and one step
# ----------------------------------------------------------------------------------------------
@dataclass
class DataModelEntry:
    """Everything a step needs for one data model (cached per store index for the whole run)."""

    index: int
    name: str  # "shard_0000.h5#3", for messages
    model: tnn.Module  # on the device, eval mode, the data model's own weights (never modified)
    codec: GraphCodec
    regularizer: Any  # pruning.regularizer.GroupL2Regularizer | SignRegularizer
    buffers: dict[str, Tensor]
    cache: dict = field(default_factory=dict)  # values of the (never modified) own weights, e.g. the input share


@dataclass
class StepResult:
    """Scalars of one step: mean batch CE, regulariser value R, number of batches, and the diagnostics
    (module docstring; NaN when not computed)."""

    ce: float
    reg: float
    batches: int
    small_group_share: float = math.nan
    small_group_share_input: float = math.nan
    weight_change: float = math.nan
    norm_ratio_p10: float = math.nan
    norm_ratio_p50: float = math.nan
    norm_ratio_p90: float = math.nan
    grad_ce_norm: float = math.nan
    grad_reg_norm: float = math.nan


def _cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits, labels)


def build_entry(index: int, model: tnn.Module, example: Tensor, method: Mapping[str, Any], settings: MetaTrainSettings,
                input_shape: tuple[int, ...] | None = None, iterative_steps: int = 200, name: str = "",
                **codec_options: Any) -> DataModelEntry:
    """Codec + regulariser (torch-pruning dependency graph) for ``model`` (already on the device).

    ``codec_options``: further ``GraphCodec`` keywords (``identity_edges``, ``edge_layout``,
    ``legacy_fc_permutation``; config section ``codec``).

    ``model`` is put in eval mode and its parameters stop requiring gradients (after the pruner's tracing,
    which needs them): meta-training never updates a data model.
    """
    model.eval()
    codec = GraphCodec(model, input_shape=input_shape, **codec_options)
    regularizer = build_regularizer(model, example, method, reg=settings.pruner_reg, iterative_steps=iterative_steps)
    model.requires_grad_(False)
    return DataModelEntry(index=index, name=name or str(index), model=model, codec=codec, regularizer=regularizer,
                          buffers=dict(model.named_buffers()))


def meta_gradient(metanetwork: tnn.Module, entry: DataModelEntry, batches: Iterable[tuple[Tensor, Tensor]],
                  reference_batches: int | None, alpha: float, bias: bool = False,
                  device: torch.device | str | None = None, diagnostics: bool = True,
                  bn_mode: str = "eval", reg_projection: str = "none") -> StepResult:
    """Accumulate the meta-training gradient of one data model into the metanetwork's ``.grad``.

    ``batches``: (images [B, C, H, W], labels [B]) pairs, moved to ``device`` (default: the model's).
    The metanetwork gradient equals the one of the authors' per-batch ``backward(retain_graph=True)``
    followed by the regulariser backward, scaled as ``reference_batches * mean_b + regulariser`` (module
    docstring; ``reference_batches=None``: the plain sum over batches). One backward through the GNN.
    Does not zero existing gradients and does not step the optimiser. ``diagnostics``: also fill the
    result's ``small_group_share``, ``small_group_share_input`` and ``weight_change`` (:func:`step_diagnostics`).
    ``bn_mode="batch"``: BatchNorm normalises with each batch's statistics (train-mode forward on copies of
    the running buffers, so the data model's statistics never change); ``"eval"`` (the reference) uses them.
    ``reg_projection``: ``"scale_free"`` / ``"shrink_only"`` push the regulariser gradient without each tensor's
    own-direction component (``pruning.regularizer.without_scale_component``); R is the same either way.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"meta_gradient: bn_mode={bn_mode!r}; valid: {', '.join(BN_MODES)}")
    if reg_projection not in REG_PROJECTIONS:
        raise ValueError(f"meta_gradient: reg_projection={reg_projection!r}; valid: {', '.join(REG_PROJECTIONS)}")
    model = entry.model
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.no_grad():
        graph = entry.codec.encode(model)
    generated = entry.codec.decode(metanetwork(graph))
    leaves = {k: v.detach().requires_grad_(True) for k, v in generated.items()}

    ce_sum = torch.zeros((), device=device, dtype=torch.float64)
    n = 0
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if images.is_floating_point():
            images = images.to(next(iter(leaves.values())).dtype)
        if bn_mode == "batch":
            model.train()  # BatchNorm only (no dropout in these models); updates go to throw-away copies
            try:
                buffers = {k: v.clone() for k, v in entry.buffers.items()}
                logits = torch.func.functional_call(model, (buffers, leaves), (images,))
            finally:
                model.eval()
        else:
            logits = torch.func.functional_call(model, (entry.buffers, leaves), (images,))
        loss = _cross_entropy(logits, labels)
        loss.backward()  # accumulates dCE_b/dθ' into the leaves; the GNN graph is not touched
        ce_sum += loss.detach().to(torch.float64)
        n += 1
    if n == 0:
        raise ValueError("meta_gradient: no training batch (is the training loader empty?)")
    scale = 1.0 if reference_batches is None else float(reference_batches) / n

    reg_grads = entry.regularizer.gradient(leaves, alpha=alpha, bias=bias)
    reg_value = entry.regularizer.value(leaves, reg_grads)
    if reg_projection != "none":
        own = dict(model.named_parameters())  # a tensor the metanetwork does not generate keeps its own weight
        reg_grads = without_scale_component(reg_grads, {k: leaves.get(k, own.get(k)) for k in reg_grads},
                                            shrink_only=reg_projection == "shrink_only")
    outputs, grads = [], []
    with torch.no_grad():
        for key, out in generated.items():
            leaf = leaves[key]
            g = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            if scale != 1.0:
                g = g * scale
            if key in reg_grads:
                g = g + reg_grads[key]
            outputs.append(out)
            grads.append(g)
    if diagnostics:
        ce_part = _ce_part(metanetwork, outputs, generated, leaves, scale)
        before = {p: p.grad.clone() for p in metanetwork.parameters() if p.grad is not None}
    torch.autograd.backward(outputs, grads)  # the step's gradient: the diagnostics never change it
    result = StepResult(ce=float(ce_sum.item()) / n, reg=float(reg_value.item()), batches=n)
    if diagnostics:
        (result.small_group_share, result.small_group_share_input, result.weight_change,
         (result.norm_ratio_p10, result.norm_ratio_p50, result.norm_ratio_p90)) = step_diagnostics(entry, leaves)
        result.grad_ce_norm, result.grad_reg_norm = _part_norms(metanetwork, before, ce_part)
    return result


def _ce_part(metanetwork: tnn.Module, outputs: list[Tensor], generated: Mapping[str, Tensor],
             leaves: Mapping[str, Tensor], scale: float) -> dict:
    """The cross-entropy part of the metanetwork gradient, ``{parameter: gradient}``: one extra backward
    through the GNN that accumulates nothing into ``.grad``."""
    params = [p for p in metanetwork.parameters() if p.requires_grad]
    ce_grads = [leaves[k].grad * scale if leaves[k].grad is not None else torch.zeros_like(leaves[k])
                for k in generated]
    parts = torch.autograd.grad(outputs, params, ce_grads, retain_graph=True, allow_unused=True)
    return {p: g for p, g in zip(params, parts) if g is not None}


@torch.no_grad()
def _part_norms(metanetwork: tnn.Module, before: Mapping[Tensor, Tensor], ce_part: Mapping[Tensor, Tensor]
                ) -> tuple[float, float]:
    """(``||g_CE||``, ``||g_R||``) over all metanetwork parameters. The step's gradient is linear in its two
    parts, so ``g_R`` = (``.grad`` after the step's backward - ``.grad`` before) - ``g_CE``."""
    ce_sq = reg_sq = 0.0
    for p in metanetwork.parameters():
        if p.grad is None:
            continue
        step = p.grad - before[p] if p in before else p.grad
        ce = ce_part.get(p)
        reg = step if ce is None else step - ce
        reg_sq += float(reg.double().pow(2).sum())
        if ce is not None:
            ce_sq += float(ce.double().pow(2).sum())
    return math.sqrt(ce_sq), math.sqrt(reg_sq)


@torch.no_grad()
def step_diagnostics(entry: DataModelEntry, generated: Mapping[str, Tensor]
                     ) -> tuple[float, float, float, tuple[float, ...]]:
    """(small_group_share, small_group_share_input, weight_change, (norm_ratio_p10, _p50, _p90)) of
    ``generated`` weights (module doc).

    ``generated``: {state-dict key: tensor} as decoded by ``entry.codec``; the input's channel norms are
    computed once per entry (the data model's own weights never change) and cached in ``entry.cache``.
    """
    regularizer = entry.regularizer
    norms = regularizer.channel_norms(generated)
    if "input_norms" not in entry.cache:
        entry.cache["input_norms"] = regularizer.channel_norms({})
        entry.cache["small_group_share_input"] = small_share(entry.cache["input_norms"], SMALL_FRACTION)
    own_norms = entry.cache["input_norms"]
    change = relative_change(generated, dict(entry.model.named_parameters()))
    return (small_share(norms, SMALL_FRACTION), entry.cache["small_group_share_input"], change,
            norm_ratio_quantiles(norms, own_norms))


def norm_ratio_quantiles(norms: Tensor, own_norms: Tensor,
                         quantiles: Sequence[float] = NORM_RATIO_QUANTILES) -> tuple[float, ...]:
    """Quantiles of ``norms / own_norms`` (per channel; channels with a zero own norm are left out).

    Both are :meth:`GroupL2Regularizer.channel_norms`-style vectors of the same channels. Unstructured
    regularisers give per-weight magnitudes, so the quantiles are then over weights. No channel: NaNs.
    """
    norms, own_norms = norms.detach().flatten(), own_norms.detach().flatten().to(norms.device)
    if norms.shape != own_norms.shape:
        raise ValueError(f"norm_ratio_quantiles: {norms.numel()} generated norms vs {own_norms.numel()} own norms")
    keep = own_norms > 0
    if not bool(keep.any()):
        return tuple(math.nan for _ in quantiles)
    ratios = (norms[keep] / own_norms[keep]).to(torch.float64)
    return tuple(float(q) for q in torch.quantile(ratios, torch.tensor(list(quantiles), dtype=torch.float64,
                                                                        device=ratios.device)).tolist())


def grad_norm(module: tnn.Module) -> float:
    """Global L2 norm of the parameters' gradients (NaN/inf propagate)."""
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) for p in module.parameters()
             if p.grad is not None]
    if not norms:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(norms)).item())


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


def accumulated_step(metanetwork: tnn.Module, entry: DataModelEntry, batches: Iterable[tuple[Tensor, Tensor]],
                     reference_batches: int | None, alpha: float, bias: bool = False,
                     device: torch.device | str | None = None, diagnostics: bool = True,
                     bn_mode: str = "eval", reg_projection: str = "none") -> tuple[StepResult, float]:
    """The gradient of one ``iterations_per_step`` optimiser step, left in the metanetwork's ``.grad``.

    Zeroes the gradients, accumulates this rank's :func:`meta_gradient` over ``batches`` (one backward through
    the GNN; ``reference_batches / len(batches)`` times the CE sum plus the regulariser), then averages it over
    the ranks, so every rank holds the same gradient. Returns the step's scalars as means over the ranks (CE, R,
    diagnostics) and the norm of the averaged gradient. Without torchrun: this process's gradient. Does not
    step the optimiser.
    """
    metanetwork.zero_grad(set_to_none=True)
    result = run_on_every_rank(lambda: meta_gradient(metanetwork, entry, batches, reference_batches, alpha, bias,
                                                  device, diagnostics=diagnostics, bn_mode=bn_mode,
                                                  reg_projection=reg_projection),
                            f"meta_train step on data model {entry.name}")
    average_gradients(metanetwork.parameters())
    keys = ("ce", "reg", *DIAGNOSTIC_COLUMNS)
    device = torch.device(device) if device is not None else next(metanetwork.parameters()).device
    values = all_reduce_mean(torch.tensor([getattr(result, k) for k in keys], dtype=torch.float64, device=device))
    mean = StepResult(batches=result.batches, **dict(zip(keys, values.tolist())))
    return mean, grad_norm(metanetwork)


# ----------------------------------------------------------------------------------------------
# Checkpoints, RNG states, metrics
# ----------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    """``<run_dir>/checkpoints/epoch_{epoch:04d}.pt`` (1-based epochs)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch_{int(epoch):04d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the meta_train checkpoints in ``run_dir``, by epoch."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def _write_metrics(path: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    # iterations_per_step mode also records the optimiser steps of each epoch
    at = CSV_COLUMNS.index("seconds")
    columns = ((*CSV_COLUMNS[:at], "steps", *CSV_COLUMNS[at:]) if any("steps" in r for r in history)
               else CSV_COLUMNS)
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow(row)
    atomic_write(path, buffer.getvalue())


def plot_diagnostics(history: list[Mapping[str, Any]], path: str | Path) -> Path:
    """Seven panels vs epoch: mean CE, R, the gradient's CE and regulariser parts, small_group_share (its input
    value dashed), weight_change, the per-channel norm ratio's quantiles (selective vs uniform shrinking) and
    the regulariser/CE gradient ratio.

    Rows lacking a column (an older checkpoint's history) are plotted as gaps. Saved as a PNG at ``path``
    (written to a temporary file, then renamed, so a reader never sees a half-written image).
    """
    # lazily: matplotlib costs about a second at import and only the plot needs it
    import matplotlib

    matplotlib.use("Agg")  # headless; a no-op if already selected
    import matplotlib.pyplot as plt

    def column(key: str) -> list[float]:
        values = []
        for row in history:
            value = row.get(key)
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                values.append(math.nan)
        return values

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [int(row["epoch"]) for row in history]
    panels = [("ce", "mean cross-entropy"), ("reg", "regulariser R"),
              ("grad_ce_norm", "metanetwork gradient norm, by part"),
              ("small_group_share", f"share of channel groups <= {SMALL_FRACTION:.0%} of the network's largest"),
              ("weight_change", "weight change ||θ'-θ|| / ||θ||"),
              ("norm_ratio", "channel group norm, generated / input"),
              ("balance", "regulariser part / CE part of the gradient")]
    ce_part, reg_part = column("grad_ce_norm"), column("grad_reg_norm")
    fig, axes = plt.subplots(2, 4, figsize=(18, 7), sharex=True)
    try:
        axes.flat[-1].axis("off")
        for ax, (key, title) in zip(axes.flat, panels):
            if key == "norm_ratio":
                # p10 far below p90: channels singled out; p10 close to p90: every channel shrinks alike
                for q, style in (("p90", ":"), ("p50", "-"), ("p10", "--")):
                    ax.plot(epochs, column(f"norm_ratio_{q}"), linestyle=style, marker="o", markersize=3,
                            linewidth=1.2, label=q)
                ax.legend(loc="best", fontsize="small")
            elif key == "balance":
                ax.plot(epochs, [r / c if c > 0 else math.nan for r, c in zip(reg_part, ce_part)], marker="o",
                        markersize=3, linewidth=1.2)
                ax.set_yscale("log")
            elif key == "grad_ce_norm":
                ax.plot(epochs, ce_part, marker="o", markersize=3, linewidth=1.2, label="cross-entropy")
                ax.plot(epochs, reg_part, marker="s", markersize=3, linewidth=1.2, label="regulariser")
                ax.set_yscale("log")
                ax.legend(loc="best", fontsize="small")
            else:
                ax.plot(epochs, column(key), marker="o", markersize=3, linewidth=1.2, label="generated")
            if key == "small_group_share":
                ax.plot(epochs, column("small_group_share_input"), linestyle="--", linewidth=1.2,
                        label="data model (input)")
                ax.legend(loc="best", fontsize="small")
            ax.set_title(title, fontsize="medium")
            ax.grid(True, alpha=0.3)
        for ax in axes[-1]:
            ax.set_xlabel("epoch")
        fig.suptitle("meta-training diagnostics (mean over the epoch's training data models)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def _plot_quietly(history: list[Mapping[str, Any]], path: Path) -> None:
    """:func:`plot_diagnostics`, a failure only logged (the figure must never stop a meta-training run)."""
    try:
        plot_diagnostics(history, path)
    except Exception as err:  # noqa: BLE001 - diagnostics only
        log.warning("could not write %s: %s: %s", path, type(err).__name__, err)


def _epoch_order(indices: list[int], seed: int, epoch: int) -> list[int]:
    """The data models' order in ``epoch``: a permutation from a seed derived from (seed, epoch)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "meta_train_order", epoch))
    return [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
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


def _newest_checkpoint(run_dir: Path) -> tuple[int, Path, dict] | None:
    for epoch, path in reversed(list_checkpoints(run_dir)):
        try:
            return epoch, path, load_checkpoint(path, map_location="cpu")
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
    return None


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
    picked = run_on_main(_pick_checkpoint, state.run_dir, resume)  # under torchrun: rank 0 picks, all ranks load it
    if picked is None:
        return 0
    start_epoch, path = picked[0], Path(picked[1])
    checkpoint = run_on_every_rank(lambda: load_checkpoint(path, map_location="cpu"), f"reading {path}")
    run_on_every_rank(lambda: _load_checkpoint_state(state, path, checkpoint), f"resuming from {path}")
    if is_main_process():
        log.info("resuming from %s (epoch %d of %d)", path, start_epoch, state.settings.epochs)
    return start_epoch


def _pick_checkpoint(run_dir: Path, resume: bool) -> tuple[int, str] | None:
    """(epoch, path) of the newest readable checkpoint, None for a fresh run (rank 0 under torchrun)."""
    found = list_checkpoints(run_dir)
    if found and not resume:
        raise FileExistsError(f"{run_dir / CHECKPOINT_DIR} already holds meta_train checkpoints and "
                              "meta_train.resume=false; use a fresh hydra.run.dir or meta_train.resume=true")
    newest = _newest_checkpoint(run_dir) if found else None
    return None if newest is None else (newest[0], str(newest[1]))


def _load_checkpoint_state(state: _Training, path: Path, checkpoint: Mapping[str, Any]) -> None:
    """Weights, optimiser, scheduler, history and RNG states of ``checkpoint`` into ``state`` (after checks)."""
    _check_resumable(path, checkpoint, state.meta)
    state.first.codec.check_layout(checkpoint["spec"]["layout"])
    state.metanetwork.load_state_dict(checkpoint["state_dict"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    load_scheduler_state(state.scheduler, checkpoint["scheduler"])
    state.history = list(checkpoint["history"])
    state.steps = [list(s) for s in checkpoint["steps"]]
    restore_rng(checkpoint["rng"], state.loader.generator)  # iterations_per_step: reseeded per epoch anyway


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
    save_metanetwork(checkpoint_path(state.run_dir, epoch), state.metanetwork, state.first.codec, state.options,
                     str(state.cfg.task.name), epoch, optimizer=state.optimizer.state_dict(),
                     scheduler=plain_scheduler_state(state.scheduler), history=state.history, steps=state.steps,
                     rng=rng_state(state.loader.generator), meta=state.meta)
    _write_metrics(state.run_dir / METRICS_CSV, state.history)
    log_metrics("meta_train", row, step=epoch)  # the CSV row, to the logger= experiment tracker
    _plot_quietly(state.history, state.run_dir / DIAGNOSTICS_PNG)
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
        _write_metrics(run_dir / METRICS_CSV, history)
    if main and history and not (run_dir / DIAGNOSTICS_PNG).exists():
        _plot_quietly(history, run_dir / DIAGNOSTICS_PNG)
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


def _check_resumable(path: Path, checkpoint: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
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
              for k, v in meta["settings"].items() if saved["settings"].get(k, _RESUME_DEFAULTS.get(k)) != v]
    if "world_size" in meta and saved.get("world_size", 1) != meta["world_size"]:
        diffs.append(f"ranks: checkpoint {saved.get('world_size', 1)}, now {meta['world_size']} (the shards and each "
                     f"rank's data model depend on it; relaunch with torchrun --nproc_per_node="
                     f"{saved.get('world_size', 1)})")
    if diffs:
        raise ValueError(f"cannot resume from {path}: the run was started with other settings ({'; '.join(diffs)}). "
                         "Use a fresh hydra.run.dir, or restore the original settings (only task.meta_train.epochs "
                         "may change)")
