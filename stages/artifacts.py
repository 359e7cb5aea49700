"""What one stage hands to the next, named and read in one place (stages connect by path, never by copying).

* ``meta_train`` -> ``select``: ``<meta_train run dir>/checkpoints/epoch_{k:04d}.pt``, one metanetwork checkpoint
  per finished epoch (1-based; :func:`checkpoint_path`, :func:`list_checkpoints`, :func:`checkpoints_by_epoch`).
* ``select`` -> the final runs: ``<select run dir>/selection.json`` names the chosen checkpoint (``chosen``, an
  absolute path; :func:`chosen_checkpoint`); ``curves.png`` is the pipeline's plot of the selection.
* ``final.metanetwork`` (``pruning_final``, ``unstructured_pruning_final``, ``analyse``): a checkpoint file or a
  select run dir, resolved here (:func:`metanetwork_setting`).
* ``pretrain_final`` -> the final runs: ``<run dir>/model.pt``, their ``final.model`` in the pipeline.
* a final run with several targets -> the pipeline and ``report``: one folder per target, ``target_<t>x/``, with
  that target's ``results.json`` and pruned model (:func:`target_dir`, :func:`final_results`).

Every run's ``results.json`` (the file that marks it finished) is ``stages.common.RESULTS_FILE``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.common import RESULTS_FILE, FinalRunConfigError, SelectionError
from utils.io import is_null

CHECKPOINT_DIR = "checkpoints"
_CHECKPOINT_RE = re.compile(r"^epoch_(\d+)\.pt$")
SELECTION_FILE = "selection.json"
CURVES_PNG = "curves.png"
MODEL_CHECKPOINT = "model.pt"
TARGET_PREFIX = "target_"


# ----------------------------------------------------------------------------------------------
# meta_train -> select: the metanetwork checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    """``<run_dir>/checkpoints/epoch_{epoch:04d}.pt`` (1-based epochs)."""
    return Path(run_dir) / CHECKPOINT_DIR / f"epoch_{int(epoch):04d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the meta_train checkpoints in ``run_dir``, by epoch."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def checkpoints_by_epoch(meta_train_dir: str | Path) -> dict[int, Path]:
    """``{epoch: absolute path}`` of every ``<meta_train_dir>/checkpoints/epoch_*.pt`` (clear errors if none).

    :func:`list_checkpoints` lists a run dir's checkpoints; this checks the setting
    ``select.meta_train_dir`` and insists on at least one.
    """
    if is_null(meta_train_dir):
        raise SelectionError("select.meta_train_dir is not set; pass select.meta_train_dir=<run dir of a finished "
                             "run=meta_train> (or select.cache=<select run dir> for run=visualize)")
    root = Path(str(meta_train_dir)).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"select.meta_train_dir={meta_train_dir}: no such folder; pass the run dir of a "
                                "run=meta_train (it holds checkpoints/epoch_XXXX.pt)")
    folder = root / CHECKPOINT_DIR
    found = {epoch: path.resolve() for epoch, path in list_checkpoints(root) if path.is_file()}
    if not found:
        raise FileNotFoundError(f"no metanetwork checkpoints (epoch_XXXX.pt) in {folder}; is {root} the run dir of "
                                "a run=meta_train that finished at least one epoch?")
    return dict(sorted(found.items()))


# ----------------------------------------------------------------------------------------------
# select -> final runs: the chosen checkpoint, and final.metanetwork
# ----------------------------------------------------------------------------------------------
def chosen_checkpoint(select_run_dir: str | Path) -> Path:
    """The checkpoint a finished ``run=select`` chose (from its ``selection.json``; a folder or the file itself)."""
    path = Path(str(select_run_dir)).expanduser()
    selection = path if path.is_file() else path / SELECTION_FILE
    if not selection.is_file():
        raise FileNotFoundError(f"{selection} does not exist: {path} is not a finished run=select run dir "
                                "(run=select writes selection.json when it finishes)")
    try:
        data = json.loads(selection.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{selection} is not valid JSON ({err}); re-run run=select") from None
    if not isinstance(data, dict):
        raise ValueError(f"{selection} holds a JSON {type(data).__name__}, not a selection; re-run run=select")
    if not data.get("chosen"):
        raise KeyError(f"{selection} has no 'chosen' entry naming the selected metanetwork checkpoint")
    chosen = Path(data["chosen"])
    if not chosen.is_absolute():
        chosen = selection.parent / chosen
    if not chosen.is_file():
        raise FileNotFoundError(f"the metanetwork checkpoint chosen in {selection} ({chosen}) no longer exists")
    return chosen


def resolve_metanetwork(value: Any) -> Path | None:
    """``final.metanetwork`` -> a metanetwork checkpoint path, or None for the baseline.

    A ``.pt`` file is used as is; a folder is a select run dir whose ``selection.json`` names the chosen
    checkpoint (:func:`chosen_checkpoint`; a relative path is taken relative to that folder).
    """
    if is_null(value):
        return None
    path = Path(str(value)).expanduser()
    if path.is_file():
        return path.resolve()
    if not path.is_dir():
        raise FileNotFoundError(
            f"final.metanetwork={value}: no such file or folder; pass a metanetwork checkpoint (.pt), a select "
            "run dir (with selection.json), or null for the baseline without metanetwork"
        )
    return chosen_checkpoint(path).resolve()  # relative to the folder, and checked to exist, there


def metanetwork_setting(cfg: DictConfig) -> Path | None:
    """``cfg.final.metanetwork`` resolved (:func:`resolve_metanetwork`); a clear error when left mandatory (???)."""
    if OmegaConf.is_missing(cfg.final, "metanetwork"):
        raise FinalRunConfigError(
            "final.metanetwork is required here: pass final.metanetwork=<select run dir or metanetwork .pt>, "
            "or final.metanetwork=null for the baseline without metanetwork"
        )
    return resolve_metanetwork(cfg.final.get("metanetwork"))


# ----------------------------------------------------------------------------------------------
# Final runs -> pipeline, report: one folder per target
# ----------------------------------------------------------------------------------------------
def target_dir(run_dir: Path, target: float) -> Path:
    """Sub-folder of a multi-target run that holds one target's ``results.json`` and pruned model."""
    return Path(run_dir) / f"{TARGET_PREFIX}{target:g}x"


def final_results(run_dir: Path) -> list[Path]:
    """The ``results.json`` a final run may have written: its own, then each target folder's, by name."""
    run_dir = Path(run_dir)
    return [run_dir / RESULTS_FILE, *sorted(run_dir.glob(f"{TARGET_PREFIX}*/{RESULTS_FILE}"))]
