"""Checkpoint selection (run=select), curve caching (run=visualize) and the accuracy/speed-up curve helpers.

A tiny setting: ResNet-8 on the 8x8 digits, a two-model store (the second is the validation data model,
trained briefly) and fake meta_train dirs with two metanetworks: epoch 1 destroys the network (huge
residual ratio), epoch 2 is the identity (ratio 0). Selection must prefer epoch 2. The checkpoints record the
store and train indices ([0]) as run=meta_train does, so the held-out check passes.
"""
import json
import logging
import os
import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import to_rgba
from omegaconf import OmegaConf, open_dict

import nn.apply
from data_loaders.store import DataModelStore, ShardWriter
from generate_dataset.models import build_model, model_spec
from helpers import METHOD, compose_cfg, write_selection_store
from nn.apply import LayoutMismatchError, build_metanetwork, save_metanetwork
from nn.graph import GraphCodec
from pruning import curves
from pruning.curves import accuracy_at, accuracy_speed_up_curve, area_under_curve, mean_curve, plot_curves
from stages import common, ddp, execute, select
from stages.artifacts import checkpoints_by_epoch, chosen_checkpoint
from stages.common import SelectionError, task_data
from stages.curve_cache import CurveCache
from stages.select import parse_checkpoints
from training.config import TrainConfig
from training.loop import evaluate, train

TASK = "resnet20_on_digits"
BASE_SPEED_UP = 1.25  # recorded speed-up of the validation data model (as if init-pruned)


def make_cfg(env, run="select", **select):
    overrides = [f"task={TASK}", "task.model=resnet8", f"run={run}", "device=cpu", f"store={env['store']}",
                 "select.finetune_epochs=1", "select.max_batches=3", "select.iterative_steps=20"]
    if "meta_train_dir" not in select:
        select["meta_train_dir"] = str(env["meta"])
    select.setdefault("checkpoints", "all")  # the fixture's meta_train dir has epochs 1 and 2 only
    select.setdefault("max_accuracy_drop", None)  # the reference's pure curve score unless a test sets it
    for key, value in select.items():
        overrides.append(f"select.{key}={'null' if value is None else value}")
    return compose_cfg(overrides)


class RaisingDataset(torch.utils.data.Dataset):
    """Stands in for the test split: any read fails the test."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        raise AssertionError("the test split was read during selection")


def _save_metanet(path, codec, ratio, seed, epoch, **extra):
    torch.manual_seed(seed)
    options = {"num_layer": 2, "hiddim": 8, "node_res_ratio": ratio, "edge_res_ratio": ratio}
    net = build_metanetwork(codec, options)
    save_metanetwork(path, net, codec, options, task=TASK, epoch=epoch, **extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Store (model 0 meta-trains, model 1 validates), data loaders and a meta_train dir with two checkpoints."""
    root = tmp_path_factory.mktemp("selection")
    cfg = compose_cfg([f"task={TASK}", "task.model=resnet8"])
    splits, loaders = task_data(cfg.task, 0)
    model = write_selection_store(root / "store", TASK, "group_l2_norm_max_normalizer", loaders,
                                  TrainConfig(epochs=3, lr=0.1, milestones=[2], select="last"), BASE_SPEED_UP, 10, 1)

    codec = GraphCodec(model)
    meta = root / "meta"
    held_out = {"meta": {"task": TASK, "store": str(root / "store"), "train_indices": [0]}}  # as meta_train writes
    _save_metanet(meta / "checkpoints" / "epoch_0001.pt", codec, 50.0, 0, 1, **held_out)  # destroys the network
    _save_metanet(meta / "checkpoints" / "epoch_0002.pt", codec, 0.0, 1, 2, **held_out)  # the identity
    return {"root": root, "store": root / "store", "meta": meta, "model": model, "loaders": loaders,
            "splits": splits, "codec": codec, "val_acc": evaluate(model, loaders.val, "cpu")["acc"]}


@pytest.fixture(scope="module")
def select_dir(env):
    """One run=select over both checkpoints, with a test split that raises if it is ever read."""
    real = select.task_data

    def task_data_without_test(task, seed, distributed=False):
        splits, loaders = real(task, seed, distributed)
        splits.test = RaisingDataset()
        loaders.test = torch.utils.data.DataLoader(RaisingDataset())
        return splits, loaders

    class Collect(logging.Handler):
        def emit(self, record):
            env["select_warnings"].append(record.getMessage())

    run_dir = env["root"] / "select_run"
    env["select_warnings"] = []
    handler = Collect(level=logging.WARNING)
    logging.getLogger(select.__name__).addHandler(handler)
    mp = pytest.MonkeyPatch()
    mp.setattr(select, "task_data", task_data_without_test)
    try:
        execute(make_cfg(env), run_dir)
    finally:
        mp.undo()
        logging.getLogger(select.__name__).removeHandler(handler)
    return run_dir


# ----------------------------------------------------------------------------------------------
# run=select
# ----------------------------------------------------------------------------------------------
def test_select_prefers_the_identity_over_the_destructive_metanetwork(env, select_dir):
    chosen = json.loads((select_dir / "selection.json").read_text())
    assert chosen["epoch"] == 2 and chosen["split"] == "val" and chosen["score_kind"] == "auc"
    assert Path(chosen["chosen"]).is_absolute()
    assert chosen_checkpoint(select_dir) == (env["meta"] / "checkpoints" / "epoch_0002.pt").resolve()
    assert [r["epoch"] for r in chosen["ranking"]] == [2, 1]  # origin and control are references, not ranked
    good, bad = chosen["ranking"][0]["score"], chosen["ranking"][1]["score"]
    assert good > bad + 0.2, (good, bad)
    assert chosen["control_score"] is not None and chosen["origin_score"] is not None
    assert chosen["gain_over_control"] == pytest.approx(chosen["score"] - chosen["control_score"])
    ranking = json.loads((select_dir / "ranking.json").read_text())
    assert [r["epoch"] for r in ranking["ranking"]] == [2, 1]
    assert ranking["control_score"] == chosen["control_score"]
    assert ranking["gain_over_control"] == chosen["gain_over_control"]
    results = json.loads((select_dir / "results.json").read_text())
    assert results["epoch"] == 2 and results["curves_computed"] == 4 and results["curves_reused"] == 0
    assert results["control_score"] == chosen["control_score"]
    assert results["gain_over_control"] == chosen["gain_over_control"]
    assert results["validation_models"] == [1]  # the data model meta-training did not see
    assert (select_dir / "curves.png").stat().st_size > 1000


def test_select_curves_start_at_the_data_model_and_reach_max_speed_up(env, select_dir):
    cache = json.loads((select_dir / "curves.json").read_text())
    entries = {e["label"]: e for e in cache["entries"]}
    assert set(entries) == {"origin", "control", "epoch_1", "epoch_2"}
    origin = entries["origin"]
    assert origin["finetune"] is None  # the untouched data model, as the reference plots it
    # first point: the stored data model's own speed-up and its validation accuracy, unpruned
    assert origin["points"][0] == pytest.approx([BASE_SPEED_UP, env["val_acc"]])
    for entry in entries.values():
        xs = [x for x, _ in entry["points"]]
        assert xs[0] == pytest.approx(BASE_SPEED_UP)
        assert all(b >= a for a, b in zip(xs, xs[1:]))
        assert xs[-1] >= 3.0 > xs[-2]  # task.visualize.max_speed_up, stops at the first step reaching it
    assert entries["epoch_2"]["finetune"]["epochs"] == 1  # select.finetune_epochs shortened the recipe


def test_control_is_the_checkpoints_finetune_without_a_metanetwork(env, select_dir):
    entries = {e["label"]: e for e in json.loads((select_dir / "curves.json").read_text())["entries"]}
    control, identity = entries["control"], entries["epoch_2"]
    assert control["checkpoint"] is None and control["epoch"] is None
    assert control["settings"]["checkpoint"] is None and control["settings"]["curve"] == "control"
    # the same recipe as the checkpoints (unlike origin), and the cache tells it from origin
    assert control["settings"]["finetune"] == identity["settings"]["finetune"] is not None
    assert control["finetune"]["epochs"] == 1
    assert control["settings"] != entries["origin"]["settings"]
    # epoch 2's metanetwork is the identity: the same fine-tune (recipe, seed, loaders) gives the same curve
    def flat(points):
        return [value for point in points for value in point]

    assert flat(control["points"]) == pytest.approx(flat(identity["points"]))
    assert control["points"] != entries["origin"]["points"]  # it was fine-tuned, origin was not
    # so the best checkpoint (the identity) does not beat the control: run=select says so
    selected = json.loads((select_dir / "selection.json").read_text())
    assert selected["gain_over_control"] == pytest.approx(0.0)
    assert any("does not beat the control" in message for message in env["select_warnings"])
    assert not any("records no meta_train" in message for message in env["select_warnings"])  # meta checked


def test_control_runs_the_finetune_but_never_the_metanetwork(env, tmp_path, monkeypatch):
    applied, trained = [], []
    real_apply, real_train = nn.apply.apply_metanetwork, select.train

    def counting_apply(model, net, codec=None):
        applied.append(float(net.node_res_ratio))
        return real_apply(model, net, codec)

    def counting_train(*args, **kwargs):
        trained.append(kwargs.get("desc"))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(nn.apply, "apply_metanetwork", counting_apply)
    monkeypatch.setattr(select, "train", counting_train)
    quick = {"checkpoints": "[1]", "finetune_epochs": 0, "max_speed_up": 1.5, "cache": None}
    result = execute(make_cfg(env, run="visualize", **quick), tmp_path / "a")
    assert set(result["scores"]) == {"origin", "control", "epoch_1"} and result["curves_computed"] == 3
    assert applied == [50.0]  # only the checkpoint's curve applied a metanetwork
    assert sorted(trained) == ["control_model1", "epoch_1_model1"]  # origin is not fine-tuned
    # select.control=false: no control curve; the cached curves are reused
    result = execute(make_cfg(env, run="visualize", **(quick | {"cache": tmp_path / "a", "control": "false"})),
                     tmp_path / "b")
    assert set(result["scores"]) == {"origin", "epoch_1"} and result["curves_computed"] == 0


def test_max_accuracy_drop_ranks_a_wrecked_but_flat_checkpoint_last(env, select_dir, tmp_path, monkeypatch):
    # doctor the cached curves: epoch 1 flat at a low accuracy (easy to prune because it is wrecked: the
    # higher AUC), epoch 2 steep from the control's accuracy
    cache = json.loads((select_dir / "curves.json").read_text())
    control = next(e for e in cache["entries"] if e["label"] == "control")
    top = control["points"][0][1]
    for entry in cache["entries"]:
        if entry["label"] in ("epoch_1", "epoch_2"):
            xs = [x for x, _ in entry["points"]]
            accs = [0.6] * len(xs) if entry["label"] == "epoch_1" else [top] + [0.05] * (len(xs) - 1)
            entry["points"] = [[x, a] for x, a in zip(xs, accs)]
    doctored = tmp_path / "curves.json"
    doctored.write_text(json.dumps(cache))
    _forbid_computation(monkeypatch)

    plain = execute(make_cfg(env, cache=str(doctored)), tmp_path / "plain")
    assert plain["epoch"] == 1  # the pure curve score prefers the flat, wrecked checkpoint
    aware = execute(make_cfg(env, cache=str(doctored), max_accuracy_drop=0.02), tmp_path / "aware")
    assert aware["epoch"] == 2
    chosen = json.loads((tmp_path / "aware" / "selection.json").read_text())
    assert chosen["accuracy_floor"] == pytest.approx(top - 0.02)
    assert chosen["control_unpruned_acc"] == pytest.approx(top)
    assert [(r["epoch"], r["eligible"]) for r in chosen["ranking"]] == [(2, True), (1, False)]
    assert chosen["ranking"][1]["score"] > chosen["ranking"][0]["score"]  # ranked last despite the higher score
    assert chosen["ranking"][1]["unpruned_acc"] == pytest.approx(0.6)


def test_max_accuracy_drop_needs_the_control_and_a_valid_number(env, select_dir, tmp_path, monkeypatch):
    _forbid_computation(monkeypatch)
    with pytest.raises(SelectionError, match="max_accuracy_drop.*>= 0"):
        execute(make_cfg(env, cache=str(select_dir), max_accuracy_drop=-0.1), tmp_path / "a")
    with pytest.raises(SelectionError, match="select.control=true"):
        execute(make_cfg(env, cache=str(select_dir), max_accuracy_drop=0.02, control="false"), tmp_path / "b")


def _finetuned_cfg(env, **select):
    cfg = make_cfg(env, score="finetuned", finetune_epochs=1, **select)
    with open_dict(cfg):
        cfg.task.finetune.after_pruning.epochs = 1
        cfg.task.finetune.after_pruning.milestones = []
    return cfg


def test_finetuned_score_prunes_copies_to_each_target_and_finetunes_them(env, select_dir, tmp_path, monkeypatch):
    trained, pruned = [], []
    real_train, real_prune = select.train, common.prune_to_speed_up

    def counting_train(model, loaders, cfg, *args, **kwargs):
        assert loaders.test is None  # the score's fine-tunes cannot read the test split either
        trained.append((kwargs.get("desc"), cfg.epochs, cfg.select))
        return real_train(model, loaders, cfg, *args, **kwargs)

    def counting_prune(model, target, *args, **kwargs):
        achieved = real_prune(model, target, *args, **kwargs)
        pruned.append((target, achieved))
        return achieved

    monkeypatch.setattr(select, "train", counting_train)
    monkeypatch.setattr(ddp, "train", counting_train)  # the after-pruning fine-tunes (common.prune_and_finetune)
    monkeypatch.setattr(common, "prune_to_speed_up", counting_prune)
    result = execute(_finetuned_cfg(env, checkpoints="[2]", finetuned_targets="[1.5,2.0]"), tmp_path / "a")
    assert result["score_kind"] == "finetuned" and result["epoch"] == 2
    # origin is pruned and fine-tuned once per target (no fine-tune before); control and epoch 2 as well
    after = sorted(desc for desc, _epochs, _select in trained if desc.endswith("x"))
    assert after == sorted(f"{label}_model1_{t}x" for label in ("origin", "control", "epoch_2") for t in ("1.5", "2"))
    assert all(select_ == "last" for desc, _epochs, select_ in trained if desc.endswith("x"))  # score read on val
    assert len(pruned) == 6 and all(achieved >= target for target, achieved in pruned)
    ranking = json.loads((tmp_path / "a" / "ranking.json").read_text())
    chosen = ranking["ranking"][0]
    assert set(chosen["finetuned"]) == {"1.5", "2"}
    assert chosen["score"] == pytest.approx(sum(chosen["finetuned"].values()) / 2)
    assert all(0.0 <= acc <= 1.0 for acc in chosen["finetuned"].values())
    entries = {e["label"]: e for e in json.loads((tmp_path / "a" / "curves.json").read_text())["entries"]}
    assert entries["epoch_2"]["finetuned"]["2"]["speed_up"] >= 2.0
    # epoch 2 is the identity: the same fine-tunes give the control's score
    assert result["gain_over_control"] == pytest.approx(0.0, abs=1e-6)
    assert entries["epoch_2"]["points"]  # the curves are still drawn

    # the same request is served from the cache; curves cached for a curve score do not stand for it
    _forbid_computation(monkeypatch)
    again = execute(_finetuned_cfg(env, checkpoints="[2]", finetuned_targets="[1.5,2.0]", cache=tmp_path / "a"),
                    tmp_path / "b")
    assert again["curves_computed"] == 0 and again["score"] == pytest.approx(result["score"])
    with pytest.raises(AssertionError, match="recomputed"):
        execute(_finetuned_cfg(env, checkpoints="[2]", finetuned_targets="[1.5,2.0]", cache=str(select_dir)),
                tmp_path / "c")


def test_finetuned_score_errors(env, select_dir, tmp_path, monkeypatch):
    _forbid_computation(monkeypatch)
    with pytest.raises(SelectionError, match="finetuned_targets must be total speed-ups > 1"):
        execute(_finetuned_cfg(env, finetuned_targets="[1.0]"), tmp_path / "a")
    monkeypatch.setattr(select.distributed, "world_size", lambda: 2)
    with pytest.raises(SelectionError, match="single process only"):
        execute(_finetuned_cfg(env), tmp_path / "b")


# ----------------------------------------------------------------------------------------------
# run=visualize and the cache
# ----------------------------------------------------------------------------------------------
def _forbid_computation(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("recomputed although the cache covers the request")

    monkeypatch.setattr(curves, "accuracy_speed_up_curve", boom)
    monkeypatch.setattr(select, "train", boom)
    monkeypatch.setattr(ddp, "train", boom)  # the finetuned score's fine-tunes (common.prune_and_finetune)


def test_visualize_replots_from_the_select_cache_without_recomputing(env, select_dir, tmp_path, monkeypatch):
    _forbid_computation(monkeypatch)
    # only the select run dir: the meta_train dir is read from its curves.json
    result = execute(make_cfg(env, run="visualize", cache=str(select_dir), meta_train_dir=None), tmp_path / "vis")
    assert result["curves_computed"] == 0 and result["curves_reused"] == 4
    assert (tmp_path / "vis" / "curves.png").stat().st_size > 1000
    selected = json.loads((select_dir / "selection.json").read_text())
    assert result["scores"]["epoch_2"] == pytest.approx(selected["score"])
    # a smaller max_speed_up is covered too (the cached curves are cut at the first point reaching it)
    cut = execute(make_cfg(env, run="visualize", cache=str(select_dir), max_speed_up=2.0,
                           checkpoints="[2]"), tmp_path / "vis2")
    assert cut["curves_computed"] == 0 and set(cut["scores"]) == {"origin", "control", "epoch_2"}
    saved = json.loads((tmp_path / "vis2" / "curves.json").read_text())["entries"]
    full = next(e["points"] for e in saved if e["label"] == "epoch_2")
    assert full[-1][0] >= 3.0  # the cache keeps the longest curve, not the cut
    assert cut["scores"]["epoch_2"] == pytest.approx(area_under_curve(full, 2.0))
    cached = CurveCache.load(tmp_path / "vis2" / "curves.json")
    entry, points = cached.find(next(e["settings"] for e in saved if e["label"] == "epoch_2"), 2.0)
    assert points[-1][0] >= 2.0 > points[-2][0] and points == full[:len(points)]
    assert cached.find(entry["settings"], 3.5) is None  # a longer curve than cached must be computed


def test_visualize_recomputes_only_what_changed(env, select_dir, tmp_path, monkeypatch):
    calls = []
    real = curves.accuracy_speed_up_curve

    def counting(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        return real(*args, **kwargs)

    monkeypatch.setattr(curves, "accuracy_speed_up_curve", counting)
    # no fine-tune: both checkpoint curves and the control are stale, the origin curve (never fine-tuned) is not
    result = execute(make_cfg(env, run="visualize", cache=str(select_dir), finetune_epochs=0), tmp_path / "a")
    assert result["curves_computed"] == 3 and result["curves_reused"] == 1
    assert sorted(calls) == ["control model 1", "epoch_1 model 1", "epoch_2 model 1"]

    # the same checkpoints copied elsewhere stay valid (content hashes), an overwritten one does not
    moved = tmp_path / "moved_meta"
    shutil.copytree(env["meta"], moved)
    _save_metanet(moved / "checkpoints" / "epoch_0001.pt", env["codec"], ratio=50.0, seed=7, epoch=1,
                  meta={"store": str(env["store"]), "train_indices": [0]})
    calls.clear()
    result = execute(make_cfg(env, run="visualize", cache=str(select_dir), meta_train_dir=str(moved)),
                     tmp_path / "b")
    assert result["curves_computed"] == 1 and calls == ["epoch_1 model 1"]


# ----------------------------------------------------------------------------------------------
# The curve
# ----------------------------------------------------------------------------------------------
def test_curve_starts_unpruned_is_monotone_and_stops_at_max_speed_up(env):
    model = env["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    example = torch.ones(1, 1, 8, 8)
    points = accuracy_speed_up_curve(model, env["loaders"].val, "cpu", METHOD, example, max_speed_up=2.0,
                                     base_speed_up=1.5, iterative_steps=20, progress=False)
    assert points[0] == pytest.approx((1.5, env["val_acc"]))
    xs = [x for x, _ in points]
    assert all(b >= a for a, b in zip(xs, xs[1:])) and xs[-1] > xs[0]
    assert xs[-1] >= 2.0 > xs[-2]
    assert all(0.0 <= a <= 1.0 for _, a in points)
    # the model itself is not pruned (the curve works on a copy)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_curve_stops_when_the_pruning_steps_run_out(env, caplog):
    with caplog.at_level(logging.WARNING):
        points = accuracy_speed_up_curve(env["model"], env["loaders"].val, "cpu", METHOD, torch.ones(1, 1, 8, 8),
                                         max_speed_up=1000.0, iterative_steps=3, max_batches=1, progress=False)
    assert len(points) == 4 and points[-1][0] < 1000.0
    assert "not reached" in caplog.text


def test_curve_already_at_max_speed_up_is_one_point(env):
    points = accuracy_speed_up_curve(env["model"], env["loaders"].val, "cpu", METHOD, torch.ones(1, 1, 8, 8),
                                     max_speed_up=2.0, base_speed_up=2.5, progress=False)
    assert points == [pytest.approx((2.5, env["val_acc"]))]


# ----------------------------------------------------------------------------------------------
# Scores and plot on hand-made curves
# ----------------------------------------------------------------------------------------------
CURVE = [(1.0, 0.9), (1.5, 0.8), (2.0, 0.6), (3.5, 0.2)]


def test_accuracy_at_reads_the_least_pruned_point_reaching_the_target():
    assert accuracy_at(CURVE, 0.5) == 0.9  # below the curve: no pruning needed
    assert accuracy_at(CURVE, 1.0) == 0.9
    assert accuracy_at(CURVE, 1.2) == 0.8
    assert accuracy_at(CURVE, 1.5) == 0.8
    assert accuracy_at(CURVE, 3.0) == 0.2
    assert accuracy_at(CURVE[:3], 3.0) == 0.6  # beyond the last point: its accuracy


def test_area_under_curve_step_and_trapezoid():
    # step: 0.5*0.8 + 0.5*0.6 + 1.0*0.2 over [1, 3]
    assert area_under_curve(CURVE, 3.0) == pytest.approx(0.9 / 2)
    # trapezoid: 0.5*0.85 + 0.5*0.7 + 1.0*(0.6 + (0.6 - 0.4/1.5))/2 over [1, 3]
    last = (0.6 + (0.6 - 0.4 / 1.5)) / 2  # mean of the line from (2, 0.6) to its value at the cut x=3
    assert area_under_curve(CURVE, 3.0, kind="trapezoid") == pytest.approx((0.425 + 0.35 + last) / 2)
    # a curve that ends early is extended flat at its last value
    assert area_under_curve([(1.0, 0.9), (2.0, 0.5)], 3.0) == pytest.approx(0.5)
    assert area_under_curve([(1.0, 0.9), (2.0, 0.5)], 3.0, kind="trapezoid") == pytest.approx(0.6)
    assert area_under_curve([(1.3, 0.7)], 3.0) == pytest.approx(0.7)
    assert area_under_curve(CURVE, 1.0) == 0.9  # empty interval: the first accuracy
    # a better curve scores higher, whatever the kind
    better = [(x, min(1.0, a + 0.05)) for x, a in CURVE]
    for kind in ("step", "trapezoid"):
        assert area_under_curve(better, 3.0, kind=kind) > area_under_curve(CURVE, 3.0, kind=kind)
    with pytest.raises(ValueError, match="non-decreasing"):
        area_under_curve([(2.0, 0.5), (1.0, 0.9)], 3.0)
    with pytest.raises(ValueError, match="empty"):
        accuracy_at([], 2.0)
    with pytest.raises(ValueError, match="unknown area kind"):
        area_under_curve(CURVE, 3.0, kind="simpson")


def test_mean_curve_and_plot(tmp_path):
    other = [(1.2, 0.7), (2.5, 0.3)]
    mean = mean_curve([CURVE, other])
    assert [x for x, _ in mean] == [1.0, 1.2, 1.5, 2.0, 2.5, 3.5]
    assert mean[2] == pytest.approx((1.5, (0.8 + 0.3) / 2))
    assert mean_curve([CURVE]) == CURVE
    path = plot_curves({"a": CURVE, "b": other}, tmp_path / "plot.png", 3.0, ylim=[0.0, 1.0], title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="ylim"):
        plot_curves({"a": CURVE}, tmp_path / "bad.png", 3.0, ylim=[1.0, 0.0])


def _plotted_lines(monkeypatch, *args, **kwargs):
    """Call plot_curves and return ``{label: Line2D}`` of the figure it drew (caught before it is closed)."""
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), real_close(fig)))
    plot_curves(*args, **kwargs)
    return {line.get_label(): line for line in figures[-1].axes[0].get_lines()}


def test_plot_gives_every_curve_its_own_colour(tmp_path, monkeypatch):
    # 12 curves: more than matplotlib's 10-colour default cycle
    data = {"origin": CURVE, "control": CURVE} | {f"epoch_{k}": CURVE for k in range(1, 11)}
    lines = _plotted_lines(monkeypatch, data, tmp_path / "many.png", 3.0)
    assert list(lines) == list(data)
    colours = [to_rgba(line.get_color()) for line in lines.values()]
    assert len(set(colours)) == 12, colours
    assert lines["origin"].get_linestyle() == "--" and to_rgba(lines["origin"].get_color()) == to_rgba("0.5")
    assert to_rgba(lines["control"].get_color()) == to_rgba("black")
    assert lines["control"].get_linewidth() > max(lines[f"epoch_{k}"].get_linewidth() for k in range(1, 11))
    # explicit styles (what run=select passes for its "label (auc ...)" legend entries) override the defaults
    styles = curves.curve_styles(["origin", "epoch_1", "epoch_2"])
    lines = _plotted_lines(monkeypatch, {"ref": CURVE, "a": CURVE, "b": CURVE}, tmp_path / "styled.png", 3.0,
                           styles={"ref": styles["origin"], "a": styles["epoch_1"], "b": styles["epoch_2"]})
    assert lines["ref"].get_linestyle() == "--"
    assert to_rgba(lines["a"].get_color()) == to_rgba(styles["epoch_1"]["color"]) != to_rgba(lines["b"].get_color())


# ----------------------------------------------------------------------------------------------
# Checkpoint lists and clear errors
# ----------------------------------------------------------------------------------------------
def test_checkpoint_specs(env):
    available = checkpoints_by_epoch(env["meta"])
    assert list(available) == [1, 2]
    assert [k for k, _ in parse_checkpoints("all", available)] == [1, 2]
    assert [k for k, _ in parse_checkpoints("1:2", available)] == [1, 2]
    assert [k for k, _ in parse_checkpoints("2:", available)] == [2]
    assert [k for k, _ in parse_checkpoints("::2", available)] == [1]
    assert [k for k, _ in parse_checkpoints([2, 1], available)] == [1, 2]
    assert [k for k, _ in parse_checkpoints(OmegaConf.create([2]), available)] == [2]
    with pytest.raises(FileNotFoundError, match=r"epoch 3 .*available epochs: \[1, 2\]"):
        parse_checkpoints([3], available)
    with pytest.raises(SelectionError, match="matches none"):
        parse_checkpoints("5:9", available)


def test_missing_meta_train_dir_and_checkpoints_are_clear_errors(env, tmp_path):
    with pytest.raises(SelectionError, match="select.meta_train_dir is not set"):
        execute(make_cfg(env, meta_train_dir=None), tmp_path / "r1")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        execute(make_cfg(env, meta_train_dir=str(tmp_path / "nowhere")), tmp_path / "r2")
    (tmp_path / "empty").mkdir()
    empty = tmp_path / "empty" / "checkpoints"
    with pytest.raises(FileNotFoundError, match=rf"no metanetwork checkpoints .* in {re.escape(str(empty))}"):
        execute(make_cfg(env, meta_train_dir=str(tmp_path / "empty")), tmp_path / "r3")
    with pytest.raises(SelectionError, match="select.score='best'"):
        execute(make_cfg(env, score="best"), tmp_path / "r4")
    with pytest.raises(SelectionError, match="needs select.meta_train_dir"):
        execute(make_cfg(env, run="visualize", meta_train_dir=None), tmp_path / "r5")


def test_store_without_validation_models_is_a_clear_error(env, tmp_path):
    model = env["model"]
    writer = ShardWriter(tmp_path / "store1", 0, {"task": TASK, "architecture": "resnet8", "num_classes": 10,
                                                    "method": "group_l2_norm_max_normalizer"})
    writer.append(0, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, 0, {})
    cfg = make_cfg(env)
    with open_dict(cfg):
        cfg.store = str(tmp_path / "store1")
    with pytest.raises(SelectionError, match=r"holds 1 data model\(s\) .* leaves none for validation"):
        execute(cfg, tmp_path / "run")


def test_checkpoint_of_another_layout_names_the_checkpoint(env, tmp_path):
    vgg = build_model("vgg19", 10, widths=[4] * 16, in_channels=1)
    path = tmp_path / "meta" / "checkpoints" / "epoch_0001.pt"
    _save_metanet(path, GraphCodec(vgg), ratio=0.0, seed=0, epoch=1)
    with pytest.raises(LayoutMismatchError, match=rf"{re.escape(str(path))}.*node_dim=5.*node_dim=8"):
        execute(make_cfg(env, meta_train_dir=str(tmp_path / "meta")), tmp_path / "run")


def _checkpoint_meta_dir(env, tmp_path, **meta):
    path = tmp_path / "meta" / "checkpoints" / "epoch_0001.pt"
    _save_metanet(path, env["codec"], ratio=0.0, seed=0, epoch=1, meta=meta)
    return tmp_path / "meta"


def test_select_refuses_data_models_the_checkpoint_was_meta_trained_on(env, tmp_path):
    store = env["store"].resolve()
    # another store: its validation split says nothing about what the checkpoint saw; both stores named
    other = _checkpoint_meta_dir(env, tmp_path / "a", store=str(tmp_path / "other_store"), train_indices=[0])
    named = rf"{re.escape(str((tmp_path / 'other_store').resolve()))}.*store={re.escape(str(store))}"
    with pytest.raises(SelectionError, match=named):
        execute(make_cfg(env, meta_train_dir=str(other)), tmp_path / "r1")
    # the same store, but the validation data model 1 was among the training data models
    overlap = _checkpoint_meta_dir(env, tmp_path / "b", store=str(env["store"]), train_indices=[0, 1])
    with pytest.raises(SelectionError, match=r"validation data models \[1\] .* meta-trained on"):
        execute(make_cfg(env, meta_train_dir=str(overlap)), tmp_path / "r2")


def test_held_out_check_warns_without_a_record_and_for_visualize(env, caplog):
    store = DataModelStore(env["store"])
    path = Path("epoch_0001.pt")
    with caplog.at_level(logging.WARNING):
        assert select.check_held_out(path, {"spec": {}}, store, [1])  # an old checkpoint: warn, go on
    assert "records no meta_train store/train_indices" in caplog.text
    # a relative spelling of the same store is the same store
    relative = Path(os.path.relpath(env["store"]))
    assert select.check_held_out(path, {"meta": {"store": str(relative), "train_indices": [0]}}, store, [1])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not select.check_held_out(path, {"meta": {"store": str(env["store"]), "train_indices": [1]}},
                                            store, [1], strict=False)
    assert "run=select refuses" in caplog.text


def test_chosen_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"selection.json does not exist.*run=select"):
        chosen_checkpoint(tmp_path)
    (tmp_path / "selection.json").write_text(json.dumps({"chosen": str(tmp_path / "gone.pt")}))
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        chosen_checkpoint(tmp_path)


def test_unstructured_method_is_refused_before_any_work(env, tmp_path):
    cfg = make_cfg(env)
    with open_dict(cfg):
        cfg.method = {"name": "unstructured_l1_norm", "kind": "unstructured", "importance": "l1"}
    with pytest.raises(SelectionError, match="unstructured_l1_norm is unstructured"):
        execute(cfg, tmp_path / "r")
