"""What a run writes under ``--out``: the completion records and pieces (``datasink``) and the images, laid out
by the ``--layout`` chosen (one module per layout, registered in ``registry``):

    images/<slug>-<sha256>_<sample_idx>.<ext>   one file per sample (layout files or both)
    webdataset/<shard>.tar                      one WebDataset tar per shard (layout webdataset or both)
    data/<shard>.parquet, README.md             one Parquet file per shard and a dataset card (layout parquet)
    _shards/<shard>.parquet                     metrics rows of one whole shard: its completion record
    _pieces/<shard>/<rows hash>-<n>.parquet     rows of a shard written so far (removed once the shard is whole)
    metrics.parquet/, manifest.json             written by ``pipeline.manifest.finalize`` at the end

Importing this package registers the built-in layouts (and imports no Ray: ``pipeline.config`` reads their names).
A new layout is one module ending in ``SinkBuilder.register(ItsConfig, builder)`` and one import line below.
"""

from pipeline.sinks import both, files, parquet, webdataset  # noqa: F401  (each module registers its layout)
