"""The model-family seam: a family defined under ``tests/`` (``plugin_family``) is registered by entry points in
the ``maskray.families`` group, with no edit to ``mgt/``, and ``mgt.load_pipeline`` samples with it.

The entry points come from a ``*.dist-info`` folder on ``sys.path`` (``importlib.metadata`` reads any such
folder, as it reads an installed distribution's), in a subprocess, so no other test sees the family.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json
    import torch
    import mgt
    from mgt.models.families import FAMILIES, family_of

    pipe = mgt.load_pipeline("tiny-labels", device="cpu")
    out = pipe.generate(["3", "7", "3"], [0, 0, 1], steps=4)
    print(json.dumps({
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
    assert report["families"] == ["amused", "labels", "meissonic"]
    assert report["family"] == report["of_transformer"] == "labels"
    assert report["images"] == [3, 32, 32, 3] and report["nfe"] == 4 and report["masked_left"] == 0
    assert report["labels_matter"] and report["seeds_matter"]  # the label conditioning reaches the transformer
