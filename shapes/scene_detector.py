"""The scene detector behind the ``shapes`` scorer: reads every object's attributes off a 64x64 scene.

A CenterNet-style fully convolutional network (Zhou et al., "Objects as Points", arXiv 1904.07850) on a
16x16 grid of 4x4-pixel cells: per cell the probability that an object's centre lies in it, the
sub-cell offset of that centre, and distributions over shape, colour and size; per image a distribution
over background colours. Trained on rendered scenes (``shapes.training.detector``); weights ship in
``shapes/assets/shapes-scorer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from shapes import scenes

STRIDE = 4  # pixels per cell
CROP = 24  # side of the window the shape classifier reads around a detected centre (the largest object is 24 px)
SHIPPED = Path(__file__).resolve().parent / "assets" / "shapes-scorer"


@dataclass
class Detections:
    """Per-cell predictions for a batch of images (grid ``G = 64 / STRIDE = 16``)."""

    objectness: torch.Tensor  # (B, G, G) probability that an object's centre is in the cell
    centres: torch.Tensor  # (B, G, G, 2) predicted centre (x, y) in pixels
    shape: torch.Tensor  # (B, G, G, len(SHAPES)) probabilities
    colour: torch.Tensor  # (B, G, G, len(COLOURS))
    size: torch.Tensor  # (B, G, G, len(SIZES))
    background: torch.Tensor  # (B, len(BACKGROUNDS))


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation), nn.GELU())


class SceneDetector(ModelMixin, ConfigMixin):
    """Heads: 1 objectness + 2 offset + shapes + colours + sizes channels per cell; backgrounds per image.

    The receptive field of a cell (53 px, from the two dilated convolutions) covers the largest object.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, width: int = 32, num_shapes: int = len(scenes.SHAPES), num_colours: int = len(scenes.COLOURS),
                 num_sizes: int = len(scenes.SIZES), num_backgrounds: int = len(scenes.BACKGROUNDS)):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, width), _conv(width, width, 2), _conv(width, 2 * width))
        self.body = nn.Sequential(_conv(2 * width, 2 * width, 2), _conv(2 * width, 2 * width),
                                  _conv(2 * width, 2 * width, dilation=2), _conv(2 * width, 2 * width, dilation=2))
        self.split = (1, 2, num_shapes, num_colours, num_sizes)
        self.head = nn.Conv2d(2 * width, sum(self.split), 1)
        self.background_head = nn.Linear(2 * width, num_backgrounds)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw outputs: cell logits `(B, 1+2+S+C+Z, 16, 16)` and background logits `(B, num_backgrounds)`.

        Args:
            images: `(B, 3, 64, 64)` float in [0, 1].
        """
        stem = self.stem(images)
        return self.head(self.body(stem)), self.background_head(stem.mean(dim=(2, 3)))

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> Detections:
        """Probabilities and pixel centres for every cell (see :class:`Detections`)."""
        cells, background = self(images)
        heat, offset, shape, colour, size = cells.permute(0, 2, 3, 1).split(self.split, dim=-1)
        grid = cells.shape[-1]
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        corner = torch.stack([cols, rows], dim=-1).to(images)
        centres = (corner + offset.sigmoid()) * STRIDE
        return Detections(heat[..., 0].sigmoid(), centres, shape.softmax(-1), colour.softmax(-1), size.softmax(-1),
                          background.softmax(-1))


class ShapeClassifier(ModelMixin, ConfigMixin):
    """Shape of the object centred in a ``CROP x CROP`` window: the cell head sees a centre's colour well
    but confuses crosses, diamonds and circles, whose difference lies at the outline; a window around the
    detected centre holds the whole outline."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, width: int = 32, num_shapes: int = len(scenes.SHAPES)):
        super().__init__()
        self.features = nn.Sequential(_conv(3, width), _conv(width, width, 2), _conv(width, 2 * width),
                                      _conv(2 * width, 2 * width, 2), _conv(2 * width, 2 * width))
        self.classify = nn.Linear(2 * width * (CROP // 4) ** 2, num_shapes)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """`(N, 3, CROP, CROP)` windows in [0, 1] -> `(N, num_shapes)` logits."""
        return self.classify(self.features(crops).flatten(1))


def crop_windows(images: torch.Tensor, centres: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
    """``CROP x CROP`` windows of ``images[image_index[k]]`` centred at ``centres[k]`` (pixels, (x, y)).

    The image is edge-padded, so windows at the border repeat the background.
    """
    half = CROP // 2
    padded = F.pad(images, (half, half, half, half), mode="replicate")
    corners = centres.round().long().clamp(0, images.shape[-1] - 1)
    return torch.stack([padded[b, :, y:y + CROP, x:x + CROP]
                        for b, (x, y) in zip(image_index.tolist(), corners.tolist())])


def peak_cells(objectness: torch.Tensor, floor: float = 0.02) -> torch.Tensor:
    """Boolean `(B, G, G)` of cells that are a 3x3 local maximum of objectness and above ``floor``.

    A generated blob that spreads over two cells counts once (non-maximum suppression, as CenterNet).
    """
    pooled = F.max_pool2d(objectness[:, None], 3, stride=1, padding=1)[:, 0]
    return (objectness >= pooled) & (objectness > floor)
