"""Every paper row (``configs/experiment/*.yaml``, one test per file found on disk, so a new row is tested
automatically) runs end to end under ``debug=smoke`` on synthetic data of the row's image shape and class count,
on the CPU, and reaches its target.

"End to end" is the whole method of the row, as its header comment tells a user to run it:

* structured rows (``run: pruning_final``): ``run=pipeline`` with the row's task, method and target: generate ->
  meta_train -> select -> pretrain_final -> pruning_final with and without the metanetwork -> report;
* transfer rows: the source task's generate -> meta_train -> select (its pipeline stages), then on the row's task
  pretrain_final -> pruning_final with that selection and without a metanetwork -> report;
* unstructured rows (``run: unstructured_pruning_final``): generate with ``no_init_pruning=true`` and the row's
  method -> meta_train -> pretrain_final -> unstructured_pruning_final with the last checkpoint and without -> report;
* ImageNet rows: ``run=pipeline`` under torchrun (2 gloo ranks on the CPU) through ``main_imagenet/main_imagenet.py``.

Each test checks outcomes, not only an exit code: both final runs' ``results.json`` with a pruned accuracy, the
achieved speed-up at the row's target (at most one of debug=smoke's coarse pruning steps past it) or the row's
sparsity, the metanetwork the selection chose, two meta-training checkpoints, and a report of both runs.

Budget (this file must stay near 4 minutes on 2 cores, 2 of them the VGG-19 row's metanetwork passes over its
2.3 M edges): the structured rows of one task share its generate / meta_train / select stages, because they differ only in final.target_speed_up, which those stages
never read. They run in one run dir, as a user runs several targets: the pipeline reuses the finished stages with
the same settings and recomputes pretrain_final, the final runs and the report
(``pipeline.restart_changed=true``); the transfer rows take their source's selection from the same place. A row
run alone computes everything itself. Batch sizes are cut to a few images (the CPU), everything else is the row's.

Rows whose metanetwork passes do not fit that budget run only with ``META_PRUNING_SMOKE_LARGE=1``
(:data:`LARGE_ARCHITECTURES` says what was measured on the 2-core development machine, one thread): their cost is
the metanetwork's forward and backward over the network's whole weight graph, fixed by the architecture, so no
smaller image or fewer batches help, and shrinking the architecture would no longer test the row. The ImageNet
rows' torchrun plumbing (the experiment file, debug=smoke's settings for the authors' ImageNet meta-training step,
the pipeline under 2 ranks) is still tested on every run, with a stand-in architecture that the test names
(:func:`test_imagenet_row_plumbing`). The last two tests check debug=limit and debug=overfit.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
from omegaconf import DictConfig

from helpers import CONFIG_DIR, compose_cfg, run_torchrun
from stages import execute, generate, pipeline
from stages.common import recipe, run_recorded
from stages.artifacts import list_checkpoints
from stages.meta_train import MetaTrainSettings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

ROWS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))

# Classes of each dataset a task may name (the synthetic stand-in must have as many).
CLASSES = {"CIFAR10": 10, "CIFAR100": 100, "SVHN": 10, "ImageNet": 1000, "FashionMNIST": 10, "digits": 10}
# Transfer rows: the task whose metanetwork the row applies (the header comment of each file).
TRANSFER_SOURCE = {"resnet56_cifar100_transfer": "resnet56_on_CIFAR10", "resnet56_svhn_transfer": "resnet56_on_CIFAR10"}
# Architectures whose smoke does not fit this file's budget on a CPU, with what was measured (one thread, 2-core
# Xeon @ 2.8 GHz): the metanetwork's forward and backward over the whole weight graph dominate, and their cost is
# fixed by the architecture (not by the image size or the number of batches).
LARGE_ARCHITECTURES = {
    "resnet50": "ResNet-50 (15.4 M graph edges): one metanetwork forward 56 s and backward 384 s, 11.8 GB peak "
                "per process; 2 ranks need more memory than the development machine (23 GB) has",
    "vit_b_16": "ViT-B/16 (71.6 M graph edges; its input is fixed at 224x224): one metanetwork forward without "
                "gradients 34 s and 10.6 GB per process; meta-training's backward on 2 ranks needs more memory than "
                "the development machine has",
}
RUN_LARGE = os.environ.get("META_PRUNING_SMOKE_LARGE") == "1"
# The image side used instead of task.input_size's, where the architecture accepts it (torchvision's ResNets pool
# adaptively; ViT-B/16 is built for 224 x 224, vit_tiny for 32 x 32).
IMAGE_SIZE = {"resnet50": 32, "resnet8": 32, "vit_tiny": 32}
# ImageNet rows' stand-ins in test_imagenet_row_plumbing (the same task, recipes, method and metanetwork settings).
STAND_IN = {"resnet50": "resnet8", "vit_b_16": "vit_tiny"}
# How far past its target a stand-in's final speed-up may land (vit_tiny reaches 1.29x the target in one step).
STAND_IN_OVERSHOOT = 1.5


def row_config(row: str) -> DictConfig:
    """What the row itself sets (composed under main.yaml, without debug=smoke)."""
    return compose_cfg([f"experiment={row}"])


def is_imagenet(cfg: DictConfig) -> bool:
    return cfg.task.dataset.name == "ImageNet"


def synthetic(task: DictConfig, train: int, val: int, test: int, size: int | None = None) -> list[str]:
    """The task's dataset replaced by the ``synthetic`` one with its class count and image shape (``size``: a
    smaller side, also given to task.input_size)."""
    name = task.dataset.name
    assert name in CLASSES, f"add the class count of dataset {name} to CLASSES"
    channels, height, _width = task.input_size
    side = size or height
    overrides = ["task.dataset.name=synthetic", f"task.dataset.val_size={val}", "task.dataset.num_workers=0",
                 f"++task.dataset.synthetic={{num_classes:{CLASSES[name]},in_channels:{channels},image_size:{side},"
                 f"train_size:{train + val},test_size:{test}}}"]
    if side != height:
        overrides.append(f"task.input_size=[{channels},{side},{side}]")
    return overrides


def cpu_overrides(task: DictConfig, primary: str = "main") -> list[str]:
    """debug=smoke on synthetic data, on the CPU, with batches of a few images; restart_changed lets one run dir
    hold several targets of one task (module docstring; not in generate.yaml, which has no pipeline)."""
    return ["debug=smoke", "device=cpu", *(["pipeline.restart_changed=true"] if primary == "main" else []),
            "task.batch_size=8", "task.eval_batch_size=32", "task.meta_train.batch_size=16",
            *synthetic(task, train=64, val=32, test=32)]


def skip_large(cfg: DictConfig) -> None:
    if cfg.task.model in LARGE_ARCHITECTURES and not RUN_LARGE:
        pytest.skip(f"{LARGE_ARCHITECTURES[cfg.task.model]}; run with META_PRUNING_SMOKE_LARGE=1")


def max_overshoot(target: float, steps: int) -> float:
    """The largest speed-up one pruning step past ``target`` gives, as a factor: a step removes 1/steps of the
    channels and MACs fall about with the square of the width, so from width w = 1/sqrt(target) one more step
    gives (w / (w - 1/steps))^2."""
    return (1.0 / (1.0 - math.sqrt(target) / steps)) ** 2


def read(path: Path) -> dict:
    assert path.exists(), f"{path} was not written"
    return json.loads(path.read_text())


def check_structured(final_dir: Path, target: float, overshoot: float, chosen: Path) -> None:
    """Both final runs reached the target, by at most the factor ``overshoot``; the metanetwork run used the
    chosen checkpoint."""
    with_meta, baseline = (read(final_dir / name / "results.json") for name in ("metanetwork", "baseline"))
    for result in (with_meta, baseline):
        assert result["run"] == "pruning_final" and result["target_speed_up"] == pytest.approx(target)
        assert 0.0 <= result["pruned_acc"] <= 1.0 and math.isfinite(result["pruned_acc"])
        assert target <= result["speed_up"] <= target * overshoot, result["speed_up"]
    assert Path(with_meta["metanetwork"]).resolve() == chosen.resolve()
    assert baseline["metanetwork"] is None
    assert all((final_dir / name / "pruned_model.pt").exists() for name in ("metanetwork", "baseline"))


def check_report(report_dir: Path, runs: int = 2) -> None:
    summary = read(report_dir / "results.json")
    assert summary["runs"] == runs
    text = (report_dir / "report.md").read_text()
    assert "Meta-Pruning" in text and "No metanetwork (baseline)" in text


def check_meta_train_and_selection(run_dir: Path) -> Path:
    """Two meta-training checkpoints, both scored on one held-out data model; returns the chosen checkpoint."""
    assert [epoch for epoch, _ in list_checkpoints(run_dir / "meta_train")] == [1, 2]
    selection = read(run_dir / "select" / "selection.json")
    assert selection["split"] == "val" and selection["epoch"] in (1, 2)
    return Path(selection["chosen"])


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """Run dirs shared by the rows of one task and method (module docstring)."""
    return tmp_path_factory.mktemp("experiment_smoke")


def upstream(task: str, method: str, shared: Path) -> Path:
    """The pipeline's generate -> meta_train -> select of ``task`` under debug=smoke, in the run dir that the
    task's structured rows use (stages finished there with the same settings are reused)."""
    run_dir = shared / f"{task}__{method}"
    cfg = compose_cfg([f"task={task}", f"method={method}", *cpu_overrides(compose_cfg([f"task={task}"]).task)])
    store = run_dir / "store"
    pipeline.generate_stage(cfg, store, run_dir / "generate")
    pipeline.run_stage("meta_train", "meta_train", cfg, run_dir / "meta_train", store=str(store))
    pipeline.run_stage("select", "select", cfg, run_dir / "select", store=str(store),
                       **{"select.meta_train_dir": str(run_dir / "meta_train")})
    return run_dir


def final_runs(base: list[str], out: Path, metanetwork: Path) -> None:
    """The row's own commands: pretrain_final once, the row's final run with ``metanetwork`` and without, report."""
    execute(compose_cfg([*base, "run=pretrain_final"]), out / "pretrain")
    model = out / "pretrain" / "model.pt"
    for name, value in (("metanetwork", metanetwork), ("baseline", "null")):
        execute(compose_cfg([*base, f"final.model={model}", f"final.metanetwork={value}"]), out / "final" / name)
    execute(compose_cfg([*base, "run=report", f"report.dir={out / 'final'}"]), out / "report")


@pytest.mark.parametrize("row", ROWS)
def test_row_end_to_end_under_debug_smoke(row, shared, tmp_path):
    cfg = row_config(row)
    skip_large(cfg)
    if is_imagenet(cfg):
        imagenet_row(row, cfg, cfg.task.model, tmp_path)
        return
    base = [f"experiment={row}", *cpu_overrides(cfg.task)]
    smoke = compose_cfg(base)
    target = float(cfg.final.target_speed_up)
    overshoot = max_overshoot(target, int(smoke.task.pruning.iterative_steps))
    if row in TRANSFER_SOURCE or row.endswith("_transfer"):
        assert row in TRANSFER_SOURCE, f"add the task whose metanetwork {row} applies to TRANSFER_SOURCE"
        source = upstream(TRANSFER_SOURCE[row], smoke.method.name, shared)
        chosen = check_meta_train_and_selection(source)
        final_runs(base, tmp_path, source / "select")
        check_structured(tmp_path / "final", target, overshoot, chosen)
        assert read(tmp_path / "final" / "metanetwork" / "results.json")["metanetwork_task"] == TRANSFER_SOURCE[row]
        check_report(tmp_path / "report")
    elif cfg.run == "unstructured_pruning_final":
        unstructured_row(base, cfg, smoke, tmp_path)
    else:
        assert cfg.run == "pruning_final", f"{row}: run={cfg.run} has no smoke flow here; add one"
        run_dir = shared / f"{smoke.task.name}__{smoke.method.name}"
        summary = execute(compose_cfg([*base, "run=pipeline"]), run_dir)
        assert summary["run"] == "pipeline"
        chosen = check_meta_train_and_selection(run_dir)
        check_structured(run_dir / "final", target, overshoot, chosen)
        check_report(run_dir / "report")


def unstructured_row(base: list[str], cfg: DictConfig, smoke: DictConfig, out: Path) -> None:
    """Data models without init pruning, meta-trained with the row's method at the regulariser strength its header
    names; the final runs prune final.amount of the weights with the last checkpoint and without a metanetwork."""
    store = out / "store"
    gen = compose_cfg([f"task={smoke.task.name}", f"method={smoke.method.name}", "no_init_pruning=true",
                       f"num={smoke.pipeline.num_data_models}", f"store={store}", *cpu_overrides(cfg.task, "generate")],
                      primary="generate")
    assert run_recorded(generate.run, gen, out / "generate")["produced"] == [0, 1]
    execute(compose_cfg([*base, "run=meta_train", f"store={store}", "task.meta_train.pruner_reg=0.1"]),
            out / "meta_train")
    checkpoints = list_checkpoints(out / "meta_train")
    assert [epoch for epoch, _ in checkpoints] == [1, 2]
    final_runs(base, out, checkpoints[-1][1])
    amount = float(smoke.final.amount)
    with_meta, baseline = (read(out / "final" / name / "results.json") for name in ("metanetwork", "baseline"))
    for result in (with_meta, baseline):
        assert result["run"] == "unstructured_pruning_final" and 0.0 <= result["pruned_acc"] <= 1.0
        assert result["sparsity"] == pytest.approx(amount, abs=0.01)
    assert Path(with_meta["metanetwork"]).resolve() == checkpoints[-1][1].resolve() and baseline["metanetwork"] is None
    check_report(out / "report")


def imagenet_row(row: str, cfg: DictConfig, model: str, out: Path) -> None:
    """``torchrun --nproc_per_node=2 main_imagenet/main_imagenet.py experiment=<row> run=pipeline debug=smoke`` on
    the CPU (gloo). Per rank: 4 images a batch; 16 training images in all, so that each rank's shard is the 2
    batches of debug=smoke's capped meta-training step (task.meta_train.max_batches_per_step). No pretrained weights offline: the data models start from random
    initialisation (task.pretrained=null)."""
    size = IMAGE_SIZE.get(model)
    run_dir = out / "pipeline"
    overrides = [f"experiment={row}", "debug=smoke", "run=pipeline", "device=cpu", "task.pretrained=null",
                 f"task.model={model}", "task.batch_size=4", "task.eval_batch_size=8", "task.meta_train.batch_size=4",
                 "++task.dataset.train_size=16", *synthetic(cfg.task, train=16, val=8, test=8, size=size),
                 f"paths.output_dir={out}", f"hydra.run.dir={run_dir}"]
    proc = run_torchrun(overrides, out, timeout=6 * 3600 if RUN_LARGE else 300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    chosen = check_meta_train_and_selection(run_dir)
    target = float(cfg.final.target_speed_up)
    steps = int(compose_cfg(overrides[:-2], primary="imagenet").task.pruning.iterative_steps)
    # a stand-in's few channels per layer (vit_tiny: 16 embedding dims in 2 heads) make each pruning step coarse
    overshoot = max_overshoot(target, steps) if model == cfg.task.model else STAND_IN_OVERSHOOT
    check_structured(run_dir / "final", target, overshoot, chosen)
    sharded = read(run_dir / "meta_train" / "results.json")["iterations_per_step"]  # the authors' ImageNet step
    assert (sharded["world_size"], sharded["steps_per_epoch"], sharded["iterations_per_step"]) == (2, 1, 2)
    check_report(run_dir / "report")


@pytest.mark.parametrize("row", [row for row in ROWS if is_imagenet(row_config(row))])
def test_imagenet_row_plumbing(row, tmp_path):
    """The ImageNet row's smoke with a small STAND-IN architecture (:data:`STAND_IN`; everything else is the row's:
    task recipes, method, metanetwork settings, target, torchrun with 2 ranks): the row's file, debug=smoke's
    settings for the authors' ImageNet meta-training step and the torchrun pipeline, checked on every run. It says
    nothing about the real architecture; test_row_end_to_end_under_debug_smoke[<row>] runs that one."""
    cfg = row_config(row)
    imagenet_row(row, cfg, STAND_IN[cfg.task.model], tmp_path)


TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
RECIPES = ("train", "after_init_pruning", "after_metanetwork", "after_pruning")


def recipes(task: DictConfig) -> dict:
    return {"train": task.train, **{stage: task.finetune[stage] for stage in RECIPES[1:]}}


@pytest.mark.parametrize("primary", ["main", "imagenet"])
def test_debug_configs_fit_every_task(primary):
    """debug=smoke / limit / overfit compose with every task and give settings the stages accept; the debug files
    cap meta-training's steps (task.meta_train.max_batches_per_step / max_steps_per_epoch) and leave the task's
    meta-training scheme (batches_per_step or the authors' ImageNet iterations_per_step) as it is."""
    for task in TASKS:
        plain = compose_cfg([f"task={task}"], primary=primary)
        smoke, limit, overfit = (compose_cfg([f"task={task}", f"debug={d}"], primary=primary)
                                 for d in ("smoke", "limit", "overfit"))
        for cfg in (smoke, limit, overfit):
            MetaTrainSettings.from_task(cfg.task)  # raises on a bad or contradictory task.meta_train
            for section in recipes(cfg.task).values():
                recipe(section)  # raises on a bad recipe key or value
        # smoke: 1 epoch of 2 batches per recipe, 2 meta-training epochs over 1 training data model, 2 data models
        assert {(r.epochs, r.max_batches_per_epoch) for r in recipes(smoke.task).values()} == {(1, 2)}, task
        meta = smoke.task.meta_train
        assert (meta.epochs, meta.train_split, smoke.pipeline.num_data_models) == (2, 0.5, 2), task
        assert (smoke.select.checkpoints, smoke.select.num_val_models, smoke.select.max_batches) == ("all", 1, 2)
        for key in ("iterations_per_step", "batches_per_step"):
            assert smoke.task.meta_train.get(key) == plain.task.meta_train.get(key), (task, key)
        assert (meta.max_batches_per_step, meta.max_steps_per_epoch) == (2, 1), task
        assert smoke.task.input_size == plain.task.input_size and smoke.task.model == plain.task.model
        assert smoke.final.target_speed_up == plain.final.target_speed_up
        # limit: the task's epoch counts, 20 batches each
        for stage, section in recipes(limit.task).items():
            expected = (recipes(plain.task)[stage].epochs, 20)
            assert (section.epochs, section.max_batches_per_epoch) == expected, (task, stage)
        assert limit.task.meta_train.epochs == plain.task.meta_train.epochs and limit.select.max_batches == 20
        assert limit.task.meta_train.get("iterations_per_step") == plain.task.meta_train.get("iterations_per_step")
        assert (limit.task.meta_train.max_batches_per_step, limit.task.meta_train.max_steps_per_epoch) == (20, 1)
        # overfit: 150 epochs at a constant lr, nothing that keeps the loss above 0, on 256 fixed images
        for section in recipes(overfit.task).values():
            assert (section.epochs, section.scheduler, section.label_smoothing, section.mixup_alpha,
                    section.cutmix_alpha, section.warmup_epochs) == (150, "constant", 0, 0, 0, 0)
        assert overfit.task.dataset.train_size == 256
        assert {smoke.name, limit.name, overfit.name} == {"smoke", "limit", "overfit"}


def test_debug_overfit_drives_the_training_loss_to_zero(tmp_path):
    """run=train debug=overfit on the offline default task (ResNet-20 on digits): the training loss of the 256
    images goes to about 0 within the 150 epochs."""
    execute(compose_cfg(["run=train", "debug=overfit", "device=cpu"]), tmp_path)
    with open(tmp_path / "train_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 150
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < 0.05 and last < 0.02 * first and float(rows[-1]["train_acc"]) == 1.0
