"""Training a task's model from scratch: run modes ``train`` and ``pretrain_final``.

``train`` (:func:`run_train`)
    Train the task's model with ``task.train`` (from torchvision's published weights when ``task.pretrained``
    names them) and save ``model.pt``. Works under torchrun (DDP, rank 0 writes).

``pretrain_final`` (:func:`run_pretrain_final`)
    The same training, as the shared start of several final runs (seeds, targets, with and without
    metanetwork): pass ``final.model=<run dir>/model.pt``. With ``final.init_prune=true`` the trained model is
    also init-pruned to ``task.initial_speed_up`` and fine-tuned (``after_init_pruning``) into
    ``init_pruned_model.pt``, the start every method of a seed shares (``pruning_final`` skips its own init
    pruning for a model already at that speed-up).

Both return the ``results.json`` summary (written by ``stages.execute``): model spec, seed, protocol, the kept
epoch and how it was chosen, metrics.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
import torchvision
from omegaconf import DictConfig

from generate_dataset.models import load_model, model_spec
from pruning.depgraph import count_macs, prune_to_speed_up
from stages.common import FinalRunConfigError, recipe, run_context, setup, task_data, task_model
from training.loop import evaluate_splits, train
from utils import distributed
from utils.checkpoint import save_checkpoint

log = logging.getLogger(__name__)

MODEL_CHECKPOINT = "model.pt"
INIT_PRUNED_CHECKPOINT = "init_pruned_model.pt"


def load_pretrained(model: torch.nn.Module, name: str, weights: str) -> None:
    """Load torchvision's published weights (e.g. ``IMAGENET1K_V1``) into a model of the same architecture."""
    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError as err:
        raise ValueError(f"torchvision publishes no weights for model {name!r}; set task.pretrained=null") from err
    if weights not in enum.__members__:
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: {', '.join(enum.__members__)}")
    model.load_state_dict(enum[weights].get_state_dict(progress=distributed.is_main_process()))


def run_train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``train``: train the task's model from scratch with its ``train`` recipe; save ``model.pt``."""
    device = setup(cfg)
    task = cfg.task
    splits, loaders = task_data(task, cfg.seed, distributed=distributed.is_distributed())
    model = task_model(task, splits)
    if task.get("pretrained"):
        load_pretrained(model, task.model, task.pretrained)
    model = model.to(device)
    trained = distributed.wrap_for_training(model, device, sync_bn=cfg.get("distributed", {}).get("sync_bn", False))
    started = time.time()
    result = train(trained, loaders, recipe(task.train, cfg.protocol), device, run_dir=run_dir, desc="train")
    spec = model_spec(task.model, model, splits.num_classes)
    if not distributed.is_main_process():
        return {}
    save_checkpoint(Path(run_dir) / MODEL_CHECKPOINT, model.state_dict(), spec, metrics=result.final_metrics)
    summary = {
        "run": "train",
        "task": task.name,
        "model": spec,
        "seed": cfg.seed,
        "protocol": cfg.protocol,
        "selected_epoch": result.selected_epoch,
        "selection": result.selection,
        "protocol_note": result.protocol_note,
        "epochs": result.epochs,
        "metrics": result.final_metrics,
        "checkpoint": MODEL_CHECKPOINT,
    }
    shown = ", ".join(f"{k}={v:.4f}" for k, v in result.final_metrics.items() if isinstance(v, float))
    print(f"[{task.name}] train done in {time.time() - started:.1f} s: {shown}")
    return summary


def run_pretrain_final(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``pretrain_final``: :func:`run_train`, then (``final.init_prune``) the init-pruned start."""
    summary = run_train(cfg, run_dir)
    if summary:  # {} on non-zero ranks under torchrun
        summary["run"] = "pretrain_final"
        model_file = MODEL_CHECKPOINT
        if cfg.final.get("init_prune", False):
            summary["init_pruned"] = _init_prune_saved(cfg, Path(run_dir))
            model_file = INIT_PRUNED_CHECKPOINT
        log.info("use it in final runs with final.model=%s", Path(run_dir).resolve() / model_file)
    return summary


def _init_prune_saved(cfg: DictConfig, run_dir: Path) -> dict:
    """``model.pt`` -> init prune to ``task.initial_speed_up`` -> after_init_pruning fine-tune -> saved as
    ``init_pruned_model.pt``: one start shared by every final run of a seed (methods then differ only in what
    they do after it; ``pruning_final`` skips its own init pruning for a model already at that speed-up)."""
    ctx = run_context(cfg, run_dir)
    initial = float(ctx.task.initial_speed_up)
    if not math.isfinite(initial) or initial < 1.0:
        raise FinalRunConfigError(f"task.initial_speed_up={initial} must be finite and >= 1")
    model, _ = load_model(run_dir / MODEL_CHECKPOINT, map_location=ctx.device)
    base_macs = count_macs(model, ctx.example)
    model.eval()
    achieved = prune_to_speed_up(model, initial, ctx.method, ctx.example,
                                 iterative_steps=ctx.task.pruning.iterative_steps, base_macs=base_macs, progress=True)
    result = ctx.finetune(model, "after_init_pruning")
    model.eval()
    metrics = evaluate_splits(model, ctx.loaders, ctx.device)
    save_checkpoint(run_dir / INIT_PRUNED_CHECKPOINT, model.state_dict(),
                    model_spec(ctx.task.model, model, ctx.splits.num_classes), metrics=metrics)
    return {"checkpoint": INIT_PRUNED_CHECKPOINT, "speed_up": achieved, "finetune_epochs": result.epochs,
            "metrics": metrics}
