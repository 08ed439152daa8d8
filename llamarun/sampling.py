"""Choosing the next token from a row of logits.

Two samplers share one interface, `.sample(logits_row, history=()) -> int` and
`.distribution(logits_row, history=()) -> probabilities` (float64, over the whole vocabulary):

- `Llama2cSampler` reproduces llama2.c's run.c bit for bit: the same float32 arithmetic, the same
  xorshift64* coins, the same top-p walk. Given run.c's logits and seed it draws run.c's tokens.
- `Sampler` is the general sampler users know from llama.cpp and Hugging Face: repetition /
  presence / frequency penalties, temperature, top-k, top-p, min-p, drawn with numpy's PCG64.

`make_sampler(kind, **params)` builds either from command-line style parameters.
"""
import inspect
import math
import numbers
import time

import numpy as np

from .errors import LlamarunError

_U64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# Parameter checks shared by both samplers: each failure is one sentence naming the parameter.

def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LlamarunError(f"{name} must be a number, got {value!r}; pass a plain number such as 0.8.")
    value = float(value)
    if not math.isfinite(value):
        raise LlamarunError(f"{name} must be a finite number, got {value!r}.")
    return value


def _check_integer(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LlamarunError(f"{name} must be a whole number, got {value!r}.")
    return int(value)


def _check_temperature(value):
    value = _check_number("temperature", value)
    if value < 0:
        raise LlamarunError(f"temperature must be >= 0, got {value}; use 0 for greedy decoding.")
    return value


def _check_top_p(value):
    value = _check_number("top_p", value)
    if not 0 < value <= 1:
        raise LlamarunError(f"top_p must be in (0, 1], got {value}; use 1 to turn top-p off.")
    return value


def _check_seed(value, upper=None):
    if value is None:
        return None
    value = _check_integer("seed", value)
    if value < 0:
        raise LlamarunError(f"seed must be a non-negative whole number, got {value}.")
    if upper is not None and value > upper:
        raise LlamarunError(f"seed must be at most {upper} (a 64-bit unsigned number), got {value}.")
    return value


def _as_logits(logits_row):
    logits = np.asarray(logits_row)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"expected one non-empty row of logits, got shape {logits.shape}")
    return logits


# ----------------------------------------------------------------------------------------------
# llama2.c run.c's sampler, reproduced exactly

class XorShift64Star:
    """run.c's random number generator: xorshift64* on a 64-bit state that starts at the seed."""

    def __init__(self, seed: int):
        self.state = seed & _U64

    def next_u32(self) -> int:
        """run.c's random_u32: three xorshifts of the state, then the top 32 bits of state * M."""
        s = self.state
        s ^= s >> 12
        s = (s ^ (s << 25)) & _U64
        s ^= s >> 27
        self.state = s
        return ((s * 0x2545F4914F6CDD1D) & _U64) >> 32

    def next_f32(self) -> np.float32:
        """run.c's random_f32: the top 24 bits of a u32 as a float32 in [0, 1)."""
        return np.float32((self.next_u32() >> 8) / 16777216.0)


def _seed_from_clock() -> int:
    # run.c: `if (rng_seed <= 0) rng_seed = (unsigned int)time(NULL);`
    return int(time.time()) & 0xFFFFFFFF


def argmax_first(logits) -> int:
    """The index of the first maximum (np.argmax returns the first one, as run.c's loop does)."""
    return int(np.argmax(logits))


def _expf(x32):
    """float32 exp as glibc's expf (which run.c calls) computes it, to within rare 1-ulp misses.

    glibc's expf is nearly correctly rounded, and so is float64 exp rounded once to float32: on
    run.c's logits the two differ in about 0.06% of elements. numpy's own float32 exp is a faster
    SIMD approximation that differs from glibc in about 40% of them (by an ulp). An ulp can swap
    near-equal probabilities in top-p, so take the closer one. (The goldens do not tell the three
    apart: all reproduce every token; what they do catch is the summation order below.)
    """
    return np.exp(x32.astype(np.float64)).astype(np.float32)


def _sequential_sum(x32) -> np.float32:
    """A plain left-to-right float32 sum, like run.c's `for (...) sum += x[i];`.

    np.sum adds pairwise, which rounds differently; an accumulate is strictly sequential.
    """
    return np.add.accumulate(x32, dtype=np.float32)[-1]


def softmax_f32(logits32):
    """run.c's softmax: subtract the max, expf, divide by the sequential float32 sum."""
    e = _expf(logits32 - logits32.max())
    return e / _sequential_sum(e)


def sample_mult(probs32, coin) -> int:
    """run.c's sample_mult: the first index whose float32 running cdf exceeds the coin."""
    cdf = np.add.accumulate(probs32, dtype=np.float32)
    hits = np.flatnonzero(coin < cdf)
    return int(hits[0]) if hits.size else probs32.size - 1


def topp_prefix(probs32, topp32):
    """run.c's sample_topp, up to the draw: the kept token ids (most probable first), their
    probabilities, and the float32 mass of the prefix that the coin is scaled by."""
    n = probs32.size
    # Tokens below this cutoff cannot be in the nucleus (a cheap prefilter in run.c, but it
    # decides which tokens exist when the nucleus never reaches topp, so it is kept exactly).
    cutoff = (np.float32(1.0) - topp32) / np.float32(n - 1)
    ids = np.flatnonzero(probs32 >= cutoff)
    # run.c qsorts by descending probability; a stable sort keeps ties in token order.
    ids = ids[np.argsort(-probs32[ids], kind="stable")]
    kept = probs32[ids]
    cumulative = np.add.accumulate(kept, dtype=np.float32)
    over = np.flatnonzero(cumulative > topp32)
    last = int(over[0]) if over.size else ids.size - 1
    return ids[:last + 1], kept[:last + 1], cumulative[last]


def sample_topp(probs32, topp32, coin) -> int:
    """run.c's sample_topp: walk the nucleus with coin * (its mass), all in float32."""
    ids, kept, mass = topp_prefix(probs32, topp32)
    r = np.float32(coin * mass)
    cdf = np.add.accumulate(kept, dtype=np.float32)
    hits = np.flatnonzero(r < cdf)
    return int(ids[hits[0]]) if hits.size else int(ids[-1])


class Llama2cSampler:
    """llama2.c run.c's sampler: temperature, optional top-p, xorshift64* coins, all float32.

    run.c holds temperature and topp as C floats, so they are rounded to float32 here too. A seed
    of 0 (or None) means what it means in run.c: seed from the clock (see `.seed` for the value).
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 0.9, seed: int | None = None):
        self.temperature = _check_temperature(temperature)
        self.top_p = _check_top_p(top_p)
        seed = _check_seed(seed, upper=_U64)
        self.seed = seed if seed else _seed_from_clock()
        self._temperature32 = np.float32(self.temperature)
        self._topp32 = np.float32(self.top_p)
        self.rng = XorShift64Star(self.seed)

    def _uses_topp(self) -> bool:
        return 0 < self._topp32 < 1

    def _probabilities(self, logits):
        return softmax_f32(logits.astype(np.float32) / self._temperature32)

    def sample(self, logits_row, history=()) -> int:
        """Draw the next token as run.c's sample() does (history is ignored, as in run.c)."""
        logits = _as_logits(logits_row)
        if self._temperature32 == 0:
            return argmax_first(logits)   # greedy: no coin is drawn
        probs = self._probabilities(logits)
        coin = self.rng.next_f32()
        if self._uses_topp():
            return sample_topp(probs, self._topp32, coin)
        return sample_mult(probs, coin)

    def distribution(self, logits_row, history=()) -> np.ndarray:
        """The probabilities (float64, whole vocab) that `sample` draws from; draws no coin."""
        logits = _as_logits(logits_row)
        dist = np.zeros(logits.size)
        if self._temperature32 == 0:
            dist[argmax_first(logits)] = 1.0
            return dist
        probs = self._probabilities(logits)
        if not self._uses_topp():
            probs = probs.astype(np.float64)
            return probs / probs.sum()
        ids, kept, _ = topp_prefix(probs, self._topp32)
        kept = kept.astype(np.float64)
        dist[ids] = kept / kept.sum()
        return dist


# ----------------------------------------------------------------------------------------------
# The general sampler (llama.cpp / Hugging Face style)

# Choosing candidates divides float32 logits by the temperature; a smaller temperature would round
# to 0 in float32 (0 / 0 = nan). Below it the choice is greedy-like anyway, so it is a floor there.
_TINY_TEMPERATURE = 1e-30


class Sampler:
    """Penalties, then temperature (0 = greedy), then top-k, top-p and min-p, then a draw.

    - repeat_penalty (llama.cpp): a token seen in the last `penalty_last_n` tokens of history has a
      positive logit divided by the penalty and a negative one multiplied by it.
    - presence_penalty / frequency_penalty (OpenAI): logit -= presence * [count > 0] + frequency * count.
    - top_k keeps the k largest logits; top_p the smallest set of most probable tokens whose mass is
      >= top_p (always at least one); min_p drops tokens with p < min_p * p_max.
    top_k=0, top_p=1, min_p=0, repeat_penalty=1 and zero presence/frequency turn each step off.
    Draws use numpy's default_rng(seed); seed None is nondeterministic.
    """

    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64, seed=None):
        self.temperature = _check_temperature(temperature)
        self.top_k = _check_integer("top_k", top_k)
        if self.top_k < 0:
            raise LlamarunError(f"top_k must be >= 0, got {self.top_k}; use 0 to turn top-k off.")
        self.top_p = _check_top_p(top_p)
        self.min_p = _check_number("min_p", min_p)
        if not 0 <= self.min_p <= 1:
            raise LlamarunError(f"min_p must be in [0, 1], got {self.min_p}; use 0 to turn min-p off.")
        self.repeat_penalty = _check_number("repeat_penalty", repeat_penalty)
        if self.repeat_penalty <= 0:
            raise LlamarunError(f"repeat_penalty must be > 0, got {self.repeat_penalty}; "
                                "use 1 to turn it off.")
        self.presence_penalty = _check_number("presence_penalty", presence_penalty)
        self.frequency_penalty = _check_number("frequency_penalty", frequency_penalty)
        self.penalty_last_n = _check_integer("penalty_last_n", penalty_last_n)
        if self.penalty_last_n < 0:
            raise LlamarunError(f"penalty_last_n must be >= 0, got {self.penalty_last_n}; "
                                "use 0 to turn the penalties off.")
        self.seed = _check_seed(seed)
        self.rng = np.random.default_rng(self.seed)

    # --- the steps, in order

    def _penalties_active(self) -> bool:
        return self.penalty_last_n > 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)

    def penalize(self, logits, history):
        """The logits after the repeat / presence / frequency penalties (a copy when changed)."""
        if not self._penalties_active() or len(history) == 0:
            return logits
        window = np.asarray(history[-self.penalty_last_n:], dtype=np.int64)
        if window.min() < 0 or window.max() >= logits.size:
            raise ValueError(f"history holds token ids outside the vocabulary of {logits.size}")
        ids, counts = np.unique(window, return_counts=True)
        seen = logits[ids].astype(np.float64)
        # llama.cpp: dividing a negative logit would raise it, so negative ones are multiplied.
        seen = np.where(seen > 0, seen / self.repeat_penalty, seen * self.repeat_penalty)
        seen -= self.presence_penalty + self.frequency_penalty * counts
        out = logits.copy()          # only the seen entries change: no float64 copy of the vocab
        out[ids] = seen
        return out

    def _top_k_ids(self, logits):
        """Ids of the top_k largest logits (unordered), or of all tokens when top-k is off.
        argpartition is linear; a full sort of the vocabulary would cost milliseconds."""
        n = logits.size
        if 0 < self.top_k < n:
            return np.argpartition(logits, n - self.top_k)[n - self.top_k:]
        return np.arange(n)

    def _nucleus(self, ids, weights, total):
        """top-p: the smallest set of the most probable `ids` whose weight is >= top_p * total.

        Only that set needs sorting, so partition off the m heaviest (m = 64, 512, ...) until
        they hold enough mass, then sort just those (ties in token order).
        """
        if self.top_p >= 1.0:
            return ids
        needed = self.top_p * total
        heaviest = np.arange(weights.size)
        m = 64
        while m < weights.size:
            top = np.argpartition(weights, weights.size - m)[weights.size - m:]
            if weights[top].sum(dtype=np.float64) >= needed:
                heaviest = top
                break
            m *= 8
        heaviest = heaviest[np.lexsort((ids[heaviest], -weights[heaviest]))]
        cumulative = np.cumsum(weights[heaviest], dtype=np.float64)
        n_keep = min(int(np.searchsorted(cumulative, needed)) + 1, heaviest.size)
        return ids[heaviest[:n_keep]]

    def candidates(self, logits_row, history=()):
        """The tokens that can be drawn (ascending token ids) and their renormalised float64
        probabilities. Greedy gives the single argmax of the penalised logits."""
        logits = self.penalize(_as_logits(logits_row), history)
        if self.temperature == 0:
            return np.array([argmax_first(logits)]), np.ones(1)

        # Choosing the members needs only relative weights, computed in the logits' own precision
        # (float32 exp is 8x faster than float64 on a whole vocabulary) and summed in float64.
        # Top-k renormalises, so weights are relative to the top-k set's most probable token.
        ids = self._top_k_ids(logits)
        z = logits[ids]
        weights = np.exp((z - z.max()) / max(self.temperature, _TINY_TEMPERATURE))
        total = weights.sum(dtype=np.float64)   # the top-k mass that top-p measures against

        # min-p: p < min_p * p_max is weight < min_p. Dropping these before top-p gives the same
        # set as after (both keep a most-probable prefix, so the result is the shorter one, and
        # top-p still measures against the full `total`), and leaves far fewer tokens to sort.
        if self.min_p > 0:
            keep = weights >= self.min_p
            ids, weights = ids[keep], weights[keep]
        ids = np.sort(self._nucleus(ids, weights, total))

        # The probabilities actually drawn from: float64 softmax over the kept tokens only.
        z = logits[ids].astype(np.float64)
        probs = np.exp((z - z.max()) / self.temperature)   # max first: z / 1e-300 would overflow
        return ids, probs / probs.sum()

    def distribution(self, logits_row, history=()) -> np.ndarray:
        """float64 probabilities over the vocabulary that `sample` draws from (one-hot if greedy)."""
        ids, probs = self.candidates(logits_row, history)
        dist = np.zeros(np.shape(logits_row)[-1])
        dist[ids] = probs
        return dist

    def sample(self, logits_row, history=()) -> int:
        """Draw the next token; one uniform number per draw when temperature > 0, none if greedy."""
        ids, probs = self.candidates(logits_row, history)
        if self.temperature == 0:
            return int(ids[0])
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])


# ----------------------------------------------------------------------------------------------

_LLAMA2C_PARAMS = ("temperature", "top_p", "seed")
_DEFAULT_PARAMS = tuple(inspect.signature(Sampler).parameters)


def make_sampler(kind: str = "default", **params):
    """Build a sampler: kind "default" -> Sampler(**params), "llama2c" -> Llama2cSampler.

    Parameters given as None count as not given (so a CLI can pass every flag through).
    """
    params = {name: value for name, value in params.items() if value is not None}
    if kind == "default":
        unknown = sorted(set(params) - set(_DEFAULT_PARAMS))
        if unknown:
            raise LlamarunError(f"the default sampler does not take {', '.join(unknown)}; "
                                f"it accepts {', '.join(_DEFAULT_PARAMS)}.")
        return Sampler(**params)
    if kind == "llama2c":
        unknown = sorted(set(params) - set(_LLAMA2C_PARAMS))
        if unknown:
            raise LlamarunError(f"the llama2c sampler does not take {', '.join(unknown)}; "
                                "it accepts only temperature, top_p and seed.")
        return Llama2cSampler(**params)
    raise LlamarunError(f"unknown sampler kind {kind!r}; choose 'default' or 'llama2c'.")
