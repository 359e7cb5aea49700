"""Checkpoints: bit-exact round trip, atomic writes, and refusal of anything that could run code."""
import errno
import os
import pickle
from pathlib import Path

import numpy as np
import stat
import pytest
import torch
from torch import nn

import utils.checkpoint as ckpt
from generate_dataset import models
from generate_dataset.models import load_model
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

SPEC = {"name": "tiny", "num_classes": 3, "in_channels": 4, "widths": [5]}


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model.train()
    model(torch.randn(8, 4))  # moves BN running stats away from their defaults
    return model


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


class _Evil:
    """Unpickling this would create ``marker`` (stands in for os.system and friends)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_is_bit_exact(tmp_path):
    model = _tiny_model()
    extra = {"epoch": 7, "metrics": {"acc": 0.25, "loss": float("nan")}, "tags": ["a", None, True],
             "pair": (1, 2.5), "mask": torch.tensor([True, False])}
    path = save_checkpoint(tmp_path / "sub" / "dir" / "m.pt", model.state_dict(), SPEC, **extra)
    assert path == tmp_path / "sub" / "dir" / "m.pt" and path.is_file()

    loaded = load_checkpoint(path)
    state = model.state_dict()
    assert list(loaded["state_dict"]) == list(state)
    for name, tensor in state.items():
        got = loaded["state_dict"][name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor), name
    assert loaded["spec"] == SPEC
    assert loaded["format_version"] == ckpt.FORMAT_VERSION
    assert loaded["epoch"] == 7 and loaded["tags"] == ["a", None, True] and loaded["pair"] == (1, 2.5)
    assert loaded["metrics"]["acc"] == 0.25 and np.isnan(loaded["metrics"]["loss"])
    assert torch.equal(loaded["mask"], extra["mask"])

    rebuilt = _tiny_model()
    with torch.no_grad():
        for p in rebuilt.parameters():
            p.zero_()
    rebuilt.load_state_dict(loaded["state_dict"])
    x = torch.randn(6, 4)
    assert torch.equal(rebuilt.eval()(x), model.eval()(x))


def test_write_leaves_no_temp_files_and_overwrites(tmp_path):
    save_checkpoint(tmp_path / "m.pt", {"w": torch.zeros(2)}, SPEC)
    save_checkpoint(tmp_path / "m.pt", {"w": torch.ones(2)}, SPEC)
    assert _files(tmp_path) == ["m.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "m.pt")["state_dict"]["w"], torch.ones(2))


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"w": torch.arange(4.0)}, SPEC, epoch=1)
    old_bytes = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)  # bytes hit the temp file ...
        raise KeyboardInterrupt("simulated crash mid-write")  # ... then the process "dies"

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": torch.zeros(4)}, SPEC, epoch=2)
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes
    assert load_checkpoint(path)["epoch"] == 1
    assert _files(tmp_path) == ["m.pt"]


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_is_refused_without_running_code(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {}, "spec": SPEC, "format_version": 1, "boom": _Evil(marker)}
    with open(path, "wb") as handle:
        if writer == "pickle":
            pickle.dump(payload, handle, protocol=2)
        else:
            torch.save(payload, handle)
    with pytest.raises(CheckpointError, match="refuses to unpickle arbitrary objects") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_model(path)
    assert not marker.exists()


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save({"state_dict": {}, "spec": SPEC, "format_version": 1, "model": _tiny_model()}, path)
    with pytest.raises(CheckpointError, match="refuses to unpickle arbitrary objects"):
        load_checkpoint(path)
    torch.save(_tiny_model(), path)
    with pytest.raises(CheckpointError, match=str(path)) as err:
        load_checkpoint(path)
    assert "\x1b" not in str(err.value)  # no terminal escape codes in a message that lands in log files


def test_checkpoint_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(2)}, SPEC)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "c.pt").stat().st_mode) == 0o640


def test_corrupted_and_foreign_files(tmp_path):
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(64, 64)}, SPEC)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError, match=str(path)):
            load_checkpoint(path)

    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"w": torch.zeros(1)}}, foreign)  # loads weights-only, wrong layout
    with pytest.raises(CheckpointError, match="not a checkpoint written by save_checkpoint"):
        load_checkpoint(foreign)

    future = tmp_path / "future.pt"
    torch.save({"state_dict": {}, "spec": SPEC, "format_version": 99}, future)
    with pytest.raises(CheckpointError, match="format_version=99"):
        load_checkpoint(future)


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(path)):
        load_checkpoint(path)


@pytest.mark.parametrize("bad", [
    {"model": nn.Linear(2, 2)},
    {"stats": {"nested": [1, np.float64(0.5)]}},
    {"arr": np.zeros(3)},
    {"fn": print},
])
def test_unsafe_extra_rejected_at_save(tmp_path, bad):
    path = tmp_path / "m.pt"
    with pytest.raises(TypeError, match="weights-only checkpoint cannot hold"):
        save_checkpoint(path, {"w": torch.zeros(1)}, SPEC, **bad)
    assert _files(tmp_path) == []


def test_save_rejects_module_as_state_dict_and_reserved_keys(tmp_path):
    with pytest.raises(TypeError, match="state_dict"):
        save_checkpoint(tmp_path / "m.pt", nn.Linear(2, 2), SPEC)
    with pytest.raises(TypeError, match="reserved"):
        save_checkpoint(tmp_path / "m.pt", {"w": torch.zeros(1)}, SPEC, format_version=3)
    assert _files(tmp_path) == []


def test_load_model_rebuilds_resnet_with_equal_outputs(tmp_path):
    torch.manual_seed(0)
    net = models.build_model("resnet8", num_classes=5)
    net.train()
    net(torch.randn(4, 3, 16, 16))  # non-trivial BN statistics
    net.eval()
    path = save_checkpoint(tmp_path / "r.pt", net.state_dict(), models.model_spec("resnet8", net, 5), epoch=3)

    rebuilt, checkpoint = load_model(path)
    assert not rebuilt.training
    assert checkpoint["epoch"] == 3 and checkpoint["spec"]["name"] == "resnet8"
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_load_model_needs_architecture_in_spec(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", {"w": torch.zeros(1)}, {"widths": [1]})
    with pytest.raises(CheckpointError, match="name"):
        load_model(path)


def test_truncated_checkpoint_names_its_path_and_says_to_delete_and_rerun(tmp_path):
    """torch.load on a cut-short file mostly raises a bare ``OSError: [Errno 22] Invalid argument``; every cut
    must give an error naming the file (an OSError stays an OSError) and saying what to do."""
    good = save_checkpoint(tmp_path / "good.pt", {"w": torch.randn(64, 64), "b": torch.randn(64)}, SPEC, epoch=3)
    data = good.read_bytes()
    seen_os_error = False
    for cut in (0, 200, len(data) // 3, len(data) // 2, len(data) - 400, len(data) - 1):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises((OSError, CheckpointError)) as info:
            load_checkpoint(path)
        err = info.value
        assert str(path) in str(err), (cut, str(err))
        assert "truncated or damaged" in str(err) and "Delete it and re-run" in str(err), (cut, str(err))
        if isinstance(err, OSError):
            seen_os_error = True
            assert err.errno == errno.EINVAL and err.filename == str(path)
            assert isinstance(err, CheckpointError)  # skipped like any damaged checkpoint where that is done
    assert seen_os_error, "no cut reached torch.load's OSError path"


def test_full_disk_while_saving_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt" / "m.pt"
    save_checkpoint(path, {"w": torch.arange(4.0)}, SPEC, epoch=1)
    before = path.read_bytes()
    real_save = torch.save

    def disk_full(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as torch.save to a full disk raises it

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(OSError) as info:
        save_checkpoint(path, {"w": torch.zeros(4)}, SPEC, epoch=2)
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value) and "Free space" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and _files(path.parent) == ["m.pt"]
