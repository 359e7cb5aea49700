"""Experiment tracking (utils/tracking.py, configs/logger/): TensorBoard event files read back (metrics and
hyper-parameters, also from a short run=meta_train through stages.execute), none as a no-op, rank 0 only, one
session shared by nested ones, select's candidate rows, a missing package's message, and the wandb / mlflow
adapters against stand-in modules (neither package is installed for the tests)."""
import csv
import logging
import sys
import types

import numpy as np
import pytest
import torch

from data_loaders.store import ShardWriter
from generate_dataset.models import build_model, model_spec
from helpers import compose_cfg
from stages import execute, meta_train_metrics, select
from training.config import TrainConfig
from utils import distributed, tracking
from utils.tracking import TrackingUnavailableError, active_logger, log_metrics, tracking_session

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData  # noqa: E402


def read_events(log_dir):
    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag):
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def hyper_parameters(accumulator) -> dict:
    """The hparams plugin's session-start values, as plain Python values."""
    for content in accumulator.PluginTagToContent("hparams").values():
        data = HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            out = {}
            for key, value in data.session_start_info.hparams.items():
                kind = value.WhichOneof("kind")
                out[key] = getattr(value, kind)
            return out
    return {}


def test_tensorboard_session_writes_tagged_steps_values_and_hyper_parameters(tmp_path):
    cfg = compose_cfg(["logger=tensorboard", "run=meta_train", "seed=5"])
    assert cfg.logger.name == "tensorboard" and cfg.logger.log_dir is None
    with tracking_session(cfg, tmp_path) as backend:
        assert backend is not None and active_logger() is backend
        log_metrics("meta_train", {"epoch": 1, "ce": 2.5, "reg": np.float64(0.25), "note": "text", "blank": "",
                                   "missing": None, "eligible": True, "t": torch.tensor(0.5),
                                   "many": torch.ones(3), "per_model": {3: 0.75}}, step=1)
        log_metrics("meta_train", {"epoch": 2, "ce": 2.0}, step=2)
        log_metrics("train", {"acc": 0.5}, step=7)
        log_metrics("train", {}, step=8)  # nothing numeric: nothing sent
    assert active_logger() is None
    events = read_events(tmp_path / "tensorboard")
    assert sorted(events.Tags()["scalars"]) == sorted(
        ["meta_train/epoch", "meta_train/ce", "meta_train/reg", "meta_train/eligible", "meta_train/t",
         "meta_train/per_model/3", "train/acc"])  # strings, None, blanks and multi-element tensors skipped
    assert scalars(events, "meta_train/ce") == [(1, 2.5), (2, 2.0)]
    assert scalars(events, "meta_train/reg") == [(1, 0.25)]
    assert scalars(events, "meta_train/eligible") == [(1, 1.0)] and scalars(events, "meta_train/t") == [(1, 0.5)]
    assert scalars(events, "meta_train/per_model/3") == [(1, 0.75)]
    assert scalars(events, "train/acc") == [(7, 0.5)]
    params = hyper_parameters(events)
    # the flattened resolved config: numbers as numbers, strings as strings, lists and nulls as JSON text
    assert params["seed"] == 5 and params["run"] == "meta_train" and params["logger.name"] == "tensorboard"
    assert params["task.name"] == "resnet20_on_digits" and params["task.meta_train.lr"] == cfg.task.meta_train.lr
    assert params["task.input_size"] == "[1, 8, 8]" and params["logger.log_dir"] == "null"
    assert "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.usefixtures("one_thread")
def test_a_meta_train_run_sends_every_epoch_row_and_its_config(tmp_path):
    store = tmp_path / "store"
    with ShardWriter(store, 0, {"task": "resnet20_on_digits", "architecture": "resnet8", "num_classes": 10,
                                "method": "group_l2_norm_max_normalizer"}) as writer:
        for position in range(3):  # two training data models, one held out
            torch.manual_seed(position)
            model = build_model("resnet8", 10, in_channels=1).eval()
            writer.append(position, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, position, {})
    cfg = compose_cfg(["run=meta_train", "logger=tensorboard", "task=resnet20_on_digits", "task.model=resnet8",
                       f"store={store}", "device=cpu", "task.meta_train.epochs=2", "task.meta_train.batches_per_step=1",
                       "task.meta_train.batch_size=16", "metanetwork.num_layer=1", "metanetwork.hiddim=4"])
    run_dir = tmp_path / "run"
    execute(cfg, run_dir)
    assert active_logger() is None  # execute closed its session
    rows = list(csv.DictReader((run_dir / meta_train_metrics.METRICS_CSV).open()))
    events = read_events(run_dir / "tensorboard")
    written = [c for c in meta_train_metrics.CSV_COLUMNS if rows[0][c] != ""]  # peak_mem_gb: CUDA only
    assert "peak_mem_gb" not in written and "images_per_s" in written
    assert sorted(events.Tags()["scalars"]) == sorted(f"meta_train/{c}" for c in written)
    for column in written:  # one point per epoch row, at its epoch, with the CSV's value
        got = scalars(events, f"meta_train/{column}")
        assert [step for step, _v in got] == [1, 2], column
        assert [v for _s, v in got] == pytest.approx([float(r[column]) for r in rows], rel=1e-6), column
    params = hyper_parameters(events)
    assert params["run"] == "meta_train" and params["task.meta_train.epochs"] == 2 and params["store"] == str(store)


def test_select_sends_one_row_per_candidate_at_its_epoch_and_the_choice(tmp_path, monkeypatch):
    def item(label, epoch, score, unpruned):
        return {"label": label, "epoch": epoch, "checkpoint": f"/ck/{label}.pt" if epoch else None, "score": score,
                "per_model": {2: score}, "curve": [[1.0, unpruned]], "unpruned_acc": unpruned, "reused": 0}

    summary = {"origin": item("origin", None, 0.30, 0.90), "control": item("control", None, 0.40, 0.90),
               "epoch_3": item("epoch_3", 3, 0.50, 0.80), "epoch_6": item("epoch_6", 6, 0.45, 0.88)}
    ctx = types.SimpleNamespace(val_indices=[2], store=types.SimpleNamespace(path=tmp_path),
                                finetune=TrainConfig(epochs=1, lr=0.1))
    monkeypatch.setattr(select, "_run_curves", lambda *args, **kwargs: (ctx, [], summary, {}))
    # the accuracy floor (0.90 - 0.05) puts epoch 6 first although epoch 3 scores higher
    cfg = compose_cfg(["run=select", "logger=tensorboard", "select.meta_train_dir=/ck",
                       "select.max_accuracy_drop=0.05"])
    with tracking_session(cfg, tmp_path):
        select.run_select(cfg, tmp_path)
    events = read_events(tmp_path / "tensorboard")
    assert scalars(events, "select/score") == [(3, 0.5), (6, pytest.approx(0.45))]  # in epoch order
    assert scalars(events, "select/rank") == [(3, 2.0), (6, 1.0)]
    assert scalars(events, "select/eligible") == [(3, 0.0), (6, 1.0)]
    assert scalars(events, "select/unpruned_acc") == [(3, pytest.approx(0.8)), (6, pytest.approx(0.88))]
    assert scalars(events, "select/per_model/2") == [(3, 0.5), (6, pytest.approx(0.45))]
    assert scalars(events, "select/gain_over_control") == [(3, pytest.approx(0.1)), (6, pytest.approx(0.05))]
    assert scalars(events, "select_summary/epoch") == [(6, 6.0)]
    assert scalars(events, "select_summary/control_score") == [(6, pytest.approx(0.4))]
    assert scalars(events, "select_summary/origin_score") == [(6, pytest.approx(0.3))]
    # reference lines are not candidates: every select/ tag has exactly the two candidates' points
    assert {tag for tag in events.Tags()["scalars"] if tag.startswith("select/")} == {
        "select/score", "select/rank", "select/eligible", "select/unpruned_acc", "select/per_model/2",
        "select/gain_over_control"}


def test_log_metrics_outside_a_session_is_a_no_op(tmp_path):
    assert active_logger() is None
    log_metrics("train", {"acc": 1.0}, step=1)  # nothing open: nothing happens, nothing raises
    assert list(tmp_path.iterdir()) == []


def test_none_is_the_default_and_a_no_op(tmp_path):
    cfg = compose_cfg(["run=train"])
    assert cfg.logger.name == "none"
    with tracking_session(cfg, tmp_path) as backend:
        assert backend is None and active_logger() is None
        log_metrics("train", {"acc": 1.0}, step=1)
    assert list(tmp_path.iterdir()) == []


def test_ranks_other_than_0_start_no_logger_and_log_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    with tracking_session(compose_cfg(["logger=tensorboard"]), tmp_path) as backend:
        assert backend is None and active_logger() is None
        log_metrics("train", {"acc": 1.0}, step=1)
    assert not (tmp_path / "tensorboard").exists()
    # a session opened on rank 0 ignores calls that claim another rank
    monkeypatch.setattr(distributed, "is_main_process", lambda: True)
    with tracking_session(compose_cfg(["logger=tensorboard"]), tmp_path):
        monkeypatch.setattr(distributed, "is_main_process", lambda: False)
        log_metrics("train", {"acc": 1.0}, step=1)
        monkeypatch.setattr(distributed, "is_main_process", lambda: True)
        log_metrics("train", {"loss": 1.0}, step=1)
    assert read_events(tmp_path / "tensorboard").Tags()["scalars"] == ["train/loss"]


def test_nested_sessions_share_the_outer_one_which_closes_even_on_error(tmp_path):
    cfg = compose_cfg(["logger=tensorboard"])
    with pytest.raises(RuntimeError, match="boom"):
        with tracking_session(cfg, tmp_path / "outer") as outer:
            with tracking_session(cfg, tmp_path / "inner") as inner:  # e.g. a pipeline stage
                assert inner is outer
                log_metrics("select", {"score": 0.5}, step=3)
            assert active_logger() is outer  # the inner block did not close it
            raise RuntimeError("boom")
    assert active_logger() is None
    assert not (tmp_path / "inner").exists()
    assert scalars(read_events(tmp_path / "outer" / "tensorboard"), "select/score") == [(3, 0.5)]


@pytest.mark.parametrize("logger, module", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                            ("mlflow", "mlflow")])
def test_a_missing_package_names_the_pip_command(tmp_path, monkeypatch, logger, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import <module>` fail, installed or not
    with pytest.raises(TrackingUnavailableError, match=rf'pip install -e "\.\[{logger}\]"') as raised:
        with tracking_session(compose_cfg([f"logger={logger}"]), tmp_path):
            pass
    assert isinstance(raised.value, ImportError) and "logger=none" in str(raised.value)
    assert active_logger() is None


def test_an_unknown_logger_is_refused(tmp_path):
    cfg = compose_cfg(["logger=tensorboard", "logger.name=neptune"])
    with pytest.raises(ValueError, match="logger=neptune is unknown; valid: none, tensorboard, wandb, mlflow"):
        with tracking_session(cfg, tmp_path):
            pass


def test_a_failing_logger_never_stops_the_run(tmp_path, monkeypatch, caplog):
    def broken(self, values, step):
        raise OSError("disk full")

    monkeypatch.setattr(tracking._TensorBoard, "log", broken)
    with caplog.at_level(logging.WARNING, logger="utils.tracking"):
        with tracking_session(compose_cfg(["logger=tensorboard"]), tmp_path):
            log_metrics("train", {"acc": 1.0}, step=1)
            log_metrics("train", {"acc": 1.0}, step=2)
    assert [r.getMessage() for r in caplog.records].count(
        "experiment logger failed to log train at step 1 (OSError: disk full); further failures are not reported") == 1
    assert len(caplog.records) == 1


# ----------------------------------------------------------------------------------------------
# wandb and mlflow against stand-ins: what the adapters call
# ----------------------------------------------------------------------------------------------
class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.defined, self.logged, self.finished = kwargs, [], [], None
        self.config = types.SimpleNamespace(values={}, update=lambda d, allow_val_change: self.config.values.update(d))

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def log(self, row):
        self.logged.append(row)

    def finish(self, exit_code=0):
        self.finished = exit_code


def test_wandb_is_offline_under_the_run_dir_with_a_step_axis_per_row_name(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: runs.append(FakeWandbRun(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = compose_cfg(["logger=wandb", "run=meta_train"])
    with tracking_session(cfg, tmp_path):
        log_metrics("meta_train", {"ce": 2.0, "note": "x"}, step=1)
        log_metrics("meta_train", {"ce": 1.5}, step=2)
        log_metrics("train", {"acc": 0.5}, step=1)  # another row name restarts at step 1: its own axis
    run = runs[0]
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path)
    assert run.init["project"] == "meta-pruning-gnn" and run.init["name"].startswith("resnet20_on_digits/")
    assert run.config.values["task.meta_train.lr"] == cfg.task.meta_train.lr and run.config.values["seed"] == cfg.seed
    assert run.defined == [("meta_train/step", None), ("meta_train/*", "meta_train/step"), ("train/step", None),
                           ("train/*", "train/step")]
    assert run.logged == [{"meta_train/ce": 2.0, "meta_train/step": 1}, {"meta_train/ce": 1.5, "meta_train/step": 2},
                          {"train/acc": 0.5, "train/step": 1}]
    assert run.finished == 0


def test_mlflow_keeps_its_store_and_artifacts_in_the_run_dir(tmp_path, monkeypatch):
    calls = []

    class Client:
        def __init__(self, tracking_uri):
            calls.append(("uri", tracking_uri))

        def get_experiment_by_name(self, name):
            calls.append(("experiment", name))

        def create_experiment(self, name, artifact_location=None):
            calls.append(("artifacts", artifact_location))
            return "7"

        def create_run(self, experiment_id, run_name=None):
            calls.append(("run", experiment_id, run_name))
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

        def log_batch(self, run_id, metrics=(), params=()):
            calls.append(("batch", run_id, list(metrics), list(params)))

        def log_text(self, run_id, text, name):
            calls.append(("text", name, "seed:" in text))

        def set_terminated(self, run_id, status):
            calls.append(("end", run_id, status))

    root = types.ModuleType("mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", root)
    monkeypatch.setitem(sys.modules, "mlflow.tracking", types.SimpleNamespace(MlflowClient=Client))
    monkeypatch.setitem(sys.modules, "mlflow.entities", types.SimpleNamespace(
        Metric=lambda key, value, timestamp, step: (key, value, step), Param=lambda key, value: (key, value)))
    monkeypatch.setitem(sys.modules, "mlflow.utils.validation", types.SimpleNamespace(MAX_PARAM_VAL_LENGTH=6000))
    cfg = compose_cfg(["logger=mlflow"])
    with tracking_session(cfg, tmp_path):
        log_metrics("select", {"score": 0.5, "eligible": False, "per_model": {2: 0.25}}, step=4)
    assert calls[0] == ("uri", f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    assert calls[1] == ("experiment", "meta-pruning-gnn")
    assert calls[2] == ("artifacts", (tmp_path / "mlartifacts").resolve().as_uri()) and calls[3][:2] == ("run", "7")
    param_batches = [c[3] for c in calls if c[0] == "batch" and c[3]]
    assert all(len(batch) <= 100 for batch in param_batches)
    params = dict(p for batch in param_batches for p in batch)
    assert params["seed"] == str(cfg.seed) and params["logger.name"] == "mlflow"
    assert params["task.input_size"] == "[1, 8, 8]" and params["logger.tracking_uri"] == "null"
    assert ("text", "config.yaml", True) in calls
    metrics = [c[2] for c in calls if c[0] == "batch" and c[2]]
    assert metrics == [[("select/score", 0.5, 4), ("select/eligible", 0.0, 4), ("select/per_model/2", 0.25, 4)]]
    assert calls[-1] == ("end", "r1", "FINISHED")
