"""What an output layout is: the ``ImageSink`` interface, its ``LayoutConfig`` and the image names every layout shares.

A layout decides where a run's encoded images go under ``--out`` and what a metrics row's ``image_uri`` and
``image_offset`` hold. ``SampleSink`` (``pipeline.sinks.datasink``) drives it through the life of a shard:

1. ``write_samples``: a write task hands over the samples it just wrote (before their piece is on storage);
2. ``assemble``: the task that completes a shard hands over all its samples, images included when the layout
   ``needs_image_bytes``; the layout writes its shard-level output and says where each image is;
3. ``read_images``: a rerun completing a partial shard reads the kept samples' images back from where
   ``assemble`` put them (only when the layout ``needs_image_bytes``: they go into a piece again);
4. ``clean_up``: ``finalize`` lets the layout drop what writers left for shards that have no record;
5. ``finish``: ``finalize`` lets the layout write its run-level files (a dataset card) once the metrics are final.

A layout is one module: a ``LayoutConfig`` subclass naming it, an ``ImageSink`` subclass, and the line
``SinkBuilder.register(Config, builder)`` (``pipeline.sinks.registry``); ``pipeline/sinks/__init__.py`` imports it.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.storage import Storage

EXTENSIONS = {"png": "png", "webp": "webp", "jpeg": "jpg"}
SLUG_CHARS = 48
UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_name(prompt_id: str, sample_idx: int, image_format: str, candidate: int | None = 0) -> str:
    """A file name that stays inside ``images/`` whatever ``prompt_id`` holds, distinct for distinct ids.

    ``<slug>-<sha256>_<sample_idx>.<ext>``; a ``--best-of`` candidate other than 0 adds ``c<candidate>`` after the
    sample index (candidate 0 keeps the plain name, so ``--best-of 1`` names files as a plain run).

    The id's first 48 characters, runs outside ``[A-Za-z0-9._-]`` replaced by ``-`` and no leading dots,
    give a readable slug; the full SHA-256 of the id (64 hex digits, no truncation) keeps distinct ids
    distinct even when they share a long prefix (URLs) or differ only in characters the slug drops.
    """
    slug = UNSAFE.sub("-", prompt_id[:SLUG_CHARS]).strip(".-") or "prompt"
    digest = hashlib.sha256(prompt_id.encode()).hexdigest()
    suffix = f"c{int(candidate)}" if candidate else ""
    return f"{slug}-{digest}_{int(sample_idx)}{suffix}.{EXTENSIONS[image_format]}"


def out_path(storage: Storage, uri: str) -> str:
    """The path inside ``storage``'s filesystem of a record's ``image_uri``, which must lie under ``--out``.

    A record is read back on a rerun (a partial shard's kept images) and by the run report: a forged or foreign
    one must not make the job read ``/etc/...`` or another bucket into its output.

    Raises:
        ValueError: ``uri`` is not below ``--out`` (or climbs out of it with ``..``).
    """
    root = storage.uri.rstrip("/") + "/"
    relative = uri[len(root):] if uri.startswith(root) else ""
    if not relative or any(part in ("", ".", "..") for part in relative.split("/")):
        raise ValueError(f"image_uri {uri[:200]!r} is not under --out {storage.uri}")
    return storage.path(relative)


@dataclass(frozen=True)
class LayoutConfig:
    """The settings of one layout; each layout subclasses it and registers a builder for the subclass.

    Class attributes, read without building a sink (``--layout``'s help, ``maskray evaluate``'s check):
        name: the value of ``--layout``.
        description: where the images go, for the help text.
        serves_files: every good sample's ``image_uri`` is a file holding its image alone, readable by URI
            (what the evaluation report reads).
        default_max_shard_size: the most samples of a default shard (``pipeline.shards.default_shard_size``),
            so a layout writing one file per shard keeps its files near the size it aims for.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    serves_files: ClassVar[bool]
    default_max_shard_size: ClassVar[int] = 1000

    image_format: str = "png"  # png, webp or jpeg: the images' encoding and file extension


@dataclass(frozen=True)
class ShardImages:
    """The samples of one write (``write_samples``) or of a whole shard (``assemble``), in row order.

    ``names`` are the ``image_name`` of each sample, ``images`` its encoded image (None when the piece carries
    none: a failed sample, or a layout that does not need the bytes), ``ok`` whether it has a good image, and
    ``metrics`` the rows' other columns by name (what a WebDataset sample's ``.json`` holds).
    """

    names: list[str]
    images: list[bytes | None]
    ok: list[bool]
    metrics: dict[str, list]


@dataclass(frozen=True)
class Locations:
    """Per sample of an assembled shard, its metrics row's ``image_uri`` and ``image_offset`` (None: no image)."""

    uris: list[str | None]
    offsets: list[int | None]


class ImageSink(ABC):
    """Where one layout puts a run's images under ``--out`` (see the module docstring for when each call comes).

    Args:
        config: the layout's settings.
        storage: the ``--out`` root.
    """

    #: pieces carry each good sample's encoded image until its shard is assembled (the layout builds a
    #: shard-level file from them); False when ``write_samples`` already stored every image for good.
    needs_image_bytes: ClassVar[bool] = False

    def __init__(self, config: LayoutConfig, storage: Storage):
        self.config, self.storage = config, storage

    @property
    def serves_files(self) -> bool:
        return self.config.serves_files

    @abstractmethod
    def write_samples(self, samples: ShardImages) -> None:
        """Store what a write task just generated, before its piece is written."""

    @abstractmethod
    def assemble(self, shard: str, samples: ShardImages) -> Locations:
        """Write the shard-level output of a whole shard (before its record); returns where each image is."""

    def read_images(self, record: pa.Table) -> list[bytes | None]:
        """The images of a completion record's rows, read back from their ``image_uri`` (and, when set, the byte
        range ``image_offset`` + ``image_bytes``), all in one batched read; None for a row without image.

        Raises:
            ValueError: an ``image_uri`` is not under ``--out`` (:func:`out_path`).
        """
        uris, offsets = record["image_uri"].to_pylist(), record["image_offset"].to_pylist()
        sizes = record["image_bytes"].to_pylist()
        images: list[bytes | None] = [None] * record.num_rows
        wanted = [i for i, uri in enumerate(uris) if uri]
        paths = [out_path(self.storage, uris[i]) for i in wanted]
        for i in wanted:
            if offsets[i] is not None and sizes[i] is None:
                raise ValueError(f"image_bytes is null beside image_offset {offsets[i]} (image_uri {uris[i][:200]!r})")
        starts = [offsets[i] for i in wanted]
        ends = [None if offsets[i] is None else offsets[i] + sizes[i] for i in wanted]
        for i, data in zip(wanted, self.storage.read_ranges(paths, starts, ends)):
            images[i] = data
        return images

    @abstractmethod
    def clean_up(self, recorded: set[str]) -> None:
        """At ``finalize``: remove what writers left for shards not in ``recorded`` (shards without a record)."""

    def finish(self, manifest: dict) -> None:
        """At ``finalize``, after the metrics and counts: write the layout's run-level files (none by default)."""
        return None
