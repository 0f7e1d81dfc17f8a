"""The model-family table: a checkpoint's family comes from its ``_class_name``, and a family defined under
``tests/`` (``plugin_family``) is registered by entry points in the ``maskray.families`` group, with no edit to
``mgt/``, and ``mgt.load_pipeline`` samples with it.

The entry points come from a ``*.dist-info`` folder on ``sys.path`` (``importlib.metadata`` reads any such
folder, as it reads an installed distribution's), in a subprocess, so no other test sees the family.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mgt
from mgt.hub.loading import ModelLoadError, resolve_model_path
from mgt.models.families import detect_family

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json
    import torch
    import mgt
    from mgt.models.families import FAMILIES, family_of

    pipe = mgt.load_pipeline("tiny-labels", device="cpu")
    out = pipe.generate(["3", "7", "3"], [0, 0, 1], steps=4)
    try:  # a family without a cached forward refuses cached-context steps in one line
        pipe.generate(["3"], [0], steps=4, sampler=mgt.SamplerConfig.from_spec("recap"))
        refusal = None
    except ValueError as error:
        refusal = str(error)
    print(json.dumps({"refusal": refusal,
        "families": FAMILIES.names(), "family": pipe.family, "of_transformer": family_of(pipe.transformer).name,
        "images": list(out.images.shape), "nfe": out.nfe, "masked_left": int((out.tokens == pipe.mask_token_id).sum()),
        "labels_matter": not torch.equal(out.tokens[0], out.tokens[1]),
        "seeds_matter": not torch.equal(out.tokens[0], out.tokens[2])}))
""")


def write_distribution(site: Path) -> None:
    """A distribution ``plugin-family`` that declares the family and its tiny model, as its pyproject would."""
    info = site / "plugin_family-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-family\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[maskray.families]\nlabels = plugin_family:LABELS\n\n"
                                           "[maskray.models]\ntiny-labels = plugin_family:build_tiny_labels\n")


def test_a_family_registered_by_entry_points_loads_and_samples(tmp_path):
    write_distribution(tmp_path / "site")
    env = {**os.environ, "MASKRAY_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(tmp_path / "site")])}
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["families"] == ["amused", "labels", "maskgit", "meissonic"]
    assert report["family"] == report["of_transformer"] == "labels"
    assert report["images"] == [3, 32, 32, 3] and report["nfe"] == 4 and report["masked_left"] == 0
    assert report["labels_matter"] and report["seeds_matter"]  # the label conditioning reaches the transformer
    assert report["refusal"].startswith("sampler cache (cached-context steps) is not available for the labels family")


@pytest.mark.parametrize("model,family", [("tiny-meissonic", "meissonic"), ("tiny-monetico", "meissonic"),
                                          ("tiny-amused", "amused")])
def test_the_family_comes_from_the_class_name(model, family):
    assert detect_family(resolve_model_path(model)).name == family


def test_a_config_without_a_known_class_name_names_the_known_ones(tmp_path, fixtures_dir):
    folder = tmp_path / "model"
    shutil.copytree(fixtures_dir / "meissonic-tiny-1024style", folder)
    assert detect_family(folder).name == "meissonic"  # the reference checkpoint's own config
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "_class_name"}))
    with pytest.raises(ModelLoadError, match=r"no _class_name; add the one of its family \(amused: UVit2DModel; "
                                             r"maskgit: MaskTransformer; meissonic: Transformer2DModel\)"):
        detect_family(folder)
    config.write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ModelLoadError, match="'PixArtTransformer2DModel' is no known model family's"):
        detect_family(folder)


def test_an_unknown_model_index_default_is_named(tmp_path):
    folder = shutil.copytree(resolve_model_path("tiny-meissonic"), tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    index["_maskray_defaults"]["text_max_lenght"] = 24
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="_maskray_defaults has text_max_lenght, which a meissonic model does not"):
        mgt.load_pipeline(str(folder), device="cpu")
