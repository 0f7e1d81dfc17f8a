"""``shapes-meissonic`` and the ``shapes`` scorer, trained end to end and written in the layouts they load from.

``train_model`` runs two stages into one folder: the VQ tokenizer (``vqvae/`` is written as soon as it
is trained, so an interrupted run resumes after it) and then the transformer with its text encoder,
after which the whole hub layout is written (``transformer/ vqvae/ text_encoder/ tokenizer/ scheduler/
model_index.json``) plus ``training.json`` with the settings and the measured figures. ``train_scorer``
trains the scene detector and writes it with ``save_pretrained``. Both are reproducible by seed: the
same settings and thread count give the same weights (``minutes`` can only end a run early).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from diffusers import VQModel

from mgt.models.tiny import write_model, write_tokenizer
from shapes import scenes
from shapes.training.config import TrainShapesConfig
from shapes.training.detector import train_detector, train_shape_classifier
from shapes.training.generator import TEXT_LENGTH, Architecture, Recipe, grow_transformer, train_generator
from shapes.training.vq import reconstruction_psnr, train_vq

Progress = Callable[[str, int, int, float], None]  # (stage, step, total steps, loss)
PSNR_SCENES = 256  # held-out scenes the reconstruction PSNR is measured on


def model_defaults(config: TrainShapesConfig) -> dict:
    """``_maskray_defaults`` of the written model (read by ``mgt.pipeline``)."""
    return {"steps": config.sample_steps, "guidance": config.guidance, "negative_prompt": "",
            "width": scenes.SIZE, "height": scenes.SIZE, "text_max_length": TEXT_LENGTH}


def train_model(config: TrainShapesConfig, out: Path, progress: Progress | None = None) -> dict:
    """Train VQ, then transformer + text encoder, into ``out`` (hub layout); returns the report.

    With ``config.init_from`` the run is a fine-tune stage of that model instead (:func:`continue_model`).
    """
    out = Path(out)
    if config.init_from is not None:
        return continue_model(config, init_folder(config.init_from), out, progress)
    vq_key = {"seed": config.seed, "vq_steps": config.vq_steps, "threads": config.threads}
    record, record_path = _start_record(out, config, "vq", vq_key)

    started = time.monotonic()
    if "vq" in record and (out / "vqvae" / "config.json").is_file():  # resume after the finished VQ stage
        vq = VQModel.from_pretrained(out / "vqvae").eval().requires_grad_(False)
    else:
        vq = train_vq(config.seed, config.vq_steps, on_step=_stage(progress, "vq", config.vq_steps))
        vq.save_pretrained(out / "vqvae")
        record.update(vq=vq_key, vq_seconds=round(time.monotonic() - started, 1))
        record_path.write_text(json.dumps(record, indent=2))
    record["vq_psnr_db"] = round(reconstruction_psnr(vq, scenes.held_out_seeds(PSNR_SCENES)), 2)

    tokenizer = write_tokenizer(out / "tokenizer", scenes.vocabulary())
    record.update(_generator_stage(config, out, vq, tokenizer, progress))
    record_path.write_text(json.dumps(record, indent=2))
    return record


def init_folder(init_from: str) -> Path:
    """The model folder ``--init-from`` names: a registered model's (``shapes-meissonic`` continues the shipped
    model, as the stages in docs/shapes-training.md do) or the folder given."""
    from mgt.hub.loading import registered_models, resolve_model_path

    return resolve_model_path(init_from) if init_from in registered_models() else Path(init_from)


def continue_model(config: TrainShapesConfig, init: Path, out: Path, progress: Progress | None = None) -> dict:
    """Continue training the transformer (and text encoder, unless frozen) of the model in ``init`` into ``out``.

    The VQ and tokenizer are copied as they are; the scene stream starts after every generator step of
    ``init``'s history, so a stage never revisits a scene; ``init``'s record is kept under ``"init"``.
    ``config.width`` and ``heads`` must be the model's; ``layers`` and ``single_layers`` may exceed its block
    counts, which appends blocks that start as the identity (:func:`grow_transformer`).
    """
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from mgt.models.meissonic import MeissonicTransformer

    previous_path = init / "training.json"
    if not previous_path.is_file():
        raise FileNotFoundError(f"--init-from {init}: no training.json there; pass a folder written by "
                                f"`maskray train-shapes --part model` or a registered shapes model (shapes-meissonic)")
    previous = json.loads(previous_path.read_text())
    first_step = previous.get("first_step", 0) + previous["generator_steps_done"]
    trained = MeissonicTransformer.from_pretrained(init / "transformer")
    heads, width = trained.config.num_attention_heads, trained.config.num_attention_heads * trained.config.attention_head_dim
    if (config.width, config.heads) != (width, heads):
        raise ValueError(f"--width {config.width} --heads {config.heads}: the transformer in {init} has width {width} "
                         f"in {heads} heads; a stage keeps them (pass --width {width} --heads {heads})")
    start = (grow_transformer(trained, config.layers, config.single_layers, config.seed),
             CLIPTextModelWithProjection.from_pretrained(init / "text_encoder"))
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": config.model_dump(), "init": previous, "first_step": first_step}
    vq = VQModel.from_pretrained(init / "vqvae").eval().requires_grad_(False)
    record.update(_generator_stage(config, out, vq, CLIPTokenizer.from_pretrained(init / "tokenizer"), progress,
                                   start, first_step))
    (out / "training.json").write_text(json.dumps(record, indent=2))
    return record


def _generator_stage(config: TrainShapesConfig, out: Path, vq: VQModel, tokenizer, progress: Progress | None,
                     start: tuple | None = None, first_step: int = 0) -> dict:
    """Train the generator by ``config`` (from scratch, or from ``start`` reading scenes from ``first_step``),
    write the model into ``out`` and return the stage's figures for ``training.json``."""
    started = time.monotonic()
    deadline = None if config.minutes is None else started + 60 * config.minutes
    run = train_generator(
        vq, tokenizer, config.seed, config.steps, config.sample_steps, config.batch_size, config.lr,
        config.cond_dropout, config.text_steps,
        recipe=Recipe(config.text_lr_scale, config.hole_share, config.high_mask_share, config.lattice,
                      config.anchors, config.silhouette, config.lessons, config.hole_subset,
                      config.canonical, config.scene_kinds),
        architecture=Architecture(config.width, config.heads, config.layers, config.single_layers),
        should_stop=lambda: deadline is not None and time.monotonic() > deadline,
        on_step=_stage(progress, "generator", config.steps),
        on_text_step=_stage(progress, "text encoder", config.text_steps), start=start, first_step=first_step)
    write_generator(out, run.transformer, run.text_encoder, vq, config)
    return {"text_caption_accuracy": run.caption_accuracy, "generator_steps_done": run.steps_done,
            "generator_seconds": round(time.monotonic() - started, 1)}


def write_generator(out: Path, transformer, text_encoder, vq: VQModel, config: TrainShapesConfig) -> None:
    """Write a trained transformer, text encoder and VQ as a loadable model folder (hub layout) in ``out``."""
    write_model(out, transformer, vq, "meissonic", defaults=model_defaults(config), seed=config.seed,
                words=scenes.vocabulary())
    text_encoder.save_pretrained(out / "text_encoder")  # replaces the random encoder write_model put there


def train_scorer(config: TrainShapesConfig, out: Path, progress: Progress | None = None) -> dict:
    """Train the shapes scorer into ``out``: the scene detector (``config.json`` + safetensors; an
    interrupted run resumes after it) and the window shape classifier (``shape_classifier/``)."""
    out = Path(out)
    key = {"seed": config.seed, "scorer_steps": config.scorer_steps, "threads": config.threads}
    record, record_path = _start_record(out, config, "detector", key)
    started = time.monotonic()
    if "detector" not in record or not (out / "config.json").is_file():
        detector = train_detector(config.seed, config.scorer_steps,
                                  on_step=_stage(progress, "detector", config.scorer_steps))
        detector.save_pretrained(out)
        record.update(detector=key, detector_seconds=round(time.monotonic() - started, 1))
        record_path.write_text(json.dumps(record, indent=2))
    started = time.monotonic()
    shapes = train_shape_classifier(config.seed, config.shape_steps,
                                    on_step=_stage(progress, "shape classifier", config.shape_steps))
    shapes.save_pretrained(out / "shape_classifier")
    record.update(shape_classifier_seconds=round(time.monotonic() - started, 1))
    record_path.write_text(json.dumps(record, indent=2))
    return record


def _start_record(out: Path, config: TrainShapesConfig, first_stage: str, key: dict) -> tuple[dict, Path]:
    """The new ``training.json`` record of a run into ``out`` (created) and its path.

    The record holds this run's config, plus the first stage's entry (``key`` and its seconds) when the
    previous run in ``out`` finished that stage with the same ``key``: the caller then resumes after it.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "training.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    seconds = f"{first_stage}_seconds"
    finished = {first_stage: key, seconds: previous[seconds]} if previous.get(first_stage) == key else {}
    return {"config": config.model_dump(), **finished}, path


def _stage(progress: Progress | None, name: str, total: int) -> Callable[[int, float], None] | None:
    if progress is None:
        return None
    return lambda step, loss: progress(name, step, total, loss)

