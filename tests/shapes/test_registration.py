"""The shapes package reaches the engine only through its entry points: in this process, in Ray Data actors and in
Serve replicas (sample, generate and serve with `shapes-meissonic` and the `shapes` scorer)."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.cli import main
from shapes import scenes


def test_the_entry_points_are_installed_and_import_no_torch():
    declared = {group: {e.name: e.value for e in entry_points(group=group)}
                for group in ("maskray.models", "maskray.scorers", "maskray.commands")}
    assert declared["maskray.models"]["shapes-meissonic"] == "shapes.registration:shapes_meissonic"
    assert declared["maskray.scorers"]["shapes"] == "shapes.registration:build_shapes_scorer"
    assert declared["maskray.commands"]["train-shapes"] == "shapes.train_cmd"
    code = ("import sys\nfrom importlib.metadata import entry_points\n"
            "for group in ('maskray.models', 'maskray.scorers', 'maskray.commands'):\n"
            "    [e.load() for e in entry_points(group=group)]\n"
            "print('torch' in sys.modules, 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_maskray_help_lists_train_shapes_and_loads_neither_torch_nor_ray():
    code = ("import sys, contextlib, io\nfrom jobs.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as f:\n"
            "    try: main(['--help'])\n    except SystemExit: pass\n"
            "print('torch' in sys.modules, 'ray' in sys.modules)\nprint(f.getvalue())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    flags, help_text = out.split("\n", 1)
    assert flags.split() == ["False", "False"]
    assert "train-shapes" in help_text and "Train the shapes-meissonic model" in help_text


def test_sample_with_the_shipped_model(tmp_path):
    assert main(["sample", "--model", "shapes-meissonic", "--prompt", "a red circle above a blue square",
                 "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert Image.open(png).size == (64, 64) and json.loads(Image.open(png).text["maskray"])["steps"] == 2


def test_generate_on_ray_with_the_shapes_model_and_scorer(ray_local, tmp_path):
    """The generator and scorer actors are Ray worker processes: they find ``shapes-meissonic`` and the
    ``shapes`` scorer through the installed entry points, as the driver does."""
    from pipeline.config import GenerateConfig
    from pipeline.generate import run_generate

    captions = [scenes.make_scene(seed).caption for seed in scenes.held_out_seeds(4)]
    pq.write_table(pa.table({"prompt_id": [f"p{i}" for i in range(4)], "prompt": captions}), tmp_path / "prompts.parquet")
    config = GenerateConfig.model_validate({
        "job": {"prompts": str(tmp_path / "prompts.parquet"), "out": str(tmp_path / "out"), "batch_size": 2,
                "scorer": "shapes", "fail_fast": True},
        "model": {"model": "shapes-meissonic"},
        "generation": {"steps": 2}})
    summary = run_generate(config, log=lambda _: None)
    assert (summary.rows, summary.errors) == (4, 0)
    metrics = pq.read_table(tmp_path / "out" / "metrics.parquet")
    scores = metrics["score"].to_numpy()
    assert np.all((scores >= 0) & (scores <= 1)), scores
    for uri in metrics["image_uri"].to_pylist():
        assert Image.open(uri).size == (64, 64)  # the shipped model's default size, read from its folder


def test_serve_with_the_shapes_model_and_scorer(ray_local):
    """The Serve replicas (Ray actors) resolve ``shapes-meissonic`` and the ``shapes`` scorer the same way."""
    import base64
    import io

    import requests
    from loopback import free_port
    from ray import serve

    from jobs.serve.app import build_app

    port = free_port()
    caption = scenes.make_scene(next(iter(scenes.held_out_seeds(1)))).caption
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app({"model": "shapes-meissonic", "scorer": {"name": "shapes", "device": "cpu"},
                             "allow_unauthenticated": True}),  # loopback only
                  name="maskray-shapes", route_prefix="/")
        response = requests.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=120,
                                 json={"prompt": caption, "seed": 3, "steps": 2, "response_format": "b64_json"})
    finally:
        serve.shutdown()
    assert response.status_code == 200, response.text
    body = response.json()
    (item,) = body["data"]
    assert body["scorer"] == "shapes" and 0.0 <= item["score"] <= 1.0
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size == (64, 64)
