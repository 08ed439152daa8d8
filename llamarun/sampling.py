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
import weakref

import numpy as np

from .errors import LlamarunError
from .kernels.select import top_k_positions

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

    def draws_argmax(self, history=()) -> bool:
        """Whether the next draw is the logits' argmax, whatever they are (temperature 0)."""
        return self._temperature32 == 0

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


# The general sampler: llama.cpp's chain of samplers

# Choosing candidates divides float32 logits by the temperature; a smaller temperature would round
# to 0 in float32 (0 / 0 = nan). Below it the choice is greedy-like anyway, so it is a floor there.
_TINY_TEMPERATURE = 1e-30

# The chain's steps by llama.cpp's names (common/sampling.cpp), with the letters of its --sampler-seq.
SAMPLER_LETTERS = {"penalties": "e", "dry": "d", "top_n_sigma": "s", "top_k": "k", "typ_p": "y",
                   "top_p": "p", "min_p": "m", "xtc": "x", "temperature": "t"}
# llama.cpp's default order (common.h, common_params_sampling::samplers): temperature last, so top-p,
# min-p, typical-p and XTC measure the model's own probabilities and dynamic temperature the entropy
# of the candidates they leave.
LLAMA_CPP_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature")
# llamarun's order before it took llama.cpp's (Hugging Face's): temperature right after the logit
# changes, so top-p and min-p measure the probabilities after temperature.
TEMPERATURE_FIRST_ORDER = ("penalties", "dry", "top_n_sigma", "temperature", "top_k", "typ_p", "top_p", "min_p",
                           "xtc")
DEFAULT_ORDER = LLAMA_CPP_ORDER
# llama.cpp's default DRY sequence breakers: a repeat never runs across them
DRY_SEQUENCE_BREAKERS = ("\n", ":", "\"", "*")


def _sampler_aliases() -> dict:
    """Every spelling llama.cpp's --samplers reads (top_k, top-k, topk, nucleus, temp, typ), and ours
    (typical_p, the parameter's name)."""
    aliases = {}
    for name in SAMPLER_LETTERS:
        aliases.update({name: name, name.replace("_", "-"): name, name.replace("_", ""): name})
    aliases.update(nucleus="top_p", temp="temperature", typ="typ_p", typical="typ_p", typical_p="typ_p")
    aliases["typical-p"] = "typ_p"
    return aliases


_SAMPLER_ALIASES = _sampler_aliases()
_LETTER_NAMES = {letter: name for name, letter in SAMPLER_LETTERS.items()}


def parse_samplers(samplers) -> tuple[str, ...]:
    """The chain's order from llama.cpp's forms: a list of names, a string of names separated by ';'
    ("top_k;top_p;temperature", llama.cpp's --samplers) or of letters ("kpt", its --sampler-seq and
    the server's string form). None: the default order."""
    if samplers is None:
        return DEFAULT_ORDER
    if isinstance(samplers, str):
        if ";" in samplers or samplers.strip().lower() in _SAMPLER_ALIASES:
            names = [s for s in samplers.split(";") if s.strip()]
        else:
            unknown = sorted(set(samplers) - set(_LETTER_NAMES))
            if unknown:
                raise LlamarunError(f"samplers: {samplers!r} is neither llama.cpp's letters ({''.join(_LETTER_NAMES)}) "
                                    f"nor names separated by ';' (unknown letter {unknown[0]!r}).")
            names = [_LETTER_NAMES[letter] for letter in samplers]
    elif isinstance(samplers, (list, tuple)):
        names = list(samplers)
    else:
        raise LlamarunError(f"samplers must be a list of names or a string, got {samplers!r}.")
    order = []
    for name in names:
        canonical = _SAMPLER_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None
        if canonical is None:
            raise LlamarunError(f"samplers: unknown sampler {name!r}; llamarun's are "
                                f"{', '.join(SAMPLER_LETTERS)} (llama.cpp's names).")
        if canonical in order:
            raise LlamarunError(f"samplers: {canonical} is listed twice; name each sampler once.")
        order.append(canonical)
    return tuple(order)


def _check_range(name, value, low, high=math.inf, integer=False, hint=""):
    value = _check_integer(name, value) if integer else _check_number(name, value)
    if not low <= value <= high:
        where = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise LlamarunError(f"{name} must be {where}, got {value}{'; ' + hint if hint else ''}.")
    return value


def _check_breakers(breakers) -> tuple[str, ...]:
    if isinstance(breakers, str) or not isinstance(breakers, (list, tuple)) \
            or not all(isinstance(b, str) and b for b in breakers):
        raise LlamarunError(f"dry_sequence_breakers must be a list of non-empty strings, got {breakers!r:.60}.")
    return tuple(breakers)


class _Candidates:
    """The tokens still in the running: ids (None: the whole vocabulary, id = index), their logits z
    (shape (n,), the caller's row until a step changes it), and the temperature z is divided by.

    Temperature is kept as a divisor rather than applied, so every step measures probabilities with
    the arithmetic the final draw uses (float32 weights for the cut-offs, float64 for the draw)."""

    def __init__(self, logits):
        self.ids, self.z, self.temperature = None, logits, 1.0
        self.own = False           # whether z is our copy (steps that change logits need one)

    def drop_banned(self):
        """Drop the tokens of logit -inf (banned: logit_bias, a grammar's mask). They have probability
        0 anyway, so only the steps that count candidates or take logs of probabilities ask for this."""
        banned = np.isneginf(self.z)
        if banned.any():
            self.keep(~banned)

    @property
    def size(self) -> int:
        return self.z.size

    def token_ids(self):
        return np.arange(self.z.size) if self.ids is None else self.ids

    def keep(self, where):
        """Keep the candidates at `where` (positions in the current arrays, or a boolean mask)."""
        if isinstance(where, np.ndarray) and where.dtype == bool:
            where = np.flatnonzero(where)
        self.ids = where if self.ids is None else self.ids[where]     # positions are ids on a whole row
        self.z = self.z[where]
        self.own = True

    def writable(self):
        if not self.own:
            self.z, self.own = self.z.copy(), True
        return self.z

    def weights(self):
        """Probabilities relative to the most probable candidate, in the logits' own precision
        (float32 exp is 8x faster than float64 on a whole vocabulary)."""
        return np.exp((self.z - self.z.max()) / max(self.temperature, _TINY_TEMPERATURE))

    def probabilities(self):
        """float64 softmax of z / temperature over the candidates."""
        z = self.z.astype(np.float64)
        p = np.exp((z - z.max()) / self.temperature)   # max first: z / 1e-300 would overflow
        return p / p.sum()

    def keep_argmax(self):
        """Greedy: the most probable candidate, the lowest id among equals (as np.argmax on a row)."""
        if self.ids is None:
            self.keep(np.array([argmax_first(self.z)]))
            return
        best = np.flatnonzero(self.z == self.z.max())
        self.keep(best[[np.argmin(self.ids[best])]])


class Sampler:
    """llama.cpp's sampler chain: the steps of `samplers` in order (llama.cpp's names), then a draw.

    - penalties: repeat_penalty (llama.cpp: a token seen in the last `penalty_last_n` tokens of history
      has a positive logit divided by the penalty and a negative one multiplied by it), presence /
      frequency (OpenAI: logit -= presence * [count > 0] + frequency * count).
    - dry (DRY, "don't repeat yourself"): a token that would extend a sequence already in the last
      `dry_penalty_last_n` tokens, repeated for n >= dry_allowed_length tokens, loses
      dry_multiplier * dry_base ** (n - dry_allowed_length) from its logit; a repeat never runs across
      a sequence breaker (text; matched against the tokenizer's token texts, as llama.cpp does).
    - top_n_sigma: keeps logits >= max - top_n_sigma * (their standard deviation).
    - top_k keeps the k largest logits; typ_p (typical_p) the tokens whose surprise is closest to the
      entropy, until their mass exceeds typical_p; top_p the smallest set of most probable tokens whose
      mass is >= top_p (always at least one); min_p drops tokens with p < min_p * p_max.
    - xtc ("exclude top choices"): with probability xtc_probability, removes every token with
      p >= xtc_threshold except the least probable of them (when two or more are).
    - temperature (0 = greedy); with dynatemp_range > 0 it is llama.cpp's dynamic temperature: within
      [temperature - range, temperature + range], placed by (normalised entropy of the candidates
      left) ** dynatemp_exponent.
    Each step is off at its default (llama.cpp's): top_k=0, top_p=1, min_p=0, typical_p=1,
    repeat_penalty=1 with zero presence/frequency, dry_multiplier=0, xtc_probability=0,
    top_n_sigma <= 0, dynatemp_range=0.

    mirostat=1 or 2 replaces the chain as llama.cpp does: temperature, then Mirostat (tau: the target
    surprise in bits, eta: its learning rate), whose state `mu` belongs to this sampler's sequence.

    Draws use numpy's default_rng(seed), XTC's coin its own generator from the same seed; seed None is
    nondeterministic. `distribution` gives the probabilities `sample` draws from without drawing: for
    XTC the mixture over its coin ((1 - xtc_probability) of the distribution without it plus
    xtc_probability of the one with it); for Mirostat the one its current mu gives (called with the
    row `sample` was just given, the one that draw used: mu before its update).

    tokenizer: the model's (`token_bytes`, `encode`, `vocab_size`), needed only for DRY's breakers.
    """

    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0,
                 presence_penalty=0.0, frequency_penalty=0.0, penalty_last_n=64, seed=None, *,
                 dynatemp_range=0.0, dynatemp_exponent=1.0, typical_p=1.0, top_n_sigma=-1.0,
                 xtc_probability=0.0, xtc_threshold=0.1, dry_multiplier=0.0, dry_base=1.75,
                 dry_allowed_length=2, dry_penalty_last_n=64, dry_sequence_breakers=DRY_SEQUENCE_BREAKERS,
                 mirostat=0, mirostat_tau=5.0, mirostat_eta=0.1, samplers=None, tokenizer=None):
        self.temperature = _check_temperature(temperature)
        self.top_k = _check_range("top_k", top_k, 0, integer=True, hint="use 0 to turn top-k off")
        self.top_p = _check_top_p(top_p)
        self.min_p = _check_range("min_p", min_p, 0, 1, hint="use 0 to turn min-p off")
        self.repeat_penalty = _check_number("repeat_penalty", repeat_penalty)
        if self.repeat_penalty <= 0:
            raise LlamarunError(f"repeat_penalty must be > 0, got {self.repeat_penalty}; "
                                "use 1 to turn it off.")
        self.presence_penalty = _check_number("presence_penalty", presence_penalty)
        self.frequency_penalty = _check_number("frequency_penalty", frequency_penalty)
        self.penalty_last_n = _check_range("penalty_last_n", penalty_last_n, 0, integer=True,
                                           hint="use 0 to turn the penalties off")
        self.seed = _check_seed(seed)
        self.dynatemp_range = _check_range("dynatemp_range", dynatemp_range, 0, hint="use 0 to turn it off")
        self.dynatemp_exponent = _check_range("dynatemp_exponent", dynatemp_exponent, 0)
        self.typical_p = _check_range("typical_p", typical_p, 0, 1, hint="use 1 to turn typical-p off")
        self.top_n_sigma = _check_number("top_n_sigma", top_n_sigma)      # <= 0: off, as llama.cpp
        self.xtc_probability = _check_range("xtc_probability", xtc_probability, 0, 1, hint="use 0 to turn XTC off")
        self.xtc_threshold = _check_range("xtc_threshold", xtc_threshold, 0, 1)   # > 0.5: off, as llama.cpp
        self.dry_multiplier = _check_range("dry_multiplier", dry_multiplier, 0, hint="use 0 to turn DRY off")
        self.dry_base = _check_range("dry_base", dry_base, 1)
        self.dry_allowed_length = _check_range("dry_allowed_length", dry_allowed_length, 0, integer=True)
        self.dry_penalty_last_n = _check_range("dry_penalty_last_n", dry_penalty_last_n, 0, integer=True,
                                               hint="use 0 to turn DRY off")
        self.dry_sequence_breakers = _check_breakers(dry_sequence_breakers)
        self.mirostat = _check_integer("mirostat", mirostat)
        if self.mirostat not in (0, 1, 2):
            raise LlamarunError(f"mirostat must be 0 (off), 1 (Mirostat) or 2 (Mirostat 2.0), got {self.mirostat}.")
        self.mirostat_tau = _check_range("mirostat_tau", mirostat_tau, 0)
        self.mirostat_eta = _check_range("mirostat_eta", mirostat_eta, 0)
        self.samplers = parse_samplers(samplers)

        self.rng = np.random.default_rng(self.seed)
        # XTC's coin from its own generator: turning XTC on leaves the draws' sequence of numbers alone
        self.xtc_rng = np.random.default_rng(None if self.seed is None else (self.seed, 1))
        self.mu = 2.0 * self.mirostat_tau          # Mirostat's surprise bound (llama.cpp starts at 2 tau)
        self._last_draw = None                     # (row, history length, mu): what the last draw used
        self.dry_breakers = {}
        if self._dry_active() and self.dry_sequence_breakers:
            if tokenizer is None:
                raise LlamarunError("DRY's sequence breakers are text: give the sampler the model's tokenizer "
                                    "(tokenizer=), or dry_sequence_breakers=[] for none.")
            self.dry_breakers = dry_breaker_table(tokenizer, self.dry_sequence_breakers)
        # greedy: the temperature step keeps the argmax and no random number is drawn
        self.greedy = (self.temperature == 0 and self.dynatemp_range == 0 and self.mirostat == 0
                       and "temperature" in self.samplers)

    # --- the steps

    def _penalties_active(self) -> bool:
        return self.penalty_last_n > 0 and (self.repeat_penalty != 1.0 or self.presence_penalty != 0.0
                                            or self.frequency_penalty != 0.0)

    def _dry_active(self) -> bool:
        return self.dry_multiplier != 0 and self.dry_penalty_last_n > 0

    def _reshapes_argmax(self, history) -> bool:
        """Whether a step of the chain may move a greedy draw off the logits' argmax: the penalties (with
        a history), DRY, typical-p and XTC (the truncations keep the argmax)."""
        return ((self._penalties_active() and len(history) > 0) or self._dry_active() or self.typical_p < 1
                or self._xtc_active())

    def _xtc_active(self) -> bool:
        return self.xtc_probability > 0 and self.xtc_threshold <= 0.5 and "xtc" in self.samplers

    def penalize(self, logits, history):
        """The logits after the repeat / presence / frequency penalties (a copy when changed)."""
        if not self._penalties_active() or len(history) == 0:
            return logits
        ids, seen = self._penalized(logits, history)
        out = logits.copy()          # only the seen entries change: no float64 copy of the vocab
        out[ids] = seen
        return out

    def _penalized(self, logits, history):
        """The ids in the penalty window and their penalised logits (float64)."""
        window = np.asarray(history[-self.penalty_last_n:], dtype=np.int64)
        if window.min() < 0 or window.max() >= logits.size:
            raise ValueError(f"history holds token ids outside the vocabulary of {logits.size}")
        ids, counts = np.unique(window, return_counts=True)
        seen = logits[ids].astype(np.float64)
        # llama.cpp: dividing a negative logit would raise it, so negative ones are multiplied.
        seen = np.where(seen > 0, seen / self.repeat_penalty, seen * self.repeat_penalty)
        return ids, seen - (self.presence_penalty + self.frequency_penalty * counts)

    def _penalties(self, c, row, history):
        if not self._penalties_active() or len(history) == 0:
            return
        if c.ids is None:
            c.z, c.own = self.penalize(c.z, history), True
            return
        ids, seen = self._penalized(row, history)          # ids ascending
        hit = np.flatnonzero(np.isin(c.ids, ids))
        c.writable()[hit] = seen[np.searchsorted(ids, c.ids[hit])]

    def _dry(self, c, history):
        if not self._dry_active():
            return
        for token, penalty in dry_penalties(history, self.dry_multiplier, self.dry_base, self.dry_allowed_length,
                                            self.dry_penalty_last_n, self.dry_breakers).items():
            if c.ids is None:
                if token < c.size:
                    c.writable()[token] -= penalty
            else:
                c.writable()[c.ids == token] -= penalty

    def _top_n_sigma(self, c):
        if self.top_n_sigma <= 0:
            return
        c.drop_banned()
        if c.size <= 1:
            return
        z = c.z.astype(np.float64) / c.temperature
        c.keep(np.flatnonzero(z >= z.max() - self.top_n_sigma * z.std()))

    def _top_k(self, c):
        """The k largest logits (of equal ones, the lower ids), in one pass over the row
        (kernels/select.py); a full sort of the vocabulary would cost milliseconds. Banned tokens (-inf:
        a grammar's mask, an ignored end token) rank last, and are dropped after: so k counts tokens
        that can be drawn, without a pass over the whole row to drop them first."""
        if 0 < self.top_k < c.size:
            c.keep(np.sort(top_k_positions(c.z, self.top_k)))     # in id order, as the row was
            c.drop_banned()

    def _typical(self, c):
        if self.typical_p >= 1:
            return
        c.drop_banned()
        if c.size <= 1:
            return
        p = c.probabilities()
        surprise = -np.log(p, out=np.full_like(p, np.inf), where=p > 0)
        entropy = float(np.sum(p[p > 0] * surprise[p > 0]))
        order = np.argsort(np.abs(surprise - entropy), kind="stable")    # the most typical first
        over = np.flatnonzero(np.cumsum(p[order]) > self.typical_p)
        c.keep(order[:over[0] + 1] if over.size else order)

    def _top_p(self, c):
        """The smallest set of the most probable candidates whose mass is >= top_p.

        Only that set needs sorting, so take the m heaviest (m = 64, 512, ...; kernels/select.py) until
        they hold enough mass, then sort just those (ties in token order).
        """
        if self.top_p >= 1.0:
            return
        weights = c.weights()
        needed = self.top_p * weights.sum(dtype=np.float64)
        heaviest = np.arange(weights.size)
        m = 64
        while m < weights.size:
            top = top_k_positions(weights, m)
            if weights[top].sum(dtype=np.float64) >= needed:
                heaviest = top
                break
            m *= 8
        heaviest = heaviest[np.lexsort((c.token_ids()[heaviest], -weights[heaviest]))]
        cumulative = np.cumsum(weights[heaviest], dtype=np.float64)
        n_keep = min(int(np.searchsorted(cumulative, needed)) + 1, heaviest.size)
        c.keep(heaviest[:n_keep])

    def _min_p(self, c):
        if self.min_p > 0:
            c.keep(np.flatnonzero(c.weights() >= self.min_p))   # p >= min_p * p_max

    def _xtc(self, c, fires):
        if not self._xtc_active():
            return
        c.drop_banned()
        if c.size < 2:
            return
        if fires is None:                          # llama.cpp: the coin is drawn only where XTC could act
            fires = self.xtc_rng.random() <= self.xtc_probability
        if not fires:
            return
        p = c.probabilities()
        order = np.lexsort((c.token_ids(), -p))    # most probable first
        above = int(np.count_nonzero(p >= self.xtc_threshold))
        if above >= 2:                             # keep the least probable of the top choices
            c.keep(order[above - 1:])

    def _temperature(self, c):
        if self.dynatemp_range > 0:
            c.drop_banned()
            if c.size <= 1:
                return
            low = max(0.0, self.temperature - self.dynatemp_range)
            high = self.temperature + self.dynatemp_range
            p = c.probabilities()
            p = p[p > 0]
            normalised = float(-(p * np.log(p)).sum()) / math.log(c.size)
            temperature = low + (high - low) * normalised ** self.dynatemp_exponent
        else:
            temperature = self.temperature
        if temperature <= 0:
            c.keep_argmax()
        else:
            c.temperature *= temperature

    # --- the chain

    def _chain(self, logits, history, xtc_fires=None) -> _Candidates:
        c = _Candidates(_as_logits(logits))
        for name in self.samplers:
            if name == "penalties":
                self._penalties(c, logits, history)
            elif name == "dry":
                self._dry(c, history)
            elif name == "typ_p":
                self._typical(c)
            elif name == "xtc":
                self._xtc(c, xtc_fires)
            elif name == "temperature":
                self._temperature(c)
                if self.greedy:                    # one candidate left: nothing after can change it
                    break
            elif not self.greedy:                  # top_n_sigma, top_k, top_p, min_p keep the argmax
                getattr(self, "_" + name)(c)
        return c

    def candidates(self, logits_row, history=(), xtc_fires=None):
        """The tokens that can be drawn (ascending token ids) and their renormalised float64
        probabilities. Greedy gives the single argmax of the penalised logits. xtc_fires: whether
        XTC acts this time (None: its coin decides)."""
        if self.mirostat:
            return self._mirostat_candidates(_as_logits(logits_row), self.mu)
        c = self._chain(logits_row, history, xtc_fires)
        order = np.argsort(c.token_ids(), kind="stable")
        ids, c.z = c.token_ids()[order], c.z[order]
        return ids, (c.probabilities() if c.size > 1 else np.ones(1))

    def distribution(self, logits_row, history=()) -> np.ndarray:
        """float64 probabilities over the vocabulary that `sample` draws from (one-hot if greedy)."""
        dist = np.zeros(np.shape(logits_row)[-1])
        if self.mirostat:
            last = self._last_draw
            mu = last[2] if last is not None and last[0] is logits_row and last[1] == len(history) else self.mu
            ids, probs = self._mirostat_candidates(_as_logits(logits_row), mu)
            dist[ids] = probs
            return dist
        if self._xtc_active():                     # the mixture over XTC's coin
            for fires, weight in ((False, 1 - self.xtc_probability), (True, self.xtc_probability)):
                ids, probs = self.candidates(logits_row, history, xtc_fires=fires)
                dist[ids] += weight * probs
            return dist
        ids, probs = self.candidates(logits_row, history)
        dist[ids] = probs
        return dist

    def draws_argmax(self, history=()) -> bool:
        """Whether the next draw is the logits' argmax, whatever they are: greedy, with no step of the
        chain that may move it."""
        return self.greedy and not self._reshapes_argmax(history)

    def sample(self, logits_row, history=()) -> int:
        """Draw the next token; one uniform number per draw unless greedy."""
        if self.draws_argmax(history):
            return argmax_first(_as_logits(logits_row))     # what the chain keeps, without its steps' arrays
        if self.mirostat:
            self._last_draw = (logits_row, len(history), self.mu)
        ids, probs = self.candidates(logits_row, history)
        if self.greedy:
            return int(ids[0])
        cdf = np.cumsum(probs)
        i = min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), ids.size - 1)
        if self.mirostat:                          # move mu toward the target surprise
            self.mu -= self.mirostat_eta * (-math.log2(probs[i]) - self.mirostat_tau)
        return int(ids[i])

    # --- Mirostat

    def _mirostat_candidates(self, logits, mu):
        """llama.cpp's chain with mirostat on: temperature, then Mirostat's truncation at surprise mu."""
        c = _Candidates(logits)
        c.drop_banned()
        if self.temperature <= 0:
            c.keep_argmax()
        else:
            c.temperature = self.temperature
        p = c.probabilities()
        if self.mirostat == 2:
            # Mirostat 2.0: keep the tokens whose surprise -log2 p is at most mu (at least the top one)
            keep = np.flatnonzero(p >= 2.0 ** -mu)
            c.keep(keep if keep.size else np.argmax(p)[None])
        else:
            k = self._mirostat1_k(p, mu, logits.size)
            if k < p.size:
                c.keep(top_k_positions(p, k))
        order = np.argsort(c.token_ids(), kind="stable")
        ids, c.z = c.token_ids()[order], c.z[order]
        return ids, (c.probabilities() if c.size > 1 else np.ones(1))

    @staticmethod
    def _mirostat1_k(p, mu, n_vocab, m=100) -> int:
        """Mirostat 1: top-k with k from the Zipf exponent s estimated on the m most probable tokens."""
        top = -np.sort(-(p[top_k_positions(p, m)] if p.size > m else p))   # descending
        pairs = min(m - 1, top.size - 1)
        if pairs < 1:
            return 1
        i = np.arange(pairs)
        t = np.log((i + 2) / (i + 1))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            b = np.log(top[:pairs] / top[1:pairs + 1])
            s = float(np.sum(t * b) / np.sum(t * t))
            epsilon = s - 1
            k = ((epsilon * 2.0 ** mu) / (1 - n_vocab ** -epsilon)) ** (1 / s)
        return max(int(k), 1) if math.isfinite(k) else p.size


# ----------------------------------------------------------------------------------------------
# DRY: llama.cpp's llama_sampler_dry (ported from Koboldcpp), with numpy in place of the Z-algorithm

MAX_BREAKER_BYTES, MAX_BREAKER_TAIL = 40, 20       # llama.cpp's limits on a breaker
_BREAKER_TABLES = weakref.WeakKeyDictionary()      # tokenizer -> {breakers: table}: a vocabulary scan each


def dry_breaker_table(tokenizer, breakers) -> dict[int, tuple[tuple[int, ...], ...]]:
    """llama.cpp's processed sequence breakers: {head token: tails}. A token whose text contains a
    breaker is a head with the empty tail; a token whose text ends with the breaker's beginning is a
    head whose tail is the rest of the breaker, tokenized. Token texts are the tokenizer's bytes."""
    key = tuple(breakers)
    try:
        tables = _BREAKER_TABLES.setdefault(tokenizer, {})
    except TypeError:                               # not weakly referable: no cache
        tables = {}
    if key not in tables:
        tables[key] = _scan_breakers(tokenizer, key)
    return tables[key]


def _scan_breakers(tokenizer, breakers):
    pieces = [tokenizer.token_bytes(t) for t in range(tokenizer.vocab_size)]
    heads: dict[int, list] = {}
    for breaker in breakers:
        text = breaker.encode("utf-8")[:MAX_BREAKER_BYTES]
        for token, piece in enumerate(pieces):
            if text in piece:
                tails = [()]
            else:
                tails, at = [], piece.find(text[:1])
                while at >= 0:
                    if text.startswith(piece[at:]):       # the piece ends with the breaker's start
                        rest = text[len(piece) - at:].decode("utf-8", errors="replace")
                        tails.append(tuple(tokenizer.encode(rest, bos=False, special=False)[:MAX_BREAKER_TAIL]))
                    at = piece.find(text[:1], at + 1)
            for tail in tails:
                if tail not in heads.setdefault(token, []):
                    heads[token].append(tail)
    return {token: tuple(tails) for token, tails in heads.items() if tails}


def dry_penalties(history, multiplier, base, allowed_length, last_n, breakers) -> dict[int, float]:
    """{token: the amount DRY takes from its logit} after `history`'s last `last_n` tokens."""
    n = min(len(history), last_n)
    if n <= allowed_length:
        return {}
    window = np.asarray(history[-n:], dtype=np.int64)
    limit = _repeat_limit(window, breakers)
    if limit < allowed_length:
        return {}
    # repeats[p]: how many tokens ending at p equal the window's last ones (at most `limit`)
    repeats = np.zeros(n - 1, np.int64)
    alive = np.arange(n - 1)
    for back in range(limit):
        alive = alive[alive >= back]
        alive = alive[window[alive - back] == window[n - 1 - back]]
        if not alive.size:
            break
        repeats[alive] += 1
    # the token after each long enough repeat would extend it: its longest repeat decides
    longest: dict[int, int] = {}
    for p in np.flatnonzero(repeats >= allowed_length):
        token = int(window[p + 1])
        longest[token] = max(longest.get(token, 0), int(repeats[p]))
    # base ** exponent is clamped below float32's overflow, as llama.cpp does
    max_exponent = int(88.7228391 / math.log(base)) if base > 1.000001 else 0
    out = {}
    for token, length in longest.items():
        if () in breakers.get(token, ()):                 # a breaker itself is never penalised
            continue
        exponent = length - allowed_length
        if max_exponent > 0:
            exponent = min(exponent, max_exponent)
        out[token] = multiplier * base ** exponent
    return out


def _repeat_limit(window, breakers) -> int:
    """How far back a repeat may reach: to just after the most recent sequence breaker."""
    n = len(window)
    for i in range(n):                              # i tokens from the end
        tails = breakers.get(int(window[n - 1 - i]))
        if not tails:
            continue
        matched = [len(t) for t in tails if len(t) <= i and all(window[n - i + o] == t[o] for o in range(len(t)))]
        if matched:
            return i - max(matched)
    return n


# ----------------------------------------------------------------------------------------------

_LLAMA2C_PARAMS = ("temperature", "top_p", "seed")
_DEFAULT_PARAMS = tuple(inspect.signature(Sampler).parameters)


def make_sampler(kind: str = "default", tokenizer=None, **params):
    """Build a sampler: kind "default" -> Sampler(**params), "llama2c" -> Llama2cSampler.

    Parameters given as None count as not given (so a CLI can pass every flag through). tokenizer:
    the model's, which the default sampler's DRY reads its sequence breakers with.
    """
    params = {name: value for name, value in params.items() if value is not None}
    if kind == "default":
        unknown = sorted(set(params) - set(_DEFAULT_PARAMS))
        if unknown:
            raise LlamarunError(f"the default sampler does not take {', '.join(unknown)}; "
                                f"it accepts {', '.join(_DEFAULT_PARAMS)}.")
        return Sampler(**params, tokenizer=tokenizer) if "tokenizer" not in params else Sampler(**params)
    if kind == "llama2c":
        unknown = sorted(set(params) - set(_LLAMA2C_PARAMS))
        if unknown:
            raise LlamarunError(f"the llama2c sampler does not take {', '.join(unknown)}; "
                                "it accepts only temperature, top_p and seed.")
        return Llama2cSampler(**params)
    raise LlamarunError(f"unknown sampler kind {kind!r}; choose 'default' or 'llama2c'.")
