"""The paper's final runs (reference §2.1 steps 5-7, §7.4, §12) and the `analyse` run.

Run modes (``python main/main.py run=MODE task=T ...``):

``pretrain_final``
    Train the task's model from scratch with ``task.train`` and save ``model.pt`` (as ``run=train``), so
    several final runs (seeds, targets, with and without metanetwork) start from the same network:
    pass it as ``final.model=<run dir>/model.pt``.

``pruning_final`` (structured, reference §7.4)
    model (``final.model``, or trained now with ``task.train``) -> init prune to ``task.initial_speed_up``
    -> fine-tune ``task.finetune.after_init_pruning`` -> metanetwork (``final.metanetwork``) -> fine-tune
    ``after_metanetwork`` -> prune to ``final.target_speed_up`` -> fine-tune ``after_pruning``.
    Both speed-ups are TOTAL speed-ups: unpruned-architecture MACs / current MACs. With
    ``final.metanetwork=null`` the same pipeline runs without a metanetwork (the baseline); like the
    reference it then skips the ``after_metanetwork`` fine-tune unless
    ``final.finetune_without_metanetwork=true`` (same epoch budget as the metanetwork run).

``unstructured_pruning_final`` (reference §12; ``method=unstructured_l1_norm`` or ``method=nm_sparsity``)
    model -> metanetwork (optional) -> fine-tune ``after_metanetwork`` -> global L1 pruning of all
    Conv/Linear weights to ``final.amount`` (or N:M with ``method.n``/``method.m``) -> fine-tune
    ``after_pruning`` with the pruned weights held at zero (masked gradients, checked afterwards).
    No init pruning, as in the reference (use a metanetwork trained on ``no_init_pruning`` data models).

``analyse``
    Per-layer weight / BatchNorm statistics of ``final.model`` (and ``final.compare_model``, and
    ``final.model`` after ``final.metanetwork``): ``layer_statistics.csv`` and ``layer_statistics.png``.

Every final run writes ``results.json`` and the pruned model ``pruned_model.pt`` (weights-only
checkpoint with its architecture spec; ``utils.checkpoint.load_model`` rebuilds it) into its run dir.
Epochs are selected on the validation split by default; ``protocol=paper`` makes the after-pruning
fine-tune keep the best-TEST epoch as the authors did, and ``results.json`` says so (``protocol``,
``selection``, ``protocol_note``). ``run=report`` (utils/report.py) turns the results into tables.

Unreachable speed-up: the target is checked BEFORE any training, by pruning a copy of the unpruned
architecture; if it cannot be reached the run fails with :class:`UnreachableTargetError` naming the best
speed-up reached (nothing is written but the log). A metanetwork whose graph layout does not fit the
task's architecture is refused, also before training (``LayoutMismatchError`` naming both layouts).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from termcolor import colored
from torch import nn

from data_loaders.image_datasets import DataLoaders, DataSplits
from generate_dataset.generation import example_input
from generate_dataset.models import model_spec
from nn.graph import GraphCodec
from utils import unstructured
from utils.analyse import layer_statistics, normalised_channel_norms, plot_statistics, write_csv
from utils.checkpoint import load_model, save_checkpoint
from utils.experiment import recipe, setup, task_data, task_model, train_run, write_json
from utils.metanet_io import apply_metanetwork, load_metanetwork
from utils.pruning import SpeedUpNotReachedError, count_macs, prune_to_speed_up
from utils.run_registry import register_run
from utils.sparse_learning import SparseLearning
from utils.training import TrainResult, evaluate, train

log = logging.getLogger(__name__)

PRUNED_CHECKPOINT = "pruned_model.pt"
INIT_PRUNED_CHECKPOINT = "init_pruned_model.pt"


class UnreachableTargetError(SpeedUpNotReachedError):
    """``final.target_speed_up`` cannot be reached by the pruning criterion; ``achieved`` is the best reached."""

    def __init__(self, target: float, achieved: float, steps: int, architecture: str, method: str):
        self.target, self.achieved, self.steps = target, achieved, steps
        RuntimeError.__init__(
            self,
            f"final.target_speed_up={target:g} is unreachable for {architecture} with method={method}: the best "
            f"speed-up reached is {achieved:.4f}x (all {steps} pruning steps of task.pruning.iterative_steps). "
            f"Choose final.target_speed_up <= {achieved:.2f}. Checked before any training; nothing was trained.",
        )


class FinalRunConfigError(ValueError):
    """A final-run setting that cannot work (wrong model file, wrong method kind, bad target ...)."""


# ----------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------
@dataclass
class _Context:
    cfg: DictConfig
    run_dir: Path
    device: torch.device
    splits: DataSplits
    loaders: DataLoaders
    method: dict
    example: torch.Tensor  # [1, C, H, W] on device: traces and counts MACs

    @property
    def task(self) -> DictConfig:
        return self.cfg.task

    def recipe(self, stage: str):
        return recipe(self.task.finetune[stage], self.cfg.protocol)


def _context(cfg: DictConfig, run_dir: Path) -> _Context:
    device = setup(cfg)
    splits, loaders = task_data(cfg.task, cfg.seed)
    method = OmegaConf.to_container(cfg.method, resolve=True)
    return _Context(cfg, Path(run_dir), device, splits, loaders, method, example_input(cfg.task, device))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate_splits(model: nn.Module, loaders: DataLoaders, device: torch.device) -> dict[str, float]:
    """Full val/test evaluation: ``{"val_acc", "val_loss", "test_acc", "test_loss"}`` (val absent without a split)."""
    metrics: dict[str, float] = {}
    for split in ("val", "test"):
        loader = getattr(loaders, split)
        if loader is not None:
            metrics.update({f"{split}_{k}": v for k, v in evaluate(model, loader, device).items()})
    return metrics


def _finetune_record(result: TrainResult | None) -> dict | None:
    if result is None:
        return None
    return {"epochs": result.epochs, "selected_epoch": result.selected_epoch, "selection": result.selection,
            "protocol_note": result.protocol_note, "metrics": result.final_metrics}


def resolve_metanetwork(value: Any) -> Path | None:
    """``final.metanetwork`` -> a metanetwork checkpoint path, or None for the baseline.

    A ``.pt`` file is used as is; a folder is a select run dir whose ``selection.json`` names the chosen
    checkpoint (key ``"chosen"``; a relative path is taken relative to that folder first).
    """
    if value is None or str(value).strip() in ("", "null", "None"):
        return None
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"final.metanetwork={value}: no such file or folder; pass a metanetwork checkpoint (.pt), a select "
            "run dir (with selection.json), or null for the baseline without metanetwork"
        )
    try:  # the selection helper knows its own file format best
        from utils.selection import chosen_checkpoint
    except ImportError:
        chosen_checkpoint = None
    if chosen_checkpoint is not None:
        chosen = Path(chosen_checkpoint(path))
    else:
        selection = path / "selection.json"
        if not selection.is_file():
            raise FileNotFoundError(
                f"final.metanetwork={value} is a folder without selection.json; pass the select run dir "
                "(run=select writes selection.json) or the metanetwork checkpoint (.pt) itself"
            )
        data = json.loads(selection.read_text())
        if not data.get("chosen"):
            raise KeyError(f"{selection} has no 'chosen' entry naming the selected metanetwork checkpoint")
        chosen = Path(data["chosen"])
    for candidate in ((path / chosen) if not chosen.is_absolute() else chosen, chosen):
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"the metanetwork chosen in {path} ({chosen}) does not exist")


def metanetwork_setting(cfg: DictConfig) -> Path | None:
    """``cfg.final.metanetwork`` resolved (:func:`resolve_metanetwork`); a clear error when left mandatory (???)."""
    if OmegaConf.is_missing(cfg.final, "metanetwork"):
        raise FinalRunConfigError(
            "final.metanetwork is required here: pass final.metanetwork=<select run dir or metanetwork .pt>, "
            "or final.metanetwork=null for the baseline without metanetwork"
        )
    return resolve_metanetwork(cfg.final.get("metanetwork"))


def _check_metanetwork(path: Path | None, template: nn.Module, ctx: _Context) -> dict | None:
    """Refuse a metanetwork whose layout does not fit the task's graphs, before any training."""
    if path is None:
        return None
    codec = GraphCodec(template, input_shape=tuple(ctx.task.input_size))
    _net, checkpoint = load_metanetwork(path, codec)  # LayoutMismatchError names both layouts
    spec = checkpoint["spec"]
    if spec.get("task") != ctx.task.name:
        log.info("transfer: metanetwork %s was trained on task %s, used on %s", path, spec.get("task"), ctx.task.name)
    return {"path": str(path), "task": spec.get("task"), "epoch": spec.get("epoch")}


def _apply_metanetwork(model: nn.Module, path: Path, ctx: _Context) -> None:
    codec = GraphCodec(model, input_shape=tuple(ctx.task.input_size))
    net, _ = load_metanetwork(path, codec, map_location=ctx.device)
    apply_metanetwork(model, net, codec)


def _given_model(ctx: _Context) -> tuple[nn.Module, str] | None:
    """``final.model`` loaded and checked against the task (None when it is null)."""
    task, source = ctx.task, ctx.cfg.final.get("model")
    if not source:
        return None
    model, checkpoint = load_model(source, map_location=ctx.device)
    spec = checkpoint["spec"]
    expected = {"name": task.model, "num_classes": ctx.splits.num_classes, "in_channels": ctx.splits.in_channels}
    wrong = {k: spec.get(k) for k, v in expected.items() if k in spec and spec[k] != v}
    if wrong:
        raise FinalRunConfigError(
            f"final.model={source} holds {wrong} but task {task.name} needs {expected}; pass a model trained "
            "for this task (run=pretrain_final) or final.model=null to train one now"
        )
    log.info("starting from %s", source)
    return model.to(ctx.device), str(Path(source).resolve())


def _start_model(ctx: _Context, given: tuple[nn.Module, str] | None) -> tuple[nn.Module, str | None]:
    """The given model, or one trained now with ``task.train`` (saved as ``pretrained_model.pt``)."""
    if given is not None:
        return given
    log.info("final.model is null: training the task's model now with task.train")
    task = ctx.task
    model = task_model(task, ctx.splits).to(ctx.device)
    result = train(model, ctx.loaders, recipe(task.train, ctx.cfg.protocol), ctx.device, run_dir=ctx.run_dir,
                   desc="pretrain")
    save_checkpoint(ctx.run_dir / "pretrained_model.pt", model.state_dict(),
                    model_spec(task.model, model, ctx.splits.num_classes), metrics=result.final_metrics)
    return model, None


def _stage(stages: list, name: str, model: nn.Module, ctx: _Context, base_macs: float | None = None) -> dict:
    """Evaluate and record one pipeline stage."""
    row: dict[str, Any] = {"stage": name, "params": num_params(model)}
    if base_macs is not None:
        row["speed_up"] = base_macs / count_macs(model, ctx.example)
    row.update(evaluate_splits(model, ctx.loaders, ctx.device))
    stages.append(row)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
    log.info("[%d] %s: %s", len(stages), name, shown)
    return row


def _finetune(model: nn.Module, ctx: _Context, stage: str) -> TrainResult:
    return train(model, ctx.loaders, ctx.recipe(stage), ctx.device, run_dir=ctx.run_dir, desc=f"finetune_{stage}")


def _finish(ctx: _Context, model: nn.Module, summary: dict, started: float) -> dict:
    """Save the pruned model + results.json, print the headline."""
    spec = model_spec(ctx.task.model, model, ctx.splits.num_classes)
    save_checkpoint(ctx.run_dir / PRUNED_CHECKPOINT, model.state_dict(), spec,
                    metrics={k: float(v) for k, v in summary["pruned"].items()})
    summary.update(model=spec, checkpoint=PRUNED_CHECKPOINT, seconds=round(time.time() - started, 1))
    write_json(ctx.run_dir / "results.json", summary)
    log.info("results written to %s", ctx.run_dir / "results.json")
    headline = (f"speed-up {summary['speed_up']:.3f}x" if "speed_up" in summary
                else f"sparsity {summary['sparsity']:.3f}")
    path = summary.get("pre_pruning") or ("metanetwork" if summary["metanetwork"] else "no metanetwork")
    print(colored(f"[{ctx.task.name}] {summary['run']} ({path}, {summary['method']}): ", "cyan")
          + colored(f"base {100 * summary['base_acc']:.2f}% -> pruned {100 * summary['pruned_acc']:.2f}% test acc",
                    "green", attrs=["bold"])
          + f", {headline} ({summary['selection']} selection)")
    return summary


def _accuracy_summary(base: dict, final: dict, ft_prune: TrainResult) -> dict:
    """The accuracy fields every final run reports: start vs final stage, and how the last epoch was kept."""
    return {"base_acc": base["test_acc"], "base_val_acc": base.get("val_acc"),
            "pruned_acc": final["test_acc"], "pruned_val_acc": final.get("val_acc"),
            "base": {k: v for k, v in base.items() if k.endswith(("_acc", "_loss"))},
            "pruned": {k: v for k, v in final.items() if k.endswith(("_acc", "_loss"))},
            "selection": ft_prune.selection, "selected_epoch": ft_prune.selected_epoch,
            "protocol_note": ft_prune.protocol_note}


def _common_summary(ctx: _Context, run: str, source: str | None, mn_info: dict | None) -> dict:
    return {"run": run, "task": ctx.task.name, "architecture": ctx.task.model, "method": ctx.method.get("name"),
            "seed": ctx.cfg.seed, "protocol": ctx.cfg.protocol, "source_model": source,
            "metanetwork": mn_info["path"] if mn_info else None,
            "metanetwork_task": mn_info["task"] if mn_info else None,
            "metanetwork_epoch": mn_info["epoch"] if mn_info else None}


# ----------------------------------------------------------------------------------------------
# pretrain_final
# ----------------------------------------------------------------------------------------------
@register_run("pretrain_final")
def pretrain_final_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train the unpruned model shared by final runs (``task.train``); writes ``model.pt`` + ``results.json``."""
    summary = train_run(cfg, run_dir)
    if summary:  # {} on non-zero ranks under torchrun
        summary["run"] = "pretrain_final"
        model_file = "model.pt"
        if cfg.final.get("init_prune", False):
            # results.json marks a finished stage: not before the init-pruned model exists too
            (Path(run_dir) / "results.json").unlink(missing_ok=True)
            summary["init_pruned"] = _init_prune_saved(cfg, Path(run_dir))
            model_file = INIT_PRUNED_CHECKPOINT
        write_json(Path(run_dir) / "results.json", summary)
        log.info("use it in final runs with final.model=%s", Path(run_dir).resolve() / model_file)
    return summary


def _init_prune_saved(cfg: DictConfig, run_dir: Path) -> dict:
    """``model.pt`` -> init prune to ``task.initial_speed_up`` -> after_init_pruning fine-tune -> saved as
    ``init_pruned_model.pt``: one start shared by every final run of a seed (methods then differ only in what
    they do after it; ``pruning_final`` skips its own init pruning for a model already at that speed-up)."""
    ctx = _context(cfg, run_dir)
    initial = float(ctx.task.initial_speed_up)
    if not math.isfinite(initial) or initial < 1.0:
        raise FinalRunConfigError(f"task.initial_speed_up={initial} must be finite and >= 1")
    model, _ = load_model(run_dir / "model.pt", map_location=ctx.device)
    base_macs = count_macs(model, ctx.example)
    model.eval()
    achieved = prune_to_speed_up(model, initial, ctx.method, ctx.example,
                                 iterative_steps=ctx.task.pruning.iterative_steps, base_macs=base_macs, progress=True)
    result = _finetune(model, ctx, "after_init_pruning")
    model.eval()
    metrics = evaluate_splits(model, ctx.loaders, ctx.device)
    save_checkpoint(run_dir / INIT_PRUNED_CHECKPOINT, model.state_dict(),
                    model_spec(ctx.task.model, model, ctx.splits.num_classes), metrics=metrics)
    return {"checkpoint": INIT_PRUNED_CHECKPOINT, "speed_up": achieved, "finetune_epochs": result.epochs,
            "metrics": metrics}


# ----------------------------------------------------------------------------------------------
# pruning_final
# ----------------------------------------------------------------------------------------------
def _check_structured(ctx: _Context, targets: list[float]) -> float:
    cfg, task = ctx.cfg, ctx.task
    if ctx.method.get("kind", "structured") != "structured":
        raise FinalRunConfigError(
            f"run=pruning_final prunes channels but method={ctx.method.get('name')} is {ctx.method.get('kind')}; "
            "use a structured method (e.g. method=group_l2_norm_max_normalizer) or run=unstructured_pruning_final"
        )
    initial = float(task.initial_speed_up)
    for target in targets:
        if not (math.isfinite(target) and math.isfinite(initial)) or target < 1.0 or initial < 1.0:
            raise FinalRunConfigError(f"speed-ups must be finite and >= 1: final.target_speed_up={target}, "
                                      f"task.initial_speed_up={initial}")
        if target < initial:
            raise FinalRunConfigError(
                f"final.target_speed_up={target} is below task.initial_speed_up={initial}; both are total speed-ups "
                "relative to the unpruned architecture, so the target must be at least the init-pruning speed-up"
            )
    return initial


def _check_reachable(template: nn.Module, target: float, base_macs: float, ctx: _Context) -> None:
    """Prune the (untrained) unpruned architecture to ``target``: the reach of the criterion depends on the
    architecture, not on the weights, so this fails fast before hours of training."""
    try:
        prune_to_speed_up(template, target, ctx.method, ctx.example, iterative_steps=ctx.task.pruning.iterative_steps,
                          base_macs=base_macs, strict=True)
    except SpeedUpNotReachedError as err:
        raise UnreachableTargetError(target, err.achieved, err.steps, ctx.task.model, ctx.method.get("name")) from None


PRE_PRUNING = ("metanetwork", "sparse_learning", "finetune", "none")


def pre_pruning_kind(cfg: DictConfig, mn_path: Path | None) -> str:
    """What happens between the init-pruning fine-tune and the final pruning (``results.json`` ``pre_pruning``):

    ``metanetwork`` (apply it, then the after_metanetwork fine-tune), ``sparse_learning`` (DepGraph: the
    after_metanetwork recipe with torch-pruning's group-norm regulariser, ``final.sparse_learning``),
    ``finetune`` (the after_metanetwork fine-tune alone: the equal-budget control,
    ``final.finetune_without_metanetwork=true``) or ``none`` (straight to pruning, the reference's baseline).
    """
    sparse = bool(cfg.final.get("sparse_learning", {}).get("enabled", False))
    if mn_path is not None and sparse:
        raise FinalRunConfigError("final.metanetwork and final.sparse_learning.enabled=true exclude each other: "
                                  "sparse learning is the baseline that replaces the metanetwork")
    if mn_path is not None:
        return "metanetwork"
    if sparse:
        return "sparse_learning"
    return "finetune" if cfg.final.get("finetune_without_metanetwork", False) else "none"


def final_targets(cfg: DictConfig) -> list[float]:
    """``final.target_speed_up`` as a list (one number, or a list of targets pruned from the same model)."""
    value = cfg.final.target_speed_up
    values = list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]
    if not values:
        raise FinalRunConfigError("final.target_speed_up is an empty list; give a speed-up or a list of them")
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise FinalRunConfigError(f"final.target_speed_up={value!r}: expected a number or a list of numbers") from None


def target_dir(run_dir: Path, target: float) -> Path:
    """Sub-folder of a multi-target run that holds one target's ``results.json`` and pruned model."""
    return Path(run_dir) / f"target_{target:g}x"


def _pre_pruning(model: nn.Module, kind: str, mn_path: Path | None, stages: list, ctx: _Context,
                 base_macs: float) -> tuple[TrainResult | None, dict | None]:
    """The stage between init pruning and final pruning (see :func:`pre_pruning_kind`)."""
    if kind == "metanetwork":
        _apply_metanetwork(model, mn_path, ctx)
        _stage(stages, "metanetwork", model, ctx, base_macs)
    if kind == "none":
        return None, None
    sparse = None
    hook = None
    if kind == "sparse_learning":
        section = ctx.cfg.final.sparse_learning
        hook = SparseLearning(model, ctx.example, ctx.method, reg=float(section.reg), alpha=float(section.alpha),
                              iterative_steps=ctx.task.pruning.iterative_steps)
        sparse = hook.describe()
        log.info("sparse learning (DepGraph): %s for task.finetune.after_metanetwork's %d epochs", sparse,
                 ctx.recipe("after_metanetwork").epochs)
    result = train(model, ctx.loaders, ctx.recipe("after_metanetwork"), ctx.device, run_dir=ctx.run_dir,
                   desc="sparse_learning" if kind == "sparse_learning" else "finetune_after_metanetwork",
                   after_backward=hook)
    _stage(stages, "after_sparse_learning" if kind == "sparse_learning" else "after_metanetwork_finetune", model,
           ctx, base_macs)
    return result, sparse


def run_pruning_final(cfg: DictConfig, run_dir: Path) -> tuple[dict, nn.Module]:
    """The structured final run; returns ``(results.json content, pruned model)`` (see module docstring).

    With a list of targets, everything up to the final pruning runs once and each target is pruned from a
    copy of that model into :func:`target_dir` (its own ``results.json`` and pruned model); the returned
    pair is the last target's, and ``run_dir/results.json`` lists them all.
    """
    started = time.time()
    mn_path = metanetwork_setting(cfg)  # every check before any training, the cheap ones first
    kind = pre_pruning_kind(cfg, mn_path)
    ctx = _context(cfg, run_dir)
    targets = final_targets(cfg)
    initial = _check_structured(ctx, targets)
    given = _given_model(ctx)
    steps = ctx.task.pruning.iterative_steps
    template = task_model(ctx.task, ctx.splits).to(ctx.device)  # the unpruned architecture: MACs/params reference
    base_macs, base_params = count_macs(template, ctx.example), num_params(template)
    mn_info = _check_metanetwork(mn_path, template, ctx)
    _check_reachable(template, max(targets), base_macs, ctx)  # reaching the largest reaches every other
    del template

    model, source = _start_model(ctx, given)
    stages: list[dict] = []
    base = _stage(stages, "start", model, ctx, base_macs)
    ft_init = None
    if base["speed_up"] >= initial - 1e-9 and initial > 1.0:
        log.info("final.model is already pruned to %.4fx >= task.initial_speed_up=%.4fx: it is taken as the "
                 "init-pruned, fine-tuned start (no init pruning, no after_init_pruning fine-tune here)",
                 base["speed_up"], initial)
    else:
        if base["speed_up"] > 1.0 + 1e-9:
            log.warning("final.model is already pruned (%.4fx vs the unpruned %s); speed-ups stay relative to the "
                        "unpruned architecture", base["speed_up"], ctx.task.model)
        log.info("init pruning to %.4fx (total)", initial)
        model.eval()
        prune_to_speed_up(model, initial, ctx.method, ctx.example, iterative_steps=steps, base_macs=base_macs,
                          progress=True)
        _stage(stages, "init_pruned", model, ctx, base_macs)
        ft_init = _finetune(model, ctx, "after_init_pruning")
        _stage(stages, "after_init_pruning_finetune", model, ctx, base_macs)

    ft_mn, sparse = _pre_pruning(model, kind, mn_path, stages, ctx, base_macs)
    prepared = stages[-1]
    multi = len(targets) > 1
    outputs = []
    for target in targets:
        target_ctx = dataclasses.replace(ctx, run_dir=target_dir(ctx.run_dir, target)) if multi else ctx
        target_ctx.run_dir.mkdir(parents=True, exist_ok=True)
        pruned = copy.deepcopy(model) if multi else model
        target_stages = list(stages)
        log.info("pruning to %.4fx (total)", target)
        pruned.eval()
        prune_to_speed_up(pruned, target, ctx.method, ctx.example, iterative_steps=steps, base_macs=base_macs,
                          strict=True, progress=True)
        _stage(target_stages, "pruned", pruned, target_ctx, base_macs)
        ft_prune = _finetune(pruned, target_ctx, "after_pruning")
        final = _stage(target_stages, "final", pruned, target_ctx, base_macs)
        pruned.eval()

        pruned_macs = count_macs(pruned, ctx.example)
        summary = _common_summary(ctx, "pruning_final", source, mn_info)
        summary.update({
            "pre_pruning": kind,
            "sparse_learning": sparse,
            "target_speed_up": target,
            "initial_speed_up": initial,
            "speed_up": base_macs / pruned_macs,
            "pruned_flops_percent": 100.0 * (1.0 - pruned_macs / base_macs),
            "macs": {"unpruned": base_macs, "pruned": pruned_macs},
            # params of the UNPRUNED architecture (not of the init-pruned model, reference defect §11.16)
            "params": {"unpruned": base_params, "start": base["params"], "pruned": num_params(pruned)},
            "params_left_percent": 100.0 * num_params(pruned) / base_params,
            "pre_pruning_acc": prepared["test_acc"], "pre_pruning_val_acc": prepared.get("val_acc"),
            **_accuracy_summary(base, final, ft_prune),
            "finetune_epochs": {"after_init_pruning": ft_init.epochs if ft_init else 0,
                                "after_metanetwork": ft_mn.epochs if ft_mn else 0,
                                "after_pruning": ft_prune.epochs},
            "finetune": {"after_init_pruning": _finetune_record(ft_init), "after_metanetwork": _finetune_record(ft_mn),
                         "after_pruning": _finetune_record(ft_prune)},
            "stages": target_stages,
        })
        outputs.append((_finish(target_ctx, pruned, summary, started), pruned))
    if multi:
        write_json(ctx.run_dir / "results.json", {
            "run": "pruning_final_targets", "task": ctx.task.name, "pre_pruning": kind,
            "targets": {f"{t:g}": str(target_dir(ctx.run_dir, t).relative_to(ctx.run_dir)) for t in targets},
            "pruned_acc": {f"{t:g}": out[0]["pruned_acc"] for t, out in zip(targets, outputs)},
            "seconds": round(time.time() - started, 1)})
    return outputs[-1]


@register_run("pruning_final")
def pruning_final_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Structured final run (reference §7.4); ``results.json`` + ``pruned_model.pt``."""
    return run_pruning_final(cfg, run_dir)[0]


# ----------------------------------------------------------------------------------------------
# unstructured_pruning_final
# ----------------------------------------------------------------------------------------------
def _unstructured_prune(model: nn.Module, ctx: _Context) -> tuple[dict, str, dict]:
    """Prune per ``cfg.method``; returns ``(masks, description, details)``."""
    importance = ctx.method.get("importance")
    if importance == "l1":
        amount = float(ctx.cfg.final.amount)
        masks = unstructured.global_l1_prune(model, amount)
        return masks, f"L1 {100 * amount:g}%", {"amount": amount}
    if importance == "nm":
        n, m = int(ctx.method["n"]), int(ctx.method["m"])
        masks, skipped = unstructured.nm_prune(model, n, m)
        return masks, f"{n}:{m}", {"n": n, "m": m, "dense_layers": skipped}
    raise FinalRunConfigError(f"method={ctx.method.get('name')} has importance={importance!r}; unstructured pruning "
                              "supports importance=l1 (method=unstructured_l1_norm) or nm (method=nm_sparsity)")


def run_unstructured_pruning_final(cfg: DictConfig, run_dir: Path) -> tuple[dict, nn.Module, dict]:
    """The unstructured final run; returns ``(results.json content, pruned model, masks)``."""
    started = time.time()
    mn_path = metanetwork_setting(cfg)
    ctx = _context(cfg, run_dir)
    if ctx.method.get("kind") != "unstructured":
        raise FinalRunConfigError(
            f"run=unstructured_pruning_final needs an unstructured method (method=unstructured_l1_norm or "
            f"method=nm_sparsity), got method={ctx.method.get('name')} (kind {ctx.method.get('kind')})"
        )
    if ctx.method.get("importance") == "l1" and not 0.0 <= float(cfg.final.amount) < 1.0:
        raise FinalRunConfigError(f"final.amount={cfg.final.amount} must be in [0, 1): the fraction of Conv/Linear "
                                  "weights set to zero")
    given = _given_model(ctx)
    template = task_model(ctx.task, ctx.splits).to(ctx.device)
    base_params = num_params(template)
    mn_info = _check_metanetwork(mn_path, template, ctx)
    del template

    model, source = _start_model(ctx, given)
    stages: list[dict] = []
    base = _stage(stages, "start", model, ctx)
    ft_mn = None
    if mn_path is not None:
        _apply_metanetwork(model, mn_path, ctx)
        _stage(stages, "metanetwork", model, ctx)
    if mn_path is not None or cfg.final.get("finetune_without_metanetwork", False):
        ft_mn = _finetune(model, ctx, "after_metanetwork")
        _stage(stages, "after_metanetwork_finetune", model, ctx)

    masks, description, details = _unstructured_prune(model, ctx)
    pruned_stage = _stage(stages, "pruned", model, ctx)
    pruned_stage.update(unstructured.sparsity(model))
    with unstructured.MaskedGradients(model, masks):
        ft_prune = _finetune(model, ctx, "after_pruning")
    unstructured.check_masks(model, masks)  # the zeros must have survived fine-tuning (and epoch selection)
    final = _stage(stages, "final", model, ctx)
    model.eval()

    zeros = unstructured.sparsity(model)
    macs = unstructured.count_sparse_macs(model, ctx.example)
    summary = _common_summary(ctx, "unstructured_pruning_final", source, mn_info)
    summary.update({
        "pruning": description, **details,
        "sparsity": zeros["sparsity"], "zero_weights": zeros["zeros"], "prunable_weights": zeros["weights"],
        "dense_macs": macs["dense_macs"], "sparse_macs": macs["sparse_macs"],
        "macs_reduction_percent": macs["macs_reduction_percent"],
        "params": {"unpruned": base_params, "pruned_nonzero": num_params(model) - zeros["zeros"]},
        **_accuracy_summary(base, final, ft_prune),
        "finetune_epochs": {"after_metanetwork": ft_mn.epochs if ft_mn else 0, "after_pruning": ft_prune.epochs},
        "finetune": {"after_metanetwork": _finetune_record(ft_mn), "after_pruning": _finetune_record(ft_prune)},
        "stages": stages,
    })
    return _finish(ctx, model, summary, started), model, masks


@register_run("unstructured_pruning_final")
def unstructured_pruning_final_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Unstructured final run (reference §12); ``results.json`` + ``pruned_model.pt``."""
    return run_unstructured_pruning_final(cfg, run_dir)[0]


# ----------------------------------------------------------------------------------------------
# analyse
# ----------------------------------------------------------------------------------------------
@register_run("analyse")
def analyse_run(cfg: DictConfig, run_dir: Path) -> dict:
    """Per-layer statistics of ``final.model`` (+ ``final.compare_model``, + ``final.model`` after
    ``final.metanetwork``): ``layer_statistics.csv``, ``layer_statistics.png`` and ``results.json``."""
    device = setup(cfg)
    run_dir = Path(run_dir)
    final = cfg.final
    if not final.get("model"):
        raise FinalRunConfigError("run=analyse needs final.model=<checkpoint .pt> (e.g. a pretrain_final model.pt "
                                  "or a pruning_final pruned_model.pt)")
    models: dict[str, tuple[nn.Module, str]] = {}
    model, _ = load_model(final.model, map_location=device)
    models["model"] = (model, str(final.model))
    if final.get("compare_model"):
        models["compare_model"] = (load_model(final.compare_model, map_location=device)[0], str(final.compare_model))
    mn_path = metanetwork_setting(cfg)
    if mn_path is not None:
        changed = copy.deepcopy(model)
        codec = GraphCodec(changed, input_shape=tuple(cfg.task.input_size))
        net, _ = load_metanetwork(mn_path, codec, map_location=device)
        apply_metanetwork(changed, net, codec)
        models["model + metanetwork"] = (changed, f"{final.model} + {mn_path}")

    rank = bool(final.get("effective_rank", True))
    rows_by_model = {label: layer_statistics(m, label, rank=rank) for label, (m, _src) in models.items()}
    csv_path = write_csv([row for rows in rows_by_model.values() for row in rows], run_dir / "layer_statistics.csv")
    plot_path = plot_statistics(rows_by_model, run_dir / "layer_statistics.png",
                                channel_norms={label: normalised_channel_norms(m) for label, (m, _s) in models.items()})
    summary_models: dict[str, dict] = {}
    loaders = None
    if final.get("analyse_evaluate", True):
        _splits, loaders = task_data(cfg.task, cfg.seed)
    example = example_input(cfg.task, device)
    for label, (m, src) in models.items():
        info: dict[str, Any] = {"source": src, "params": num_params(m), "macs": count_macs(m, example)}
        if loaders is not None:
            info.update(evaluate_splits(m, loaders, device))
        summary_models[label] = info
        log.info("%s: %s", label, {k: v for k, v in info.items() if k != "source"})
    summary = {"run": "analyse", "task": cfg.task.name, "models": summary_models, "csv": csv_path.name,
               "plot": plot_path.name}
    write_json(run_dir / "results.json", summary)
    print(f"[{cfg.task.name}] analyse: {csv_path} and {plot_path}")
    return summary
