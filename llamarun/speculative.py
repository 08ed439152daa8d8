"""Speculative decoding: where drafts come from, and how long a draft to make.

The generation loop (llamarun/generation.py) asks a `Speculation` for a draft of the next few tokens,
runs [last token] + draft through the model in one forward, and hands the rows to the Decoder's
`accept` (llamarun/decoding.py), which keeps the prefix the target's own draws agree with. Two
draft sources:

- `NgramDraft` (prompt lookup, as llama.cpp's `lookup` and transformers' prompt_lookup_num_tokens):
  the sequence's last n tokens (n = 4, then 3, 2, 1) found earlier in the prompt or the output
  propose the tokens that followed them there. Free to make; right when the output copies its input.
- `ModelDraft`: a smaller (or more quantized) model with the same vocabulary decodes greedily on its
  own KV cache. It keeps the tokens its cache holds, position by position, and each draft starts by
  running only where they differ from the sequence, so a rejected draft is rolled back by
  overwriting, as the target's cache is.

Sampled output keeps the target's distribution. Speculative sampling (Leviathan et al., Chen et al.)
keeps a draft token x with probability min(1, p(x) / q(x)), p the target's distribution and q the
draft's, and otherwise draws from max(0, p - q) renormalized. Both sources here are deterministic
(a lookup, a greedy draft model): q is one-hot at x, so the rule keeps x with probability p(x) and
otherwise draws from p without x, renormalized. Drawing y from p and keeping the draft while y == x,
which is what `Decoder.accept` does (with y the token taken where they differ), gives exactly that
distribution, one draw per row as plain decoding makes; with the same seed even the same tokens.
(tests/test_speculative.py checks the distribution with a chi-square test.)

A source has `propose(tokens, n)` -> up to n ids to follow `tokens` (the sequence from position 0),
and a `kind` (all its drafts alike) or, after each proposal, the `last_kind` of the draft it made.

A draft row costs the target's forward something (each extra row's products), so a draft that keeps
failing makes decoding slower than plain: `Speculation` shrinks the draft after a rejection (to one
past what was kept), grows it while drafts are taken whole, and pauses drafting (for 4, 8, ... 64
steps, until a draft pays for its rows again) after a draft of which nothing was kept, so that
open-ended text, where drafts rarely hold, pays only the occasional probe.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .errors import LlamarunError
from .model import Batch

# The longest n-gram prompt lookup matches (llama.cpp's and transformers' default is 3). A summary quoting
# its input draws 4-gram matches that hold far more often than 3-gram ones: SmolLM2's summary with quotes
# kept 44 of 60 drafted tokens against 39 of 72 (docs/performance.md).
NGRAM_MAX = 4
DEFAULT_DRAFT_MAX = 8   # tokens a draft holds at most, unless told
# What a draft row costs the target's forward, relative to one decode step: verifying d drafted
# tokens costs about 1 + ROW_COST * d steps (SmolLM2 Q4_1: 9 rows take ~3.5 one-row steps). A draft
# pays when the tokens it gives (accepted + 1) are at least that.
ROW_COST = 0.35
FIRST_PAUSE, LONGEST_PAUSE = 4, 64     # steps without drafting after a draft that did not pay, doubling
# The int8 kernels take a forward's rows in blocks (kernels/ggml.py: eight rows at a time, then four,
# then one; the last 3 rows by the 4-row kernel, the last 6 or 7 by the 8-row one), so 3 rows cost what
# 4 do, 7 what 8 do, and 5 or 9 rows more than 4 or 8 (SmolLM2 Q4_1, a one-row step's time: 4 rows
# 1.31-1.70x, 5 rows 1.67-2.28x, 8 rows 1.97-2.70x, 9 rows 2.46-3.41x; docs/performance.md). So draft
# lengths are fitted to the blocks (Speculation._fit).
ROW_BLOCK = 4


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


class NgramDraft:
    """Prompt lookup: drafts copied from where the sequence's last tokens occurred before.

    An index maps each n-gram (n <= ngram_max) of the sequence to where the tokens after its most
    recent occurrence start, kept up to date as the sequence grows, so that a lookup costs a few
    dictionary reads a token rather than a scan of the sequence (a step of open-ended text, where
    drafts are mostly skipped, must cost nothing more than a plain one)."""

    def __init__(self, ngram_max: int = NGRAM_MAX):
        self.ngram_max = ngram_max
        self.last_kind = None       # the length of the n-gram the last draft came from
        self.seen: list[int] = []   # the sequence the index holds
        self.index: list[dict] = [{} for _ in range(ngram_max + 1)]   # [n][n-gram] -> start of what followed

    def first_schedule(self, size: int) -> tuple[int, int, int]:
        """The Schedule (first length, first pause, tolerance) of drafts from matches of `size`
        tokens: one token for the weak 1-gram matches, and a long pause when even that fails;
        longer drafts and shorter pauses for longer matches, which hold more often; for the longest,
        a pause only after two drafts that gave nothing, a copy of the input being what they are for."""
        return 2 ** (size - 1), FIRST_PAUSE * 2 ** (self.ngram_max - size), int(size == self.ngram_max)

    def propose(self, tokens: Sequence[int], n: int) -> list[int]:
        """Up to n tokens that followed the most recent earlier occurrence of the longest matching
        tail n-gram of `tokens` (the sequence from its first position; [] when nothing matches)."""
        self._index(tokens)
        length = len(tokens)
        for size in range(min(self.ngram_max, length - 1), 0, -1):
            start = self.index[size].get(tuple(tokens[length - size:]))
            if start is not None:
                self.last_kind = size
                return list(tokens[start:start + n])
        return []

    def _index(self, tokens: Sequence[int]) -> None:
        """Bring the index up to `tokens`: the n-grams that now have a token after them."""
        known = len(self.seen)
        if known > len(tokens) or list(tokens[:known]) != self.seen:     # another sequence: start again
            self.index, known = [{} for _ in range(self.ngram_max + 1)], 0
        for end in range(max(known - 1, 0), len(tokens) - 1):         # the n-gram ends at `end`
            for size in range(1, min(self.ngram_max, end + 1) + 1):
                self.index[size][tuple(tokens[end - size + 1:end + 1])] = end + 1
        self.seen = list(tokens)


class ModelDraft:
    """Greedy drafts from a smaller model with the target's vocabulary, on its own KV cache."""

    kind = "model"                      # its drafts are all of one kind (Speculation's schedules)

    def __init__(self, model, context: int):
        """model: the draft's Transformer; context: the positions the target's cache holds."""
        self.model = model
        self.cache = model.new_cache(seq_len=min(context, model.config.seq_len))
        self.ran: list[int] = []        # the ids whose keys and values its cache holds, by position

    def propose(self, tokens: Sequence[int], n: int) -> list[int]:
        """n greedy tokens after `tokens` (the sequence from its first position), fewer at the end of
        its context. Runs the ids its cache lacks (first the ones after the last agreeing position:
        that rolls back a rejected draft), then one token a forward."""
        tokens = list(tokens)
        n = min(n, self.cache.seq_len - len(tokens) + 1)
        if n < 1:
            return []
        at = min(common_prefix_length(self.ran, tokens), len(tokens) - 1)   # one id must run to give logits
        run, draft = tokens[at:], []
        while len(draft) < n:
            logits = self.model.forward(Batch.sequence(run, at), self.cache)[-1]
            draft.append(int(np.argmax(logits)))
            at, run = at + len(run), [draft[-1]]
        self.ran = tokens + draft[:-1]
        return draft


class Schedule:
    """How long a draft of one kind may be, and how many of its drafts to skip.

    length: the first draft's; first_pause: the drafts skipped after the first that gave nothing
    (doubling after each further one, up to LONGEST_PAUSE, until a draft pays for its rows again);
    tolerance: the drafts in a row that may give nothing before a pause (a copy that drifts from its
    input for a word fails one draft, and the drafts after it hold again)."""

    def __init__(self, draft_max: int, length: int | None = None, first_pause: int = FIRST_PAUSE,
                 tolerance: int = 0):
        self.draft_max = draft_max
        self.length = draft_max if length is None else min(draft_max, length)   # the next draft's, at most
        self.first_pause, self.tolerance = first_pause, tolerance
        self.pause, self.next_pause, self.misses = 0, first_pause, 0

    def skip(self) -> bool:
        """Whether to skip this draft (counting it off the pause)."""
        if self.pause > 0:
            self.pause -= 1
            return True
        return False

    def verified(self, drafted: int, accepted: int) -> None:
        """Grow the draft while drafts are taken whole, shrink it to one past what was taken, and
        pause after drafts of which nothing was kept."""
        self.length = min(self.draft_max, 2 * self.length + 2) if accepted == drafted else max(1, accepted + 1)
        if accepted + 1 >= 1 + ROW_COST * drafted:
            self.next_pause = self.first_pause
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.misses > self.tolerance:
            self.pause, self.next_pause = self.next_pause, min(2 * self.next_pause, LONGEST_PAUSE)
            self.misses = 0
            self.length = max(1, min(self.length, 2))     # the probe after the pause is short


class Speculation:
    """A draft source, and the draft length that follows how well its drafts are doing.

    Each kind of draft has its own Schedule: a draft model's is one kind; n-gram drafts are one per
    match length, as a 4-gram's continuation holds far more often than a single token's (open-ended
    text matches 1-grams everywhere, and their drafts pause, while 4-gram matches still draft)."""

    def __init__(self, source, draft_max: int = DEFAULT_DRAFT_MAX):
        check_draft_max(draft_max)
        self.source, self.draft_max = source, int(draft_max)
        self.schedules: dict = {}
        self.kind = None                       # the kind of the last draft made

    def schedule(self, kind) -> Schedule:
        if kind not in self.schedules:
            first = getattr(self.source, "first_schedule", None)
            self.schedules[kind] = Schedule(self.draft_max, *(first(kind) if first is not None else ()))
        return self.schedules[kind]

    def draft(self, tokens: Sequence[int], room: int, end: frozenset[int] = frozenset(), ahead: int = 1) -> list[int]:
        """The draft to verify after `tokens` (the sequence so far, its last id about to run), at most
        `room` tokens (what the context, max_tokens and the batch's row independence leave), and
        nothing after one of the `end` tokens (nothing after it would be drawn: verifying it costs
        rows for nothing). ahead: the rows the forward runs before the draft's (the last id, and any
        tokens a grammar forced after it); a draft that would end past a block of ROW_BLOCK rows is cut
        back to the block's end."""
        known = getattr(self.source, "kind", None)        # a source of one kind: ask it only when due
        if known is not None and self.schedule(known).skip():
            return []
        n = self._fit(self.schedule(known).length, ahead, room) if known is not None else min(self.draft_max, room)
        draft = self.source.propose(tokens, n) if n >= 1 else []
        if not draft:
            return []
        self.kind = known if known is not None else self.source.last_kind
        if known is None and self.schedule(self.kind).skip():
            return []
        draft = draft[:self._fit(self.schedule(self.kind).length, ahead, room)]
        ends = [i for i, token in enumerate(draft) if token in end]
        draft = draft[:ends[0] + 1] if ends else draft
        return draft[:self._fit(len(draft), ahead, len(draft))]      # a shorter proposal: cut back to a block

    def _fit(self, length: int, ahead: int, room: int) -> int:
        """The draft length to use for `length` (at most room) behind `ahead` rows: one more where that
        completes the first block of ROW_BLOCK rows (the block costs less than one row short of it),
        else cut back to the end of the last whole block."""
        length = min(length, room)
        rows = ahead + length
        if rows == ROW_BLOCK - 1 and length + 1 <= min(room, self.draft_max):
            return length + 1
        if rows > ROW_BLOCK and rows % ROW_BLOCK:
            return rows // ROW_BLOCK * ROW_BLOCK - ahead
        return length

    def verified(self, drafted: int, accepted: int) -> None:
        """Adapt the schedule of the last draft's kind to how much of it was kept."""
        if drafted:
            self.schedule(self.kind).verified(drafted, accepted)


def check_draft_max(draft_max) -> None:
    if isinstance(draft_max, bool) or not isinstance(draft_max, (int, np.integer)) or draft_max < 1:
        raise LlamarunError(f"draft_max (the longest draft, in tokens) must be an integer >= 1, not {draft_max!r:.40}")


def make_speculation(draft, draft_max: int | None, target) -> Speculation | None:
    """The Speculation a caller asks for: draft is None (none), "ngram", a Llama with the target's
    vocabulary, or a path that llamarun.load reads; target: the Llama that generates."""
    if draft is None:
        if draft_max is not None:
            check_draft_max(draft_max)
        return None
    draft_max = DEFAULT_DRAFT_MAX if draft_max is None else draft_max
    check_draft_max(draft_max)
    if isinstance(draft, str) and draft == "ngram":
        return Speculation(NgramDraft(), draft_max)
    from .api import Llama, load
    if isinstance(draft, (str, os.PathLike)):
        draft = load(draft)
    if not isinstance(draft, Llama):
        raise LlamarunError(f"draft must be 'ngram', a Llama or a model path, not {type(draft).__name__} {draft!r:.40}")
    if draft.config.vocab_size != target.config.vocab_size or not same_tokens(draft.tokenizer, target.tokenizer):
        raise LlamarunError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) is not the model's "
                            f"({target.config.vocab_size}): a draft model must share its tokenizer; or use ngram drafts")
    return Speculation(ModelDraft(draft.model, target.config.seq_len), draft_max)


def same_tokens(a, b) -> bool:
    """Whether two tokenizers (either may be None) spell a sample of ids alike: a draft model of
    another tokenizer with a vocabulary of the same size would propose the wrong tokens."""
    if a is None or b is None:
        return a is b
    if a is b:
        return True
    ids = np.linspace(0, a.vocab_size - 1, num=min(64, a.vocab_size), dtype=np.int64)
    return all(a.token_bytes(int(t), None) == b.token_bytes(int(t), None) for t in ids)


def verify(decoder, rows, draft: Sequence[int], speculation: "Speculation | None") -> tuple[list, int]:
    """`decoder.accept(rows, draft)`, and the draft's outcome told to its source (whose schedule adapts to
    it): what every driver does with a verify forward's rows. -> (the events taken, the draft tokens kept)"""
    before = decoder.completion.accepted
    events = decoder.accept(rows, draft)
    kept = decoder.completion.accepted - before
    if draft:
        speculation.verified(len(draft), kept)
    return events, kept
