"""Run modes ``select`` (choosing the metanetwork checkpoint on validation data) and ``visualize`` (plotting
accuracy-vs-speed-up curves).

The authors pick "the metanetwork at epoch k" by eye from curves measured on the TEST set (reference §6, §8).
Here everything is measured on the VALIDATION split of the image data and on VALIDATION data models (those
meta-training never saw: ``DataModelStore.split(task.meta_train.train_split)[1]``); no test loader is built. For
every requested checkpoint (``select.checkpoints``, :func:`parse_checkpoints`) and each of the first
``select.num_val_models`` validation data models: apply the metanetwork once, fine-tune with
``task.finetune.after_metanetwork`` (best-validation epoch), prune progressively without fine-tuning
(``pruning.curves.accuracy_speed_up_curve``) and record validation accuracy. A checkpoint's score is the mean over
the data models of ``select.score``: ``auc`` or ``acc_at`` (``pruning.curves.score_points``), or ``finetuned``
(the final runs' prune and fine-tune, ``stages.common.prune_and_finetune``, scored on validation data). Ties go
to the earlier epoch. Reference curves, never candidates: ``origin`` (the untouched data model), ``control``
(the same fine-tune without a metanetwork) and sparse learning (``select.sparse_learning_regs``).
``select.max_accuracy_drop`` ranks candidates that lost more unpruned accuracy than that against the control
last (``pruning.curves.accuracy_floor``). A checkpoint meta-trained on a validation data model is refused
(:func:`check_held_out`).

Outputs in the run dir: ``selection.json`` (the choice; read by ``stages.artifacts.chosen_checkpoint``),
``ranking.json``, ``curves.json`` (the curve cache, ``stages.curve_cache``), ``curves.png`` and ``results.json``.
``run=visualize`` re-plots from a cache (``select.cache``) and computes only what it lacks. Under torchrun every
rank computes each curve (DDP fine-tunes, all-reduced accuracy) and keeps rank 0's; rank 0 alone writes. Every
setting, output and tracked metric: [docs/stages.md](../docs/stages.md), "Choosing the checkpoint"; torchrun:
[docs/distributed.md](../docs/distributed.md).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from data_loaders.image_datasets import build_loaders
from data_loaders.store import DataModelStore
from nn.apply import apply_saved_metanetwork, fitting_checkpoints
from pruning import curves as curves_lib
from pruning.depgraph import count_macs
from pruning.sparse_learning import SparseLearning
from stages import ddp
from stages.artifacts import CHECKPOINT_DIR, CURVES_PNG, SELECTION_FILE, checkpoints_by_epoch
from stages.common import (RunContext, SelectionError, codec_options, example_input, prune_and_finetune, recipe,
                           setup, task_data)
from stages.curve_cache import CACHE_FILE, CurveCache, CurveContext, CurveJob, json_round_trip, state_dict_sha256
from stages.ddp import train
from training.config import TrainConfig
from training.loop import evaluate
from utils import distributed
from utils.io import file_sha256, is_null, write_json
from utils.seed import seed_everything
from utils.tracking import log_metrics

log = logging.getLogger(__name__)
log.addFilter(ddp.main_process_only)  # under torchrun only rank 0 logs

SCORE_KINDS = (*curves_lib.CURVE_SCORES, "finetuned")
ORIGIN = "origin"
CONTROL = "control"
SPARSE_PREFIX = "sparse_reg_"  # sparse-learning reference curves, one per select.sparse_learning_regs value
REFERENCES = (ORIGIN, CONTROL)  # reference curves: plotted and recorded, never candidates


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------
def parse_checkpoints(spec: Any, available: Mapping[int, Path], where: str = "") -> list[tuple[int, Path]]:
    """Resolve ``select.checkpoints`` (``all`` | epoch | list of epochs | ``"start:stop:step"``) to (epoch, path)."""
    where = where or "the meta_train checkpoints"
    if isinstance(spec, (ListConfig, DictConfig)):
        spec = OmegaConf.to_container(spec, resolve=True)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return sorted(available.items())
    if isinstance(spec, str) and ":" in spec:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            raise SelectionError(f"select.checkpoints={spec!r}: use 'start:stop:step' (e.g. '5:30:5')")
        try:
            start, stop, step = (int(p) if p.strip() else None for p in parts + [""] * (3 - len(parts)))
        except ValueError:
            raise SelectionError(f"select.checkpoints={spec!r}: start, stop and step must be integers") from None
        start = min(available) if start is None else start
        stop = max(available) if stop is None else stop
        step = 1 if step is None else step
        if step < 1:
            raise SelectionError(f"select.checkpoints={spec!r}: step must be >= 1")
        chosen = [(k, p) for k, p in available.items() if start <= k <= stop and (k - start) % step == 0]
        if not chosen:
            raise SelectionError(f"select.checkpoints={spec!r} matches none of the epochs {sorted(available)} "
                                 f"in {where}")
        return sorted(chosen)
    epochs = spec if isinstance(spec, (list, tuple)) else [spec]
    result = []
    for value in epochs:
        try:
            epoch = int(value)
        except (TypeError, ValueError):
            raise SelectionError(f"select.checkpoints={spec!r}: expected 'all', an epoch, a list of epochs or "
                                 "'start:stop:step'") from None
        if epoch not in available:
            raise FileNotFoundError(f"select.checkpoints asks for epoch {epoch} but {where} has no "
                                    f"epoch_{epoch:04d}.pt "
                                    f"(available epochs: {sorted(available)})")
        result.append((epoch, available[epoch]))
    if not result:
        raise SelectionError("select.checkpoints is an empty list; use 'all' or name some epochs")
    return sorted(set(result))


# ----------------------------------------------------------------------------------------------
# Planning and computing curves
# ----------------------------------------------------------------------------------------------
def _select_section(cfg: DictConfig) -> DictConfig:
    section = cfg.get("select")
    if section is None:
        raise SelectionError("the config has no `select:` section (configs/main.yaml); compose with main.yaml")
    return section


def _finetune_recipe(cfg: DictConfig) -> TrainConfig:
    """``after_metanetwork`` recipe, epochs optionally shortened (milestones scaled), never selecting on test."""
    section = _select_section(cfg)
    train_cfg = recipe(cfg.task.finetune.after_metanetwork, cfg.protocol)
    if train_cfg.select == "test":
        log.info("select: the after_metanetwork fine-tune keeps the best-VALIDATION epoch here (protocol=%s would "
                 "use test); checkpoint selection never reads the test set", cfg.protocol)
        train_cfg = dataclasses.replace(train_cfg, select="val")
    epochs = section.get("finetune_epochs")
    if epochs is not None:
        epochs = int(epochs)
        if epochs < 0:
            raise SelectionError(f"select.finetune_epochs must be >= 0 or null, got {epochs}")
        old = max(train_cfg.epochs, 1)
        scaled = sorted({max(1, round(m * epochs / old)) for m in train_cfg.milestones if m <= old})
        train_cfg = dataclasses.replace(train_cfg, epochs=epochs, milestones=[m for m in scaled if m <= epochs])
    max_batches = section.get("max_batches")
    if max_batches is not None:
        train_cfg = dataclasses.replace(train_cfg, max_batches_per_epoch=int(max_batches))
    return train_cfg


def _after_pruning_recipe(cfg: DictConfig) -> TrainConfig:
    """``after_pruning`` recipe for ``select.score=finetuned``: its last epoch is kept, because the score is read
    on the validation split (choosing the epoch there as well would flatter every candidate)."""
    train_cfg = dataclasses.replace(recipe(cfg.task.finetune.after_pruning, cfg.protocol), select="last")
    max_batches = _select_section(cfg).get("max_batches")
    if max_batches is not None:
        train_cfg = dataclasses.replace(train_cfg, max_batches_per_epoch=int(max_batches))
    return train_cfg


def _finetuned_targets(cfg: DictConfig) -> list[float]:
    """``select.finetuned_targets`` (null: ``select.target_speed_up``), checked."""
    section = _select_section(cfg)
    value = section.get("finetuned_targets")
    if is_null(value):
        value = [section.target_speed_up]
    items = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    values = [_number(t) for t in items]
    if not values or any(not math.isfinite(t) or t <= 1 for t in values):
        raise SelectionError(f"select.finetuned_targets must be total speed-ups > 1, got {items}")
    return values


def _number(value: Any) -> float:
    """``value`` as a float; NaN for anything that is not a number (booleans included), for the checks to refuse."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _validation_models(cfg: DictConfig) -> tuple[DataModelStore, list[int]]:
    section = _select_section(cfg)
    task = cfg.task
    store = DataModelStore(cfg.store, expect={"task": task.name, "architecture": task.model})
    train_fraction = float(task.meta_train.train_split)
    _train_idx, val_idx = store.split(train_fraction)
    if not val_idx:
        raise SelectionError(
            f"the data-model store {store.path} holds {len(store)} data model(s) and task.meta_train.train_split="
            f"{train_fraction} leaves none for validation; generate more data models (at least 2) or lower "
            "task.meta_train.train_split")
    wanted = int(section.get("num_val_models", 1))
    if wanted < 1:
        raise SelectionError(f"select.num_val_models must be >= 1, got {wanted}")
    if wanted > len(val_idx):
        log.warning("select.num_val_models=%d but the store %s has only %d validation data model(s); using %d",
                    wanted, store.path, len(val_idx), len(val_idx))
    return store, val_idx[:wanted]


def _common_settings(cfg: DictConfig, finetune, method: dict, finetuned: dict | None = None) -> dict:
    task = cfg.task
    section = _select_section(cfg)
    dataset = OmegaConf.to_container(task.dataset, resolve=True)
    # where the files live and how they are read do not change the numbers
    dataset = {k: v for k, v in dataset.items() if k not in ("root", "download", "num_workers")}
    if int(section.iterative_steps) < 1 or float(section.max_speed_up) <= 0:
        raise SelectionError(f"select.iterative_steps must be >= 1 and select.max_speed_up > 0, got "
                             f"{section.iterative_steps} and {section.max_speed_up}")
    settings = {
        "task": task.name,
        "architecture": task.model,
        "dataset": dataset,
        "batch_size": task.batch_size,
        "input_size": list(task.input_size),
        "seed": cfg.seed,
        "method": method,
        "iterative_steps": int(section.iterative_steps),
        "max_batches": section.get("max_batches"),
        "split": "val",
        "finetune": dataclasses.asdict(finetune),
    }
    if distributed.world_size() > 1:
        # DDP fine-tunes see other batches, and max_batches caps batches per rank: not a single process's curve
        settings["world_size"] = distributed.world_size()
    if finetuned is not None:
        # only a finetuned score adds this, so curves cached for the curve scores stay valid for them
        settings["finetuned"] = finetuned
    return json_round_trip(settings)


def check_held_out(path: Path, checkpoint: Mapping[str, Any], store: Any, val_indices: Sequence[int],
                   strict: bool = True) -> bool:
    """Refuse (``SelectionError``) to score data models a checkpoint was meta-trained on.

    A ``run=meta_train`` checkpoint records ``meta = {"store": ..., "train_indices": [...]}``. The validation
    data models are only held out when they come from the SAME store (resolved paths compared) and none of
    ``val_indices`` is among ``train_indices``. ``strict=False`` (run=visualize) logs a warning instead of
    raising. Checkpoints without that record (older or made elsewhere) cannot be checked: a warning, True.
    Returns whether the check passed.
    """
    meta = checkpoint.get("meta")
    if not isinstance(meta, Mapping) or meta.get("store") is None or meta.get("train_indices") is None:
        log.warning("checkpoint %s records no meta_train store/train_indices; cannot check that the validation "
                    "data models %s of %s were held out from its meta-training", path, list(val_indices),
                    store.path)
        return True
    ours = Path(str(store.path)).expanduser().resolve()
    theirs = Path(str(meta["store"])).expanduser().resolve()
    problem = None
    if ours != theirs:
        problem = (f"it was meta-trained on the data-model store {theirs}, but selection scores data models of "
                   f"store={ours}; its 'validation' split there is not known to be held out. Pass "
                   f"store={theirs} (the checkpoint's store)")
    else:
        overlap = sorted(set(int(i) for i in val_indices) & set(int(i) for i in meta["train_indices"]))
        if overlap:
            problem = (f"the validation data models {overlap} of store={ours} are among the data models it was "
                       f"meta-trained on (its store {theirs}, train_indices {list(meta['train_indices'])}); use "
                       "the task.meta_train.train_split of that meta_train run")
    if problem is None:
        return True
    message = f"checkpoint {path}: {problem}"
    if strict:
        raise SelectionError(message)
    log.warning("%s (run=visualize plots it anyway; run=select refuses)", message)
    return False


def _plan(cfg: DictConfig, run_dir: Path, meta_train_dir: Any,
          strict: bool = True) -> tuple[CurveContext, list[CurveJob]]:
    """Resolve checkpoints and validation data models into curve jobs (cheap: hashes only, no training).
    ``strict``: refuse checkpoints meta-trained on the validation data models (see :func:`check_held_out`)."""
    section = _select_section(cfg)
    if cfg.method.get("kind", "structured") != "structured":
        raise SelectionError(
            f"run=select/visualize scores checkpoints by structured pruning curves, but method={cfg.method.name} is "
            f"{cfg.method.kind}; select the checkpoint of an unstructured metanetwork by hand (pass a checkpoint "
            f"file as final.metanetwork) or run select with a structured method"
        )
    max_speed_up = float(section.max_speed_up)
    available = checkpoints_by_epoch(meta_train_dir)
    checkpoints = parse_checkpoints(section.get("checkpoints", "all"), available,
                                    where=str(Path(str(meta_train_dir)) / CHECKPOINT_DIR))
    store, val_indices = _validation_models(cfg)
    records = {index: store[index] for index in val_indices}
    finetune = _finetune_recipe(cfg)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    targets = after_pruning = finetuned = None
    if str(section.score) == "finetuned":
        if distributed.world_size() > 1:
            raise SelectionError("select.score=finetuned runs in a single process only (its pruned copies are not "
                                 "kept equal across ranks); use select.score=auc under torchrun")
        targets, after_pruning = _finetuned_targets(cfg), _after_pruning_recipe(cfg)
        finetuned = {"targets": targets, "recipe": dataclasses.asdict(after_pruning),
                     "iterative_steps": int(cfg.task.pruning.iterative_steps)}
    common = _common_settings(cfg, finetune, method, finetuned)
    ctx = CurveContext(cfg=cfg, run_dir=run_dir, store=store, val_indices=val_indices, records=records,
                       finetune=finetune, method=method, common=common, finetuned_targets=targets,
                       after_pruning=after_pruning)

    # Refuse a checkpoint of another layout before any (long) computation; the error names the checkpoint.
    first = records[val_indices[0]].build_model()
    read = fitting_checkpoints(first, [path for _epoch, path in checkpoints], **codec_options(cfg))
    hashes = {}
    for (epoch, path), checkpoint in zip(checkpoints, read):
        if checkpoint["spec"].get("task") not in (None, cfg.task.name):
            log.warning("checkpoint %s was trained on task %r, selecting for %r", path,
                        checkpoint["spec"].get("task"), cfg.task.name)
        check_held_out(path, checkpoint, store, val_indices, strict=strict)
        hashes[epoch] = file_sha256(path)

    jobs = []
    for index in val_indices:
        record = records[index]
        model_settings = {"index": index, "sha256": state_dict_sha256(record.state_dict), "spec": record.spec,
                          "speed_up": record.speed_up}
        if section.get("origin", True):
            settings = json_round_trip({k: v for k, v in common.items() if k != "finetune"}
                                       | {"checkpoint": None, "data_model": model_settings, "finetune": None})
            jobs.append(CurveJob(ORIGIN, None, None, index, record.speed_up, settings, max_speed_up,
                                 finetune=False))
        if section.get("control", True):
            # the checkpoints' fine-tune (recipe, seed, loaders) without a metanetwork; "curve" tells it from
            # origin (which has finetune None) and from any checkpoint (which has a checkpoint hash)
            settings = json_round_trip(common | {"checkpoint": None, "curve": CONTROL,
                                                 "data_model": model_settings})
            jobs.append(CurveJob(CONTROL, None, None, index, record.speed_up, settings, max_speed_up))
        for reg in sparse_regs(cfg):
            # DepGraph's sparse learning with the same budget: the control's fine-tune plus the regulariser
            sparse = {"reg": reg, "alpha": float(cfg.final.sparse_learning.alpha)}
            settings = json_round_trip(common | {"checkpoint": None, "curve": "sparse_learning",
                                                 "sparse_learning": sparse, "data_model": model_settings})
            jobs.append(CurveJob(sparse_label(reg), None, None, index, record.speed_up, settings, max_speed_up,
                                 sparse_reg=reg))
        for epoch, path in checkpoints:
            settings = json_round_trip(common | {"checkpoint": {"sha256": hashes[epoch]},
                                                 "data_model": model_settings})
            jobs.append(CurveJob(f"epoch_{epoch}", epoch, path, index, record.speed_up, settings, max_speed_up))
    return ctx, jobs


def _max_accuracy_drop(section: DictConfig) -> float | None:
    """``select.max_accuracy_drop`` checked: a number >= 0 with the control on, or None (off)."""
    value = section.get("max_accuracy_drop")
    if is_null(value):
        return None
    drop = _number(value)
    if not math.isfinite(drop) or drop < 0:
        raise SelectionError(f"select.max_accuracy_drop={value!r} must be a number >= 0 or null")
    if not section.get("control", True):
        raise SelectionError("select.max_accuracy_drop compares with the control's unpruned accuracy; "
                             "it needs select.control=true")
    return drop


def is_reference(label: str) -> bool:
    """Reference curves (origin, control, sparse learning) are plotted and recorded, never candidates."""
    return label in REFERENCES or label.startswith(SPARSE_PREFIX)


def sparse_label(reg: float) -> str:
    return f"{SPARSE_PREFIX}{reg:g}"


def sparse_regs(cfg: DictConfig) -> list[float]:
    """``select.sparse_learning_regs``: regulariser strengths of the sparse-learning reference curves."""
    regs = _select_section(cfg).get("sparse_learning_regs") or []
    items = list(regs) if isinstance(regs, (list, tuple, ListConfig)) else [regs]
    values = [_number(r) for r in items]
    bad = [r for r, v in zip(items, values) if not (math.isfinite(v) and v > 0)]
    if bad:
        raise SelectionError(f"select.sparse_learning_regs must be positive numbers, got {bad}")
    return values


def _ensure_data(ctx: CurveContext) -> None:
    """Device, datasets and the validation loader, built on the first curve that must be computed."""
    if ctx.device is not None:
        return
    ctx.device = setup(ctx.cfg)
    ctx.splits, loaders = task_data(ctx.cfg.task, ctx.cfg.seed, distributed=distributed.is_distributed())
    if loaders.val is None:
        raise SelectionError("selection measures on the validation split but the task has none; set "
                             "task.dataset.val_size > 0")
    ctx.val_loader = loaders.val


def _train_and_val_loaders(ctx: CurveContext):
    """Fresh loaders seeded the same way for every curve (so a curve does not depend on which came before),
    WITHOUT the test loader: the fine-tune cannot evaluate on test. Under torchrun: DistributedSampler shards."""
    task = ctx.cfg.task
    loaders = build_loaders(ctx.splits, batch_size=task.batch_size, eval_batch_size=task.eval_batch_size,
                            num_workers=task.dataset.get("num_workers", 0), seed=ctx.cfg.seed,
                            distributed=distributed.is_distributed())
    return dataclasses.replace(loaders, test=None)


def _compute(job: CurveJob, ctx: CurveContext) -> dict:
    """Apply the metanetwork (checkpoints only), fine-tune (all but origin) and prune progressively: one curve
    (all on validation data). The control takes exactly the checkpoints' path minus the metanetwork. Under
    torchrun every rank runs it: a DDP fine-tune, then the curve with all-reduced accuracy."""
    _ensure_data(ctx)
    cfg, device = ctx.cfg, ctx.device
    section = _select_section(cfg)
    started = time.time()
    record = ctx.records[job.model_index]
    model = record.build_model().to(device)
    finetune_info = None
    if job.checkpoint is not None:
        apply_saved_metanetwork(model, job.checkpoint, map_location=device, **codec_options(cfg))
        # every rank applies it to the same weights; rank 0's result everywhere, whatever the summation order
        ddp.same_weights_everywhere(model)
    if job.finetune:
        seed_everything(cfg.seed, deterministic=cfg.get("deterministic", False))
        sparse = None
        if job.sparse_reg is not None:
            # runs after DDP's gradient all-reduce: the same weights give the same regulariser on every rank
            sparse = SparseLearning(model, example_input(cfg.task, device), ctx.method, reg=job.sparse_reg,
                                    alpha=float(cfg.final.sparse_learning.alpha),
                                    iterative_steps=int(section.iterative_steps))
        # plain BatchNorm (distributed.sync_bn is not applied here): the curve prunes this very model, whose
        # modules must stay the ones the pruner (and the sparse-learning hook) traced
        result = train(model, _train_and_val_loaders(ctx), ctx.finetune, device, run_dir=ctx.run_dir / "finetune",
                       desc=f"{job.label}_model{job.model_index}", after_backward=sparse)
        finetune_info = {"epochs": result.epochs, "selected_epoch": result.selected_epoch,
                         "selection": result.selection, "metrics": result.final_metrics}
    model.eval()
    finetuned = _finetuned_accuracies(job, ctx, model) if ctx.finetuned_targets else None
    points = curves_lib.accuracy_speed_up_curve(
        model, ctx.val_loader, device, ctx.method, example_input(cfg.task, device), job.max_speed_up,
        base_speed_up=job.base_speed_up, iterative_steps=int(section.iterative_steps),
        max_batches=section.get("max_batches"), desc=f"{job.label} model {job.model_index}")
    return {"label": job.label, "epoch": job.epoch, "checkpoint": str(job.checkpoint) if job.checkpoint else None,
            "model_index": job.model_index, "base_speed_up": job.base_speed_up, "settings": job.settings,
            "max_speed_up": job.max_speed_up, "points": [[x, a] for x, a in points], "finetune": finetune_info,
            **({"finetuned": finetuned} if finetuned is not None else {}), "seconds": round(time.time() - started, 2)}


def _finetuned_accuracies(job: CurveJob, ctx: CurveContext, model: torch.nn.Module) -> dict[str, dict]:
    """``select.score=finetuned``: ``{target: {speed_up, val_acc}}`` of copies of ``model`` pruned to each total
    speed-up (the data model's own init pruning counted, as in the final runs) and fine-tuned after pruning."""
    cfg, device = ctx.cfg, ctx.device
    example = example_input(cfg.task, device)
    base_macs = count_macs(model, example) * job.base_speed_up
    results = {}
    for target in ctx.finetuned_targets:
        run = RunContext(cfg, ctx.run_dir / "finetune", device, ctx.splits, _train_and_val_loaders(ctx), ctx.method,
                         example)
        pruned, achieved, _result = prune_and_finetune(
            run, copy.deepcopy(model), target, base_macs, ctx.after_pruning,
            f"{job.label}_model{job.model_index}_{target:g}x",
            before_finetune=lambda _pruned: seed_everything(cfg.seed, deterministic=cfg.get("deterministic", False)))
        acc = evaluate(pruned, ctx.val_loader, device, max_batches=_select_section(cfg).get("max_batches"))["acc"]
        results[f"{target:g}"] = {"speed_up": achieved, "val_acc": acc}
        log.info("%s, data model %d: pruned to %.3fx and fine-tuned: validation accuracy %.4f", job.label,
                 job.model_index, achieved, acc)
    return results


def _score_kind(section: DictConfig) -> str:
    """``select.score`` checked against :data:`SCORE_KINDS`."""
    kind = str(section.score)
    if kind not in SCORE_KINDS:
        raise SelectionError(f"select.score={kind!r} is unknown; valid: {', '.join(SCORE_KINDS)}")
    return kind


def check_settings(cfg: DictConfig, meta_train_epochs: int | None = None) -> None:
    """Refuse, before any training, ``select.*`` settings that run=select would only reject after its inputs exist:
    ``score``, ``max_accuracy_drop`` (and the control it needs), ``finetuned_targets``, ``sparse_learning_regs``,
    and, given ``meta_train_epochs`` (the pipeline's ``task.meta_train.epochs``; meta-training writes a checkpoint
    after each epoch, 1-based), ``checkpoints`` against the epochs such a meta-training writes."""
    section = _select_section(cfg)
    _score_kind(section)
    _max_accuracy_drop(section)
    _finetuned_targets(cfg)
    sparse_regs(cfg)
    if meta_train_epochs is not None:
        epochs = {epoch: Path(f"epoch_{epoch:04d}.pt") for epoch in range(1, int(meta_train_epochs) + 1)}
        try:
            parse_checkpoints(section.get("checkpoints", "all"), epochs,
                              where=f"a meta-training of task.meta_train.epochs={meta_train_epochs}")
        except FileNotFoundError as err:  # an epoch that meta-training will not write: a setting, not a file
            raise SelectionError(str(err)) from None


def _score(job: CurveJob, kind: str, max_speed_up: float, target_speed_up: float) -> float:
    if kind == "finetuned":
        accuracies = [item["val_acc"] for item in job.entry["finetuned"].values()]
        return sum(accuracies) / len(accuracies)
    return curves_lib.score_points(job.points, kind, max_speed_up, target_speed_up)


def _produce(ctx: CurveContext, jobs: list[CurveJob], cache: CurveCache) -> dict[str, dict]:
    """Fill every job from the cache or by computing it; returns per-label summaries (scores, curves)."""
    section = _select_section(ctx.cfg)
    kind = _score_kind(section)
    max_speed_up, target = float(section.max_speed_up), float(section.target_speed_up)
    labels: dict[str, list[CurveJob]] = {}
    for job in jobs:
        labels.setdefault(job.label, []).append(job)
    summary = {}
    # disable=None: a bar on a terminal only; in log files the lines below say the same once per curve
    bar = None if distributed.is_main_process() else True
    for label, group in tqdm(labels.items(), desc="curves", total=len(labels), disable=bar):
        for job in group:
            cached = cache.find(job.settings, job.max_speed_up)
            if cached is not None:
                # keep the full cached curve in the new cache file; label/path may have changed
                job.entry = dict(cached[0], label=job.label, epoch=job.epoch,
                                 checkpoint=str(job.checkpoint) if job.checkpoint else None)
                job.points, job.reused = cached[1], True
            else:
                # rank 0's curve on every rank (they agree; this makes the scores and the choice equal by
                # construction)
                job.entry = distributed.broadcast_object(_compute(job, ctx))
                job.points = job.entry["points"]
            log.info("curve %s, data model %d: %s, %d point(s) up to speed-up %.3fx (accuracy %.4f -> %.4f)",
                     label, job.model_index, "from cache" if job.reused else f"computed in {job.entry['seconds']} s",
                     len(job.points), job.points[-1][0], job.points[0][1], job.points[-1][1])
        scores = [_score(job, kind, max_speed_up, target) for job in group]
        score = sum(scores) / len(scores)
        summary[label] = {"label": label, "epoch": group[0].epoch,
                          "checkpoint": str(group[0].checkpoint) if group[0].checkpoint else None,
                          "score": score, "per_model": dict(zip([j.model_index for j in group], scores)),
                          "curve": curves_lib.mean_curve([j.points for j in group], max_speed_up),
                          # before any pruning: what select.max_accuracy_drop compares with the control's
                          "unpruned_acc": sum(j.points[0][1] for j in group) / len(group),
                          "reused": sum(j.reused for j in group)}
        if kind == "finetuned":
            # per target, mean over the validation data models: what the ranking shows
            summary[label]["finetuned"] = {
                target: sum(j.entry["finetuned"][target]["val_acc"] for j in group) / len(group)
                for target in group[0].entry["finetuned"]}
        log.info("%s: %s = %.4f (mean over %d validation data model(s)%s)", label, kind, score, len(group),
                 ", from cache" if all(j.reused for j in group) else "")
    return summary


def _plot(ctx: CurveContext, summary: dict[str, dict], path: Path) -> Path:
    cfg = ctx.cfg
    section = _select_section(cfg)
    kind = str(section.score)
    # references first, then the checkpoints by epoch (their colours run along the colormap in that order)
    order = [label for label in summary if is_reference(label)] + sorted(
        (label for label in summary if not is_reference(label)), key=lambda label: summary[label]["epoch"])
    styles = curves_lib.curve_styles(order)
    names = {label: f"{label} ({kind} {summary[label]['score']:.4f})" for label in order}
    shown = {names[label]: summary[label]["curve"] for label in order}
    n = len(ctx.val_indices)
    lines = [f"{cfg.task.name}: validation accuracy vs speed-up, no fine-tune after pruning",
             f"mean over {n} validation data model(s); origin = untouched data model"]
    if CONTROL in summary:
        lines.append("control = the checkpoints' fine-tune without a metanetwork")
    if kind == "finetuned":
        lines.append(f"score (legend): validation accuracy after pruning to {ctx.finetuned_targets}x + after_pruning "
                     "fine-tune")
    title = "\n".join(lines)
    ylim = cfg.task.get("visualize", {}).get("ylim")
    return curves_lib.plot_curves(shown, path, float(section.max_speed_up),
                                  ylim=list(ylim) if ylim is not None else None, title=title,
                                  styles={names[label]: styles[label] for label in order})


def _run_curves(cfg: DictConfig, run_dir: Path, meta_train_dir: Any, cache: CurveCache, strict: bool = True):
    ctx, jobs = _plan(cfg, run_dir, meta_train_dir, strict=strict)
    summary = _produce(ctx, jobs, cache)
    meta = {"task": cfg.task.name, "meta_train_dir": str(Path(str(meta_train_dir)).expanduser().resolve()),
            "store": str(ctx.store.path.resolve()), "split": "val"}

    def write() -> None:
        cache.save(run_dir / CACHE_FILE, [job.entry for job in jobs], meta)
        _plot(ctx, summary, run_dir / CURVES_PNG)

    distributed.run_on_main(write)
    reused = sum(job.reused for job in jobs)
    return ctx, jobs, summary, {"curves_reused": reused, "curves_computed": len(jobs) - reused}


# ----------------------------------------------------------------------------------------------
# Run modes
# ----------------------------------------------------------------------------------------------
def run_select(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``select``: score every requested metanetwork checkpoint on validation data models; write
    ``selection.json`` (the choice), ``ranking.json``, ``curves.json`` and ``curves.png``."""
    run_dir = Path(run_dir)
    section = _select_section(cfg)
    cache = CurveCache.load(section.get("cache"))
    ctx, jobs, summary, counts = _run_curves(cfg, run_dir, section.get("meta_train_dir"), cache)
    origin, control = summary.get(ORIGIN), summary.get(CONTROL)
    floor = curves_lib.accuracy_floor(_max_accuracy_drop(section), control)
    candidates = [item for label, item in summary.items() if not is_reference(label)]
    # eligible ones first (select.max_accuracy_drop), each part by score; ties: earlier epoch
    ranking = sorted(candidates, key=lambda item: (not curves_lib.eligible(item, floor), -item["score"], item["epoch"]))
    ranked = [{"rank": i + 1, "epoch": item["epoch"], "checkpoint": item["checkpoint"], "score": item["score"],
               "unpruned_acc": item["unpruned_acc"], "eligible": curves_lib.eligible(item, floor),
               "per_model": item["per_model"], **({"finetuned": item["finetuned"]} if "finetuned" in item else {})}
              for i, item in enumerate(ranking)]
    best = ranking[0]
    for item in sorted(ranked, key=lambda r: r["epoch"]):  # one row per candidate, at its checkpoint's epoch
        log_metrics("select", {**{k: item[k] for k in ("rank", "score", "unpruned_acc", "eligible", "per_model",
                                                       "finetuned") if k in item},
                               "gain_over_control": item["score"] - control["score"] if control else None},
                    step=item["epoch"])
    if not curves_lib.eligible(best, floor):
        log.warning("no checkpoint keeps the unpruned validation accuracy within select.max_accuracy_drop=%s of "
                    "the control's (%.4f); choosing the best-scoring one anyway", section.max_accuracy_drop,
                    control["unpruned_acc"])
    kind = str(section.score)
    sparse = {f"{reg:g}": summary[sparse_label(reg)] for reg in sparse_regs(cfg)}
    sparse_scores = {reg: item["score"] for reg, item in sparse.items()}
    best_sparse = min(sparse, key=lambda reg: (not curves_lib.eligible(sparse[reg], floor), -sparse_scores[reg],
                                               float(reg))) if sparse else None
    references = {
        "origin_score": origin["score"] if origin else None,
        "control_score": control["score"] if control else None,
        "gain_over_control": best["score"] - control["score"] if control else None,
        # DepGraph sparse learning at each select.sparse_learning_regs value; the best one (validation) is the
        # strength its final runs should use
        "sparse_learning_scores": sparse_scores,
        "best_sparse_reg": float(best_sparse) if best_sparse is not None else None,
        "gain_over_sparse_learning": best["score"] - sparse_scores[best_sparse] if best_sparse else None,
        "sparse_learning_unpruned_acc": {reg: item["unpruned_acc"] for reg, item in sparse.items()},
        "control_unpruned_acc": control["unpruned_acc"] if control else None,
        "max_accuracy_drop": None if floor is None else float(section.max_accuracy_drop),
        "accuracy_floor": floor,
    }
    selection = {
        "chosen": best["checkpoint"], "epoch": best["epoch"], "score": best["score"], "score_kind": kind,
        "split": "val", "ranking": ranked, **references,
        "max_speed_up": float(section.max_speed_up), "target_speed_up": float(section.target_speed_up),
        "validation_models": ctx.val_indices, "store": str(ctx.store.path.resolve()),
        "meta_train_dir": str(Path(str(section.meta_train_dir)).expanduser().resolve()),
        "finetune": dataclasses.asdict(ctx.finetune),
        "note": ("honest selection: validation data models, validation split of the image data; the test set "
                 "was not used. origin = untouched data model without fine-tuning; control = the same data model "
                 "given the same fine-tune (recipe, seed, loaders) without a metanetwork; both are reference "
                 "lines, not candidates. gain_over_control = score - control_score"),
    }

    def write() -> None:
        write_json(run_dir / "ranking.json", {"score_kind": kind, "split": "val", "ranking": ranked, **references})
        write_json(run_dir / SELECTION_FILE, selection)

    log_metrics("select_summary", {"epoch": best["epoch"], "score": best["score"], **references}, step=best["epoch"])
    # every rank holds the same curves (broadcast from rank 0), hence the same choice; rank 0 writes it, and the
    # other ranks return only after it is written (a later stage on any rank can read it)
    distributed.run_on_main(write)
    if origin and best["score"] < origin["score"]:
        log.warning("the best checkpoint (epoch %d, %s %.4f) scores below the untouched data model (%.4f)",
                    best["epoch"], kind, best["score"], origin["score"])
    if control and best["score"] <= control["score"]:
        log.warning("the best checkpoint (epoch %d, %s %.4f) does not beat the control (%.4f: the same fine-tune "
                    "without a metanetwork); the metanetwork adds nothing measurable here", best["epoch"], kind,
                    best["score"], control["score"])
    log.info("chose epoch %d (%s) with %s %.4f", best["epoch"], best["checkpoint"], kind, best["score"])
    results = {"run": "select", "task": cfg.task.name, "seed": cfg.seed, **{k: selection[k] for k in (
        "chosen", "epoch", "score", "score_kind", "split", "origin_score", "control_score", "gain_over_control",
        "sparse_learning_scores", "best_sparse_reg", "gain_over_sparse_learning", "validation_models")},
               "ranking": [{"epoch": r["epoch"], "score": r["score"]} for r in ranked], **counts}
    versus = f", control {control['score']:.4f}" if control else ""
    if distributed.is_main_process():
        print(f"[{cfg.task.name}] select: epoch {best['epoch']} ({kind} {best['score']:.4f} on validation{versus}) "
              f"-> {run_dir / SELECTION_FILE}")
    return results


def run_visualize(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``visualize``: plot the curves of the requested checkpoints + origin + control, reusing cached
    curves whose settings match."""
    run_dir = Path(run_dir)
    section = _select_section(cfg)
    cache = CurveCache.load(section.get("cache"))
    meta_train_dir = section.get("meta_train_dir") or cache.meta.get("meta_train_dir")
    if not meta_train_dir:
        raise SelectionError("run=visualize needs select.meta_train_dir=<meta_train run dir> or "
                             "select.cache=<select run dir> (whose curves.json records the meta_train dir)")
    # a re-plot: checkpoints meta-trained on these data models are plotted with a warning (select refuses them)
    _ctx, _jobs, summary, counts = _run_curves(cfg, run_dir, meta_train_dir, cache, strict=False)
    for label, item in sorted(summary.items(), key=lambda kv: kv[1]["epoch"] or 0):
        if not is_reference(label):
            log_metrics("visualize", {k: item[k] for k in ("score", "unpruned_acc", "per_model")}, step=item["epoch"])
    results = {"run": "visualize", "task": cfg.task.name, "score_kind": str(section.score), "split": "val",
               "scores": {label: item["score"] for label, item in summary.items()}, **counts,
               "plot": str(run_dir / CURVES_PNG)}
    if distributed.is_main_process():
        print(f"[{cfg.task.name}] visualize: {counts['curves_computed']} curve(s) computed, "
              f"{counts['curves_reused']} reused -> {run_dir / CURVES_PNG}")
    return results
