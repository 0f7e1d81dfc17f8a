"""Issue 49's batch-input findings, without Ray: edit images refused from their header before a decode, image URIs
limited to the prompts' own scheme plus ``--allowed-image-schemes``, glob inputs that skip hidden and ``_`` names,
unknown config keys named with the closest valid one, and redaction of URL credentials and secrets only."""

from __future__ import annotations

import argparse
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import ImageFile

from pipeline.prompts import PromptInputError, find_prompt_files, scan_prompts
from pipeline.storage import Storage

BIG = 13_000  # pixels per side of the compressed image bomb


def zeros_png(path: Path, side: int) -> Path:
    """A ``side`` x ``side`` 8-bit grayscale PNG of zeros, compressed row block by row block (no full raster in
    memory): 13000 px a side is about 164 KB on disk and 169 MB decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, rows, body = zlib.compressobj(9), b"\0" * (side + 1) * 1000, []
    for start in range(0, side, 1000):
        body.append(compressor.compress(rows[:(min(side, start + 1000) - start) * (side + 1)]))
    body.append(compressor.flush())
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return zeros_png(tmp_path_factory.mktemp("bomb") / "big.png", BIG)


@pytest.fixture
def no_decode(monkeypatch):
    """Any pixel decode fails the test: the checks must refuse from the header alone."""
    def decode(self):
        raise AssertionError(f"decoded a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decode)


# ---------------------------------------------------------------------------------------------------
# 1. image headers are checked before decoding


def test_batch_edit_images_are_refused_from_their_header(bomb, no_decode):
    from actors.generator import Generator
    from mgt.editing import MAX_IMAGE_SIDE, load_image

    assert 100_000 < bomb.stat().st_size < 250_000
    with pytest.raises(ValueError, match=f"init_image {bomb} is {BIG}x{BIG} but this run generates 32x32 images"):
        load_image(str(bomb), "init_image", size=(32, 32))
    with pytest.raises(ValueError, match=f"--init-image {bomb} is {BIG}x{BIG}; each side must be at most "
                                         f"{MAX_IMAGE_SIDE} pixels"):
        load_image(str(bomb), "--init-image")  # maskray sample: the image's size is the output size

    # the generator actor's own reading of a row's init_image and mask_image (no model needed for the refusal)
    actor = SimpleNamespace(settings=SimpleNamespace(width=32, height=32), storage_options={}, fail_fast=False)
    batch = {"init_image": np.array([str(bomb), ""], dtype=object), "mask_image": np.array([None, None], dtype=object)}
    edits, failed = Generator._edits(actor, batch, 2)
    assert edits == [None, None] and list(failed) == [0]
    assert f"is {BIG}x{BIG} but this run generates 32x32" in str(failed[0])


def test_the_serve_route_shares_the_header_check(bomb, no_decode):
    from jobs.serve.edit_images import ImageFieldError, open_image

    with pytest.raises(ImageFieldError, match=f"mask is {BIG}x{BIG}; each side must be at most 2048 pixels"):
        open_image(bomb.read_bytes(), "mask")


# ---------------------------------------------------------------------------------------------------
# 2. image URIs: the prompts' own scheme plus --allowed-image-schemes


def edit_prompts(folder: Path, *init_images: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "p.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(len(init_images))],
                             "init_image": list(init_images)}), path)
    return path


@pytest.mark.parametrize("uri, scheme", [
    ("http://127.0.0.1:9/a.png", "http"),
    ("HTTPS://example.com/a.png", "https"),
    ("simplecache::http://127.0.0.1:9/a.png", "http, simplecache"),
    ("s3://bucket/a.png", "s3"),
])
def test_image_uris_of_another_scheme_are_refused_naming_the_uri(tmp_path, uri, scheme):
    path = edit_prompts(tmp_path, "a.png", "/abs/b.png", uri)
    with pytest.raises(PromptInputError, match=rf"p.parquet row 2 \(in file order\) has init_image '{uri}', whose "
                                               rf"scheme {scheme} is not the prompts' \(file, local\); add "
                                               rf"--allowed-image-schemes"):
        scan_prompts(str(path), Storage(str(path)), 1)
    allowed = scheme.split(", ")
    assert scan_prompts(str(path), Storage(str(path)), 1, allowed_image_schemes=allowed).rows == 3


def test_local_paths_from_prompts_in_an_object_store_are_refused(s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("bucket")
    table = pa.table({"prompt": ["a", "b"], "init_image": ["images/a.png", "/etc/hostname"]})
    with fs.open("bucket/in/p.parquet", "wb") as f:
        pq.write_table(table, f)
    storage = Storage("s3://bucket/in/p.parquet", s3)
    with pytest.raises(PromptInputError, match="row 1 .* has init_image '/etc/hostname', a local path, but the "
                                               r"prompts are not local \(allowed schemes: s3, s3a\)"):
        scan_prompts("s3://bucket/in/p.parquet", storage, 1)
    assert scan_prompts("s3://bucket/in/p.parquet", storage, 1, allowed_image_schemes=["file"]).rows == 2


def test_allowed_image_schemes_is_a_flag_outside_the_config_hash(tmp_path):
    from jobs import generate_cmd
    from pipeline.config import UNHASHED_OPTIONS, GenerateConfig

    parser = argparse.ArgumentParser()
    generate_cmd.add_arguments(parser)
    args = parser.parse_args(["--allowed-image-schemes", "HTTP, https://", "--allowed-image-schemes", "gs"])
    config = generate_cmd.resolve_config(args)
    assert config.job.allowed_image_schemes == ["http", "https", "gs"]
    assert "allowed_image_schemes" in UNHASHED_OPTIONS
    assert config.config_hash() == GenerateConfig().config_hash()


# ---------------------------------------------------------------------------------------------------
# 5. glob inputs skip hidden and _ names, as folders do


def test_glob_inputs_skip_hidden_and_underscore_names(tmp_path):
    root = tmp_path / "_runs" / "d"  # a _ name above the glob is the user's choice
    for name in ("a.parquet", "_b.parquet", ".c.parquet", "sub/d.parquet", "_tmp/e.parquet"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"prompt": ["x"]}), root / name)
    storage = Storage(str(root))
    assert find_prompt_files(f"{root}/*.parquet", storage) == [str(root / "a.parquet")]
    assert find_prompt_files(f"{root}/*/*.parquet", storage) == [str(root / "sub" / "d.parquet")]
    assert find_prompt_files(str(root), storage) == [str(root / "a.parquet"), str(root / "sub" / "d.parquet")]


# ---------------------------------------------------------------------------------------------------
# 6. unknown config keys are errors naming the closest valid key


def resolve(command, path: Path, *flags: str):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--config", str(path), *flags])
    return command.resolve_config(args) if hasattr(command, "resolve_config") else command.run(args)


def test_unknown_config_keys_name_the_closest_valid_key(tmp_path):
    from jobs import evaluate_cmd, generate_cmd

    path = tmp_path / "run.yaml"
    path.write_text("out: o\nstorage_option:\n  anon: true\n")
    for command in (generate_cmd, evaluate_cmd):
        with pytest.raises(ValueError, match=rf"^unknown key 'storage_option' in {path}; did you mean "
                                             rf"'storage_options'\?$"):
            resolve(command, path)
    path.write_text("batch-sise: 2\n")  # spelled as the flag: named as written
    with pytest.raises(ValueError, match="unknown key 'batch-sise' .*; did you mean 'batch_size'"):
        resolve(generate_cmd, path)
    path.write_text("zzzzzzzz: 1\n")
    with pytest.raises(ValueError, match="unknown key 'zzzzzzzz' in .*; the keys are the command's flags without '--'"):
        resolve(generate_cmd, path)
    path.write_text("webdataset: true\nsampler: noise\n")  # a removed option still gets its own message
    with pytest.raises(ValueError, match="--webdataset was removed"):
        resolve(generate_cmd, path)


# ---------------------------------------------------------------------------------------------------
# 7. redaction


def test_url_credentials_are_redacted_and_only_secrets_are_scrubbed_from_text():
    from pipeline.redact import REDACTED, redact, redact_text, secret_values

    config = {"job": {"prompts": "path/to/prompts", "storage_options": {
        "client_kwargs": {"endpoint_url": "https://alice:pa55w0rd@minio.internal:9000"},
        "profile": "path", "cache_storage": "default", "secret": "s3cr3t-value"}}}
    hidden = redact(config)["job"]["storage_options"]
    assert hidden["client_kwargs"]["endpoint_url"] == f"https://{REDACTED}@minio.internal:9000"
    assert hidden["profile"] == hidden["secret"] == REDACTED  # the recorded config still hides other options
    text = ("cannot list path/to/prompts (default profile) at https://alice:pa55w0rd@minio.internal:9000 "
            "with s3cr3t-value")
    assert redact_text(text, secret_values(config)) == (
        f"cannot list path/to/prompts (default profile) at https://{REDACTED}@minio.internal:9000 with {REDACTED}")


def test_a_string_storage_options_is_refused_without_echo(tmp_path):
    from jobs import generate_cmd

    path = tmp_path / "run.yaml"
    path.write_text("storage_options: key=AKIAEXAMPLE secret=s3cr3t-value\n")
    with pytest.raises(ValueError) as refused:
        resolve(generate_cmd, path)
    message = str(refused.value)
    assert "storage_options must be a mapping of fsspec options" in message and "got a str" in message
    assert "AKIA" not in message and "s3cr3t" not in message and "\n" not in message
