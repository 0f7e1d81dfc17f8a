"""``maskray sample``: generate (or edit: ``--init-image``) images for a few prompts in this process, write PNGs.

Every prompt uses ``--seed`` (and ``--seed+1 ...`` for ``--num-images`` > 1), so a prompt's image
depends only on (prompt, seed, settings), never on the other prompts of the run.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from jobs.cli_args import add_model_arguments, build_model, load_config_file
from mgt.config import GenerationSettings, ModelConfig
from mgt.editing import EditOptions
from pipeline.prompt_sets import FORMATS
from pipeline.prompt_sets import read_prompts as read_prompt_set


def add_arguments(parser: argparse.ArgumentParser) -> None:
    io = parser.add_argument_group("prompts and output")
    io.add_argument("--prompt", action="append", default=[], help="A prompt; repeat for several. An empty string "
                    "gives an unconditional sample.")
    io.add_argument("--prompts-file", help=f"Prompts from a file ({FORMATS}; text: one prompt per line, blank "
                    "lines skipped), a folder of them or a glob; local or s3:// / gs://.")
    io.add_argument("--seed", type=int, default=0, help="Seed of each prompt's first image.")
    io.add_argument("--num-images", type=int, default=1, help="Images per prompt, with seeds seed, seed+1, ...")
    io.add_argument("--batch-size", type=int, default=4, help="Samples generated together.")
    io.add_argument("--out", default="samples", help="Folder for the PNG files (created if missing).")
    io.add_argument("--config", help="YAML file with any of the options below (flags override it).")
    add_model_arguments(parser, ModelConfig, "model")
    add_model_arguments(parser, GenerationSettings, "generation")
    add_model_arguments(parser, EditOptions, "editing")


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompt_set(args.prompts_file)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def run(args: argparse.Namespace) -> int:
    file_values = load_config_file(args.config)
    model_config = build_model(ModelConfig, file_values, args)
    settings = build_model(GenerationSettings, file_values, args)
    edit_options = build_model(EditOptions, file_values, args, "editing options")
    prompts = read_prompts(args)
    if args.num_images < 1 or args.batch_size < 1:
        raise ValueError("--num-images and --batch-size must be >= 1")

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from tqdm import tqdm

    import mgt

    # ModelConfig's fields are load_pipeline's keyword arguments, so every engine option reaches the model.
    pipe = mgt.load_pipeline(model_config.model, **model_config.model_dump(exclude={"model"}))
    edit = edit_options.load(pipe.vae_scale_factor)  # every prompt edits the same image
    jobs = [(i, prompt, args.seed + k) for i, prompt in enumerate(prompts) for k in range(args.num_images)]
    steps = settings.steps or pipe.defaults.steps
    steps_run = steps - (edit.start_step(steps) if edit else 0)  # an edit runs the end of the schedule only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(jobs) * steps_run, unit="step", desc="sampling") as bar:
        for start in range(0, len(jobs), args.batch_size):
            chunk = jobs[start:start + args.batch_size]
            size = len(chunk)
            result = settings.generate(pipe, [p for _, p, _ in chunk], [s for _, _, s in chunk],
                                       on_step=lambda _, size=size: bar.update(size), edits=[edit] * len(chunk))
            for (index, prompt, seed), image in zip(chunk, result.images):
                info = PngInfo()
                info.add_text("maskray", json.dumps({"prompt": prompt, "seed": seed, "model": model_config.model,
                                                     **settings.model_dump(mode="json"),
                                                     **edit_options.model_dump(mode="json", exclude_none=True)}))
                path = out / f"{index:04d}_{_slug(prompt)}_s{seed}.png"
                Image.fromarray(image).save(path, pnginfo=info)
    print(f"wrote {len(jobs)} images to {out}/")
    return 0


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "unconditional"
