"""Python logging set-up for scripts run outside Hydra (Hydra configures logging itself)."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm.auto import tqdm

_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class TqdmHandler(logging.StreamHandler):
    """Console handler that prints through ``tqdm.write`` so progress bars are not torn apart."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never crash the run
            self.handleError(record)


def setup_logging(run_dir: str | Path | None = None, level: int | str = "INFO",
                  filename: str = "run.log") -> logging.Logger:
    """Configure the root logger: console (via tqdm) and, with ``run_dir``, ``<run_dir>/<filename>``.

    Calling it again replaces the handlers it installed before, so it is safe in notebooks/tests.
    Returns the root logger.
    """
    root = logging.getLogger()
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for handler in list(root.handlers):
        if getattr(handler, "_installed_by_setup_logging", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [TqdmHandler(sys.stderr)]
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / filename))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT))
        handler._installed_by_setup_logging = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    return root
