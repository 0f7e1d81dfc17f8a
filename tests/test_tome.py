"""TomeMGT (arXiv 2411.10781 §4): merge plans, the patched dual-stream blocks, identity at rho = 0."""

import pytest
import torch

import mgt.efficient.tome as tome_module
from mgt.efficient.tome import MAX_RATIO, TomeMGT, bipartite_plan, merged_block_forward
from mgt.models.amused import tiny_amused_transformer
from mgt.models.meissonic import image_rope_ids, tiny_meissonic_transformer
from mgt.models.tiny import _perturb

GRID = 8  # 16x16 tokens -> 8x8 after the down block


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model = tiny_meissonic_transformer(downsample=True, layers=3, single_layers=2).eval().requires_grad_(False)
    _perturb(model)  # zero-initialised gates would make the blocks no-ops
    return model


def inputs(batch: int, seed: int = 0, step: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 64, (batch, 16, 16), generator=generator), torch.randn(batch, 77, 32, generator=generator),
            torch.randn(batch, 32, generator=generator), torch.tensor([[64.0, 64.0, 0.0, 0.0, 6.0]] * batch),
            torch.tensor([step]))


def test_plan_shapes_merge_and_unmerge():
    x = torch.randn(2, GRID * GRID, 32)
    removed = int(0.25 * GRID * GRID)
    plan = bipartite_plan(x, GRID, GRID, removed, torch.Generator().manual_seed(0))
    assert plan.dst_positions.shape == (1, GRID * GRID // 4) and plan.src_positions.shape == (1, 3 * GRID * GRID // 4)
    merged = plan.merge(x)
    assert merged.shape == (2, GRID * GRID - removed, 32)
    restored = plan.unmerge(merged)
    assert restored.shape == x.shape
    # Untouched tokens come back exactly; every merged source gets its destination's mean.
    src = plan.src_positions.expand(2, -1)
    kept = src.gather(1, plan.unmerged)
    assert torch.equal(restored.gather(1, kept[..., None].expand(-1, -1, 32)), x.gather(1, kept[..., None].expand(-1, -1, 32)))
    for b in range(2):
        dst_index = plan.targets[b, 0]
        group = [plan.dst_positions[0, dst_index]] + [src[b, plan.merged[b, j]] for j in
                                                      (plan.targets[b] == dst_index).nonzero()[:, 0]]
        expected = x[b, torch.stack(group)].mean(0)
        assert torch.allclose(restored[b, src[b, plan.merged[b, 0]]], expected, atol=1e-6)


def test_plan_prefers_most_similar_sources_and_is_deterministic():
    x = torch.randn(1, GRID * GRID, 16)
    first = bipartite_plan(x, GRID, GRID, 10, torch.Generator().manual_seed(3))
    again = bipartite_plan(x, GRID, GRID, 10, torch.Generator().manual_seed(3))
    assert torch.equal(first.merged, again.merged) and torch.equal(first.dst_positions, again.dst_positions)
    top_left = bipartite_plan(x, GRID, GRID, 10, None)
    rows, cols = top_left.dst_positions[0] // GRID, top_left.dst_positions[0] % GRID
    assert bool((rows % 2 == 0).all() and (cols % 2 == 0).all())
    # Each window keeps exactly one destination.
    windows = (first.dst_positions[0] // GRID // 2) * (GRID // 2) + first.dst_positions[0] % GRID // 2
    assert sorted(windows.tolist()) == list(range(GRID * GRID // 4))
    unit = x / x.norm(dim=-1, keepdim=True)
    best = (unit[0, first.src_positions[0]] @ unit[0, first.dst_positions[0]].T).max(-1).values
    assert torch.allclose(best[first.merged[0]], best.sort(descending=True).values[:10])


def test_rho_zero_is_exactly_the_unmerged_model(transformer):
    args = inputs(2)
    reference = transformer(*args)
    tome = TomeMGT(0.0).apply(transformer)
    try:
        assert torch.equal(transformer(*args), reference)
        assert tome.last_lengths == [GRID * GRID] * 3
    finally:
        tome.remove()
    assert "forward" not in vars(transformer.transformer_blocks[0]) and transformer.tome is None


def test_merged_block_with_no_merge_equals_the_block(transformer):
    """The merged path (own joint attention with per-sample RoPE tables) matches diffusers' block at r = 0."""
    block = transformer.transformer_blocks[0]
    hidden, context, temb = torch.randn(2, GRID * GRID, 32), torch.randn(2, 77, 32), torch.randn(2, 32)
    rope = transformer.pos_embed(torch.cat([torch.zeros(77, 3), image_rope_ids(GRID, GRID)]))
    expected = block(hidden, context, temb, rope)
    plan = bipartite_plan(hidden, GRID, GRID, 0, torch.Generator().manual_seed(0))
    got = merged_block_forward(block, plan, hidden, context, temb, rope)
    for a, b in zip(expected, got):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("ratio", [0.25, 0.5, MAX_RATIO])
def test_dual_stream_sequence_reduced_single_stream_untouched(transformer, ratio):
    seen = []
    hook = transformer.single_transformer_blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
    tome = TomeMGT(ratio).apply(transformer)
    try:
        out = transformer(*inputs(2))
    finally:
        tome.remove()
        hook.remove()
    tokens = GRID * GRID
    assert tome.last_lengths == [tokens - int(ratio * tokens)] * 3
    assert seen == [torch.Size([2, tokens, 32])]
    assert out.shape == (2, 64, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("reuse,plans", [(5, 1), (2, 2), (1, 3)])
def test_plan_reuse(transformer, monkeypatch, reuse, plans):
    calls = []
    original = tome_module.bipartite_plan
    monkeypatch.setattr(tome_module, "bipartite_plan", lambda *a: calls.append(1) or original(*a))
    tome = TomeMGT(0.25, reuse=reuse).apply(transformer)
    try:
        transformer(*inputs(2))
        transformer(*inputs(2))
    finally:
        tome.remove()
    assert len(calls) == 2 * plans  # recomputed at block 0 of every call, then every `reuse` blocks


def test_batch_invariant_and_step_dependent(transformer):
    tome = TomeMGT(0.5).apply(transformer)
    try:
        pair = transformer(*inputs(2))
        alone = transformer(*[a[1:] if a.shape[0] == 2 else a for a in inputs(2)])
        assert torch.allclose(pair[1:], alone, atol=1e-5)
        assert torch.equal(transformer(*inputs(2)), pair)  # deterministic
        first_plan = tome.plan.dst_positions
        transformer(*inputs(2, step=6))
        assert not torch.equal(tome.plan.dst_positions, first_plan)  # the window draw follows the step
    finally:
        tome.remove()


def test_errors_name_the_problem(transformer):
    with pytest.raises(ValueError, match=r"outside \[0, 0.75\]"):
        TomeMGT(0.8)
    with pytest.raises(ValueError, match="reuse 0"):
        TomeMGT(0.25, reuse=0)
    with pytest.raises(ValueError, match="needs a Meissonic transformer"):
        TomeMGT(0.25).apply(tiny_amused_transformer())
    tome = TomeMGT(0.25).apply(transformer)
    try:
        with pytest.raises(ValueError, match="already applied"):
            TomeMGT(0.5).apply(transformer)
    finally:
        tome.remove()
