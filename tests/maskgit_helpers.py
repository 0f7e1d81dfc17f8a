"""Helpers of the MaskGIT tests: the reference's tiny transformers of ``tests/fixtures/maskgit-tiny-*``."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from mgt.models.maskgit import MaskGitTransformer


def reference_transformer(folder: Path, dropout: float | None = None) -> tuple[MaskGitTransformer, dict]:
    """The fixture's transformer with the reference's weights loaded strictly, and the fixture's ``config.json``.

    Args:
        folder: a ``maskgit-tiny-*style`` fixture folder.
        dropout: the model's dropout; None takes the reference config's (inference runs in eval mode either way).
    """
    config = json.loads((folder / "config.json").read_text())
    ref = config["transformer"]
    model = MaskGitTransformer(tokens_per_side=ref["f_factor"], hidden_dim=ref["hidden_dim"],
                               codebook_size=ref["codebook_size"], depth=ref["depth"], heads=ref["heads"],
                               mlp_dim=ref["mlp_dim"], dropout=ref["dropout"] if dropout is None else dropout,
                               num_classes=ref["nclass"])
    model.load_state_dict(load_file(folder / "transformer.safetensors"), strict=True)
    return model, config
