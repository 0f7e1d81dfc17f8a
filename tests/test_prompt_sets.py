"""One prompt reader for every command that takes prompts: each format, a folder of shards and a glob."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.prompt_sets import PromptSetError, load_prompt_set, read_prompts

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def write_set(folder, kind: str) -> str:
    """``PROMPTS`` written as one ``kind`` prompt set under ``folder``; returns what to pass as --prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "parquet-folder":  # shards as `maskray generate` reads them, plus files a writer leaves beside them
        for index, part in enumerate((PROMPTS[:2], PROMPTS[2:])):
            pq.write_table(pa.table({"prompt_id": [f"{index}-{i}" for i in range(len(part))], "prompt": part}),
                           folder / f"part-{index:05d}.parquet")
        (folder / "_SUCCESS").write_text("")
        (folder / ".part-00000.parquet.crc").write_text("x")
        return str(folder)
    if kind == "parquet-glob":
        write_set(folder, "parquet-folder")
        return str(folder / "part-*.parquet")
    path = folder / f"prompts.{kind}"
    if kind == "parquet":
        pq.write_table(pa.table({"prompt": PROMPTS}), path)
    elif kind == "json":
        path.write_text(json.dumps(PROMPTS))
    elif kind == "jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS))
    elif kind == "csv":
        path.write_text("prompt\n" + "\n".join(PROMPTS) + "\n")
    else:  # text, one prompt per line; blank lines and # comments skipped
        path.write_text("# shapes\n" + "\n\n".join(PROMPTS) + "\n")
    return str(path)


KINDS = ["parquet", "json", "jsonl", "csv", "txt", "parquet-folder", "parquet-glob"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reads_the_same_prompts(tmp_path, kind):
    assert read_prompts(write_set(tmp_path / "set", kind)) == PROMPTS


def test_any_other_extension_is_text(tmp_path):
    (tmp_path / "prompts.lst").write_text("one\ntwo\n")
    assert read_prompts(str(tmp_path / "prompts.lst")) == ["one", "two"]
    (tmp_path / "binary.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PromptSetError, match="not UTF-8 text"):
        read_prompts(str(tmp_path / "binary.dat"))


def test_empty_folders_and_globs_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptSetError, match="empty' matches no prompt"):
        load_prompt_set([str(tmp_path / "empty")])
    with pytest.raises(PromptSetError, match=r"nothing-\*\.json' matches no prompt"):
        load_prompt_set([str(tmp_path / "nothing-*.json")])


def test_several_sets_take_their_name_as_category(tmp_path):
    shards = write_set(tmp_path / "shards", "parquet-folder")
    photo = write_set(tmp_path / "photo", "json")
    table = load_prompt_set([shards, photo])
    assert table.column("category").to_pylist() == ["shards"] * 3 + ["prompts"] * 3


def test_object_store_uri(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/maskray-prompts/set/a.jsonl", "\n".join(json.dumps({"prompt": p}) for p in PROMPTS).encode())
    fs.pipe("/maskray-prompts/set/b.txt", b"one more\n")
    assert read_prompts("memory://maskray-prompts/set") == PROMPTS + ["one more"]


@pytest.mark.parametrize("kind", ["parquet-folder", "jsonl", "csv"])
def test_sample_reads_every_format(tmp_path, kind):
    out = tmp_path / "out"
    code = main(["sample", "--prompts-file", write_set(tmp_path / "set", kind), "--steps", "1", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["0000_a-red-circle_s0.png", "0001_a-blue-square_s0.png",
                                                        "0002_a-green-triangle_s0.png"]


def test_evaluate_reads_a_folder_of_parquet_shards(tmp_path):
    """``maskray evaluate --prompts DIR`` used to die with a raw IsADirectoryError traceback."""
    from jobs.evaluation.run import EvaluateOptions, prepare_prompts
    from pipeline.config import JobOptions

    options = EvaluateOptions(prompts=[write_set(tmp_path / "set", "parquet-folder")], out=str(tmp_path / "eval"))
    uri, categories = prepare_prompts(options, JobOptions())
    assert pq.read_table(uri).column("prompt").to_pylist() == PROMPTS
    assert len(categories) == 3


@pytest.mark.parametrize("command", [
    ["sample", "--prompts-file"],
    ["quantize", "--preset", "w8a16", "--out", "unused", "--prompts"],
    ["evaluate", "--scorer", "clip", "--prompts"],
])
def test_every_command_names_a_bad_prompt_folder_in_one_line(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    assert main([*command, str(tmp_path / "empty"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "matches no prompt" in err and "Traceback" not in err


@pytest.mark.parametrize("name, data", [("a.parquet", b"PAR1 not parquet"), ("a.json", b"[\"unclosed"),
                                        ("a.csv", b"prompt\na,b,c\n")])
def test_a_damaged_file_is_named_in_one_line(tmp_path, capsys, name, data):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / name).write_bytes(data)
    assert main(["sample", "--prompts-file", str(tmp_path / "set"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'set' / name}: cannot be read as" in err and err.count("\n") == 1, err
