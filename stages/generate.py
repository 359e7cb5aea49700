"""Data-model generation (reference §3.3): train -> init-prune to the task's speed-up -> fine-tune -> store.

Run by ``generate_dataset/generate.py`` (its own primary config ``configs/generate.yaml``: ``num``, ``index``,
``store``, ``no_init_pruning``) and by the ``pipeline`` run's first stage. One call of :func:`run` is one shard
of the work: it writes only its own shard, skips data models that a previous (possibly killed) run already
published, and derives each model's seed from ``(seed, shard index, position)`` so that a re-run reproduces
the same models. The shard is locked for the whole call (a second generator of the same shard is refused
before training). A model that could not be stored (disk full, ...) is saved in the run dir and stored
without retraining by the next run there.

Each data model starts from ``task.pretrained`` when set (``stages.common.start_model``: the ImageNet tasks'
torchvision weights or a local file), then follows ``task.train``; with ``train.epochs: 0`` (ViT-B/16) the data
model is the pretrained network itself. Under torchrun (``generate_dataset/generate.py`` or the pipeline's
first stage) every rank trains each data model with DDP and rank 0 alone writes the shard (:func:`run`).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from data_loaders.store import ShardWriter, StoreError, load_rescued, rescue_path, shard_path
from generate_dataset.models import model_spec
from pruning.depgraph import prune_to_speed_up
from stages import ddp
from stages.ddp import train
from stages.common import example_input, recipe, setup, start_model, task_data
from training.loop import resume_path
from utils import distributed, settings_diff
from utils.seed import derive_seed, seed_everything

log = logging.getLogger(__name__)


def shard_identity(cfg: DictConfig) -> dict:
    return {"task": cfg.task.name, "architecture": cfg.task.model, "num_classes": -1, "method": cfg.method.name}


def check_initial_speed_up(cfg: DictConfig) -> None:
    """Refuse, before any training, an init-pruning speed-up that is not a finite number >= 1."""
    if cfg.get("no_init_pruning", False):
        return
    value = cfg.task.initial_speed_up
    try:
        speed_up = float(value)
    except (TypeError, ValueError):
        speed_up = math.nan
    if not math.isfinite(speed_up) or speed_up < 1.0:
        raise ValueError(f"task.initial_speed_up={value!r} must be a finite number >= 1 (1 = no init pruning; "
                         "the data models are pruned to it before they are stored)")


# What makes a data model: a shard resumed with other values would mix two recipes.
RECIPE_KEYS = ("task.model", "task.pretrained", "task.dataset", "task.input_size", "task.batch_size", "task.train",
               "task.initial_speed_up", "task.finetune.after_init_pruning", "task.pruning.iterative_steps", "method",
               "no_init_pruning")


def check_resumable(cfg: DictConfig, writer: ShardWriter, position: int) -> None:
    """Refuse to append to a shard whose stored data model (at ``position``) was made with another recipe or
    base seed than ``cfg``'s (a resumed shard must hold the models an uninterrupted run would have made)."""
    record = writer.stored(position)
    expected_seed = derive_seed(cfg.seed, cfg.index, position)
    changed = settings_diff.changed_settings(record.config, OmegaConf.to_container(cfg, resolve=True),
                                             only=RECIPE_KEYS)
    if record.seed != expected_seed:
        changed.insert(0, f"seed of data model {position}: {record.seed} (stored) vs {expected_seed} from seed="
                          f"{cfg.seed}, index={cfg.index}")
    if changed:
        raise StoreError(f"shard {writer.path} holds data models made with other settings than this run's: "
                         f"{'; '.join(changed)}. Resume with the original settings, or write to another store or "
                         "shard index (index=...)")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Generate ``cfg.num`` data models into ``cfg.store`` as shard ``cfg.index``; returns the shard's summary
    (its path, the positions produced now and those found finished).

    Under torchrun every rank trains each data model together (DDP, DistributedSampler); rank 0 alone holds the
    shard's writer and lock, decides what to skip or resume, init-prunes (the pruned model is sent to the other
    ranks) and stores; a failure in one of those steps ends every rank with its message. Other ranks return {}.
    """
    task = cfg.task
    check_initial_speed_up(cfg)
    device = setup(cfg)
    splits, _loaders = task_data(task, cfg.seed, distributed=distributed.is_distributed())
    identity = shard_identity(cfg) | {"num_classes": splits.num_classes}
    shard = _Shard(cfg, identity)
    try:
        done = set(distributed.run_on_main(shard.open))  # locks the shard (rank 0) until the end of this call
        summary = _fill_shard(cfg, run_dir, shard, done, device)
    finally:
        shard.close()
    return summary if distributed.is_main_process() else {}


class _Shard:
    """Rank 0's side of a shard: the :class:`ShardWriter` (its lock), resuming and storing. Every method runs on
    rank 0 only (through ``utils.distributed.run_on_main`` under torchrun)."""

    def __init__(self, cfg: DictConfig, identity: dict):
        self.cfg, self.identity = cfg, identity
        self.writer: ShardWriter | None = None

    def open(self) -> list[int]:
        """Lock and open the shard; the positions already stored (checked to come from this recipe)."""
        self.writer = ShardWriter(self.cfg.store, self.cfg.index, self.identity)
        done = self.writer.completed_positions()
        if done:
            check_resumable(self.cfg, self.writer, min(done))
            log.info("%s already holds data models %s; resuming", self.writer.path, sorted(done))
        return sorted(done)

    def store_rescued(self, run_dir: Path, position: int, seed: int) -> bool:
        """Store the model an earlier run in ``run_dir`` trained but could not store; False when there is none."""
        rescued = rescue_path(run_dir, self.cfg.index, position)
        if not rescued.exists():
            return False
        _store_rescued(self.writer, rescued, position, seed, run_dir)
        return True

    def append(self, *args, **kwargs) -> None:
        self.writer.append(*args, **kwargs)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    @property
    def path(self) -> str:
        return str(shard_path(self.cfg.store, self.cfg.index))


def _fill_shard(cfg: DictConfig, run_dir: Path, shard: _Shard, done: set[int], device: torch.device) -> dict:
    task = cfg.task
    sharded = distributed.is_distributed()
    sync_bn = ddp.sync_bn_setting(cfg)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    produced = []
    main = distributed.is_main_process()
    for position in tqdm(range(cfg.num), desc=f"data models (shard {cfg.index})", disable=None if main else True):
        if position in done:
            continue
        seed = derive_seed(cfg.seed, cfg.index, position)
        # trained by an earlier run in this run dir, which could not store it
        if distributed.run_on_main(shard.store_rescued, run_dir, position, seed):
            produced.append(position)
            continue
        seed_everything(seed, deterministic=cfg.get("deterministic", False))
        # loaders seeded per data model too, so a resumed shard reproduces the models of an uninterrupted one
        splits, loaders = task_data(task, seed, distributed=sharded)
        started = time.time()
        model = start_model(task, splits).to(device)  # task.pretrained weights when set
        result = train(model, loaders, recipe(task.train), device, run_dir=run_dir, desc=f"model{position}_train",
                       sync_bn=sync_bn)
        speed_up = 1.0
        if not cfg.no_init_pruning:
            model, speed_up = _init_pruned(model, cfg, method, device, splits.num_classes)
            result = train(model, loaders, recipe(task.finetune.after_init_pruning), device, run_dir=run_dir,
                           desc=f"model{position}_finetune", sync_bn=sync_bn)
        model.eval()
        metrics = dict(result.final_metrics)  # all-reduced under torchrun: the same on every rank
        spec = model_spec(task.model, model, splits.num_classes)
        distributed.run_on_main(shard.append, position, model.state_dict(), spec, metrics, speed_up, seed, config,
                                rescue_dir=run_dir)  # saved in run_dir if it fails
        if distributed.is_main_process() and not cfg.get("keep_resume_checkpoints", False):
            for desc in (f"model{position}_train", f"model{position}_finetune"):  # stored: nothing left to resume
                resume_path(run_dir, desc).unlink(missing_ok=True)
        produced.append(position)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        log.info("data model %d of shard %d stored in %.0f s: speed-up %.4fx, %s",
                 position, cfg.index, time.time() - started, speed_up, shown)
    return {"shard": shard.path, "produced": produced, "skipped": sorted(done)}


def _init_pruned(model: torch.nn.Module, cfg: DictConfig, method: dict, device: torch.device,
                 num_classes: int) -> tuple[torch.nn.Module, float]:
    """The trained model init-pruned to ``task.initial_speed_up``, and the speed-up reached.

    Single process: pruned in place. Under torchrun rank 0 prunes and every rank rebuilds the pruned model from
    rank 0's state dict (``stages.ddp.change_on_main``), so all ranks fine-tune the same structure.
    """
    task = cfg.task

    def prune(target: torch.nn.Module) -> float:
        target.eval()
        return prune_to_speed_up(target, task.initial_speed_up, method, example_input(task, device),
                                 iterative_steps=task.pruning.iterative_steps, progress=True)

    return ddp.change_on_main(model, prune, task.model, num_classes, device, "after init pruning")


def _store_rescued(writer: ShardWriter, path: Path, position: int, seed: int, run_dir: Path) -> None:
    """Store a data model that an earlier run trained but could not store, then delete its rescue file."""
    saved = load_rescued(path)
    found = {"identity": saved.get("identity"), "position": saved.get("position"), "seed": saved.get("seed")}
    expected = {"identity": writer.identity, "position": position, "seed": seed}
    if found != expected:
        differ = ", ".join(f"{k}: file has {found[k]!r}, this run {expected[k]!r}" for k in found
                           if found[k] != expected[k])
        raise StoreError(f"rescued data model {path} was trained with other settings ({differ}); delete it to "
                         f"retrain that data model, or re-run with the settings it was trained with")
    writer.append(position, saved["state_dict"], saved["spec"], saved["metrics"], saved["speed_up"], saved["seed"],
                  saved["config"], rescue_dir=run_dir)
    path.unlink()
    log.info("data model %d of shard %d stored from %s, without retraining", position, writer.index, path)
