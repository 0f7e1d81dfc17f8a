"""Layout ``files``: one image file per sample, ``images/<slug>-<sha256>_<sample_idx>.<ext>``.

A sample's ``image_uri`` is its image file and ``image_offset`` is null. The files are written by the write
task that generated them, so pieces carry no image bytes and assembly writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.sinks.base import ImageSink, LayoutConfig, Locations, ShardImages
from pipeline.sinks.registry import SinkBuilder

IMAGES = "images"


@dataclass(frozen=True)
class FilesConfig(LayoutConfig):
    name = "files"
    description = "one file per sample under images/"
    serves_files = True


class FilesSink(ImageSink):
    """Writes each good sample's image file as soon as it is generated."""

    def write_samples(self, samples: ShardImages) -> None:
        for name, image, ok in zip(samples.names, samples.images, samples.ok):
            if ok:
                self.storage.write_atomic(self.storage.path(IMAGES, name), image)

    def assemble(self, shard: str, samples: ShardImages) -> Locations:
        uris = [self.storage.url(IMAGES, n) if ok else None for n, ok in zip(samples.names, samples.ok)]
        return Locations(uris, [None] * len(uris))

    def clean_up(self, recorded: set[str]) -> None:
        """Nothing: image files are kept (a shard redone writes the same names again)."""


SinkBuilder.register(FilesConfig, FilesSink)
