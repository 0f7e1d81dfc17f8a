"""``mgt.checkpoints``: one cache and fetch for models and scorer checkpoints, one state-dict check."""

import fsspec
import pytest
import torch

from mgt.checkpoints import COMPLETE, fetch_object, fetch_prefix, state_dict_mismatch


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
