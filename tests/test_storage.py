"""``pipeline.storage``: local writes that survive a power loss, and leftovers of a crashed write ignored."""

from __future__ import annotations

import os

import pytest

from pipeline.storage import Storage


def test_local_write_is_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("rename", str(b))), real_replace(a, b))[1])
    storage = Storage(str(tmp_path / "out"))
    target = storage.path("shards", "s0.parquet")
    storage.write_atomic(target, b"record")
    staging = events[1][1]
    assert staging.startswith(target + ".tmp-")
    assert events == [("fsync", str(tmp_path / "out")),  # the new shards/ folder's entry in out/
                      ("fsync", staging), ("rename", target), ("fsync", os.path.dirname(target))]
    assert open(target, "rb").read() == b"record" and os.listdir(os.path.dirname(target)) == ["s0.parquet"]


def test_a_failed_write_leaves_no_staging_file(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    storage.write_atomic(storage.path("m.json"), b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        storage.write_atomic(storage.path("m.json"), b"new")
    assert sorted(os.listdir(tmp_path)) == ["m.json"] and (tmp_path / "m.json").read_bytes() == b"old"


def test_leftovers_of_a_crashed_write_are_never_listed(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_atomic(storage.path("shards", "s0.parquet"), b"x")
    (tmp_path / "shards" / "s1.parquet.tmp-0badc0de").write_bytes(b"")  # a crash between write and rename
    assert storage.list(storage.path("shards"), ".parquet") == [storage.path("shards", "s0.parquet")]
    assert list(storage.sizes(storage.path("shards"), ".parquet").values()) == [1]
