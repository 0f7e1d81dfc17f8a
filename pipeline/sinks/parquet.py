"""Layout ``parquet``: one Parquet file per shard, ``data/<shard>.parquet``, that Hugging Face ``datasets`` opens
as an image dataset (``load_dataset("parquet", data_files="out/data/*.parquet")`` or ``load_dataset("out")``).

Each row is one sample with an image: the ``image`` column is the ``datasets`` ``Image`` struct (``bytes``: the
encoded PNG/WebP/JPEG, ``path``: its image name), beside it the metrics columns (prompt, seed, score, NFE,
sampler ...). The schema's ``huggingface`` metadata holds the ``datasets`` features, so the column decodes to PIL
images without a cast; DuckDB, pyarrow and ``ray.data.read_parquet`` read the files as plain Parquet. Failed
samples (and, when curating, samples without a kept image) have no row here; the metrics table has them all.

A sample's ``image_uri`` is its shard's Parquet file and ``image_offset`` is its row index in that file (not a
byte offset: the image is a value inside a compressed page); ``image_bytes`` is its encoded size. ``read_images``
reads the ``image`` column of the file and takes those rows.

Sizes. A row group holds ``ROW_GROUP_BYTES`` (64 MiB) of images: rows per group = 64 MiB / the shard's mean image
size (about 50 rows of ~1.3 MB 1024² PNGs), so a streaming reader holds one group at a time. The default shard
size of this layout is ``DEFAULT_MAX_SHARD_SIZE`` = 500 samples, so a shard file of 1024² PNGs (~1 MB each) is
about 0.5 GB, the size the hub recommends for Parquet shards.

At ``finalize`` the layout writes the dataset card ``README.md``: the YAML header the hub reads (``configs`` with
``data_files``, ``dataset_info.features``), then the generation settings and the maskray version.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, ClassVar

from pipeline.sinks.base import ImageSink, LayoutConfig, Locations, ShardImages, out_path
from pipeline.sinks.registry import SinkBuilder

if TYPE_CHECKING:
    import pyarrow as pa

DATA = "data"
CARD = "README.md"
ROW_GROUP_BYTES = 64 << 20
# Metrics columns left out of the dataset: a row's image is the row itself, and a row here never has an error.
NOT_IN_DATASET = ("image_uri", "image_offset", "error")


@dataclass(frozen=True)
class ParquetConfig(LayoutConfig):
    name = "parquet"
    description = "one Parquet file per shard under data/ with a Hugging Face Image column and a dataset card"
    serves_files = False
    default_max_shard_size: ClassVar[int] = 500


def dataset_schema() -> pa.Schema:
    """The Parquet schema of a shard file: the ``Image`` struct, the metrics columns, the ``datasets`` features."""
    import pyarrow as pa

    from pipeline.sinks.datasink import METRICS_SCHEMA  # imported here: importing the layouts imports no Ray

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field("image", image)] + [f for f in METRICS_SCHEMA if f.name not in NOT_IN_DATASET]
    features = {"image": {"_type": "Image"}}
    features.update({f.name: {"dtype": _dtype(f.type), "_type": "Value"} for f in fields[1:]})
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    return pa.schema(fields, metadata=metadata)


def _dtype(arrow_type: pa.DataType) -> str:
    """The ``datasets`` ``Value`` dtype of an Arrow type (``timestamp[ms, tz=UTC]``, ``int64``, ``string`` ...)."""
    import pyarrow as pa

    if pa.types.is_timestamp(arrow_type):
        return f"timestamp[{arrow_type.unit}, tz={arrow_type.tz}]" if arrow_type.tz else f"timestamp[{arrow_type.unit}]"
    return {"bool": "bool", "double": "float64", "float": "float32"}.get(str(arrow_type), str(arrow_type))


def rows_per_group(image_sizes: list[int]) -> int:
    """Rows of a row group: ``ROW_GROUP_BYTES`` over the mean encoded image size, at least 1."""
    mean = sum(image_sizes) / len(image_sizes) if image_sizes else 1
    return max(1, int(ROW_GROUP_BYTES // max(mean, 1)))


class ParquetSink(ImageSink):
    """Writes each whole shard's Parquet file; images are located by row inside it."""

    needs_image_bytes = True

    def write_samples(self, samples: ShardImages) -> None:
        """Nothing yet: the images travel in the pieces until the shard's file is built."""

    def assemble(self, shard: str, samples: ShardImages) -> Locations:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = dataset_schema()
        rows = [i for i, ok in enumerate(samples.ok) if ok]
        columns = {"image": [{"bytes": samples.images[i], "path": samples.names[i]} for i in rows]}
        for field in schema.names[1:]:
            values = samples.metrics.get(field)
            columns[field] = [values[i] for i in rows] if values is not None else [None] * len(rows)
        table = pa.table(columns, schema=schema)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=rows_per_group([len(samples.images[i]) for i in rows]))
        self.storage.write_atomic(self.storage.path(DATA, f"{shard}.parquet"), buffer.getvalue())
        uri = self.storage.url(DATA, f"{shard}.parquet")
        position = {row: n for n, row in enumerate(rows)}
        return Locations([uri if ok else None for ok in samples.ok],
                         [position[i] if ok else None for i, ok in enumerate(samples.ok)])

    def read_images(self, record: pa.Table) -> list[bytes | None]:
        """The images of a record's rows: per shard file, only the row groups holding them (a report's sample of a
        10^5-image run reads a few row groups, not the files)."""
        import numpy as np
        import pyarrow.parquet as pq

        uris, offsets = record["image_uri"].to_pylist(), record["image_offset"].to_pylist()
        images: list[bytes | None] = [None] * record.num_rows
        for uri in sorted({uri for uri in uris if uri}):
            rows = [i for i, row_uri in enumerate(uris) if row_uri == uri]
            with self.storage.fs.open(out_path(self.storage, uri), "rb") as handle:
                parquet = pq.ParquetFile(handle)
                sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
                starts = np.concatenate([[0], np.cumsum(sizes)])
                groups = sorted({int(np.searchsorted(starts, offsets[i], side="right")) - 1 for i in rows})
                column = parquet.read_row_groups(groups, columns=["image"])["image"].combine_chunks().field("bytes")
            position = {g: int(sum(sizes[h] for h in groups[:n])) for n, g in enumerate(groups)}
            for i in rows:
                group = int(np.searchsorted(starts, offsets[i], side="right")) - 1
                images[i] = column[position[group] + offsets[i] - int(starts[group])].as_py()
        return images

    def clean_up(self, recorded: set[str]) -> None:
        for path in self.storage.list(self.storage.path(DATA), ".parquet"):
            if PurePosixPath(path).stem not in recorded:  # its writer crashed before the record: the shard is redone
                self.storage.remove(path)

    def finish(self, manifest: dict) -> None:
        """Write the dataset card ``README.md`` (``dataset_card``)."""
        self.storage.write_atomic(self.storage.path(CARD), dataset_card(manifest).encode())


def dataset_card(manifest: dict) -> str:
    """The dataset card of a run: the hub's YAML header (configs, features), then the generation settings."""
    import yaml

    features = json.loads(dataset_schema().metadata[b"huggingface"])["info"]["features"]
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": f"{DATA}/*.parquet"}]}],
        "dataset_info": {"features": [{"name": name, "dtype": "image" if spec["_type"] == "Image" else spec["dtype"]}
                                      for name, spec in features.items()]},
        "tags": ["synthetic", "maskray"],
    }
    config = manifest.get("config", {})
    settings = {"model": config.get("model"), "generation": config.get("generation"),
                "seed": config.get("job", {}).get("seed"), "scorer": config.get("job", {}).get("scorer"),
                "config_hash": manifest.get("config_hash")}
    version = (manifest.get("packages") or {}).get("maskray")
    counts = manifest.get("counts") or {}
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             "# Synthetic images generated with maskray", "",
             f"Generated by maskray {version or '(unknown version)'}"
             + (f" at commit `{manifest['git_revision']}`" if manifest.get("git_revision") else "") + ".",
             f"Rows with an image: one per kept sample; {counts.get('rows', 'n/a')} samples in the run's metrics "
             f"table (`metrics.parquet/`), {counts.get('errors', 'n/a')} failed.", "",
             "Load it with `datasets.load_dataset(\"parquet\", data_files=\"data/*.parquet\")` (the `image` column "
             "decodes to PIL images), or query the files with DuckDB, pandas or `ray.data.read_parquet`.", "",
             "## Generation settings", "", "```json", json.dumps(settings, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


SinkBuilder.register(ParquetConfig, ParquetSink)
