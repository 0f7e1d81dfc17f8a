"""``mgt.hub.checkpoints``: one cache and fetch for models and scorer checkpoints, one state-dict check."""

import os
import re
import threading
import time

import fsspec
import pytest
import torch

import mgt.hub.checkpoints as checkpoints
import mgt.hub.loading as loading
from mgt.hub.checkpoints import (
    COMPLETE,
    LEFTOVER_AGE_S,
    fetch_object,
    fetch_prefix,
    remove_leftovers,
    state_dict_mismatch,
)
from mgt.hub.registry import Registry


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    fs.pipe("/maskray-ckpt/model/a/config.json", b"{}")
    fs.pipe("/maskray-ckpt/model/b.safetensors", b"weights")
    yield fs
    if fs.exists("/maskray-ckpt"):
        fs.rm("/maskray-ckpt", recursive=True)


def test_an_object_is_fetched_once(tmp_path, bucket):
    first = fetch_object("memory://maskray-ckpt/model/b.safetensors", tmp_path)
    bucket.rm("/maskray-ckpt/model/b.safetensors")
    assert fetch_object("memory://maskray-ckpt/model/b.safetensors", tmp_path) == first
    assert first.name == "b.safetensors" and first.read_bytes() == b"weights"
    assert [p.name for p in first.parent.iterdir()] == ["b.safetensors"]  # no staging file left behind


def test_a_prefix_is_fetched_once_and_only_when_complete(tmp_path, bucket):
    folder = fetch_prefix("memory://maskray-ckpt/model/", tmp_path)
    assert (folder / "a" / "config.json").read_bytes() == b"{}" and (folder / COMPLETE).exists()
    bucket.rm("/maskray-ckpt/model", recursive=True)
    assert fetch_prefix("memory://maskray-ckpt/model", tmp_path) == folder  # trailing slash or not: one copy
    (folder / COMPLETE).unlink()  # as after a crash mid-copy: fetched again, and now it is gone
    with pytest.raises(FileNotFoundError, match="model URI 'memory://maskray-ckpt/model' does not exist"):
        fetch_prefix("memory://maskray-ckpt/model", tmp_path, what="model URI")


def test_missing_objects_and_unknown_schemes_are_named(tmp_path, bucket):
    with pytest.raises(FileNotFoundError, match="HPS checkpoint 'memory://maskray-ckpt/none.pt' does not exist"):
        fetch_object("memory://maskray-ckpt/none.pt", tmp_path, what="HPS checkpoint")
    with pytest.raises(ValueError, match="cannot be opened with fsspec"):
        fetch_object("nosuchscheme://x/y.pt", tmp_path)


def test_state_dict_mismatch_lists_every_problem_on_one_line():
    module = torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    state = dict(module.state_dict())
    assert state_dict_mismatch(module, state) is None
    state["0.weight"] = torch.zeros(3, 4)
    del state["1.bias"]
    state["extra"] = torch.zeros(1)
    assert state_dict_mismatch(module, state) == ("missing 1.bias; unexpected extra; shape mismatch 0.weight: "
                                                  "weights (3, 4) vs model (2, 4)")


@pytest.fixture
def ckpt_bucket(s3):
    """The test's moto S3 server with bucket ``ckpt-bucket``: a filesystem on it and its storage options."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("ckpt-bucket")
    return fs, s3


@pytest.mark.parametrize("key", ["evil/../escape.bin", "evil/a/../../escape.bin", "evil//escape.bin"])
def test_keys_that_leave_the_cache_folder_are_refused(tmp_path, ckpt_bucket, key):
    fs, options = ckpt_bucket
    prefix = key.split("/")[0]
    fs.pipe(f"ckpt-bucket/{prefix}/ok.json", b"{}")
    fs.pipe(f"ckpt-bucket/{key}", b"payload")  # S3 keeps such keys verbatim and lists them so
    root = tmp_path / "cache" / "objects"
    message = f"object 'ckpt-bucket/{key}' under 's3://ckpt-bucket/{prefix}' has a key that would leave the local"
    with pytest.raises(ValueError, match=re.escape(message)):
        fetch_prefix(f"s3://ckpt-bucket/{prefix}", root, options)
    assert not list(tmp_path.rglob("escape.bin")) and not os.path.exists("/escape.bin")
    assert not root.exists() or not any(root.iterdir())  # no entry, no staging folder left


def test_concurrent_fills_publish_one_copy_and_never_replace_it(tmp_path, ckpt_bucket, monkeypatch):
    """Two fillers download the same entry at once; the first rename wins, the second copy is discarded
    without touching the folder the first one's caller is already reading."""
    fs, options = ckpt_bucket
    for i in range(20):
        fs.pipe(f"ckpt-bucket/race/part/{i}.bin", os.urandom(1000))
    root = tmp_path / "objects"
    staged = threading.Barrier(2)  # both copies are complete before either is published
    first_published = threading.Event()
    seen = {}
    publish = checkpoints._publish_folder

    def racing_publish(staging, target):
        staged.wait(timeout=30)
        if threading.current_thread().name == "second":
            first_published.wait(timeout=30)
            seen["inode"] = target.stat().st_ino
            seen["open"] = open(target / "part" / "0.bin", "rb")  # a reader of the first copy
        publish(staging, target)
        if threading.current_thread().name == "first":
            first_published.set()

    monkeypatch.setattr(checkpoints, "_publish_folder", racing_publish)
    results = {}
    threads = [threading.Thread(name=name, target=lambda n=name: results.__setitem__(
        n, fetch_prefix("s3://ckpt-bucket/race", root, options))) for name in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results["first"] == results["second"] and (results["first"] / COMPLETE).exists()
    assert results["first"].stat().st_ino == seen["inode"]  # the published folder was not replaced
    with seen.pop("open") as reader:
        assert reader.read() == fs.cat("ckpt-bucket/race/part/0.bin")
    assert [p.name for p in root.iterdir()] == [results["first"].name]  # the second copy is gone
    assert len(list((results["first"] / "part").iterdir())) == 20
    fs.rm("ckpt-bucket/race", recursive=True)


def test_an_unfinished_entry_is_replaced_and_a_complete_one_kept(tmp_path, bucket):
    target = checkpoints._slot("memory://maskray-ckpt/model", tmp_path)
    (target / "a").mkdir(parents=True)
    (target / "a" / "config.json").write_bytes(b"half")  # left by a crash of an older version: no marker
    assert (fetch_prefix("memory://maskray-ckpt/model", tmp_path) / "a" / "config.json").read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # the unfinished copy was moved aside and removed


def test_registered_builds_race_to_one_folder(tmp_path, monkeypatch):
    builds = threading.Barrier(2)

    def build(folder):
        folder.mkdir()
        (folder / "model.json").write_text(threading.current_thread().name)
        builds.wait(timeout=30)  # both builds are done before either is published

    registry = Registry("model", "maskray.test-models", {})
    registry.register("racing-model", build)
    monkeypatch.setattr(loading, "MODELS", registry)
    results = []
    threads = [threading.Thread(name=name, target=lambda: results.append(
        loading._registered_folder("racing-model", tmp_path / "models" / "racing-model"))) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [tmp_path / "models" / "racing-model"] * 2
    assert (results[0] / "model.json").read_text() in ("a", "b") and (results[0] / COMPLETE).exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["racing-model"]


def test_leftovers_of_killed_fetches_are_removed_once_stale(tmp_path):
    """A SIGKILLed fetch leaves its temporary copy (and a crash mid-publish a moved-aside folder); the next
    fetch of that entry removes those untouched for a day and leaves live ones alone."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"w")
    root = tmp_path / "cache"
    target = fetch_object(str(source / "weights.bin"), root)
    old = time.time() - 2 * LEFTOVER_AGE_S
    dead_file = target.with_name(f"{target.name}.tmp-123-456-deadbeef")
    dead_file.write_bytes(b"half")
    dead_folder = target.with_name(f"{target.name}.stale-cafe0001")
    (dead_folder / "part").mkdir(parents=True)
    (dead_folder / "part" / "0.bin").write_bytes(b"x")
    for path in (dead_file, dead_folder / "part" / "0.bin", dead_folder / "part", dead_folder):
        os.utime(path, (old, old))
    live = target.with_name(f"{target.name}.tmp-789-1-feedface")
    (live / "part").mkdir(parents=True)
    (live / "part" / "new.bin").write_bytes(b"being written")  # fresh inside, however old the folder is
    os.utime(live, (old, old))
    unrelated = target.with_name(f"{target.name}.tmpfile")
    unrelated.write_bytes(b"not ours")
    os.utime(unrelated, (old, old))
    target.unlink()  # the next fetch of the entry runs
    assert fetch_object(str(source / "weights.bin"), root).read_bytes() == b"w"
    assert not dead_file.exists() and not dead_folder.exists()
    assert live.exists() and unrelated.exists()
    assert remove_leftovers(target, max_age_s=-1) == [live]  # age is what decides
