"""What several stages share: the composed Hydra config turned into objects (data, model, recipes, codec
options), the context of a run on a task's data with its prune-then-fine-tune step (:func:`prune_and_finetune`,
the final runs' and select's ``finetuned`` score's), and the per-run boilerplate (config, timing, results).

A task file is read here only, so every stage builds its data, models and recipes the same way.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from omegaconf import DictConfig, OmegaConf

from data_loaders.image_datasets import DataLoaders, DataSplits, build_datasets, build_loaders
from generate_dataset.models import build_model, load_pretrained, resolve_pretrained
from pruning.depgraph import prune_to_speed_up
from stages import ddp
from training.config import TrainConfig
from training.loop import RESUME_DIR, TrainResult
from utils import distributed, preemption
from utils.device import configure_cuda, resolve_device
from utils.io import atomic_write, is_null, write_json
from utils.locking import LockHeldError, exclusive_lock
from utils.seed import seed_everything

log = logging.getLogger(__name__)

PROTOCOLS = ("validation", "paper")
RESULTS_FILE = "results.json"

# A run mode: ``run(cfg, run_dir) -> summary``; the summary is what ``results.json`` holds (stages/__init__.py).
RunFn = Callable[[DictConfig, Path], dict]


class FinalRunConfigError(ValueError):
    """A final-run setting that cannot work (wrong model file, wrong method kind, bad target ...)."""


class SelectionError(ValueError):
    """A configuration or input problem of run=select / run=visualize that the user must fix."""


# ----------------------------------------------------------------------------------------------
# Config -> objects
# ----------------------------------------------------------------------------------------------
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


def start_model(task: DictConfig, splits: DataSplits) -> torch.nn.Module:
    """The model a task's runs start from: :func:`task_model` with the ``task.pretrained`` weights loaded when it
    is set (a torchvision weights name read from the local torch hub cache, or a local weights file; see
    ``generate_dataset.models.pretrained``). Data models, ``train`` / ``pretrain_final`` and a final run without
    ``final.model`` all start here, so an ImageNet data model is the pretrained network before its recipe.

    Under torchrun rank 0 finds (or, with ``task.pretrained_download=true``, downloads) the file and the others
    wait; a missing file ends every rank with the message. Every rank then reads the same file."""
    model = task_model(task, splits)
    source = task.get("pretrained")
    if is_null(source) or source is False:
        return model
    download = bool(task.get("pretrained_download", False))
    path = distributed.run_on_main(resolve_pretrained, task.model, source, download=download)
    load_pretrained(model, task.model, path)
    log.info("%s starts from task.pretrained=%s (%s)", task.model, source, path)
    return model


def example_input(task: DictConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """The batch-1 input used to trace models and count MACs (``task.input_size``)."""
    return torch.ones(1, *task.input_size, device=device)


def recipe(section: DictConfig, protocol: str = "validation") -> TrainConfig:
    """A training recipe from a task section; ``protocol=paper`` turns best-on-validation into best-on-test.

    The authors keep the epoch with the best *test* accuracy in their final fine-tune (reference §7.4);
    that is only reproduced on request, and :class:`training.loop.TrainResult` labels it.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol={protocol!r}; valid: {', '.join(PROTOCOLS)}")
    values = OmegaConf.to_container(section, resolve=True)
    if protocol == "paper" and values.get("select", "val") == "val":
        values["select"] = "test"
    return TrainConfig.from_dict(values)


def codec_options(cfg: DictConfig) -> dict[str, Any]:
    """``GraphCodec`` keywords of a run: ``input_shape`` from ``task.input_size`` and the ``codec`` section
    (``edge_layout``, ``identity_edges``, ``legacy_fc_permutation``; absent keys: the codec's defaults)."""
    section = cfg.get("codec") or {}
    return {"input_shape": tuple(cfg.task.input_size),
            "identity_edges": section.get("identity_edges", None),
            "edge_layout": section.get("edge_layout", "auto"),
            "legacy_fc_permutation": bool(section.get("legacy_fc_permutation", False))}


def setup(cfg: DictConfig) -> torch.device:
    """Seed everything, apply ``threads`` and pick the device for a run (this rank's GPU under torchrun); on CUDA turn
    on the throughput settings unless ``deterministic=true`` (``utils.device.configure_cuda``)."""
    deterministic = bool(cfg.get("deterministic", False))
    configure_cuda(deterministic)  # before any CUDA work: cuBLAS reads its workspace setting once
    seed_everything(cfg.seed, deterministic=deterministic)
    threads = cfg.get("threads")
    if not is_null(threads):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r} must be a whole number >= 1 (or null: torch's default)")
        torch.set_num_threads(threads)  # N processes on one CPU host: give each cores / N
    if distributed.is_distributed():
        device = distributed.local_device(cfg.get("device", "auto"))
    else:
        device = resolve_device(cfg.get("device", "auto"))
    log.info("device: %s, seed: %s", device, cfg.seed)
    return device


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# A run on the task's data (final runs, pretrain_final's init pruning)
# ----------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What a run on the task's data shares: config, run dir, device, data, pruning method, example input; and the
    DDP-aware steps of such a run (``stages.ddp``; plain calls in a single process)."""

    cfg: DictConfig
    run_dir: Path
    device: torch.device
    splits: DataSplits
    loaders: DataLoaders  # under torchrun: DistributedSampler shards of every split
    method: dict
    example: torch.Tensor  # [1, C, H, W] on device: traces and counts MACs

    @property
    def task(self) -> DictConfig:
        return self.cfg.task

    def recipe(self, stage: str) -> TrainConfig:
        """The ``task.finetune.<stage>`` recipe under the run's protocol."""
        return recipe(self.task.finetune[stage], self.cfg.protocol)

    def train(self, model: torch.nn.Module, config: TrainConfig, desc: str,
              after_backward: Callable[[torch.nn.Module], Any] | None = None) -> TrainResult:
        """Train ``model`` in place (``<desc>_metrics.csv``); under torchrun a DDP training with
        ``distributed.sync_bn``, rank 0's weights on every rank afterwards (``stages.ddp.train``)."""
        return ddp.train(model, self.loaders, config, self.device, run_dir=self.run_dir, desc=desc,
                         sync_bn=ddp.sync_bn_setting(self.cfg), after_backward=after_backward)

    def finetune(self, model: torch.nn.Module, stage: str) -> TrainResult:
        """Fine-tune ``model`` with ``task.finetune.<stage>`` (metrics in ``finetune_<stage>_metrics.csv``)."""
        return self.train(model, self.recipe(stage), f"finetune_{stage}")

    def make_on_main(self, make: Callable[[], tuple[torch.nn.Module, Any]], when: str) -> tuple[torch.nn.Module, Any]:
        """``make() -> (model, result)`` on rank 0, its model rebuilt on every rank (``stages.ddp.make_on_main``)."""
        return ddp.make_on_main(make, self.task.model, self.splits.num_classes, self.device, when)

    def change_on_main(self, model: torch.nn.Module, change: Callable[[torch.nn.Module], Any],
                       when: str) -> tuple[torch.nn.Module, Any]:
        """``change(model)`` on rank 0, the changed model rebuilt on every rank (``stages.ddp.change_on_main``):
        use the returned model."""
        return ddp.change_on_main(model, change, self.task.model, self.splits.num_classes, self.device, when)

    def check_same_structure(self, model: torch.nn.Module, when: str) -> None:
        """Under torchrun: every rank's ``model`` has rank 0's layer widths, or every rank raises."""
        ddp.check_same_structure(model, self.task.model, self.splits.num_classes, when)


def prune_and_finetune(ctx: RunContext, model: torch.nn.Module, target: float, base_macs: float,
                       config: TrainConfig, desc: str,
                       before_finetune: Callable[[torch.nn.Module], Any] | None = None
                       ) -> tuple[torch.nn.Module, float, TrainResult]:
    """The final runs' last two steps, shared with run=select's ``finetuned`` score so that the score measures
    what the final runs do: prune ``model`` (eval mode) to the TOTAL speed-up ``target`` (MACs of the unpruned
    architecture ``base_macs`` over the pruned MACs) with the task's pruning (``ctx.method``,
    ``task.pruning.iterative_steps``; an unreachable target raises), on rank 0 under torchrun
    (``ctx.change_on_main``: use the returned model); then ``before_finetune(model)`` (the final runs evaluate the
    pruned model, the score reseeds); then fine-tune it with ``config`` (``ctx.train``, ``<desc>_metrics.csv``).
    Returns ``(model, achieved speed-up, fine-tune result)``."""
    model.eval()

    def prune(pruned: torch.nn.Module) -> float:
        return prune_to_speed_up(pruned, target, ctx.method, ctx.example,
                                 iterative_steps=ctx.task.pruning.iterative_steps, base_macs=base_macs, strict=True,
                                 progress=True)

    model, achieved = ctx.change_on_main(model, prune, f"after pruning to {target:g}x")
    if before_finetune is not None:
        before_finetune(model)
    return model, achieved, ctx.train(model, config, desc)


def run_context(cfg: DictConfig, run_dir: Path) -> RunContext:
    """Seed, device, the task's data and loaders, the pruning method and the example input of a run. Under torchrun
    every split's loader gets a ``DistributedSampler``: each rank trains on its shard; val/test shards are padded
    to a multiple of the world size, as in torchvision's reference scripts, and their sums all-reduced."""
    device = setup(cfg)
    splits, loaders = task_data(cfg.task, cfg.seed, distributed=distributed.is_distributed())
    method = OmegaConf.to_container(cfg.method, resolve=True)
    return RunContext(cfg, Path(run_dir), device, splits, loaders, method, example_input(cfg.task, device))


# ----------------------------------------------------------------------------------------------
# Per-run boilerplate
# ----------------------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
LOCK_FILE = ".run.lock"


def run_recorded(run: RunFn, cfg: DictConfig, run_dir: str | os.PathLike) -> dict:
    """Run ``run(cfg, run_dir)`` with the per-run boilerplate done once, here.

    One writer per run dir: the run holds an OS lock on ``<run_dir>/.run.lock`` from start to end (rank 0 under
    torchrun), and a second run in the same folder is refused at once, naming the holder's pid and host. Before the
    run, the results of an earlier one here (``results.json`` and its ``config.yaml``) are removed. After it, the
    resolved config (``config.yaml``) and the returned summary plus ``seconds`` (``results.json``, the file that marks
    a finished run: the pipeline and the benchmarks skip a stage that has it) are written atomically, together, so a
    ``config.yaml`` only ever sits beside the results it produced. Only the main process writes, and an empty
    summary (another rank under torchrun) writes nothing. A run that fails writes neither, and its error is logged
    (into the run's log file as well as on the terminal) before it leaves.
    """
    run_dir = Path(run_dir)
    main = distributed.is_main_process()
    with _one_writer(run_dir, main):
        if main:
            (run_dir / RESULTS_FILE).unlink(missing_ok=True)
            (run_dir / CONFIG_FILE).unlink(missing_ok=True)
        started = time.time()
        with preemption.handle_stop_signals():
            try:
                summary = run(cfg, run_dir)
            except preemption.RunInterrupted as stop:
                # SLURM and other schedulers send SIGTERM before they preempt: say what was kept, exit 128 + signal
                log.warning("%s: %s", run_dir, stop)
                raise SystemExit(stop.exit_code) from None
            except Exception as err:
                _log_failure(run_dir, err)
                raise
        if main and summary:
            summary["seconds"] = round(time.time() - started, 1)
            atomic_write(run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
            write_json(run_dir / RESULTS_FILE, summary)
            log.info("results written to %s", run_dir / RESULTS_FILE)
        if main and not cfg.get("keep_resume_checkpoints", False):
            remove_resume_checkpoints(run_dir)
    return summary


def _log_failure(run_dir: Path, err: BaseException) -> None:
    """Log a run's fatal error once (a pipeline's stage and the pipeline share it) into the run's log."""
    if getattr(err, "_logged_by_run_recorded", False):
        return
    # the message and where it was raised; the terminal shows the same message once more through Hydra (the whole
    # traceback with HYDRA_FULL_ERROR=1), so no traceback here
    frames = traceback.extract_tb(err.__traceback__)
    where = f" (raised at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    log.error("run in %s failed: %s: %s%s", run_dir, type(err).__name__, err, where)
    try:
        err._logged_by_run_recorded = True  # type: ignore[attr-defined]
    except AttributeError:
        pass


@contextlib.contextmanager
def _one_writer(run_dir: Path, main: bool) -> Iterator[None]:
    """Rank 0 holds the run dir's lock for the block; under torchrun the other ranks learn whether it got it, so a
    refused run ends on every rank."""
    with contextlib.ExitStack() as stack:
        refused = None
        if main:
            try:
                stack.enter_context(exclusive_lock(
                    run_dir / LOCK_FILE, f"run dir {run_dir}",
                    "One run writes a run dir at a time: wait for that run to finish, or pass another "
                    "hydra.run.dir"))
            except LockHeldError as err:
                refused = str(err)
                distributed.broadcast_object(refused)
                raise
        refused = distributed.broadcast_object(refused)
        if refused is not None:
            raise distributed.RankFailedError(f"rank 0: {refused}")
        yield


def remove_resume_checkpoints(run_dir: Path) -> None:
    """Delete the trainings' resume checkpoints (``training.loop.resume_path``) under a finished run's ``run_dir``:
    they only serve a re-run of an unfinished one (``keep_resume_checkpoints=true`` keeps them)."""
    for folder in sorted(Path(run_dir).rglob(RESUME_DIR)):
        # checkpoints, and the temporary files of writes a kill interrupted (utils.io.temporary_path)
        if folder.is_dir() and all(p.suffix in (".pt", ".tmp") for p in folder.iterdir()):
            shutil.rmtree(folder)
