"""Which settings differ between the config a result was made with and the one asked for now.

Used wherever finished work is reused (a pipeline stage, a shard of data models): reusing it under other
settings would let results stand for settings that never produced them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

__all__ = ["changed_settings", "flatten", "missing_sections"]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested mappings (lists are leaves)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def changed_settings(then: Mapping[str, Any], now: Mapping[str, Any], only: Iterable[str] | None = None,
                     skip: Iterable[str] = ()) -> list[str]:
    """``"key: then -> now"`` for every leaf that differs, sorted by key.

    Keys present on only one side (added or removed by a newer version of the code) are not differences.
    ``only``: compare just these keys and the keys under them; ``skip``: never compare these and the keys
    under them."""
    old, new = flatten(then), flatten(now)
    only, skip = (None if only is None else tuple(only)), tuple(skip)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(old.keys() & new.keys())
            if old[key] != new[key] and (only is None or _under(key, only)) and not _under(key, skip)]


def missing_sections(then: Mapping[str, Any], now: Mapping[str, Any], skip: Iterable[str] = ()) -> list[str]:
    """The top-level sections (keys holding a mapping) of ``now`` that ``then`` lacks, sorted; ``skip`` as in
    :func:`changed_settings`.

    :func:`changed_settings` ignores keys present on one side only, so that a key a newer version of the code adds
    is not a difference; a whole missing section is different: it is what a record cut short (or emptied) looks
    like, and a record without it cannot say which settings made a result."""
    skip = tuple(skip)
    return sorted(key for key, value in now.items()
                  if isinstance(value, Mapping) and key not in then and not _under(key, skip))


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)
