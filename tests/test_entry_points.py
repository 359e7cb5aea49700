"""The Hydra entry scripts run from any directory and write their outputs into the run dir."""
import json
import os
import subprocess
import sys

import pytest
import torch

from generate_dataset.models import load_model
from helpers import REPO
from stages import list_runs


def run_script(args, cwd, extra_env=None, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra_env or {})}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


@pytest.mark.slow
def test_main_train_run_from_another_directory(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_script([sys.executable, str(REPO / "main" / "main.py"), "run=train", "task.train.epochs=2",
                       f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "resnet20_on_digits" and results["epochs"] == 2
    assert results["selection"] == "last"
    assert 0.0 <= results["metrics"]["test_acc"] <= 1.0
    assert (run_dir / "train_metrics.csv").read_text().count("\n") == 3  # header + 2 epochs
    assert (run_dir / "config.yaml").exists()

    model, checkpoint = load_model(run_dir / "model.pt")
    assert checkpoint["spec"] == results["model"]
    x = torch.randn(4, 1, 8, 8)
    assert model(x).shape == (4, 10)


def test_help_lists_the_run_modes_and_runs_nothing(tmp_path):
    proc = run_script([sys.executable, str(REPO / "main" / "main.py"), "run=help",
                       f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "valid run modes: " + ", ".join(list_runs()) in proc.stdout
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "results.json").exists()


def test_unknown_run_mode_is_one_clear_error(tmp_path):
    proc = run_script([sys.executable, str(REPO / "main" / "main.py"), "run=nope",
                       f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown run mode run='nope'" in proc.stderr and "train" in proc.stderr


def test_missing_data_is_one_clear_error(tmp_path):
    proc = run_script([sys.executable, str(REPO / "main" / "main.py"), "task=resnet56_on_CIFAR10",
                       f"paths.data_dir={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert str(tmp_path / "nowhere" / "CIFAR10") in proc.stderr
    assert "download" in proc.stderr


@pytest.mark.slow
def test_imagenet_entry_runs_under_torchrun_with_two_cpu_ranks(tmp_path):
    """DDP (gloo, 2 CPU processes): one results.json from rank 0, the model reloads."""
    run_dir = tmp_path / "ddp"
    proc = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       str(REPO / "main_imagenet" / "main_imagenet.py"), "task=resnet20_on_digits", "run=train",
                       "task.train.epochs=1", "device=cpu", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == 1
    model, _ = load_model(run_dir / "model.pt")
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
