"""Every long run resumes: a training killed at any point and re-run with the same command ends with the weights an
uninterrupted run ends with (bitwise on CPU) and trains only what was left; SIGTERM stops it cleanly.

Unit tests drive ``training.loop.train`` in process (a kill is an exception raised from inside a step, a SIGTERM a
stop request); the end-to-end tests run the entry script in a subprocess and SIGKILL / SIGTERM it."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from generate_dataset.models import load_model
from helpers import REPO, TINY, run_torchrun, tiny_cfg, write_imagefolder
from stages.common import run_recorded
from training.loop import resume_path, train
from utils import preemption
from utils.checkpoint import load_checkpoint
from utils.seed import make_generator, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


class _Killed(Exception):
    """Stands for the process dying: raised from inside a training step."""


def _data(seed: int = 0) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    train_set, val_set = TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])
    return SimpleNamespace(train=DataLoader(train_set, batch_size=16, shuffle=True, generator=make_generator(seed)),
                           val=DataLoader(val_set, batch_size=32), test=DataLoader(val_set, batch_size=32))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 4))


# random data order, dropout, mixup and a val-selected epoch: every random state and the selection state must resume
RECIPE = {"epochs": 5, "lr": 0.05, "milestones": [3], "select": "val", "mixup_alpha": 0.4}


def _run(run_dir: Path, step_hook=None, recipe=RECIPE) -> tuple[dict, object]:
    seed_everything(3)
    model = _model()
    result = train(model, _data(), recipe, CPU, run_dir=run_dir, desc="fit", after_backward=step_hook, resume=True)
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _counting_steps(kill_at: int | None = None, stop_at: int | None = None):
    steps = []

    def hook(_model):
        steps.append(1)
        if stop_at is not None and len(steps) == stop_at:
            preemption.request_stop("SIGTERM")
        if kill_at is not None and len(steps) == kill_at:
            raise _Killed
    return hook, steps


def _without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.endswith(("seconds", "_per_s"))} for row in history]


@pytest.fixture
def reference(tmp_path):
    state, result = _run(tmp_path / "reference")
    return state, result


def test_killed_training_resumes_bitwise_and_retrains_only_what_was_left(tmp_path, reference):
    kill_step = random.Random(os.getpid()).randint(5, 18)  # 4 steps per epoch: a random point of epochs 2 to 5
    hook, _ = _counting_steps(kill_at=kill_step)
    with pytest.raises(_Killed):
        _run(tmp_path / "run", hook)
    saved = load_checkpoint(resume_path(tmp_path / "run", "fit"))
    assert saved["epoch"] == (kill_step - 1) // 4 and saved["finished"] is None

    hook, steps = _counting_steps()
    state, result = _run(tmp_path / "run", hook)
    assert len(steps) == 4 * (5 - saved["epoch"])  # only the epochs after the last finished one
    assert _same(state, reference[0])
    assert result.selected_epoch == reference[1].selected_epoch
    assert result.final_metrics == reference[1].final_metrics
    assert _without_timing(result.history) == _without_timing(reference[1].history)
    rows = (tmp_path / "run" / "fit_metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 5  # the resumed CSV holds every epoch once


def test_stop_request_ends_the_step_saves_mid_epoch_and_resumes_bitwise(tmp_path, reference):
    hook, steps = _counting_steps(stop_at=7)  # during epoch 2, after its 3rd step
    try:
        with pytest.raises(preemption.RunInterrupted, match="SIGTERM .*epoch 2/5 after 3 batches"):
            _run(tmp_path / "run", hook)
    finally:
        preemption.clear()
    assert len(steps) == 7  # the step running when the signal came finished, no other began
    saved = load_checkpoint(resume_path(tmp_path / "run", "fit"))
    assert saved["epoch"] == 1 and saved["partial"]["epoch"] == 2 and saved["partial"]["batches"] == 3

    hook, steps = _counting_steps()
    state, result = _run(tmp_path / "run", hook)
    assert len(steps) == 20 - 7
    assert _same(state, reference[0])
    assert result.final_metrics == reference[1].final_metrics


def test_finished_training_is_not_retrained(tmp_path, reference):
    _run(tmp_path / "run")
    hook, steps = _counting_steps()
    state, result = _run(tmp_path / "run", hook)
    assert steps == [] and _same(state, reference[0])
    assert result.final_metrics == reference[1].final_metrics and result.selected_epoch == reference[1].selected_epoch


def test_changed_recipe_or_entering_model_is_refused_naming_the_change(tmp_path):
    hook, _ = _counting_steps(kill_at=6)
    with pytest.raises(_Killed):
        _run(tmp_path / "run", hook)
    with pytest.raises(ValueError, match=r"recipe changed \(lr: 0.05 -> 0.1; milestones: \[3\] -> \[4\]\)"):
        _run(tmp_path / "run", recipe=RECIPE | {"lr": 0.1, "milestones": [4]})
    seed_everything(3)
    other = _model()
    with torch.no_grad():
        other[0].weight.mul_(2)
    with pytest.raises(ValueError, match="the model entering it is not the one its training started from"):
        train(other, _data(), RECIPE, CPU, run_dir=tmp_path / "run", desc="fit", resume=True)


def test_run_recorded_deletes_resume_checkpoints_unless_kept(tmp_path):
    def run(cfg, run_dir):
        _run(run_dir)
        assert resume_path(run_dir, "fit").is_file()  # written during the run
        return {"ok": True}

    run_recorded(run, tiny_cfg(), tmp_path / "a")
    assert not (tmp_path / "a" / "resume").exists()
    run_recorded(run, tiny_cfg(["keep_resume_checkpoints=true"]), tmp_path / "b")
    assert resume_path(tmp_path / "b", "fit").is_file()


# ----------------------------------------------------------------------------------------------
# End to end: the entry script killed for real
# ----------------------------------------------------------------------------------------------
def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "main" / "main.py"), *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(csv_file: Path) -> int:
    return max(0, len(csv_file.read_text().splitlines()) - 1) if csv_file.exists() else 0


def _kill_after(proc: subprocess.Popen, csv_file: Path, epochs: int, sig: int, timeout: float = 300) -> str:
    """Send ``sig`` once ``csv_file`` has ``epochs`` rows (the process is then inside the next epoch)."""
    deadline = time.time() + timeout
    while _rows(csv_file) < epochs:
        if proc.poll() is not None:
            raise AssertionError(f"finished before the kill:\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the epoch")
        time.sleep(0.005)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


def _run_to_end(args: list[str], cwd: Path) -> str:
    proc = _launch(args, cwd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _epochs_trained(log: str, desc: str) -> list[int]:
    return [int(e) for e in re.findall(rf"\b{desc} epoch (\d+)/\d+ \| lr", log)]


def _weights(path: Path) -> dict:
    return load_model(path)[0].state_dict()


EPOCHS = 8
TRAIN_ARGS = ["run=train", "task.model=resnet8", "device=cpu", f"task.train.epochs={EPOCHS}",
              "+task.train.max_batches_per_epoch=8", "task.train.milestones=[4]"]


@pytest.mark.slow
def test_sigkilled_then_sigtermed_train_run_resumes_bitwise(tmp_path):
    """SIGKILL at a random epoch, re-run; SIGTERM in a later epoch (clean stop: the step ends, the state is saved,
    the reason logged, exit 128 + 15), re-run to the end: the weights of an uninterrupted run, each epoch trained
    once after the last finished one."""
    _run_to_end(TRAIN_ARGS + [f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path)
    run_dir = tmp_path / "killed"
    args = TRAIN_ARGS + [f"hydra.run.dir={run_dir}"]
    csv_file = run_dir / "train_metrics.csv"
    kill_epoch = random.Random(os.getpid()).randint(1, 2)  # leaves room for the SIGTERM 2 epochs later
    _kill_after(_launch(args, tmp_path), csv_file, kill_epoch, signal.SIGKILL)
    finished = load_checkpoint(resume_path(run_dir, "train"))["epoch"]
    # the checkpoint is written before the epoch's CSV row: an epoch shown is an epoch kept
    assert kill_epoch <= finished < EPOCHS and not (run_dir / "results.json").exists()

    term_after = finished + 2  # rows in the CSV (the resumed run rewrites the finished ones first)
    proc = _launch(args, tmp_path)
    _kill_after(proc, csv_file, term_after, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM
    log = (run_dir / "main.log").read_text()
    second = log[log.rindex(f"resuming after epoch {finished} of {EPOCHS}"):]
    assert _epochs_trained(second, "train")[:2] == [finished + 1, finished + 2]
    stop = re.search(r"stopped by SIGTERM (in train epoch (\d)/8 after (\d+) batches|at the end of train epoch (\d)/8)",
                     log)
    assert stop and "re-run the same command" in log
    saved = load_checkpoint(resume_path(run_dir, "train"))
    if stop.group(2):  # mid-epoch: the epoch before is the last finished one, the partial one is recorded
        assert saved["epoch"] == int(stop.group(2)) - 1 >= term_after
        assert saved["partial"]["epoch"] == int(stop.group(2)) and saved["partial"]["batches"] == int(stop.group(3))
    else:
        assert saved["epoch"] == int(stop.group(4)) >= term_after and saved["partial"] is None

    _run_to_end(args, tmp_path)
    log = (run_dir / "main.log").read_text()
    rerun = log[log.rindex(f"resuming after epoch {saved['epoch']}"):]
    assert _epochs_trained(rerun, "train") == list(range(saved["epoch"] + 1, EPOCHS + 1))
    assert _same(_weights(run_dir / "model.pt"), _weights(tmp_path / "reference" / "model.pt"))
    assert not (run_dir / "resume").exists()  # deleted once the run finished


FINETUNE_ARGS = [a for a in TINY if "after_pruning" not in a] + [
    "run=pruning_final", "final.metanetwork=null", "final.target_speed_up=2.0",
    "task.finetune.after_pruning.epochs=5", "+task.finetune.after_pruning.max_batches_per_epoch=12",
    "task.finetune.after_pruning.milestones=[3]", "task.finetune.after_pruning.select=val"]


@pytest.mark.slow
def test_sigkilled_finetune_resumes_bitwise_without_redoing_earlier_trainings(tmp_path):
    _run_to_end(FINETUNE_ARGS + [f"hydra.run.dir={tmp_path / 'reference'}"], tmp_path)
    run_dir = tmp_path / "killed"
    args = FINETUNE_ARGS + [f"hydra.run.dir={run_dir}"]
    kill_epoch = random.Random(os.getpid() + 1).randint(1, 3)
    _kill_after(_launch(args, tmp_path), run_dir / "finetune_after_pruning_metrics.csv", kill_epoch, signal.SIGKILL)
    finished = load_checkpoint(resume_path(run_dir, "finetune_after_pruning"))["epoch"]

    _run_to_end(args, tmp_path)
    log = (run_dir / "main.log").read_text()
    second = log[log.rindex("device: cpu"):]  # the re-run's part of the log
    assert "pretrain: finished earlier" in second and "finetune_after_init_pruning: finished earlier" in second
    assert _epochs_trained(second, "pretrain") == [] and _epochs_trained(second, "finetune_after_init_pruning") == []
    assert _epochs_trained(second, "finetune_after_pruning") == list(range(finished + 1, 6))
    assert _same(_weights(run_dir / "pruned_model.pt"), _weights(tmp_path / "reference" / "pruned_model.pt"))


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_together_and_resumes(tmp_path):
    """SIGTERM to torchrun (which hands it to every worker, as SLURM's preemption does): the ranks agree on the batch
    to stop after, rank 0 writes the resume checkpoint, every rank reads it on the re-run, and the result is the
    uninterrupted run's."""
    write_imagefolder(tmp_path / "imagenet", classes=3, per_class=16, size=20)
    common = ["run=train", "task=resnet50_on_ImageNet", "task.model=resnet8", "task.pretrained=null",
              f"paths.data_dir={tmp_path}", f"task.dataset.root={tmp_path}/imagenet", "task.dataset.val_size=6",
              "task.dataset.num_workers=0", "task.input_size=[3,32,32]", "+task.dataset.image_size=32", "device=cpu",
              "task.batch_size=4", "task.eval_batch_size=8", "task.train.epochs=12", "task.train.milestones=[6]",
              "+task.train.sync_every=2"]
    reference = tmp_path / "reference"
    proc = run_torchrun(common + [f"hydra.run.dir={reference}"], tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    run_dir = tmp_path / "stopped"
    args = common + [f"hydra.run.dir={run_dir}"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(REPO / "main_imagenet" / "main_imagenet.py"), *args]
    proc = subprocess.Popen(launcher, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _kill_after(proc, run_dir / "train_metrics.csv", 2, signal.SIGTERM)
    assert proc.returncode != 0
    log = (run_dir / "main_imagenet.log").read_text()
    assert "stopped by SIGTERM" in log, out[-3000:]
    saved = load_checkpoint(resume_path(run_dir, "train"))
    assert 2 <= saved["epoch"] < 12 and saved["world_size"] == 2
    if saved["partial"] is not None:  # stopped mid-epoch: at a synchronisation point (every 2 batches)
        assert saved["partial"]["batches"] % 2 == 0

    proc = run_torchrun(args, tmp_path, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert f"resuming after epoch {saved['epoch']} of 12" in (run_dir / "main_imagenet.log").read_text()
    assert _same(_weights(run_dir / "model.pt"), _weights(reference / "model.pt"))
