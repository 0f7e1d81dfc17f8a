"""One filesystem for a job's paths: local folders and object-store URIs through fsspec.

``Storage`` is small and picklable (it holds the URI and the fsspec options, and rebuilds the filesystem
in each Ray worker), so sinks and readers agree on one way to reach ``--out`` and ``--prompts``.
Writes that mark progress are atomic and durable: a local file is written beside its target, flushed to disk
(``fsync``) and renamed, and the folder is flushed so the rename survives a power loss; an object store PUT
of one object is atomic by itself. A crash can leave a ``<name>.tmp-<hex>`` file beside its target; ``list``
and ``sizes`` select by suffix (the sink and the manifest ask for ``.parquet`` and ``.tar``), so such
leftovers are never read.
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

READ_THREADS = 16  # concurrent local reads of many small files (object stores batch them in fsspec)


class OutFileError(ValueError):
    """A file under ``--out`` is not what a maskray run writes there (foreign, hand-edited or forged): the message
    names the file, what is wrong with it and what to do, in one line."""


class Storage:
    """The filesystem behind ``uri`` (``/data/out``, ``s3://bucket/out``, ``gs://...``).

    Args:
        uri: any local path or fsspec URI; relative local paths are made absolute so Ray workers agree.
        options: fsspec options (``key``, ``secret``, ``client_kwargs={"endpoint_url": ...}`` ...).
    """

    def __init__(self, uri: str, options: dict[str, Any] | None = None):
        self.options = dict(options or {})
        protocol = fsspec.utils.get_protocol(uri)
        self.local = protocol in ("file", "local")
        self.uri = os.path.abspath(os.path.expanduser(uri)) if self.local and "://" not in uri else uri.rstrip("/")

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "options": self.options, "local": self.local}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @cached_property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.uri, **self.options)[0]

    @cached_property
    def root(self) -> str:
        """``uri`` as a path inside ``fs`` (no scheme)."""
        return fsspec.core.url_to_fs(self.uri, **self.options)[1].rstrip("/")

    @cached_property
    def arrow_fs(self) -> pafs.FileSystem:
        """``fs`` for pyarrow and Ray Data readers."""
        return pafs.LocalFileSystem() if self.local else pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def strip(self, uri: str) -> str:
        """A URI or local path of this storage's scheme as a path inside ``fs``."""
        if self.local:
            return os.path.abspath(os.path.expanduser(uri))
        return fsspec.core.url_to_fs(uri, **self.options)[1]

    def path(self, *parts: str) -> str:
        """A path under the root, inside ``fs``."""
        return "/".join([self.root, *parts])

    def url(self, *parts: str) -> str:
        """A path under the root as the user would spell it (``s3://bucket/out/images/x.png``)."""
        return "/".join([self.uri, *parts])

    def write_atomic(self, path: str, data: bytes) -> None:
        """Write ``data`` to ``path`` so that readers see the old object or the whole new one, even after a
        power loss (a rename that reaches the disk before the data would leave an empty file)."""
        if self.local:
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):
                os.makedirs(folder, exist_ok=True)
                _fsync_folder(os.path.dirname(folder))  # the new folder's own entry
            staging = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(staging, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(staging, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(staging)
                raise
            _fsync_folder(folder)
        else:
            self.fs.pipe_file(path, data)

    def write_table(self, path: str, table: pa.Table) -> None:
        """Write ``table`` as one Parquet file at ``path``, atomically (``write_atomic``)."""
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_atomic(path, buffer.getvalue())

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_ranges(self, paths: list[str], starts: list[int | None], ends: list[int | None]) -> list[bytes]:
        """Bytes ``[starts[i], ends[i])`` of ``paths[i]`` (None: from the start / to the end), in order, fetched
        concurrently (fsspec's ``cat_ranges``: one request per range on object stores).

        Raises:
            FileNotFoundError: one of the files is missing.
        """
        if not paths:
            return []
        if self.local:
            with ThreadPoolExecutor(READ_THREADS) as pool:
                return list(pool.map(self.fs.cat_file, paths, starts, ends))
        found = self.fs.cat_ranges(paths, starts, ends, on_error="return")
        for data in found:
            if isinstance(data, Exception):
                raise data
        return found

    def read_many(self, paths: list[str]) -> list[bytes]:
        """The contents of ``paths`` in order, fetched concurrently (fsspec's batched ``cat``).

        Raises:
            FileNotFoundError: one of them is missing.
        """
        if not paths:
            return []
        if self.local:
            with ThreadPoolExecutor(READ_THREADS) as pool:
                return list(pool.map(self.read, paths))
        found = self.fs.cat(paths, on_error="return")
        for path in paths:
            if isinstance(found[path], Exception):
                raise found[path]
        return [found[path] for path in paths]

    def remove(self, path: str) -> None:
        """Delete a file or folder tree; a missing one is not an error."""
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def folders(self, folder: str) -> list[str]:
        """Names of the folders directly under ``folder`` (none if it is missing), sorted."""
        try:
            if self.local:
                with os.scandir(folder) as entries:
                    return sorted(e.name for e in entries if e.is_dir())
            self.fs.invalidate_cache(folder)
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory")

    def list(self, folder: str, suffix: str) -> list[str]:
        """Files directly under ``folder`` ending in ``suffix`` (none if the folder is missing)."""
        return sorted(self.sizes(folder, suffix))

    def sizes(self, folder: str, suffix: str) -> dict[str, int]:
        """Path -> size in bytes of the files directly under ``folder`` ending in ``suffix`` (one listing)."""
        try:
            if self.local:
                with os.scandir(folder) as entries:
                    return {e.path: e.stat().st_size for e in entries if e.name.endswith(suffix) and e.is_file()}
            self.fs.invalidate_cache(folder)  # other workers wrote here since the last listing
            entries = self.fs.ls(folder, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"]: int(e.get("size") or 0) for e in entries if e["name"].endswith(suffix)
                and e.get("type") == "file"}


def _fsync_folder(folder: str) -> None:
    """Flush a folder's entries (a rename into it) to disk; POSIX only, as Windows cannot open folders."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
