"""Experiment tracking: the ``logger=`` config group (configs/logger/) behind two calls.

::

    with tracking_session(cfg, run_dir):                 # stages.execute: one session per command
        ...
        log_metrics("train", {"loss": 0.41, "acc": 0.93, "note": "x"}, step=epoch)   # train/loss, train/acc

Loggers (``cfg.logger.name``), the last three optional extras of setup.py (``pip install -e ".[tensorboard]"``
etc.), imported only when chosen; a missing one raises :class:`TrackingUnavailableError` naming the pip command:

=============  ======================================================================================
``none``       the default: nothing beyond the run dir's CSV files and log (both calls are no-ops)
``tensorboard`` event files under ``<run_dir>/tensorboard`` (``logger.log_dir``); hyper-parameters in the
               HPARAMS tab and the resolved config as text (``config``)
``wandb``      ``mode: offline`` by default (files under ``<run_dir>/wandb``, ``wandb sync`` uploads them later)
``mlflow``     a local store in the run dir by default: the database file ``<run_dir>/mlflow.db`` and artifacts in
               ``<run_dir>/mlartifacts`` (``logger.tracking_uri``; ``mlflow ui --backend-store-uri
               sqlite:///<run_dir>/mlflow.db``)
=============  ======================================================================================

Rules: only the main process (rank 0 under torchrun, ``utils.distributed.is_main_process``) starts a logger,
every other rank's calls are no-ops; a session opened inside an open one reuses it (the pipeline's stages share
the command's session); hyper-parameters are the flattened resolved config (``utils.settings_diff.flatten``,
keys ``task.meta_train.lr``). :func:`log_metrics` sends the numeric values of a row (ints, floats, bools as 0/1,
numpy scalars, one-element tensors; nested mappings become ``name/outer/inner``), skips every other value and
never raises: a failing logger is reported once in the log and the run goes on.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import numbers
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

from utils import distributed
from utils.settings_diff import flatten

log = logging.getLogger(__name__)

__all__ = ["LOGGERS", "TrackingUnavailableError", "tracking_session", "log_metrics", "active_logger"]


class TrackingUnavailableError(ImportError):
    """The chosen logger's package is not installed (the message names the pip command)."""


# ----------------------------------------------------------------------------------------------
# Backends: log_params(flat dict) once, log(name/key -> float, step) per row, close(failed)
# ----------------------------------------------------------------------------------------------
def _require(logger: str, module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackingUnavailableError(
            f"logger={logger} needs the `{package}` package, which is not installed here ({err}). Install it with "
            f'`pip install -e ".[{logger}]"` (or `pip install {package}`), or choose logger=none') from err


def _option(options: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = options.get(key)
    return default if value is None else value


class _TensorBoard:
    def __init__(self, options: Mapping[str, Any], run_dir: Path, run_name: str):
        _require("tensorboard", "tensorboard", "tensorboard")
        writer_module = _require("tensorboard", "torch.utils.tensorboard", "tensorboard")
        self.summary = _require("tensorboard", "torch.utils.tensorboard.summary", "tensorboard")
        self.log_dir = Path(_option(options, "log_dir", run_dir / "tensorboard"))
        self.writer = writer_module.SummaryWriter(log_dir=str(self.log_dir),
                                                  flush_secs=int(_option(options, "flush_secs", 30)))

    def log_params(self, params: Mapping[str, Any], config_yaml: str) -> None:
        # into this run's own event file (SummaryWriter.add_hparams would open a sub-run folder)
        values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
                  for k, v in params.items()}
        file_writer = self.writer._get_file_writer()
        for summary in self.summary.hparams(values, {}):
            file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + config_yaml + "\n```")

    def log(self, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)

    def close(self, failed: bool) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, options: Mapping[str, Any], run_dir: Path, run_name: str):
        wandb = _require("wandb", "wandb", "wandb")
        directory = Path(_option(options, "dir", run_dir))
        directory.mkdir(parents=True, exist_ok=True)
        tags = options.get("tags")
        self.run = wandb.init(project=_option(options, "project", "meta-pruning-gnn"), entity=options.get("entity"),
                              group=options.get("group"), tags=list(tags) if tags else None,
                              name=_option(options, "run_name", run_name), dir=str(directory),
                              mode=_option(options, "mode", "offline"))
        self.step_keys: set[str] = set()

    def log_params(self, params: Mapping[str, Any], config_yaml: str) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log(self, values: Mapping[str, float], step: int) -> None:
        # each row name gets its own x axis (wandb's own step must only grow; training, fine-tunes and
        # meta-training each count their epochs from 1)
        by_name: dict[str, dict[str, float]] = {}
        for key, value in values.items():
            by_name.setdefault(key.split("/", 1)[0], {})[key] = value
        for name, row in by_name.items():
            step_key = f"{name}/step"
            if step_key not in self.step_keys:
                self.run.define_metric(step_key)
                self.run.define_metric(f"{name}/*", step_metric=step_key)
                self.step_keys.add(step_key)
            self.run.log({**row, step_key: step})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class _MLflow:
    def __init__(self, options: Mapping[str, Any], run_dir: Path, run_name: str):
        _require("mlflow", "mlflow", "mlflow")
        tracking = _require("mlflow", "mlflow.tracking", "mlflow")
        entities = _require("mlflow", "mlflow.entities", "mlflow")
        self.Metric, self.Param = entities.Metric, entities.Param
        run_dir = run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        # default: a database file in the run dir (MLflow 3 refuses its old ./mlruns folder store unless
        # MLFLOW_ALLOW_FILE_STORE=true); its artifacts (config.yaml) in <run dir>/mlartifacts, not in the cwd
        uri = _option(options, "tracking_uri", f"sqlite:///{run_dir / 'mlflow.db'}")
        self.client = tracking.MlflowClient(tracking_uri=str(uri))
        name = str(_option(options, "experiment_name", "meta-pruning-gnn"))
        experiment = self.client.get_experiment_by_name(name)
        artifacts = None if options.get("tracking_uri") else (run_dir / "mlartifacts").as_uri()
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(name, artifact_location=artifacts))
        self.run_id = self.client.create_run(experiment_id, run_name=_option(options, "run_name", run_name)).info.run_id
        try:
            self.max_value = int(importlib.import_module("mlflow.utils.validation").MAX_PARAM_VAL_LENGTH)
        except (ImportError, AttributeError):
            self.max_value = 500

    def log_params(self, params: Mapping[str, Any], config_yaml: str) -> None:
        items = [self.Param(k, (v if isinstance(v, str) else json.dumps(v, default=str))[:self.max_value])
                 for k, v in params.items()]
        for start in range(0, len(items), 100):  # the tracking API takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])
        self.client.log_text(self.run_id, config_yaml, "config.yaml")

    def log(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, int(step)) for k, v in values.items()])

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


# logger name -> backend factory ``(options, run_dir, run_name) -> backend``; "none" starts nothing
LOGGERS: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
    "mlflow": _MLflow,
}

_active: Any = None  # the open session's backend (main process only)
_warned = False  # a failing logger is reported once per session


def active_logger() -> Any:
    """The open session's backend object, None without one (or on ranks other than 0)."""
    return _active


def _run_name(cfg: DictConfig, run_dir: Path) -> str:
    task = cfg.get("task")
    parts = [task.get("name") if isinstance(task, Mapping) else None, cfg.get("name"), cfg.get("run")]
    return "/".join(str(p) for p in parts if p) + f"/{run_dir.name}"


@contextlib.contextmanager
def tracking_session(cfg: DictConfig, run_dir: str | os.PathLike) -> Iterator[Any]:
    """Start the logger ``cfg.logger`` names (default ``none``) for the duration of the block and log the flattened
    resolved config as its hyper-parameters; yields the backend (None for ``none``, on other ranks, or inside
    an already open session, which is reused). Closes it at the end (marked failed if the block raised)."""
    global _active, _warned
    options = cfg.get("logger") or {}
    name = str(options.get("name", "none")) if isinstance(options, Mapping) else str(options)
    if name not in LOGGERS:
        raise ValueError(f"logger={name} is unknown; valid: {', '.join(LOGGERS)} (configs/logger/)")
    factory = LOGGERS[name]
    if factory is None or _active is not None or not distributed.is_main_process():
        yield _active
        return
    run_dir = Path(run_dir)
    options = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options)
    backend = factory(options, run_dir, _run_name(cfg, run_dir))
    failed = True
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        try:
            backend.log_params(flatten(resolved), OmegaConf.to_yaml(resolved))
        except Exception as err:  # noqa: BLE001 - the config is in the run dir's config.yaml anyway
            log.warning("logger=%s: could not record the config (%s: %s)", name, type(err).__name__, err)
        _active, _warned = backend, False
        log.info("experiment tracking: logger=%s (%s)", name, _run_name(cfg, run_dir))
        yield backend
        failed = False
    finally:
        _active = None
        try:
            backend.close(failed)
        except Exception as err:  # noqa: BLE001 - closing a tracker must not hide the run's own outcome
            log.warning("logger=%s: closing failed: %s: %s", name, type(err).__name__, err)


def _numeric(value: Any) -> float | None:
    if isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item"):  # a tensor with one element
        try:
            return float(value.item()) if value.numel() == 1 else None
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def _numeric_items(prefix: str, row: Mapping[Any, Any]) -> Iterator[tuple[str, float]]:
    for key, value in row.items():
        if isinstance(value, Mapping):
            yield from _numeric_items(f"{prefix}/{key}", value)
        else:
            number = _numeric(value)
            if number is not None:
                yield f"{prefix}/{key}", number


def log_metrics(name: str, row: Mapping[str, Any], step: int) -> None:
    """Send every numeric value of ``row`` as ``<name>/<key>`` at ``step`` to the active logger.

    ``name``: what the row is, e.g. ``train``, ``finetune_after_pruning``, ``meta_train``, ``select``. A no-op
    without an open :func:`tracking_session` and on ranks other than 0; non-numeric values are skipped; a logger
    error is logged (once) and swallowed, so tracking never stops a run."""
    global _warned
    backend = _active
    if backend is None or not distributed.is_main_process():
        return
    try:
        values = dict(_numeric_items(str(name), row))
        if values:
            backend.log(values, int(step))
    except Exception as err:  # noqa: BLE001 - tracking is auxiliary: the CSV files and the log still hold it all
        if not _warned:
            log.warning("experiment logger failed to log %s at step %s (%s: %s); further failures are not reported",
                        name, step, type(err).__name__, err)
            _warned = True
