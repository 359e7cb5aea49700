"""utils.io: the one atomic file write (no partial file, no leftover temporary file), JSON results, null values."""
import errno
import json
import os
import pickle

import pytest

import utils.io
from utils.io import NULL_STRINGS, FileError, atomic_path, atomic_write, is_null, temporary_path, write_json


def test_atomic_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    atomic_write(path, "one")
    atomic_write(path, b"two", durable=True)
    assert path.read_text() == "two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.txt"]
    assert temporary_path(path).parent == path.parent and temporary_path(path).name.startswith(".a.txt.")


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch, error):
    path = tmp_path / "a.txt"
    atomic_write(path, "old")

    def half_then_fail(target, data):
        target.write_bytes(data[: len(data) // 2])
        raise error("disk full")

    monkeypatch.setattr(utils.io, "write_bytes", half_then_fail)
    with pytest.raises(error):
        atomic_write(path, "new content")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    with pytest.raises(ValueError), atomic_path(path) as tmp:
        tmp.write_text("never published")
        raise ValueError("the block failed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_json_and_null_values(tmp_path):
    payload = {"b": [1, 2.5, None], "a": "x"}
    write_json(tmp_path / "r.json", payload)
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text) == payload and text.endswith("}\n") and text.startswith('{\n  "b"')
    assert all(is_null(v) for v in (None, *NULL_STRINGS, " null "))
    assert not any(is_null(v) for v in (0, False, "nul", "x", []))


def test_a_full_disk_names_the_target_file_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "results" / "r.json"
    atomic_write(path, "previous")

    def disk_full(target, data):  # half of the bytes fit, then the disk is full (the OS names the temporary file)
        with open(target, "xb") as handle:
            handle.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(utils.io, "write_bytes", disk_full)
    with pytest.raises(OSError) as info:  # still an OSError for callers that catch one
        atomic_write(path, "new content " * 100, durable=True)
    err = info.value
    assert isinstance(err, FileError) and err.errno == errno.ENOSPC and err.filename == str(path)
    message = str(err)
    assert str(path) in message and "disk is full" in message and "Free space" in message
    assert ".tmp" not in message  # the file the user knows, not the temporary one
    assert isinstance(err.__cause__, OSError) and err.__cause__.errno == errno.ENOSPC
    assert path.read_text() == "previous" and sorted(p.name for p in path.parent.iterdir()) == ["r.json"]
    # the same through write_json, and another OS error names the file too
    with pytest.raises(OSError, match="disk is full") as info:
        write_json(path, {"a": 1})
    assert str(path) in str(info.value)

    def denied(target, data):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    monkeypatch.setattr(utils.io, "write_bytes", denied)
    with pytest.raises(OSError) as info:
        atomic_write(path, "x")
    assert info.value.errno == errno.EACCES and str(path) in str(info.value) and "PermissionError" in str(info.value)
    assert path.read_text() == "previous" and sorted(p.name for p in path.parent.iterdir()) == ["r.json"]


def test_file_error_keeps_its_message_and_attributes_through_pickle_and_one_argument_rebuilds():
    err = FileError("cannot write /x/y (no space)", errno=errno.ENOSPC, strerror="No space", filename="/x/y")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is FileError and str(again) == str(err)
    assert (again.errno, again.strerror, again.filename) == (errno.ENOSPC, "No space", "/x/y")
    # a DataLoader worker's exception is rebuilt in the main process as type(err)(message)
    assert str(FileError("Caught FileError in DataLoader worker process 0 ... /x/y")).endswith("/x/y")
