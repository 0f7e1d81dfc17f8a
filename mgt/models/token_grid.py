"""What the engine reads from every MGT transformer besides its forward: the mask token and the grid multiple.

Both families store a codebook plus one mask token in ``config.vocab_size`` (the mask token is the last id)
and down-sample the token grid 2x when ``config.downsample`` is set, so the two properties are shared here
instead of repeated in each family's class.
"""

from __future__ import annotations


class TokenGridMixin:
    """``mask_token_id`` and ``token_grid_multiple`` of a diffusers-config transformer (``self.config``)."""

    @property
    def mask_token_id(self) -> int:
        """The id of the mask token: the last of ``config.vocab_size``."""
        return self.config.vocab_size - 1

    @property
    def token_grid_multiple(self) -> int:
        """Token-grid sides must be a multiple of this (2 when the transformer down-samples)."""
        return 2 if self.config.downsample else 1
