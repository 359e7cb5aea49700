"""The paper's final runs (reference §2.1 steps 5-7, §7.4, §12): run modes ``pruning_final`` and
``unstructured_pruning_final``, one flow with two pruning steps.

``pruning_final`` (structured, reference §7.4; :func:`pruning_final`)
    model (``final.model``, or trained now with ``task.train``) -> init prune to ``task.initial_speed_up``
    -> fine-tune ``task.finetune.after_init_pruning`` -> metanetwork (``final.metanetwork``) -> fine-tune
    ``after_metanetwork`` -> prune to ``final.target_speed_up`` -> fine-tune ``after_pruning``.
    Both speed-ups are TOTAL speed-ups: unpruned-architecture MACs / current MACs. With
    ``final.metanetwork=null`` the same pipeline runs without a metanetwork (the baseline); like the
    reference it then skips the ``after_metanetwork`` fine-tune unless
    ``final.finetune_without_metanetwork=true`` (same epoch budget as the metanetwork run).

``unstructured_pruning_final`` (reference §12; ``method=unstructured_l1_norm`` or ``method=nm_sparsity``;
:func:`unstructured_pruning_final`)
    model -> metanetwork (optional) -> fine-tune ``after_metanetwork`` -> global L1 pruning of all
    Conv/Linear weights to ``final.amount`` (or N:M with ``method.n``/``method.m``) -> fine-tune
    ``after_pruning`` with the pruned weights held at zero (masked gradients, checked afterwards).
    No init pruning, as in the reference (use a metanetwork trained on ``no_init_pruning`` data models).

The shared flow: every check first (:func:`_start`: the metanetwork's layout, the target's reachability),
then the start model (given or trained), the stage before pruning (:func:`_pre_pruning`: metanetwork,
equal-budget fine-tune, DepGraph sparse learning or nothing), the pruning and its fine-tune, and one summary
(:func:`_summary`). ``pretrain_final`` (the shared start model) lives in ``stages.train``, ``analyse`` in
``stages.analyse``.

Every final run saves the pruned model ``pruned_model.pt`` (weights-only checkpoint with its architecture
spec; ``generate_dataset.models.load_model`` rebuilds it) and returns its ``results.json`` content
(``stages.execute`` writes it). Epochs are selected on the validation split by default; ``protocol=paper``
makes the after-pruning fine-tune keep the best-TEST epoch as the authors did, and ``results.json`` says so
(``protocol``, ``selection``, ``protocol_note``). ``run=report`` (stages/report.py) turns the results into
tables.

Unreachable speed-up: the target is checked BEFORE any training, by pruning a copy of the unpruned
architecture; if it cannot be reached the run fails with :class:`UnreachableTargetError` naming the best
speed-up reached (nothing is written but the log). A metanetwork whose graph layout does not fit the
task's architecture is refused, also before training (``LayoutMismatchError`` naming both layouts).

Under torchrun (``main_imagenet/``; ``stages.DDP_RUNS``) every rank runs this flow on its shards of the data
(``DistributedSampler`` on every split, evaluations all-reduced). What sets weights or structure outside training
runs on rank 0 only and is broadcast (``RunContext.change_on_main``, ``stages.ddp``): the reachability check, the
init pruning, the metanetwork pass, the final pruning (each target) and the unstructured masks. Every rank rebuilds
the model from rank 0's state dict and checks that the layer widths (and the masks) agree, so all ranks fine-tune
one structure. Every training (the start model with ``final.model=null``, each fine-tune) is a DDP training
(``RunContext.train``; ``distributed.sync_bn`` turns BatchNorm into SyncBatchNorm for its duration), after which
every rank takes rank 0's weights and buffers. Only rank 0 logs, shows progress bars and writes files
(``pretrained_model.pt`` included); a failure on rank 0 ends every rank with its message.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig
from termcolor import colored
from torch import nn as tnn

from generate_dataset.models import load_model, model_spec
from nn.apply import apply_saved_metanetwork, fitting_checkpoints
from pruning import unstructured
from pruning.depgraph import SpeedUpNotReachedError, count_macs, prune_to_speed_up
from pruning.sparse_learning import SparseLearning
from stages import ddp
from stages.artifacts import metanetwork_setting, target_dir
from stages.common import (RESULTS_FILE, FinalRunConfigError, RunContext, codec_options, num_params,
                           prune_and_finetune, recipe, run_context, start_model, task_model)
from training.loop import TrainResult, evaluate_splits
from utils import distributed
from utils.checkpoint import save_checkpoint
from utils.io import write_json

log = logging.getLogger(__name__)
log.addFilter(ddp.main_process_only)  # under torchrun only rank 0 logs

PRUNED_CHECKPOINT = "pruned_model.pt"
PRETRAINED_CHECKPOINT = "pretrained_model.pt"  # final.model=null: the start model trained by the run
PRE_PRUNING = ("metanetwork", "sparse_learning", "finetune", "none")


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


# ----------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------
def _check_metanetwork(path: Path | None, template: tnn.Module, ctx: RunContext) -> dict | None:
    """Refuse a metanetwork whose layout does not fit the task's graphs, before any training."""
    if path is None:
        return None
    [checkpoint] = fitting_checkpoints(template, [path], **codec_options(ctx.cfg))  # else LayoutMismatchError
    spec = checkpoint["spec"]
    if spec.get("task") != ctx.task.name:
        log.info("transfer: metanetwork %s was trained on task %s, used on %s", path, spec.get("task"), ctx.task.name)
    return {"path": str(path), "task": spec.get("task"), "epoch": spec.get("epoch")}


def _given_model(ctx: RunContext) -> tuple[tnn.Module, str] | None:
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


def _start_model(ctx: RunContext, given: tuple[tnn.Module, str] | None) -> tuple[tnn.Module, str | None]:
    """The given model, or one trained now with ``task.train`` (saved as ``pretrained_model.pt``; under torchrun a
    DDP training whose rank-0 weights every rank keeps and rank 0 alone saves)."""
    if given is not None:
        return given
    log.info("final.model is null: training the task's model now with task.train")
    task = ctx.task
    model = start_model(task, ctx.splits).to(ctx.device)  # task.pretrained weights when set
    result = ctx.train(model, recipe(task.train, ctx.cfg.protocol), "pretrain")
    distributed.run_on_main(save_checkpoint, ctx.run_dir / PRETRAINED_CHECKPOINT, model.state_dict(),
                            model_spec(task.model, model, ctx.splits.num_classes), metrics=result.final_metrics)
    return model, None


# ----------------------------------------------------------------------------------------------
# The shared flow
# ----------------------------------------------------------------------------------------------
@dataclass
class _Start:
    """A final run up to its start: everything checked, the start model loaded (or trained) and evaluated."""

    ctx: RunContext
    mn_info: dict | None  # path, task and epoch of the metanetwork; None without one
    source: str | None  # final.model, resolved; None when the model was trained in this run
    model: tnn.Module
    base_params: int  # parameters of the UNPRUNED architecture
    base_macs: float | None  # structured runs: MACs of the unpruned architecture (speed-ups are relative to it)
    stages: list[dict]  # one evaluated row per stage so far, "start" first

    @property
    def base(self) -> dict:
        return self.stages[0]


def _start(ctx: RunContext, mn_path: Path | None, reach: float | None) -> _Start:
    """Check against the unpruned architecture, then load (or train) the start model and evaluate it.

    ``reach``: structured runs pass their largest target, which must be reachable on the unpruned architecture
    (and get its MACs as ``base_macs``); unstructured runs pass None.
    """
    given = _given_model(ctx)
    template = task_model(ctx.task, ctx.splits).to(ctx.device)  # the unpruned architecture: MACs/params reference
    base_macs = count_macs(template, ctx.example) if reach is not None else None
    base_params = num_params(template)
    mn_info = _check_metanetwork(mn_path, template, ctx)
    if reach is not None:
        # reaching the largest target reaches every other; under torchrun rank 0 checks, its failure ends every rank
        distributed.run_on_main(_check_reachable, template, reach, base_macs, ctx)
    del template
    model, source = _start_model(ctx, given)
    ctx.check_same_structure(model, "of the start model")
    ddp.same_weights_everywhere(model)  # under torchrun: rank 0's start model, whatever each rank loaded or trained
    start = _Start(ctx, mn_info, source, model, base_params, base_macs, [])
    _stage(start.stages, "start", model, ctx, base_macs)
    return start


def _stage(stages: list, name: str, model: tnn.Module, ctx: RunContext, base_macs: float | None = None) -> dict:
    """Evaluate and record one pipeline stage."""
    row: dict[str, Any] = {"stage": name, "params": num_params(model)}
    if base_macs is not None:
        row["speed_up"] = base_macs / count_macs(model, ctx.example)
    row.update(evaluate_splits(model, ctx.loaders, ctx.device))
    stages.append(row)
    shown = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
    log.info("[%d] %s: %s", len(stages), name, shown)
    return row


def _finetune_record(result: TrainResult | None) -> dict | None:
    if result is None:
        return None
    return {"epochs": result.epochs, "selected_epoch": result.selected_epoch, "selection": result.selection,
            "protocol_note": result.protocol_note, "metrics": result.final_metrics}


def _accuracy_summary(base: dict, final: dict, ft_prune: TrainResult) -> dict:
    """The accuracy fields every final run reports: start vs final stage, and how the last epoch was kept."""
    return {"base_acc": base["test_acc"], "base_val_acc": base.get("val_acc"),
            "pruned_acc": final["test_acc"], "pruned_val_acc": final.get("val_acc"),
            "base": {k: v for k, v in base.items() if k.endswith(("_acc", "_loss"))},
            "pruned": {k: v for k, v in final.items() if k.endswith(("_acc", "_loss"))},
            "selection": ft_prune.selection, "selected_epoch": ft_prune.selected_epoch,
            "protocol_note": ft_prune.protocol_note}


def _common_summary(ctx: RunContext, run: str, source: str | None, mn_info: dict | None) -> dict:
    return {"run": run, "task": ctx.task.name, "architecture": ctx.task.model, "method": ctx.method.get("name"),
            "seed": ctx.cfg.seed, "protocol": ctx.cfg.protocol, "source_model": source,
            "metanetwork": mn_info["path"] if mn_info else None,
            "metanetwork_task": mn_info["task"] if mn_info else None,
            "metanetwork_epoch": mn_info["epoch"] if mn_info else None}


def _summary(start: _Start, run: str, specific: dict, final: dict, finetunes: dict[str, TrainResult | None],
             stages: list[dict]) -> dict:
    """``results.json`` of a final run: the common fields, the run's own ``specific`` ones, the accuracies
    (start vs ``final`` stage), every fine-tune (``finetunes``, in order, ``after_pruning`` last) and the
    stages."""
    summary = _common_summary(start.ctx, run, start.source, start.mn_info)
    summary.update(specific)
    summary.update(_accuracy_summary(start.base, final, finetunes["after_pruning"]))
    summary["finetune_epochs"] = {stage: result.epochs if result else 0 for stage, result in finetunes.items()}
    summary["finetune"] = {stage: _finetune_record(result) for stage, result in finetunes.items()}
    summary["stages"] = stages
    return summary


def _finish(ctx: RunContext, model: tnn.Module, summary: dict, started: float, write_results: bool = False) -> dict:
    """Save the pruned model (and, for one target of several, that target's ``results.json``), print the
    headline; rank 0 only under torchrun. The run's own ``results.json`` is written by ``stages.execute``."""
    spec = model_spec(ctx.task.model, model, ctx.splits.num_classes)
    metrics = {k: float(v) for k, v in summary["pruned"].items()}
    summary.update(model=spec, checkpoint=PRUNED_CHECKPOINT)
    if write_results:
        summary["seconds"] = round(time.time() - started, 1)

    def write() -> None:
        save_checkpoint(ctx.run_dir / PRUNED_CHECKPOINT, model.state_dict(), spec, metrics=metrics)
        if write_results:
            write_json(ctx.run_dir / RESULTS_FILE, summary)
            log.info("results written to %s", ctx.run_dir / RESULTS_FILE)
        headline = (f"speed-up {summary['speed_up']:.3f}x" if "speed_up" in summary
                    else f"sparsity {summary['sparsity']:.3f}")
        path = summary.get("pre_pruning") or ("metanetwork" if summary["metanetwork"] else "no metanetwork")
        print(colored(f"[{ctx.task.name}] {summary['run']} ({path}, {summary['method']}): ", "cyan")
              + colored(f"base {100 * summary['base_acc']:.2f}% -> pruned {100 * summary['pruned_acc']:.2f}% "
                        "test acc", "green", attrs=["bold"])
              + f", {headline} ({summary['selection']} selection)")

    distributed.run_on_main(write)  # a failure on rank 0 ends every rank with its message
    return summary


def _pre_pruning(model: tnn.Module, kind: str, mn_path: Path | None, stages: list, ctx: RunContext,
                 base_macs: float | None) -> tuple[tnn.Module, TrainResult | None, dict | None]:
    """The stage between init pruning and final pruning (see :func:`pre_pruning_kind`); returns the model (a new
    one on every rank under torchrun), the fine-tune's result and the sparse-learning settings."""
    if kind == "metanetwork":
        def apply(target: tnn.Module) -> None:
            apply_saved_metanetwork(target, mn_path, map_location=ctx.device, **codec_options(ctx.cfg))

        model, _ = ctx.change_on_main(model, apply, "after the metanetwork")
        _stage(stages, "metanetwork", model, ctx, base_macs)
    if kind == "none":
        return model, None, None
    sparse = None
    hook = None
    if kind == "sparse_learning":
        section = ctx.cfg.final.sparse_learning
        hook = SparseLearning(model, ctx.example, ctx.method, reg=float(section.reg), alpha=float(section.alpha),
                              iterative_steps=ctx.task.pruning.iterative_steps)
        sparse = hook.describe()
        log.info("sparse learning (DepGraph): %s for task.finetune.after_metanetwork's %d epochs", sparse,
                 ctx.recipe("after_metanetwork").epochs)
    result = ctx.train(model, ctx.recipe("after_metanetwork"),
                       "sparse_learning" if kind == "sparse_learning" else "finetune_after_metanetwork",
                       after_backward=hook)
    _stage(stages, "after_sparse_learning" if kind == "sparse_learning" else "after_metanetwork_finetune", model,
           ctx, base_macs)
    return model, result, sparse


# ----------------------------------------------------------------------------------------------
# pruning_final
# ----------------------------------------------------------------------------------------------
def _check_structured(ctx: RunContext, targets: list[float]) -> float:
    task = ctx.task
    if ctx.method.get("kind", "structured") != "structured":
        raise FinalRunConfigError(
            f"run=pruning_final prunes channels but method={ctx.method.get('name')} is {ctx.method.get('kind')}; "
            "use a structured method (e.g. method=group_l2_norm_max_normalizer) or run=unstructured_pruning_final"
        )
    initial = float(task.initial_speed_up)
    check_speed_ups(targets, initial)
    return initial


def check_speed_ups(targets: list[float], initial: float) -> None:
    """Refuse target speed-ups that are not finite, below 1 or below the init-pruning speed-up ``initial``."""
    for target in targets:
        if not (math.isfinite(target) and math.isfinite(initial)) or target < 1.0 or initial < 1.0:
            raise FinalRunConfigError(f"speed-ups must be finite and >= 1: final.target_speed_up={target}, "
                                      f"task.initial_speed_up={initial}")
        if target < initial:
            raise FinalRunConfigError(
                f"final.target_speed_up={target} is below task.initial_speed_up={initial}; both are total speed-ups "
                "relative to the unpruned architecture, so the target must be at least the init-pruning speed-up"
            )


def _check_reachable(template: tnn.Module, target: float, base_macs: float, ctx: RunContext) -> None:
    """Prune the (untrained) unpruned architecture to ``target``: the reach of the criterion depends on the
    architecture, not on the weights, so this fails fast before hours of training."""
    try:
        prune_to_speed_up(template, target, ctx.method, ctx.example, iterative_steps=ctx.task.pruning.iterative_steps,
                          base_macs=base_macs, strict=True)
    except SpeedUpNotReachedError as err:
        raise UnreachableTargetError(target, err.achieved, err.steps, ctx.task.model, ctx.method.get("name")) from None


def pre_pruning_kind(cfg: DictConfig, mn_path: Path | None, structured: bool = True) -> str:
    """What happens between the init-pruning fine-tune and the final pruning (``results.json`` ``pre_pruning``):

    ``metanetwork`` (apply it, then the after_metanetwork fine-tune), ``sparse_learning`` (DepGraph: the
    after_metanetwork recipe with torch-pruning's group-norm regulariser, ``final.sparse_learning``),
    ``finetune`` (the after_metanetwork fine-tune alone: the equal-budget control,
    ``final.finetune_without_metanetwork=true``) or ``none`` (straight to pruning, the reference's baseline).
    Sparse learning is DepGraph's structured baseline: ``structured=False`` (unstructured runs) ignores it.
    """
    sparse = structured and bool(cfg.final.get("sparse_learning", {}).get("enabled", False))
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


def _init_prune(start: _Start, initial: float) -> TrainResult | None:
    """Init pruning to ``initial`` (total) and its fine-tune, unless the start model is already there."""
    ctx, model, base_macs = start.ctx, start.model, start.base_macs
    speed_up = start.base["speed_up"]
    if speed_up >= initial - 1e-9 and initial > 1.0:
        log.info("final.model is already pruned to %.4fx >= task.initial_speed_up=%.4fx: it is taken as the "
                 "init-pruned, fine-tuned start (no init pruning, no after_init_pruning fine-tune here)",
                 speed_up, initial)
        return None
    if speed_up > 1.0 + 1e-9:
        log.warning("final.model is already pruned (%.4fx vs the unpruned %s); speed-ups stay relative to the "
                    "unpruned architecture", speed_up, ctx.task.model)
    log.info("init pruning to %.4fx (total)", initial)
    model.eval()

    def prune(target: tnn.Module) -> float:
        return prune_to_speed_up(target, initial, ctx.method, ctx.example,
                                 iterative_steps=ctx.task.pruning.iterative_steps, base_macs=base_macs, progress=True)

    model, _ = ctx.change_on_main(model, prune, "after init pruning")
    start.model = model
    _stage(start.stages, "init_pruned", model, ctx, base_macs)
    result = ctx.finetune(model, "after_init_pruning")
    _stage(start.stages, "after_init_pruning_finetune", model, ctx, base_macs)
    return result


def _prune_target(start: _Start, target: float, multi: bool, prepared: dict, finetunes: dict[str, TrainResult | None],
                  started: float) -> tuple[dict, tnn.Module]:
    """Prune (a copy of, with several targets) the prepared model to ``target`` and fine-tune it; with several
    targets in :func:`target_dir`. ``prepared`` holds the summary fields fixed before the final pruning."""
    ctx, base_macs = start.ctx, start.base_macs
    target_ctx = dataclasses.replace(ctx, run_dir=target_dir(ctx.run_dir, target)) if multi else ctx
    if distributed.is_main_process():
        target_ctx.run_dir.mkdir(parents=True, exist_ok=True)
    pruned = copy.deepcopy(start.model) if multi else start.model
    stages = list(start.stages)
    log.info("pruning to %.4fx (total)", target)
    pruned, _achieved, ft_prune = prune_and_finetune(
        target_ctx, pruned, target, base_macs, target_ctx.recipe("after_pruning"), "finetune_after_pruning",
        before_finetune=lambda model: _stage(stages, "pruned", model, target_ctx, base_macs))
    final = _stage(stages, "final", pruned, target_ctx, base_macs)
    pruned.eval()

    pruned_macs = count_macs(pruned, ctx.example)
    params = num_params(pruned)
    before = start.stages[-1]  # the stage right before the final pruning
    specific = {
        "pre_pruning": prepared["pre_pruning"],
        "sparse_learning": prepared["sparse_learning"],
        "target_speed_up": target,
        "initial_speed_up": prepared["initial_speed_up"],
        "speed_up": base_macs / pruned_macs,
        "pruned_flops_percent": 100.0 * (1.0 - pruned_macs / base_macs),
        "macs": {"unpruned": base_macs, "pruned": pruned_macs},
        # params of the UNPRUNED architecture (not of the init-pruned model, reference defect §11.16)
        "params": {"unpruned": start.base_params, "start": start.base["params"], "pruned": params},
        "params_left_percent": 100.0 * params / start.base_params,
        "pre_pruning_acc": before["test_acc"], "pre_pruning_val_acc": before.get("val_acc"),
    }
    summary = _summary(start, "pruning_final", specific, final, finetunes | {"after_pruning": ft_prune}, stages)
    return _finish(target_ctx, pruned, summary, started, write_results=multi), pruned


def pruning_final(cfg: DictConfig, run_dir: Path) -> tuple[dict, tnn.Module]:
    """The structured final run; returns ``(results.json content, pruned model)`` (see module docstring).

    With a list of targets, everything up to the final pruning runs once and each target is pruned from a
    copy of that model into :func:`target_dir` (its own ``results.json`` and pruned model); the returned
    summary then lists the targets and the model is the last target's.
    """
    started = time.time()
    mn_path = metanetwork_setting(cfg)  # every check before any training, the cheap ones first
    kind = pre_pruning_kind(cfg, mn_path)
    ctx = run_context(cfg, run_dir)
    targets = final_targets(cfg)
    initial = _check_structured(ctx, targets)
    start = _start(ctx, mn_path, reach=max(targets))

    ft_init = _init_prune(start, initial)
    start.model, ft_mn, sparse = _pre_pruning(start.model, kind, mn_path, start.stages, ctx, start.base_macs)
    prepared = {"pre_pruning": kind, "sparse_learning": sparse, "initial_speed_up": initial}
    finetunes = {"after_init_pruning": ft_init, "after_metanetwork": ft_mn}
    multi = len(targets) > 1
    outputs = [_prune_target(start, target, multi, prepared, finetunes, started) for target in targets]
    if not multi:
        return outputs[0]
    summary = {"run": "pruning_final_targets", "task": ctx.task.name, "pre_pruning": kind,
               "targets": {f"{t:g}": str(target_dir(ctx.run_dir, t).relative_to(ctx.run_dir)) for t in targets},
               "pruned_acc": {f"{t:g}": out[0]["pruned_acc"] for t, out in zip(targets, outputs)}}
    return summary, outputs[-1][1]


def run_pruning_final(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``pruning_final`` (structured, reference §7.4): ``pruned_model.pt``; returns ``results.json``."""
    return pruning_final(cfg, run_dir)[0]


# ----------------------------------------------------------------------------------------------
# unstructured_pruning_final
# ----------------------------------------------------------------------------------------------
def _check_unstructured(ctx: RunContext) -> None:
    if ctx.method.get("kind") != "unstructured":
        raise FinalRunConfigError(
            f"run=unstructured_pruning_final needs an unstructured method (method=unstructured_l1_norm or "
            f"method=nm_sparsity), got method={ctx.method.get('name')} (kind {ctx.method.get('kind')})"
        )
    if ctx.method.get("importance") == "l1" and not 0.0 <= float(ctx.cfg.final.amount) < 1.0:
        raise FinalRunConfigError(f"final.amount={ctx.cfg.final.amount} must be in [0, 1): the fraction of "
                                  "Conv/Linear weights set to zero")


def _unstructured_prune(model: tnn.Module, ctx: RunContext) -> tuple[dict, str, dict]:
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


def unstructured_pruning_final(cfg: DictConfig, run_dir: Path) -> tuple[dict, tnn.Module, dict]:
    """The unstructured final run; returns ``(results.json content, pruned model, masks)``."""
    started = time.time()
    mn_path = metanetwork_setting(cfg)
    ctx = run_context(cfg, run_dir)
    _check_unstructured(ctx)
    start = _start(ctx, mn_path, reach=None)
    model, stages = start.model, start.stages
    kind = pre_pruning_kind(cfg, mn_path, structured=False)
    model, ft_mn, _sparse = _pre_pruning(model, kind, mn_path, stages, ctx, None)

    def prune(target: tnn.Module) -> tuple[dict, str, dict]:
        masks, description, details = _unstructured_prune(target, ctx)
        return {name: mask.cpu() for name, mask in masks.items()}, description, details

    model, (masks, description, details) = ctx.change_on_main(model, prune, "after unstructured pruning")
    if distributed.is_distributed():
        distributed.check_same_on_all_ranks({name: int(mask.sum()) for name, mask in masks.items()},
                                            "the kept weights per layer after unstructured pruning")
    pruned_stage = _stage(stages, "pruned", model, ctx)
    pruned_stage.update(unstructured.sparsity(model))
    with unstructured.MaskedGradients(model, masks):
        ft_prune = ctx.finetune(model, "after_pruning")
    unstructured.check_masks(model, masks)  # the zeros must have survived fine-tuning (and epoch selection)
    final = _stage(stages, "final", model, ctx)
    model.eval()

    zeros = unstructured.sparsity(model)
    macs = unstructured.count_sparse_macs(model, ctx.example)
    specific = {
        "pruning": description, **details,
        "sparsity": zeros["sparsity"], "zero_weights": zeros["zeros"], "prunable_weights": zeros["weights"],
        "dense_macs": macs["dense_macs"], "sparse_macs": macs["sparse_macs"],
        "macs_reduction_percent": macs["macs_reduction_percent"],
        "params": {"unpruned": start.base_params, "pruned_nonzero": num_params(model) - zeros["zeros"]},
    }
    summary = _summary(start, "unstructured_pruning_final", specific, final,
                       {"after_metanetwork": ft_mn, "after_pruning": ft_prune}, stages)
    return _finish(ctx, model, summary, started), model, masks


def run_unstructured_pruning_final(cfg: DictConfig, run_dir: Path) -> dict:
    """Run mode ``unstructured_pruning_final`` (reference §12): ``pruned_model.pt``; returns ``results.json``."""
    return unstructured_pruning_final(cfg, run_dir)[0]
