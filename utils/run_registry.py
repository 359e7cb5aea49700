"""Registry of run modes (``run=MODE``): each is ``fn(cfg, run_dir) -> JSON-serialisable summary``."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

RunFn = Callable[[DictConfig, Path], dict]
_RUNS: dict[str, RunFn] = {}


class UnknownRunError(ValueError):
    """Raised for a ``run=`` value that names no registered run mode."""


def register_run(name: str) -> Callable[[RunFn], RunFn]:
    """Register ``fn(cfg, run_dir) -> summary`` as run mode ``name``."""

    def decorator(fn: RunFn) -> RunFn:
        if name in _RUNS:
            raise ValueError(f"run mode {name!r} registered twice")
        _RUNS[name] = fn
        return fn

    return decorator


def list_runs() -> list[str]:
    return sorted(_RUNS)


def get_run(name: str) -> RunFn:
    if name not in _RUNS:
        raise UnknownRunError(f"unknown run mode run={name!r}; valid modes: {', '.join(list_runs())}")
    return _RUNS[name]
