"""Training a task's model from scratch: run modes ``train`` and ``pretrain_final``.

``train`` (:func:`run_train`)
    Train the task's model with ``task.train`` (from the ``task.pretrained`` weights when set:
    ``stages.common.start_model``) and save ``model.pt``. Works under torchrun (DDP, rank 0 writes).

``pretrain_final`` (:func:`run_pretrain_final`)
    The same training, as the shared start of several final runs (seeds, targets, with and without
    metanetwork): pass ``final.model=<run dir>/model.pt``. With ``final.init_prune=true`` the trained model is
    also init-pruned to ``task.initial_speed_up`` and fine-tuned (``after_init_pruning``) into
    ``init_pruned_model.pt``, the start every method of a seed shares (``pruning_final`` skips its own init
    pruning for a model already at that speed-up).

Under torchrun every rank runs every step of both (``stages.ddp``): DDP training on the rank's shard, rank 0's
weights on every rank afterwards, the init pruning on rank 0 with the pruned model rebuilt on every rank, a DDP
fine-tune, all-reduced evaluations; rank 0 alone writes ``model.pt`` / ``init_pruned_model.pt`` and prints.

Both return the ``results.json`` summary (written by ``stages.execute``): model spec, seed, protocol, the kept
epoch and how it was chosen, metrics.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig
from torch import nn

from generate_dataset.models import load_model, model_spec
from pruning.depgraph import count_macs, prune_to_speed_up
from stages import ddp
from stages.artifacts import MODEL_CHECKPOINT
from stages.common import FinalRunConfigError, recipe, run_context, setup, start_model, task_data
from training.loop import evaluate_splits
from utils import distributed
from utils.checkpoint import save_checkpoint
from utils.io import is_null

log = logging.getLogger(__name__)

INIT_PRUNED_CHECKPOINT = "init_pruned_model.pt"


def run_train(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``train``: train the task's start model (``task.pretrained`` or random) with its ``train`` recipe;
    save ``model.pt``."""
    return train_model(cfg, run_dir)[0]


def train_model(cfg: DictConfig, run_dir: Path) -> tuple[dict, nn.Module]:
    """:func:`run_train`'s work; returns ``(results.json content, the trained model)``.

    Under torchrun every rank trains (DDP, ``distributed.sync_bn``) and ends with rank 0's weights; rank 0 alone
    saves and prints, and the summary is {} on the other ranks (``stages.execute`` then writes nothing)."""
    device = setup(cfg)
    task = cfg.task
    splits, loaders = task_data(task, cfg.seed, distributed=distributed.is_distributed())
    model = start_model(task, splits).to(device)
    started = time.time()
    result = ddp.train(model, loaders, recipe(task.train, cfg.protocol), device, run_dir=run_dir, desc="train",
                       sync_bn=ddp.sync_bn_setting(cfg))
    spec = model_spec(task.model, model, splits.num_classes)
    distributed.run_on_main(save_checkpoint, Path(run_dir) / MODEL_CHECKPOINT, model.state_dict(), spec,
                            metrics=result.final_metrics)
    if not distributed.is_main_process():
        return {}, model
    summary = {
        "run": "train",
        "task": task.name,
        "model": spec,
        "seed": cfg.seed,
        "pretrained": None if is_null(task.get("pretrained")) else str(task.pretrained),
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
    return summary, model


def run_pretrain_final(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``pretrain_final``: :func:`run_train`, then (``final.init_prune``) the init-pruned start."""
    return pretrain_final(cfg, run_dir)[0]


def pretrain_final(cfg: DictConfig, run_dir: Path) -> tuple[dict, nn.Module]:
    """:func:`run_pretrain_final`'s work; returns ``(results.json content, the model the run ends with)``: the
    init-pruned model with ``final.init_prune=true``, else the trained one. Under torchrun every rank takes part in
    every step (the init pruning's collectives included); the summary is {} on ranks other than 0."""
    summary, model = train_model(cfg, run_dir)
    model_file = MODEL_CHECKPOINT
    if cfg.final.get("init_prune", False):
        init_pruned, model = _init_prune_saved(cfg, Path(run_dir))
        summary["init_pruned"] = init_pruned
        model_file = INIT_PRUNED_CHECKPOINT
    if not distributed.is_main_process():
        return {}, model
    summary["run"] = "pretrain_final"
    log.info("use it in final runs with final.model=%s", Path(run_dir).resolve() / model_file)
    return summary, model


def _init_prune_saved(cfg: DictConfig, run_dir: Path) -> tuple[dict, nn.Module]:
    """``model.pt`` -> init prune to ``task.initial_speed_up`` -> after_init_pruning fine-tune -> saved as
    ``init_pruned_model.pt``: one start shared by every final run of a seed (methods then differ only in what
    they do after it; ``pruning_final`` skips its own init pruning for a model already at that speed-up).
    Returns the summary entry and the model.

    Under torchrun rank 0 loads and prunes ``model.pt`` and every rank rebuilds the pruned model; the fine-tune is
    a DDP fine-tune, the evaluation all-reduced, and rank 0 saves."""
    ctx = run_context(cfg, run_dir)
    initial = float(ctx.task.initial_speed_up)
    if not math.isfinite(initial) or initial < 1.0:
        raise FinalRunConfigError(f"task.initial_speed_up={initial} must be finite and >= 1")

    def load_and_prune() -> tuple[nn.Module, float]:
        model, _ = load_model(run_dir / MODEL_CHECKPOINT, map_location=ctx.device)
        base_macs = count_macs(model, ctx.example)
        model.eval()
        return model, prune_to_speed_up(model, initial, ctx.method, ctx.example,
                                        iterative_steps=ctx.task.pruning.iterative_steps, base_macs=base_macs,
                                        progress=True)

    model, achieved = ctx.make_on_main(load_and_prune, "after init pruning")
    result = ctx.finetune(model, "after_init_pruning")
    model.eval()
    metrics = evaluate_splits(model, ctx.loaders, ctx.device)
    distributed.run_on_main(save_checkpoint, run_dir / INIT_PRUNED_CHECKPOINT, model.state_dict(),
                            model_spec(ctx.task.model, model, ctx.splits.num_classes), metrics=metrics)
    return {"checkpoint": INIT_PRUNED_CHECKPOINT, "speed_up": achieved, "finetune_epochs": result.epochs,
            "metrics": metrics}, model
