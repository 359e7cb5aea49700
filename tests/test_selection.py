"""Checkpoint selection (run=select), curve caching (run=visualize) and the accuracy/speed-up curve helpers.

A tiny setting: ResNet-8 on the 8x8 digits, a two-model store (the second is the validation data model,
trained briefly) and fake meta_train dirs with two metanetworks: epoch 1 destroys the network (huge
residual ratio), epoch 2 is the identity (ratio 0). Selection must prefer epoch 2.
"""
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from data_loaders.store import ShardWriter
from generate_dataset.models import build_model, model_spec
from nn.graph import GraphCodec
from utils import curves
from utils import selection  # registers run=select and run=visualize
from utils.curves import accuracy_at, accuracy_speed_up_curve, area_under_curve, mean_curve, plot_curves
from utils.metanet_io import LayoutMismatchError, build_metanetwork, save_metanetwork
from utils.runs import execute
from utils.selection import SelectionError, chosen_checkpoint, list_checkpoints, parse_checkpoints
from utils.training import TrainConfig, evaluate, train

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
TASK = "resnet20_on_digits"
BASE_SPEED_UP = 1.25  # recorded speed-up of the validation data model (as if init-pruned)
METHOD = {"name": "group_l2_norm_max_normalizer", "kind": "structured", "importance": "group_magnitude", "p": 2,
          "group_reduction": "mean", "normalizer": "max", "global_pruning": True}


def compose_cfg(overrides):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("main", overrides=overrides, return_hydra_config=False)


def make_cfg(env, run="select", **select):
    overrides = [f"task={TASK}", "task.model=resnet8", f"run={run}", "device=cpu", f"store={env['store']}",
                 "select.finetune_epochs=1", "select.max_batches=3", "select.iterative_steps=20"]
    if "meta_train_dir" not in select:
        select["meta_train_dir"] = str(env["meta"])
    for key, value in select.items():
        overrides.append(f"select.{key}={'null' if value is None else value}")
    return compose_cfg(overrides)


class RaisingDataset(torch.utils.data.Dataset):
    """Stands in for the test split: any read fails the test."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        raise AssertionError("the test split was read during selection")


def _save_metanet(path, codec, ratio, seed, epoch):
    torch.manual_seed(seed)
    options = {"num_layer": 2, "hiddim": 8, "node_res_ratio": ratio, "edge_res_ratio": ratio}
    net = build_metanetwork(codec, options)
    save_metanetwork(path, net, codec, options, task=TASK, epoch=epoch)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Store (model 0 meta-trains, model 1 validates), data loaders and a meta_train dir with two checkpoints."""
    from utils.experiment import task_data

    root = tmp_path_factory.mktemp("selection")
    cfg = compose_cfg([f"task={TASK}", "task.model=resnet8"])
    splits, loaders = task_data(cfg.task, 0)
    writer = ShardWriter(root / "store", 0, {"task": TASK, "architecture": "resnet8", "num_classes": 10,
                                               "method": "group_l2_norm_max_normalizer"})
    torch.manual_seed(0)
    meta_model = build_model("resnet8", 10, in_channels=1).eval()
    writer.append(0, meta_model.state_dict(), model_spec("resnet8", meta_model, 10), {}, 1.0, 0, {})
    torch.manual_seed(1)
    model = build_model("resnet8", 10, in_channels=1)
    train(model, loaders, TrainConfig(epochs=3, lr=0.1, milestones=[2], select="last"), "cpu")
    model.eval()
    writer.append(1, model.state_dict(), model_spec("resnet8", model, 10), {}, BASE_SPEED_UP, 1, {})

    codec = GraphCodec(model)
    meta = root / "meta"
    _save_metanet(meta / "checkpoints" / "epoch_0001.pt", codec, ratio=50.0, seed=0, epoch=1)  # destroys
    _save_metanet(meta / "checkpoints" / "epoch_0002.pt", codec, ratio=0.0, seed=1, epoch=2)  # identity
    return {"root": root, "store": root / "store", "meta": meta, "model": model, "loaders": loaders,
            "splits": splits, "codec": codec, "val_acc": evaluate(model, loaders.val, "cpu")["acc"]}


@pytest.fixture(scope="module")
def select_dir(env):
    """One run=select over both checkpoints, with a test split that raises if it is ever read."""
    import utils.experiment as experiment

    real = experiment.task_data

    def task_data_without_test(task, seed, distributed=False):
        splits, loaders = real(task, seed, distributed)
        splits.test = RaisingDataset()
        loaders.test = torch.utils.data.DataLoader(RaisingDataset())
        return splits, loaders

    run_dir = env["root"] / "select_run"
    mp = pytest.MonkeyPatch()
    mp.setattr(experiment, "task_data", task_data_without_test)
    try:
        execute(make_cfg(env), run_dir)
    finally:
        mp.undo()
    return run_dir


# ----------------------------------------------------------------------------------------------
# run=select
# ----------------------------------------------------------------------------------------------
def test_select_prefers_the_identity_over_the_destructive_metanetwork(env, select_dir):
    chosen = json.loads((select_dir / "selection.json").read_text())
    assert chosen["epoch"] == 2 and chosen["split"] == "val" and chosen["score_kind"] == "auc"
    assert Path(chosen["chosen"]).is_absolute()
    assert chosen_checkpoint(select_dir) == (env["meta"] / "checkpoints" / "epoch_0002.pt").resolve()
    assert [r["epoch"] for r in chosen["ranking"]] == [2, 1]
    good, bad = chosen["ranking"][0]["score"], chosen["ranking"][1]["score"]
    assert good > bad + 0.2, (good, bad)
    ranking = json.loads((select_dir / "ranking.json").read_text())
    assert [r["epoch"] for r in ranking["ranking"]] == [2, 1]
    results = json.loads((select_dir / "results.json").read_text())
    assert results["epoch"] == 2 and results["curves_computed"] == 3 and results["curves_reused"] == 0
    assert results["validation_models"] == [1]  # the data model meta-training did not see
    assert (select_dir / "curves.png").stat().st_size > 1000


def test_select_curves_start_at_the_data_model_and_reach_max_speed_up(env, select_dir):
    cache = json.loads((select_dir / "curves.json").read_text())
    entries = {e["label"]: e for e in cache["entries"]}
    assert set(entries) == {"origin", "epoch_1", "epoch_2"}
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


# ----------------------------------------------------------------------------------------------
# run=visualize and the cache
# ----------------------------------------------------------------------------------------------
def _forbid_computation(monkeypatch):
    import utils.training

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although the cache covers the request")

    monkeypatch.setattr(curves, "accuracy_speed_up_curve", boom)
    monkeypatch.setattr(utils.training, "train", boom)


def test_visualize_replots_from_the_select_cache_without_recomputing(env, select_dir, tmp_path, monkeypatch):
    _forbid_computation(monkeypatch)
    # only the select run dir: the meta_train dir is read from its curves.json
    result = execute(make_cfg(env, run="visualize", cache=str(select_dir), meta_train_dir=None), tmp_path / "vis")
    assert result["curves_computed"] == 0 and result["curves_reused"] == 3
    assert (tmp_path / "vis" / "curves.png").stat().st_size > 1000
    selected = json.loads((select_dir / "selection.json").read_text())
    assert result["scores"]["epoch_2"] == pytest.approx(selected["score"])
    # a smaller max_speed_up is covered too (the cached curves are cut at the first point reaching it)
    cut = execute(make_cfg(env, run="visualize", cache=str(select_dir), max_speed_up=2.0,
                           checkpoints="[2]"), tmp_path / "vis2")
    assert cut["curves_computed"] == 0 and set(cut["scores"]) == {"origin", "epoch_2"}
    saved = json.loads((tmp_path / "vis2" / "curves.json").read_text())["entries"]
    full = next(e["points"] for e in saved if e["label"] == "epoch_2")
    assert full[-1][0] >= 3.0  # the cache keeps the longest curve, not the cut
    assert cut["scores"]["epoch_2"] == pytest.approx(area_under_curve(full, 2.0))
    cached = selection.CurveCache.load(tmp_path / "vis2" / "curves.json")
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
    # no fine-tune: both checkpoint curves are stale, the origin curve (never fine-tuned) is not
    result = execute(make_cfg(env, run="visualize", cache=str(select_dir), finetune_epochs=0), tmp_path / "a")
    assert result["curves_computed"] == 2 and result["curves_reused"] == 1
    assert sorted(calls) == ["epoch_1 model 1", "epoch_2 model 1"]

    # the same checkpoints copied elsewhere stay valid (content hashes), an overwritten one does not
    moved = tmp_path / "moved_meta"
    shutil.copytree(env["meta"], moved)
    _save_metanet(moved / "checkpoints" / "epoch_0001.pt", env["codec"], ratio=50.0, seed=7, epoch=1)
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


# ----------------------------------------------------------------------------------------------
# Checkpoint lists and clear errors
# ----------------------------------------------------------------------------------------------
def test_checkpoint_specs(env):
    available = list_checkpoints(env["meta"])
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


def test_chosen_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"selection.json does not exist.*run=select"):
        chosen_checkpoint(tmp_path)
    (tmp_path / "selection.json").write_text(json.dumps({"chosen": str(tmp_path / "gone.pt")}))
    with pytest.raises(FileNotFoundError, match="no longer exists"):
        chosen_checkpoint(tmp_path)


def test_unstructured_method_is_refused_before_any_work(env, tmp_path):
    cfg = make_cfg(env)
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.method = {"name": "unstructured_l1_norm", "kind": "unstructured", "importance": "l1"}
    with pytest.raises(SelectionError, match="unstructured_l1_norm is unstructured"):
        execute(cfg, tmp_path / "r")
