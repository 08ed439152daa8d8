"""Samplers: llama2.c run.c reproduced token for token on its own logits, and the general sampler."""
import math

import numpy as np
import pytest

import conftest
from llamarun.errors import LlamarunError
from llamarun.sampling import (Llama2cSampler, Sampler, XorShift64Star, make_sampler, sample_mult,
                               sample_topp)


def load_golden(name):
    case = conftest.load_golden(name)
    return case, case["logits"]


SAMPLED_CASES = ["s260K_sampled", "s260K_temp", "tiny_gqa_sampled", "tiny_q8_v2_sampled"]
GREEDY_CASES = ["s260K_greedy", "tiny_gqa_greedy", "tiny_q8_legacy_greedy", "tiny_q8_v1_greedy",
                "tiny_q8_v2_greedy", "tiny_untied_greedy"]


def drawn_positions(case, n_rows):
    """Positions where run.c samples (the prompt is forced before that), limited to stored rows."""
    first = len(case["prompt_tokens"]) - 1
    return range(first, min(n_rows, len(case["tokens"]) - 1))


# ----------------------------------------------------------------------------------------------
# llama2.c run.c's sampler

@pytest.mark.parametrize("name", SAMPLED_CASES)
def test_llama2c_sampler_reproduces_every_runc_token(name):
    case, logits = load_golden(name)
    assert case["temperature"] > 0
    sampler = Llama2cSampler(case["temperature"], case["topp"], case["seed"])
    positions = drawn_positions(case, len(logits))
    # every token run.c drew has a stored row, including a final BOS (1) when it stopped early
    assert positions.stop == len(case["tokens"]) - 1
    drawn = [sampler.sample(logits[pos]) for pos in positions]
    expected = [case["tokens"][pos + 1] for pos in positions]
    mismatches = [(pos, got, want) for pos, got, want in zip(positions, drawn, expected) if got != want]
    assert not mismatches, (f"{len(mismatches)} of {len(expected)} tokens differ, "
                            f"(pos, got, run.c): {mismatches[:5]}")


@pytest.mark.parametrize("name", GREEDY_CASES)
def test_greedy_goldens_are_the_argmax(name):
    case, logits = load_golden(name)
    assert case["temperature"] == 0
    positions = drawn_positions(case, len(logits))
    runc_like = Llama2cSampler(temperature=0, top_p=case["topp"], seed=case["seed"])
    general = Sampler(temperature=0)
    for pos in positions:
        want = case["tokens"][pos + 1]
        assert int(np.argmax(logits[pos])) == want
        assert runc_like.sample(logits[pos]) == want
        assert general.sample(logits[pos]) == want


def test_xorshift64star_first_values_by_hand():
    # run.c's random_u32 written out with Python integers, independent of the class under test
    mask = (1 << 64) - 1
    state = 42
    expected = []
    for _ in range(5):
        state ^= state >> 12
        state = (state ^ (state << 25)) & mask
        state ^= state >> 27
        expected.append(((state * 0x2545F4914F6CDD1D) & mask) >> 32)
    # the first three worked through once more on paper: 42 -> 0x5400002a -> 0x54000020 after >> 27
    assert expected[:3] == [1456360119, 3359763283, 3393612768]

    rng = XorShift64Star(42)
    assert [rng.next_u32() for _ in range(5)] == expected
    coins = XorShift64Star(42)
    first = coins.next_f32()
    assert first.dtype == np.float32 and first == np.float32((1456360119 >> 8) / 16777216.0)
    assert 0.0 <= float(first) < 1.0


def test_llama2c_greedy_draws_no_coin():
    sampler = Llama2cSampler(temperature=0, top_p=0.9, seed=5)
    assert sampler.sample(np.array([0.5, 2.0, 2.0, -1.0], dtype=np.float32)) == 1   # first maximum
    assert sampler.rng.state == 5


def test_llama2c_sampler_walks_cdf_and_nucleus():
    probs = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)
    assert sample_mult(probs, np.float32(0.05)) == 0
    assert sample_mult(probs, np.float32(0.25)) == 1
    assert sample_mult(probs, np.float32(0.9999)) == 3
    assert sample_mult(np.array([0.2, 0.2], dtype=np.float32), np.float32(0.9)) == 1  # fell off: last
    # top-p 0.6 keeps [0.4, 0.3] (mass 0.7); r = coin * 0.7 walks 0.4 then 0.3
    topp = np.float32(0.6)
    assert sample_topp(probs, topp, np.float32(0.5)) == 3     # r = 0.35 < 0.4
    assert sample_topp(probs, topp, np.float32(0.6)) == 2     # r = 0.42 >= 0.4
    assert sample_topp(probs, topp, np.float32(0.999)) == 2


def test_llama2c_distribution_matches_what_it_draws():
    logits = np.array([1.0, 3.0, 2.5, -4.0, 0.0], dtype=np.float32)
    nucleus = Llama2cSampler(temperature=1.0, top_p=0.8, seed=3).distribution(logits)
    assert nucleus.sum() == pytest.approx(1.0)
    assert set(np.flatnonzero(nucleus)) == {1, 2}
    full = Llama2cSampler(temperature=1.0, top_p=1.0, seed=3).distribution(logits)
    assert np.all(full > 0) and full.sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# The general sampler

def logits_of(probs):
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


OFF = dict(top_k=0, top_p=1.0, min_p=0.0)


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    sampler = Sampler(temperature=0, seed=1)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert sampler.sample(logits) == int(np.argmax(logits))
        dist = sampler.distribution(logits)
        assert dist[np.argmax(logits)] == 1.0 and dist.sum() == 1.0


def test_top_k_1_always_gives_argmax():
    rng = np.random.default_rng(1)
    sampler = Sampler(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=7)
    for _ in range(50):
        logits = rng.standard_normal(32000).astype(np.float32)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_seeds_reproduce():
    logits = np.random.default_rng(2).standard_normal(32000).astype(np.float32)
    a, b = Sampler(temperature=1.0, seed=11, **OFF), Sampler(temperature=1.0, seed=11, **OFF)
    first = [a.sample(logits) for _ in range(30)]
    assert first == [b.sample(logits) for _ in range(30)]
    other = Sampler(temperature=1.0, seed=12, **OFF)
    assert first != [other.sample(logits) for _ in range(30)]


def test_top_p_keeps_smallest_set_reaching_the_mass():
    probs = [0.05, 0.4, 0.1, 0.25, 0.2]
    logits = logits_of(probs)
    for top_p, kept in [(0.3, {1}), (0.6, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 3, 4, 2}),
                        (1.0, {0, 1, 2, 3, 4})]:
        dist = Sampler(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0, seed=0).distribution(logits)
        assert set(np.flatnonzero(dist)) == kept, top_p
        renormalised = np.array(probs)[sorted(kept)] / sum(np.array(probs)[sorted(kept)])
        assert np.allclose(dist[sorted(kept)], renormalised, rtol=1e-6)


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    rng = np.random.default_rng(3)
    for scale in (0.3, 3.0):      # a flat distribution (big nucleus) and a peaked one
        logits = (rng.standard_normal(32000) * scale).astype(np.float32)
        dist = Sampler(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=0).distribution(logits)
        p = np.exp(logits.astype(np.float64) - logits.max())
        order = np.argsort(-p, kind="stable")
        n_keep = int(np.searchsorted(np.cumsum(p[order]), 0.9 * p.sum())) + 1
        assert set(np.flatnonzero(dist)) == set(order[:n_keep])


def test_top_k_then_top_p_measures_within_top_k():
    probs = [0.3, 0.3, 0.2, 0.1, 0.1]
    # top_k=2 leaves [0.5, 0.5]; top_p 0.4 then needs just one of them (the lower id on a tie)
    dist = Sampler(temperature=1.0, top_k=2, top_p=0.4, min_p=0.0, seed=0).distribution(logits_of(probs))
    assert np.count_nonzero(dist) == 1 and dist[0] == 1.0


def test_min_p_cutoff():
    probs = [0.5, 0.2, 0.1, 0.04, 0.16]
    # p_max = 0.5: min_p 0.3 keeps p >= 0.15, min_p 0.19 keeps p >= 0.095
    for min_p, kept in [(0.3, {0, 1, 4}), (0.19, {0, 1, 2, 4}), (0.9, {0}), (0.0, {0, 1, 2, 3, 4})]:
        sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=min_p, seed=0)
        dist = sampler.distribution(logits_of(probs))
        assert set(np.flatnonzero(dist)) == kept, min_p
        assert dist.sum() == pytest.approx(1.0)


def test_temperature_scales_after_filtering_as_llama_cpp():
    logits = np.array([2.0, 1.0, 0.0], dtype=np.float32)
    dist = Sampler(temperature=0.5, **OFF).distribution(logits)
    expected = np.exp(np.array([4.0, 2.0, 0.0]))
    assert np.allclose(dist, expected / expected.sum())
    # llama.cpp's order: min-p measures the model's own probabilities (token 2: p/p_max = e^-2 = 0.135),
    # so the temperature does not decide what it drops
    for temperature in (0.5, 2.0):
        assert Sampler(temperature=temperature, top_k=0, top_p=1.0, min_p=0.05).distribution(logits)[2] > 0
        assert Sampler(temperature=temperature, top_k=0, top_p=1.0, min_p=0.2).distribution(logits)[2] == 0
    # temperature first (samplers="tkpm", llamarun's order before): at temperature 0.5 token 2 has
    # p = 0.0159 < 0.05 * p_max; at temperature 2 it survives min-p
    assert Sampler(temperature=0.5, top_k=0, top_p=1.0, min_p=0.05, samplers="tkpm").distribution(logits)[2] == 0
    assert Sampler(temperature=2.0, top_k=0, top_p=1.0, min_p=0.05, samplers="tkpm").distribution(logits)[2] > 0


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    logits = np.array([2.0, -2.0, 1.0, 0.5, -1.0], dtype=np.float32)
    sampler = Sampler(temperature=1.0, repeat_penalty=2.0, penalty_last_n=3, **OFF)
    # only the last 3 tokens count: token 2 (seen long ago) keeps its logit
    out = sampler.penalize(logits, history=[2, 0, 1, 0])
    assert np.allclose(out, [1.0, -4.0, 1.0, 0.5, -1.0])
    assert np.array_equal(logits, [2.0, -2.0, 1.0, 0.5, -1.0])      # the input is not modified
    # repeat penalty applies once per token, however often it appears
    assert np.allclose(sampler.penalize(logits, history=[0, 0, 0]), [1.0, -2.0, 1.0, 0.5, -1.0])


def test_presence_and_frequency_penalties():
    logits = np.zeros(5, dtype=np.float32)
    sampler = Sampler(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.25,
                      penalty_last_n=64, **OFF)
    out = sampler.penalize(logits, history=[3, 1, 3, 3])
    assert np.allclose(out, [0.0, -0.75, 0.0, -1.25, 0.0])       # 1: 0.5 + 0.25; 3: 0.5 + 3 * 0.25
    # penalties flow into what is sampled: the distribution follows the penalised logits
    dist = sampler.distribution(logits, history=[3, 1, 3, 3])
    expected = np.exp(out.astype(np.float64))
    assert np.allclose(dist, expected / expected.sum())
    # greedy picks the argmax of the penalised logits
    assert Sampler(temperature=0, repeat_penalty=10.0).sample(np.array([3.0, 2.0, 1.0]), history=[0]) == 1


def test_penalties_off():
    logits = np.array([1.0, 2.0], dtype=np.float32)
    assert Sampler(repeat_penalty=1.5, penalty_last_n=0).penalize(logits, [0, 1]) is logits
    assert Sampler().penalize(logits, [0, 1]) is logits


def test_distribution_sums_to_one_and_is_zero_outside_the_kept_set():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(49152) * 3).astype(np.float32)
    sampler = Sampler(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, seed=1)
    dist = sampler.distribution(logits)
    assert dist.dtype == np.float64 and dist.shape == (49152,)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)
    kept = np.flatnonzero(dist)
    assert 1 <= kept.size <= 40
    assert set(kept) <= set(np.argsort(-logits)[:40])
    for _ in range(200):
        assert dist[sampler.sample(logits)] > 0


def test_empirical_frequencies_match_distribution():
    probs = [0.35, 0.25, 0.2, 0.12, 0.05, 0.03]
    sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=2024)
    logits = logits_of(probs)
    dist = sampler.distribution(logits)
    n = 20000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=len(probs))
    chi2 = float(((counts - n * dist) ** 2 / (n * dist)).sum())
    assert chi2 < 30, (counts, n * dist)     # 5 degrees of freedom: 30 is far in the tail


# ----------------------------------------------------------------------------------------------
# Validation and the factory

@pytest.mark.parametrize("params", [
    dict(temperature=-0.1), dict(temperature=math.inf), dict(temperature=math.nan),
    dict(temperature="hot"), dict(temperature=None), dict(temperature=True),
    dict(top_p=0.0), dict(top_p=1.5), dict(top_p=-0.2), dict(top_p="0.9"),
    dict(min_p=-0.01), dict(min_p=1.01), dict(min_p=math.nan),
    dict(top_k=-1), dict(top_k=2.5), dict(top_k="40"),
    dict(repeat_penalty=0.0), dict(repeat_penalty=-1.0),
    dict(presence_penalty=math.inf), dict(frequency_penalty="x"),
    dict(penalty_last_n=-1), dict(penalty_last_n=1.5),
    dict(seed=-1), dict(seed=1.5), dict(seed="1"),
])
def test_invalid_sampler_settings_raise(params):
    with pytest.raises(LlamarunError, match=next(iter(params))):
        Sampler(**params)


@pytest.mark.parametrize("params", [
    dict(temperature=-1.0, top_p=0.9, seed=1), dict(temperature=math.nan, top_p=0.9, seed=1),
    dict(temperature=1.0, top_p=0.0, seed=1), dict(temperature=1.0, top_p=2.0, seed=1),
    dict(temperature=1.0, top_p=0.9, seed=-3), dict(temperature=1.0, top_p=0.9, seed=2 ** 64),
    dict(temperature="1", top_p=0.9, seed=1),
])
def test_invalid_llama2c_settings_raise(params):
    with pytest.raises(LlamarunError):
        Llama2cSampler(**params)


def test_llama2c_seed_zero_means_clock_like_runc():
    sampler = Llama2cSampler(temperature=1.0, top_p=0.9, seed=0)
    assert sampler.seed > 0 and sampler.rng.state == sampler.seed


def test_make_sampler():
    assert isinstance(make_sampler(), Sampler)
    default = make_sampler("default", temperature=0.5, top_k=None, seed=3)
    assert isinstance(default, Sampler) and default.temperature == 0.5 and default.top_k == 40
    runc = make_sampler("llama2c", temperature=0.9, top_p=0.95, seed=123)
    assert isinstance(runc, Llama2cSampler) and runc.seed == 123
    with pytest.raises(LlamarunError, match="top_k"):
        make_sampler("llama2c", temperature=0.9, top_k=40)
    with pytest.raises(LlamarunError, match="min_p"):
        make_sampler("llama2c", min_p=0.1)
    with pytest.raises(LlamarunError, match="bogus"):
        make_sampler("default", bogus=1)
    with pytest.raises(LlamarunError, match="nucleus"):
        make_sampler("nucleus")
    with pytest.raises(LlamarunError, match="temperature"):
        make_sampler("default", temperature=-2)
