"""Getting weights onto this machine once, and checking them against the module they are for.

One copy for the engine's models (``mgt.hub.loading``) and the scorers' checkpoints (``actors.scoring.hps``): the
local cache, the fetch from an object store (``s3://``, ``gs://``, any fsspec URI) or from the Hugging Face
hub, and the strict state-dict check that lists every missing, unexpected and mis-shaped tensor in one
error. Downloads land under a temporary name unique to the process and thread and are renamed into place
in one step, so actors that start together on one node never read a half-written copy, the first finished
copy wins (a later one is discarded, never renamed over a folder another actor may be reading), and a
finished copy is never fetched again. Remote keys that would land outside their cache folder (``..``
components, absolute paths) are refused. What a killed process leaves (its temporary copy, a folder moved
aside) is removed by the next fetch of the same entry once nothing in it has changed for ``LEFTOVER_AGE_S``.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch

COMPLETE = ".maskray-complete"  # written last into a fetched folder
LEFTOVER_AGE_S = 24 * 3600  # a temporary copy untouched this long belongs to a process that died


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
    with staged(target) as staging:
        fs.get_file(path, str(staging))
    return target


def fetch_prefix(uri: str, root: Path, storage_options: dict[str, Any] | None = None, *,
                 what: str = "folder") -> Path:
    """A local copy of every object under the prefix ``uri``: the folder ``root/<hash of uri>``, fetched once.

    Raises:
        FileNotFoundError: nothing exists at ``uri``; ``what`` names it in the message.
        ValueError: the URI's scheme has no fsspec backend, or an object's key would leave the folder.
    """
    target = _slot(uri, root)
    if (target / COMPLETE).exists():
        return target
    fs, path = _open(uri, storage_options, what)
    if not fs.exists(path):
        raise FileNotFoundError(f"{what} {uri!r} does not exist (check the bucket, the prefix and credentials)")
    prefix = path.rstrip("/") + "/"
    with staged(target) as staging:
        staging.mkdir(parents=True)
        for remote in fs.find(path):
            local = staging / _relative_key(remote, prefix, uri)
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


def _relative_key(remote: str, prefix: str, uri: str) -> str:
    """``remote``'s name below ``prefix``, refused when joining it to a local folder would leave the folder."""
    name = remote[len(prefix):] if remote.startswith(prefix) else remote
    parts = PurePosixPath(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise ValueError(f"object {remote!r} under {uri!r} has a key that would leave the local cache folder "
                         f"(an absolute path or '..' components); rename or remove that object")
    return name


@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A fresh path beside ``target`` (unique to this process and thread), published onto ``target`` when the
    block succeeds: a file replaces any older one, a folder is renamed into place unless a complete one
    (holding ``COMPLETE``) is already there, in which case the fresh copy is discarded and that one is used.
    """
    remove_leftovers(target)
    staging = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        if staging.is_dir():
            _publish_folder(staging, target)
        else:
            staging.replace(target)  # atomic; a reader that opened the older file keeps reading it
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        else:
            staging.unlink(missing_ok=True)


def remove_leftovers(target: Path, max_age_s: float = LEFTOVER_AGE_S) -> list[Path]:
    """Delete the temporary copies and moved-aside folders of ``target`` (``<name>.tmp-*``, ``<name>.stale-*``)
    in which nothing changed for ``max_age_s`` seconds: a live download keeps writing into its copy, a killed one
    leaves it behind for good. Returns what was removed.

    Age, not the owner's pid, decides, since a cache may be shared by the nodes of a cluster.
    """
    removed = []
    now = time.time()
    for path in target.parent.glob(f"{glob.escape(target.name)}.*"):
        if not path.name[len(target.name):].startswith((".tmp-", ".stale-")):
            continue
        with contextlib.suppress(OSError):  # another process may remove it at the same time
            entries = [path, *path.rglob("*")] if path.is_dir() else [path]
            if now - max(entry.lstat().st_mtime for entry in entries) <= max_age_s:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def _publish_folder(staging: Path, target: Path) -> None:
    """Rename the complete folder ``staging`` to ``target`` in one step; never delete a complete ``target``.

    An incomplete ``target`` (left by a crash in an older version, which deleted then renamed) is first moved
    aside under a unique name, so no other process ever sees a half-deleted folder at ``target``.
    """
    while True:
        try:
            staging.rename(target)  # atomic; fails when target is a non-empty folder
            return
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if (target / COMPLETE).exists():
            return  # another process finished first: use its copy, the caller discards ours
        aside = target.with_name(f"{target.name}.stale-{uuid.uuid4().hex[:8]}")
        try:
            target.rename(aside)
        except FileNotFoundError:
            continue  # another process moved it aside first
        if (aside / COMPLETE).exists():  # it was completed between the check and the move: put it back
            with contextlib.suppress(OSError):  # fails only if a third filler published meanwhile
                aside.rename(target)
                return
        shutil.rmtree(aside, ignore_errors=True)
