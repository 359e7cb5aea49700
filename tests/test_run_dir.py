"""A run dir has one writer at a time, its config.yaml only ever sits beside the results it produced, the files a
user reads are written atomically, and a fatal error is logged before the run leaves."""
import json
import logging
import os
import subprocess
import sys

import pytest

import utils.io
from helpers import REPO, tiny_cfg
from stages import execute
from stages.common import CONFIG_FILE, LOCK_FILE, RESULTS_FILE, run_recorded
from test_report import sweep  # noqa: F401 - the fixture of final-run results
from utils.locking import LockHeldError

HOLD_LOCK = """
import sys, time
sys.path.insert(0, {repo!r})
from utils.locking import exclusive_lock
with exclusive_lock(sys.argv[1], "run dir", ""):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_a_second_run_in_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(repo=str(REPO)), str(run_dir / LOCK_FILE)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        ran = []
        with pytest.raises(LockHeldError, match=rf"run dir {run_dir} is in use by pid {holder.pid} on host "):
            run_recorded(lambda cfg, d: ran.append(1) or {"ok": True}, tiny_cfg(), run_dir)
        assert ran == [] and not (run_dir / CONFIG_FILE).exists() and not (run_dir / RESULTS_FILE).exists()
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=30)
    # released (a killed holder releases it too): the same run now goes through
    assert run_recorded(lambda cfg, d: {"ok": True}, tiny_cfg(), run_dir)["ok"]


def test_config_yaml_is_written_with_the_results_never_before(tmp_path):
    run_dir = tmp_path / "run"
    seen = {}

    def run(cfg, d):
        seen["config during the run"] = (d / CONFIG_FILE).exists()
        return {"ok": True}

    run_recorded(run, tiny_cfg(["seed=3"]), run_dir)
    assert seen == {"config during the run": False}
    assert "seed: 3" in (run_dir / CONFIG_FILE).read_text() and (run_dir / RESULTS_FILE).exists()

    def fail(cfg, d):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # a failed re-run (other settings) leaves no record at all
        run_recorded(fail, tiny_cfg(["seed=4"]), run_dir)
    assert not (run_dir / CONFIG_FILE).exists() and not (run_dir / RESULTS_FILE).exists()


def test_a_fatal_error_is_logged_once_with_where_it_was_raised(tmp_path, caplog):
    def fail(cfg, d):
        raise ValueError("a bad setting")

    def outer(cfg, d):  # a pipeline and its stage: both run through run_recorded
        return run_recorded(fail, cfg, d / "stage")

    with caplog.at_level(logging.ERROR, logger="stages.common"), pytest.raises(ValueError):
        run_recorded(outer, tiny_cfg(), tmp_path / "run")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "ValueError: a bad setting (raised at " in errors[0].getMessage()
    assert "test_run_dir.py" in errors[0].getMessage()


def test_full_disk_leaves_the_previous_report_whole(sweep, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "report"
    execute(tiny_cfg(["run=report", f"report.dir={sweep}"]), out)
    before = (out / "report.md").read_text()
    assert before.strip()

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.io, "write_bytes", full)
    with pytest.raises(OSError):
        execute(tiny_cfg(["run=report", f"report.dir={sweep}"]), out)
    assert (out / "report.md").read_text() == before
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    assert json.loads((sweep / "mn" / "0_seed7" / "results.json").read_text())["seed"] == 7
