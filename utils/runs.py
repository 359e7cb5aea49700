"""Run modes of the Hydra entry points (``run=MODE``).

Entry scripts only call :func:`execute`; each run writes its outputs under the run directory and
returns a JSON-serialisable summary. Importing this module registers every run mode.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from utils import experiment, final_runs, meta_train, pipeline, report, selection  # noqa: F401  (importing registers their run modes)
from utils.distributed import is_distributed, is_main_process
from utils.run_registry import UnknownRunError, get_run, list_runs  # noqa: F401  (re-exported)


# Run modes that work under torchrun (DDP training, rank-0 outputs); the others are single-process.
DDP_RUNS = frozenset({"train", "pretrain_final"})


def execute(cfg: DictConfig, run_dir: str | os.PathLike) -> dict:
    """Run ``cfg.run`` with outputs under ``run_dir``; saves the resolved config next to them."""
    if cfg.run == "help":
        print("valid run modes: " + ", ".join(list_runs()))
        return {}
    run_fn = get_run(cfg.run)  # fail before any work on a typo
    if is_distributed() and cfg.run not in DDP_RUNS:
        raise RuntimeError(
            f"run={cfg.run} runs in a single process; launch it with python, not torchrun "
            f"(runs that support torchrun/DDP: {', '.join(sorted(DDP_RUNS))})"
        )
    run_dir = Path(run_dir)
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_fn(cfg, run_dir)
