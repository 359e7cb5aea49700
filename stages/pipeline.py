"""Run mode ``pipeline``: generate -> meta_train -> select -> pretrain_final -> pruning_final (with and without
the metanetwork) -> report, in one command, every stage in its own sub-folder of the run dir.

Stages connect by path (no copying files by hand): the store the generator writes is the one
meta-training reads, the selection run names the checkpoint the final run loads. A stage whose
``results.json`` already exists is skipped, so re-running the same command (same ``hydra.run.dir``)
after a crash resumes where it stopped. Each stage runs with the per-run boilerplate of every run
(``stages.common.run_recorded``: ``config.yaml``, timing, ``results.json``).

Under torchrun (``main_imagenet/main_imagenet.py run=pipeline``) every stage runs on all ranks; whether a stage is
reused, refused or recomputed is decided on rank 0 (which alone moves folders aside) and told to the others.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from stages import final, generate, meta_train, report, select, train
from stages.common import RESULTS_FILE, RunFn, run_recorded
from utils import distributed, settings_diff

log = logging.getLogger(__name__)

# The run modes the pipeline chains, by name (the same functions as in stages.RUNS; tests/test_layout.py checks).
CHAINED_RUNS: dict[str, RunFn] = {
    "meta_train": meta_train.run,
    "select": select.run_select,
    "pretrain_final": train.run_pretrain_final,
    "pruning_final": final.run_pruning_final,
    "report": report.run,
}


def stage_config(cfg: DictConfig, run: str, **updates) -> DictConfig:
    """A copy of the pipeline's config for one stage, with ``updates`` (dotted keys) applied."""
    stage = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(stage):
        stage.run = run
        for key, value in updates.items():
            OmegaConf.update(stage, key, value, force_add=True)
    return stage


class StaleStageError(RuntimeError):
    """A finished stage was run with other settings than the ones asked for now."""


# Keys that never change a stage's results (select.cache only saves recomputing identical curves).
RESULT_NEUTRAL_KEYS = ("select.cache",)
# Sections a run mode never reads: changing them leaves its finished results valid. A final run rebuilds its
# metanetwork from the checkpoint's own spec (nn.apply.load_metanetwork), never from the `metanetwork` section.
UNREAD_SECTIONS = {
    "pretrain_final": ("task.meta_train", "task.select", "select", "meta_train", "report", "metanetwork"),
    "pruning_final": ("task.meta_train", "task.select", "select", "meta_train", "report", "metanetwork"),
    "meta_train": ("task.select", "select", "final", "report"),
    "select": ("final", "report"),
    "generate": ("task.meta_train", "task.select", "select", "meta_train", "metanetwork", "final", "report"),
}


def changed_settings(stage_dir: Path, stage: DictConfig) -> list[str]:
    """``key: then -> now`` for every setting of ``stage`` that differs from the finished stage's ``config.yaml``.

    Keys present on only one side (added or removed by a newer version of the code) are not differences, nor
    are :data:`RESULT_NEUTRAL_KEYS` and the sections the run mode never reads (:data:`UNREAD_SECTIONS`)."""
    saved_file = stage_dir / "config.yaml"
    if not saved_file.exists():
        return []
    return settings_diff.changed_settings(
        OmegaConf.to_container(OmegaConf.load(saved_file), resolve=True), OmegaConf.to_container(stage, resolve=True),
        skip=RESULT_NEUTRAL_KEYS + UNREAD_SECTIONS.get(str(stage.get("run")), ()))


def changed_checkpoint(stage_dir: Path, stage: DictConfig) -> list[str]:
    """``final.metanetwork`` given as a select run dir is the same setting whichever checkpoint that selection
    chooses; a final run records the checkpoint it applied (``metanetwork`` in its ``results.json``, per target
    with several targets). When the selection now chooses another one (re-run, or a new meta-training copied in),
    the finished run stands for another metanetwork: ``["final.metanetwork: ... -> ..."]``, else ``[]``."""
    source = OmegaConf.select(stage, "final.metanetwork")
    if str(stage.get("run")) != "pruning_final" or source is None or str(source).endswith(".pt"):
        return []
    try:
        now = Path(select.chosen_checkpoint(source)).resolve()
    except (FileNotFoundError, KeyError, ValueError):
        return []  # the run itself reports a missing or broken selection
    used = set()
    for done in [stage_dir / RESULTS_FILE, *sorted(stage_dir.glob(f"target_*/{RESULTS_FILE}"))]:
        if done.exists():
            recorded = json.loads(done.read_text()).get("metanetwork")
            if recorded:
                used.add(Path(recorded).resolve())
    then = sorted(str(path) for path in used if path != now)
    return [f"final.metanetwork ({source}) chose checkpoint {then[0]} -> {now}"] if then else []


def _finished(name: str, stage_dir: Path, stage: DictConfig, restart: Restart | None = None) -> dict | None:
    """The summary of a stage that finished before with the same settings; None when it has to run. A stage
    that finished with other settings is refused (its results would silently stand for the new ones), or with
    ``restart`` moved aside to be recomputed, and every later stage with it."""
    done = stage_dir / RESULTS_FILE
    if restart is not None and restart.started and stage_dir.exists():
        restart.move_aside(stage_dir, f"stage {name} follows a recomputed stage")
        return None
    if not done.exists():
        return None
    changed = changed_settings(stage_dir, stage) + changed_checkpoint(stage_dir, stage)
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        if restart is not None and restart.allowed:
            restart.started = True
            restart.move_aside(stage_dir, f"stage {name} finished with other settings ({shown})")
            return None
        raise StaleStageError(
            f"stage {name} finished in {stage_dir} with other settings ({shown}). Its results would not match the "
            f"settings asked for now: use a new hydra.run.dir, pipeline.restart_changed=true to recompute from "
            f"this stage on, or delete {stage_dir} (and the stages after it)")
    log.info("pipeline: stage %s already finished in %s; skipping", name, stage_dir)
    return json.loads(done.read_text())


class Restart:
    """``pipeline.restart_changed``: once one stage is recomputed, every later stage is too (its inputs changed)."""

    def __init__(self, allowed: bool, run_dir: Path):
        self.allowed, self.started = bool(allowed), False
        # outside every stage folder, so that no report aggregates the superseded results
        self.aside = Path(run_dir) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"

    def move_aside(self, stage_dir: Path, why: str) -> None:
        target = self.aside / stage_dir.relative_to(self.aside.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        stage_dir.rename(target)
        log.warning("pipeline: %s; moved %s aside to %s and recomputing", why, stage_dir, target)


def run_stage(name: str, run: str, cfg: DictConfig, stage_dir: Path, restart: Restart | None = None,
              **updates) -> dict:
    """Run mode ``run`` (one of :data:`CHAINED_RUNS`) in ``stage_dir`` with ``updates``; a stage that finished
    before (its ``results.json`` exists) with the same settings is skipped and its summary read back, one that
    finished with other settings is refused (:class:`StaleStageError`) or, with ``restart``, recomputed."""
    return _reuse_or_run(name, CHAINED_RUNS[run], stage_config(cfg, run, **updates), stage_dir, restart)


def generate_stage(cfg: DictConfig, store: Path, stage_dir: Path, restart: Restart | None = None) -> dict:
    """``cfg.pipeline.num_data_models`` data models into ``store`` (one shard; resumes inside the shard)."""
    gen = stage_config(cfg, "generate", num=cfg.pipeline.num_data_models, index=0, store=str(store),
                       no_init_pruning=False)
    return _reuse_or_run("generate", generate.run, gen, stage_dir, restart, output=store)


def _reuse_or_run(name: str, run: RunFn, stage: DictConfig, stage_dir: Path, restart: Restart | None,
                  output: Path | None = None) -> dict:
    """:func:`_finished`'s summary, or ``run`` in ``stage_dir``; ``output``: a result the stage writes outside
    its folder (the store), moved aside with it when the stage is recomputed."""
    # decided (and folders moved aside) by rank 0 under torchrun, then told to every rank
    finished, restarted = distributed.run_on_main(_reuse_or_make_room, name, stage, stage_dir, restart, output)
    if restart is not None:
        restart.started = restarted
    if finished is not None:
        return finished
    log.info("pipeline: stage %s -> %s", name, stage_dir)
    return run_recorded(run, stage, stage_dir)


def _reuse_or_make_room(name: str, stage: DictConfig, stage_dir: Path, restart: Restart | None,
                        output: Path | None) -> tuple[dict | None, bool]:
    """``(finished summary or None, restart started)``; a stage to recompute has its old ``output`` moved aside."""
    finished = _finished(name, stage_dir, stage, restart)
    if finished is None and output is not None and restart is not None and restart.started and output.exists():
        restart.move_aside(output, f"the output of stage {name} was made with other settings")
    return finished, bool(restart is not None and restart.started)


def check_settings(cfg: DictConfig) -> None:
    """Refuse, before the first stage trains anything, settings that would only fail in a later stage."""
    meta_train.MetaTrainSettings.from_task(cfg.task)  # types, ranges, misspelt keys of task.meta_train
    generate.check_initial_speed_up(cfg)
    num = cfg.pipeline.num_data_models
    if not isinstance(num, int) or isinstance(num, bool) or num < 2:
        raise ValueError(f"pipeline.num_data_models={num!r}: the pipeline needs at least 2 data models, one to "
                         "meta-train on and one held out to select the checkpoint on")
    final.check_speed_ups(final.final_targets(cfg), float(cfg.task.initial_speed_up))  # what pruning_final checks


def _copy_plots(run_dir: Path) -> None:
    for name in ("curves.png",):
        if (run_dir / "select" / name).exists():
            shutil.copyfile(run_dir / "select" / name, run_dir / name)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole method on one task; the report stage prints the result table, the curve plot of the
    selection stage is copied to ``run_dir/curves.png``."""
    check_settings(cfg)
    restart = Restart(cfg.pipeline.get("restart_changed", False), run_dir)
    store = run_dir / "store"
    generate_stage(cfg, store, run_dir / "generate", restart)
    run_stage("meta_train", "meta_train", cfg, run_dir / "meta_train", restart, store=str(store))
    run_stage("select", "select", cfg, run_dir / "select", restart, store=str(store),
              **{"select.meta_train_dir": str(run_dir / "meta_train")})
    distributed.run_on_main(_copy_plots, run_dir)
    run_stage("pretrain_final", "pretrain_final", cfg, run_dir / "pretrain", restart)
    model = str(run_dir / "pretrain" / "model.pt")
    run_stage("pruning_final (metanetwork)", "pruning_final", cfg, run_dir / "final" / "metanetwork", restart,
              **{"final.model": model, "final.metanetwork": str(run_dir / "select")})
    run_stage("pruning_final (baseline)", "pruning_final", cfg, run_dir / "final" / "baseline", restart,
              **{"final.model": model, "final.metanetwork": None})
    summary = run_stage("report", "report", cfg, run_dir / "report", restart,
                        **{"report.dir": str(run_dir / "final")})
    return {"run": "pipeline", "task": cfg.task.name, "run_dir": str(run_dir), "report": summary}
