"""The HDF5 data-model store and the generator: exact storage, resumption after SIGKILL, clear errors,
one writer per shard, O(one model) appends, disk-full safety, checksums, the old single-file layout."""
import errno
import json
import os
import socket
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import pytest
from omegaconf import OmegaConf
import torch

import data_loaders.store as store_module
import utils.io
from data_loaders.store import DataModelStore, ShardWriter, StoreError, model_path, shard_path, verify_store
from data_loaders.store import main as store_cli
from generate_dataset.models import build_model, model_spec
from helpers import REPO, compose_cfg
from stages import generate
from utils.seed import derive_seed

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


def add_models(store_dir, index, positions, identity=IDENTITY, keep_open=False):
    """Append data models to a shard; the writer (and its lock) is closed afterwards unless ``keep_open``."""
    writer = ShardWriter(store_dir, index, identity)
    models = {}
    for position in positions:
        model = pruned_like_model(100 * index + position)
        append(writer, position, model)
        models[position] = model
    if not keep_open:
        writer.close()
    return writer, models


def append(writer, position, model, **kwargs):
    return writer.append(position, model.state_dict(), model_spec("resnet8", model, 10),
                         {"test_acc": 0.5 + position / 100}, 1.3 + position / 10, seed=position,
                         config={"p": position}, **kwargs)


def assert_same_weights(state_dict, model):
    original = model.state_dict()
    assert list(state_dict) == list(original)
    for key, tensor in original.items():
        assert state_dict[key].dtype == tensor.dtype and torch.equal(state_dict[key], tensor), key


def write_old_layout_shard(path, models, identity=IDENTITY):
    """A shard in the old single-file layout (format 1), written as the previous code did."""
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        for key, value in identity.items():
            f.attrs[key] = value
        for position, model in models.items():
            group = f.require_group("models").create_group(f"{position:06d}")
            tensors = group.create_group("state_dict")
            for order, (key, tensor) in enumerate(model.state_dict().items()):
                data = tensors.create_dataset(key, data=tensor.numpy())
                data.attrs["order"] = order
                data.attrs["dtype"] = str(tensor.dtype).removeprefix("torch.")
            group.attrs["spec"] = json.dumps(model_spec("resnet8", model, 10))
            group.attrs["metrics"] = json.dumps({"test_acc": 0.5})
            group.attrs["speed_up"] = 1.5
            group.attrs["seed"] = position
            group.attrs["config"] = json.dumps({"p": position})
            group.attrs["complete"] = True


def test_round_trip_is_bit_exact_and_ordered(tmp_path):
    _, models1 = add_models(tmp_path, 1, [0, 1])
    _, models0 = add_models(tmp_path, 0, [0, 1, 2])
    store = DataModelStore(tmp_path)
    assert len(store) == 5
    # ordered by (shard index, position), whatever order the shards were written in
    assert [(r.shard, r.position) for r in store] == [
        ("shard_0000", 0), ("shard_0000", 1), ("shard_0000", 2), ("shard_0001", 0), ("shard_0001", 1)]
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
    add_models(tmp_path, 0, [0, 2])
    reopened = ShardWriter(tmp_path, 0, IDENTITY)
    assert reopened.completed_positions() == {0, 2}
    model = pruned_like_model(0)
    with pytest.raises(StoreError, match="already holds data model 2"):
        reopened.append(2, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, 0, {})
    with pytest.raises(StoreError, match="model_000001.h5"):  # position 1 is a gap until it is filled
        DataModelStore(tmp_path)
    reopened.append(1, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, 0, {})
    reopened.close()
    assert [r.position for r in DataModelStore(tmp_path)] == [0, 1, 2]


def test_interrupted_append_leaves_previous_shard_intact(tmp_path, monkeypatch):
    writer, _ = add_models(tmp_path, 0, [0], keep_open=True)
    listing = sorted(p.name for p in shard_path(tmp_path, 0).iterdir())
    before = model_path(tmp_path, 0, 0).read_bytes()
    model = pruned_like_model(5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("utils.io.os.replace", crash)  # the rename of utils.io.atomic_path
    with pytest.raises(KeyboardInterrupt):
        writer.append(1, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.0, 0, {})
    assert model_path(tmp_path, 0, 0).read_bytes() == before
    assert sorted(p.name for p in shard_path(tmp_path, 0).iterdir()) == listing  # no temporary file left
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
    path = model_path(tmp_path, 0, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    store = DataModelStore(tmp_path)
    with pytest.raises(StoreError) as err:
        store[1]
    assert str(path) in str(err.value) and "corrupt or truncated" in str(err.value)
    assert "position 1" in str(err.value)
    store[0]  # the other data models of the shard are unaffected


def test_model_file_missing_from_the_middle_of_a_shard_is_an_error_naming_it(tmp_path, capsys):
    config = {"task": {"name": IDENTITY["task"]}, "method": {"name": IDENTITY["method"]}, "num": 5, "index": 0,
              "seed": 7}
    with ShardWriter(tmp_path, 0, IDENTITY) as writer:
        for position in range(4):
            model = pruned_like_model(position)
            writer.append(position, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.3, position, config)
    add_models(tmp_path, 1, [0, 1])
    assert verify_store(tmp_path) == 6
    gone = model_path(tmp_path, 0, 1)
    gone.unlink()
    # opening (meta-training, selection) refuses the store instead of shifting every later index
    with pytest.raises(StoreError) as err:
        DataModelStore(tmp_path)
    message = str(err.value)
    assert str(gone) in message and "position(s) 1 of 0-3" in message
    assert (f"python generate_dataset/generate.py task={IDENTITY['task']} method={IDENTITY['method']} num=5 index=0 "
            f"seed=7 store={tmp_path}") in message
    assert "trains only the missing position" in message
    # the checker lists it (with the damaged models of other shards) and fails
    path = model_path(tmp_path, 1, 1)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(StoreError) as err:
        verify_store(tmp_path)
    assert str(gone) in str(err.value) and str(path) in str(err.value)
    assert "1 of 5 data model(s) are damaged and 1 data model file(s) are missing" in str(err.value)
    assert store_cli([str(tmp_path)]) == 1
    assert str(gone) in capsys.readouterr().err
    store = DataModelStore(tmp_path, missing_ok=True)  # what verify_store reads
    assert store.missing == [str(gone)] and [(r.shard, r.position) for r in map(store.__getitem__, range(3))] == [
        ("shard_0000", 0), ("shard_0000", 2), ("shard_0000", 3)]
    # a shard's last file missing looks like an unfinished shard: not a gap
    path.unlink()
    store = DataModelStore(tmp_path, missing_ok=True)
    assert store.missing == [str(gone)] and len(store) == 4 and store[3].shard == "shard_0001"
    add_models(tmp_path / "unfinished", 0, [0, 1, 2])
    model_path(tmp_path / "unfinished", 0, 2).unlink()
    assert [r.position for r in DataModelStore(tmp_path / "unfinished")] == [0, 1]
    # an old-layout shard with a gap names its group
    old = tmp_path / "old"
    old.mkdir()
    write_old_layout_shard(old / "shard_0000.h5", {0: pruned_like_model(0), 2: pruned_like_model(2)})
    with pytest.raises(StoreError, match=r"shard_0000.h5 \(group models/000001\)"):
        DataModelStore(old)


def test_generator_rerun_fills_a_gap_in_the_middle_of_a_shard(tmp_path, monkeypatch):
    """The advice of the missing-file error is right: re-running the generator with the shard's settings makes
    only the missing position, with its seed, and leaves the other model files untouched."""
    store_dir = tmp_path / "store"
    cfg = compose_cfg([*FAST, f"store={store_dir}", "device=cpu", "no_init_pruning=true"], primary="generate")
    monkeypatch.setattr(generate, "train", lambda *args, **kwargs: SimpleNamespace(final_metrics={"test_acc": 0.1}))
    assert generate.run(cfg, tmp_path / "run1")["produced"] == [0, 1, 2]
    gone = model_path(store_dir, cfg.index, 1)
    gone.unlink()
    kept = {p: model_path(store_dir, cfg.index, p).stat().st_ino for p in (0, 2)}
    with pytest.raises(StoreError) as err:
        DataModelStore(store_dir)
    assert str(gone) in str(err.value)
    assert (f"task={cfg.task.name} method={cfg.method.name} num=3 index={cfg.index} seed={cfg.seed} "
            f"no_init_pruning=true store={store_dir}") in str(err.value)
    summary = generate.run(cfg, tmp_path / "run2")
    assert summary["produced"] == [1] and summary["skipped"] == [0, 2]
    store = DataModelStore(store_dir)
    assert [r.position for r in store] == [0, 1, 2]
    assert store[1].seed == derive_seed(cfg.seed, cfg.index, 1)
    assert {p: model_path(store_dir, cfg.index, p).stat().st_ino for p in (0, 2)} == kept


def test_shard_of_another_task_is_refused(tmp_path):
    add_models(tmp_path, 0, [0])
    other = dict(IDENTITY, task="vgg19_on_test", architecture="vgg19")
    with pytest.raises(StoreError) as err:
        ShardWriter(tmp_path, 0, other)
    assert "shard_0000" in str(err.value) and "vgg19" in str(err.value)
    add_models(tmp_path / "b", 0, [0], identity=other)
    os.replace(shard_path(tmp_path / "b", 0), shard_path(tmp_path, 1))
    with pytest.raises(StoreError, match="shard_0001.*another task"):
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
    if not list(shard_path(store, 2).glob("model_*.h5")):
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
    assert not list(store.rglob(".*.tmp"))
    ShardWriter(store, 2, DataModelStore(store).identity).close()  # the generators released the shard's lock


def test_split_matches_the_reference_ceil_rule(tmp_path):
    add_models(tmp_path, 0, range(12))
    # the reference's train_test_split(test_size=0.2) puts ceil(0.2 * 12) = 3 models in validation
    assert DataModelStore(tmp_path).split(0.8) == (list(range(9)), [9, 10, 11])


# ----------------------------------------------------------------------------------------------
# Reliability: one writer per shard, O(one model) appends, disk full, checksums, old layout
# ----------------------------------------------------------------------------------------------
HOLDER = """
import sys
from data_loaders.store import ShardWriter
writer = ShardWriter(sys.argv[1], 0, {"task": "resnet8_on_test", "architecture": "resnet8", "num_classes": 10,
                                      "method": "group_l2"})
print("locked", flush=True)
sys.stdin.read()
"""


def test_second_writer_is_refused_naming_the_holder_and_leaves_its_temporary_file(tmp_path):
    add_models(tmp_path, 0, [0])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        live_tmp = shard_path(tmp_path, 0) / f".model_000001.h5.{socket.gethostname()}.{holder.pid}.tmp"
        live_tmp.write_bytes(b"the holder is writing this")
        with pytest.raises(StoreError) as err:
            ShardWriter(tmp_path, 0, IDENTITY)
        message = str(err.value)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message and "another writer" in message
        assert str(tmp_path) in message
        assert live_tmp.exists()  # a refused writer touches nothing
    finally:
        holder.kill()  # SIGKILL: the OS releases the lock
        holder.wait()
    writer = ShardWriter(tmp_path, 0, IDENTITY)  # the dead writer's lock is gone, and its temporary file
    assert not live_tmp.exists()
    # one writer per shard inside one process too
    with pytest.raises(StoreError, match="this very process"):
        ShardWriter(tmp_path, 0, IDENTITY)
    ShardWriter(tmp_path, 1, IDENTITY).close()  # other shards are free
    writer.close()
    with ShardWriter(tmp_path, 0, IDENTITY) as again:
        assert again.completed_positions() == {0}


def test_append_writes_only_the_new_model(tmp_path):
    writer, models = add_models(tmp_path, 0, range(3), keep_open=True)

    def files():
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size)
                for p in shard_path(tmp_path, 0).iterdir()}

    before = files()
    assert set(before) == {"shard.json", "model_000000.h5", "model_000001.h5", "model_000002.h5"}
    time.sleep(0.01)
    model = pruned_like_model(3)
    assert append(writer, 3, model) == model_path(tmp_path, 0, 3)
    after = files()
    assert set(after) == set(before) | {"model_000003.h5"}
    assert {name: after[name] for name in before} == before  # earlier model files untouched
    # a model file is one model's tensors plus small metadata, whatever the shard holds
    tensor_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert after["model_000003.h5"][2] < tensor_bytes + 64 * 1024
    writer.close()
    store = DataModelStore(tmp_path)
    assert [r.position for r in store] == [0, 1, 2, 3]
    assert_same_weights(store[3].state_dict, model)


def test_disk_full_is_a_clean_error_and_the_model_is_rescued(tmp_path, monkeypatch):
    store_dir, run_dir = tmp_path / "store", tmp_path / "run"
    writer, _ = add_models(store_dir, 0, [0], keep_open=True)
    real_write = utils.io.write_bytes

    def disk_full(path, data):  # half of the file fits, then the disk is full
        with open(path, "xb") as handle:
            handle.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(utils.io, "write_bytes", disk_full)
    model = pruned_like_model(1)
    with pytest.raises(StoreError) as err:
        append(writer, 1, model, rescue_dir=run_dir)
    message = str(err.value)
    rescued = store_module.rescue_path(run_dir, 0, 1)
    assert str(store_dir) in message and "is full" in message and "needs" in message and "KiB of free space" in message
    assert str(rescued) in message
    assert sorted(p.name for p in shard_path(store_dir, 0).iterdir()) == ["model_000000.h5", "shard.json"]
    assert len(DataModelStore(store_dir)) == 1
    # the trained model is kept, and stores without retraining once there is space
    saved = store_module.load_rescued(rescued)
    assert_same_weights(saved["state_dict"], model)
    monkeypatch.setattr(utils.io, "write_bytes", real_write)
    writer.append(1, saved["state_dict"], saved["spec"], saved["metrics"], saved["speed_up"], saved["seed"],
                  saved["config"])
    writer.close()
    record = DataModelStore(store_dir)[1]
    assert_same_weights(record.state_dict, model)
    assert record.seed == 1 and record.config == {"p": 1} and record.speed_up == pytest.approx(1.4)


def test_generator_stores_a_rescued_model_without_retraining(tmp_path, monkeypatch):
    store_dir, run_dir = tmp_path / "store", tmp_path / "run"
    cfg = compose_cfg([*FAST, "num=1", f"store={store_dir}", "device=cpu"], primary="generate")
    identity = generate.shard_identity(cfg) | {"num_classes": 10}
    seed = derive_seed(cfg.seed, cfg.index, 0)
    torch.manual_seed(0)
    model = build_model("resnet8", 10, in_channels=1).eval()

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def rescue(seed):  # a run that trained the model but found the disk full
        with ShardWriter(store_dir, cfg.index, identity) as writer, monkeypatch.context() as patch:
            patch.setattr(utils.io, "write_bytes", disk_full)
            with pytest.raises(StoreError, match="is full"):
                writer.append(0, model.state_dict(), model_spec("resnet8", model, 10), {"test_acc": 0.3}, 1.4, seed,
                              {"seed": cfg.seed}, rescue_dir=run_dir)

    def no_training(*args, **kwargs):
        raise AssertionError("a rescued data model must not be retrained")

    monkeypatch.setattr(generate, "train", no_training)
    rescue(seed + 1)  # another seed: not this run's data model
    with pytest.raises(StoreError, match="other settings.*seed"):
        generate.run(cfg, run_dir)
    rescue(seed)
    summary = generate.run(cfg, run_dir)
    assert summary["produced"] == [0]
    assert not store_module.rescue_path(run_dir, cfg.index, 0).exists()
    record = DataModelStore(store_dir)[0]
    assert_same_weights(record.state_dict, model)
    assert record.seed == seed and record.metrics == {"test_acc": pytest.approx(0.3)}


def test_flipped_bytes_are_detected_on_read_and_by_verify(tmp_path):
    add_models(tmp_path, 0, [0, 1, 2])
    assert verify_store(tmp_path) == 3
    path = model_path(tmp_path, 0, 1)
    with h5py.File(path, "r") as f:
        offset = f["state_dict"]["conv1.weight"].id.get_offset()
    data = bytearray(path.read_bytes())
    data[offset + 5] ^= 0x10  # one bit of one weight
    path.write_bytes(bytes(data))
    store = DataModelStore(tmp_path)
    with pytest.raises(StoreError) as err:
        store[1]
    assert "position 1 of shard" in str(err.value) and "shard_0000" in str(err.value)
    assert "conv1.weight" in str(err.value) and "checksum" in str(err.value)
    store[0], store[2]
    # a changed byte in the metadata (the stored architecture spec)
    path = model_path(tmp_path, 0, 2)
    data = path.read_bytes()
    assert data.count(b'"name": "resnet8"') == 1
    path.write_bytes(data.replace(b'"name": "resnet8"', b'"name": "resnet9"'))
    with pytest.raises(StoreError, match="position 2 of shard.*checksum"):
        store[2]
    problems = store.verify()
    assert len(problems) == 2 and "position 1" in problems[0] and "position 2" in problems[1]
    with pytest.raises(StoreError, match=r"2 of 3 data model\(s\) are damaged"):
        verify_store(tmp_path)
    assert store_cli([str(tmp_path)]) == 1


def test_store_path_that_is_a_file_is_named_so(tmp_path):
    path = tmp_path / "store.h5"
    path.write_bytes(b"not a folder")
    with pytest.raises(StoreError, match="is a file, not a store folder"):
        DataModelStore(path)
    with pytest.raises(StoreError, match="is a file, not a store folder"):
        ShardWriter(path, 0, IDENTITY)


def test_old_single_file_layout_is_read_and_converted_by_its_writer(tmp_path):
    old = {position: pruned_like_model(position) for position in (0, 1)}
    write_old_layout_shard(tmp_path / "shard_0000.h5", old)
    add_models(tmp_path, 1, [0])
    store = DataModelStore(tmp_path)
    assert [(r.shard, r.position) for r in store] == [("shard_0000.h5", 0), ("shard_0000.h5", 1), ("shard_0001", 0)]
    assert_same_weights(store[1].state_dict, old[1])
    assert store[1].seed == 1 and store[1].config == {"p": 1} and store.verify() == []
    # a writer of that shard converts it to the folder layout first, then appends as usual
    with ShardWriter(tmp_path, 0, IDENTITY) as writer:
        assert not (tmp_path / "shard_0000.h5").exists() and writer.completed_positions() == {0, 1}
        append(writer, 2, pruned_like_model(2))
    store = DataModelStore(tmp_path)
    assert [(r.shard, r.position) for r in store] == [("shard_0000", 0), ("shard_0000", 1), ("shard_0000", 2),
                                                      ("shard_0001", 0)]
    assert_same_weights(store[1].state_dict, old[1])
    assert verify_store_count(tmp_path) == 4
    # a damaged old-layout file is still a clear error naming it
    write_old_layout_shard(tmp_path / "shard_0002.h5", old)
    data = (tmp_path / "shard_0002.h5").read_bytes()
    (tmp_path / "shard_0002.h5").write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="shard_0002.h5.*corrupt or truncated"):
        DataModelStore(tmp_path)[4]


def verify_store_count(path):
    return verify_store(path)


def test_generator_refuses_to_resume_a_shard_made_with_another_recipe_or_seed(tmp_path, monkeypatch):
    store_dir, run_dir = tmp_path / "store", tmp_path / "run"
    cfg = compose_cfg([*FAST, "num=1", f"store={store_dir}", "device=cpu"], primary="generate")
    torch.manual_seed(0)
    model = build_model("resnet8", 10, in_channels=1).eval()
    with ShardWriter(store_dir, cfg.index, generate.shard_identity(cfg) | {"num_classes": 10}) as writer:
        writer.append(0, model.state_dict(), model_spec("resnet8", model, 10), {}, 1.4,
                      derive_seed(cfg.seed, cfg.index, 0), OmegaConf.to_container(cfg, resolve=True))
    monkeypatch.setattr(generate, "train", lambda *a, **k: pytest.fail("nothing is left to train"))

    assert generate.run(cfg, run_dir)["produced"] == []  # same recipe and seed: resumes (nothing left here)
    other = compose_cfg([*FAST, "num=1", f"store={store_dir}", "device=cpu", "task.train.epochs=2"],
                        primary="generate")
    with pytest.raises(StoreError, match=r"other settings.*task\.train\.epochs: 1 -> 2"):
        generate.run(other, run_dir)
    reseeded = compose_cfg([*FAST, "num=1", f"store={store_dir}", "device=cpu", "seed=5"], primary="generate")
    with pytest.raises(StoreError, match=r"seed of data model 0"):
        generate.run(reseeded, run_dir)
    assert [r.position for r in DataModelStore(store_dir)] == [0]  # nothing was appended


def test_unwritable_store_is_a_clear_error_at_each_step(tmp_path, monkeypatch):
    """Each way a store can refuse writes (no folder, no lock file, no shard folder, no model file) names the
    store and the OS error, and leaves what was stored readable. Simulated, because root may write anywhere."""
    denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    def refuse(*args, **kwargs):
        raise denied

    # the store folder cannot be created (a parent that is a file)
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(StoreError, match="cannot create data-model store") as err:
        ShardWriter(blocker / "store", 0, IDENTITY)
    assert str(blocker / "store") in str(err.value) and "NotADirectoryError" in str(err.value)

    store_dir = tmp_path / "store"
    add_models(store_dir, 0, [0])
    # the lock file cannot be created
    with monkeypatch.context() as patch:
        patch.setattr(store_module.os, "open", refuse)
        with pytest.raises(StoreError, match="lock file .* cannot be created") as err:
            ShardWriter(store_dir, 1, IDENTITY)
    assert "PermissionError" in str(err.value) and str(store_dir) in str(err.value)
    # the shard folder cannot be created
    real_mkdir = store_module.Path.mkdir

    def refuse_shard(path, *args, **kwargs):
        if path == shard_path(store_dir, 2):
            raise denied
        return real_mkdir(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(store_module.Path, "mkdir", refuse_shard)
        with pytest.raises(StoreError, match="cannot write shard 2 of data-model store") as err:
            ShardWriter(store_dir, 2, IDENTITY)
    assert "PermissionError" in str(err.value)
    # a data model cannot be written: nothing partial is left, the shard stays readable and resumable
    writer = ShardWriter(store_dir, 0, IDENTITY)
    with monkeypatch.context() as patch:
        patch.setattr(utils.io, "write_bytes", refuse)
        with pytest.raises(StoreError, match="cannot write data model 1 of shard 0") as err:
            append(writer, 1, pruned_like_model(1))
    assert "PermissionError" in str(err.value)
    append(writer, 1, pruned_like_model(1))
    writer.close()
    assert [r.position for r in DataModelStore(store_dir)] == [0, 1]
    assert sorted(p.name for p in shard_path(store_dir, 0).iterdir()) == ["model_000000.h5", "model_000001.h5",
                                                                          "shard.json"]
