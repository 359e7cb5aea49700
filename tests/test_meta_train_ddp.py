"""Meta-training with ``task.meta_train.iterations_per_step`` (the authors' ImageNet step, stages/meta_train.py):
the accumulated step's gradient against the authors' per-batch computation, the settings, a single-process run
(data model 0 only, steps per epoch, trailing batches skipped) killed mid-epoch that resumes bit-identically,
and under ``torchrun --nproc_per_node=2`` (gloo): parameters bit-identical on both ranks, the documented steps
per epoch, a failure on rank 1 that ends rank 0 with its message, and a resume from the last finished epoch."""
import csv
import json
import math
from itertools import islice

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_loaders.store import ShardWriter
from generate_dataset.models import build_model, model_spec
from helpers import METHOD, REPO, compose_cfg, run_torchrun, write_imagefolder
from nn.apply import build_metanetwork
from stages import artifacts, execute, meta_train, meta_train_metrics, meta_train_resume
from training import meta_gradient

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_NET = {"num_layer": 2, "hiddim": 8, "node_res_ratio": 0.01, "edge_res_ratio": 0.01}
# resnet8 widths without 3 (the class count: the pruner ignores layers with as many outputs as classes)
STORE_WIDTHS = ([8, 5, 8, 6, 8, 4, 8], [8, 6, 8, 4, 8, 5, 8], [8, 4, 8, 5, 8, 6, 8])


def data_model(seed, widths=STORE_WIDTHS[0], dtype=torch.float32, in_channels=3, classes=3):
    torch.manual_seed(seed)
    model = build_model("resnet8", classes, widths=widths, in_channels=in_channels)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # distinct channel importances: a finite regulariser everywhere
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.normal_(m.bias, std=0.1)
            torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
    return model.to(dtype).eval()


# ------------------------------------------------------------------------------------------------
# The accumulated step and the settings (no run)
# ------------------------------------------------------------------------------------------------
class _Settings:
    pruner_reg = 10.0


def test_accumulated_steps_equal_the_authors_per_batch_sum_step_after_step():
    """Two consecutive steps of 2 batches from one batch stream (the epoch loop's islice): each step's gradient
    is the authors' sum over its batches of the per-batch CE backward (retain_graph) plus the regulariser's,
    computed with the weights the previous step left; reference_batches == iterations_per_step changes nothing."""
    model = data_model(0, dtype=torch.float64, in_channels=1, classes=10)
    entry = meta_gradient.build_entry(0, model, torch.ones(1, 1, 8, 8, dtype=torch.float64), METHOD, _Settings,
                                      input_shape=(1, 8, 8))
    torch.manual_seed(1)
    net = build_metanetwork(entry.codec, TINY_NET).to(torch.float64)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (5,), generator=g))
               for _ in range(5)]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)

    def authors_gradient(step_batches):
        net.zero_grad(set_to_none=True)
        generated = entry.codec.decode(net(entry.codec.encode(model)))
        for x, y in step_batches:
            F.cross_entropy(torch.func.functional_call(model, (entry.buffers, generated), (x,)), y).backward(
                retain_graph=True)
        reg = entry.regularizer.gradient({k: v.detach() for k, v in generated.items()}, alpha=16.0)
        keys = sorted(reg)
        torch.cat([generated[k].flatten() for k in keys]).backward(torch.cat([reg[k].flatten() for k in keys]))
        return {k: p.grad.detach().clone() for k, p in net.named_parameters()}

    stream = iter(batches)
    for step, reference_batches in enumerate((None, 2)):
        expected = authors_gradient(batches[2 * step:2 * step + 2])
        result, norm = meta_gradient.accumulated_step(net, entry, islice(stream, 2), reference_batches, alpha=16.0)
        assert result.batches == 2 and math.isfinite(result.ce) and result.reg > 0
        for name, p in net.named_parameters():
            assert expected[name].abs().max() > 0, name
            torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
        assert norm == pytest.approx(torch.cat([v.flatten() for v in expected.values()]).norm().item(), rel=1e-10)
        optimizer.step()
    assert len(list(stream)) == 1  # the fifth batch: left for the epoch loop to skip


def base_task(**meta):
    section = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.0, "milestones": [2], "gamma": 0.1, "pruner_reg": 10.0,
               "alpha": 16.0, "bias": False, "train_split": 0.67, "reference_batches": 200, **meta}
    return OmegaConf.create({"name": "t", "batch_size": 32, "meta_train": section})


@pytest.mark.parametrize("value, message", [
    (0, r"task\.meta_train\.iterations_per_step=0 must be >= 1"),
    (2.5, r"task\.meta_train\.iterations_per_step=2\.5 is not a valid int"),
    ("many", r"task\.meta_train\.iterations_per_step='many' is not a valid int"),
])
def test_iterations_per_step_settings_are_checked_naming_the_key(value, message):
    assert meta_train.MetaTrainSettings.from_task(base_task()).iterations_per_step is None
    assert meta_train.MetaTrainSettings.from_task(base_task(iterations_per_step=200)).iterations_per_step == 200
    with pytest.raises(ValueError, match=message):
        meta_train.MetaTrainSettings.from_task(base_task(iterations_per_step=value))
    with pytest.raises(ValueError, match=r"iterations_per_step=200 and task\.meta_train\.batches_per_step=200"):
        meta_train.MetaTrainSettings.from_task(base_task(iterations_per_step=200, batches_per_step=200))


@pytest.mark.parametrize("task, train_split", [("resnet50_on_ImageNet", 0.67), ("vit_b_16_on_ImageNet", 0.5)])
def test_imagenet_tasks_use_the_authors_step(task, train_split):
    settings = meta_train.MetaTrainSettings.from_task(compose_cfg([f"task={task}"]).task)
    assert (settings.iterations_per_step, settings.reference_batches, settings.batches_per_step) == (200, 200, None)
    assert settings.batch_size == 32 and settings.train_split == train_split
    cifar = meta_train.MetaTrainSettings.from_task(compose_cfg(["task=resnet56_on_CIFAR10"]).task)
    assert cifar.iterations_per_step is None  # the CIFAR-scale tasks keep one step per data model


def test_resuming_with_another_number_of_ranks_is_refused():
    meta = {"task": "t", "store": "s", "train_indices": [0, 1], "options": {}, "seed": 7, "world_size": 2,
            "settings": {"lr": 0.01}}
    checkpoint = {k: None for k in ("optimizer", "scheduler", "history", "steps", "rng")}
    meta_train_resume.check_resumable("ck.pt", {**checkpoint, "meta": {**meta, "world_size": 2}}, meta)  # same: fine
    with pytest.raises(ValueError, match=r"ranks: checkpoint 8, now 2 .*--nproc_per_node=8"):
        meta_train_resume.check_resumable("ck.pt", {**checkpoint, "meta": {**meta, "world_size": 8}}, meta)


# ------------------------------------------------------------------------------------------------
# Runs on a tiny ImageFolder and a tiny store
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """54 training images (3 classes x 18) and a store of 3 resnet8 data models (2 meta-train, 1 held out)."""
    root = tmp_path_factory.mktemp("imagenet_meta")
    write_imagefolder(root / "imagenet", classes=3, per_class=18, size=20)
    identity = {"task": "resnet50_on_ImageNet", "architecture": "resnet8", "num_classes": 3,
                "method": "group_l2_norm_max_normalizer"}
    writer = ShardWriter(root / "store", 0, identity)
    for position, widths in enumerate(STORE_WIDTHS):
        model = data_model(10 + position, widths=widths)
        writer.append(position, model.state_dict(), model_spec("resnet8", model, 3), {"test_acc": 0.3}, 1.3,
                      seed=position, config={})
    return root


def overrides(root, iterations_per_step, epochs=2):
    """The ImageNet task on the tiny data: 6 images held out, 48 train, batches of 4."""
    return ["run=meta_train", "task=resnet50_on_ImageNet", "task.model=resnet8", "device=cpu",
            f"paths.data_dir={root}", f"task.dataset.root={root / 'imagenet'}", "task.dataset.val_size=6",
            "task.dataset.num_workers=0", "task.input_size=[3,32,32]", "++task.dataset.image_size=32",
            f"task.meta_train.epochs={epochs}", f"task.meta_train.iterations_per_step={iterations_per_step}",
            f"task.meta_train.reference_batches={iterations_per_step}", "task.meta_train.batch_size=4",
            "metanetwork.num_layer=2", "metanetwork.hiddim=8"]


def checkpoint(run_dir, epoch):
    return torch.load(artifacts.checkpoint_path(run_dir, epoch), weights_only=True)


def test_single_process_is_rank_0_and_a_run_killed_mid_epoch_resumes_identically(data_dir, tmp_path, monkeypatch):
    """One process = rank 0 of 1: data model 0 only, the whole training split per epoch (48 / 4 = 12 batches),
    iterations_per_step=5: 2 steps per epoch, the 2 trailing batches never loaded. Killed during epoch 2, the run
    resumes from epoch 1's checkpoint and ends bit-identical to the uninterrupted one (the same resume code as
    under torchrun, except that there rank 0 picks the checkpoint and every rank loads it)."""
    cfg = compose_cfg(overrides(data_dir, 5) + [f"store={data_dir / 'store'}"])
    real = meta_gradient._cross_entropy
    calls = {"n": 0, "limit": math.inf}

    def counted(logits, labels):
        calls["n"] += 1
        if calls["n"] > calls["limit"]:
            raise KeyboardInterrupt("killed in epoch 2")
        return real(logits, labels)

    monkeypatch.setattr(meta_gradient, "_cross_entropy", counted)
    monkeypatch.setattr(meta_train, "plot_quietly", lambda *args: None)  # seconds per epoch; tested elsewhere
    whole = tmp_path / "whole"
    summary = execute(cfg, whole)
    assert calls["n"] == 2 * 2 * 5  # 2 epochs x 2 steps x 5 batches: the trailing 2 batches are skipped
    info = summary["iterations_per_step"]
    assert info == {"world_size": 1, "iterations_per_step": 5, "steps_per_epoch": 2, "batches_per_epoch": 12,
                    "skipped_batches_per_epoch": 2, "rank_data_models": [0], "unused_train_data_models": [1]}
    rows = list(csv.DictReader((whole / meta_train_metrics.METRICS_CSV).open()))
    assert [(int(r["epoch"]), int(r["steps"])) for r in rows] == [(1, 2), (2, 2)]
    assert [s[:2] for s in checkpoint(whole, 2)["steps"]] == [[1, 1], [1, 2], [2, 1], [2, 2]]

    killed = tmp_path / "killed"
    calls.update(n=0, limit=10 + 6)  # epoch 1 (10 batches), then the 2nd batch of epoch 2's second step
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, killed)
    assert [e for e, _ in artifacts.list_checkpoints(killed)] == [1]
    calls.update(limit=math.inf)
    resumed = execute(cfg, killed)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs"] == 2
    a, b = checkpoint(killed, 2), checkpoint(whole, 2)
    assert a["steps"] == b["steps"] and a["history"][-1]["ce"] == b["history"][-1]["ce"]
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), k


def test_null_iterations_per_step_is_refused_under_torchrun(monkeypatch, tmp_path):
    monkeypatch.setattr(meta_train, "is_distributed", lambda: True)
    cfg = compose_cfg(["run=meta_train", "task=resnet20_on_digits", "device=cpu", f"store={tmp_path}"])
    with pytest.raises(ValueError, match=r"under torchrun needs task\.meta_train\.iterations_per_step"):
        meta_train.run(cfg, tmp_path)


# What every torchrun rank runs: main_imagenet.py three times in the same processes (one torchrun launch: a third
# of the start-up cost): run 1 with rank 1 failing at its KILL_AT-th batch, run 2 again in the same dir (a resume
# from the files, as a new launch would), run 3 uninterrupted in <dir>_whole. The process group is kept between
# runs (destroying and re-creating it under one torchrun launch races on the rendezvous keys). Each rank saves its
# metanetwork after every epoch; no diagnostics plot (seconds per epoch; tested in test_meta_train.py).
WRAPPER = '''
import os, runpy, sys
sys.path.insert(0, {repo!r})
import torch
from stages import meta_train
from training import meta_gradient
from utils import distributed
RANK, KILL_AT = int(os.environ["RANK"]), {kill_at}
save, real, cleanup = meta_train._save_epoch, meta_gradient._cross_entropy, distributed.cleanup

def save_and_dump(state, epoch, row):
    save(state, epoch, row)
    torch.save(state.metanetwork.state_dict(), state.run_dir / f"rank{{RANK}}_epoch{{epoch}}.pt")

calls = [0]

def dying(logits, labels):
    calls[0] += 1
    if RANK == 1 and calls[0] >= KILL_AT:
        raise RuntimeError("simulated kill of rank 1")
    return real(logits, labels)

meta_train._save_epoch = save_and_dump
meta_train.plot_quietly = lambda *args: None
script = os.path.join({repo!r}, "main_imagenet", "main_imagenet.py")
args = sys.argv[1:]
run_dir = [a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")][0]
others = [a for a in args if not a.startswith("hydra.run.dir=")]
for launch, patched, end, where in ((1, dying, lambda: None, run_dir), (2, real, lambda: None, run_dir),
                                    (3, real, cleanup, run_dir + "_whole")):
    meta_gradient._cross_entropy, distributed.cleanup = patched, end
    sys.argv = [script, *others, f"hydra.run.dir={{where}}"]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code
    found = sorted(os.listdir(os.path.join(where, "checkpoints")))
    done = os.path.exists(os.path.join(where, "results.json"))
    print(f"run {{launch}} rank {{RANK}} exit {{code}} checkpoints {{found}} results {{done}}", flush=True)
'''


@pytest.mark.slow
def test_torchrun_two_ranks_identical_parameters_steps_per_epoch_failure_and_resume(data_dir, tmp_path):
    """2 gloo ranks: each shard 24 images / batch 4 = 6 batches, iterations_per_step=2 -> 3 steps per epoch;
    rank r meta-trains data model r. Run 1 fails on rank 1 in epoch 2: both ranks end it, rank 0 with rank 1's
    message; epoch 1's checkpoint (written by rank 0) equals both ranks' parameters. Run 2 resumes: every rank
    loads that checkpoint and both end epoch 2 with the parameters of the checkpoint rank 0 writes, bit-identical
    to run 3's, uninterrupted."""
    run_dir = tmp_path / "ddp"
    # ++store: configs/imagenet.yaml may not compose main.yaml's store section yet
    args = overrides(data_dir, 2) + [f"++store={data_dir / 'store'}", f"hydra.run.dir={run_dir}"]
    script = tmp_path / "three_runs.py"
    script.write_text(WRAPPER.format(repo=str(REPO), kill_at=6 + 3))  # rank 1's 9th batch: epoch 2, step 2

    proc = run_torchrun(args, tmp_path, script=script, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for r in (0, 1):
        assert f"run 1 rank {r} exit 1 checkpoints ['epoch_0001.pt'] results False" in out, out[-4000:]
        assert f"run 2 rank {r} exit 0" in out and f"run 3 rank {r} exit 0" in out, out[-4000:]
    assert "rank 1 failed: RuntimeError: simulated kill of rank 1" in out, out[-4000:]

    epoch1, epoch2 = checkpoint(run_dir, 1), checkpoint(run_dir, 2)
    for epoch, saved in ((1, epoch1), (2, epoch2)):
        ranks = [torch.load(run_dir / f"rank{r}_epoch{epoch}.pt", weights_only=True) for r in (0, 1)]
        for k, v in saved["state_dict"].items():
            assert torch.equal(ranks[0][k], v) and torch.equal(ranks[1][k], v), (epoch, k)
    assert any(not torch.equal(epoch1["state_dict"][k], v) for k, v in epoch2["state_dict"].items())
    whole = checkpoint(tmp_path / "ddp_whole", 2)  # the same run, never interrupted
    assert whole["steps"] == epoch2["steps"] and whole["history"][-1]["ce"] == epoch2["history"][-1]["ce"]
    for k, v in whole["state_dict"].items():
        assert torch.equal(epoch2["state_dict"][k], v), k
    assert epoch2["meta"]["world_size"] == 2
    assert [s[:2] for s in epoch2["steps"]] == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["resumed_from_epoch"] == 1 and results["epochs"] == 2
    assert results["iterations_per_step"] == {
        "world_size": 2, "iterations_per_step": 2, "steps_per_epoch": 3, "batches_per_epoch": 6,
        "skipped_batches_per_epoch": 0, "rank_data_models": [0, 1], "unused_train_data_models": []}
    rows = list(csv.DictReader((run_dir / meta_train_metrics.METRICS_CSV).open()))
    assert [(int(r["epoch"]), int(r["steps"])) for r in rows] == [(1, 3), (2, 3)]
    assert all(math.isfinite(float(r["ce"])) and float(r["reg"]) > 0 for r in rows)
