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
import itertools
import logging
import math
import sys
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
from utils.distributed import is_distributed, is_main_process

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
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
    channels_last: bool
    desc: str
    mixer: _BatchMixer
    # called with the model after every backward, before the optimiser step (gradients unscaled),
    # e.g. DepGraph's sparse-learning regulariser (pruning.sparse_learning)
    after_backward: Callable[[nn.Module], Any] | None = None


def _check_finite(loss: torch.Tensor, ctx: _EpochContext, epoch: int, batch_index: int) -> None:
    """Raise ``FloatingPointError`` when the loss is NaN/inf (on any rank, so no rank hangs)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    bad = _all_reduce_sum(bad)
    if bad.item() > 0:
        raise FloatingPointError(
            f"{ctx.desc}: loss is not finite (this process: {loss.item()}) at epoch {epoch}, "
            f"batch {batch_index} (0-based) "
            f"(lr={ctx.optimizer.param_groups[0]['lr']:.3g}); lower lr, set clip_grad_norm, "
            "or check the inputs for NaN/inf"
        )


def _train_one_epoch(model: nn.Module, loader: Iterable, ctx: _EpochContext, epoch: int) -> dict[str, float]:
    """One pass over ``loader``; returns running-average ``{"loss", "acc"}`` of this epoch."""
    model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss_sum, correct, count
    bar = _progress(loader, f"{ctx.desc} {epoch}/{ctx.cfg.epochs}", ctx.cfg.max_batches_per_epoch)
    for batch_index, batch in enumerate(bar):
        inputs, targets = _split_batch(batch, ctx.device, ctx.channels_last)
        inputs, targets_b, lam = ctx.mixer(inputs, targets)
        with torch.autocast(device_type=ctx.device.type, enabled=ctx.amp):
            logits = model(inputs)
            loss = ctx.criterion(logits.float(), targets)
            if lam < 1.0:
                loss = lam * loss + (1.0 - lam) * ctx.criterion(logits.float(), targets_b)
        _check_finite(loss, ctx, epoch, batch_index)
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
            sums[0] += loss.detach().double() * targets.numel()
            sums[1] += logits.argmax(dim=1).eq(targets).sum()
            sums[2] += targets.numel()
        if not bar.disable:
            bar.set_postfix(loss=f"{sums[0].item() / sums[2].item():.4f}",
                            acc=f"{sums[1].item() / sums[2].item():.4f}", refresh=False)
    bar.close()
    loss_sum, correct, count = _all_reduce_sum(sums).tolist()
    if count == 0:
        raise ValueError(f"{ctx.desc}: the training loader yielded no batches in epoch {epoch}")
    return {"loss": loss_sum / count, "acc": correct / count}


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
    """Per-epoch metrics CSV, flushed after every row so a crashed run keeps its history."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with path.open("w", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow(CSV_COLUMNS)

    def append(self, row: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as handle:
            csv.writer(handle, lineterminator="\n").writerow([row.get(column, "") for column in CSV_COLUMNS])


def _log_function(log: logging.Logger | Callable[[str], Any] | None) -> Callable[[str], Any]:
    if log is None:
        return logger.info
    return log.info if hasattr(log, "info") else log


def _format_row(desc: str, row: Mapping[str, float], epochs: int) -> str:
    parts = [f"{desc} epoch {row['epoch']}/{epochs}", f"lr {row['lr']:.4g}"]
    parts += [f"{key} {row[key]:.4f}" for key in CSV_COLUMNS[2:] if key in row]
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


def train(model: nn.Module, loaders: Any, cfg: TrainConfig | Mapping[str, Any], device: torch.device | str,
          run_dir: str | Path | None = None, desc: str = "train",
          log: logging.Logger | Callable[[str], Any] | None = None,
          after_backward: Callable[[nn.Module], Any] | None = None) -> TrainResult:
    """Train ``model`` in place and keep the weights of the epoch chosen by ``cfg.select``.

    ``loaders`` is any object with ``.train``, ``.val`` and ``.test`` loaders (val/test may be
    None) yielding ``(inputs [B, ...], targets [B])``. Each epoch: train, step the scheduler,
    evaluate val and test, log one line, append a row to ``<run_dir>/<desc>_metrics.csv``. At the
    end the selected epoch's weights are loaded back into ``model``. ``model`` may be a DDP
    wrapper; then only rank 0 writes the CSV and metrics are all-reduced. ``after_backward(model)`` runs
    after every backward and before the optimiser step (e.g. a sparsity regulariser adding to ``.grad``).
    """
    cfg = as_config(cfg)
    device = torch.device(device)
    say = _log_function(log)
    _check_loaders(loaders, cfg)
    amp, channels_last = _cuda_only_flags(cfg, device, say)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    ctx = _EpochContext(optimizer=optimizer,
                        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
                        scaler=torch.amp.GradScaler(device.type, enabled=amp), device=device, cfg=cfg,
                        amp=amp, channels_last=channels_last, desc=desc,
                        mixer=_BatchMixer(cfg.mixup_alpha, cfg.cutmix_alpha), after_backward=after_backward)
    csv_log = (_MetricsCSV(Path(run_dir) / f"{desc}_metrics.csv")
               if run_dir is not None and is_main_process() else None)

    history: list[dict[str, float]] = []
    selected_epoch, best_score, best_state = 0, -math.inf, None
    per_epoch = ("val", "test") if cfg.test_every_epoch or cfg.select == "test" else ("val",)
    for epoch in range(1, cfg.epochs + 1):
        _set_sampler_epoch(loaders.train, epoch)
        lr = optimizer.param_groups[0]["lr"]  # the lr used during this epoch
        train_metrics = _train_one_epoch(model, loaders.train, ctx, epoch)
        scheduler.step()
        row = {"epoch": epoch, "lr": lr, "train_loss": train_metrics["loss"], "train_acc": train_metrics["acc"]}
        row.update(evaluate_splits(model, loaders, device, per_epoch, amp, cfg.max_batches_per_epoch, channels_last))
        history.append(row)
        if csv_log is not None:
            csv_log.append(row)
        say(_format_row(desc, row, cfg.epochs))

        score = row[f"{cfg.select}_acc"] if cfg.select != "last" else epoch
        if score > best_score:  # strict: ties keep the earliest epoch
            selected_epoch, best_score = epoch, score
            # The last epoch's weights are already in the model; no copy needed.
            best_state = _snapshot(model) if epoch < cfg.epochs and cfg.select != "last" else None

    if best_state is not None:
        model.load_state_dict(best_state)
    if history:
        final = {key: value for key, value in history[selected_epoch - 1].items() if key not in ("epoch", "lr")}
        if "test" not in per_epoch:  # the kept weights are in the model now
            final.update(evaluate_splits(model, loaders, device, ("test",), amp, cfg.max_batches_per_epoch,
                                         channels_last))
    else:
        final = evaluate_splits(model, loaders, device, ("val", "test"), amp, cfg.max_batches_per_epoch, channels_last)
    say(f"{desc}: kept epoch {selected_epoch} ({PROTOCOL_NOTES[cfg.select]})")
    return TrainResult(selected_epoch=selected_epoch, selection=cfg.select,
                       protocol_note=PROTOCOL_NOTES[cfg.select], history=history,
                       final_metrics=final, epochs=cfg.epochs)
