"""The enhanced samplers of arXiv 2411.10781: noise regularization, differential sampling, masked Z-Sampling.

Unit tests of each piece, the loop's invariants (mask counts, NFE, exactness with vanilla at zero strength,
batch invariance for every preset) on a bitwise batch-invariant stand-in model, then every preset end to end
on the tiny Meissonic and aMUSEd models and through the CLI.
"""

import dataclasses
import json
import math

import pytest
import torch
from pydantic import BaseModel
from sampler_helpers import CODES, MASK, SIDE, stand_in

from mgt.config import GenerationSettings
from mgt.sampling import loop as sampling
from mgt.sampling import schedules
from mgt.sampling.differential_sampling import DifferentialSampling
from mgt.sampling.noise_regularization import NoiseRegularization
from mgt.sampling.sampler_config import PRESETS, SamplerConfig
from mgt.sampling.z_sampling import MaskedZSampling

GUIDANCE = 9.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(spec, prompts=(1,), seeds=(7,), steps=8, guidance=GUIDANCE):
    predict, calls = stand_in(list(prompts))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    config = spec if isinstance(spec, SamplerConfig) else SamplerConfig.from_spec(spec)
    result = sampling.sample(predict, (len(prompts), SIDE, SIDE), steps, generators, MASK, config, guidance=guidance)
    return result, calls


# ------------------------------------------------------------------------------------------ noise regularization

def test_sigma_values_of_the_released_schedule_at_64_steps():
    noise = NoiseRegularization()  # A = 2, |cos(pi i/(T-1))|: docs/samplers.md §3
    expected = {0: 2.0, 1: 1.9975, 10: 1.756, 31: 0.0499, 32: 0.0499, 53: 1.756, 62: 1.9975, 63: 2.0}
    for step, sigma in expected.items():
        assert noise.sigma(step, 64) == pytest.approx(sigma, abs=6e-4), step


@pytest.mark.parametrize("schedule,values", [
    ("abs_cos", (1.0, 0.0, 1.0)), ("cos_half", (1.0, math.cos(math.pi / 4), 0.0)), ("linear", (1.0, 0.5, 0.0)),
    ("one_minus_pow", (1.0, 1 - 0.5**0.6, 0.0)), ("const", (1.0, 1.0, 1.0)),
])
def test_noise_schedules_over_u(schedule, values):
    noise = NoiseRegularization(amplitude=1.5, schedule=schedule)  # T = 3: u = 0, 0.5, 1
    assert [noise.sigma(i, 3) for i in range(3)] == pytest.approx([1.5 * v for v in values], abs=1e-12)


def test_noise_comes_from_each_samples_generator_on_masked_rows_only():
    logits = torch.zeros(2, 6, 4)
    rows = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    NoiseRegularization(amplitude=2.0).perturb_(logits, rows, 0, 4, [torch.Generator().manual_seed(s) for s in (3, 4)])
    for b, seed in enumerate((3, 4)):
        expected = torch.randn(int(rows[b].sum()), 4, generator=torch.Generator().manual_seed(seed)) * 2.0
        assert torch.equal(logits[b][rows[b]], expected)
        assert not logits[b][~rows[b]].any()


def test_noise_on_all_rows_and_zero_amplitude_draws_nothing():
    logits = torch.zeros(1, 5, 3)
    const = NoiseRegularization(amplitude=1.0, schedule="const")
    const.perturb_(logits, None, 2, 4, [torch.Generator().manual_seed(1)])
    assert torch.equal(logits[0], torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    NoiseRegularization(amplitude=0.0).perturb_(logits, None, 0, 4, [generator])
    assert torch.equal(generator.get_state(), state)


# ------------------------------------------------------------------------------------------ differential sampling

SCRATCH = torch.empty(2, 40, 16)  # the loop lends its spent logits; any (B, L, C) buffer will do


def _distributions(seed, batch=2, length=40, codes=16):
    return torch.softmax(torch.randn(batch, length, codes, generator=torch.Generator().manual_seed(seed)) * 2, -1)


def test_differential_modifies_exactly_z_rows_and_rows_sum_to_one():
    diff = DifferentialSampling(ratio=0.75)
    unknown = torch.ones(2, 40, dtype=torch.bool)
    first = _distributions(0)
    assert diff(first, unknown, is_last_step=False, scratch=SCRATCH) is first  # first call untouched
    second = _distributions(1)
    out = diff(second, unknown, is_last_step=False, scratch=SCRATCH)
    changed = (out != second).any(-1)
    assert changed.sum(-1).tolist() == [30, 30]  # Z = 0.75 * 40 per sample
    assert torch.allclose(out.sum(-1), torch.ones(2, 40), atol=1e-5)
    assert (out >= 0).all()
    third = _distributions(2)
    assert diff(third, unknown, is_last_step=True, scratch=SCRATCH) is third  # last step untouched


def test_differential_picks_the_smallest_kl_and_resamples_from_the_positive_difference():
    diff = DifferentialSampling(ratio=0.5, floor=1e-6)
    prev, cur = _distributions(3, batch=1), _distributions(4, batch=1)
    diff(prev, torch.ones(1, 40, dtype=torch.bool), False, scratch=SCRATCH)
    out = diff(cur, torch.ones(1, 40, dtype=torch.bool), False, scratch=SCRATCH)
    kl = torch.nn.functional.kl_div(prev[0].log(), cur[0], reduction="none").sum(-1)
    stable = torch.topk(kl, 20, largest=False).indices
    assert torch.allclose(diff.divergence(cur[0], prev[0], SCRATCH[0]), kl, rtol=1e-4, atol=1e-6)
    expected = (cur[0, stable] - prev[0, stable]).clamp_min(1e-6)
    assert torch.allclose(out[0, stable], expected / expected.sum(-1, keepdim=True), atol=1e-6)
    assert (out[0] != cur[0]).any(-1).nonzero()[:, 0].sort().values.tolist() == stable.sort().values.tolist()


def test_differential_state_options():
    unknown = torch.zeros(1, 40, dtype=torch.bool)
    unknown[0, :10] = True
    masked_only = DifferentialSampling(ratio=0.5, ratio_of="masked")
    masked_only(_distributions(5, batch=1), unknown, False, scratch=SCRATCH)
    cur = _distributions(6, batch=1)
    changed = (masked_only(cur, unknown, False, scratch=SCRATCH) != cur).any(-1)[0]
    assert changed.sum() == 5 and not changed[10:].any()
    raw = DifferentialSampling(store_modified_prev=False)
    raw(_distributions(5, batch=1), unknown, False, scratch=SCRATCH)
    out = raw(cur, unknown, False, scratch=SCRATCH)
    assert torch.equal(raw.prev, cur) and not torch.equal(out, cur)  # P_prev = raw softmax, draw from p'
    stored = DifferentialSampling()
    stored(_distributions(5, batch=1), unknown, False, scratch=SCRATCH)
    assert stored(cur, unknown, False, scratch=SCRATCH) is stored.prev  # released code: P_prev = modified p


# ------------------------------------------------------------------------------------------ masked Z-Sampling

def _zigzag_case():
    before = torch.full((1, 12), MASK)
    before[0, :4] = torch.arange(4)  # 4 known tokens
    forward = before.clone()
    forward[0, 4:9] = torch.arange(5)  # the forward step revealed 5 (positions 4..8)
    logits = torch.zeros(1, 12, CODES)
    logits[0, :, 0] = torch.tensor([20.0, 19, 18, 17, 1, 2, 3, 4, 5, 30, 30, 30])  # kappa follows these
    return before, forward, logits


@pytest.mark.parametrize("rule,count,expected", [
    ("top_conf_all", "revealed-1", {0, 1, 2, 3}),
    ("top_conf_all", "revealed", {0, 1, 2, 3, 8}),
    ("low_conf_all", "revealed-1", {4, 5, 6, 7}),
    ("top_conf_new", "revealed-1", {5, 6, 7, 8}),
])
def test_zigzag_remask_rules(rule, count, expected):
    before, forward, logits = _zigzag_case()
    out = MaskedZSampling(remask_rule=rule, remask_count=count).remask(
        before, forward, logits, [torch.Generator().manual_seed(0)], MASK)
    assert set(((out == MASK) & (forward != MASK))[0].nonzero()[:, 0].tolist()) == expected
    assert torch.equal(out[out != MASK], forward[out != MASK])


def test_zigzag_random_rule_uses_the_samples_generator():
    before, forward, logits = _zigzag_case()
    zigzag = MaskedZSampling(remask_rule="random")
    a = zigzag.remask(before, forward, logits.clone(), [torch.Generator().manual_seed(5)], MASK)
    b = zigzag.remask(before, forward, logits.clone(), [torch.Generator().manual_seed(5)], MASK)
    assert torch.equal(a, b) and int(((a == MASK) & (forward != MASK)).sum()) == 4


def test_max_probability_is_the_softmax_max():
    logits = torch.randn(2, 5, 7)
    assert torch.allclose(MaskedZSampling.max_probability_(logits.clone()), torch.softmax(logits, -1).amax(-1))


def test_zsampling_keeps_the_mask_schedule_and_costs_3t_minus_2():
    steps = 8
    vanilla, vanilla_calls = run("vanilla", steps=steps)
    zigzag, calls = run("zsampling", steps=steps)
    assert vanilla.nfe == steps and zigzag.nfe == 3 * steps - 2 == len(calls)
    forward = [c for c in calls if c[1] == GUIDANCE][::2][:steps - 1] + [calls[-1]]
    assert [c[2] for c in forward] == [c[2] for c in vanilla_calls]  # masks entering each step
    inversions = [c for c in calls if c[1] == 0.0]
    assert [c[0] for c in inversions] == [steps - 2 - i for i in range(steps - 1)]  # t_{i+1}
    assert not (zigzag.tokens == MASK).any()
    assert run(SamplerConfig.from_spec("zsampling:zsampling.num_steps=3"), steps=steps)[0].nfe == steps + 6
    with pytest.raises(ValueError, match="zsampling.num_steps=8 is more than T-1=7"):
        run("zsampling:zsampling.num_steps=8", steps=steps)


# ------------------------------------------------------------------------------------------ the loop

@pytest.mark.parametrize("spec", ["noise:noise.amplitude=0", "differential:differential.ratio=0",
                                  "noise+differential:noise.amplitude=0,differential.ratio=0"])
def test_zero_strength_is_token_exact_with_vanilla(spec):
    reference = run("vanilla", prompts=(1, 2), seeds=(3, 4))[0].tokens
    assert torch.equal(run(spec, prompts=(1, 2), seeds=(3, 4))[0].tokens, reference)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_is_batch_invariant(preset):
    batch = run(preset, prompts=(1, 2, 3), seeds=(10, 20, 30))[0].tokens
    for i, (prompt, seed) in enumerate(zip((1, 2, 3), (10, 20, 30))):
        assert torch.equal(run(preset, prompts=(prompt,), seeds=(seed,))[0].tokens[0], batch[i]), i
    if preset != "vanilla":
        assert not torch.equal(batch, run("vanilla", prompts=(1, 2, 3), seeds=(10, 20, 30))[0].tokens)


def test_tempered_draw_distributions():
    probs = torch.softmax(torch.randn(2, 6, CODES), -1)
    assert sampling.tempered(probs, 1.0) is probs
    assert torch.equal(sampling.tempered(probs, 0.0).argmax(-1), probs.argmax(-1))
    assert torch.equal(sampling.tempered(probs, 0.0).sum(-1), torch.ones(2, 6))
    squared = probs ** 2
    assert torch.allclose(sampling.tempered(probs, 0.5), squared / squared.sum(-1, keepdim=True), atol=1e-6)


def test_argmax_draw_reveals_the_most_probable_tokens_ranked_by_untempered_confidence():
    predict, _ = stand_in([1])
    seen = []

    def recording(tokens, step_value, scale):
        seen.append(tokens.clone())
        return predict(tokens, step_value, scale)

    config = SamplerConfig.from_spec("vanilla:token_temperature=0,gumbel_temperature=[0,0]")
    # guidance 1: at the module's scale 9 many probabilities saturate to 1.0 and their confidences tie
    sampling.sample(recording, (1, SIDE, SIDE), 4, [torch.Generator().manual_seed(0)], MASK, config, guidance=1.0)
    first = torch.softmax(predict(seen[0], 3, 1.0), -1)[0]  # the first step's distributions
    revealed = seen[1].flatten() != MASK
    assert int(revealed.sum()) == SIDE * SIDE - math.floor(SIDE * SIDE * math.cos(math.pi / 2 / 4))
    assert torch.equal(seen[1].flatten()[revealed], first.argmax(-1)[revealed])
    # tempered to one-hot every confidence would tie; the untempered ones pick the most probable positions
    top = first.amax(-1).topk(int(revealed.sum())).indices
    assert set(top.tolist()) == set(revealed.nonzero()[:, 0].tolist())


def test_token_temperature_is_batch_invariant_and_changes_the_tokens():
    spec = "vanilla:token_temperature=0.5"
    batch = run(spec, prompts=(1, 2), seeds=(10, 20))[0].tokens
    assert torch.equal(run(spec, prompts=(2,), seeds=(20,))[0].tokens[0], batch[1])
    assert not torch.equal(batch, run("vanilla", prompts=(1, 2), seeds=(10, 20))[0].tokens)


def test_linear_guidance_schedule_ramps_to_the_scale():
    _, calls = run("vanilla:guidance_schedule=linear", steps=5)
    assert [c[1] for c in calls] == pytest.approx([1.0, 3.0, 5.0, 7.0, 9.0])
    assert schedules.guidance_scale("constant", 9.0, 0, 5) == 9.0


def test_halton_order_reveals_the_grid_in_each_samples_rolled_halton_order():
    from mgt.sampling.halton import grid_order

    predict, _ = stand_in([1])
    seen = []

    def recording(tokens, step_value, scale):
        seen.append(tokens.clone().flatten())
        return predict(tokens, step_value, scale)

    generator = torch.Generator().manual_seed(5)
    sampling.sample(recording, (1, SIDE, SIDE), 4, [generator], MASK, SamplerConfig.from_spec("vanilla:order=halton"),
                    guidance=GUIDANCE)
    offset = int(torch.randint(0, SIDE * SIDE, (1,), generator=torch.Generator().manual_seed(5)))
    order = torch.roll(grid_order(SIDE, SIDE), offset)
    for before in seen[1:]:  # after each step the known cells are a prefix of the order
        known = int((before != MASK).sum())
        assert 0 < known < SIDE * SIDE and set((before != MASK).nonzero()[:, 0].tolist()) == set(order[:known].tolist())


def test_halton_order_covers_grids_beyond_the_references_points():
    from mgt.sampling.halton import grid_order

    for rows, cols in ((64, 64), (8, 12), (128, 96)):
        assert sorted(grid_order(rows, cols).tolist()) == list(range(rows * cols))


@pytest.mark.parametrize("preset", ["vanilla", "zsampling+noise", "differential"])
def test_halton_order_is_batch_invariant_under_every_technique(preset):
    spec = f"{preset}:order=halton"
    batch = run(spec, prompts=(1, 2), seeds=(10, 20))[0].tokens
    assert torch.equal(run(spec, prompts=(2,), seeds=(20,))[0].tokens[0], batch[1])
    assert not torch.equal(batch, run(preset, prompts=(1, 2), seeds=(10, 20))[0].tokens)


# ------------------------------------------------------------------------------------------ configuration

def test_presets_and_the_compact_cli_form():
    assert SamplerConfig.from_spec("vanilla") == SamplerConfig()
    everything = SamplerConfig.from_spec("all")
    assert everything.noise.amplitude == 2.0 and everything.differential.ratio == 0.75
    assert everything.zsampling.inversion_cfg == 0.0 and everything.zsampling.remask_rule == "top_conf_all"
    assert SamplerConfig.from_spec("noise+zsampling") == SamplerConfig.from_spec("zsampling+noise")
    config = SamplerConfig.from_spec("zsampling+noise:noise.amplitude=1.5,zsampling.inversion_cfg=0.5,"
                                     "gumbel_temperature=[3, 0],zsampling.remask_rule=random,noise.schedule=const")
    assert (config.noise.amplitude, config.zsampling.inversion_cfg, config.gumbel_temperature) == (1.5, 0.5, (3, 0))
    assert config.zsampling.remask_rule == "random" and config.noise.schedule == "const" and not config.differential
    assert SamplerConfig.from_spec("vanilla:differential.ratio_of=masked").differential.ratio_of == "masked"
    assert SamplerConfig.from_spec("all:noise=null").noise is None


def test_a_field_added_later_leaves_the_recorded_hashes_alone():
    # the hashes of runs recorded before token_temperature existed (a rerun resumes them)
    assert SamplerConfig().config_hash() == "258948728ac1"
    assert SamplerConfig.from_spec("zsampling+noise").config_hash() == "b40ab65a02fe"
    assert SamplerConfig.from_spec("vanilla:token_temperature=0.5").config_hash() != "258948728ac1"
    assert SamplerConfig.from_spec("vanilla:order=confidence").config_hash() == "258948728ac1"
    assert SamplerConfig.from_spec("vanilla:order=halton").config_hash() != "258948728ac1"


def test_mapping_json_and_yaml_forms_agree():
    expected = SamplerConfig.from_spec("zsampling+noise:noise.amplitude=1.5")
    assert SamplerConfig.from_spec({"preset": "zsampling+noise", "noise": {"amplitude": 1.5}}) == expected
    assert SamplerConfig.from_spec({"zsampling": {}, "noise": {"amplitude": 1.5}}) == expected
    assert SamplerConfig.from_spec(json.dumps(expected.model_dump())) == expected
    assert GenerationSettings.model_validate({"sampler": {"preset": "all"}}).sampler == SamplerConfig.from_spec("all")
    assert GenerationSettings(sampler="zsampling+noise:noise.amplitude=1.5").sampler == expected


@pytest.mark.parametrize("spec,message", [
    ("zigzag", "unknown sampler preset 'zigzag'; use one of vanilla, noise"),
    ("noise+noise", "unknown sampler preset"),
    ("noise:noise.amplitude=-1", "noise.amplitude: Input should be greater than or equal to 0 (got -1)"),
    ("noise:amplitude=2", "amplitude: Extra inputs are not permitted"),
    ("zsampling:zsampling.remask_rule=best", "zsampling.remask_rule: Input should be 'top_conf_all'"),
    ("noise:amplitude", "'amplitude' is not key=value"),
])
def test_bad_specs_name_the_value_and_the_fix(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplerConfig.from_spec(spec)


def test_every_config_field_has_a_default_and_a_description():
    def models(model):
        yield model
        for field in model.model_fields.values():
            for arg in [field.annotation, *getattr(field.annotation, "__args__", ())]:
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    yield from models(arg)

    for model in models(SamplerConfig):
        for name, field in model.model_fields.items():
            assert not field.is_required() and field.description, f"{model.__name__}.{name}"


# ------------------------------------------------------------------------------------------ end to end

def test_whole_batch_forward_runs_the_batch_at_once(tiny_meissonic):
    """micro_batch=None runs one forward per step for the whole CFG batch (bitwise batch invariance is not promised)."""
    pipe = dataclasses.replace(tiny_meissonic, micro_batch=None)
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        out = pipe.generate(["a", "b", "c"], [1, 2, 3], steps=3, decode=False)
    finally:
        handle.remove()
    assert calls == [6, 6, 6] and not (out.tokens == pipe.mask_token_id).any()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_end_to_end_and_batch_invariant_on_tiny_meissonic(tiny_meissonic, preset):
    pipe = tiny_meissonic  # micro_batch=1 (the default): each sample's CFG pair is its own forward
    prompts, seeds, steps = ["a red circle", "", "two blue squares"], [3, 4, 5], 5
    batch = pipe.generate(prompts, seeds, steps=steps, sampler=SamplerConfig.from_spec(preset), decode=False)
    assert batch.nfe == (3 * steps - 2 if "zsampling" in preset or preset == "all" else steps)
    assert not (batch.tokens == pipe.mask_token_id).any() and batch.tokens.max() < pipe.mask_token_id
    alone = pipe.generate(prompts[2:], seeds[2:], steps=steps, sampler=SamplerConfig.from_spec(preset), decode=False)
    assert torch.equal(alone.tokens[0], batch.tokens[2])


@pytest.mark.parametrize("preset", [*PRESETS, "vanilla:order=halton"])
def test_every_preset_end_to_end_on_tiny_amused(tiny_amused, preset):
    out = tiny_amused.generate(["a red circle", "a blue square"], [1, 2], steps=4,
                               sampler=SamplerConfig.from_spec(preset))
    assert out.nfe == (10 if "zsampling" in preset or preset == "all" else 4)
    assert out.images.shape == (2, 64, 64, 3) and not (out.tokens == tiny_amused.mask_token_id).any()


def test_halton_order_end_to_end_and_batch_invariant_on_tiny_meissonic(tiny_meissonic):
    prompts, seeds, spec = ["a red circle", "two blue squares"], [3, 4], SamplerConfig.from_spec("vanilla:order=halton")
    batch = tiny_meissonic.generate(prompts, seeds, steps=5, sampler=spec, decode=False)
    assert not (batch.tokens == tiny_meissonic.mask_token_id).any() and batch.nfe == 5
    alone = tiny_meissonic.generate(prompts[1:], seeds[1:], steps=5, sampler=spec, decode=False)
    assert torch.equal(alone.tokens[0], batch.tokens[1])
    vanilla = tiny_meissonic.generate(prompts, seeds, steps=5, decode=False)
    assert not torch.equal(vanilla.tokens, batch.tokens)


def test_zero_strength_is_token_exact_with_vanilla_on_tiny_meissonic(tiny_meissonic):
    vanilla = tiny_meissonic.generate(["a red circle"], [9], steps=5, decode=False).tokens
    for spec in ("noise:noise.amplitude=0", "differential:differential.ratio=0"):
        out = tiny_meissonic.generate(["a red circle"], [9], steps=5, sampler=SamplerConfig.from_spec(spec),
                                      decode=False)
        assert torch.equal(out.tokens, vanilla), spec


def test_cli_sampler_flag(tmp_path):
    from jobs.cli import main

    code = main(["sample", "--prompt", "a red circle", "--steps", "3", "--device", "cpu", "--out", str(tmp_path),
                 "--sampler", "zsampling+noise:noise.amplitude=1.5,zsampling.inversion_cfg=0.5"])
    assert code == 0
    from PIL import Image

    meta = json.loads(Image.open(next(tmp_path.glob("*.png"))).text["maskray"])
    assert meta["sampler"]["noise"]["amplitude"] == 1.5 and meta["sampler"]["zsampling"]["inversion_cfg"] == 0.5
