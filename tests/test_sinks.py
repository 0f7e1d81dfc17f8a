"""Output layouts as sinks (``pipeline.sinks``): the registry keyed by config type, and a layout added from
outside the package with one class and one registration, written, resumed and cleaned up by the real sink."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.parquet as pq
import pytest

from pipeline.partial import keep_written_samples
from pipeline.sinks.base import ImageSink, LayoutConfig, Locations, ShardImages
from pipeline.sinks.datasink import SampleSink
from pipeline.sinks.files import FilesConfig
from pipeline.sinks.registry import SinkBuilder, build_sink, serves_files
from pipeline.storage import Storage

RUN = {"model": "m", "quantization": "fp32", "sampler": "{}", "sampler_hash": "h", "config_hash": "c",
       "scorer": None, "attempt": 0}


@dataclass(frozen=True)
class ConcatConfig(LayoutConfig):
    name = "concat"
    description = "every image of a shard, back to back, in concat/<shard>.bin"
    serves_files = False


class ConcatSink(ImageSink):
    """A shard-level blob: the images concatenated; ``image_offset`` is where each starts."""

    needs_image_bytes = True

    def write_samples(self, samples: ShardImages) -> None:
        """Nothing: the blob is built from the pieces' bytes."""

    def assemble(self, shard: str, samples: ShardImages) -> Locations:
        blob, offsets = b"", []
        for image, ok in zip(samples.images, samples.ok):
            offsets.append(len(blob) if ok else None)
            blob += image if ok else b""
        self.storage.write_atomic(self.storage.path("concat", f"{shard}.bin"), blob)
        uri = self.storage.url("concat", f"{shard}.bin")
        return Locations([uri if ok else None for ok in samples.ok], offsets)

    def clean_up(self, recorded: set[str]) -> None:
        self.cleaned = recorded


@pytest.fixture
def registry(monkeypatch):
    """The registered layouts, restored after the test."""
    monkeypatch.setattr(SinkBuilder, "_builders", dict(SinkBuilder._builders))


def _rows(keys: list[tuple[str, int]], error: str = "") -> dict:
    return {"prompt_id": [k for k, _ in keys], "sample_idx": [i for _, i in keys], "prompt": ["p"] * len(keys),
            "negative_prompt": [""] * len(keys), "seed": [0] * len(keys), "nfe": [2] * len(keys),
            "image": [b"" if error else f"<{k}{i}>".encode() for k, i in keys], "gen_seconds": [0.1] * len(keys),
            "error": [error] * len(keys), "shard": ["s"] * len(keys), "shard_samples": [3] * len(keys)}


def test_the_built_in_layouts_and_what_they_serve():
    assert SinkBuilder.names() == ["both", "files", "parquet", "webdataset"]
    assert [serves_files(name) for name in ("files", "webdataset", "both", "parquet")] == [True, False, True, False]
    assert build_sink("both", Storage("/tmp/x"), "png").needs_image_bytes


def test_a_config_type_or_a_name_registers_once_and_unknown_ones_list_the_known(registry):
    with pytest.raises(ValueError, match="FilesConfig is already registered"):
        SinkBuilder.register(FilesConfig, ConcatSink)

    @dataclass(frozen=True)
    class OtherFiles(LayoutConfig):
        name = "files"

    with pytest.raises(ValueError, match="layout 'files' of OtherFiles is already registered by FilesConfig"):
        SinkBuilder.register(OtherFiles, ConcatSink)
    with pytest.raises(ValueError, match="no layout is registered for ConcatConfig; registered: BothConfig, "
                                         "FilesConfig, ParquetConfig, WebDatasetConfig"):
        SinkBuilder.build(ConcatConfig(), Storage("/tmp/x"))
    with pytest.raises(ValueError, match="unknown layout 'concat'; known layouts: both, files, parquet, webdataset"):
        build_sink("concat", Storage("/tmp/x"), "png")


def test_a_layout_registered_from_outside_writes_resumes_and_cleans_up(registry, tmp_path):
    import pyarrow as pa

    from pipeline import manifest
    from pipeline.config import JobOptions
    from pipeline.shards import Shard

    SinkBuilder.register(ConcatConfig, ConcatSink)
    assert JobOptions(layout="concat").layout == "concat"  # --layout accepts it, no edit to pipeline/
    out = Storage(str(tmp_path / "out"))
    sink = SampleSink(out, RUN, "png", layout="concat")
    sink.write_table(pa.table(_rows([("a", 0), ("a", 1)])))
    sink.write_table(pa.table(_rows([("b", 0)], error="RuntimeError: boom")))  # 3 of 3: assembled
    record = pq.read_table(tmp_path / "out" / "_shards" / "s.parquet")
    assert record["image_offset"].to_pylist() == [0, 4, None]
    assert (tmp_path / "out" / "concat" / "s.bin").read_bytes() == b"<a0><a1>"

    # a rerun keeps the good rows: their images come back from the blob into a piece, by the layout's locations
    assert keep_written_samples(sink, "s", from_record=True, keep_failed=False) == {"a": [[0, 0], [1, 0]]}
    sink.write_table(pa.table(_rows([("b", 0)])))
    assert (tmp_path / "out" / "concat" / "s.bin").read_bytes() == b"<a0><a1><b0>"

    result = manifest.finalize(sink, {"attempts": [{"attempt": 0}]}, [Shard("s", "f", 0, 2, 3)], 1.0)
    assert result.complete and sink.images.cleaned == {"s"}
