"""Cached-context steps (ReCAP, arXiv 2505.19089): the per-family cached forwards, the sampler's schedule of full
and local steps, and how they compose with the other techniques, editing, micro-batching, TomeMGT and SCQ."""

from types import SimpleNamespace

import pytest
import torch
from sampler_helpers import CODES, MASK, SIDE, stand_in

from mgt.efficient.recap import ContextSlot
from mgt.efficient.recap_sampling import check_cached_context
from mgt.models.families import get_family
from mgt.sampling import loop as sampling
from mgt.sampling.cached_context import CachedContext
from mgt.sampling.sampler_config import CachedContextConfig, SamplerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


FAMILIES = ["tiny_meissonic", "tiny_amused", "tiny_maskgit"]


def _prompts(pipe) -> list[str]:
    """Three prompts the family takes: captions, or ImageNet classes for MaskGIT (``""``: unconditional)."""
    return ["tench", "", "golden retriever"] if pipe.family == "maskgit" else ["a red circle", "", "two blue squares"]


def _side(pipe) -> int:
    """The token grid's side in these tests: MaskGIT's grid is fixed by its transformer."""
    return pipe.transformer.config.tokens_per_side if pipe.family == "maskgit" else 8


def _inputs(pipe, batch=2, seed=0):
    side = _side(pipe)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, pipe.mask_token_id + 1, (batch, side, side), generator=g)
    prompts = [p for p in _prompts(pipe) if p][:batch]
    conditioning = pipe.conditioner.condition(prompts, 8 * side, 8 * side, pipe.transformer.dtype, "cpu")
    return ids, conditioning, torch.tensor([3])


@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_records_and_equals_the_plain_forward_and_local_reproduces_it(family, request):
    pipe = request.getfixturevalue(family)
    forward = get_family(pipe.family).cached_forward
    ids, conditioning, t = _inputs(pipe)
    with torch.inference_mode():
        plain = pipe.transformer(ids, *conditioning, t)
        slot = ContextSlot()
        assert torch.equal(forward(pipe.transformer, ids, *conditioning, t, slot, None), plain)
        assert slot.layers
        side = ids.shape[-1]
        queries = torch.zeros(2, side, side, dtype=torch.bool)
        queries[0, 0, 1], queries[1, 5, 6], queries[1, 2, 2] = True, True, True
        local = forward(pipe.transformer, ids, *conditioning, t, slot, queries)
    # same tokens as the full forward: the queries see exactly the keys and values they saw there
    expected = plain.flatten(2).gather(2, local.index[:, None].expand(-1, plain.shape[1], -1))
    torch.testing.assert_close(local.logits.flatten(2), expected, rtol=1e-5, atol=1e-5)
    covered = torch.zeros(2, side * side, dtype=torch.bool).scatter_(1, local.index, True)
    assert covered.view(2, side, side)[queries].all()


def test_meissonic_local_forward_runs_only_the_query_patches(tiny_meissonic):
    forward = get_family("meissonic").cached_forward
    ids, conditioning, t = _inputs(tiny_meissonic)
    queries = torch.zeros(2, 8, 8, dtype=torch.bool)
    queries[:, 0, 0] = True
    queries[:, 0, 1] = True  # same 2x2 patch
    with torch.inference_mode():
        slot = ContextSlot()
        forward(tiny_meissonic.transformer, ids, *conditioning, t, slot, None)
        local = forward(tiny_meissonic.transformer, ids, *conditioning, t, slot, queries)
    assert local.logits.shape[2:] == (1, 4) and local.index.tolist() == [[0, 1, 8, 9]] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_option_absent_off_and_every_step_full_are_token_exact_with_vanilla(family, request):
    pipe = request.getfixturevalue(family)
    prompts, seeds = [p for p in _prompts(pipe) if p], [3, 4]
    vanilla = pipe.generate(prompts, seeds, steps=5, decode=False).tokens
    off = pipe.generate(prompts, seeds, steps=5, sampler=SamplerConfig.model_validate({"cache": None}),
                        decode=False).tokens
    every_full = pipe.generate(prompts, seeds, steps=5, sampler=SamplerConfig.from_spec("vanilla:cache.full_every=1"),
                               decode=False).tokens
    assert torch.equal(off, vanilla) and torch.equal(every_full, vanilla)
    assert SamplerConfig.model_validate({"cache": None}).config_hash() == SamplerConfig().config_hash()
    assert SamplerConfig.from_spec("recap").config_hash() != SamplerConfig().config_hash()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["recap", "vanilla:cache.queries=masked", "noise+differential:cache.full_every=3"])
def test_micro_batch_1_keeps_every_sample_independent_of_its_batch_mates(family, spec, request):
    pipe = request.getfixturevalue(family)
    prompts, seeds, sampler = _prompts(pipe), [3, 4, 5], SamplerConfig.from_spec(spec)
    batch = pipe.generate(prompts, seeds, steps=6, sampler=sampler, decode=False)
    alone = pipe.generate(prompts[2:], seeds[2:], steps=6, sampler=sampler, decode=False)
    assert torch.equal(alone.tokens[0], batch.tokens[2]) and batch.nfe == 6
    assert not (batch.tokens == pipe.mask_token_id).any()


def test_the_schedule_follows_the_reference_options():
    context = CachedContext(CachedContextConfig(full_every=3, full_first=2), 10, 0, (4, 4))
    assert [context.is_full(i) for i in range(10)] == [True, True, True, False, False, True, False, False, True,
                                                       False]
    assert context.group_end(2) == 4 and context.group_end(8) == 9
    zigzag = CachedContext(CachedContextConfig(full_every=2), 8, 5, (4, 4))
    assert [zigzag.is_full(i) for i in range(8)] == [True] * 6 + [False, True]


def _recording_stand_in(prompts, junk_outside_queries: bool):
    """The stand-in model; at local steps the rows it does not compute hold the cached rows or, with
    ``junk_outside_queries``, large random values. Records each call's query mask (None: full)."""
    predict, _ = stand_in(prompts)
    queries_seen = []

    def cached(tokens, step_value, scale, context=None):
        fresh = predict(tokens, step_value, scale)
        if context is None or context.queries is None:
            queries_seen.append(None)
            return fresh
        queries_seen.append(context.queries.flatten(1).clone())
        out = context.out
        if junk_outside_queries:
            out = torch.randn(out.shape, generator=torch.Generator().manual_seed(step_value)) * 50
        rows = context.queries.flatten(1)
        return torch.where(rows[..., None], fresh, out)

    return cached, queries_seen


def _run(predict, spec, steps=8, init=None, start_ratio=None, batch=2):
    generators = [torch.Generator().manual_seed(s) for s in range(batch)]
    return sampling.sample(predict, (batch, SIDE, SIDE), steps, generators, MASK, SamplerConfig.from_spec(spec),
                           guidance=3.0, init=init, start_ratio=start_ratio, cache_patch=2).tokens


@pytest.mark.parametrize("spec", ["recap", "noise:cache.full_every=3", "vanilla:cache.queries=masked",
                                  "noise:cache.queries=masked,cache.full_every=2"])
def test_noise_regularization_needs_logits_only_where_a_local_step_computes(spec):
    """Held and known positions never take a drawn token, so the rows a local step does not compute can hold
    anything: the tokens are the same."""
    cached, seen = _recording_stand_in([1, 2], junk_outside_queries=False)
    junk, _ = _recording_stand_in([1, 2], junk_outside_queries=True)
    assert torch.equal(_run(cached, spec), _run(junk, spec))
    assert any(q is not None for q in seen)


def test_local_steps_compute_the_group_only_and_group_steps_hold_the_rest():
    cached, seen = _recording_stand_in([1, 2], junk_outside_queries=False)
    tokens = _run(cached, "vanilla:cache.full_every=2", steps=8)
    assert not (tokens == MASK).any()
    local = [q for q in seen if q is not None]
    assert len(local) == 4 and all(0 < int(q.sum(1).max()) < SIDE * SIDE for q in local)
    cached_masked, seen_masked = _recording_stand_in([1, 2], junk_outside_queries=False)
    _run(cached_masked, "vanilla:cache.queries=masked", steps=8)
    group_sizes = [int(q.sum()) for q in local]
    masked_sizes = [int(q.sum()) for q in seen_masked if q is not None]
    # ReCAP's groups are smaller until the last group, which holds nothing back
    assert all(g <= m for g, m in zip(group_sizes, masked_sizes)) and group_sizes[0] < masked_sizes[0] / 4



def test_a_local_step_draws_only_where_it_computed(monkeypatch):
    """The draw over `(L, C)` is the sampler's largest cost beside the model; a local step's other positions are
    known or held, so it draws at the computed masked positions only, while a full step draws everywhere as
    vanilla does (same generator use, so the first step's tokens are vanilla's)."""
    drawn_rows, multinomial = [], torch.multinomial

    def counting(probs, *args, **kwargs):
        drawn_rows.append(probs.shape[0])
        return multinomial(probs, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", counting)
    cached, seen = _recording_stand_in([1, 2], junk_outside_queries=False)
    tokens = _run(cached, "vanilla:cache.full_every=2", steps=8)
    assert not (tokens == MASK).any()
    per_step = [drawn_rows[i:i + 2] for i in range(0, len(drawn_rows), 2)]  # a batch of two: one draw per sample
    for step, queries in zip(per_step, seen):
        if queries is None:
            assert step == [SIDE * SIDE] * 2
        else:
            assert all(0 < n <= int(q.sum()) < SIDE * SIDE for n, q in zip(step, queries.view(2, -1)))

def test_differential_sampling_reads_the_cached_rows_and_stays_deterministic():
    """Differential sampling ranks every position by KL, so at local steps it reads the last full step's rows
    where nothing was computed (docs/efficiency.md); the result is still a pure function of the inputs."""
    first, _ = _recording_stand_in([1, 2], junk_outside_queries=False)
    second, _ = _recording_stand_in([1, 2], junk_outside_queries=False)
    spec = "differential:cache.full_every=2"
    assert torch.equal(_run(first, spec), _run(second, spec))


def test_zsampling_zigzag_steps_run_full_and_local_steps_follow():
    cached, seen = _recording_stand_in([1], junk_outside_queries=False)
    plain, _ = stand_in([1])
    spec = "zsampling:zsampling.num_steps=3"
    expected = _run(plain, spec, batch=1)
    with_cache_on_zigzag_only = _run(cached, spec + ",cache.full_every=1", batch=1)
    assert torch.equal(with_cache_on_zigzag_only, expected)
    seen.clear()
    _run(cached, spec + ",cache.full_every=2", batch=1)
    # zigzag steps 0..2: forward step + inversion + re-denoise, all full; then full, local, full, local, full
    assert [q is None for q in seen] == [True] * 9 + [True, False, True, False, True]


def test_editing_kept_tokens_are_context():
    cached, seen = _recording_stand_in([1, 2], junk_outside_queries=False)
    init = torch.randint(0, CODES, (2, SIDE, SIDE))
    redraw = torch.zeros(2, SIDE, SIDE, dtype=torch.bool)
    redraw[:, 2:6, 2:6] = True
    init[redraw] = MASK
    tokens = _run(cached, "recap", init=init, start_ratio=torch.full((2,), 0.25))
    assert torch.equal(tokens[~redraw], init[~redraw]) and not (tokens == MASK).any()
    assert all(not (q & ~redraw.flatten(1)).any() for q in seen if q is not None)


def test_tome_is_refused_and_families_without_a_cached_forward_too(tiny_meissonic):
    with pytest.raises(ValueError, match="does not compose with TomeMGT: merged tokens"):
        check_cached_context(SimpleNamespace(family="meissonic", transformer=SimpleNamespace(tome=object())))
    maker = SimpleNamespace(family="amused", transformer=object())
    check_cached_context(maker)  # has one
    assert get_family("meissonic").cached_forward is not None


def test_w8a16_quantized_meissonic_runs_cached_context_steps():
    pytest.importorskip("optimum.quanto")
    import mgt

    pipe = mgt.load_pipeline("tiny-meissonic", device="cpu", quant="w8a16")
    out = pipe.generate(["a red circle"], [1], steps=4, sampler=SamplerConfig.from_spec("recap"), decode=False)
    assert not (out.tokens == pipe.mask_token_id).any()


def test_recap_preset_and_spec_forms():
    recap = SamplerConfig.from_spec("recap")
    assert recap.cache == CachedContextConfig(full_every=3) and recap.noise is None  # docs/efficiency.md
    assert SamplerConfig.from_spec("noise:cache.full_every=3").cache.full_every == 3
    assert SamplerConfig.from_spec({"cache": {"queries": "masked"}}).cache.queries == "masked"
    with pytest.raises(ValueError, match="cache.full_every: Input should be greater than or equal to 1"):
        SamplerConfig.from_spec("vanilla:cache.full_every=0")


def test_the_option_parses_in_sample_generate_evaluate_and_serve():
    """One typed config: the CLI's and YAML's GenerationSettings, evaluate's candidates and the Serve request
    schema all turn ``recap`` (or a compact spec with cache fields) into the same SamplerConfig."""
    from jobs.evaluation.run import EvaluateOptions
    from jobs.serve.openai_schema import ImageGenerationRequest
    from mgt.config import GenerationSettings

    recap = SamplerConfig.from_spec("recap")
    assert GenerationSettings(sampler="recap").sampler == recap
    assert GenerationSettings.model_validate({"sampler": {"cache": {"full_every": 3}}}).sampler == recap
    options = EvaluateOptions(candidates="recap,vanilla:cache.full_every=3,cache.full_first=2")
    assert options.candidates == ["recap", "vanilla:cache.full_every=3,cache.full_first=2"]
    assert ImageGenerationRequest.model_validate({"prompt": "a red circle", "sampler": "recap"}).sampler == recap
    body = {"prompt": "a red circle", "sampler": {"cache": {"full_every": 3}}}
    assert ImageGenerationRequest.model_validate(body).sampler.cache.full_every == 3


def test_sample_cli_runs_the_recap_preset(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "images"
    subprocess.run([sys.executable, "-m", "jobs.cli", "sample", "--prompt", "a red circle", "--model", "tiny-meissonic",
                    "--steps", "4", "--sampler", "recap", "--out", str(out)], check=True, capture_output=True)
    assert len(list(out.glob("*.png"))) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_batch_forward_pads_each_rows_queries(family, request):
    import dataclasses

    pipe = dataclasses.replace(request.getfixturevalue(family), micro_batch=None)
    out = pipe.generate(_prompts(pipe), [3, 4, 5], steps=6,
                        sampler=SamplerConfig.from_spec("recap"), decode=False)
    assert out.nfe == 6 and not (out.tokens == pipe.mask_token_id).any()
