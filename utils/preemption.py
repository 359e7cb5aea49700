"""Stopping cleanly when the job is preempted: SIGTERM (what SLURM and most schedulers send before they kill a job)
asks the running training loop to stop after its current optimiser step and save what resumes it.

:func:`handle_stop_signals` installs the handler for the duration of a run (``stages.common.run_recorded``). The
training loop (``training.loop.train``) marks the stretch where it honours the request (:func:`honoured`) and polls
:func:`stop_requested` after each step; outside such a stretch the signal raises :class:`RunInterrupted` at once,
so no other loop ignores it. Either way the run ends with :class:`RunInterrupted`, which the run's boilerplate logs
("stopped by SIGTERM ...; re-run the same command to continue") before the process exits with 128 + the signal's
number, the code a shell gives a process the signal killed.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM,)

_requested: list[str] = []  # the name of the signal received, once one has been
_honouring = [0]  # > 0 while a loop polls stop_requested() after each step


class RunInterrupted(Exception):
    """A stop signal ended the run; ``checkpoint`` is what a re-run resumes from (None: nothing was saved)."""

    def __init__(self, signal_name: str, where: str, checkpoint: str | None = None):
        self.signal_name, self.where, self.checkpoint = signal_name, where, checkpoint
        saved = f"; resume state saved in {checkpoint}" if checkpoint else ""
        super().__init__(f"stopped by {signal_name} {where}{saved}; re-run the same command in the same run dir "
                         "to continue")

    @property
    def exit_code(self) -> int:
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


def _on_signal(number: int, _frame) -> None:
    name = signal.Signals(number).name
    if not _requested:
        _requested.append(name)
    if _honouring[0] == 0:  # no loop will look at the request: stop here
        raise RunInterrupted(name, "outside a training loop (no epoch in progress)")


@contextlib.contextmanager
def handle_stop_signals() -> Iterator[None]:
    """Install the stop handler (main thread only; elsewhere a no-op) and restore the previous handlers after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _on_signal) for number in STOP_SIGNALS}
    _requested.clear()
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def stop_requested() -> str | None:
    """The name of the stop signal received (e.g. ``"SIGTERM"``), or None."""
    return _requested[0] if _requested else None


def request_stop(name: str = "SIGTERM") -> None:
    """Record a stop request as the signal handler would (tests, or a watchdog in the same process)."""
    if not _requested:
        _requested.append(name)


def clear() -> None:
    _requested.clear()


@contextlib.contextmanager
def honoured() -> Iterator[None]:
    """Mark a stretch whose loop polls :func:`stop_requested` after each step: the signal then only sets the flag."""
    _honouring[0] += 1
    try:
        yield
    finally:
        _honouring[0] -= 1
