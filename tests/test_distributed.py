"""utils.distributed under torchrun (2 CPU ranks, gloo): gradient averaging, rank-0 sections whose failure ends
every rank with its message, the cross-rank equality check; and each rank's device (GPUs and the torchrun variables
simulated, in process)."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, run_torchrun
from utils import distributed as dist_utils

SCRIPT = f'''
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from utils import distributed as d
session = d.torchrun_session({{"backend": "gloo", "timeout_minutes": 5}}, "cpu")
session.__enter__()
r = d.rank()
p = torch.nn.Parameter(torch.zeros(3))
p.grad = torch.full((3,), float(r + 1))
q = torch.nn.Parameter(torch.zeros(2))  # no grad on either rank: zeros
d.average_gradients([p, q])
assert torch.equal(p.grad, torch.full((3,), 1.5)), p.grad
assert torch.equal(q.grad, torch.zeros(2))
assert d.run_on_main(lambda: 41 + 1) == 42
assert d.broadcast_object({{"r": r}}) == {{"r": 0}}
assert d.all_gather_objects(r) == [0, 1]
d.check_same_on_all_ranks([4, 5], "widths")
assert d.run_on_every_rank(lambda: r * 10, "a step") == r * 10
mode = sys.argv[1]
if mode == "fail_one":
    def step():
        if r == 1:
            raise RuntimeError("NaN loss on data model 3")
        return 0
    try:
        d.run_on_every_rank(step, "a step")
    except d.RankFailedError as err:
        print(f"rank {{r}} saw: {{err}}", flush=True)
        raise

if mode == "differ":
    d.check_same_on_all_ranks([4, 5 + r], "widths")
if mode == "fail":
    def boom():
        raise ValueError("no such file: weights.pth")
    try:
        d.run_on_main(boom)
    except d.RankFailedError as err:
        print(f"rank {{r}} saw: {{err}}", flush=True)
        raise
open(f"ok_{{r}}", "w").close()  # a file per rank: the ranks' prints can interleave on one stdout
print("ok", r, flush=True)
session.__exit__(None, None, None)
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "ddp_check.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.slow
def test_collectives_on_two_ranks(tmp_path, script):
    proc = run_torchrun(["ok"], tmp_path, script=script, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "ok_0").exists() and (tmp_path / "ok_1").exists()


@pytest.mark.slow
def test_rank0_failure_ends_every_rank_with_its_message(tmp_path, script):
    proc = run_torchrun(["fail"], tmp_path, script=script, timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rank 1 saw: rank 0 failed: ValueError: no such file: weights.pth" in out
    assert not (tmp_path / "ok_0").exists() and not (tmp_path / "ok_1").exists()


@pytest.mark.slow
def test_structures_that_differ_between_ranks_are_refused(tmp_path, script):
    proc = run_torchrun(["differ"], tmp_path, script=script, timeout=120)
    assert proc.returncode != 0
    assert "widths differs between ranks: rank 0 has [4, 5], rank 1 has [4, 6]" in proc.stdout + proc.stderr


def test_main_py_refuses_torchrun_and_names_the_entry_to_use(tmp_path):
    """main/main.py is single-process: launched by torchrun (its env vars) it stops before any work."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "main" / "main.py"), f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "main_imagenet/main_imagenet.py" in proc.stderr
    assert not (tmp_path / "run" / "results.json").exists()


@pytest.mark.slow
def test_a_failure_on_any_rank_ends_every_rank_with_its_message(tmp_path, script):
    proc = run_torchrun(["fail_one"], tmp_path, script=script, timeout=120)
    assert proc.returncode != 0
    assert "rank 0 saw: a step: rank 1 failed: RuntimeError: NaN loss on data model 3" in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------
# This rank's device (no GPU needed: CUDA's presence and the torchrun variables are simulated)
# ------------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def _gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _torchrun(monkeypatch, local_rank, world=4):
    for name, value in (("RANK", local_rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
        monkeypatch.setenv(name, str(value))


def _single_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_each_torchrun_rank_gets_its_gpu_local_rank_modulo_the_visible_ones(monkeypatch, caplog):
    _gpus(monkeypatch, 2)
    for local_rank, gpu in ((0, 0), (1, 1), (2, 0), (3, 1)):
        _torchrun(monkeypatch, local_rank)
        for setting in ("cuda", "auto", None, torch.device("cuda")):
            assert dist_utils.local_device(setting) == torch.device("cuda", gpu), (local_rank, setting)
        assert dist_utils.local_device("cpu") == CPU
    # more processes than GPUs share them, with a warning: NCCL refuses two ranks on one GPU
    caplog.set_level(logging.WARNING, logger="utils.distributed")
    caplog.clear()
    _torchrun(monkeypatch, 3)
    dist_utils.local_device("cuda")
    assert "LOCAL_RANK 3 but only 2 GPU(s)" in caplog.text


@pytest.mark.parametrize("gpus", [2, 0])
def test_an_explicit_gpu_index_is_refused_under_torchrun(monkeypatch, gpus):
    _gpus(monkeypatch, gpus)
    _torchrun(monkeypatch, 1)
    for setting in ("cuda:0", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="torchrun gives each process its GPU.*use device=cuda or device=auto"):
            dist_utils.local_device(setting)
    with pytest.raises(ValueError, match="not a valid device"):
        dist_utils.local_device("gpu0")


def test_cuda_without_cuda_is_an_error_not_the_cpu(monkeypatch):
    _gpus(monkeypatch, 0)
    _torchrun(monkeypatch, 0)
    with pytest.raises(RuntimeError, match="CUDA is not available.*device=auto or device=cpu"):
        dist_utils.local_device("cuda")
    assert dist_utils.local_device("auto") == CPU and dist_utils.local_device("cpu") == CPU
    # the same rule in a single process (utils.device.resolve_device), where cuda:N is honoured
    _single_process(monkeypatch)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        dist_utils.init_distributed(device="cuda")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        dist_utils.local_device("cuda:0")
    assert dist_utils.init_distributed(device="auto") == CPU
    _gpus(monkeypatch, 2)
    assert dist_utils.init_distributed(device="cuda:1") == torch.device("cuda", 1)  # was the CPU before
    assert dist_utils.init_distributed(device="auto") == torch.device("cuda")


def test_init_distributed_puts_the_rank_on_its_gpu_before_joining(monkeypatch):
    _gpus(monkeypatch, 2)
    _torchrun(monkeypatch, 3)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist_utils.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist_utils.dist, "init_process_group",
                        lambda backend, timeout=None: calls.append(("join", backend)))
    assert dist_utils.init_distributed("auto", "cuda") == torch.device("cuda", 1)
    assert calls == [("set_device", torch.device("cuda", 1)), ("join", "nccl")]
    calls.clear()
    with pytest.raises(ValueError, match="use device=cuda or device=auto"):
        dist_utils.init_distributed("auto", "cuda:1")
    assert calls == []  # refused before joining the group (every rank raises the same error)
    assert dist_utils.init_distributed("auto", "cpu") == CPU and calls == [("join", "gloo")]
