"""Final runs (pretrain_final, pruning_final, analyse) end to end on tiny digits models, and the experiment configs."""
import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from generate_dataset.models import build_model, load_model, model_from_state_dict, model_spec
from helpers import CONFIG_DIR, FINETUNE_STAGES, compose_cfg, recorded, save_tiny_metanetwork, tiny_cfg
from nn.apply import LayoutMismatchError
from pruning.depgraph import SpeedUpNotReachedError, count_macs
from stages import analyse, execute, final
from stages.analyse import effective_rank
from stages.artifacts import metanetwork_setting, resolve_metanetwork
from stages.common import FinalRunConfigError, task_data
from stages.final import UnreachableTargetError
from training.loop import evaluate
from utils.checkpoint import save_checkpoint

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def csv_files(run_dir):
    return sorted(p.name for p in Path(run_dir).glob("*_metrics.csv"))


@pytest.fixture(scope="module")
def metanetwork_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("final_mn")
    mn = save_tiny_metanetwork(root / "metanetwork.pt")
    cfg = tiny_cfg(["run=pruning_final", f"final.metanetwork={mn}", "seed=8"])
    summary, model = recorded(final.pruning_final, cfg, root / "run")
    return cfg, root / "run", summary, model, mn


def test_pruning_final_with_metanetwork_results(metanetwork_run):
    cfg, run_dir, summary, _model, mn = metanetwork_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results == json.loads(json.dumps(summary))
    assert results["run"] == "pruning_final" and results["seed"] == 8 and results["task"] == "resnet20_on_digits"
    assert results["metanetwork"] == str(Path(mn).resolve()) and results["metanetwork_epoch"] == 3
    assert results["protocol"] == "validation" and results["selection"] == "val"
    assert "validation" in results["protocol_note"]
    assert results["finetune_epochs"] == {"after_init_pruning": 1, "after_metanetwork": 1, "after_pruning": 1}
    # speed-up and params are TOTAL, relative to the unpruned architecture (not the init-pruned model)
    unpruned = build_model("resnet8", 10, in_channels=1)
    unpruned_macs = count_macs(unpruned, torch.ones(1, 1, 8, 8))
    assert results["macs"]["unpruned"] == unpruned_macs
    assert results["params"]["unpruned"] == sum(p.numel() for p in unpruned.parameters())
    assert results["speed_up"] >= cfg.final.target_speed_up == 2.0
    assert results["speed_up"] == pytest.approx(unpruned_macs / results["macs"]["pruned"])
    assert results["pruned_flops_percent"] == pytest.approx(100 * (1 - 1 / results["speed_up"]))
    stages = {s["stage"]: s for s in results["stages"]}
    assert cfg.task.initial_speed_up <= stages["init_pruned"]["speed_up"] < results["speed_up"]
    assert results["params"]["unpruned"] > stages["init_pruned"]["params"] > results["params"]["pruned"]
    # the metanetwork really changed the weights (res ratio 0.5 moves the outputs)
    assert stages["metanetwork"]["test_loss"] != stages["after_init_pruning_finetune"]["test_loss"]
    for key in ("base_acc", "pruned_acc", "base_val_acc", "pruned_val_acc"):
        assert 0.0 <= results[key] <= 1.0
    assert results["pruned_acc"] == results["pruned"]["test_acc"] == stages["final"]["test_acc"]
    assert csv_files(run_dir) == [f"finetune_{s}_metrics.csv" for s in FINETUNE_STAGES] + ["pretrain_metrics.csv"]


def test_pruned_model_reloads_with_identical_outputs(metanetwork_run):
    cfg, run_dir, summary, model, _mn = metanetwork_run
    loaded, checkpoint = load_model(run_dir / "pruned_model.pt")
    assert checkpoint["spec"] == summary["model"] and checkpoint["spec"]["widths"] != build_model(
        "resnet8", 10, in_channels=1).widths
    rebuilt = model_from_state_dict("resnet8", checkpoint["state_dict"], 10)
    x = torch.randn(16, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(loaded(x), expected) and torch.equal(rebuilt(x), expected)
    _splits, loaders = task_data(cfg.task, cfg.seed)
    assert evaluate(loaded, loaders.test, "cpu")["acc"] == summary["pruned_acc"]


def test_baseline_without_metanetwork_under_paper_protocol(tmp_path):
    # a pretrain_final model shared by the final run
    pre_cfg = tiny_cfg(["run=pretrain_final"])
    pre = execute(pre_cfg, tmp_path / "pretrain")
    assert pre["run"] == "pretrain_final"
    assert json.loads((tmp_path / "pretrain" / "results.json").read_text())["run"] == "pretrain_final"
    model_path = tmp_path / "pretrain" / "model.pt"
    cfg = tiny_cfg(["run=pruning_final", "protocol=paper", f"final.model={model_path}",
                       "final.target_speed_up=1.6"])
    results = execute(cfg, tmp_path / "run")
    assert results["metanetwork"] is None and results["source_model"] == str(model_path.resolve())
    assert results["protocol"] == "paper" and results["selection"] == "test"
    assert "paper protocol" in results["protocol_note"] and "TEST" in results["protocol_note"]
    # the reference skips the after-metanetwork fine-tune without a metanetwork
    assert results["finetune_epochs"]["after_metanetwork"] == 0
    assert "metanetwork" not in {s["stage"] for s in results["stages"]}
    assert not (tmp_path / "run" / "pretrain_metrics.csv").exists()  # started from final.model, trained nothing
    assert results["speed_up"] >= 1.6
    # base accuracy is that of the given (unpruned) model
    loaded, _ = load_model(model_path)
    _splits, loaders = task_data(cfg.task, cfg.seed)
    assert results["base_acc"] == evaluate(loaded, loaders.test, "cpu")["acc"]


def test_finetune_without_metanetwork_option(tmp_path):
    cfg = tiny_cfg(["run=pruning_final", "final.finetune_without_metanetwork=true",
                       "task.finetune.after_init_pruning.epochs=0", "task.train.epochs=0"])
    results = execute(cfg, tmp_path)
    assert results["finetune_epochs"] == {"after_init_pruning": 0, "after_metanetwork": 1, "after_pruning": 1}


def test_metanetwork_of_another_architecture_is_refused_before_training(tmp_path):
    mn = save_tiny_metanetwork(tmp_path / "vgg_mn.pt", architecture="vgg19", task="VGG19_on_CIFAR100")
    cfg = tiny_cfg(["run=pruning_final", f"final.metanetwork={mn}"])
    with pytest.raises(LayoutMismatchError) as info:
        execute(cfg, tmp_path / "run")
    message = str(info.value)
    assert "node_dim=5" in message and "node_dim=8" in message and str(mn) in message
    assert csv_files(tmp_path / "run") == []  # refused before any training


def test_unreachable_speed_up_fails_before_training_with_best_reached(tmp_path):
    cfg = tiny_cfg(["run=pruning_final", "final.target_speed_up=1000"])
    with pytest.raises(UnreachableTargetError) as info:
        execute(cfg, tmp_path)
    err = info.value
    assert isinstance(err, SpeedUpNotReachedError) and 1.0 < err.achieved < 1000
    assert f"{err.achieved:.4f}x" in str(err) and "final.target_speed_up=1000" in str(err)
    assert csv_files(tmp_path) == [] and not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("overrides, match", [
    (["final.target_speed_up=1.1"], "below task.initial_speed_up"),
    (["method=unstructured_l1_norm"], "run=unstructured_pruning_final"),
])
def test_bad_settings_are_clear_errors(tmp_path, overrides, match):
    with pytest.raises(FinalRunConfigError, match=match):
        execute(tiny_cfg(["run=pruning_final", *overrides]), tmp_path)


def test_model_of_another_task_is_refused(tmp_path):
    other = build_model("resnet20", 10, in_channels=1)
    path = save_checkpoint(tmp_path / "m.pt", other.state_dict(), model_spec("resnet20", other, 10))
    with pytest.raises(FinalRunConfigError, match="resnet20"):
        execute(tiny_cfg(["run=pruning_final", f"final.model={path}"]), tmp_path / "run")


def test_metanetwork_setting_resolves_select_dirs(tmp_path):
    mn = save_tiny_metanetwork(tmp_path / "select" / "checkpoints" / "epoch_3.pt")
    (tmp_path / "select" / "selection.json").write_text(json.dumps({"chosen": "checkpoints/epoch_3.pt"}))
    assert resolve_metanetwork(tmp_path / "select") == mn.resolve()
    assert resolve_metanetwork(mn) == mn.resolve() and resolve_metanetwork(None) is None
    with pytest.raises(FileNotFoundError, match="selection.json"):
        resolve_metanetwork(tmp_path)  # a folder that is no select run dir
    with pytest.raises(FileNotFoundError, match="no such file"):
        resolve_metanetwork(tmp_path / "missing.pt")


def test_analyse_writes_statistics_for_model_and_metanetwork_version(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", 10, in_channels=1)
    path = save_checkpoint(tmp_path / "model.pt", model.state_dict(), model_spec("resnet8", model, 10))
    mn = save_tiny_metanetwork(tmp_path / "mn.pt")
    cfg = tiny_cfg(["run=analyse", f"final.model={path}", f"final.metanetwork={mn}"])
    summary = execute(cfg, tmp_path / "run")
    run_dir = tmp_path / "run"
    assert (run_dir / "layer_statistics.png").stat().st_size > 0
    rows = list(csv.DictReader((run_dir / "layer_statistics.csv").open()))
    convs = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules())
    bns = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for label in ("model", "model + metanetwork"):
        mine = [r for r in rows if r["model"] == label]
        assert len(mine) == convs + bns
        assert {r["kind"] for r in mine} == {"conv", "linear", "bn"}
    first = next(r for r in rows if r["model"] == "model" and r["kind"] == "conv")
    assert float(first["weight_l2"]) == pytest.approx(float(model.conv1.weight.detach().norm()), rel=1e-6)
    changed = [r for r in rows if r["model"] == "model + metanetwork" and r["kind"] == "conv"]
    assert any(float(c["weight_l2"]) != float(o["weight_l2"]) for c, o in
               zip(changed, [r for r in rows if r["model"] == "model" and r["kind"] == "conv"]))
    assert set(summary["models"]) == {"model", "model + metanetwork"}
    assert 0.0 <= summary["models"]["model"]["test_acc"] <= 1.0


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose_cfg([f"experiment={experiment}"], hydra_cfg=True)
    assert cfg.name == experiment
    assert cfg.run in ("pruning_final", "unstructured_pruning_final")
    assert str(cfg.hydra.sweeper.params.seed) == "7,8,9"
    cfg = compose_cfg([f"experiment={experiment}"])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves (??? stays a marker)
    # the metanetwork must be given: forgetting it is one clear error, null is the baseline
    with pytest.raises(FileNotFoundError, match="final.metanetwork=<required.*or null for the baseline"):
        metanetwork_setting(cfg)
    assert metanetwork_setting(compose_cfg([f"experiment={experiment}", "final.metanetwork=null"])) is None
    if cfg.run == "pruning_final":
        assert cfg.method.kind == "structured"
        assert cfg.final.target_speed_up > cfg.task.initial_speed_up
    else:
        assert cfg.method.kind == "unstructured" and 0 < cfg.final.amount < 1


def test_paper_rows_have_the_paper_targets():
    targets = {e: compose_cfg([f"experiment={e}"]) for e in
               ("resnet56_cifar10_2.3x", "resnet56_cifar10_2.9x", "resnet56_cifar10_3.0x", "vgg19_cifar100_8.95x")}
    assert {e: (c.task.name, c.final.target_speed_up) for e, c in targets.items()} == {
        "resnet56_cifar10_2.3x": ("resnet56_on_CIFAR10", 2.3), "resnet56_cifar10_2.9x": ("resnet56_on_CIFAR10", 2.9),
        "resnet56_cifar10_3.0x": ("resnet56_on_CIFAR10", 3.0), "vgg19_cifar100_8.95x": ("VGG19_on_CIFAR100", 8.95)}
    # a CLI group override wins over the experiment's defaults (N:M instead of L1)
    assert compose_cfg(["experiment=resnet56_cifar10_unstructured_0.8", "method=nm_sparsity"]).method.name == \
        "nm_sparsity"


def test_effective_rank_bounds():
    assert effective_rank(torch.eye(4)) == pytest.approx(4.0)
    assert effective_rank(torch.outer(torch.arange(1.0, 4.0), torch.ones(5))) == pytest.approx(1.0)
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    with pytest.raises(FinalRunConfigError, match="final.model"):
        analyse.run(tiny_cfg(["run=analyse"]), Path("/nonexistent-run-dir"))


# ----------------------------------------------------------------------------------------------
# pre-pruning variants (control, DepGraph sparse learning), several targets, a shared init-pruned start
# ----------------------------------------------------------------------------------------------
PRE_STAGES = ("start", "init_pruned", "after_init_pruning_finetune")


def stage_names(results):
    return [s["stage"] for s in results["stages"]]


def stage(results, name):
    return next(s for s in results["stages"] if s["stage"] == name)


@pytest.fixture(scope="module")
def shared_start(tmp_path_factory):
    """pretrain_final with final.init_prune=true: model.pt and init_pruned_model.pt shared by the runs below."""
    root = tmp_path_factory.mktemp("shared_start")
    summary = execute(tiny_cfg(["run=pretrain_final", "final.init_prune=true"]), root)
    return root, summary


@pytest.fixture(scope="module")
def control_and_baseline(shared_start, tmp_path_factory):
    """From the same unpruned model.pt: the equal-budget control (2-epoch after_metanetwork fine-tune without a
    metanetwork) and the reference's baseline (no fine-tune before the final pruning)."""
    root = tmp_path_factory.mktemp("control")
    model = shared_start[0] / "model.pt"
    common = ["run=pruning_final", f"final.model={model}", "task.finetune.after_metanetwork.epochs=2"]
    control = execute(tiny_cfg(common + ["final.finetune_without_metanetwork=true"]), root / "control")
    baseline = execute(tiny_cfg(common), root / "baseline")
    return root, control, baseline


def test_control_runs_the_after_metanetwork_finetune_and_the_baseline_does_not(control_and_baseline):
    root, control, baseline = control_and_baseline
    on_disk = json.loads((root / "control" / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(control))
    assert control["pre_pruning"] == "finetune" and control["metanetwork"] is None
    assert control["sparse_learning"] is None
    assert control["finetune_epochs"] == {"after_init_pruning": 1, "after_metanetwork": 2, "after_pruning": 1}
    assert control["finetune"]["after_metanetwork"]["epochs"] == 2
    assert stage_names(control) == [*PRE_STAGES, "after_metanetwork_finetune", "pruned", "final"]
    rows = list(csv.DictReader((root / "control" / "finetune_after_metanetwork_metrics.csv").open()))
    assert len(rows) == 2
    # the fine-tune changed the model; the results name the stage before pruning
    assert stage(control, "after_metanetwork_finetune")["test_loss"] != stage(
        control, "after_init_pruning_finetune")["test_loss"]
    assert control["pre_pruning_acc"] == stage(control, "after_metanetwork_finetune")["test_acc"]

    assert baseline["pre_pruning"] == "none" and baseline["finetune_epochs"]["after_metanetwork"] == 0
    assert baseline["finetune"]["after_metanetwork"] is None
    assert stage_names(baseline) == [*PRE_STAGES, "pruned", "final"]
    assert not (root / "baseline" / "finetune_after_metanetwork_metrics.csv").exists()
    assert baseline["pre_pruning_acc"] == stage(baseline, "after_init_pruning_finetune")["test_acc"]
    # same seed, same start: everything before the pre-pruning stage is identical
    for name in PRE_STAGES:
        assert stage(control, name) == stage(baseline, name), name


def test_sparse_learning_pre_pruning(shared_start, control_and_baseline, tmp_path):
    _root, control, _baseline = control_and_baseline
    cfg = tiny_cfg(["run=pruning_final", f"final.model={shared_start[0] / 'model.pt'}",
                       "task.finetune.after_metanetwork.epochs=2", "final.sparse_learning.enabled=true",
                       "final.sparse_learning.reg=0.5", "final.sparse_learning.alpha=8"])
    results = execute(cfg, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["pre_pruning"] == "sparse_learning"
    assert results["pre_pruning"] == "sparse_learning" and results["metanetwork"] is None
    assert results["sparse_learning"] == {"reg": 0.5, "alpha": 8.0, "bias": False}
    # the metanetwork path's budget: the after_metanetwork recipe
    assert results["finetune_epochs"] == {"after_init_pruning": 1, "after_metanetwork": 2, "after_pruning": 1}
    assert stage_names(results) == [*PRE_STAGES, "after_sparse_learning", "pruned", "final"]
    assert len(list(csv.DictReader((tmp_path / "sparse_learning_metrics.csv").open()))) == 2
    assert not (tmp_path / "finetune_after_metanetwork_metrics.csv").exists()
    assert results["speed_up"] >= cfg.final.target_speed_up
    # same start and seed as the control; only the regulariser differs, and it changed the training
    for name in PRE_STAGES:
        assert stage(results, name) == stage(control, name), name
    assert stage(results, "after_sparse_learning")["test_loss"] != stage(control, "after_metanetwork_finetune")[
        "test_loss"]


def test_sparse_learning_with_a_metanetwork_is_refused_before_training(tmp_path):
    mn = save_tiny_metanetwork(tmp_path / "mn.pt")
    cfg = tiny_cfg(["run=pruning_final", f"final.metanetwork={mn}", "final.sparse_learning.enabled=true"])
    with pytest.raises(FinalRunConfigError, match="sparse_learning"):
        execute(cfg, tmp_path / "run")
    assert csv_files(tmp_path / "run") == [] and not (tmp_path / "run" / "results.json").exists()


def test_several_targets_share_one_prepared_model(shared_start, control_and_baseline, tmp_path):
    # the control's settings (its single target is 2.0) with two targets
    cfg = tiny_cfg(["run=pruning_final", f"final.model={shared_start[0] / 'model.pt'}",
                       "task.finetune.after_metanetwork.epochs=2", "final.finetune_without_metanetwork=true",
                       "final.target_speed_up=[1.5,2.0]"])
    execute(cfg, tmp_path)
    top = json.loads((tmp_path / "results.json").read_text())
    assert top["run"] == "pruning_final_targets" and top["pre_pruning"] == "finetune"
    assert top["targets"] == {"1.5": "target_1.5x", "2": "target_2x"}
    assert not (tmp_path / "pruned_model.pt").exists()
    assert not (tmp_path / "finetune_after_pruning_metrics.csv").exists()
    unpruned_macs = count_macs(build_model("resnet8", 10, in_channels=1), torch.ones(1, 1, 8, 8))
    per_target = {}
    for target, folder in ((1.5, "target_1.5x"), (2.0, "target_2x")):
        results = json.loads((tmp_path / folder / "results.json").read_text())
        per_target[target] = results
        assert results["run"] == "pruning_final" and results["target_speed_up"] == target
        assert results["speed_up"] >= target
        assert top["pruned_acc"][f"{target:g}"] == results["pruned_acc"]
        assert (tmp_path / folder / "finetune_after_pruning_metrics.csv").exists()
        model, _ = load_model(tmp_path / folder / "pruned_model.pt")
        assert unpruned_macs / count_macs(model, torch.ones(1, 1, 8, 8)) == pytest.approx(results["speed_up"])
    low, high = per_target[1.5], per_target[2.0]
    assert low["speed_up"] < high["speed_up"]
    # one preparation: every stage before the final pruning is the same record in both
    cut = stage_names(low).index("pruned")
    assert stage_names(low)[:cut] == [*PRE_STAGES, "after_metanetwork_finetune"]
    assert low["stages"][:cut] == high["stages"][:cut]
    assert stage_names(high).index("pruned") == cut
    assert low["pre_pruning_acc"] == high["pre_pruning_acc"] and low["base_acc"] == high["base_acc"]
    # each target is pruned from the prepared model itself (not from the previous target's pruned model): the
    # 2x target prunes exactly as the single-target control run (same start, seed and settings) did
    _root, control, _baseline = control_and_baseline
    assert control["target_speed_up"] == 2.0
    assert high["stages"][:cut + 1] == control["stages"][:cut + 1]
    assert high["speed_up"] == control["speed_up"] and high["params"] == control["params"]
    # the preparation ran once (one fine-tune CSV per stage, at the top level)
    assert csv_files(tmp_path) == ["finetune_after_init_pruning_metrics.csv",
                                   "finetune_after_metanetwork_metrics.csv"]


def test_pretrain_final_init_prune_gives_a_start_that_skips_init_pruning(shared_start, tmp_path):
    root, summary = shared_start
    cfg = tiny_cfg([])
    assert json.loads((root / "results.json").read_text())["init_pruned"] == json.loads(
        json.dumps(summary["init_pruned"]))
    info = summary["init_pruned"]
    assert info["checkpoint"] == "init_pruned_model.pt" and info["finetune_epochs"] == 1
    unpruned, _ = load_model(root / "model.pt")
    init_pruned, _ = load_model(root / "init_pruned_model.pt")
    example = torch.ones(1, 1, 8, 8)
    speed_up = count_macs(unpruned, example) / count_macs(init_pruned, example)
    assert unpruned.widths == build_model("resnet8", 10, in_channels=1).widths  # model.pt stays unpruned
    assert speed_up >= cfg.task.initial_speed_up and speed_up == pytest.approx(info["speed_up"])

    results = execute(tiny_cfg(["run=pruning_final", f"final.model={root / 'init_pruned_model.pt'}"]), tmp_path)
    assert results["finetune_epochs"]["after_init_pruning"] == 0 and results["finetune"]["after_init_pruning"] is None
    assert "init_pruned" not in stage_names(results)
    assert stage_names(results)[0] == "start" and stage_names(results)[1] == "pruned"
    assert stage(results, "start")["speed_up"] == pytest.approx(speed_up)
    assert "finetune_after_init_pruning_metrics.csv" not in csv_files(tmp_path)
    # the start is the saved init-pruned, fine-tuned model
    assert results["base_acc"] == info["metrics"]["test_acc"]
    assert results["speed_up"] >= cfg.final.target_speed_up


@pytest.mark.parametrize("target, match", [
    ("nan", "finite"), ("[1.5,nan]", "finite"), ("inf", "finite"), ("[]", "empty"), ("abc", "number"),
])
def test_bad_targets_are_config_errors(tmp_path, target, match):
    with pytest.raises(FinalRunConfigError, match=match):
        execute(tiny_cfg(["run=pruning_final", f"final.target_speed_up={target}"]), tmp_path)
    assert csv_files(tmp_path) == [] and not (tmp_path / "results.json").exists()
