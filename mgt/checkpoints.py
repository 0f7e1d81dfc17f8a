"""Getting weights onto this machine once, and checking them against the module they are for.

One copy for the engine's models (``mgt.loading``) and the scorers' checkpoints (``actors.scoring.hps``): the
local cache, the fetch from an object store (``s3://``, ``gs://``, any fsspec URI) or from the Hugging Face
hub, and the strict state-dict check that lists every missing, unexpected and mis-shaped tensor in one
error. Downloads land under a temporary name and are renamed into place, so actors that start together
on one node never read a half-written copy, and a finished copy is never fetched again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch

COMPLETE = ".maskray-complete"  # written last into a fetched folder


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The local cache: ``override``, else ``$MASKRAY_CACHE``, else ``~/.cache/maskray``."""
    return Path(override or os.environ.get("MASKRAY_CACHE") or Path.home() / ".cache" / "maskray")


def fetch_object(uri: str, root: Path, storage_options: dict[str, Any] | None = None, *,
                 what: str = "object") -> Path:
    """A local copy of the one object at ``uri``: ``root/<hash of uri>/<name>``, fetched once.

    Raises:
        FileNotFoundError: no object at ``uri``; ``what`` names it in the message.
        ValueError: the URI's scheme has no fsspec backend.
    """
    target = _slot(uri, root) / uri.rstrip("/").rsplit("/", 1)[-1]
    if target.is_file():
        return target
    fs, path = _open(uri, storage_options, what)
    if not fs.isfile(path):
        raise FileNotFoundError(f"{what} {uri!r} does not exist (check the bucket, the key and credentials)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _staged(target) as staging:
        fs.get_file(path, str(staging))
    return target


def fetch_prefix(uri: str, root: Path, storage_options: dict[str, Any] | None = None, *,
                 what: str = "folder") -> Path:
    """A local copy of every object under the prefix ``uri``: the folder ``root/<hash of uri>``, fetched once.

    Raises:
        FileNotFoundError: nothing exists at ``uri``; ``what`` names it in the message.
        ValueError: the URI's scheme has no fsspec backend.
    """
    target = _slot(uri, root)
    if (target / COMPLETE).exists():
        return target
    fs, path = _open(uri, storage_options, what)
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {uri!r} does not exist (check the bucket, the prefix and credentials)")
    with _staged(target) as staging:
        staging.mkdir(parents=True)
        for remote in fs.find(path):
            local = staging / remote[len(path.rstrip("/")) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        (staging / COMPLETE).touch()
    return target


def fetch_hub(repo_id: str, cache: str | os.PathLike | None, *, filename: str | None = None,
              allow_patterns: list[str] | None = None, what: str) -> Path:
    """``filename`` of the hub repo (``hf_hub_download``), or a snapshot of its ``allow_patterns`` files.

    ``HF_HUB_OFFLINE`` is honoured: offline, only what the hub cache ``cache`` already holds is found.

    Raises:
        FileNotFoundError: not cached and not fetchable (names ``what``, the cache and the offline switch),
            or the repo cannot be fetched.
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, cache_dir=cache))
        return Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=allow_patterns))
    except EntryNotFoundError as error:  # also what an offline hub raises for anything not cached
        raise FileNotFoundError(
            f"{what} is not in the local hub cache {cache or '(the default HF cache)'} and cannot be fetched from "
            f"the hub (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}); download it once with network "
            f"access or pass a local path"
        ) from error
    except (RepositoryNotFoundError, HfHubHTTPError) as error:
        raise FileNotFoundError(f"{what} could not be fetched from the hub: {error}") from error


def state_dict_mismatch(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """Every way ``state`` fails a strict ``module.load_state_dict``, on one line; None when it fits.

    ``"missing a, b (+3 more); unexpected c; shape mismatch d: weights (8, 4) vs model (8, 2)"``.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: weights {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]

    def head(items: list[str]) -> str:
        return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

    problems = [f"{kind} {head(items)}" for kind, items in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
    return "; ".join(problems) or None


def _slot(uri: str, root: Path) -> Path:
    """The cache folder of ``uri``: a short hash, so any URI maps to one safe folder name."""
    return root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def _open(uri: str, storage_options: dict[str, Any] | None, what: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ValueError, ImportError) as error:  # unknown protocol, or its fsspec backend is not installed
        raise ValueError(f"{what} URI {uri!r} cannot be opened with fsspec: {error}") from error


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``target``, renamed onto it when the block succeeds."""
    staging = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        yield staging
        if target.is_dir():
            shutil.rmtree(target)  # an unfinished copy from a crashed run
        staging.replace(target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)
