"""aMUSEd (arXiv 2401.01808, hub ``amused/amused-256`` / ``amused-512``): diffusers' ``UVit2DModel``
behind the engine's common transformer call."""

from __future__ import annotations

import torch
from diffusers.models.unets.uvit_2d import UVit2DModel

from mgt.models.token_grid import TokenGridMixin


class AmusedTransformer(TokenGridMixin, UVit2DModel):
    """``UVit2DModel`` with the engine's forward signature; same config and parameter names.

    aMUSEd has no timestep input: ``timestep`` is accepted and ignored so every MGT is called alike.
    """

    def forward(
        self,
        token_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        micro_conds: torch.Tensor,
        timestep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits `(batch, codebook_size, height, width)` for token ids `(batch, height, width)`."""
        return super().forward(token_ids, encoder_hidden_states, pooled_projections, micro_conds)
