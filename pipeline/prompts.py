"""Prompt shards: finding them, checking them before any model loads, and expanding them into sample rows.

Input is a Parquet file, a folder of them or a glob, local or any fsspec URI (``s3://``, ``gs://``).
Columns (others are ignored):

| column | type | when missing or null |
|---|---|---|
| ``prompt`` | string, required | a null prompt is an input error ('' is an unconditional sample) |
| ``prompt_id`` | string or integer | a stable id: SHA-256 of (prompt, negative_prompt, seed) |
| ``seed`` | integer | derived from (prompt_id, run seed, sample index) |
| ``negative_prompt`` | string | the run's --negative-prompt, else the model family's |
| ``num_images`` | integer >= 1 | the run's --num-images |
| ``init_image`` | string: path or URI of the image to edit | a plain generation ('' too) |
| ``mask_image`` | string: path or URI of its inpainting mask (white = redraw) | img2img of the whole image |
| ``strength`` | float in (0, 1] | 0.5 for img2img, 1 with a mask (``mgt.editing``) |

A relative ``init_image`` or ``mask_image`` is relative to the folder of its prompt file (``pipeline.shards``
resolves it), and the images are read by the generator actors with the job's storage options; an image
that is missing, unreadable or not of the run's size fails its row only. A ``mask_image`` or ``strength``
without an ``init_image`` is refused here.

A row becomes ``num_images`` sample rows keyed by (``prompt_id``, ``sample_idx``), the key that names the
output files; ``pipeline.shards`` groups rows into the shards a rerun skips or redoes as a whole. Every
problem that would stop the job (no files, unreadable path, missing or mistyped column, nulls, duplicate ids,
empty input) is raised by ``scan_prompts`` on the driver, before Ray starts a single actor.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds

from pipeline.storage import Storage

# column -> (arrow type check, description) of the accepted input columns.
COLUMNS = {
    "prompt": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "prompt_id": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t),
                  "string or integer"),
    "seed": (pa.types.is_integer, "integer"),
    "negative_prompt": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t),
                        "string"),
    "num_images": (pa.types.is_integer, "integer"),
}
# The optional editing columns (``mgt.editing``): not part of a row's id, carried to the generator as they are.
EDIT_COLUMNS = {
    "init_image": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "string"),
    "mask_image": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t), "string"),
    "strength": (lambda t: pa.types.is_floating(t) or pa.types.is_null(t), "float"),
}
MAX_LISTED = 5
READ_THREADS = 16  # prompt files whose id columns are read at once
SEED_MASK = (1 << 63) - 1  # derived seeds fit int64 and torch.Generator.manual_seed


class PromptInputError(ValueError):
    """The prompt input cannot be used as given; the message names the file, the column and the fix."""


@dataclass(frozen=True)
class PromptScan:
    """What ``scan_prompts`` found: the files, the columns present, the row and sample counts, and per file
    the samples of each row (in file order, for ``pipeline.shards.plan_shards``)."""

    files: list[str]
    columns: list[str]
    rows: int
    samples: int
    row_samples: list[np.ndarray]


def find_prompt_files(spec: str, storage: Storage, suffixes: tuple[str, ...] = (".parquet",), kind: str = "Parquet",
                      label: str = "--prompts") -> list[str]:
    """The ``kind`` files named by ``spec`` (a file, a folder searched recursively for ``suffixes``, or a glob),
    sorted. A folder's hidden and ``_`` names (``_SUCCESS``, ``.crc`` files) are skipped.

    ``maskray generate`` reads Parquet shards; the prompt-set reader (``jobs/evaluation/prompt_sets.py``)
    lists its formats here too, so every command finds its prompt files the same way. ``label`` names the
    input in the errors.

    Raises:
        PromptInputError: nothing matches, or the path cannot be listed (permissions, credentials).
    """
    fs, path = storage.fs, storage.strip(spec)
    try:
        if any(ch in path for ch in "*?["):
            files = [f for f in fs.glob(path) if fs.isfile(f)]
        elif fs.isdir(path):
            files = [f for f in fs.find(path) if f.lower().endswith(suffixes) and "/." not in f and "/_" not in f]
        elif fs.isfile(path):
            files = [path]
        else:
            raise PromptInputError(f"{label} {spec!r} does not exist; give a {kind} file, a folder of them or a "
                                   f"glob such as 'prompts/*{suffixes[0]}'")
    except PromptInputError:
        raise
    except (OSError, PermissionError) as error:
        raise PromptInputError(f"{label} {spec!r} cannot be read: {type(error).__name__}: {error}") from error
    if not files:
        raise PromptInputError(f"{label} {spec!r} matches no {kind} files (a folder is searched for "
                               f"{', '.join('*' + suffix for suffix in suffixes)})")
    return sorted(files)


def scan_prompts(spec: str, storage: Storage, num_images: int) -> PromptScan:
    """Check every shard named by ``spec`` before any work starts.

    Reads the schemas, then only the id-bearing columns, to check types, nulls, ``num_images`` values and
    the uniqueness of ``prompt_id`` (given or derived).

    Raises:
        PromptInputError: with the file, column, offending values and the fix.
    """
    files = find_prompt_files(spec, storage)
    try:
        dataset = pds.dataset(files, filesystem=storage.arrow_fs, format="parquet")
    except (OSError, pa.ArrowInvalid) as error:
        raise PromptInputError(f"--prompts {spec!r}: cannot read the Parquet shards ({type(error).__name__}: "
                               f"{error}); are they Parquet files with one schema?") from error
    schema = dataset.schema
    if "prompt" not in schema.names:
        raise PromptInputError(f"--prompts {spec!r} has no 'prompt' column (columns: {schema.names}); rename the "
                               f"text column to 'prompt'")
    for name, (check, wanted) in COLUMNS.items():
        if name in schema.names and not check(schema.field(name).type):
            raise PromptInputError(f"--prompts {spec!r}: column {name!r} is {schema.field(name).type}, expected "
                                   f"{wanted}; cast it (e.g. df[{name!r}].astype(...)) or drop the column")
    present = [name for name in COLUMNS if name in schema.names]
    with ThreadPoolExecutor(READ_THREADS) as pool:  # one table per file, in file order
        tables = list(pool.map(lambda fragment: fragment.to_table(columns=present, schema=schema),
                               dataset.get_fragments()))
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise PromptInputError(f"--prompts {spec!r} holds no rows ({len(files)} file(s)); nothing to generate")
    for name in ("prompt", "prompt_id"):
        if name in present and table[name].null_count:
            rows = _null_rows(table[name])
            raise PromptInputError(f"--prompts {spec!r}: {table[name].null_count} null {name!r} value(s) (rows "
                                   f"{rows} in file order); fill them ('' is an unconditional prompt) or drop them")
    if "num_images" in present:
        bad = pc.less(table["num_images"], 1)
        if pc.any(bad).as_py():
            raise PromptInputError(f"--prompts {spec!r}: num_images must be >= 1 or null, got "
                                   f"{pc.min(table['num_images']).as_py()}")
    ids = prompt_ids(table)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        duplicated = [str(u) for u in unique[counts > 1][:MAX_LISTED]]
        source = "prompt_id" if "prompt_id" in present else "derived id (same prompt, negative_prompt and seed)"
        raise PromptInputError(f"--prompts {spec!r}: {int((counts > 1).sum())} duplicate {source} value(s), e.g. "
                               f"{duplicated}; make prompt_id unique, or for repeats of one prompt use num_images")
    row_samples = [pc.fill_null(t["num_images"], num_images).to_numpy().astype(np.int64) if "num_images" in present
                   else np.full(t.num_rows, num_images, dtype=np.int64) for t in tables]
    samples = int(sum(int(r.sum()) for r in row_samples))
    edit_columns = check_edit_columns(spec, dataset)
    return PromptScan(files=files, columns=present + edit_columns, rows=table.num_rows, samples=samples,
                      row_samples=row_samples)


def check_edit_columns(spec: str, dataset: pds.Dataset) -> list[str]:
    """The editing columns of the input (``EDIT_COLUMNS``), checked: types, a ``mask_image`` or ``strength``
    only beside an ``init_image``, strengths in (0, 1].

    Raises:
        PromptInputError: naming the column, or the file and row (in file order), and the fix.
    """
    schema = dataset.schema
    present = [name for name in EDIT_COLUMNS if name in schema.names]
    for name in present:
        check, wanted = EDIT_COLUMNS[name]
        if not check(schema.field(name).type):
            raise PromptInputError(f"--prompts {spec!r}: column {name!r} is {schema.field(name).type}, expected "
                                   f"{wanted}; cast it (e.g. df[{name!r}].astype(...)) or drop the column")
    if present and "init_image" not in present:
        raise PromptInputError(f"--prompts {spec!r} has {present} but no 'init_image' column: a mask or strength "
                               f"edits an image; add init_image (path or URI per row) or drop {present}")
    if present[1:]:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(lambda fragment: (fragment.path, fragment.to_table(columns=present, schema=schema)),
                                   dataset.get_fragments()))
        for path, table in tables:
            plain = pc.or_kleene(pc.is_null(table["init_image"]), pc.equal(table["init_image"], ""))
            for name in present[1:]:
                orphan = pc.and_kleene(plain, pc.is_valid(table[name]))
                if name == "mask_image":
                    orphan = pc.and_kleene(orphan, pc.not_equal(table[name], ""))
                if pc.any(orphan).as_py():
                    rows = np.flatnonzero(orphan.to_numpy(zero_copy_only=False))[:MAX_LISTED].tolist()
                    raise PromptInputError(f"--prompts {spec!r}: {path} rows {rows} (in file order) have a {name} but "
                                           f"no init_image; give those rows an init_image or set their {name} null")
            if "strength" in present:
                strength = table["strength"]
                bad = pc.or_kleene(pc.less_equal(strength, 0), pc.greater(strength, 1))
                if pc.any(bad).as_py():
                    rows = np.flatnonzero(pc.fill_null(bad, False).to_numpy(zero_copy_only=False))[:MAX_LISTED]
                    raise PromptInputError(f"--prompts {spec!r}: {path} rows {rows.tolist()} (in file order) have a "
                                           f"strength outside (0, 1]; give the share of steps to run, e.g. 0.5, or null "
                                           f"for the default")
    return present


def prompt_ids(table: pa.Table | dict[str, Any]) -> np.ndarray:
    """One id per row: the ``prompt_id`` column as strings, else a stable hash of the row's content.

    The derived id is the first 16 hex digits of SHA-256 over (prompt, negative_prompt, seed), so it survives
    re-sharding, re-ordering and moving the files, which is what resume needs.
    """
    column = _column(table, "prompt_id")
    if column is not None:
        return np.array([str(v) for v in column], dtype=object)
    prompts = _column(table, "prompt")
    negatives = _column(table, "negative_prompt")
    seeds = _column(table, "seed")
    ids = []
    for i, prompt in enumerate(prompts):
        parts = [str(prompt), "" if negatives is None or _is_null(negatives[i]) else str(negatives[i]),
                 "" if seeds is None or _is_null(seeds[i]) else str(int(seeds[i]))]
        ids.append(hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:16])
    return np.array(ids, dtype=object)


def derive_seed(prompt_id: str, run_seed: int, sample_idx: int) -> int:
    """A 63-bit seed from (prompt_id, run seed, sample index): independent of batch, actor and retry."""
    digest = hashlib.sha256(f"{prompt_id}\x00{run_seed}\x00{sample_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & SEED_MASK


def expand_samples(batch: dict[str, np.ndarray], *, run_seed: int, num_images: int) -> dict[str, np.ndarray]:
    """Prompt rows -> sample rows (one per image).

    Args:
        batch: a column batch of prompt rows (the columns of ``COLUMNS`` that the input has, plus the
            editing columns (``EDIT_COLUMNS``) and bookkeeping columns such as ``shard``, which are repeated
            on each of the row's samples).
        run_seed: the job's seed, for rows without a seed.
        num_images: images for rows without a num_images value.

    Returns:
        Columns ``prompt_id`` (str), ``sample_idx`` (int64), ``prompt`` (str), ``negative_prompt`` (str, ''
        for the run's default), ``seed`` (int64) and the editing and bookkeeping columns, one row per sample.
    """
    ids = prompt_ids(batch)
    counts = _column(batch, "num_images")
    seeds = _column(batch, "seed")
    negatives = _column(batch, "negative_prompt")
    totals = np.array([num_images if counts is None or _is_null(counts[i]) else int(counts[i])
                       for i in range(len(ids))], dtype=np.int64)
    out: dict[str, list] = {"prompt_id": [], "sample_idx": [], "prompt": [], "negative_prompt": [], "seed": []}
    for i, prompt_id in enumerate(ids):
        given = None if seeds is None or _is_null(seeds[i]) else int(seeds[i])
        negative = None if negatives is None else negatives[i]
        for sample_idx in range(totals[i]):
            out["prompt_id"].append(prompt_id)
            out["sample_idx"].append(sample_idx)
            out["prompt"].append(str(batch["prompt"][i]))
            out["negative_prompt"].append(negative if isinstance(negative, str) else "")
            out["seed"].append(derive_seed(prompt_id, run_seed, sample_idx) if given is None
                               else (given + sample_idx) & SEED_MASK)
    carried = {name: np.repeat(np.asarray(values), totals) for name, values in batch.items() if name not in COLUMNS}
    return {"prompt_id": np.array(out["prompt_id"], dtype=object),
            "sample_idx": np.array(out["sample_idx"], dtype=np.int64),
            "prompt": np.array(out["prompt"], dtype=object),
            "negative_prompt": np.array(out["negative_prompt"], dtype=object),
            "seed": np.array(out["seed"], dtype=np.int64), **carried}


def _column(table: pa.Table | dict[str, Any], name: str) -> list | np.ndarray | None:
    if isinstance(table, pa.Table):
        return table[name].to_pylist() if name in table.column_names else None
    return table.get(name)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _null_rows(column: pa.ChunkedArray) -> list[int]:
    return np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[:MAX_LISTED].tolist()
