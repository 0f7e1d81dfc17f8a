"""Layout ``webdataset``: one WebDataset tar per shard, ``webdataset/<shard>.tar`` (the layout for millions of images).

Per sample the tar holds ``<key>.<ext>`` (when it has an image) and ``<key>.json`` (its metrics row). A sample's
``image_uri`` is its shard's tar, and ``image_offset`` / ``image_bytes`` locate the image inside it (a ranged
read). The tar is built when the shard is assembled, so pieces carry the image bytes until then; a writer that
crashed between the tar and the record leaves a tar without record, which ``clean_up`` removes.
"""

from __future__ import annotations

import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import PurePosixPath

from pipeline.sinks.base import ImageSink, LayoutConfig, Locations, ShardImages
from pipeline.sinks.registry import SinkBuilder

WEBDATASET = "webdataset"


@dataclass(frozen=True)
class WebDatasetConfig(LayoutConfig):
    name = "webdataset"
    description = "one WebDataset tar per shard under webdataset/"
    serves_files = False


class WebDatasetSink(ImageSink):
    """Writes each whole shard's tar; images are located by byte range inside it."""

    needs_image_bytes = True

    def write_samples(self, samples: ShardImages) -> None:
        """Nothing yet: the images travel in the pieces until the shard's tar is built."""

    def assemble(self, shard: str, samples: ShardImages) -> Locations:
        tar, tar_offsets = _tar(samples)
        self.storage.write_atomic(self.storage.path(WEBDATASET, f"{shard}.tar"), tar)
        tar_uri = self.storage.url(WEBDATASET, f"{shard}.tar")
        return Locations([tar_uri if ok else None for ok in samples.ok],
                         [o if ok else None for o, ok in zip(tar_offsets, samples.ok)])

    def clean_up(self, recorded: set[str]) -> None:
        for tar in self.storage.list(self.storage.path(WEBDATASET), ".tar"):
            if PurePosixPath(tar).stem not in recorded:  # its writer crashed before the record: the shard is redone
                self.storage.remove(tar)


def _tar(samples: ShardImages) -> tuple[bytes, list[int]]:
    """A WebDataset shard: per sample ``<key>.<ext>`` (when it has an image) and ``<key>.json``.

    The key is the image name without its slug (``<sha256 of prompt_id>_<sample_idx>``): unique, free of
    dots (WebDataset splits keys at the first dot) and short enough for a plain ustar header.

    Returns the tar and, per sample, the byte offset of its image data inside it (-1 without image).
    """
    chunks, offsets, position = [], [], 0
    for i, name in enumerate(samples.names):
        key, ext = name.rsplit("-", 1)[1].rsplit(".", 1)
        record = {k: v[i] for k, v in samples.metrics.items() if k not in ("written_at", "image")}
        members = [(f"{key}.{ext}", samples.images[i])] if samples.ok[i] else []
        members.append((f"{key}.json", json.dumps(record, default=str).encode()))
        offsets.append(position + tarfile.BLOCKSIZE if samples.ok[i] else -1)
        for member, data in members:
            padding = -len(data) % tarfile.BLOCKSIZE
            chunks += [_ustar_header(member, len(data)), data, b"\0" * padding]
            position += tarfile.BLOCKSIZE + len(data) + padding
    chunks.append(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker
    return b"".join(chunks), offsets


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file (``tarfile.addfile`` spends ~0.5 ms per member in
    pure-Python copies and field packing, which made tars 80 % of a write task's time)."""
    header = bytearray(tarfile.BLOCKSIZE)
    header[0:100] = name.encode().ljust(100, b"\0")
    header[100:148] = b"0000644\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"%011o\0" % int(time.time())
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[156:157] = tarfile.REGTYPE
    header[257:265] = tarfile.POSIX_MAGIC
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


SinkBuilder.register(WebDatasetConfig, WebDatasetSink)
