"""`python main/main.py` (the whole pipeline on the offline default task), shortened, end to end on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_loaders.image_datasets import build_datasets, build_loaders
from generate_dataset.models import load_model
from helpers import REPO, compose_cfg
from stages import pipeline
from training.loop import evaluate

# Same stages and code paths as the default command, with fewer epochs so CI stays fast.
SHORT = [
    "pipeline.num_data_models=3", "task.train.epochs=3", "task.finetune.after_init_pruning.epochs=1",
    "task.finetune.after_metanetwork.epochs=1", "task.finetune.after_pruning.epochs=2",
    "task.meta_train.epochs=2", "select.checkpoints=all",
]


@pytest.mark.slow
def test_default_pipeline_end_to_end_and_resume(tmp_path):
    run_dir = tmp_path / "pipeline"
    cmd = [sys.executable, str(REPO / "main" / "main.py"), *SHORT, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # the result table is printed and saved, the curve plot is saved
    assert "| Method | Base | Pruned |" in proc.stdout
    assert (run_dir / "report" / "report.md").exists() and (run_dir / "curves.png").stat().st_size > 0
    # stages connect by path: the final run used the checkpoint that selection chose
    selection = json.loads((run_dir / "select" / "selection.json").read_text())
    assert selection["split"] == "val"
    with_meta = json.loads((run_dir / "final" / "metanetwork" / "results.json").read_text())
    baseline = json.loads((run_dir / "final" / "baseline" / "results.json").read_text())
    assert Path(with_meta["metanetwork"]).resolve() == Path(selection["chosen"]).resolve()
    assert baseline["metanetwork"] is None
    for result in (with_meta, baseline):
        assert result["speed_up"] >= result["target_speed_up"] == 2.0
        assert result["protocol"] == "validation"

    # the saved pruned model reloads and computes exactly what the run measured
    model, checkpoint = load_model(run_dir / "final" / "metanetwork" / "pruned_model.pt")
    assert checkpoint["spec"]["widths"] != [16] * 7 + [32] * 6 + [64] * 6  # actually pruned
    splits = build_datasets("digits", root=str(tmp_path), val_size=0.15, split_seed=0)
    loaders = build_loaders(splits, batch_size=64, eval_batch_size=500)
    metrics = evaluate(model, loaders.test, torch.device("cpu"))
    assert metrics["acc"] == pytest.approx(with_meta["pruned"]["test_acc"], abs=1e-12)
    assert metrics["loss"] == pytest.approx(with_meta["pruned"]["test_loss"], rel=1e-5)

    # re-running the same command resumes: every stage is found finished and skipped
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished") >= 5

    # re-running with other settings in the same run dir is refused before any work, naming what changed
    changed = subprocess.run([*cmd, "final.target_speed_up=2.5"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert changed.returncode != 0
    assert "final.target_speed_up: 2.0 -> 2.5" in changed.stderr and "StaleStageError" in changed.stderr


def _finished_stage(stage_dir, cfg):
    stage_dir.mkdir(parents=True)
    (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (stage_dir / "results.json").write_text(json.dumps({"run": str(cfg.run), "marker": 1}))


def test_a_stage_finished_with_other_settings_is_refused_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "run_recorded", lambda *a, **k: pytest.fail("a finished stage was re-run"))
    cfg = compose_cfg(["task=resnet20_on_digits"])
    stage = pipeline.stage_config(cfg, "pruning_final", **{"final.model": "m.pt"})
    _finished_stage(tmp_path / "final", stage)

    # same settings: skipped, its summary read back
    assert pipeline.run_stage("final", "pruning_final", cfg, tmp_path / "final", **{"final.model": "m.pt"})["marker"] == 1
    # a setting the run reads: refused, naming the key, the old and the new value
    with pytest.raises(pipeline.StaleStageError, match=r"final\.model: 'm\.pt' -> 'other\.pt'"):
        pipeline.run_stage("final", "pruning_final", cfg, tmp_path / "final", **{"final.model": "other.pt"})
    with pytest.raises(pipeline.StaleStageError, match=r"task\.finetune\.after_pruning\.epochs"):
        pipeline.run_stage("final", "pruning_final", cfg, tmp_path / "final",
                           **{"final.model": "m.pt", "task.finetune.after_pruning.epochs": 99})
    # settings the run never reads, result-neutral keys and keys a newer version added are not differences
    same = {"final.model": "m.pt", "task.meta_train.pruner_reg": 0.5, "select.cache": "/elsewhere",
            "final.brand_new_key": 3, "metanetwork.hiddim": 64}
    assert pipeline.run_stage("final", "pruning_final", cfg, tmp_path / "final", **same)["marker"] == 1


def test_a_final_run_of_another_chosen_checkpoint_is_refused(tmp_path, monkeypatch):
    # final.metanetwork names a select run dir: the same setting, whichever checkpoint it chooses; the finished
    # run records the checkpoint it applied, and a selection that now chooses another one makes it stale
    monkeypatch.setattr(pipeline, "run_recorded", lambda *a, **k: pytest.fail("a finished stage was re-run"))
    checkpoints = tmp_path / "meta_train" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for epoch in (5, 14):
        (checkpoints / f"epoch_{epoch:04d}.pt").write_bytes(b"")
    select_dir = tmp_path / "select"
    select_dir.mkdir()

    def choose(epoch):
        (select_dir / "selection.json").write_text(json.dumps({"chosen": str(checkpoints / f"epoch_{epoch:04d}.pt")}))

    cfg = compose_cfg(["task=resnet20_on_digits"])
    updates = {"final.model": "m.pt", "final.metanetwork": str(select_dir), "final.target_speed_up": [2.0, 3.0]}
    stage_dir = tmp_path / "final"
    _finished_stage(stage_dir, pipeline.stage_config(cfg, "pruning_final", **updates))
    for target in ("2x", "3x"):
        (stage_dir / f"target_{target}").mkdir()
        (stage_dir / f"target_{target}" / "results.json").write_text(
            json.dumps({"metanetwork": str(checkpoints / "epoch_0005.pt")}))
    choose(5)
    assert pipeline.run_stage("final", "pruning_final", cfg, stage_dir, **updates)["marker"] == 1
    choose(14)
    with pytest.raises(pipeline.StaleStageError, match=r"chose checkpoint .*epoch_0005\.pt -> .*epoch_0014\.pt"):
        pipeline.run_stage("final", "pruning_final", cfg, stage_dir, **updates)
    # a baseline (no metanetwork) is not affected
    baseline = {"final.model": "m.pt"}
    _finished_stage(tmp_path / "baseline", pipeline.stage_config(cfg, "pruning_final", **baseline))
    assert pipeline.run_stage("baseline", "pruning_final", cfg, tmp_path / "baseline", **baseline)["marker"] == 1


def test_pipeline_settings_fail_fast(tmp_path):
    base = ["task=resnet20_on_digits", "run=pipeline"]
    for override, message in [("pipeline.num_data_models=1", "at least 2 data models"),
                              ("final.target_speed_up=nan", "final.target_speed_up"),
                              ("task.initial_speed_up=0.5", "task.initial_speed_up"),
                              ("+task.meta_train.pruner_rg=1", "pruner_rg")]:
        with pytest.raises((ValueError, KeyError), match=message):
            pipeline.run(compose_cfg([*base, override]), tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before the first stage


def test_restart_changed_recomputes_from_the_changed_stage_on(tmp_path, monkeypatch):
    ran = []

    def fake_run(run, stage, stage_dir):
        ran.append(stage_dir.name)
        return {"marker": 2}

    monkeypatch.setattr(pipeline, "run_recorded", fake_run)
    cfg = compose_cfg(["task=resnet20_on_digits"])
    _finished_stage(tmp_path / "pretrain", pipeline.stage_config(cfg, "pretrain_final"))
    _finished_stage(tmp_path / "final" / "baseline", pipeline.stage_config(cfg, "pruning_final"))
    changed = compose_cfg(["task=resnet20_on_digits", "task.train.epochs=3"])

    restart = pipeline.Restart(True, tmp_path)
    assert pipeline.run_stage("pretrain", "pretrain_final", changed, tmp_path / "pretrain", restart)["marker"] == 2
    # unchanged settings, but its input was recomputed: recomputed too
    assert pipeline.run_stage("baseline", "pruning_final", changed, tmp_path / "final" / "baseline",
                              restart)["marker"] == 2
    assert ran == ["pretrain", "baseline"]
    aside = restart.aside
    assert (aside / "pretrain" / "results.json").exists() and (aside / "final" / "baseline" / "results.json").exists()
    assert not (tmp_path / "final" / "baseline").exists()  # nothing superseded stays where reports look
    # without the flag the same change is refused
    _finished_stage(tmp_path / "pretrain", pipeline.stage_config(cfg, "pretrain_final"))
    with pytest.raises(pipeline.StaleStageError, match="restart_changed"):
        pipeline.run_stage("pretrain", "pretrain_final", changed, tmp_path / "pretrain", pipeline.Restart(False, tmp_path))


@pytest.mark.parametrize("overrides, key", [
    (["pipeline.restart_changed=yes"], "pipeline.restart_changed"),
    (["pipeline.restart_changed=no"], "pipeline.restart_changed"),
    (["method.hard_cap=maybe"], "method.hard_cap"),
    (["method.max_pruning_ratio=1.5"], "method.max_pruning_ratio"),
    (["select.score=foo"], "select.score"),
    (["select.max_accuracy_drop=-1"], "select.max_accuracy_drop"),
    (["select.max_accuracy_drop=0.02", "select.control=false"], "select.max_accuracy_drop"),
    (["select.finetuned_targets=[0.5]"], "select.finetuned_targets"),
    (["task.meta_train.epochs=1"], "select.checkpoints"),  # the task's select.checkpoints 2::2: no epoch 2
    (["task.meta_train.epochs=2", "select.checkpoints=[1,3]"], "select.checkpoints"),
])
def test_every_bad_setting_is_refused_before_the_first_stage(tmp_path, monkeypatch, overrides, key):
    monkeypatch.setattr(pipeline, "run_recorded", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises((ValueError, KeyError), match=key.replace(".", r"\.")):
        pipeline.run(compose_cfg(["task=resnet20_on_digits", *overrides]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_shipped_settings_pass_the_up_front_check():
    pipeline.check_settings(compose_cfg(["task=resnet20_on_digits", "pipeline.restart_changed=true"]))
    pipeline.check_settings(compose_cfg(["task=resnet20_on_digits", *SHORT]))
    pipeline.check_settings(compose_cfg(["task=resnet20_on_digits", "debug=smoke"]))
