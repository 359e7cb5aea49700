"""Run mode ``pipeline``: generate -> meta_train -> select -> pretrain_final -> pruning_final (with and without
the metanetwork) -> report, in one command, every stage in its own sub-folder of the run dir.

Stages connect by path (no copying files by hand): the store the generator writes is the one
meta-training reads, the selection run names the checkpoint the final run loads. A stage whose
``results.json`` already exists is skipped, so re-running the same command (same ``hydra.run.dir``)
after a crash resumes where it stopped. Each stage runs with the per-run boilerplate of every run
(``stages.common.run_recorded``: ``config.yaml``, timing, ``results.json``).

A finished stage is reused only when its record says it ran with the settings asked for now (the keys it reads,
:func:`changed_settings`), else it is refused, or recomputed with ``pipeline.restart_changed=true``. A record that
cannot say so is treated the same way (:class:`DamagedRecordError`, naming the file): a ``results.json`` that is not
a JSON mapping; a ``config.yaml`` that is missing, unreadable, empty, not a mapping, or partial. Partial means it
lacks ``run``, ``task`` or a whole top-level section (a key holding a mapping) that the current config has and the
stage reads: what a file cut short looks like (``run`` is its last key). A key a newer version of the code adds
inside a section is not a change, as before; a whole new top-level section does make older records stale, since the
code cannot tell it from a cut. A finished ``select`` stage must also have a readable ``selection.json``, and a final
run that applied a selection must find that selection readable.

Under torchrun (``main_imagenet/main_imagenet.py run=pipeline``) every stage runs on all ranks; whether a stage is
reused, refused or recomputed is decided on rank 0 (which alone moves folders aside) and told to the others.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from data_loaders.store import DataModelStore, StoreError
from pruning.depgraph import check_method
from stages import final, generate, meta_train, report, select, train
from stages.artifacts import CURVES_PNG, MODEL_CHECKPOINT, chosen_checkpoint, final_results
from stages.common import RESULTS_FILE, RunFn, run_recorded
from utils import distributed, settings_diff
from utils.seed import derive_seed

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


class DamagedRecordError(StaleStageError):
    """A finished stage's record (``results.json``, ``config.yaml``, the ``selection.json`` it used) cannot be read
    or is incomplete, so it cannot say which settings made the results: never taken for a matching one."""


# Keys that never change a stage's results (select.cache only saves recomputing identical curves;
# pipeline.restart_changed only says what to do with a stage that changed; logger and keep_resume_checkpoints only
# say where metrics go and what is kept after a run).
RESULT_NEUTRAL_KEYS = ("select.cache", "pipeline.restart_changed", "logger", "keep_resume_checkpoints")
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
    are :data:`RESULT_NEUTRAL_KEYS` and the sections the run mode never reads (:data:`UNREAD_SECTIONS`). A missing,
    unreadable, empty or partial ``config.yaml`` raises :class:`DamagedRecordError` (module docstring)."""
    skip = RESULT_NEUTRAL_KEYS + UNREAD_SECTIONS.get(str(stage.get("run")), ())
    now = OmegaConf.to_container(stage, resolve=True)
    return settings_diff.changed_settings(_saved_config(stage_dir / "config.yaml", now, skip), now, skip=skip)


def _saved_config(path: Path, now: dict, skip: tuple[str, ...]) -> dict:
    """The settings a finished stage recorded in ``path``; :class:`DamagedRecordError` when they cannot be told."""
    if not path.exists():
        raise DamagedRecordError(f"{path} is missing: nothing records the settings that made the results beside it")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise DamagedRecordError(f"{path} cannot be read ({err.__class__.__name__}: {err})") from None
    if not isinstance(saved, dict):
        raise DamagedRecordError(f"{path} holds a {type(saved).__name__}, not a mapping of settings")
    if not saved:
        raise DamagedRecordError(f"{path} is empty")
    missing = [key for key in ("run", "task") if key not in saved]
    missing += [key for key in settings_diff.missing_sections(saved, now, skip) if key not in missing]
    if missing:
        raise DamagedRecordError(f"{path} is partial (cut short?): it lacks {', '.join(missing)}")
    return saved


def _read_results(path: Path) -> dict:
    """A finished run's ``results.json``; :class:`DamagedRecordError` when it is not a JSON mapping."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedRecordError(f"{path} cannot be read ({err.__class__.__name__}: {err})") from None
    if not isinstance(summary, dict):
        raise DamagedRecordError(f"{path} holds a JSON {type(summary).__name__}, not a run's results")
    return summary


def _selection(select_dir: Any) -> Path:
    """The checkpoint a select run dir chose (``stages.artifacts.chosen_checkpoint``); its errors as
    :class:`DamagedRecordError`."""
    try:
        return Path(chosen_checkpoint(select_dir)).resolve()
    except (FileNotFoundError, KeyError, ValueError) as err:
        raise DamagedRecordError(err.args[0] if err.args else str(err)) from None


def changed_checkpoint(stage_dir: Path, stage: DictConfig) -> list[str]:
    """``final.metanetwork`` given as a select run dir is the same setting whichever checkpoint that selection
    chooses; a final run records the checkpoint it applied (``metanetwork`` in its ``results.json``, per target
    with several targets). When the selection now chooses another one (re-run, or a new meta-training copied in),
    the finished run stands for another metanetwork: ``["final.metanetwork: ... -> ..."]``, else ``[]``."""
    source = OmegaConf.select(stage, "final.metanetwork")
    if str(stage.get("run")) != "pruning_final" or source is None or str(source).endswith(".pt"):
        return []
    now = _selection(source)  # a selection that cannot be read cannot vouch for the finished run
    used = set()
    for done in final_results(stage_dir):
        if done.exists():
            recorded = _read_results(done).get("metanetwork")
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
    try:
        summary = _read_results(done)
        changed = changed_settings(stage_dir, stage) + changed_checkpoint(stage_dir, stage)
        if str(stage.get("run")) == "select":
            _selection(stage_dir)  # what the final runs read from a finished selection
    except DamagedRecordError as err:
        reason = f"has a damaged record ({err})"
        refusal = DamagedRecordError(
            f"stage {name} in {stage_dir} cannot be reused: {err}. Its results cannot be checked against the settings "
            f"asked for now: delete {stage_dir} (and the stages after it), or use pipeline.restart_changed=true to "
            f"recompute from this stage on")
    else:
        if not changed:
            log.info("pipeline: stage %s already finished in %s; skipping", name, stage_dir)
            return summary
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        reason = f"finished with other settings ({shown})"
        refusal = StaleStageError(
            f"stage {name} finished in {stage_dir} with other settings ({shown}). Its results would not match the "
            f"settings asked for now: use a new hydra.run.dir, pipeline.restart_changed=true to recompute from "
            f"this stage on, or delete {stage_dir} (and the stages after it)")
    if restart is not None and restart.allowed:
        restart.started = True
        restart.move_aside(stage_dir, f"stage {name} {reason}")
        return None
    raise refusal


class Restart:
    """``pipeline.restart_changed``: once one stage is recomputed, every later stage is too (its inputs changed)."""

    def __init__(self, allowed: bool, run_dir: Path):
        self.allowed, self.started = bool(allowed), False
        # outside every stage folder, so that no report aggregates the superseded results
        self.aside = Path(run_dir) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"

    def move_aside(self, stage_dir: Path, why: str) -> None:
        target = self.aside / stage_dir.relative_to(self.aside.parent)
        n = 0
        while target.exists():  # a restart in the same second (one that was killed) already used that name
            n += 1
            target = target.with_name(f"{stage_dir.name}-{n}")
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
    """``(finished summary or None, restart started)``; a stage to recompute has its old ``output`` moved aside.

    The output (the data-model store) is checked on its own too: a restart killed after it moved the stage's
    folder leaves the old store behind, which the generator would refuse. With ``restart`` allowed a store of
    other settings is moved aside (with the stage's folder), without it refused. Once a stage runs under an
    allowed restart, every later one is recomputed (its input is new)."""
    finished = _finished(name, stage_dir, stage, restart)
    if finished is None and output is not None and restart is not None and output.exists():
        if restart.started:
            restart.move_aside(output, f"the output of stage {name} was made with other settings")
        elif changes := _store_changes(stage, output):
            shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
            if not restart.allowed:
                raise StaleStageError(
                    f"the data-model store {output} of stage {name} holds data models made with other settings "
                    f"({shown}): use a new hydra.run.dir, pipeline.restart_changed=true to recompute from this stage "
                    f"on, or delete {output} and {stage_dir} (and the stages after it)")
            if stage_dir.exists():
                restart.move_aside(stage_dir, f"stage {name} made its data-model store with other settings ({shown})")
            restart.move_aside(output, f"the data-model store of stage {name} was made with other settings ({shown})")
    if finished is None and restart is not None and restart.allowed:
        restart.started = True
    return finished, bool(restart is not None and restart.started)


def _store_changes(gen: DictConfig, store: Path) -> list[str]:
    """What differs between the data models in ``store`` and those the generate stage ``gen`` makes: the test the
    generator applies before resuming a shard (``stages.generate.check_resumable``: identity, recipe and seed of
    its first stored data model), read-only. ``[]`` when they match, the store holds none, or it cannot be read
    (the generator then names the damaged file)."""
    try:
        found = DataModelStore(store)
        record = found[0]
    except StoreError:
        return []
    identity = generate.shard_identity(gen)
    changes = [f"shard {key}: {found.identity.get(key)!r} -> {identity[key]!r}"
               for key in ("task", "architecture", "method") if found.identity.get(key) != identity[key]]
    changes += settings_diff.changed_settings(record.config, OmegaConf.to_container(gen, resolve=True),
                                              only=generate.RECIPE_KEYS)
    expected = derive_seed(gen.seed, gen.index, record.position)
    if record.seed != expected:
        changes.append(f"seed of data model {record.position}: {record.seed} -> {expected}")
    return changes


def check_settings(cfg: DictConfig) -> None:
    """Refuse, before the first stage trains anything, settings that would only fail in a later stage."""
    restart = cfg.pipeline.get("restart_changed", False)
    if not isinstance(restart, bool):
        raise ValueError(f"pipeline.restart_changed={restart!r}: true (recompute a stage that finished with other "
                         "settings, and every stage after it) or false (refuse it)")
    settings = meta_train.MetaTrainSettings.from_task(cfg.task)  # types, ranges, misspelt keys of task.meta_train
    check_method(OmegaConf.to_container(cfg.method, resolve=True))  # what init pruning would reject
    select.check_settings(cfg, meta_train_epochs=settings.epochs)  # incl. select.checkpoints vs those epochs
    generate.check_initial_speed_up(cfg)
    num = cfg.pipeline.num_data_models
    if not isinstance(num, int) or isinstance(num, bool) or num < 2:
        raise ValueError(f"pipeline.num_data_models={num!r}: the pipeline needs at least 2 data models, one to "
                         "meta-train on and one held out to select the checkpoint on")
    final.check_speed_ups(final.final_targets(cfg), float(cfg.task.initial_speed_up))  # what pruning_final checks


def _copy_plots(run_dir: Path) -> None:
    for name in (CURVES_PNG,):
        if (run_dir / "select" / name).exists():
            shutil.copyfile(run_dir / "select" / name, run_dir / name)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole method on one task; the report stage prints the result table, the curve plot of the
    selection stage is copied to ``run_dir/curves.png`` (``stages.artifacts.CURVES_PNG``)."""
    check_settings(cfg)
    restart = Restart(cfg.pipeline.get("restart_changed", False), run_dir)  # a bool (check_settings)
    store = run_dir / "store"
    generate_stage(cfg, store, run_dir / "generate", restart)
    run_stage("meta_train", "meta_train", cfg, run_dir / "meta_train", restart, store=str(store))
    run_stage("select", "select", cfg, run_dir / "select", restart, store=str(store),
              **{"select.meta_train_dir": str(run_dir / "meta_train")})
    distributed.run_on_main(_copy_plots, run_dir)
    run_stage("pretrain_final", "pretrain_final", cfg, run_dir / "pretrain", restart)
    model = str(run_dir / "pretrain" / MODEL_CHECKPOINT)
    run_stage("pruning_final (metanetwork)", "pruning_final", cfg, run_dir / "final" / "metanetwork", restart,
              **{"final.model": model, "final.metanetwork": str(run_dir / "select")})
    run_stage("pruning_final (baseline)", "pruning_final", cfg, run_dir / "final" / "baseline", restart,
              **{"final.model": model, "final.metanetwork": None})
    summary = run_stage("report", "report", cfg, run_dir / "report", restart,
                        **{"report.dir": str(run_dir / "final")})
    return {"run": "pipeline", "task": cfg.task.name, "run_dir": str(run_dir), "report": summary}
