"""The `maskray` CLI: import hygiene, `maskray sample` end to end, and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main


def run_python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_help_imports_neither_torch_nor_ray():
    out = run_python(
        "import sys, contextlib, io\n"
        "from jobs.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        "    try: main(['sample', '--help'])\n"
        "    except SystemExit: pass\n"
        "print('torch' in sys.modules, 'ray' in sys.modules)"
    )
    assert out.split() == ["False", "False"]


def test_engine_import_does_not_load_ray():
    out = run_python("import sys, mgt; mgt.load_pipeline; import mgt.sampling.loop; print('ray' in sys.modules)")
    assert out.strip() == "False"


def test_sample_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--prompts-file", "--seed", "--steps", "--guidance", "--width", "--height",
                 "--negative-prompt", "--dtype", "--device", "--out", "--sampler", "--config"):
        assert flag in text


def test_sample_writes_pngs(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na blue square\n")
    code = main(["sample", "--prompts-file", str(prompts), "--prompt", "", "--seed", "5", "--steps", "4",
                 "--device", "cpu", "--out", str(tmp_path / "out"), "--num-images", "2"])
    assert code == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in files][:3] == ["0000_unconditional_s5.png", "0000_unconditional_s6.png", "0001_a-red-circle_s5.png"]
    assert len(files) == 6
    image = Image.open(files[2])
    assert image.size == (64, 64) and np.asarray(image).dtype == np.uint8
    meta = json.loads(image.text["maskray"])
    assert meta["prompt"] == "a red circle" and meta["seed"] == 5 and meta["steps"] == 4


def test_yaml_config_and_flag_precedence(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 3\nwidth: 32\nheight: 48\ndevice: cpu\n")
    code = main(["sample", "--config", str(config), "--prompt", "x", "--height", "32", "--out", str(tmp_path)])
    assert code == 0
    meta = json.loads(Image.open(next(tmp_path.glob("*.png"))).text["maskray"])
    assert (meta["steps"], meta["width"], meta["height"]) == (3, 32, 32)


@pytest.mark.parametrize("argv,message", [
    (["sample", "--prompt", "x", "--steps", "0"], "--steps / steps: Input should be greater than or equal to 1"),
    (["sample", "--prompt", "x", "--width", "60", "--device", "cpu"], "nearest valid: 56 or 64"),
    (["sample", "--prompt", "x", "--device", "tpu"], "device 'tpu'"),
    (["sample", "--prompt", "x", "--model", "./missing-folder"], "not a local folder"),
    (["sample"], "no prompts"),
    (["sample", "--prompts-file", "/nonexistent.txt"], "does not exist"),
])
def test_errors_are_one_line(argv, message, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
