"""Supervised training / fine-tuning and evaluation of image classifiers (recipes: ``training.config``).

One loop serves every stage (data-model training, fine-tuning after the metanetwork and after
pruning, ImageNet DDP fine-tuning). It follows the reference recipe (SGD momentum 0.9, MultiStepLR
per epoch, plain cross-entropy; ImageNet adds AdamW, cosine, linear warm-up, label smoothing,
gradient clipping) with one deliberate change: the kept epoch is chosen on the VALIDATION set by
default. The paper's protocol (best TEST accuracy) is available as ``select="test"`` and is
labelled as such in the result.

Accuracies are fractions in [0, 1]; losses are mean cross-entropy per sample (nats).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from training.config import TrainConfig, as_config
from utils import preemption, settings_diff, tracking
from utils.checkpoint import (CheckpointError, load_checkpoint, load_scheduler_state, plain_scheduler_state,
                              save_checkpoint)
from utils.io import atomic_write
from utils.distributed import broadcast_object, is_distributed, is_main_process, run_on_every_rank, run_on_main, world_size
from utils.seed import restore_rng, rng_state

logger = logging.getLogger(__name__)

# Throughput of an epoch: seconds of the training pass and of the whole epoch, training images/s (all ranks), peak
# GPU memory in GiB (CUDA only; blank on the CPU).
THROUGHPUT_COLUMNS = ("train_seconds", "epoch_seconds", "images_per_s", "peak_mem_gb")
CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc",
               *THROUGHPUT_COLUMNS)
PROTOCOL_NOTES = {
    "val": "honest protocol: epoch chosen on the validation set (best val_acc); test never consulted",
    "test": "paper protocol: epoch chosen on the TEST set (best test_acc); test accuracy is optimistic",
    "last": "last epoch kept (no selection)",
}


# ----------------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``selected_epoch`` is 1-based (0 when ``epochs == 0``). ``final_metrics`` holds the metrics of
    the kept weights: ``val_*``/``test_*`` are exact evaluations of them; ``train_*`` are the
    running averages over that training epoch (absent when ``epochs == 0``).
    """

    selected_epoch: int
    selection: str
    protocol_note: str
    history: list[dict[str, float]]
    final_metrics: dict[str, float]
    epochs: int


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW with a uniform weight decay, as the reference."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameters")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule: MultiStepLR / cosine / constant, after an optional linear warm-up."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "multistep":
        main = sched.MultiStepLR(optimizer, milestones=cfg.milestones, gamma=cfg.gamma)
    elif cfg.scheduler == "cosine":
        t_max = max(1, cfg.epochs - cfg.warmup_epochs)
        main = sched.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=cfg.lr_min)
    else:
        main = sched.LambdaLR(optimizer, lambda _epoch: 1.0)
    if cfg.warmup_epochs == 0:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0,
                            total_iters=cfg.warmup_epochs)
    return sched.SequentialLR(optimizer, schedulers=[warmup, main], milestones=[cfg.warmup_epochs])


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _split_batch(batch: Any, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets, ...)`` from a loader -> tensors on ``device``."""
    if not isinstance(batch, (list, tuple)) or len(batch) < 2:
        raise TypeError("train/evaluate: each batch must be a (inputs, targets) pair")
    inputs = batch[0].to(device, non_blocking=True)
    targets = batch[1].to(device, non_blocking=True)
    if channels_last and inputs.dim() == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs, targets


def _limited(loader: Iterable, max_batches: int | None) -> Iterable:
    """The first ``max_batches`` batches (all when None), without loading one batch too many."""
    return loader if max_batches is None else itertools.islice(loader, max_batches)


def _num_batches(loader: Iterable, max_batches: int | None) -> int | None:
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches
    return total if max_batches is None else min(total, max_batches)


def _progress(loader: Iterable, desc: str, max_batches: int | None) -> tqdm:
    disable = not (is_main_process() and sys.stderr.isatty())
    return tqdm(_limited(loader, max_batches), desc=desc, total=_num_batches(loader, max_batches),
                leave=False, dynamic_ncols=True, disable=disable)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
class _SamplerPadding:
    """Tells a ``DistributedSampler``'s padding apart from real samples, so each sample counts once.

    Without ``drop_last`` the sampler repeats the first indices until every rank has the same count; rank
    ``r`` of ``w`` takes positions ``r, r + w, r + 2w, ...`` of that padded list, and positions ``>= len(dataset)``
    are the repeats. Every rank still runs the same number of batches (no uneven collectives).
    """

    def __init__(self, loader: Iterable):
        sampler = getattr(loader, "sampler", None)
        self.active = isinstance(sampler, DistributedSampler) and not sampler.drop_last
        if self.active:
            self.size, self.replicas, self.rank = len(sampler.dataset), sampler.num_replicas, sampler.rank
        self.seen = 0

    def mask(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """[batch_size] bool for the next batch: True for real samples (all True without a padding sampler)."""
        if not self.active:
            return torch.ones(batch_size, dtype=torch.bool, device=device)
        position = (self.seen + torch.arange(batch_size, device=device)) * self.replicas + self.rank
        self.seen += batch_size
        return position < self.size


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str, amp: bool = False,
             topk: tuple[int, ...] = (1,), max_batches: int | None = None,
             channels_last: bool = False) -> dict[str, float]:
    """Exact sample-weighted mean cross-entropy and top-k accuracy of ``model`` on ``loader``.

    Inputs are ``[B, C, H, W]`` (any shape the model takes), targets ``[B]`` class indices, logits
    ``[B, num_classes]``. Returns ``{"loss", "acc"}`` plus ``"acc{k}"`` for every other k in
    ``topk``. Sums are all-reduced under ``torch.distributed``. The model's train/eval mode is
    restored afterwards. The loss is plain cross-entropy (no label smoothing).
    """
    device = torch.device(device)
    topk = tuple(sorted({int(k) for k in topk}))
    if not topk or topk[0] < 1:
        raise ValueError(f"evaluate: topk must hold positive ints, got {topk}")
    was_training = model.training
    model.eval()
    # [loss_sum, correct@k for each k, sample count], accumulated on device to avoid syncs.
    sums = torch.zeros(len(topk) + 2, dtype=torch.float64, device=device)
    use_amp = amp and device.type == "cuda"
    padding = _SamplerPadding(loader)
    try:
        for batch in _limited(loader, max_batches):
            inputs, targets = _split_batch(batch, device, channels_last)
            with torch.autocast(device_type=device.type, enabled=use_amp):
                logits = model(inputs)
            logits = logits.float()
            if topk[-1] > logits.shape[1]:
                raise ValueError(f"evaluate: top-{topk[-1]} asked but the model has {logits.shape[1]} classes")
            real = padding.mask(targets.numel(), device)  # [B] bool: False for a DistributedSampler's repeats
            sums[0] += (F.cross_entropy(logits, targets, reduction="none").double() * real).sum()
            ranked = logits.topk(topk[-1], dim=1).indices  # [B, max_k]
            hits = ranked.eq(targets.unsqueeze(1))  # [B, max_k]
            for index, k in enumerate(topk):
                sums[1 + index] += (hits[:, :k].any(dim=1) & real).sum()
            sums[-1] += real.sum()
    finally:
        model.train(was_training)
    sums = _all_reduce_sum(sums).tolist()
    count = sums[-1]
    if count == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    metrics = {"loss": sums[0] / count}
    for index, k in enumerate(topk):
        metrics["acc" if k == 1 else f"acc{k}"] = sums[1 + index] / count
    return metrics


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
@dataclass
class _EpochContext:
    """What one training epoch needs besides the model and the loader."""

    optimizer: torch.optim.Optimizer
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    device: torch.device
    cfg: TrainConfig
    amp: bool
    amp_dtype: torch.dtype
    channels_last: bool
    desc: str
    mixer: _BatchMixer
    # batches between host synchronisations (finite-loss check, stop request, progress bar)
    sync_every: int
    # the train loader's generator (order and worker seeds); saved and restored for resumption
    generator: torch.Generator | None
    # called with the model after every backward, before the optimiser step (gradients unscaled),
    # e.g. DepGraph's sparse-learning regulariser (pruning.sparse_learning)
    after_backward: Callable[[nn.Module], Any] | None = None

    @property
    def skips_nonfinite(self) -> bool:
        """float16 autocast: GradScaler skips a step whose loss or gradients overflow, instead of the run failing."""
        return self.scaler.is_enabled()


@dataclass
class _Partial:
    """Where an epoch stopped (a stop signal after ``batches`` steps): what resumes it mid-way. ``epoch_rng`` is the
    random state the epoch started with (it rebuilds the same batch order), ``rng`` the one at the stop."""

    epoch: int
    batches: int
    sums: list[float]  # loss_sum, correct, count, skipped steps
    epoch_rng: dict
    rng: dict


class _Stopped(Exception):
    """Raised inside an epoch when a stop signal was honoured; carries where it stopped."""

    def __init__(self, partial: _Partial, signal_name: str):
        super().__init__(signal_name)
        self.partial, self.signal_name = partial, signal_name


def _nonfinite_error(ctx: _EpochContext, epoch: int, batch_index: int, loss: float | None) -> FloatingPointError:
    shown = f" (this process: {loss})" if loss is not None else ""
    return FloatingPointError(
        f"{ctx.desc}: loss is not finite{shown} at epoch {epoch}, batch {batch_index} (0-based) "
        f"(lr={ctx.optimizer.param_groups[0]['lr']:.3g}); lower lr, set clip_grad_norm, "
        "or check the inputs for NaN/inf"
    )


def _synchronise(flags: torch.Tensor) -> list[float]:
    """The one host synchronisation of a stretch of batches: ``flags`` summed over the ranks, on the host."""
    return _all_reduce_sum(flags).tolist()


def _train_one_epoch(model: nn.Module, loader: Iterable, ctx: _EpochContext, epoch: int,
                     partial: _Partial | None = None) -> dict[str, float]:
    """One pass over ``loader``; returns running-average ``{"loss", "acc"}``, the images trained on (all ranks) and the
    steps skipped under float16. ``partial``: continue an epoch a stop signal interrupted (its first batches are
    loaded again, in the same order, and not trained on). Raises :class:`_Stopped` after the step during which a stop
    signal arrived (under torchrun: at the next synchronisation, on every rank at the same batch)."""
    model.train()
    epoch_rng = partial.epoch_rng if partial is not None else rng_state(ctx.generator)
    if partial is not None:
        restore_rng(partial.epoch_rng, ctx.generator)  # the same order (and workers' seeds) as the interrupted epoch
    _set_sampler_epoch(loader, epoch)
    skip = partial.batches if partial is not None else 0
    # loss_sum, correct, count, skipped steps: accumulated on the device, read at the end of the epoch
    sums = torch.zeros(4, dtype=torch.float64, device=ctx.device)
    if partial is not None:
        sums += torch.tensor(partial.sums, dtype=torch.float64).to(ctx.device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=ctx.device)  # first batch with a non-finite loss
    distributed_run = is_distributed()
    interval = ctx.sync_every if (ctx.device.type != "cpu" or distributed_run) else 1
    bar = _progress(loader, f"{ctx.desc} {epoch}/{ctx.cfg.epochs}", ctx.cfg.max_batches_per_epoch)
    started, done = time.perf_counter(), 0
    for batch_index, batch in enumerate(bar):
        if batch_index < skip:  # already trained before the stop: load (same random state), do not train
            if batch_index == skip - 1:
                restore_rng(partial.rng, ctx.generator)
            continue
        inputs, targets = _split_batch(batch, ctx.device, ctx.channels_last)
        inputs, targets_b, lam = ctx.mixer(inputs, targets)
        with torch.autocast(device_type=ctx.device.type, dtype=ctx.amp_dtype, enabled=ctx.amp):
            logits = model(inputs)
            loss = ctx.criterion(logits.float(), targets)
            if lam < 1.0:
                loss = lam * loss + (1.0 - lam) * ctx.criterion(logits.float(), targets_b)
        finite = torch.isfinite(loss.detach())
        if not ctx.skips_nonfinite:
            if interval == 1:  # a single CPU process: reading the flag costs nothing, so fail before the step
                if not bool(finite):
                    raise _nonfinite_error(ctx, epoch, batch_index, float(loss.detach()))
            else:  # remembered on the device, read at the next synchronisation
                first_bad = torch.where(~finite & (first_bad < 0), torch.full_like(first_bad, batch_index), first_bad)
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.scaler.scale(loss).backward()
        if ctx.cfg.clip_grad_norm is not None or ctx.after_backward is not None:
            ctx.scaler.unscale_(ctx.optimizer)
        if ctx.after_backward is not None:
            ctx.after_backward(model)
        if ctx.cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), ctx.cfg.clip_grad_norm)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        with torch.no_grad():
            if ctx.skips_nonfinite:  # a skipped float16 step adds nothing to the running loss and accuracy
                weight = finite.double()
                sums[0] += torch.nan_to_num(loss.detach().double()) * targets.numel() * weight
                sums[1] += logits.argmax(dim=1).eq(targets).sum() * weight
                sums[2] += targets.numel() * weight
                sums[3] += 1.0 - weight
            else:
                sums[0] += loss.detach().double() * targets.numel()
                sums[1] += logits.argmax(dim=1).eq(targets).sum()
                sums[2] += targets.numel()
        done += 1
        if done % interval == 0:
            _check_stretch(ctx, epoch, first_bad, loss, batch_index, sums, bar, started, done, epoch_rng)
    bar.close()
    _check_stretch(ctx, epoch, first_bad, loss if done else None, None, sums, None, started, done, epoch_rng)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)
    seconds = time.perf_counter() - started
    loss_sum, correct, count, skipped = _all_reduce_sum(sums).tolist()
    if count == 0:
        if skipped:
            raise FloatingPointError(f"{ctx.desc}: every step of epoch {epoch} had a non-finite loss under float16 "
                                     "autocast and was skipped; lower lr, set clip_grad_norm or amp_dtype=bfloat16")
        raise ValueError(f"{ctx.desc}: the training loader yielded no batches in epoch {epoch}")
    return {"loss": loss_sum / count, "acc": correct / count, "images": count, "skipped": skipped,
            "seconds": seconds}


def _check_stretch(ctx: _EpochContext, epoch: int, first_bad: torch.Tensor, loss: torch.Tensor | None,
                   batch_index: int | None, sums: torch.Tensor, bar: tqdm | None, started: float, done: int,
                   epoch_rng: dict) -> None:
    """At a synchronisation point: fail on a non-finite loss (any rank), stop on a stop request (any rank), refresh the
    progress bar. In a single process the stop request is read on the host, with no synchronisation."""
    stop = preemption.stop_requested()
    if is_distributed():
        flags = torch.stack([(first_bad >= 0).double(), torch.tensor(float(stop is not None), device=ctx.device)
                             .double()])
        bad_anywhere, stop_anywhere = _synchronise(flags)
    else:
        bad_anywhere, stop_anywhere = float(int(first_bad) >= 0), float(stop is not None)
    if bad_anywhere:
        index = int(first_bad)
        shown = float(loss.detach()) if (loss is not None and index >= 0) else None
        raise _nonfinite_error(ctx, epoch, index if index >= 0 else (batch_index or 0), shown)
    if bar is not None and not bar.disable:
        loss_sum, correct, count = sums[:3].tolist()
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(loss=f"{loss_sum / max(count, 1):.4f}", acc=f"{correct / max(count, 1):.4f}",
                        img_s=f"{count / elapsed * world_size():.0f}", refresh=False)
    if stop_anywhere and batch_index is not None:
        partial = _Partial(epoch=epoch, batches=batch_index + 1, sums=sums.tolist(), epoch_rng=epoch_rng,
                           rng=rng_state(ctx.generator))
        raise _Stopped(partial, stop or "SIGTERM")


class _BatchMixer:
    """MixUp / CutMix on a training batch (one of the two per batch, at random, when both are on).

    Returns ``(inputs, targets_b, lam)``: the loss is ``lam * CE(y) + (1 - lam) * CE(y_b)``, which is the
    cross-entropy against the mixed soft labels (CE is linear in the target distribution, label smoothing
    included), so no class count is needed. ``lam = 1`` when mixing is off.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float):
        self.modes = [(mode, alpha) for mode, alpha in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if alpha > 0]

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        if not self.modes or inputs.shape[0] < 2:
            return inputs, targets, 1.0
        mode, alpha = self.modes[int(torch.randint(len(self.modes), ()))]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(inputs.shape[0], device=inputs.device)
        if mode == "mixup":
            return lam * inputs + (1.0 - lam) * inputs[perm], targets[perm], lam
        height, width = inputs.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        mixed = inputs.clone()
        mixed[..., y0:y1, x0:x1] = inputs[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)  # the area actually pasted
        return mixed, targets[perm], lam


def _set_sampler_epoch(loader: Any, epoch: int) -> None:
    """Reshuffle a ``DistributedSampler`` differently every epoch (no-op for other samplers)."""
    for owner in (loader, getattr(loader, "batch_sampler", None)):
        sampler = getattr(owner, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


def evaluate_splits(model: nn.Module, loaders: Any, device: torch.device | str,
                    splits: tuple[str, ...] = ("val", "test"), amp: bool = False, max_batches: int | None = None,
                    channels_last: bool = False) -> dict[str, float]:
    """:func:`evaluate` on each split of ``loaders`` (``.val`` / ``.test``; a missing or None split is skipped):
    ``{"val_loss", "val_acc", "test_loss", "test_acc"}`` for the default ``splits``."""
    metrics: dict[str, float] = {}
    for split in splits:
        loader = getattr(loaders, split, None)
        if loader is None:
            continue
        result = evaluate(model, loader, device, amp=amp, max_batches=max_batches, channels_last=channels_last)
        metrics.update({f"{split}_{name}": value for name, value in result.items()})
    return metrics


class _MetricsCSV:
    """Per-epoch metrics CSV, rewritten atomically after every row (a crashed run keeps its history, and a full disk
    never leaves a cut-short file). A resumed training starts it with the rows of the epochs it resumes after."""

    def __init__(self, path: Path, rows: Iterable[Mapping[str, float]] = ()):
        self.path = path
        self.lines = [_csv_line(CSV_COLUMNS)] + [_csv_line(row.get(c, "") for c in CSV_COLUMNS) for row in rows]
        atomic_write(self.path, "".join(self.lines))

    def append(self, row: Mapping[str, float]) -> None:
        self.lines.append(_csv_line(row.get(column, "") for column in CSV_COLUMNS))
        atomic_write(self.path, "".join(self.lines))


def _csv_line(values: Iterable[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(list(values))
    return buffer.getvalue()


def _log_function(log: logging.Logger | Callable[[str], Any] | None) -> Callable[[str], Any]:
    if log is None:
        return logger.info
    return log.info if hasattr(log, "info") else log


def _format_row(desc: str, row: Mapping[str, float], epochs: int) -> str:
    parts = [f"{desc} epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4g}"]
    parts += [f"{key} {row[key]:.4f}" for key in CSV_COLUMNS[2:8] if key in row]
    parts.append(f"{row['epoch_seconds']:.1f} s, {row['images_per_s']:.0f} img/s")
    if "peak_mem_gb" in row:
        parts.append(f"peak {row['peak_mem_gb']:.2f} GB")
    return " | ".join(parts)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copy of the state dict (same device), immune to later optimiser steps."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def _check_loaders(loaders: Any, cfg: TrainConfig) -> None:
    if cfg.epochs > 0 and getattr(loaders, "train", None) is None:
        raise ValueError("train: loaders.train is None but epochs > 0")
    if cfg.select in ("val", "test") and getattr(loaders, cfg.select, None) is None:
        raise ValueError(
            f"train: select={cfg.select!r} needs a {cfg.select} loader but loaders.{cfg.select} is None; "
            "provide one (e.g. a validation split of the training data) or set select='last'"
        )


def _cuda_only_flags(cfg: TrainConfig, device: torch.device, say: Callable[[str], Any]) -> tuple[bool, bool]:
    """AMP and channels_last only pay off on CUDA; elsewhere they are ignored with a note."""
    on_cuda = device.type == "cuda"
    for name in ("amp", "channels_last"):
        if getattr(cfg, name) and not on_cuda:
            say(f"{name}=True ignored on {device.type} (CUDA only)")
    return cfg.amp and on_cuda, cfg.channels_last and on_cuda


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``amp_dtype`` resolved: ``auto`` is bfloat16 where the device supports it, else float16."""
    if cfg.amp_dtype == "bfloat16":
        return torch.bfloat16
    if cfg.amp_dtype == "float16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def _plain_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (its state dict has no ``module.`` prefix), else the model."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# Resumption: the "last" checkpoint of a training
# ----------------------------------------------------------------------------------------------
RESUME_DIR = "resume"


def resume_path(run_dir: str | Path, desc: str) -> Path:
    """``<run_dir>/resume/<desc>.pt``: the checkpoint a re-run of training ``desc`` in ``run_dir`` continues from."""
    return Path(run_dir) / RESUME_DIR / f"{desc}.pt"


@dataclass
class _Progress:
    """How far a training got: what the resume checkpoint holds besides the model and the optimiser."""

    epoch: int = 0  # finished epochs
    history: list = dataclasses.field(default_factory=list)
    selected_epoch: int = 0
    best_score: float = -math.inf
    best_state: dict | None = None
    partial: _Partial | None = None
    finished: dict | None = None  # final_metrics once the training has finished


def _fingerprint(model: nn.Module) -> list:
    """[name, shape, sum] of every tensor of the model entering a training: a resumed training checks that the steps
    before it rebuilt the same model (layer widths exactly, weights to 1e-3 relative, so that a GPU's summation order
    does not count as a change)."""
    return [[name, list(t.shape), float(t.detach().double().sum())] for name, t in model.state_dict().items()
            if t.is_floating_point()]


def _fingerprint_change(saved: list, now: list) -> str | None:
    saved_map = {name: (shape, total) for name, shape, total in saved}
    now_map = {name: (shape, total) for name, shape, total in now}
    if saved_map.keys() != now_map.keys():
        return f"other tensors ({sorted(saved_map.keys() ^ now_map.keys())[:3]} ...)"
    for name, (shape, total) in saved_map.items():
        shape_now, total_now = now_map[name]
        if shape != shape_now:
            return f"{name} has shape {shape_now}, the checkpoint's training started from {shape}"
        # a GPU's summation order moves a sum by ~1e-7 relative per element; other settings move it by far more
        if not math.isclose(total, total_now, rel_tol=1e-3, abs_tol=1e-5 * math.sqrt(math.prod(shape))):
            return f"{name} sums to {total_now:.6g}, the checkpoint's training started from {total:.6g}"
    return None


def _recipe_changes(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    # sync_every only changes how often the host looks: not a change of recipe
    return settings_diff.changed_settings(saved, dataclasses.asdict(cfg), skip=("sync_every",))


@dataclass
class _Resumer:
    """Writes and reads a training's resume checkpoint (rank 0 writes, every rank reads)."""

    path: Path
    desc: str
    cfg: TrainConfig
    entry: list  # fingerprint of the model entering the training

    def load(self, plain: nn.Module, ctx: _EpochContext, scheduler: Any, say: Callable[[str], Any]) -> _Progress:
        """The saved progress put back into the model, optimiser, scheduler, scaler and RNGs; a fresh one if none."""
        if not broadcast_object(self.path.is_file() if is_main_process() else None):
            return _Progress()
        checkpoint = run_on_every_rank(lambda: load_checkpoint(self.path, map_location="cpu"),
                                       f"reading {self.path}")
        spec = checkpoint["spec"]
        if spec.get("kind") != "training_resume" or spec.get("desc") != self.desc:
            raise CheckpointError(f"{self.path} is not the resume checkpoint of training {self.desc!r} (spec {spec}); "
                                  "delete it to train from the start")
        changes = _recipe_changes(checkpoint["recipe"], self.cfg)
        if changes:
            raise ValueError(f"cannot resume {self.desc} from {self.path}: its recipe changed ({'; '.join(changes)}). "
                             "Restore the original settings, use a fresh run dir, or delete the file to train this "
                             "step from the start")
        changed = _fingerprint_change(checkpoint["entry"], self.entry)
        if changed:
            raise ValueError(f"cannot resume {self.desc} from {self.path}: the model entering it is not the one its "
                             f"training started from ({changed}); an earlier step ran with other settings. Use a "
                             "fresh run dir, or delete the file to train this step from the start")
        if checkpoint.get("world_size", 1) != world_size():
            raise ValueError(f"cannot resume {self.desc} from {self.path}: it was trained on "
                             f"{checkpoint.get('world_size', 1)} processes, this run has {world_size()} (the data "
                             "shards depend on it); relaunch with the same number of processes")
        plain.load_state_dict(checkpoint["state_dict"])
        ctx.optimizer.load_state_dict(checkpoint["optimizer"])
        load_scheduler_state(scheduler, checkpoint["scheduler"])
        if checkpoint.get("scaler"):
            ctx.scaler.load_state_dict(checkpoint["scaler"])
        restore_rng(checkpoint["rng"], ctx.generator)
        selection = checkpoint["selection"]
        best_state = selection["state"]
        if best_state is not None:
            best_state = {k: v.to(ctx.device) for k, v in best_state.items()}
        partial = checkpoint.get("partial")
        progress = _Progress(epoch=int(checkpoint["epoch"]), history=list(checkpoint["history"]),
                             selected_epoch=int(selection["epoch"]), best_score=float(selection["score"]),
                             best_state=best_state, partial=_Partial(**partial) if partial else None,
                             finished=checkpoint.get("finished"))
        where = (f"finished earlier ({progress.epoch} epochs): not retrained" if progress.finished is not None
                 else f"resuming after epoch {progress.epoch} of {self.cfg.epochs}"
                 + (f" and {progress.partial.batches} batches of epoch {progress.partial.epoch}"
                    if progress.partial else ""))
        say(f"{self.desc}: {where} ({self.path})")
        return progress

    def save(self, plain: nn.Module, ctx: _EpochContext, scheduler: Any, progress: _Progress,
             rng: dict | None = None) -> None:
        """Write the checkpoint atomically (rank 0; the others wait, so that every rank can read it after)."""
        def write() -> None:
            best = progress.best_state
            partial = progress.partial
            save_checkpoint(
                self.path, _plain_model(plain).state_dict(), {"kind": "training_resume", "desc": self.desc},
                recipe=dataclasses.asdict(self.cfg), entry=self.entry, world_size=world_size(),
                optimizer=ctx.optimizer.state_dict(), scheduler=plain_scheduler_state(scheduler),
                scaler=ctx.scaler.state_dict(), epoch=progress.epoch, history=progress.history,
                selection={"epoch": progress.selected_epoch, "score": progress.best_score,
                           "state": None if best is None else {k: v.cpu() for k, v in best.items()}},
                rng=rng if rng is not None else rng_state(ctx.generator),
                partial=None if partial is None else dataclasses.asdict(partial), finished=progress.finished)
        run_on_main(write)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train(model: nn.Module, loaders: Any, cfg: TrainConfig | Mapping[str, Any], device: torch.device | str,
          run_dir: str | Path | None = None, desc: str = "train",
          log: logging.Logger | Callable[[str], Any] | None = None,
          after_backward: Callable[[nn.Module], Any] | None = None, resume: bool = False) -> TrainResult:
    """Train ``model`` in place and keep the weights of the epoch chosen by ``cfg.select``.

    ``loaders`` is any object with ``.train``, ``.val`` and ``.test`` loaders (val/test may be
    None) yielding ``(inputs [B, ...], targets [B])``. Each epoch: train, step the scheduler,
    evaluate val and test, log one line, append a row to ``<run_dir>/<desc>_metrics.csv`` (with the epoch's seconds,
    images/s and, on CUDA, peak memory) and send it to the experiment logger (``utils.tracking``). At the
    end the selected epoch's weights are loaded back into ``model``. ``model`` may be a DDP
    wrapper; then only rank 0 writes the CSV and metrics are all-reduced. ``after_backward(model)`` runs
    after every backward and before the optimiser step (e.g. a sparsity regulariser adding to ``.grad``).

    ``resume=True`` (needs ``run_dir``): at the end of every epoch the model, optimiser, scheduler, GradScaler,
    history, selection state (best epoch, score and weights) and every RNG state are written atomically to
    :func:`resume_path`; a re-run continues after the last finished epoch and ends with the weights an
    uninterrupted run ends with (bitwise on CPU), and a finished training is not retrained (its kept weights are
    loaded). A changed recipe or a different entering model is refused, naming the change. A stop signal
    (``utils.preemption``: SIGTERM) ends the training after the current step with a checkpoint that resumes
    mid-epoch; :class:`utils.preemption.RunInterrupted` is raised.
    """
    cfg = as_config(cfg)
    device = torch.device(device)
    say = _log_function(log)
    _check_loaders(loaders, cfg)
    amp, channels_last = _cuda_only_flags(cfg, device, say)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    plain = _plain_model(model)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    dtype = autocast_dtype(cfg, device)
    train_loader = getattr(loaders, "train", None)
    ctx = _EpochContext(optimizer=optimizer,
                        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                        scaler=torch.amp.GradScaler(device.type, enabled=amp and dtype == torch.float16),
                        device=device, cfg=cfg, amp=amp, amp_dtype=dtype, channels_last=channels_last, desc=desc,
                        mixer=_BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha), sync_every=cfg.sync_every,
                        generator=getattr(train_loader, "generator", None), after_backward=after_backward)
    resumer = None
    if resume and run_dir is not None and cfg.epochs > 0:
        resumer = _Resumer(resume_path(run_dir, desc), desc, cfg, _fingerprint(plain))
    progress = resumer.load(plain, ctx, scheduler, say) if resumer is not None else _Progress()
    if progress.finished is not None:
        _rewrite_csv(run_dir, desc, progress.history)
        say(f"{desc}: kept epoch {progress.selected_epoch} ({PROTOCOL_NOTES[cfg.select]})")
        return TrainResult(selected_epoch=progress.selected_epoch, selection=cfg.select,
                           protocol_note=PROTOCOL_NOTES[cfg.select], history=progress.history,
                           final_metrics=dict(progress.finished), epochs=cfg.epochs)
    csv_log = _rewrite_csv(run_dir, desc, progress.history)

    per_epoch = ("val", "test") if cfg.test_every_epoch or cfg.select == "test" else ("val",)
    with preemption.honoured():
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            lr = optimizer.param_groups[0]["lr"]  # the lr used during this epoch
            started = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                train_metrics = _train_one_epoch(model, loaders.train, ctx, epoch, progress.partial)
            except _Stopped as stop:
                progress.partial = stop.partial
                if resumer is not None:
                    resumer.save(plain, ctx, scheduler, progress, rng=stop.partial.rng)
                where = f"in {desc} epoch {epoch}/{cfg.epochs} after {stop.partial.batches} batches"
                saved = str(resumer.path) if resumer is not None else None
                say(f"{desc}: stopped by {stop.signal_name} {where}"
                    + (f"; resume state in {saved}" if saved else " (no resume checkpoint: resume=False)"))
                raise preemption.RunInterrupted(stop.signal_name, where, saved) from None
            progress.partial = None
            scheduler.step()
            row = {"epoch": epoch, "lr": lr, "train_loss": train_metrics["loss"], "train_acc": train_metrics["acc"]}
            row.update(evaluate_splits(model, loaders, device, per_epoch, amp, cfg.max_batches_per_epoch,
                                       channels_last))
            row.update(_throughput(train_metrics, started, device))
            if train_metrics["skipped"]:
                say(f"{desc} epoch {epoch}: {int(train_metrics['skipped'])} steps skipped (non-finite loss or "
                    "gradients under float16 autocast; GradScaler lowered the scale)")
            progress.history.append(row)
            score = row[f"{cfg.select}_acc"] if cfg.select != "last" else epoch
            if score > progress.best_score:  # strict: ties keep the earliest epoch
                progress.selected_epoch, progress.best_score = epoch, score
                # The last epoch's weights are already in the model; no copy needed.
                progress.best_state = _snapshot(model) if epoch < cfg.epochs and cfg.select != "last" else None
            progress.epoch = epoch
            if resumer is not None:  # before the row is shown: an epoch in the CSV is an epoch a re-run keeps
                resumer.save(plain, ctx, scheduler, progress)
            if csv_log is not None:
                csv_log.append(row)
            tracking.log_metrics(desc, row, step=epoch)
            say(_format_row(desc, row, cfg.epochs))
            signal_name = _stop_agreed(device)
            if signal_name is not None and epoch < cfg.epochs:
                where = f"at the end of {desc} epoch {epoch}/{cfg.epochs}"
                saved = str(resumer.path) if resumer is not None else None
                say(f"{desc}: stopped by {signal_name} {where}" + (f"; resume state in {saved}" if saved else ""))
                raise preemption.RunInterrupted(signal_name, where, saved)

    history = progress.history
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    if history:
        final = {key: value for key, value in history[progress.selected_epoch - 1].items()
                 if key not in ("epoch", "lr") and key not in THROUGHPUT_COLUMNS}
        if "test" not in per_epoch:  # the kept weights are in the model now
            final.update(evaluate_splits(model, loaders, device, ("test",), amp, cfg.max_batches_per_epoch,
                                         channels_last))
    else:
        final = evaluate_splits(model, loaders, device, ("val", "test"), amp, cfg.max_batches_per_epoch, channels_last)
    if resumer is not None:  # the kept weights and their metrics: a re-run reuses them instead of retraining
        progress.finished, progress.best_state = final, None
        resumer.save(plain, ctx, scheduler, progress)
    say(f"{desc}: kept epoch {progress.selected_epoch} ({PROTOCOL_NOTES[cfg.select]})")
    return TrainResult(selected_epoch=progress.selected_epoch, selection=cfg.select,
                       protocol_note=PROTOCOL_NOTES[cfg.select], history=history,
                       final_metrics=final, epochs=cfg.epochs)


def _stop_agreed(device: torch.device) -> str | None:
    """The stop signal's name when any rank received one (one small all-reduce per epoch under torchrun)."""
    name = preemption.stop_requested()
    if not is_distributed():
        return name
    flag = _all_reduce_sum(torch.tensor([float(name is not None)], device=device)).item()
    return (name or "SIGTERM") if flag else None


def _rewrite_csv(run_dir: str | Path | None, desc: str, history: list) -> _MetricsCSV | None:
    """Rank 0's metrics CSV of training ``desc``, holding the rows of ``history`` (a resumed training's epochs)."""
    if run_dir is None or not is_main_process():
        return None
    return _MetricsCSV(Path(run_dir) / f"{desc}_metrics.csv", history)


def _throughput(train_metrics: Mapping[str, float], started: float, device: torch.device) -> dict[str, float]:
    """Seconds of the training pass and of the whole epoch (with evaluation), training images/s over all ranks, and
    peak GPU memory of this rank (CUDA only)."""
    row = {"train_seconds": train_metrics["seconds"], "epoch_seconds": time.perf_counter() - started,
           "images_per_s": train_metrics["images"] / max(train_metrics["seconds"], 1e-9)}
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return row
