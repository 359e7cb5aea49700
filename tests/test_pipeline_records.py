"""The pipeline's stage records (stages/pipeline.py): a damaged record is never taken for a matching one, and
``pipeline.restart_changed`` is an instruction, not a setting; a restart killed half-way resumes.

Stages are faked (``run_recorded`` replaced): these tests are about which stages are reused, refused, moved aside or
rerun, not about what a stage computes. The fake generator writes a real data-model store of tiny models and
resumes it as the real one does (``stages.generate.check_resumable``), so a store of other settings is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data_loaders.store import DataModelStore, ShardWriter
from generate_dataset.models import build_model, model_spec
from helpers import compose_cfg
from stages import generate, pipeline
from stages.artifacts import chosen_checkpoint
from utils.seed import derive_seed

BASE = ["task=resnet20_on_digits", "pipeline.num_data_models=2"]


def finish(stage_dir: Path, stage, summary: dict | None = None) -> None:
    """A stage that finished: its config.yaml and results.json (as stages.common.run_recorded leaves them)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(stage, resolve=True))
    (stage_dir / "results.json").write_text(json.dumps(summary or {"run": str(stage.run), "marker": 1}))


def never_run(monkeypatch) -> None:
    monkeypatch.setattr(pipeline, "run_recorded", lambda *a, **k: pytest.fail("a stage ran"))


def rerun_recorder(monkeypatch) -> list[str]:
    ran: list[str] = []

    def fake(run, stage, stage_dir):
        ran.append(Path(stage_dir).name)
        return {"marker": 2}

    monkeypatch.setattr(pipeline, "run_recorded", fake)
    return ran


# ------------------------------------------------------------------------------------------------------------------
# Damaged records
# ------------------------------------------------------------------------------------------------------------------
def _cut_short(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) // 2]))


def _without_method(path: Path) -> None:
    saved = OmegaConf.to_container(OmegaConf.load(path))
    del saved["method"]
    path.write_text(OmegaConf.to_yaml(saved))


CONFIG_DAMAGE = {
    "empty": lambda p: p.write_text(""),
    "cut short": _cut_short,
    "a lost section": _without_method,
    "not a mapping": lambda p: p.write_text("- 1\n- 2\n"),
    "garbage bytes": lambda p: p.write_bytes(b"\xff\xfe\x00\x01garbage"),
    "bad yaml": lambda p: p.write_text("task: [\n"),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", sorted(CONFIG_DAMAGE))
def test_a_damaged_config_record_is_stale_and_named(tmp_path, monkeypatch, damage):
    cfg = compose_cfg(BASE)
    updates = {"final.model": "m.pt"}
    stage_dir = tmp_path / "final"
    finish(stage_dir, pipeline.stage_config(cfg, "pruning_final", **updates))
    CONFIG_DAMAGE[damage](stage_dir / "config.yaml")

    never_run(monkeypatch)
    with pytest.raises(pipeline.DamagedRecordError) as refused:
        pipeline.run_stage("final", "pruning_final", cfg, stage_dir, **updates)
    message = str(refused.value)
    assert str(stage_dir / "config.yaml") in message  # names the file ...
    assert "pipeline.restart_changed=true" in message and f"delete {stage_dir}" in message  # ... and what to do
    assert isinstance(refused.value, pipeline.StaleStageError)  # whoever catches stale stages catches these

    # with restart_changed: moved aside and recomputed, like a stage of other settings
    ran = rerun_recorder(monkeypatch)
    restart = pipeline.Restart(True, tmp_path)
    assert pipeline.run_stage("final", "pruning_final", cfg, stage_dir, restart, **updates)["marker"] == 2
    assert ran == ["final"] and (restart.aside / "final" / "results.json").exists()


def test_what_a_newer_version_adds_is_still_not_a_change(tmp_path, monkeypatch):
    # the partial rule only counts whole sections the stage reads: a record without sections the final run never
    # reads, or without a key added inside a section, is an older record, not a damaged one
    cfg = compose_cfg(BASE)
    stage = pipeline.stage_config(cfg, "pruning_final", **{"final.model": "m.pt"})
    saved = OmegaConf.to_container(stage, resolve=True)
    for section in ("select", "report", "meta_train", "metanetwork"):
        del saved[section]
    del saved["final"]["compare_model"]
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (tmp_path / "final" / "results.json").write_text(json.dumps({"marker": 1}))
    never_run(monkeypatch)
    assert pipeline.run_stage("final", "pruning_final", cfg, tmp_path / "final",
                              **{"final.model": "m.pt"})["marker"] == 1


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b'{"run": "pruning_final", "mark', b"[1, 2]"])
def test_a_damaged_results_json_is_stale_and_named(tmp_path, monkeypatch, content):
    cfg = compose_cfg(BASE)
    stage_dir = tmp_path / "pretrain"
    finish(stage_dir, pipeline.stage_config(cfg, "pretrain_final"))
    (stage_dir / "results.json").write_bytes(content)

    never_run(monkeypatch)
    with pytest.raises(pipeline.DamagedRecordError) as refused:
        pipeline.run_stage("pretrain", "pretrain_final", cfg, stage_dir)
    message = str(refused.value)
    assert str(stage_dir / "results.json") in message
    assert "pipeline.restart_changed=true" in message and f"delete {stage_dir}" in message

    ran = rerun_recorder(monkeypatch)
    assert pipeline.run_stage("pretrain", "pretrain_final", cfg, stage_dir, pipeline.Restart(True, tmp_path))
    assert ran == ["pretrain"]


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"not json", b"[]", b'{"epoch": 3}'])
def test_a_damaged_selection_is_never_reused(tmp_path, monkeypatch, content):
    cfg = compose_cfg(BASE)
    chosen = tmp_path / "meta_train" / "checkpoints" / "epoch_0005.pt"
    chosen.parent.mkdir(parents=True)
    chosen.write_bytes(b"")
    select_dir = tmp_path / "select"
    select_updates = {"store": str(tmp_path / "store"), "select.meta_train_dir": str(tmp_path / "meta_train")}
    finish(select_dir, pipeline.stage_config(cfg, "select", **select_updates))
    final_updates = {"final.model": "m.pt", "final.metanetwork": str(select_dir)}
    finish(tmp_path / "final", pipeline.stage_config(cfg, "pruning_final", **final_updates),
           {"run": "pruning_final", "metanetwork": str(chosen)})
    (select_dir / "selection.json").write_text(json.dumps({"chosen": str(chosen)}))
    never_run(monkeypatch)
    # intact: both reused
    assert pipeline.run_stage("select", "select", cfg, select_dir, **select_updates)["run"] == "select"
    assert pipeline.run_stage("final", "pruning_final", cfg, tmp_path / "final", **final_updates)

    (select_dir / "selection.json").write_bytes(content)
    # the selection stage itself, and a final run that applied its choice, are refused, naming the file
    for name, run, stage_dir, updates in [("select", "select", select_dir, select_updates),
                                          ("final", "pruning_final", tmp_path / "final", final_updates)]:
        with pytest.raises(pipeline.DamagedRecordError, match="selection.json") as refused:
            pipeline.run_stage(name, run, cfg, stage_dir, **updates)
        assert str(select_dir / "selection.json") in str(refused.value)
    # reading it says which file and what to do, never a bare decoding error
    with pytest.raises((ValueError, KeyError), match=r"selection\.json.*(re-run run=select|'chosen')"):
        chosen_checkpoint(select_dir)


# ------------------------------------------------------------------------------------------------------------------
# pipeline.restart_changed
# ------------------------------------------------------------------------------------------------------------------
def test_restart_changed_is_never_a_changed_setting(tmp_path, monkeypatch):
    never_run(monkeypatch)
    plain, restarting = compose_cfg(BASE), compose_cfg([*BASE, "pipeline.restart_changed=true"])
    finish(tmp_path / "a", pipeline.stage_config(plain, "pretrain_final"))
    finish(tmp_path / "b", pipeline.stage_config(restarting, "pretrain_final"))
    # finished plainly, asked again with restart_changed=true: nothing changed, nothing recomputed
    assert pipeline.run_stage("a", "pretrain_final", restarting, tmp_path / "a", pipeline.Restart(True, tmp_path))
    # finished under restart_changed=true, asked again plainly: not refused as stale
    assert pipeline.run_stage("b", "pretrain_final", plain, tmp_path / "b", pipeline.Restart(False, tmp_path))


def _fake_stages(monkeypatch) -> list[str]:
    """``run_recorded`` replaced by stages that write what the next stage reads; returns the stages run, by folder
    (relative to the run dir). The generator is the real shard logic without training: it refuses a store of other
    settings (``stages.generate.check_resumable``) and appends tiny untrained models with its config and seeds."""
    ran: list[str] = []

    def fake(run, stage, stage_dir):
        stage_dir = Path(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "results.json").unlink(missing_ok=True)
        (stage_dir / "config.yaml").write_text(OmegaConf.to_yaml(stage, resolve=True))
        mode = str(stage.run)
        summary = {"run": mode}
        if mode == "generate":
            with ShardWriter(stage.store, stage.index, generate.shard_identity(stage) | {"num_classes": 10}) as writer:
                done = writer.completed_positions()
                if done:
                    generate.check_resumable(stage, writer, min(done))
                for position in sorted(set(range(stage.num)) - done):
                    model = build_model("resnet8", 10, in_channels=1)
                    seed = derive_seed(stage.seed, stage.index, position)
                    writer.append(position, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, seed,
                                  OmegaConf.to_container(stage, resolve=True))
        elif mode == "meta_train":
            (stage_dir / "checkpoints").mkdir(exist_ok=True)
            (stage_dir / "checkpoints" / "epoch_0005.pt").write_bytes(b"")
        elif mode == "select":
            chosen = Path(stage.select.meta_train_dir) / "checkpoints" / "epoch_0005.pt"
            (stage_dir / "selection.json").write_text(json.dumps({"chosen": str(chosen)}))
        elif mode == "pruning_final":
            source = stage.final.metanetwork
            summary["metanetwork"] = None if source is None else str(chosen_checkpoint(source))
        (stage_dir / "results.json").write_text(json.dumps(summary))
        ran.append("/".join(stage_dir.parts[-2:]) if mode == "pruning_final" else stage_dir.name)
        return summary

    monkeypatch.setattr(pipeline, "run_recorded", fake)
    return ran


ALL_STAGES = ["generate", "meta_train", "select", "pretrain", "final/metanetwork", "final/baseline", "report"]


def test_a_restart_killed_after_its_first_move_resumes(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    ran = _fake_stages(monkeypatch)
    pipeline.run(compose_cfg(BASE), run_dir)
    assert ran == ALL_STAGES

    # a generation setting changes; the restart is killed right after it moved its first folder (generate/)
    changed = [*BASE, "task.train.epochs=3"]
    shipped_epochs = compose_cfg(BASE).task.train.epochs  # the store on disk was made with the task's own setting
    real_move = pipeline.Restart.move_aside
    moves = []

    def killed_after_first(self, path, why):
        if moves:
            raise KeyboardInterrupt("killed")
        moves.append(path)
        real_move(self, path, why)

    monkeypatch.setattr(pipeline.Restart, "move_aside", killed_after_first)
    ran.clear()
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(compose_cfg([*changed, "pipeline.restart_changed=true"]), run_dir)
    assert moves == [run_dir / "generate"] and (run_dir / "store").exists() and ran == []
    monkeypatch.setattr(pipeline.Restart, "move_aside", real_move)

    # the plain command refuses the old store before the generator opens it, naming it and what to do
    refused = rf"store .*task\.train\.epochs: {shipped_epochs} -> 3.*restart_changed=true"
    with pytest.raises(pipeline.StaleStageError, match=refused):
        pipeline.run(compose_cfg(changed), run_dir)
    assert ran == []

    # the same restart command resumes: the old store is moved aside too, and everything is recomputed
    pipeline.run(compose_cfg([*changed, "pipeline.restart_changed=true"]), run_dir)
    assert ran == ALL_STAGES
    store = DataModelStore(run_dir / "store")
    assert len(store) == 2 and all(store[i].config["task"]["train"]["epochs"] == 3 for i in range(2))
    old_stores = [p for p in run_dir.glob("superseded-*/store") if p.is_dir()]
    assert len(old_stores) == 1 and DataModelStore(old_stores[0])[0].config["task"]["train"]["epochs"] == shipped_epochs
    for name in ALL_STAGES:  # every stage's record is of the new settings
        assert OmegaConf.load(run_dir / name / "config.yaml").task.train.epochs == 3, name

    # and then the plain command (restart_changed left out) finds every stage finished with its settings
    ran.clear()
    pipeline.run(compose_cfg(changed), run_dir)
    assert ran == []


def test_a_restart_resumes_a_killed_generation_of_the_same_settings(tmp_path, monkeypatch):
    # a generation killed after its first data model, re-run under restart_changed=true: the store matches, so it is
    # resumed in place, not moved aside
    run_dir = tmp_path / "run"
    ran = _fake_stages(monkeypatch)
    cfg = compose_cfg([*BASE, "pipeline.restart_changed=true"])
    gen = pipeline.stage_config(cfg, "generate", num=1, index=0, store=str(run_dir / "store"), no_init_pruning=False)
    pipeline.run_recorded(generate.run, gen, run_dir / "generate")  # the fake: data model 0 only
    (run_dir / "generate" / "results.json").unlink()  # killed before it finished
    ran.clear()
    first = DataModelStore(run_dir / "store")[0].state_dict
    pipeline.generate_stage(cfg, run_dir / "store", run_dir / "generate", pipeline.Restart(True, run_dir))
    assert ran == ["generate"] and not list(run_dir.glob("superseded-*"))
    store = DataModelStore(run_dir / "store")
    assert len(store) == 2 and all(bool((store[0].state_dict[k] == v).all()) for k, v in first.items())


def test_two_restarts_in_one_second_keep_both_superseded_copies(tmp_path):
    for marker in (1, 2):
        (tmp_path / "pretrain").mkdir()
        (tmp_path / "pretrain" / "results.json").write_text(json.dumps({"marker": marker}))
        restart = pipeline.Restart(True, tmp_path)
        restart.aside = tmp_path / "superseded-same-second"
        restart.move_aside(tmp_path / "pretrain", "test")
    kept = sorted(p.name for p in (tmp_path / "superseded-same-second").iterdir())
    assert kept == ["pretrain", "pretrain-1"] and not (tmp_path / "pretrain").exists()
