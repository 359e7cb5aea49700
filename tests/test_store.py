"""The HDF5 data-model store and the generator: exact storage, resumption after SIGKILL, clear errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import torch

from data_loaders.store import DataModelStore, ShardWriter, StoreError, shard_path
from generate_dataset.models import build_model, model_spec

REPO = Path(__file__).resolve().parents[1]
IDENTITY = {"task": "resnet8_on_test", "architecture": "resnet8", "num_classes": 10, "method": "group_l2"}


def pruned_like_model(seed):
    torch.manual_seed(seed)
    widths = [8, 5, 8, 7, 16, 3, 32]  # non-uniform, as after pruning
    model = build_model("resnet8", 10, widths=widths)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
            torch.nn.init.normal_(m.running_mean)
    return model.eval()


def add_models(store_dir, index, positions, identity=IDENTITY):
    writer = ShardWriter(store_dir, index, identity)
    models = {}
    for position in positions:
        model = pruned_like_model(100 * index + position)
        writer.append(position, model.state_dict(), model_spec("resnet8", model, 10),
                      {"test_acc": 0.5 + position / 100}, 1.3 + position / 10, seed=position, config={"p": position})
        models[position] = model
    return writer, models


def test_round_trip_is_bit_exact_and_ordered(tmp_path):
    _, models1 = add_models(tmp_path, 1, [0, 1])
    _, models0 = add_models(tmp_path, 0, [0, 1, 2])
    store = DataModelStore(tmp_path)
    assert len(store) == 5
    # ordered by (shard index, position), whatever order the shards were written in
    assert [(r.shard, r.position) for r in store] == [
        ("shard_0000.h5", 0), ("shard_0000.h5", 1), ("shard_0000.h5", 2), ("shard_0001.h5", 0), ("shard_0001.h5", 1)]
    record = store[4]
    original = models1[1].state_dict()
    assert list(record.state_dict) == list(original)  # state-dict order kept
    for key, tensor in original.items():
        assert record.state_dict[key].dtype == tensor.dtype and torch.equal(record.state_dict[key], tensor), key
    assert record.spec == model_spec("resnet8", models1[1], 10)
    assert record.metrics == {"test_acc": pytest.approx(0.51)} and record.speed_up == pytest.approx(1.4)
    assert record.seed == 1 and record.config == {"p": 1}
    x = torch.randn(3, 3, 16, 16)
    assert torch.equal(record.build_model()(x), models1[1](x))
    assert store.identity == IDENTITY


def test_resume_skips_finished_models_and_refuses_duplicates(tmp_path):
    writer, _ = add_models(tmp_path, 0, [0, 2])
    reopened = ShardWriter(tmp_path, 0, IDENTITY)
    assert reopened.completed_positions() == {0, 2}
    model = pruned_like_model(0)
    with pytest.raises(StoreError, match="already holds data model 2"):
        reopened.append(2, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, 0, {})
    assert len(DataModelStore(tmp_path)) == 2


def test_interrupted_append_leaves_previous_shard_intact(tmp_path, monkeypatch):
    writer, _ = add_models(tmp_path, 0, [0])
    before = shard_path(tmp_path, 0).read_bytes()
    model = pruned_like_model(5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("data_loaders.store.os.replace", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.append(1, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, 0, {})
    assert shard_path(tmp_path, 0).read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    assert len(DataModelStore(tmp_path)) == 1


def test_split_is_first_80_percent_then_rest(tmp_path):
    add_models(tmp_path, 0, range(5))
    store = DataModelStore(tmp_path)
    assert store.split(0.8) == ([0, 1, 2, 3], [4])
    assert store.split(0.8) == store.split(0.8)
    assert store.split(0.5) == ([0, 1], [2, 3, 4])  # ceil(0.5 * 5) = 3 validate
    assert store.split(0.99) == ([0, 1, 2, 3], [4])  # at least one validation data model
    with pytest.raises(ValueError):
        store.split(0.0)


def test_truncated_shard_is_a_clear_error_naming_the_file(tmp_path):
    add_models(tmp_path, 0, [0, 1])
    path = shard_path(tmp_path, 0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError) as err:
        DataModelStore(tmp_path)[1]
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)


def test_shard_of_another_task_is_refused(tmp_path):
    add_models(tmp_path, 0, [0])
    other = dict(IDENTITY, task="vgg19_on_test", architecture="vgg19")
    with pytest.raises(StoreError) as err:
        ShardWriter(tmp_path, 0, other)
    assert "shard_0000.h5" in str(err.value) and "vgg19" in str(err.value)
    add_models(tmp_path / "b", 0, [0], identity=other)
    os.replace(shard_path(tmp_path / "b", 0), shard_path(tmp_path, 1))
    with pytest.raises(StoreError, match="shard_0001.h5.*another task"):
        DataModelStore(tmp_path)
    add_models(tmp_path / "c", 0, [0])
    with pytest.raises(StoreError, match="another task"):
        DataModelStore(tmp_path / "c", expect={"task": "something_else"})
    assert len(DataModelStore(tmp_path / "c", expect={"task": IDENTITY["task"]})) == 1


def test_empty_and_missing_store_are_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        DataModelStore(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="is empty"):
        DataModelStore(tmp_path / "empty")
    with h5py.File(tmp_path / "empty" / "shard_0000.h5", "w") as f:
        f.attrs["unrelated"] = 1
    with pytest.raises(StoreError, match="not a data-model shard"):
        DataModelStore(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------
# The generator, end to end on digits (CPU)
# ----------------------------------------------------------------------------------------------
FAST = ["task=resnet20_on_digits", "task.model=resnet8", "task.train.epochs=1",
        "task.finetune.after_init_pruning.epochs=1", "task.dataset.val_size=0.1", "num=3", "index=2", "seed=3"]


def generator(store, run_dir):
    return [sys.executable, str(REPO / "generate_dataset" / "generate.py"), *FAST, f"store={store}",
            f"hydra.run.dir={run_dir}"]


def stored_positions(store):
    path = shard_path(store, 2)
    if not path.exists():
        return []
    return [r.position for r in DataModelStore(store)]


@pytest.mark.slow
def test_generator_survives_sigkill_and_resumes_without_duplicates(tmp_path):
    store = tmp_path / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(generator(store, tmp_path / "run1"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not stored_positions(store):
        if proc.poll() is not None:
            pytest.fail(f"generator ended early: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = {r.position: r.state_dict for r in DataModelStore(store)}
    assert 1 <= len(kept) < 3, "kill the generator mid-shard"

    done = subprocess.run(generator(store, tmp_path / "run2"), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    store_after = DataModelStore(store)
    assert [r.position for r in store_after] == [0, 1, 2]
    for record in store_after:
        if record.position in kept:  # finished models are kept bit for bit
            assert all(torch.equal(record.state_dict[k], v) for k, v in kept[record.position].items())
        assert record.speed_up >= 1.32
        assert record.spec["name"] == "resnet8" and record.spec["in_channels"] == 1
        assert set(record.metrics) >= {"val_acc", "test_acc", "train_acc"}
    seeds = [r.seed for r in store_after]
    assert len(set(seeds)) == 3
    assert json.loads(json.dumps(store_after[0].config))["index"] == 2
    # a stored, pruned data model rebuilds and runs
    model = store_after[2].build_model()
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert not list(store.glob(".*.tmp"))


def test_models_and_graphs_yields_ready_pairs_in_seeded_order(tmp_path):
    from nn.graph import GraphCodec

    _, models = add_models(tmp_path, 0, range(4))
    store = DataModelStore(tmp_path)
    train_idx, _ = store.split(0.75)
    first = [r.position for _, _, r in store.models_and_graphs(train_idx, shuffle_seed=5)]
    second = [r.position for _, _, r in store.models_and_graphs(train_idx, shuffle_seed=5)]
    assert first == second and sorted(first) == [0, 1, 2]
    for model, graph, record in store.models_and_graphs([1]):
        assert not model.training
        expected = GraphCodec(models[1]).encode(models[1])
        assert torch.equal(graph.x, expected.x) and torch.equal(graph.edge_index, expected.edge_index)
        x = torch.randn(2, 3, 16, 16)
        assert torch.equal(model(x), models[1](x))


def test_split_matches_the_reference_ceil_rule(tmp_path):
    add_models(tmp_path, 0, range(12))
    # the reference's train_test_split(test_size=0.2) puts ceil(0.2 * 12) = 3 models in validation
    assert DataModelStore(tmp_path).split(0.8) == (list(range(9)), [9, 10, 11])
