"""Layout ``both``: the ``files`` and ``webdataset`` layouts at once, composed by ``ComposedSink``.

A sample's ``image_uri`` is its image file (the first member's locations), ``image_offset`` is null; the shard's
tar is written beside the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.sinks.base import ImageSink, LayoutConfig, Locations, ShardImages
from pipeline.sinks.files import FilesConfig
from pipeline.sinks.registry import SinkBuilder
from pipeline.sinks.webdataset import WebDatasetConfig

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.storage import Storage


@dataclass(frozen=True)
class BothConfig(LayoutConfig):
    name = "both"
    description = "files and WebDataset tars"
    serves_files = True


class ComposedSink(ImageSink):
    """Several layouts written together; the metrics rows hold the first member's locations.

    Args:
        config: the composed layout's settings (its ``serves_files`` must be the first member's).
        members: the layouts' sinks, the one whose locations the records hold first.
    """

    def __init__(self, config: LayoutConfig, members: list[ImageSink]):
        super().__init__(config, members[0].storage)
        self.members = members

    @property
    def needs_image_bytes(self) -> bool:
        return any(member.needs_image_bytes for member in self.members)

    def write_samples(self, samples: ShardImages) -> None:
        for member in self.members:
            member.write_samples(samples)

    def assemble(self, shard: str, samples: ShardImages) -> Locations:
        locations = [member.assemble(shard, samples) for member in self.members]
        return locations[0]

    def read_images(self, record: pa.Table) -> list[bytes | None]:
        return self.members[0].read_images(record)

    def clean_up(self, recorded: set[str]) -> None:
        for member in self.members:
            member.clean_up(recorded)

    def finish(self, manifest: dict) -> None:
        for member in self.members:
            member.finish(manifest)


def build_both(config: BothConfig, storage: Storage) -> ComposedSink:
    members = [FilesConfig(config.image_format), WebDatasetConfig(config.image_format)]
    return ComposedSink(config, [SinkBuilder.build(member, storage) for member in members])


SinkBuilder.register(BothConfig, build_both)
