"""Training the generator: our Meissonic transformer and a small CLIP text encoder, from scratch.

The text encoder is first pre-trained on captions alone (:mod:`shapes.training.caption_encoder`: why), then
frozen (``shapes-meissonic``) or trained with the transformer at a fraction of its rate. docs/shapes-training.md
records the measurements behind the recipe.

The objective is Meissonic's (``train/train_meissonic.py``, docs/models.md §1): ``t ~ U(0, 1)``, mask
rate ``cos(pi/2 t)``, ``round(L * rate)`` tokens (at least one) masked at random positions, cross-entropy
on the masked tokens only, and condition dropout (the caption replaced by the empty prompt) so that
classifier-free guidance works at inference. Micro-conditions are ``[64, 64, 0, 0, 6]``, as the
pipeline passes them.

Three options change what the caption is needed for (see :class:`Recipe`). With random masking alone,
a masked token with visible neighbours is best predicted by copying them, so the caption only matters
when nearly everything is masked (measured on the first shipped model: object-token cross-entropy is
identical with the true, a shape-swapped or an empty caption at mask ratios <= 0.9), and jointly trained
at the transformer's rate the text encoder forgets shape (a linear probe on its pooled embedding: 1.00
after pre-training, 0.40 after). So the encoder can be frozen (or slowed), a share of the samples have a
box around each object fully masked (an object can then only be drawn from the caption: the state the
sampler reaches once it has committed the background), and a share draw their mask ratio from >= 0.9,
where layout and shape are decided.

Timestep (our choice, in the terms of docs/models.md §1): the reference trains on ``mask_prob*1000``
but samples with the integer step value ``T-1-i``, so its model never sees at inference the values it
was trained on. We train on the value the sampler will pass for the same mask rate at ``T`` steps:
before step ``i`` the vanilla sampler has ``cos(pi/2 * i/T)`` of the tokens masked and passes
``T-1-i``, so a training sample with ``t`` gets ``max(T(1-t) - 1, 0)``, exact at every integer step.
``T`` is the model's default step count (``_maskray_defaults.steps``); the transformer multiplies by
1000 as at inference.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from diffusers import VQModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from mgt.models.meissonic import MeissonicTransformer
from shapes import scenes
from shapes.training.caption_encoder import caption_ids, pretrain_text_encoder
from shapes.training.data import scene_tensors, silhouette_maps, training_seeds
from shapes.training.schedule import optimizer_step, warmup_cosine
from shapes.training.vq import encode_tokens

TEXT_WIDTH = 64
TEXT_LENGTH = 24  # tokens per caption, padded (the longest caption of the grammar is 20)
MICRO_CONDS = (64.0, 64.0, 0.0, 0.0, 6.0)


def build_text_encoder(tokenizer: CLIPTokenizer, projection_dim: int) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder over the tokenizer's vocabulary (bos/eos are its last two ids)."""
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
                            projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config)


class Architecture(NamedTuple):
    """Size of the transformer: ``width`` channels in ``heads`` heads, ``layers`` joint (text + image)
    blocks followed by ``single_layers`` single-stream blocks, as Meissonic's are stacked."""

    width: int = 128
    heads: int = 4
    layers: int = 1
    single_layers: int = 2


def build_transformer(codebook: int, architecture: Architecture | None = None) -> MeissonicTransformer:
    """A small Meissonic transformer that down-samples the token grid 2x, as Meissonic-1024 does."""
    width, heads, layers, single_layers = architecture or Architecture()
    head_dim = width // heads
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    return MeissonicTransformer(num_layers=layers, num_single_layers=single_layers, attention_head_dim=head_dim,
                                num_attention_heads=heads, joint_attention_dim=TEXT_WIDTH, pooled_projection_dim=width,
                                axes_dims_rope=rope, vocab_size=codebook + 1, codebook_size=codebook,
                                downsample=True, upsample=True)


def grow_transformer(transformer: MeissonicTransformer, layers: int, single_layers: int,
                     seed: int = 0) -> MeissonicTransformer:
    """``transformer`` with joint and single-stream blocks appended up to ``layers`` and ``single_layers``.

    Each new block starts as the identity: its adaLN-Zero modulation (shift, scale and the gates of its residual
    branches) is zeroed, as DiT initialises every block (Peebles & Xie 2023, "Scalable Diffusion Models with
    Transformers", section 3.2), so the grown model predicts exactly what the trained one did and a fine-tune
    stage starts from there. New joint blocks follow the trained joint blocks, new single blocks the trained
    single blocks; their other weights are a new model's (seeded by ``seed``). Returns ``transformer`` itself
    when nothing is added.
    """
    have = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    if layers < have[0] or single_layers < have[1]:
        raise ValueError(f"--layers {layers} --single-layers {single_layers}: the model to continue has {have[0]} "
                         f"joint and {have[1]} single-stream blocks; a stage keeps them (pass --layers {have[0]} "
                         f"--single-layers {have[1]}) and may only add more")
    if (layers, single_layers) == have:
        return transformer
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        grown = MeissonicTransformer.from_config({**transformer.config, "num_layers": layers,
                                                  "num_single_layers": single_layers})
    missing, unexpected = grown.load_state_dict(transformer.state_dict(), strict=False)
    if unexpected or not all(key.startswith(("transformer_blocks.", "single_transformer_blocks.")) for key in missing):
        raise RuntimeError(f"growing the transformer lost weights: missing {missing}, unexpected {unexpected}")
    new_norms = [norm for block in grown.transformer_blocks[have[0]:] for norm in (block.norm1, block.norm1_context)]
    new_norms += [block.norm for block in grown.single_transformer_blocks[have[1]:]]
    with torch.no_grad():
        for norm in new_norms:
            norm.linear.weight.zero_()
            norm.linear.bias.zero_()
    return grown.to(transformer.device, transformer.dtype)


HIGH_MASK_RATE = 0.9  # the "high mask ratio" samples of Recipe.high_mask_share have at least this rate masked


class Recipe(NamedTuple):
    """How the generator is trained beyond Meissonic's objective (module docstring: why).

    Attributes:
        text_lr_scale: learning rate of the text encoder in joint training, as a fraction of ``lr``;
            0 freezes it after its pre-training.
        hole_share: share of the samples in which a jittered box around each object (2-5 px beyond its
            radius, centre moved up to 2 px) is fully masked; the rest of their tokens are masked by the schedule.
        high_mask_share: share of the samples whose mask rate is drawn from ``[HIGH_MASK_RATE, 1]``
            (``t ~ U(0, t_0.9)``) instead of the whole schedule.
        lattice: > 0 snaps the training scenes' object centres to multiples of this many pixels and their
            radii to nominal (:func:`shapes.training.data.snap_to_lattice`); 0 keeps them as drawn.
        anchors: lays the training scenes' objects out on a 3x3 grid of anchors at nominal radii
            (:func:`shapes.training.data.place_on_anchors`).
        silhouette: > 0 adds, with this weight, an auxiliary loss on the masked tokens: a 1x1 convolution on the
            features the transformer's output layer reads predicts, for each pixel of the token, background or
            which shape covers it (:func:`shapes.training.data.silhouette_maps`). Code ids mix geometry with the
            object's and the background's colour, so each edge code is seen with one colour pair only; the
            silhouette names the geometry once for all colours. The head is dropped after training.
        lessons: share of each batch made of lesson scenes (:func:`shapes.training.data.lesson_scene`: one
            object exactly on a named position, at nominal radius) instead of the benchmark's scenes.
        hole_subset: share of the hole samples of several objects that box a random non-empty subset of the
            objects (each kept with probability 1/2) instead of every one, so that some objects stay visible
            while others are drawn from the caption: the state the sampler reaches once one object is drawn,
            in which the model must draw the caption's other objects, not a copy of the first or background.
        canonical: lays the training scenes out in their caption's one canonical layout instead
            (:func:`shapes.training.data.canonical_layout`: which object goes where is fixed by the caption).
        kinds: weights of the caption kinds of the training scenes other than lessons
            (:func:`shapes.scenes.make_scene`); None: the benchmark's (:data:`shapes.scenes.KINDS`).
    """

    text_lr_scale: float = 1.0
    hole_share: float = 0.0
    high_mask_share: float = 0.0
    lattice: int = 0
    anchors: bool = False
    silhouette: float = 0.0
    lessons: float = 0.0
    hole_subset: float = 0.0
    canonical: bool = False
    kinds: Mapping[str, float] | None = None


def mask_tokens(tokens: torch.Tensor, mask_id: int, generator: torch.Generator, high_mask_share: float = 0.0,
                holes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Meissonic's masking: ``t ~ U(0,1)`` per sample, ``round(L cos(pi/2 t))`` >= 1 random positions masked.

    Args:
        tokens: `(B, h, w)` code indices.
        high_mask_share: share of the samples with ``t`` drawn so that at least ``HIGH_MASK_RATE`` is masked.
        holes: `(B, h, w)` bool positions masked in addition to the random ones (:func:`object_holes`).

    Returns:
        masked tokens `(B, h, w)`, the mask `(B, h, w)` bool, and ``t`` `(B,)`: the schedule time of the
        fraction actually masked (``cos(pi/2 t)`` = that fraction), which holes raise.
    """
    batch, length = tokens.shape[0], tokens[0].numel()
    t = torch.rand(batch, generator=generator)
    if high_mask_share > 0:  # no draw otherwise: the default stream stays that of the shipped model
        high = torch.rand(batch, generator=generator) < high_mask_share
        t = torch.where(high, t * schedule_time(HIGH_MASK_RATE), t)
    num_masked = (length * torch.cos(t * math.pi / 2)).round().clamp(min=1)
    order = torch.rand(batch, length, generator=generator).argsort(dim=-1).argsort(dim=-1)  # random ranks
    mask = (order < num_masked[:, None]).reshape(tokens.shape)
    if holes is not None:
        mask = mask | holes
        t = schedule_time(mask.flatten(1).float().mean(1))
    return torch.where(mask, mask_id, tokens), mask, t


def schedule_time(rate: torch.Tensor | float) -> torch.Tensor:
    """The ``t`` at which the cosine schedule masks ``rate`` of the tokens: ``2/pi * acos(rate)``."""
    return torch.arccos(torch.as_tensor(rate, dtype=torch.float32).clamp(0, 1)) * 2 / math.pi


def object_holes(batch: list[scenes.Scene], grid: int, generator: torch.Generator, share: float,
                 subset_share: float = 0.0) -> torch.Tensor:
    """`(B, grid, grid)` bool: for a ``share`` of the scenes, the token cells of a jittered box around each object
    (in a ``subset_share`` of those with several objects, around a random non-empty subset of them only).

    The box reaches 2-5 px beyond the object's radius and its centre moves up to 2 px, so its outline says
    nothing about the object's shape; cells the box touches are masked.
    """
    holes = torch.zeros(len(batch), grid, grid, dtype=torch.bool)
    chosen = torch.rand(len(batch), generator=generator) < share
    for b, scene in enumerate(batch):
        if not chosen[b]:
            continue
        for obj in _holed_objects(scene.objects, generator, subset_share):
            margin, dx, dy = (torch.rand(3, generator=generator) * torch.tensor([3.0, 4.0, 4.0])
                              + torch.tensor([2.0, -2.0, -2.0])).tolist()
            mask_box(holes[b], obj.x + dx, obj.y + dy, obj.radius + margin)
    return holes


def _holed_objects(objects: tuple[scenes.SceneObject, ...], generator: torch.Generator,
                   subset_share: float) -> tuple[scenes.SceneObject, ...]:
    """The objects of a hole sample that get a box: all of them, or with probability ``subset_share`` (scenes of
    several objects only) each with probability 1/2, drawn again until at least one is kept. No draw when
    ``subset_share`` is 0, so the default stream stays that of the shipped stages."""
    if subset_share <= 0 or len(objects) < 2 or float(torch.rand(1, generator=generator)) >= subset_share:
        return objects
    while True:
        kept = torch.rand(len(objects), generator=generator) < 0.5
        if kept.any():
            return tuple(obj for obj, keep in zip(objects, kept.tolist()) if keep)


def mask_box(mask: torch.Tensor, x: float, y: float, half: float) -> None:
    """Set in the `(grid, grid)` ``mask`` every token cell touched by the square of half-side ``half`` pixels
    centred at ``(x, y)`` (clipped to the image)."""
    grid = mask.shape[-1]
    cell = scenes.SIZE / grid
    x0, x1 = int((x - half) // cell), int((x + half) // cell)
    y0, y1 = int((y - half) // cell), int((y + half) // cell)
    mask[max(y0, 0):min(y1, grid - 1) + 1, max(x0, 0):min(x1, grid - 1) + 1] = True


def sampler_timestep(t: torch.Tensor, steps: int) -> torch.Tensor:
    """The step value the vanilla sampler passes at mask rate ``cos(pi/2 t)`` with ``steps`` steps."""
    return (steps * (1 - t) - 1).clamp(min=0)


def encode_text(tokenizer: CLIPTokenizer, encoder: CLIPTextModelWithProjection,
                prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate hidden states `(B, TEXT_LENGTH, TEXT_WIDTH)` and ``text_embeds``, as ``mgt.models.text`` reads them."""
    out = encoder(caption_ids(tokenizer, prompts, TEXT_LENGTH), output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], out.text_embeds


class TrainedGenerator(NamedTuple):
    """What :func:`train_generator` returns: both models in eval mode and the figures of the run."""

    transformer: MeissonicTransformer
    text_encoder: CLIPTextModelWithProjection
    steps_done: int
    caption_accuracy: float | None  # held-out accuracy of the text pre-training heads; None if skipped


def train_generator(vq: VQModel, tokenizer: CLIPTokenizer, seed: int, steps: int, sampler_steps: int,
                    batch_size: int = 16, lr: float = 1e-3, cond_dropout: float = 0.1, text_steps: int = 1000,
                    recipe: Recipe | None = None, architecture: Architecture | None = None,
                    should_stop: Callable[[], bool] = lambda: False,
                    on_step: Callable[[int, float], None] | None = None,
                    on_text_step: Callable[[int, float], None] | None = None,
                    on_models: Callable[[int, MeissonicTransformer, CLIPTextModelWithProjection], None] | None = None,
                    start: tuple[MeissonicTransformer, CLIPTextModelWithProjection] | None = None,
                    first_step: int = 0,
                    scene_batch: Callable[[list[int]], tuple[torch.Tensor, list[scenes.Scene]]] | None = None,
                    ) -> TrainedGenerator:
    """Pre-train the text encoder on captions, then train it with the transformer for up to ``steps`` steps.

    Args:
        vq: the trained tokenizer; scenes are encoded with it on the fly.
        sampler_steps: ``T`` of the timestep rule (the model's default sampling steps).
        cond_dropout: share of captions replaced by ``""`` (the unconditional branch of CFG).
        text_steps: steps of caption-only pre-training of the text encoder
            (:func:`shapes.training.caption_encoder.pretrain_text_encoder`) before the joint steps; 0 skips it.
        recipe: text encoder rate, object holes and high mask ratios (:class:`Recipe`); None: Meissonic's own.
        architecture: size of a new transformer (:class:`Architecture`); ignored with ``start``.
        should_stop: checked after each step (a wall-clock budget); the lr schedule follows ``steps``.
        on_models: called after each step with the number of steps done and both models (in train mode;
            a caller that evaluates them switches to eval and back), e.g. for learning curves.
        start: a trained transformer and text encoder to continue from (a fine-tune stage, with its own
            warm-up and cosine schedule over ``steps``); the text pre-training is then skipped.
        first_step: where this run's scene stream starts: a stage continuing a run of N steps passes N,
            so that it never sees that run's scenes again.
        scene_batch: seeds -> (images, scenes) of one step, in place of the benchmark's scenes (with the recipe's
            lattice or anchors); e.g. a simplified scene family to measure what the architecture can learn.
    """
    recipe = recipe or Recipe()
    torch.manual_seed(seed)
    if start is None:
        transformer = build_transformer(vq.config.num_vq_embeddings, architecture)
        text_encoder = build_text_encoder(tokenizer, transformer.config.pooled_projection_dim)
    else:
        transformer, text_encoder = start
        transformer.requires_grad_(True)
        text_steps = 0
    transformer.train()
    caption_accuracy = None
    if text_steps:
        caption_accuracy = pretrain_text_encoder(tokenizer, text_encoder, seed, text_steps, TEXT_LENGTH,
                                                 on_step=on_text_step)
    groups = [{"params": list(transformer.parameters())}]
    if recipe.text_lr_scale > 0:
        text_encoder.train().requires_grad_(True)
        groups.append({"params": list(text_encoder.parameters()), "lr": lr * recipe.text_lr_scale})
    else:
        text_encoder.eval().requires_grad_(False)
    silhouette = None
    if recipe.silhouette > 0:
        silhouette = SilhouetteHead(transformer, pixels_per_token=2 ** (len(vq.config.block_out_channels) - 1))
        groups.append({"params": list(silhouette.parameters())})
    parameters = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, min(100, steps // 10))
    schedule = warmup_cosine(optimizer, steps, warmup=warmup, floor=0.05)
    generator = torch.Generator().manual_seed(seed)
    mask_id = transformer.mask_token_id
    micro = torch.tensor([MICRO_CONDS] * batch_size)
    done = 0
    for step in range(steps):
        seeds = training_seeds(seed, first_step + step, batch_size, part=1)
        if scene_batch is None:
            images, batch = scene_tensors(seeds, recipe.lattice, recipe.anchors, recipe.lessons, recipe.canonical,
                                          recipe.kinds)
        else:
            images, batch = scene_batch(seeds)
        tokens = encode_tokens(vq, images)
        drop = torch.rand(batch_size, generator=generator) < cond_dropout
        captions = ["" if d else s.caption for d, s in zip(drop.tolist(), batch)]
        with torch.set_grad_enabled(recipe.text_lr_scale > 0):
            hidden, pooled = encode_text(tokenizer, text_encoder, captions)
        holes = (object_holes(batch, tokens.shape[-1], generator, recipe.hole_share, recipe.hole_subset)
                 if recipe.hole_share else None)
        masked, mask, t = mask_tokens(tokens, mask_id, generator, recipe.high_mask_share, holes)
        logits = transformer(masked, hidden, pooled, micro, sampler_timestep(t, sampler_steps))
        loss = F.cross_entropy(logits.permute(0, 2, 3, 1)[mask], tokens[mask])
        if silhouette is not None:
            loss = loss + recipe.silhouette * silhouette.loss(silhouette_maps(batch), mask)
        value = optimizer_step(optimizer, schedule, loss, clip=parameters)
        done = step + 1
        if on_step is not None:
            on_step(step, value)
        if on_models is not None:
            on_models(done, transformer, text_encoder)
        if should_stop():
            break
    if silhouette is not None:
        silhouette.detach()
    return TrainedGenerator(transformer.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False),
                            done, caption_accuracy)


class SilhouetteHead(torch.nn.Module):
    """The auxiliary silhouette target of :class:`Recipe` (``silhouette``): a 1x1 convolution on the input of the
    transformer's output layer (read by a forward pre-hook, so the transformer itself is unchanged) predicting,
    for each of a token's pixels, background or the shape that covers it."""

    def __init__(self, transformer: MeissonicTransformer, pixels_per_token: int) -> None:
        super().__init__()
        self.classes = 1 + len(scenes.SHAPES)
        self.pixels_per_token = pixels_per_token
        self.features: torch.Tensor | None = None
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.conv = torch.nn.Conv2d(width, pixels_per_token ** 2 * self.classes, 1)
        self.hook = transformer.mlm_layer.register_forward_pre_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple) -> None:
        self.features = args[0]

    def loss(self, maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked tokens' pixel labels ``maps`` `(B, H, W)` under the last forward's features."""
        batch, rows, cols = mask.shape
        s = self.pixels_per_token
        labels = maps.reshape(batch, rows, s, cols, s).permute(0, 1, 3, 2, 4).reshape(batch, rows, cols, s * s)
        logits = self.conv(self.features).permute(0, 2, 3, 1).reshape(batch, rows, cols, s * s, self.classes)
        return F.cross_entropy(logits[mask].flatten(0, 1), labels[mask].flatten())

    def detach(self) -> None:
        """Remove the hook: the trained transformer goes on without the head."""
        self.hook.remove()
        self.features = None
