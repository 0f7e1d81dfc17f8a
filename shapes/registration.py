"""What the shapes package registers with maskray, by entry point (``pyproject.toml``).

- ``maskray.models``: ``shapes-meissonic`` -> :data:`shapes_meissonic`, the folder of the shipped model;
- ``maskray.scorers``: ``shapes`` -> :func:`build_shapes_scorer`;
- ``maskray.commands``: ``train-shapes`` -> the module :mod:`shapes.train_cmd`.

Registries import these objects when their name is first used; importing this module loads no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shapes.scorer import ShapesScorer

# The shipped model in the hub layout (trained by `maskray train-shapes --part model`).
shapes_meissonic = Path(__file__).resolve().parent / "assets" / "shapes-meissonic"


def build_shapes_scorer(**options: Any) -> ShapesScorer:
    """The ``shapes`` scorer (:class:`shapes.scorer.ShapesScorer`), built with ``options``."""
    from shapes.scorer import ShapesScorer

    return ShapesScorer(**options)
