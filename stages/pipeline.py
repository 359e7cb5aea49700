"""Run mode ``pipeline``: generate -> meta_train -> select -> pretrain_final -> pruning_final (with and without
the metanetwork) -> report, in one command, every stage in its own sub-folder of the run dir.

Stages connect by path (no copying files by hand): the store the generator writes is the one
meta-training reads, the selection run names the checkpoint the final run loads. A stage whose
``results.json`` already exists is skipped, so re-running the same command (same ``hydra.run.dir``)
after a crash resumes where it stopped. Each stage runs with the per-run boilerplate of every run
(``stages.common.run_recorded``: ``config.yaml``, timing, ``results.json``).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from stages import final, generate, meta_train, report, select, train
from stages.common import RESULTS_FILE, RunFn, run_recorded

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


def run_stage(name: str, run: str, cfg: DictConfig, stage_dir: Path, **updates) -> dict:
    """Run mode ``run`` (one of :data:`CHAINED_RUNS`) in ``stage_dir`` with ``updates``; a stage that finished
    before (its ``results.json`` exists) is skipped and its summary read back."""
    done = stage_dir / RESULTS_FILE
    if done.exists():
        log.info("pipeline: stage %s already finished in %s; skipping", name, stage_dir)
        return json.loads(done.read_text())
    log.info("pipeline: stage %s -> %s", name, stage_dir)
    return run_recorded(CHAINED_RUNS[run], stage_config(cfg, run, **updates), stage_dir)


def generate_stage(cfg: DictConfig, store: Path, stage_dir: Path) -> dict:
    """``cfg.pipeline.num_data_models`` data models into ``store`` (one shard; resumes inside the shard)."""
    done = stage_dir / RESULTS_FILE
    if done.exists():
        return json.loads(done.read_text())
    gen = stage_config(cfg, "generate", num=cfg.pipeline.num_data_models, index=0, store=str(store),
                       no_init_pruning=False)
    return run_recorded(generate.run, gen, stage_dir)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """The whole method on one task; the report stage prints the result table, the curve plot of the
    selection stage is copied to ``run_dir/curves.png``."""
    store = run_dir / "store"
    generate_stage(cfg, store, run_dir / "generate")
    run_stage("meta_train", "meta_train", cfg, run_dir / "meta_train", store=str(store))
    run_stage("select", "select", cfg, run_dir / "select", store=str(store),
              **{"select.meta_train_dir": str(run_dir / "meta_train")})
    for name in ("curves.png",):
        if (run_dir / "select" / name).exists():
            shutil.copyfile(run_dir / "select" / name, run_dir / name)
    run_stage("pretrain_final", "pretrain_final", cfg, run_dir / "pretrain")
    model = str(run_dir / "pretrain" / "model.pt")
    run_stage("pruning_final (metanetwork)", "pruning_final", cfg, run_dir / "final" / "metanetwork",
              **{"final.model": model, "final.metanetwork": str(run_dir / "select")})
    run_stage("pruning_final (baseline)", "pruning_final", cfg, run_dir / "final" / "baseline",
              **{"final.model": model, "final.metanetwork": None})
    summary = run_stage("report", "report", cfg, run_dir / "report", **{"report.dir": str(run_dir / "final")})
    return {"run": "pipeline", "task": cfg.task.name, "run_dir": str(run_dir), "report": summary}
