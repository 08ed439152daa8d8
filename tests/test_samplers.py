"""llama.cpp's samplers (issue 21): each against a numpy implementation of its published definition,
written here from the paper / llama.cpp's description and not calling llamarun; llama.cpp's own test
vectors (tests/test-sampling.cpp); the chain's order; seeds; checks; the CLI flags and server fields."""
import math

import numpy as np
import pytest

from llamarun.errors import LlamarunError
from llamarun.sampling import LLAMA_CPP_ORDER, Sampler, make_sampler, parse_samplers

OFF = dict(top_k=0, top_p=1.0, min_p=0.0)       # the default truncations off: one step at a time


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def random_logits(seed, n=300, scale=2.0):
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def only(step, **params):
    """A sampler that runs one step, then draws at temperature 1."""
    return Sampler(temperature=1.0, samplers=[step], **{**OFF, **params})


def as_dist(n, kept, logits, temperature=1.0):
    """The distribution over n tokens: softmax of logits / temperature over `kept` only."""
    kept = np.asarray(sorted(kept))
    dist = np.zeros(n)
    dist[kept] = softmax(np.asarray(logits, np.float64)[kept] / temperature)
    return dist


# ----------------------------------------------------------------------------------------------
# independent references, from the definitions

def ref_typical(p, mass):
    """Meister et al., "Locally typical sampling": tokens by |surprise - entropy|, the most typical
    first, until their probability mass exceeds `mass`."""
    entropy = -np.sum(p * np.log(p))
    order = sorted(range(len(p)), key=lambda i: abs(-math.log(p[i]) - entropy))
    kept, total = [], 0.0
    for i in order:
        kept.append(i)
        total += p[i]
        if total > mass:
            break
    return kept


def ref_top_n_sigma(z, n):
    """Tang et al., "Top-nsigma": keep logits within n standard deviations of the largest."""
    z = np.asarray(z, np.float64)
    return [i for i in range(len(z)) if z[i] >= z.max() - n * math.sqrt(np.mean((z - z.mean()) ** 2))]


def ref_xtc(p, threshold):
    """XTC (oobabooga PR 6335): of the tokens with p >= threshold, remove all but the least probable."""
    above = sorted((i for i in range(len(p)) if p[i] >= threshold), key=lambda i: -p[i])
    removed = set(above[:-1]) if len(above) >= 2 else set()
    return [i for i in range(len(p)) if i not in removed]


def ref_dynatemp_temperature(p, temperature, spread, exponent):
    """llama.cpp's dynamic temperature (kalomaze): min + (max - min) * (H / log N) ** exponent."""
    low, high = max(0.0, temperature - spread), temperature + spread
    entropy = -sum(x * math.log(x) for x in p if x > 0)
    return low + (high - low) * (entropy / math.log(len(p))) ** exponent


def ref_dry(history, vocab, multiplier, base, allowed, last_n, breaker_ids):
    """DRY (p-e-w, text-generation-webui PR 5677), straight from its description: a token t that would
    continue a sequence which already occurs in the window followed by t, where that sequence matches
    the end of the window for n tokens, n >= allowed, gets multiplier * base ** (n - allowed) taken off.
    The match never reaches back across a sequence breaker (one-token breakers here), and a breaker is
    never penalised."""
    window = list(history[-last_n:])
    penalty = np.zeros(vocab)
    for j in range(len(window) - 1):             # window[j + 1] followed the sequence ending at j
        n = 0
        while (n <= j and window[j - n] == window[-1 - n] and window[-1 - n] not in breaker_ids
               and window[j - n] not in breaker_ids):
            n += 1
        t = window[j + 1]
        if n >= allowed and t not in breaker_ids:
            penalty[t] = max(penalty[t], multiplier * base ** (n - allowed))
    return penalty


class Vocabulary:
    """A tokenizer of whole words for DRY's breakers: token i's text is words[i]."""

    def __init__(self, words):
        self.words, self.vocab_size = [w.encode() for w in words], len(words)

    def token_bytes(self, token, prev=None):
        return self.words[token]

    def encode(self, text, bos=False, special=False):
        out, data = [], text.encode()
        while data:                                       # longest piece first
            token = max((i for i, w in enumerate(self.words) if w and data.startswith(w)), key=lambda i: len(self.words[i]))
            out.append(token)
            data = data[len(self.words[token]):]
        return out


# ----------------------------------------------------------------------------------------------
# each sampler against its definition, on random logits

@pytest.mark.parametrize("seed", range(4))
def test_typical_p(seed):
    z = random_logits(seed, 200)
    for mass in (0.2, 0.6, 0.95):
        kept = ref_typical(softmax(z), mass)
        assert np.allclose(only("typ_p", typical_p=mass).distribution(z), as_dist(200, kept, z))


@pytest.mark.parametrize("seed", range(4))
def test_top_n_sigma(seed):
    z = random_logits(seed, 500, 3.0)
    for n in (0.5, 1.0, 2.5):
        kept = ref_top_n_sigma(z, n)
        assert np.allclose(only("top_n_sigma", top_n_sigma=n).distribution(z), as_dist(500, kept, z))
        # temperature first changes nothing: the cut scales with the logits
        s = Sampler(temperature=0.7, top_n_sigma=n, samplers="ts", **OFF)
        assert np.allclose(s.distribution(z), as_dist(500, kept, z, 0.7))


@pytest.mark.parametrize("seed", range(4))
def test_xtc_distribution_is_the_mixture_over_its_coin(seed):
    z = random_logits(seed, 50, 1.5)
    p = softmax(z)
    threshold = float(np.sort(p)[-3]) - 1e-9          # three tokens at or over the threshold
    fired = as_dist(50, ref_xtc(p, threshold), z)
    s = only("xtc", xtc_probability=0.3, xtc_threshold=threshold)
    assert np.allclose(s.distribution(z), 0.7 * softmax(z) + 0.3 * fired)
    assert np.count_nonzero(fired) == 48
    certain = only("xtc", xtc_probability=1.0, xtc_threshold=threshold, seed=seed)
    assert all(certain.sample(z) in set(np.flatnonzero(fired)) for _ in range(50))


def test_xtc_draws_follow_the_mixture():
    z = np.log(np.array([0.4, 0.3, 0.2, 0.1])).astype(np.float32)
    s = only("xtc", xtc_probability=0.5, xtc_threshold=0.25, seed=5)
    dist = s.distribution(z)
    assert np.allclose(dist, 0.5 * np.array([0.4, 0.3, 0.2, 0.1]) + 0.5 * np.array([0, 0.5, 1 / 3, 1 / 6]))
    n = 4000
    counts = np.bincount([s.sample(z) for _ in range(n)], minlength=4)
    assert float(((counts - n * dist) ** 2 / (n * dist)).sum()) < 25     # 3 degrees of freedom


@pytest.mark.parametrize("seed", range(4))
def test_dynamic_temperature_uses_the_entropy_of_the_candidates_left(seed):
    z = random_logits(seed, 400)
    for temperature, spread, exponent in ((0.8, 0.5, 1.0), (1.0, 0.9, 2.0), (0.3, 1.0, 0.5)):
        # llama.cpp's order: top-k 20 first, so the entropy is that of the 20 left, and log N is log 20
        kept = np.argsort(-z)[:20]
        t = ref_dynatemp_temperature(softmax(z[kept]), temperature, spread, exponent)
        s = Sampler(temperature=temperature, dynatemp_range=spread, dynatemp_exponent=exponent, top_k=20,
                    top_p=1.0, min_p=0.0, samplers=LLAMA_CPP_ORDER)
        assert np.allclose(s.distribution(z), as_dist(400, kept, z, t))


def test_mirostat_2_against_its_definition():
    """Basu et al., Mirostat 2.0: keep the tokens of surprise -log2 p <= mu, draw, mu -= eta * (surprise - tau)."""
    tau, eta, temperature = 3.0, 0.2, 0.9
    s = Sampler(temperature=temperature, mirostat=2, mirostat_tau=tau, mirostat_eta=eta, seed=1)
    mu = 2 * tau
    for step in range(40):
        z = random_logits(100 + step, 300, 1.5)
        p = softmax(z / temperature)
        kept = [i for i in range(300) if -math.log2(p[i]) <= mu] or [int(np.argmax(p))]
        want = as_dist(300, kept, z, temperature)
        assert np.allclose(s.distribution(z), want)
        token = s.sample(z)
        assert want[token] > 0
        assert np.allclose(s.distribution(z), want)       # with the row just drawn from: mu before the update
        mu -= eta * (-math.log2(want[token]) - tau)
        assert s.mu == pytest.approx(mu)


def test_mirostat_1_against_its_definition():
    """Basu et al., Mirostat: estimate the Zipf exponent s from the m = 100 most probable tokens, then
    top-k with k = ((eps 2^mu) / (1 - N^-eps)) ^ (1/s), eps = s - 1."""
    tau, eta, n = 5.0, 0.1, 1000
    s = Sampler(temperature=1.0, mirostat=1, mirostat_tau=tau, mirostat_eta=eta, seed=2)
    mu = 2 * tau
    for step in range(10):
        z = random_logits(200 + step, n, 3.0)
        p = np.sort(softmax(z))[::-1]
        i = np.arange(99)
        t, b = np.log((i + 2) / (i + 1)), np.log(p[:99] / p[1:100])
        zipf = np.sum(t * b) / np.sum(t * t)
        k = max(int(((zipf - 1) * 2 ** mu / (1 - n ** (1 - zipf))) ** (1 / zipf)), 1)
        want = as_dist(n, np.argsort(-z)[:k], z)
        assert np.allclose(s.distribution(z), want)
        token = s.sample(z)
        mu -= eta * (-math.log2(want[token]) - tau)
        assert s.mu == pytest.approx(mu)


@pytest.mark.parametrize("seed", range(3))
def test_dry_against_its_definition(seed):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(11)] + ["\n"]         # token 11 is a newline: a breaker
    z = random_logits(seed, 12, 0.5)
    phrase = list(rng.integers(0, 11, 5))
    # repetitive text: a phrase repeated with noise, one breaker in it
    history = list(rng.integers(0, 11, 6)) + phrase + [11] + list(rng.integers(0, 11, 3)) + phrase + phrase[:3]
    for multiplier, base, allowed, last_n in ((0.8, 1.75, 2, 64), (1.0, 2.0, 1, 12), (0.5, 1.5, 3, 20)):
        s = Sampler(temperature=1.0, dry_multiplier=multiplier, dry_base=base, dry_allowed_length=allowed,
                    dry_penalty_last_n=last_n, dry_sequence_breakers=["\n"], tokenizer=Vocabulary(words),
                    samplers=["dry"], **OFF)
        penalty = ref_dry(history, 12, multiplier, base, allowed, last_n, {11})
        assert np.allclose(s.distribution(z, history), softmax(z - penalty))
        if last_n == 64:
            assert penalty[phrase[3]] > 0                  # the repeated phrase is penalised where it goes on
        # a repeat that reaches back across a breaker counts only the tokens after it
        crossing = [1, 2, 11, 3, 4, 5, 6, 1, 2, 11, 3, 4, 5]
        penalty = ref_dry(crossing, 12, multiplier, base, allowed, last_n, {11})
        assert np.allclose(s.distribution(z, crossing), softmax(z - penalty))
        assert penalty[6] == pytest.approx(multiplier * base ** (3 - allowed))


def test_dry_breakers_are_found_in_token_texts():
    """A breaker inside a token's text makes it a breaker; one split over tokens is a head and a tail."""
    from llamarun.sampling import dry_breaker_table
    words = ["a", "b", "x:y", "ab", "c", "<", "|", "<|", "end"]
    table = dry_breaker_table(Vocabulary(words), [":", "<|end"])
    assert table[2] == ((),)                            # "x:y" holds ":"
    assert table[7] == ((8,),)                          # "<|" then the rest, "end", tokenized
    assert table[5] == ((6, 8),)                        # "<" then "|end" -> "|", "end"
    assert 0 not in table and 8 not in table


def test_llama_cpp_test_vectors():
    """Expected values from llama.cpp's tests/test-sampling.cpp (probabilities in, probabilities out)."""
    def dist(sampler, probs, history=()):
        z = np.log(np.array(probs)).astype(np.float32)
        return sampler.distribution(z, list(history))

    assert np.allclose(dist(only("typ_p", typical_p=0.5), [0.97, 0.01, 0.01, 0.01]), [1, 0, 0, 0])
    assert np.allclose(dist(only("typ_p", typical_p=0.5), [0.4, 0.2, 0.2, 0.2]), [0, 1 / 3, 1 / 3, 1 / 3])
    assert np.allclose(dist(only("top_n_sigma", top_n_sigma=1.0), [0.1, 0.2, 0.3, 0.4]), [0, 0, 0.428571, 0.571429])
    assert np.allclose(dist(only("top_n_sigma", top_n_sigma=3.0), [0.1, 0.2, 0.3, 0.4]), [0.1, 0.2, 0.3, 0.4])
    for threshold, kept in ((0.09, [0.1]), (0.19, [0.2, 0.1]), (0.29, [0.3, 0.2, 0.1]),
                            (0.39, [0.4, 0.3, 0.2, 0.1])):
        xtc = only("xtc", xtc_probability=1.0, xtc_threshold=threshold)
        out = dist(xtc, [0.4, 0.3, 0.2, 0.1])
        assert np.allclose(out[4 - len(kept):], np.array(kept) / sum(kept)), threshold

    def dry(multiplier, base, allowed, last_n, breakers=()):
        words = [str(i) for i in range(5)]
        return Sampler(temperature=1.0, dry_multiplier=multiplier, dry_base=base, dry_allowed_length=allowed,
                       dry_penalty_last_n=last_n, dry_sequence_breakers=[words[b] for b in breakers],
                       tokenizer=Vocabulary(words), samplers="d", **OFF)
    assert np.allclose(dist(dry(1.0, 1.1, 2, 4), [0.25] * 4, [0, 1]), [0.25] * 4)
    assert np.allclose(dist(dry(1.0, 1.1, 2, 5), [0.25] * 4, [0, 1, 2, 0, 1]),
                       [0.296923, 0.296923, 0.109232, 0.296923], atol=1e-6)
    assert np.allclose(dist(dry(1.0, 1.1, 2, 6, [3]), [0.2] * 5, [0, 1, 3, 4, 0, 1]), [0.2] * 5)
    assert np.allclose(dist(dry(2.0, 1.1, 2, 5), [0.2] * 5, [0, 1, 2, 0, 1]),
                       [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], atol=1e-6)
    assert np.allclose(dist(dry(1.0, 1.1, 4, 7), [0.2] * 5, [0, 1, 2, 3, 4, 0, 1]), [0.2] * 5)


# ----------------------------------------------------------------------------------------------
# the order

def test_llama_cpps_default_order_and_its_spellings():
    # common/common.h, common_params_sampling::samplers
    assert LLAMA_CPP_ORDER == ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                               "temperature")
    assert parse_samplers("edskypmxt") == LLAMA_CPP_ORDER
    assert parse_samplers("penalties;dry;top-n-sigma;topk;typical;nucleus;min_p;XTC;temp") == LLAMA_CPP_ORDER
    assert parse_samplers(["top_k", "temperature"]) == ("top_k", "temperature")
    assert parse_samplers("temp") == ("temperature",)
    assert Sampler().samplers == parse_samplers(None)


def test_the_order_decides_what_top_p_and_min_p_measure():
    z = random_logits(7, 300)
    temperature, top_p, min_p = 0.6, 0.8, 0.05

    def nucleus(p):
        order = np.argsort(-p, kind="stable")
        return order[:int(np.searchsorted(np.cumsum(p[order]), top_p * p.sum())) + 1]

    for order, scaled in (("kpmt", 1.0), ("tkpm", temperature)):
        p = softmax(z / scaled)
        kept = [i for i in nucleus(p) if p[i] >= min_p * p.max()]
        s = Sampler(temperature=temperature, top_k=0, top_p=top_p, min_p=min_p, samplers=order)
        assert np.allclose(s.distribution(z), as_dist(300, kept, z, temperature)), order
    # without temperature in the chain, none is applied (as llama.cpp)
    assert np.allclose(Sampler(temperature=0.2, samplers="k", top_k=0).distribution(z), softmax(z))


def test_greedy_keeps_the_argmax_of_what_the_steps_before_it_left():
    z = np.array([3.0, 2.9, 1.0, 0.5], np.float32)
    assert Sampler(temperature=0).sample(z) == 0
    # XTC before temperature removed the top choice: greedy takes the best of the rest
    s = Sampler(temperature=0, xtc_probability=1.0, xtc_threshold=0.1, samplers=LLAMA_CPP_ORDER, **OFF)
    assert s.sample(z) == 1 and s.distribution(z)[1] == 1.0


# ----------------------------------------------------------------------------------------------
# seeds, and what is off by default

def test_seeds_reproduce_every_stochastic_sampler():
    z = random_logits(3, 300, 1.0)
    for params in (dict(xtc_probability=0.5, xtc_threshold=0.02), dict(mirostat=2), dict(mirostat=1),
                   dict(dynatemp_range=0.5, typical_p=0.9, top_n_sigma=2.0)):
        a, b, c = (Sampler(seed=seed, **params) for seed in (4, 4, 5))
        drawn = [a.sample(z) for _ in range(30)]
        assert drawn == [b.sample(z) for _ in range(30)], params
        assert drawn != [c.sample(z) for _ in range(30)], params


def test_new_samplers_are_off_by_default():
    z = random_logits(5, 300)
    default = Sampler(seed=1)
    explicit = Sampler(seed=1, dynatemp_range=0, typical_p=1, top_n_sigma=-1, xtc_probability=0, dry_multiplier=0,
                       mirostat=0)
    assert np.array_equal(default.distribution(z, [1, 2, 1, 2]), explicit.distribution(z, [1, 2, 1, 2]))
    assert [default.sample(z) for _ in range(20)] == [explicit.sample(z) for _ in range(20)]


@pytest.mark.parametrize("params", [
    dict(dynatemp_range=-0.5), dict(dynatemp_exponent=-1), dict(typical_p=1.5), dict(typical_p="0.9"),
    dict(top_n_sigma=math.nan), dict(xtc_probability=1.2), dict(xtc_threshold=-0.1), dict(dry_multiplier=-1),
    dict(dry_base=0.5), dict(dry_allowed_length=1.5), dict(dry_penalty_last_n=-1),
    dict(dry_sequence_breakers="\n"), dict(dry_sequence_breakers=["", "a"]), dict(mirostat=3),
    dict(mirostat=True), dict(mirostat_tau=-1), dict(mirostat_eta=math.inf),
    dict(samplers="top_k;bogus"), dict(samplers="kqz"), dict(samplers=["top_k", "top_k"]), dict(samplers=5),
])
def test_nonsense_values_are_one_line_errors(params):
    name = next(iter(params))
    with pytest.raises(LlamarunError, match=name) as e:
        Sampler(**params)
    assert "\n" not in str(e.value)


def test_dry_needs_the_tokenizer_for_its_breakers():
    with pytest.raises(LlamarunError, match="tokenizer"):
        Sampler(dry_multiplier=0.8)
    assert Sampler(dry_multiplier=0.8, dry_sequence_breakers=[]).dry_breakers == {}
    assert make_sampler(dry_multiplier=0.8, tokenizer=Vocabulary(["a", "\n"])).dry_breakers == {1: ((),)}


# ----------------------------------------------------------------------------------------------
# the CLI's flags and the server's fields reach the sampler

def test_cli_flags_reach_the_sampler():
    from llamarun.cli import build_parser, llama_cpp_sampling
    args = build_parser().parse_args(
        ["generate", "hi", "--dynatemp-range", "0.5", "--dynatemp-exp", "2", "--typical", "0.9", "--top-n-sigma", "1.5",
         "--xtc-probability", "0.3", "--xtc-threshold", "0.2", "--dry-multiplier", "0.8", "--dry-base", "2",
         "--dry-allowed-length", "3", "--dry-penalty-last-n", "32", "--dry-sequence-breaker", "\\n",
         "--dry-sequence-breaker", "END", "--mirostat", "2", "--mirostat-lr", "0.2", "--mirostat-ent", "4",
         "--samplers", "top_k;temperature"])
    s = make_sampler(tokenizer=Vocabulary(["a", "\n", "END"]), **llama_cpp_sampling(args))
    assert (s.dynatemp_range, s.dynatemp_exponent, s.typical_p, s.top_n_sigma) == (0.5, 2, 0.9, 1.5)
    assert (s.xtc_probability, s.xtc_threshold, s.dry_multiplier, s.dry_base) == (0.3, 0.2, 0.8, 2)
    assert (s.dry_allowed_length, s.dry_penalty_last_n, s.dry_sequence_breakers) == (3, 32, ("\n", "END"))
    assert (s.mirostat, s.mirostat_eta, s.mirostat_tau, s.samplers) == (2, 0.2, 4, ("top_k", "temperature"))
    none = build_parser().parse_args(["chat", "--dry-sequence-breaker", "none"])
    assert llama_cpp_sampling(none)["dry_sequence_breakers"] == []


def test_server_fields_reach_the_sampler():
    from conftest import MODELS, require, require_module
    require_module("starlette")
    import llamarun
    from llamarun.server import create_app
    from llamarun.server.app import ApiError
    tiny = llamarun.load(str(require(MODELS / "tiny_gqa.bin")), tokenizer=str(require(MODELS / "tokenizer.bin")))
    server = create_app(tiny, "tiny", parallel=1, ctx=64).state.server
    body = {"prompt": "Hi", "dynatemp_range": 0.4, "dynatemp_exponent": 1.5, "typical_p": 0.8, "top_n_sigma": 2,
            "xtc_probability": 0.2, "xtc_threshold": 0.15, "dry_multiplier": 0.7, "dry_base": 1.5,
            "dry_allowed_length": 3, "dry_penalty_last_n": 40, "dry_sequence_breakers": ["\n", "."],
            "mirostat": 2, "mirostat_tau": 4.0, "mirostat_eta": 0.2, "samplers": "kypt"}
    s = server.parse_completion(body).sampler
    assert (s.dynatemp_range, s.dynatemp_exponent, s.typical_p, s.top_n_sigma, s.xtc_probability) == (0.4, 1.5, 0.8, 2, 0.2)
    assert (s.xtc_threshold, s.dry_multiplier, s.dry_base, s.dry_allowed_length, s.dry_penalty_last_n) == \
        (0.15, 0.7, 1.5, 3, 40)
    assert (s.dry_sequence_breakers, s.mirostat, s.mirostat_tau, s.mirostat_eta) == (("\n", "."), 2, 4.0, 0.2)
    assert s.samplers == ("top_k", "typ_p", "top_p", "temperature") and s.dry_breakers
    assert server.parse_chat({"messages": [{"role": "user", "content": "Hi"}],
                              "samplers": ["top_k", "temperature"]}).sampler.samplers == ("top_k", "temperature")
    for field, value in (("mirostat", 3), ("xtc_probability", 2), ("dry_allowed_length", 1.5), ("typical_p", "x"),
                         ("samplers", "top_k;nope"), ("dry_sequence_breakers", "\n")):
        with pytest.raises(ApiError) as e:
            server.parse_completion({"prompt": "Hi", field: value})
        assert e.value.status == 400 and e.value.param == field, (field, e.value.message)
