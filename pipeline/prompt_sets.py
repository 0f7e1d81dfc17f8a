"""Prompt lists for every command that takes prompts: Parquet, JSON, JSON Lines, CSV or text, with an optional
category; a file, a folder of them or a glob, local or any fsspec URI (``s3://``, ``gs://``).

``maskray evaluate --prompts``, ``maskray sample --prompts-file`` and ``maskray quantize --prompts`` read
through :func:`load_prompt_set`, so each accepts what the others accept, including the folder of Parquet
shards that ``maskray generate`` reads. The HPD v2 benchmark ships one JSON list of strings per style
(``anime.json``, ``concept-art.json``, ``paintings.json``, ``photo.json``) and DrawBench a CSV with
``Prompts`` and ``Category`` columns; both load as they come. When several sets are given and a file has no
category column, its file name (without extension) is the category, so the four HPD files give the paper's
per-style breakdown. A file with another extension is read as text, one prompt per line.
"""

from __future__ import annotations

import io
import json
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.prompts import PromptInputError, find_prompt_files
from pipeline.storage import Storage

PROMPT_COLUMNS = ("prompt", "Prompt", "Prompts", "prompts", "caption", "text")
CATEGORY_COLUMNS = ("category", "Category", "style")
# The file kinds a folder is searched for; a file named explicitly may have any extension (read as text).
SUFFIXES = (".parquet", ".pq", ".json", ".jsonl", ".csv", ".txt")
FORMATS = "Parquet, JSON, JSONL, CSV or text"


class PromptSetError(ValueError):
    """A prompt set cannot be read; the message names the file and what it should hold."""


def load_prompt_set(paths: list[str], storage_options: dict | None = None) -> pa.Table:
    """One table with ``prompt`` (string) and ``category`` (string or null) from every set in ``paths``.

    Each path is a file, a folder (searched recursively for the ``SUFFIXES`` files, skipping hidden and
    ``_`` names such as ``_SUCCESS``) or a glob.
    """
    if not paths:
        raise PromptSetError(f"no prompt set given: pass --prompts FILE ({FORMATS}), a folder of them or a glob")
    tables = []
    for path in paths:
        storage = Storage(path, storage_options)
        prompts: list[str] = []
        categories: list[str | None] = []
        for file in _files(path, storage):
            file_prompts, file_categories = _read(file, storage.read(file))
            prompts += file_prompts
            categories += file_categories
        if not prompts:
            raise PromptSetError(f"prompt set {path} holds no prompts")
        if all(c is None for c in categories) and len(paths) > 1:
            categories = [PurePosixPath(path).stem] * len(prompts)
        tables.append(pa.table({"prompt": pa.array(prompts, pa.string()),
                                "category": pa.array(categories, pa.string())}))
    return pa.concat_tables(tables)


def read_prompts(path: str, storage_options: dict | None = None) -> list[str]:
    """The prompts of one prompt set (see :func:`load_prompt_set`), in file order."""
    return load_prompt_set([path], storage_options).column("prompt").to_pylist()


def _files(spec: str, storage: Storage) -> list[str]:
    """The files of one prompt set, sorted, as paths inside ``storage.fs``."""
    try:
        return find_prompt_files(spec, storage, SUFFIXES, kind=f"prompt ({FORMATS})", label="prompt set")
    except PromptInputError as error:
        raise PromptSetError(str(error)) from None


def _read(path: str, data: bytes) -> tuple[list[str], list[str | None]]:
    """The prompts and categories of one file; a damaged Parquet, CSV or JSON file is named, not a traceback."""
    try:
        return _parse(path, data)
    except (pa.ArrowException, json.JSONDecodeError) as error:
        raise PromptSetError(f"{path}: cannot be read as {PurePosixPath(path).suffix.lstrip('.') or 'text'} "
                             f"({type(error).__name__}: {error}); rewrite it or remove it from the set") from None


def _parse(path: str, data: bytes) -> tuple[list[str], list[str | None]]:
    suffix = PurePosixPath(path).suffix.lower()
    if suffix in (".parquet", ".pq"):
        return _columns(pq.read_table(io.BytesIO(data)).to_pylist(), path)
    if suffix == ".csv":
        return _columns(pacsv.read_csv(io.BytesIO(data)).to_pylist(), path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptSetError(f"{path}: not UTF-8 text ({error}); give a file in {FORMATS}") from None
    if suffix == ".json":
        items = json.loads(text)
        if isinstance(items, dict):  # {category: [prompts]} as hpsv2.benchmark_prompts('all') returns
            return ([p for ps in items.values() for p in ps],
                    [c for c, ps in items.items() for _ in ps])
        if not isinstance(items, list):
            raise PromptSetError(f"{path}: expected a JSON list of prompts or of {{prompt, category}} objects")
        return _columns([{"prompt": i} if isinstance(i, str) else i for i in items], path)
    if suffix == ".jsonl":
        return _columns([json.loads(line) for line in text.splitlines() if line.strip()], path)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return lines, [None] * len(lines)


def _columns(rows: list[dict], path: str) -> tuple[list[str], list[str | None]]:
    if not rows:
        return [], []
    keys = rows[0].keys()
    prompt_key = next((k for k in PROMPT_COLUMNS if k in keys), None)
    if prompt_key is None:
        raise PromptSetError(f"{path}: no prompt column; expected one of {', '.join(PROMPT_COLUMNS)}, found "
                             f"{', '.join(map(str, keys))}")
    category_key = next((k for k in CATEGORY_COLUMNS if k in keys), None)
    prompts = []
    for index, row in enumerate(rows):
        value = row.get(prompt_key)
        if not isinstance(value, str):
            raise PromptSetError(f"{path}: row {index} has a non-text prompt {value!r}")
        prompts.append(value)
    categories = [None if category_key is None or row.get(category_key) is None else str(row[category_key])
                  for row in rows]
    return prompts, categories
