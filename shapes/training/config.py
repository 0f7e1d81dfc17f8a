"""Settings of ``maskray train-shapes`` (pydantic only, so the CLI's help loads no torch)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class TrainShapesConfig(BaseModel):
    """Settings of ``maskray train-shapes``; the defaults reproduce the base run of the shipped model, which
    ``--init-from`` lesson stages continue (docs/shapes.md, "Reproduce the shipped weights"; the scorer:
    ``threads=1``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="Seeds weights, masking and the scene stream: same seed, same model.")
    vq_steps: int = Field(3000, ge=1, description="Training steps of the VQ tokenizer (batch 16 random 32x32 crops).")
    text_steps: int = Field(1000, ge=0, description="Caption-only pre-training steps of the text encoder "
                            "(batch 128 captions) before the joint steps; 0 skips it.")
    steps: int = Field(10000, ge=1, description="Training steps of the transformer (and of the text encoder "
                       "unless frozen).")
    batch_size: int = Field(16, ge=1, description="Scenes per transformer training step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of the transformer and text encoder (AdamW, "
                      "warm-up then cosine decay over --steps).")
    cond_dropout: float = Field(0.1, ge=0, le=1, description="Share of captions replaced by the empty prompt, "
                                "so that classifier-free guidance works.")
    text_lr_scale: float = Field(0.0, ge=0, description="Learning rate of the text encoder in the joint steps, "
                                 "as a fraction of --lr; 0 freezes it after its caption pre-training.")
    hole_share: float = Field(0.5, ge=0, le=1, description="Share of the samples with a jittered box around "
                              "each object fully masked (the rest by the schedule), so objects are drawn from "
                              "the caption.")
    hole_subset: float = Field(0.0, ge=0, le=1, description="Share of the hole samples of several objects "
                               "that box a random subset of the objects (at least one) instead of every one, so the "
                               "model learns to draw the caption's other objects beside one already drawn (0: every "
                               "object, as the shipped stages up to 7 were trained).")
    high_mask_share: float = Field(0.25, ge=0, le=1, description="Share of the samples with at least 0.9 of "
                                   "the tokens masked (where layout and shape are decided).")
    lattice: int = Field(0, ge=0, description="Generator training scenes only: object centres snapped to "
                         "multiples of this many pixels and radii to their size's nominal value (0: as drawn), so "
                         "that the sampler's parallel steps agree on where an object's edges are. The scorer and "
                         "the held-out scenes are unchanged.")
    anchors: bool = Field(False, description="Generator training scenes only: every object centred on a 3x3 grid "
                          "of anchors (the five named positions and the corners) at its size's nominal radius, so "
                          "that once a few of an object's tokens are drawn the rest are decided (measured in "
                          "docs/shapes-training.md: it did not beat the shipped model). The scorer and the held-out "
                          "scenes are unchanged.")
    canonical: bool = Field(False, description="Generator training scenes only: every scene in its caption's one "
                            "canonical layout (objects on anchors at nominal radius; a pair left and right, a third "
                            "at the top, a relation's objects at the two ends of its axis, in the caption's order; "
                            "one object in the center unless positioned), so the caption's words decide which object "
                            "goes where. Overrides --anchors for those scenes; the scorer and the held-out scenes are "
                            "unchanged.")
    scene_kinds: dict[str, float] | None = Field(None, description="Generator training scenes only (not "
                                                 "lessons): weights of the caption kinds, e.g. "
                                                 "'relation=0.45,pair=0.2,triple=0.15,count=0.1,single=0.1' (a kind "
                                                 "left out is never drawn), so scenes of several objects get more "
                                                 "practice. Unset: the benchmark's own mix (single 0.35, relation "
                                                 "0.25, pair 0.15, count 0.15, triple 0.1). The scorer and the "
                                                 "held-out scenes are unchanged.")
    silhouette: float = Field(0.0, ge=0, description="Weight of an auxiliary loss (0: off) in which the "
                              "generator also predicts, for each pixel of a masked token, background or which shape "
                              "covers it: the silhouette without the colours that split every edge code by colour "
                              "pair. The head is dropped after training; the shipped model has none.")
    lessons: float = Field(0.0, ge=0, le=1, description="Share of each generator batch made of lesson scenes: "
                           "one object exactly on a named position at its size's nominal radius, where the shape "
                           "words decide the edges and layout does not blur them (docs/shapes-training.md, "
                           "\"Lessons\"). The rest are the benchmark's scenes; the scorer and held-out scenes are "
                           "unchanged.")
    width: int = Field(128, ge=8, description="Channels of the transformer (a multiple of 16 per head); with "
                       "--init-from, the model's.")
    heads: int = Field(4, ge=1, description="Attention heads of the transformer; with --init-from, the model's.")
    layers: int = Field(1, ge=0, description="Joint (text + image) transformer blocks. With --init-from: at least "
                        "the model's; more appends joint blocks that start as the identity (adaLN-Zero), so a "
                        "trained model grows.")
    single_layers: int = Field(2, ge=0, description="Single-stream transformer blocks after the joint ones. With "
                               "--init-from: at least the model's; more appends blocks as --layers does.")
    init_from: str | None = Field(None, description="A trained shapes model to continue from, a folder "
                                  "written by train-shapes or a registered name (shapes-meissonic: the shipped model), "
                                  "as a fine-tune stage: its VQ, text encoder and transformer start this run, the "
                                  "text pre-training is skipped, the scenes continue after its steps and its "
                                  "training.json is kept in this run's record. --steps, --lr and the recipe "
                                  "apply to this stage.")
    minutes: float | None = Field(None, gt=0, description="Wall-clock cap on transformer training; it stops "
                                  "early (not reproducibly) when reached. Unset: run all --steps.")
    scorer_steps: int = Field(1500, ge=1, description="Training steps of the shapes scorer's detector (batch 32).")
    shape_steps: int = Field(600, ge=1, description="Training steps of the shapes scorer's window shape "
                             "classifier (32 scenes per step).")
    sample_steps: int = Field(16, ge=1, description="Default sampling steps T written into the model; the "
                              "timestep conditioning is trained for this T.")
    guidance: float = Field(1.0, ge=0, description="Default CFG scale written into the model (tuned on the shipped "
                            "model: docs/shapes-training.md, \"Lessons\").")
    threads: int = Field(2, ge=1, description="Torch CPU threads; results depend on it through float summation "
                         "order (the shipped model used 2, the shipped scorer 1: see its training.json).")

    @field_validator("scene_kinds", mode="before")
    @classmethod
    def _parse_scene_kinds(cls, value):
        """``kind=weight,...`` from the command line into a mapping of known kinds to positive weights."""
        from shapes.scenes import KINDS

        if isinstance(value, str):
            pairs = [item.partition("=") for item in value.split(",") if item.strip()]
            try:
                value = {name.strip(): float(weight) for name, _, weight in pairs}
            except ValueError:
                raise ValueError(f"--scene-kinds {value!r}: write kind=weight pairs separated by commas, e.g. "
                                 "'relation=0.5,single=0.5'") from None
        if isinstance(value, dict):
            known = [k for k, _ in KINDS]
            unknown = sorted(set(value) - set(known))
            if unknown:
                raise ValueError(f"--scene-kinds: unknown kind(s) {unknown}; the kinds are {known}")
            if any(w < 0 for w in value.values()) or not any(w > 0 for w in value.values()):
                raise ValueError(f"--scene-kinds {value}: weights must be >= 0 with at least one > 0")
        return value

    @model_validator(mode="after")
    def _heads_split_the_width(self) -> TrainShapesConfig:
        """Each head's channels split over the three rotary axes as 1/4, 3/8, 3/8 (build_transformer), and each
        rotary axis needs an even number of channels: a multiple of 16 per head."""
        if self.width % self.heads or (self.width // self.heads) % 16:
            raise ValueError(f"--width {self.width} must split into --heads {self.heads} heads of a multiple of 16 "
                             f"channels each; e.g. --width {16 * self.heads * max(1, round(self.width / 16 / self.heads))}")
        return self
