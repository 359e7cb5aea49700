"""Turn the composed Hydra config into objects (data, model, training recipes), and the `train` run.

These helpers are shared by every run mode so that a task file is read in one place only.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data_loaders.image_datasets import DataLoaders, DataSplits, build_datasets, build_loaders
from generate_dataset.models import build_model, model_spec
from utils import distributed
from utils.checkpoint import save_checkpoint
from utils.device import resolve_device
from utils.run_registry import register_run
from utils.seed import seed_everything
from utils.training import TrainConfig, train

log = logging.getLogger(__name__)

PROTOCOLS = ("validation", "paper")


def task_data(task: DictConfig, seed: int, distributed: bool = False) -> tuple[DataSplits, DataLoaders]:
    """Datasets (train / validation carved from train / test) and loaders of a task."""
    ds = task.dataset
    splits = build_datasets(
        ds.name,
        root=ds.root,
        download=ds.get("download", False),
        val_size=ds.get("val_size", 0.1),
        split_seed=ds.get("split_seed", 0),
        image_size=ds.get("image_size", None),
        train_size=ds.get("train_size", None),
        synthetic=OmegaConf.to_container(ds.synthetic) if ds.get("synthetic") else None,
        # per-dataset extras, e.g. {use_extra: true} for SVHN or {debian_dir: ...} for FashionMNIST
        **(OmegaConf.to_container(ds.options) if ds.get("options") else {}),
    )
    loaders = build_loaders(
        splits,
        batch_size=task.batch_size,
        eval_batch_size=task.eval_batch_size,
        num_workers=ds.get("num_workers", 0),
        seed=seed,
        distributed=distributed,
    )
    return splits, loaders


def task_model(task: DictConfig, splits: DataSplits) -> torch.nn.Module:
    """A freshly initialised model of the task's architecture at its unpruned widths."""
    return build_model(task.model, num_classes=splits.num_classes, in_channels=splits.in_channels)


def recipe(section: DictConfig, protocol: str = "validation") -> TrainConfig:
    """A training recipe from a task section; ``protocol=paper`` turns best-on-validation into best-on-test.

    The authors keep the epoch with the best *test* accuracy in their final fine-tune (reference §7.4);
    that is only reproduced on request, and :class:`utils.training.TrainResult` labels it.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol={protocol!r}; valid: {', '.join(PROTOCOLS)}")
    values = OmegaConf.to_container(section, resolve=True)
    if protocol == "paper" and values.get("select", "val") == "val":
        values["select"] = "test"
    return TrainConfig.from_dict(values)


def setup(cfg: DictConfig) -> torch.device:
    """Seed everything and pick the device for a run (this rank's GPU under torchrun)."""
    seed_everything(cfg.seed, deterministic=cfg.get("deterministic", False))
    if distributed.is_distributed():
        device = distributed.local_device(cfg.get("device", "auto"))
    else:
        device = resolve_device(cfg.get("device", "auto"))
    log.info("device: %s, seed: %s", device, cfg.seed)
    return device


def load_pretrained(model: torch.nn.Module, name: str, weights: str) -> None:
    """Load torchvision's published weights (e.g. ``IMAGENET1K_V1``) into a model of the same architecture."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError as err:
        raise ValueError(f"torchvision publishes no weights for model {name!r}; set task.pretrained=null") from err
    if weights not in enum.__members__:
        raise ValueError(f"unknown weights {weights!r} for {name}; valid: {', '.join(enum.__members__)}")
    model.load_state_dict(enum[weights].get_state_dict(progress=distributed.is_main_process()))


def wrap_for_training(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise."""
    if not distributed.is_distributed():
        return model
    if sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


@register_run("train")
def train_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train the task's model from scratch with its `train` recipe; save it and `results.json`."""
    device = setup(cfg)
    task = cfg.task
    splits, loaders = task_data(task, cfg.seed, distributed=distributed.is_distributed())
    model = task_model(task, splits)
    if task.get("pretrained"):
        load_pretrained(model, task.model, task.pretrained)
    model = model.to(device)
    trained = wrap_for_training(model, device, sync_bn=cfg.get("distributed", {}).get("sync_bn", False))
    started = time.time()
    result = train(trained, loaders, recipe(task.train, cfg.protocol), device, run_dir=run_dir, desc="train")
    spec = model_spec(task.model, model, splits.num_classes)
    if not distributed.is_main_process():
        return {}
    save_checkpoint(run_dir / "model.pt", model.state_dict(), spec, metrics=result.final_metrics)
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
        "seconds": round(time.time() - started, 1),
        "checkpoint": "model.pt",
    }
    write_json(run_dir / "results.json", summary)
    log.info("results written to %s", run_dir / "results.json")
    _print_summary(summary)
    return summary


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` as indented JSON atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _print_summary(summary: dict) -> None:
    metrics = summary["metrics"]
    shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"[{summary['task']}] {summary['run']} done in {summary['seconds']} s: {shown}")
