"""Prompt shards: finding them, checking them before any model loads, and expanding them into sample rows.

Input is a Parquet file, a folder of them or a glob, local or any fsspec URI (``s3://``, ``gs://``).
Columns (others are ignored):

| column | type | when missing or null |
|---|---|---|
| ``prompt`` | string, required | a null prompt is an input error ('' is an unconditional sample) |
| ``prompt_id`` | string or integer, read as Unicode NFC | a stable id: SHA-256 of (prompt, negative_prompt, seed) |
| ``seed`` | integer in [0, 2^63-1] | derived from (prompt_id, run seed, sample index) |
| ``negative_prompt`` | string | the run's --negative-prompt, else the model family's |
| ``num_images`` | integer in [1, 10,000] | the run's --num-images |
| ``init_image`` | string: path or URI of the image to edit | a plain generation ('' too) |
| ``mask_image`` | string: path or URI of its inpainting mask (white = redraw) | img2img of the whole image |
| ``strength`` | float in (0, 1] | 0.5 for img2img, 1 with a mask (``mgt.editing``) |

Every file holds the same input columns with the same Arrow types (a shard whose ``seed`` is int32 while
another's is int64 is refused, naming both files: cast them to one type). A ``prompt_id`` is normalised to
Unicode NFC before it names anything, so the NFC and NFD spellings of "café" are one id (and two rows that
differ only so are duplicates). Seeds outside [0, 2^63-1] (what ``torch.Generator.manual_seed`` and the
int64 output column hold) are refused rather than wrapped; so is a row whose last sample's seed (seed +
num_images - 1) would pass 2^63-1.

A relative ``init_image`` or ``mask_image`` is relative to the folder of its prompt file (``pipeline.shards``
resolves it), and the images are read by the generator actors with the job's storage options; an image
that is missing, unreadable or not of the run's size (read from its header) fails its row only. An image URI
may use the scheme of the prompts' own filesystem and those of ``--allowed-image-schemes``; any other
(``http://`` beside local prompts, a local path beside prompts in S3) is refused here, naming the URI. A ``mask_image`` or ``strength``
without an ``init_image`` is refused here.

A row becomes ``num_images`` sample rows keyed by (``prompt_id``, ``sample_idx``), the key that names the
output files; ``pipeline.shards`` groups rows into the shards a rerun skips or redoes as a whole. Every
problem that would stop the job (no files, unreadable path, missing or mistyped column, nulls, duplicate ids,
empty input) is raised by ``scan_prompts`` on the driver, before Ray starts a single actor.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import pyarrow.parquet as pq

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
MAX_SEED = SEED_MASK  # given seeds above it (or below 0) are refused, not wrapped
MAX_NUM_IMAGES = 10_000  # images of one prompt; more is almost surely a typo (use more rows)


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
    sorted. Hidden and ``_`` names (``_SUCCESS``, ``.crc`` files) below a folder, or matched by a glob, are skipped.

    ``maskray generate`` reads Parquet shards; the prompt-set reader (``pipeline/prompt_sets.py``)
    lists its formats here too, so every command finds its prompt files the same way. ``label`` names the
    input in the errors.

    Raises:
        PromptInputError: nothing matches, or the path cannot be listed (permissions, credentials).
    """
    fs, path = storage.fs, storage.strip(spec)
    try:
        if any(ch in path for ch in "*?["):
            base = _glob_base(path)  # hidden and _ names count only in the parts the pattern matches
            files = [f for f in fs.glob(path) if fs.isfile(f) and not _hidden(f[len(base):].lstrip("/"))]
        elif fs.isdir(path):
            below = path.rstrip("/") + "/"  # hidden and _ names count only below the given folder
            files = [f for f in fs.find(path) if f.lower().endswith(suffixes)
                     and not _hidden(f[len(below):] if f.startswith(below) else f)]
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


def scan_prompts(spec: str, storage: Storage, num_images: int,
                 check_prompts: Callable[[Sequence[str], str | None], None] | None = None,
                 allowed_image_schemes: Sequence[str] = ()) -> PromptScan:
    """Check every shard named by ``spec`` before any work starts.

    Reads every file's schema (its footer), then only the input columns, to check that the files agree on
    columns and types, nulls, the ``num_images`` and ``seed`` ranges and the uniqueness of ``prompt_id``
    (given or derived). ``check_prompts(prompts, negative_prompt)`` is the model family's check (MaskGIT's
    prompts are ImageNet classes and it takes no negative prompt), run over every prompt and the first
    non-empty negative prompt of the rows. An ``init_image`` or ``mask_image`` must use the scheme of the
    prompts' own filesystem or one of ``allowed_image_schemes`` (:func:`check_image_schemes`).

    Raises:
        PromptInputError: with the file, column, offending values and the fix.
    """
    if not 1 <= num_images <= MAX_NUM_IMAGES:
        raise PromptInputError(f"--num-images {num_images} is outside [1, {MAX_NUM_IMAGES}]; for more images of "
                               f"one prompt repeat the row with another prompt_id")
    files = find_prompt_files(spec, storage)
    schema = _common_schema(spec, files, _read_schemas(files, storage))
    if "prompt" not in schema.names:
        raise PromptInputError(f"--prompts {spec!r} has no 'prompt' column (columns: {schema.names}); rename the "
                               f"text column to 'prompt'")
    for name, (check, wanted) in COLUMNS.items():
        if name in schema.names and not check(schema.field(name).type):
            raise PromptInputError(f"--prompts {spec!r}: column {name!r} is {schema.field(name).type}, expected "
                                   f"{wanted}; cast it (e.g. df[{name!r}].astype(...)) or drop the column")
    dataset = pds.dataset(files, schema=schema, filesystem=storage.arrow_fs, format="parquet")
    present = [name for name in COLUMNS if name in schema.names]
    with ThreadPoolExecutor(READ_THREADS) as pool:  # one table per file, in file order
        tables = list(pool.map(lambda fragment: _read_columns(spec, fragment, present, schema),
                               dataset.get_fragments()))
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise PromptInputError(f"--prompts {spec!r} holds no rows ({len(files)} file(s)); nothing to generate")
    for name in ("prompt", "prompt_id"):
        if name in present and table[name].null_count:
            rows = _null_rows(table[name])
            raise PromptInputError(f"--prompts {spec!r}: {table[name].null_count} null {name!r} value(s) (rows "
                                   f"{rows} in file order); fill them ('' is an unconditional prompt) or drop them")
    if check_prompts is not None:
        negatives = table["negative_prompt"].to_pylist() if "negative_prompt" in present else []
        try:
            check_prompts(table["prompt"].to_pylist(), next((n for n in negatives if n), None))
        except ValueError as error:
            raise PromptInputError(f"--prompts {spec!r}: {error}") from None
    for file, part in zip(files, tables):
        _check_range(part, "num_images", 1, MAX_NUM_IMAGES, file,
                     "give 1 to 10,000 images per row (null for --num-images); for more, repeat the row "
                     "under another prompt_id")
        _check_range(part, "seed", 0, MAX_SEED, file,
                     "give seeds in [0, 2^63-1] (null derives one from prompt_id and --seed)")
    ids = prompt_ids(table)
    unique, counts = np.unique(ids, return_counts=True)
    if len(unique) != len(ids):
        duplicated = [str(u) for u in unique[counts > 1][:MAX_LISTED]]
        source = "prompt_id" if "prompt_id" in present else "derived id (same prompt, negative_prompt and seed)"
        raise PromptInputError(f"--prompts {spec!r}: {int((counts > 1).sum())} duplicate {source} value(s), e.g. "
                               f"{duplicated}; make prompt_id unique, or for repeats of one prompt use num_images")
    row_samples = [pc.fill_null(t["num_images"], num_images).to_numpy().astype(np.int64) if "num_images" in present
                   else np.full(t.num_rows, num_images, dtype=np.int64) for t in tables]
    if "seed" in present:  # sample i of a row uses seed + i, which must not wrap onto another row's seeds
        for file, part, counts in zip(files, tables, row_samples):
            seeds = pc.fill_null(part["seed"], 0).to_numpy().astype(np.int64)
            rows = np.flatnonzero(seeds > MAX_SEED - (counts - 1))
            if len(rows):
                raise PromptInputError(f"{file}: seed + num_images - 1 passes 2^63-1 at rows "
                                       f"{rows[:MAX_LISTED].tolist()} of the file (sample i uses seed + i); lower "
                                       f"those seeds")
    samples = int(sum(int(r.sum()) for r in row_samples))
    edit_columns = check_edit_columns(spec, dataset, image_schemes(storage, allowed_image_schemes))
    return PromptScan(files=files, columns=present + edit_columns, rows=table.num_rows, samples=samples,
                      row_samples=row_samples)


def image_schemes(storage: Storage, allowed: Sequence[str] = ()) -> frozenset[str]:
    """The URI schemes an ``init_image`` or ``mask_image`` may use: the prompts' filesystem's (every alias of its
    fsspec protocol, e.g. ``file`` and ``local``, or ``s3`` and ``s3a``) plus ``allowed`` (``--allowed-image-schemes``).
    """
    protocol = storage.fs.protocol
    own = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return frozenset(scheme.lower() for scheme in (*own, *allowed))


def uri_schemes(uri: str) -> set[str]:
    """The fsspec protocols reading ``uri`` goes through: ``s3://b/a.png`` -> {s3}, a path -> {file},
    ``simplecache::https://h/a.png`` -> {simplecache, https}, ``zip://a.png::s3://b/x.zip`` -> {zip, s3}."""
    parts = uri.split("::")
    schemes = set()
    for i, part in enumerate(parts):
        if "://" in part:
            schemes.add(part.split("://", 1)[0].lower())
        elif i < len(parts) - 1:  # a bare protocol name ahead of the URL it wraps
            schemes.add(part.lower())
        else:
            schemes.add("file")
    return schemes


def check_image_schemes(spec: str, path: str, table: pa.Table, names: Sequence[str], allowed: frozenset[str]) -> None:
    """Refuse an image URI of a scheme outside ``allowed``, naming it, its file and row, and the flag that allows it.

    Only values holding ``://`` or ``::`` can leave the prompts' filesystem (a relative path resolves against the
    prompt file's folder); each distinct one is parsed once.
    """
    names = [name for name in names if not pa.types.is_null(table[name].type)]
    for name in names:
        column = table[name]
        marked = pc.fill_null(pc.or_(pc.match_substring(column, "://"), pc.match_substring(column, "::")), False)
        if not pc.any(marked).as_py():
            continue
        for uri in pc.unique(column.filter(marked)).to_pylist():
            refused = sorted(uri_schemes(uri) - allowed)
            if refused:
                row = int(np.flatnonzero(pc.equal(column, uri).to_numpy(zero_copy_only=False))[0])
                raise PromptInputError(
                    f"--prompts {spec!r}: {path} row {row} (in file order) has {name} {uri[:200]!r}, whose scheme "
                    f"{', '.join(refused)} is not the prompts' ({', '.join(sorted(allowed))}); add "
                    f"--allowed-image-schemes {','.join(refused)} if the job may read it, or copy the image beside "
                    f"the prompts")
    if "file" not in allowed:  # an absolute local path from prompts in an object store reads the worker's disk
        for name in names:
            local = pc.fill_null(pc.starts_with(table[name], "/"), False)
            if pc.any(local).as_py():
                row = int(np.flatnonzero(local.to_numpy(zero_copy_only=False))[0])
                uri = table[name][row].as_py()
                raise PromptInputError(
                    f"--prompts {spec!r}: {path} row {row} (in file order) has {name} {uri[:200]!r}, a local path, "
                    f"but the prompts are not local (allowed schemes: {', '.join(sorted(allowed))}); give a path relative to the prompt file "
                    f"or a URI, or add --allowed-image-schemes file")


def check_edit_columns(spec: str, dataset: pds.Dataset, schemes: frozenset[str]) -> list[str]:
    """The editing columns of the input (``EDIT_COLUMNS``), checked: types, a ``mask_image`` or ``strength``
    only beside an ``init_image``, strengths in (0, 1], image URIs of the ``schemes`` allowed (:func:`image_schemes`).

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
    if present:
        with ThreadPoolExecutor(READ_THREADS) as pool:
            tables = list(pool.map(lambda fragment: (fragment.path, fragment.to_table(columns=present, schema=schema)),
                                   dataset.get_fragments()))
        for path, table in tables:
            check_image_schemes(spec, path, table, [n for n in ("init_image", "mask_image") if n in present], schemes)
            if not present[1:]:
                continue
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


def _read_schemas(files: list[str], storage: Storage) -> list[pa.Schema]:
    """Every file's schema from its footer, read concurrently (a footer is a few KB even for big files)."""
    def read(file: str) -> pa.Schema:
        try:
            return pq.read_schema(file, filesystem=storage.arrow_fs)
        except (OSError, pa.ArrowException) as error:
            raise PromptInputError(f"--prompts: cannot read the Parquet shards: {file} is not a readable Parquet "
                                   f"file ({type(error).__name__}: {error}); rewrite it or remove it") from None

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return list(pool.map(read, files))


def _common_schema(spec: str, files: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """The input and editing columns every file holds with one type (the stages concatenate rows of many files).

    Raises:
        PromptInputError: a file lacks an input column another file has, or holds it with another type.
    """
    first = schemas[0]
    names = [*COLUMNS, *EDIT_COLUMNS]
    fields = [first.field(name) for name in names if name in first.names]
    for file, schema in zip(files[1:], schemas[1:]):
        for name in names:
            if (name in first.names) != (name in schema.names):
                has, lacks = (files[0], file) if name in first.names else (file, files[0])
                raise PromptInputError(f"--prompts {spec!r}: column {name!r} is in {has} but not in {lacks}; give "
                                       f"every shard the same columns")
            if name in first.names and schema.field(name).type != first.field(name).type:
                raise PromptInputError(f"--prompts {spec!r}: column {name!r} is {first.field(name).type} in "
                                       f"{files[0]} but {schema.field(name).type} in {file}; write every shard "
                                       f"with one type (cast the column)")
    return pa.schema(fields)


def _read_columns(spec: str, fragment: pds.Fragment, columns: list[str], schema: pa.Schema) -> pa.Table:
    try:
        return fragment.to_table(columns=columns, schema=schema)
    except (OSError, pa.ArrowException) as error:  # a readable footer over damaged pages
        raise PromptInputError(f"--prompts {spec!r}: cannot read the Parquet shards: {fragment.path} is damaged "
                               f"({type(error).__name__}: {error}); rewrite it or remove it") from None


def _check_range(table: pa.Table, name: str, low: int, high: int, file: str, fix: str) -> None:
    """Refuse values of integer column ``name`` outside [low, high] (``low`` >= 0), naming the file, the rows
    and the fix."""
    if name not in table.column_names:
        return
    column = table[name]
    outside = pc.or_(pc.less(column, pa.scalar(low, column.type)), pc.greater(column, _capped(high, column.type)))
    rows = np.flatnonzero(pc.fill_null(outside, False).to_numpy(zero_copy_only=False))
    if len(rows):
        values = column.take(pa.array(rows[:MAX_LISTED])).to_pylist()
        raise PromptInputError(f"{file}: {len(rows)} {name} value(s) outside [{low}, {high}]: {values} at rows "
                               f"{rows[:MAX_LISTED].tolist()} of the file; {fix}")


def _capped(value: int, type_: pa.DataType) -> pa.Scalar:
    """``value`` as a scalar of integer ``type_``, or that type's maximum when ``value`` is above it."""
    return pa.scalar(min(value, np.iinfo(type_.to_pandas_dtype()).max), type_)


def _glob_base(pattern: str) -> str:
    """The folder of ``pattern`` above its first wildcard: ``d/x/*.parquet`` -> ``d/x``, ``d/*/a.parquet`` -> ``d``."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(ch in part for ch in "*?["))
    return "/".join(parts[:fixed])


def _hidden(relative: str) -> bool:
    """A path with a hidden or ``_`` component (``.crc``, ``_SUCCESS``, ``_temporary/``)."""
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def prompt_ids(table: pa.Table | dict[str, Any]) -> np.ndarray:
    """One id per row: the ``prompt_id`` column as NFC strings, else a stable hash of the row's content.

    The derived id is the first 16 hex digits of SHA-256 over (prompt, negative_prompt, seed), so it survives
    re-sharding, re-ordering and moving the files, which is what resume needs.
    """
    column = _column(table, "prompt_id")
    if column is not None:
        return np.array([unicodedata.normalize("NFC", str(v)) for v in column], dtype=object)
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


def candidate_seed(seed: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` of a sample whose seed is ``seed`` (``--best-of``): the sample's own seed
    for candidate 0, so ``--best-of 1`` is a plain run; a 63-bit hash of (seed, candidate) for the others."""
    if candidate == 0:
        return seed
    digest = hashlib.sha256(f"{seed}\x00candidate\x00{candidate}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & SEED_MASK


def expand_samples(batch: dict[str, np.ndarray], *, run_seed: int, num_images: int,
                   best_of: int = 1) -> dict[str, np.ndarray]:
    """Prompt rows -> sample rows (one per image and candidate), leaving out the ones a partial shard already holds.

    Args:
        batch: a column batch of prompt rows (the columns of ``COLUMNS`` that the input has, plus the
            editing columns (``EDIT_COLUMNS``) and bookkeeping columns such as ``shard``, which are repeated
            on each of the row's samples). An optional ``kept_samples`` column lists, per row, the
            ``[sample_idx, candidate]`` pairs already written (``pipeline.shards.read_shards``); those are not
            produced.
        run_seed: the job's seed, for rows without a seed.
        num_images: images for rows without a num_images value.
        best_of: candidates per sample (``--best-of``), with seeds from ``candidate_seed``; a sample's candidates
            are consecutive rows.

    Returns:
        Columns ``prompt_id`` (str), ``sample_idx`` (int64), ``candidate`` (int64), ``prompt`` (str),
        ``negative_prompt`` (str, '' for the run's default), ``seed`` (int64) and the editing and bookkeeping
        columns, one row per sample and candidate.
    """
    ids = prompt_ids(batch)
    counts = _column(batch, "num_images")
    seeds = _column(batch, "seed")
    negatives = _column(batch, "negative_prompt")
    kept = batch.get("kept_samples")
    totals = np.array([num_images if counts is None or _is_null(counts[i]) else int(counts[i])
                       for i in range(len(ids))], dtype=np.int64)
    out: dict[str, list] = {"prompt_id": [], "sample_idx": [], "candidate": [], "prompt": [], "negative_prompt": [],
                            "seed": []}
    wanted: list[bool] = []
    for i, prompt_id in enumerate(ids):
        given = None if seeds is None or _is_null(seeds[i]) else int(seeds[i])
        negative = None if negatives is None else negatives[i]
        skip = set() if kept is None or kept[i] is None else {(int(k[0]), int(k[1])) for k in kept[i]}
        for sample_idx in range(totals[i]):
            seed = derive_seed(prompt_id, run_seed, sample_idx) if given is None else (given + sample_idx) & SEED_MASK
            for candidate in range(best_of):
                wanted.append((sample_idx, candidate) not in skip)
                out["prompt_id"].append(prompt_id)
                out["sample_idx"].append(sample_idx)
                out["candidate"].append(candidate)
                out["prompt"].append(str(batch["prompt"][i]))
                out["negative_prompt"].append(negative if isinstance(negative, str) else "")
                out["seed"].append(candidate_seed(seed, candidate))
    carried = {name: np.repeat(np.asarray(values), totals * best_of) for name, values in batch.items()
               if name not in COLUMNS and name != "kept_samples"}
    rows = {"prompt_id": np.array(out["prompt_id"], dtype=object),
            "sample_idx": np.array(out["sample_idx"], dtype=np.int64),
            "candidate": np.array(out["candidate"], dtype=np.int64),
            "prompt": np.array(out["prompt"], dtype=object),
            "negative_prompt": np.array(out["negative_prompt"], dtype=object),
            "seed": np.array(out["seed"], dtype=np.int64), **carried}
    mask = np.array(wanted, dtype=bool)
    return rows if mask.all() else {name: values[mask] for name, values in rows.items()}


def _column(table: pa.Table | dict[str, Any], name: str) -> list | np.ndarray | None:
    if isinstance(table, pa.Table):
        return table[name].to_pylist() if name in table.column_names else None
    return table.get(name)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _null_rows(column: pa.ChunkedArray) -> list[int]:
    return np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[:MAX_LISTED].tolist()
