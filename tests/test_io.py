"""utils.io: the one atomic file write (no partial file, no leftover temporary file), JSON results, null values."""
import json

import pytest

import utils.io
from utils.io import NULL_STRINGS, atomic_path, atomic_write, is_null, temporary_path, write_json


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
