"""The method's stages: one module per run mode of the Hydra entry points (``run=MODE``), and their registry.

Each run mode is a function ``run(cfg, run_dir) -> summary`` that writes its outputs under ``run_dir`` and
returns a JSON-serialisable summary. Entry scripts only call :func:`execute`, which looks the mode up in
:data:`RUNS` (an explicit table: nothing registers itself on import) and does the per-run boilerplate once
(``stages.common.run_recorded``: ``config.yaml``, timing, ``results.json`` from the summary) inside one experiment
tracking session (``utils.tracking.tracking_session``, the ``logger=`` group), which the pipeline's stages share.

Data-model generation (``stages.generate``) is a stage with its own entry script and primary config
(``generate_dataset/generate.py``, ``configs/generate.yaml``), so it is not a ``run=`` mode of ``main.py``.
"""
from __future__ import annotations

import os

from omegaconf import DictConfig

from stages import analyse, final, meta_train, pipeline, report, select, train
from stages.common import RunFn, run_recorded
from utils.distributed import is_distributed
from utils.tracking import tracking_session

RUNS: dict[str, RunFn] = {
    "train": train.run_train,
    "pretrain_final": train.run_pretrain_final,
    "meta_train": meta_train.run,
    "select": select.run_select,
    "visualize": select.run_visualize,
    "pruning_final": final.run_pruning_final,
    "unstructured_pruning_final": final.run_unstructured_pruning_final,
    "analyse": analyse.run,
    "report": report.run,
    "pipeline": pipeline.run,
}

# `run=help` prints the valid run modes instead of running one.
HELP = "help"

# Run modes that work under torchrun (one process per GPU; shared rules in stages/ddp.py). Today every mode; a new
# run mode joins only once it follows those rules (execute refuses it under torchrun otherwise).
DDP_RUNS = frozenset({"train", "pretrain_final", "meta_train", "select", "visualize", "pruning_final",
                      "unstructured_pruning_final", "analyse", "report", "pipeline"})

class UnknownRunError(ValueError):
    """Raised for a ``run=`` value that names no run mode."""


def list_runs() -> list[str]:
    return sorted(RUNS)


def get_run(name: str) -> RunFn:
    if name not in RUNS:
        raise UnknownRunError(f"unknown run mode run={name!r}; valid modes: {', '.join(list_runs())}")
    return RUNS[name]


def execute(cfg: DictConfig, run_dir: str | os.PathLike) -> dict:
    """Run ``cfg.run`` with outputs under ``run_dir`` (``stages.common.run_recorded``: the run dir locked for the run,
    the resolved ``config.yaml`` and ``results.json`` (the returned summary plus ``seconds``) written together at the
    end), the whole run inside the ``logger=`` tracking session (metrics sent
    with ``utils.tracking.log_metrics``); ``run=help`` only prints the valid modes."""
    if cfg.run == HELP:
        print("valid run modes: " + ", ".join(list_runs()))
        return {}
    run_fn = get_run(cfg.run)  # fail before any work on a typo
    if is_distributed() and cfg.run not in DDP_RUNS:
        raise RuntimeError(
            f"run={cfg.run} runs in a single process; launch it with python, not torchrun "
            f"(runs that support torchrun/DDP: {', '.join(sorted(DDP_RUNS))})"
        )
    with tracking_session(cfg, run_dir):
        return run_recorded(run_fn, cfg, run_dir)
