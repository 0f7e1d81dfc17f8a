"""Tiny random models in the real hub layouts, built locally so tests and demos need no download.

``tiny-meissonic`` (1024-style: the transformer down-samples), ``tiny-monetico`` (512-style: it does
not) and ``tiny-amused`` (diffusers ``UVit2DModel``) are complete models: transformer, VQ, CLIP text
encoder, a CLIP tokenizer written here (byte-level BPE over single characters), scheduler config and
``model_index.json``; ``tiny-maskgit`` (class-conditional) has only the transformer and the VQ. Weights are seeded, so every machine builds the same model. ``mgt.hub.loading``
registers them by name (``tiny-meissonic`` ...) and imports this module only when one is first built.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mgt.models.families import ModelFamily, get_family

TEXT_WIDTH = 32
CODEBOOK = 64
# Tiny models default to small, fast images; model_index.json carries these under _maskray_defaults.
TINY_DEFAULTS = {"steps": 16, "width": 64, "height": 64}


def write_tokenizer(folder: Path, words: list[str] = ()) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over single bytes, plus merges that make each of ``words`` one token."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if (symbols[0], symbols[1]) not in merges:
                merges.append((symbols[0], symbols[1]))
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def write_text_encoder(folder: Path, vocab_size: int, width: int = TEXT_WIDTH, layers: int = 2) -> None:
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                            num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=width, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                            pad_token_id=0)
    CLIPTextModelWithProjection(config).save_pretrained(folder)


def tiny_vqvae(blocks: int = 3, codebook: int = CODEBOOK) -> VQModel:
    """A VQ model with scale factor ``2**(blocks-1)`` and the Meissonic/aMUSEd decoding path."""
    return VQModel(act_fn="silu", block_out_channels=[16] * blocks, down_block_types=["DownEncoderBlock2D"] * blocks,
                   up_block_types=["UpDecoderBlock2D"] * blocks, in_channels=3, out_channels=3, latent_channels=8,
                   layers_per_block=1, norm_num_groups=8, num_vq_embeddings=codebook, sample_size=32,
                   mid_block_add_attention=False, lookup_from_codebook=True, force_upcast=True)


def write_model(folder: Path, transformer: torch.nn.Module, vqvae: VQModel, family: str | ModelFamily,
                defaults: dict | None = None, seed: int = 0, words: list[str] = ()) -> None:
    """Write a complete model folder in the hub layout around a transformer and a VQ model.

    The transformer config's ``_class_name`` is the family's reference name (Meissonic's hub config names the
    reference class, not ours), so the folder loads as that family.
    """
    family = get_family(family) if isinstance(family, str) else family
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(folder / "transformer")
    path = folder / "transformer" / "config.json"
    config = json.loads(path.read_text())
    if config["_class_name"] != family.class_names[0]:
        config["_class_name"] = family.class_names[0]
        path.write_text(json.dumps(config, indent=2, sort_keys=True))
    vqvae.save_pretrained(folder / "vqvae")
    index = {"_class_name": family.model_index["_class_name"]}
    if "scheduler" in family.model_index:
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": family.model_index["scheduler"][1], "mask_token_id": transformer.config.vocab_size - 1,
             "masking_schedule": "cosine"}, indent=2))
        index["scheduler"] = family.model_index["scheduler"]
    if "text_encoder" in family.subfolders:  # a text-conditioned family: a CLIP tokenizer and text encoder
        tokenizer = write_tokenizer(folder / "tokenizer", words)
        torch.manual_seed(seed + 1)
        write_text_encoder(folder / "text_encoder", len(tokenizer))
        index.update(text_encoder=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer=["transformers", "CLIPTokenizer"])
    index.update(transformer=family.model_index["transformer"], vqvae=["diffusers", "VQModel"])
    if defaults:
        index["_maskray_defaults"] = defaults
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def build_tiny(folder: Path, family: str, seed: int = 0, defaults: dict | None = None, **options) -> None:
    """Write the tiny model of ``family`` (its ``tiny_transformer(**options)``) into ``folder``."""
    family = get_family(family)
    torch.manual_seed(seed)
    transformer = family.tiny_transformer(**options)
    _perturb(transformer)  # zero-initialised gates would make the blocks no-ops
    vqvae = tiny_vqvae()
    write_model(folder, transformer, vqvae, family, defaults=dict(TINY_DEFAULTS) if defaults is None else defaults,
                seed=seed)


@torch.no_grad()
def _perturb(module: torch.nn.Module, scale: float = 0.05) -> None:
    for parameter in module.parameters():
        parameter.add_(torch.randn_like(parameter) * scale)


# The builders that ``mgt.hub.loading.MODELS`` names: each writes its model into the cache folder it is given.
def build_tiny_meissonic(folder: Path) -> None:
    build_tiny(folder, "meissonic")


def build_tiny_monetico(folder: Path) -> None:
    build_tiny(folder, "meissonic", downsample=False)


def build_tiny_amused(folder: Path) -> None:
    build_tiny(folder, "amused")


def build_tiny_maskgit(folder: Path) -> None:
    """MaskGIT-256-style: a 16x16 grid (64 px through the tiny VQ), the reference's 256 settings (8 steps)."""
    build_tiny(folder, "maskgit", defaults={})
