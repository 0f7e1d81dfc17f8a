"""The pipeline's cached-context predictor: each micro-batch through its family's cached forward (ReCAP).

One :class:`mgt.efficient.recap.ContextSlot` per micro-batch (keyed by its first row) holds what its full
forward recorded, so with ``micro_batch=1`` a sample's keys, values, queries and logits never meet another
sample's, and its tokens stay independent of its batch-mates.
"""

from __future__ import annotations

import torch

from mgt.efficient.recap import ContextSlot
from mgt.models.families import get_family
from mgt.sampling.cached_context import ContextRequest
from mgt.sampling.loop import apply_guidance, to_token_major


def check_cached_context(pipe) -> None:
    """Refuse, in one line saying why, a pipeline whose transformer cannot run cached-context steps."""
    if get_family(pipe.family).cached_forward is None:
        raise ValueError(f"sampler cache (cached-context steps) is not available for the {pipe.family} family: "
                         "its transformer has no cached forward yet; drop the sampler's cache section")
    if getattr(pipe.transformer, "tome", None) is not None:
        raise ValueError("sampler cache (cached-context steps) does not compose with TomeMGT: merged tokens "
                         "leave no per-position keys to cache; load with tome=0 or drop the sampler's cache section")


def cached_guided_logits(pipe, positive: tuple[torch.Tensor, ...], negative: tuple[torch.Tensor, ...] | None,
                         members: torch.Tensor, tokens: torch.Tensor, timestep: torch.Tensor, scale: float,
                         context: ContextRequest) -> torch.Tensor:
    """:meth:`MGTPipeline.guided_logits` through the family's cached forward: `(B, L, C)` float32 guided logits.

    A full forward (``context.queries`` None) records into the micro-batches' slots and returns every logit;
    a local one writes its tokens' logits into ``context.out`` (which holds the last full forward's) and
    returns it.
    """
    forward = get_family(pipe.family).cached_forward
    outputs = []
    for rows in pipe.micro_batches(len(members)):
        picked = members[rows]
        slot = context.slots.setdefault(rows.start, ContextSlot())
        queries = None if context.queries is None else context.queries[rows]
        if negative is None:
            conditioning = [c[picked] for c in positive]
            ids = tokens[rows]
        else:
            conditioning = [torch.cat([n[picked], p[picked]]) for n, p in zip(negative, positive)]
            ids = torch.cat([tokens[rows], tokens[rows]])
        result = forward(pipe.transformer, ids, *conditioning, timestep, slot, queries)
        logits = result if queries is None else result.logits
        guided = to_token_major(logits) if negative is None else apply_guidance(logits, scale)
        if queries is None:
            outputs.append(guided)
        else:
            index = result.index[..., None].expand(-1, -1, guided.shape[-1])
            context.out[rows].scatter_(1, index, guided)
    if context.queries is not None:
        return context.out
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
