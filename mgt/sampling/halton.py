"""The Halton unmasking order (Besnier et al., arXiv 2503.17076): which token to reveal when, fixed in advance.

Instead of revealing the most confident tokens, the Halton scheduler reveals the cells of the token grid in
the order of the 2-D Halton low-discrepancy sequence (bases 2 and 3), so every step's new tokens are spread
evenly over the image. Reproduces ``HaltonSampler.build_halton_mask`` and its per-step count of
valeoai/Maskgit-pytorch (MIT), ``Sampler/halton_sampler.py`` at commit 5ffd61f7dde5bfab5aa664d86039db0ac4ddde6f
(main, "v2.0"), in the same float32 arithmetic, so orders and counts are identical to the reference's.
"""

from __future__ import annotations

import math

import torch

REFERENCE_POINTS = 10_000  # the reference's nb_point: Halton points drawn before de-duplication


def halton_sequence(base: int, count: int) -> list[float]:
    """The first ``count`` terms of the radical-inverse sequence in ``base`` (starting 0, 1/b, ...)."""
    numerator, denominator, terms = 0, 1, []
    for _ in range(count):
        gap = denominator - numerator
        if gap == 1:
            numerator, denominator = 1, denominator * base
        else:
            step = denominator // base
            while gap <= step:
                step //= base
            numerator = (base + 1) * step - gap
        terms.append(numerator / denominator)
    return terms


def halton_order(rows: int, cols: int, num_points: int = REFERENCE_POINTS) -> torch.Tensor:
    """`(rows*cols, 2)` int64 (row, col) cells of the grid in Halton order: every cell once.

    Point ``k`` is ``(floor(h2(k) * rows), floor(h3(k) * cols))`` (float32, as the reference); a cell keeps its
    first occurrence. The reference builds square grids only; rows == cols gives its order.
    """
    points = torch.cat([torch.asarray(halton_sequence(2, num_points)).view(-1, 1) * rows,
                        torch.asarray(halton_sequence(3, num_points)).view(-1, 1) * cols], dim=1).floor().long()
    seen: dict[tuple[int, int], None] = dict.fromkeys(map(tuple, points.tolist()))
    if len(seen) < rows * cols:
        raise ValueError(f"{num_points} Halton points cover {len(seen)} of the {rows}x{cols} cells; "
                         f"pass a larger num_points")
    return torch.tensor(list(seen), dtype=torch.long)


def grid_order(rows: int, cols: int) -> torch.Tensor:
    """`(rows*cols,)` int64 flat (row-major) positions of the grid in Halton order, for any grid size.

    The reference's 10,000 points when they cover the grid (so its order), else twice as many until they do.
    """
    points = REFERENCE_POINTS
    while True:
        try:
            cells = halton_order(rows, cols, points)
            return cells[:, 0] * cols + cells[:, 1]
        except ValueError:
            points *= 2


def revealed_count(step_index: int, num_steps: int, num_tokens: int) -> int:
    """How many tokens (a prefix of the Halton order) are known after step ``step_index`` of ``num_steps``.

    ``max(i + 1, int((1 - arccos((i + 1) / T) / (pi / 2)) * N))``: the arccos schedule, in float32.
    """
    ratio = torch.tensor((step_index + 1) / num_steps)
    share = 1 - (torch.arccos(ratio) / (math.pi * 0.5))
    return max(step_index + 1, int(share * num_tokens))
