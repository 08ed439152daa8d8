"""Continuous batching: many requests decoded together, one forward pass per step.

The scheduler owns the model and a KV cache with one slot per sequence (`--parallel` slots of
`--ctx` positions each). One worker thread runs `step()` in a loop; between two steps it admits
waiting requests into free slots, so a new request never waits for the others to finish. A step
is one `Transformer.forward` over one `Batch` holding

- one decode row per running sequence (the token it drew last step, at its next position), then
- a chunk of the prompt of a sequence still being prefilled (its logits only at the prompt's end).

Chunked prefill: while some sequences are decoding, a long prompt is fed a chunk per step, sized
so that a step costs at most about (1 + PREFILL_SHARE) times a decode-only step (measured, per
number of decode rows, as the machine runs), so running streams keep their pace while the prompt
goes in. With nobody decoding, the prompt goes in chunks of PREFILL_CHUNK tokens (on the fast path:
of the model's `matvec_rows`, which its int8 kernels read faster than BLAS reads tiles).

Prompt cache (llama.cpp's `cache_prompt`): a slot keeps the keys and values of the last sequence it
held. A new request goes to the free slot whose cached tokens share the longest prefix with its
prompt, and only the rest of the prompt is run: a chat's next turn resends the whole conversation,
and requests to one server mostly open with the same system prompt. Cached positions are the ones
the same tokens at the same positions produced. The kernels compute each row independently of the
others in its batch, so a reused prefix gives what running it again would give; where a prompt
went through BLAS (the exact path's chunks of PREFILL_CHUNK), the same up to rounding.

Choices (OpenAI's `n`): the request's other choices ride with it as `followers`, each in a slot of
its own with its own sampler. Only the first runs the prompt; when its prompt's logits come, the
followers copy its slot's keys and values (`KVCache.copy_prefix`) and draw their first tokens from
the same row: the prompt is computed once for all of them.

Constrained sequences (a grammar's `Matcher`, llamarun/structured.py) share the batch with the
others. The tokens a grammar forces are taken without drawing and run with the next step's row
(a row of several tokens, logits at its end). Each constrained row's mask of allowed tokens
depends only on the tokens taken so far, so it is computed in a worker thread while the forward
runs (llguidance releases the GIL; `structured.fill_masks` spreads the rows over its own threads),
and the matcher keeps it for its decoder's draw.

The handlers (async, in the event loop) talk to the worker through `submit` and each request's
`emit` callback, which the worker calls for every event; the handler makes it thread-safe
(loop.call_soon_threadsafe). Cancelling a request (a client that went away) frees its slot at the
next step.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numba
import numpy as np

from ..chat import common_prefix_length
from ..decoding import Decoder, LogitsProcessor, TokenEvent, first_token
from ..logprobs import TokenLogprob
from ..model import MATVEC_ROWS, Batch
from ..plan import MIN_TIMING_SAMPLES, PREFILL_CHUNK, PREFILL_SHARE
from ..speculative import verify
from ..structured import fill_masks

log = logging.getLogger("llamarun.server")


class QueueFull(Exception):
    """More requests are waiting for a slot than the queue allows."""


@dataclass
class Event:
    """What the worker reports for a request: text released by one drawn token, or the end."""
    text: str = ""
    logprob: TokenLogprob | None = None  # the drawn token's (when the request asked for logprobs)
    finish_reason: str | None = None     # last event: "stop", "length", "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0               # prompt tokens whose keys and values the slot already held
    drafted: int = 0                     # speculative decoding: draft tokens verified
    accepted: int = 0                    # ... and kept


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampler: object                      # llamarun.sampling.Sampler: the request's own, with its seed
    emit: Callable[[Event], None]        # called from the worker thread
    stop: tuple[str, ...] = ()
    logprobs: int | None = None          # None: no logprobs; k: the drawn token's and the top k
    ignore_eos: bool = False             # llama.cpp's extension: end-of-generation tokens are never drawn
    processors: tuple[LogitsProcessor, ...] = ()   # applied to the logits before each draw (logit_bias, ...)
    grammar: object | None = None        # llamarun.structured.Matcher: this sequence's constraint
    speculation: object | None = None    # llamarun.speculative.Speculation: this sequence's drafts, if any
    followers: list["Request"] = field(default_factory=list)   # the other choices of the same prompt (n > 1)
    cancelled: bool = False              # set by the handler; the worker frees the slot
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True


class Sequence:
    """A request in its cache slot: what is left to prefill, where it is, and its decoder (which
    draws its tokens and says when it is done, as for `Llama.stream`: llamarun/decoding.py)."""

    def __init__(self, request: Request, slot: int, tokenizer, context: int, leader: "Sequence | None" = None):
        self.request, self.slot = request, slot
        self.pending = list(request.prompt)      # prompt ids not yet run
        self.pos = 0                             # next position to fill in the slot
        self.cached = 0                          # prompt tokens found in the slot's cache
        self.next_tokens: list[int] = []         # taken (drawn, then any forced), not yet run through the model
        self.draft: list[int] = []               # the draft that runs behind them this step
        self.leader = leader                     # a follower waits for this sequence's prompt (n > 1)
        self.followers: list[Sequence] = []
        self.decoder = Decoder(tokenizer, request.sampler, request.prompt, context=context,
                               max_tokens=request.max_tokens, ignore_eos=request.ignore_eos, stop=request.stop,
                               logprobs=request.logprobs, processors=request.processors, grammar=request.grammar)

    @property
    def decoding(self) -> bool:
        return bool(self.next_tokens)

    @property
    def waiting(self) -> bool:
        """A follower whose leader has not run the prompt yet."""
        return self.leader is not None

    @property
    def generated(self) -> int:
        return len(self.decoder.completion.tokens)

    def reuse(self, n: int) -> None:
        """The slot's cache already holds the prompt's first n tokens: start after them."""
        self.cached = self.pos = n
        del self.pending[:n]

    @property
    def run_tokens(self) -> list[int]:
        """The tokens whose keys and values the slot holds, positions 0 .. pos - 1 (prompt, then the
        drawn tokens fed back; the last drawn one is never run)."""
        return self.decoder.history[:self.pos]


class Scheduler:
    """Slots, admission, chunked prefill and batched decode for one model (see the module doc)."""

    def __init__(self, llama, parallel: int = 4, ctx: int = 2048, queue: int = 64):
        if parallel < 1:
            raise ValueError("parallel must be >= 1")
        self.llama, self.model, self.tokenizer = llama, llama.model, llama.tokenizer
        self.ctx, self.queue_limit = ctx, queue
        self.cache = self.model.new_cache(n_seqs=parallel, seq_len=ctx)
        self.free = list(range(parallel))
        self.slot_tokens: list[list[int]] = [[] for _ in range(parallel)]   # what each slot's cache holds
        self.waiting: deque[Request] = deque()
        self.active: list[Sequence] = []
        self.lock = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        self.decode_seconds: dict[int, list[float]] = {}   # decode rows -> recent decode-only step times
        self.chunk: dict[int, int] = {}                     # decode rows -> prompt tokens that ride along
        self.steps = 0
        self.threads = numba.get_num_threads()
        self.ready = threading.Event()                      # set once warm_up has run
        self.masker = ThreadPoolExecutor(1, thread_name_prefix="llamarun-masks")   # grammar masks beside the forward

    # -- the handlers' side (any thread) -------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self.lock:
            if len(self.waiting) >= self.queue_limit + len(self.free):
                raise QueueFull(f"{len(self.waiting)} requests are already waiting for a slot")
            self.waiting.append(request)
            self.lock.notify()

    @property
    def parallel(self) -> int:
        return self.cache.n_seqs

    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self.run, name="llamarun-scheduler", daemon=True)
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what is still waiting or running, and end the worker."""
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        self.masker.shutdown(wait=False)
        for request in [s.request for s in self.active] + list(self.waiting):
            request.emit(Event(finish_reason="cancelled"))
        self.active, self.waiting = [], deque()

    # -- the worker ----------------------------------------------------------------------------

    def run(self) -> None:
        numba.set_num_threads(self.threads)     # numba's thread count is per thread: take the creator's
        try:
            self.warm_up()
        except Exception:                       # the requests' own steps will say what is wrong
            log.exception("the warm-up step failed")
        self.ready.set()
        while True:
            with self.lock:
                while self.running and not self.waiting and not self.active:
                    self.lock.wait()
                if not self.running:
                    return
                self.admit()
            try:
                self.step()
            except Exception:               # a bug must not hang every client: end their requests
                log.exception("a decode step failed")
                for seq in list(self.active):
                    self.finish(seq, "error")

    def warm_up(self) -> None:
        """A short prompt and a decode step through the model, in slot 0, before the first request: the
        kernels compile (the first time ever: about a minute and a half here) or load from numba's
        cache (about a second) now, while /health says the model is loading, rather than in the
        first request's time to first token. Nothing a request could reuse is left: slot 0's cached
        tokens stay unrecorded, so its keys and values are written over."""
        n = max(1, min(MATVEC_ROWS + 1, self.ctx - 1))      # past a decode batch: the exact path's prompt way too
        token = first_token(self.tokenizer)
        self.model.forward(Batch.sequence([token] * n), self.cache)
        self.model.forward(Batch.of([token], [n], [0]), self.cache)

    def admit(self) -> None:
        """Waiting requests into free slots, oldest first (called with the lock held)."""
        while self.waiting and self.free:
            request = self.waiting.popleft()
            if request.cancelled:
                request.emit(Event(finish_reason="cancelled"))
                continue
            if len(self.free) < 1 + len(request.followers):    # a request's choices start together
                self.waiting.appendleft(request)
                return
            slot, shared = self.best_slot(request.prompt)
            self.free.remove(slot)
            seq = Sequence(request, slot, self.tokenizer, self.ctx)
            seq.reuse(max(0, min(shared, len(request.prompt) - 1)))   # the prompt's last token is run: its logits
            self.active.append(seq)
            for follower in request.followers:
                slot, _ = self.best_slot(follower.prompt)
                self.free.remove(slot)
                seq.followers.append(Sequence(follower, slot, self.tokenizer, self.ctx, leader=seq))
                self.active.append(seq.followers[-1])
            for s in [seq] + seq.followers:
                self.open(s)

    def open(self, seq: Sequence) -> None:
        """Tokens a grammar forces before anything is drawn (a schema's opening '{"'): taken now,
        they run with the prompt, as its last tokens."""
        if seq.request.grammar is None:
            return
        events = seq.decoder.take_forced(seq.decoder.forced())
        seq.pending += [e.token for e in events if e.token is not None]
        self.report(seq, events)

    def best_slot(self, prompt: list[int]) -> tuple[int, int]:
        """The free slot whose cache shares the longest prefix with the prompt (the longest-free one
        among equals), and how many tokens it shares."""
        best, shared = self.free[0], -1
        for slot in self.free:
            n = common_prefix_length(self.slot_tokens[slot], prompt)
            if n > shared:
                best, shared = slot, n
        return best, shared

    def release(self, seq: Sequence, keep: bool = True) -> None:
        """Free the sequence's slot; its cache stays for the next request (unless not `keep`)."""
        self.active.remove(seq)
        with self.lock:
            self.slot_tokens[seq.slot] = seq.run_tokens if keep else []
            self.free.append(seq.slot)
        for follower in seq.followers:
            if follower.waiting:        # the leader ended before its prompt did: they run it themselves
                follower.leader = None
        seq.followers = []

    def step(self) -> None:
        """One forward: a row per decoding sequence, then a prefill chunk; sample; report."""
        for seq in [s for s in self.active if s.request.cancelled]:
            seq.request.emit(Event(finish_reason="cancelled", prompt_tokens=len(seq.request.prompt),
                                   completion_tokens=seq.generated, cached_tokens=seq.cached))
            self.release(seq)
        decoding = [s for s in self.active if s.decoding]
        prefilling = [s for s in self.active if not s.decoding and not s.waiting]
        if not decoding and not prefilling:
            return
        budget = self.prefill_budget(len(decoding))
        self.make_drafts(decoding, budget if prefilling else 0)
        rows = [(s, s.next_tokens + s.draft, s.pos) for s in decoding]
        for seq in prefilling:
            if budget <= 0:
                break
            chunk = seq.pending[:budget]
            rows.append((seq, chunk, seq.pos))
            budget -= len(chunk)

        tokens, pos, seq_ids, want = [], [], [], []
        for seq, chunk, start in rows:
            n = len(chunk)
            tokens += chunk
            pos += range(start, start + n)
            seq_ids += [seq.slot] * n
            # a decode row's last token (and its draft) give logits; the prompt's end gives the first
            wanted = len(seq.draft) + 1 if seq.decoding else int(n == len(seq.pending))
            want += [False] * (n - wanted) + [True] * wanted
        masks = self.start_masks(decoding)
        t0 = time.perf_counter()
        logits = self.model.forward(Batch.of(tokens, pos, seq_ids, want), self.cache)
        seconds = time.perf_counter() - t0
        # forced tokens riding on a decode row count as decoding: only prompt chunks steer the prefill share
        self.record_time(len(decoding), len(tokens) - sum(len(s.next_tokens) + len(s.draft) for s in decoding), seconds)
        self.steps += 1
        if masks is not None:
            masks.result()

        i = 0
        for seq, chunk, start in rows:
            seq.pos = start + len(chunk) - len(seq.draft)     # the kept part of the draft is added by advance
            if seq.decoding:
                seq.next_tokens = []
                try:
                    self.advance(seq, logits[i:i + len(seq.draft) + 1])
                except Exception:
                    log.exception("drawing a token failed")
                    self.finish(seq, "error")
                i += len(seq.draft) + 1
                continue
            else:
                del seq.pending[:len(chunk)]
                if seq.pending:
                    continue                                  # more prompt to go: no logits yet
                self.fork(seq)
            for s in [seq] + seq.followers:
                try:
                    # a decoder's processors change the row it draws from: one copy for each choice
                    self.advance(s, logits[i:i + 1].copy() if seq.followers else logits[i:i + 1])
                except Exception:       # one request's draw (its sampler, its processors) ends only that request
                    log.exception("drawing a token failed")
                    self.finish(s, "error")
            seq.followers = []
            i += 1

    def start_masks(self, decoding: list[Sequence]):
        """The masks of the constrained decode rows, computed in the masker thread while the forward
        runs (a future; None when no row is constrained). The rows that finish a prompt are left to
        their decoders: their first mask is one per request."""
        matchers = [s.request.grammar for s in decoding if s.request.grammar is not None]
        return self.masker.submit(fill_masks, matchers) if matchers else None

    def fork(self, seq: Sequence) -> None:
        """seq's prompt has run: its followers take its keys and values and go on from there."""
        for follower in seq.followers:
            if follower not in self.active or follower.request.cancelled or not follower.waiting:
                continue
            self.cache.copy_prefix(seq.slot, follower.slot, seq.pos)
            follower.leader, follower.pending, follower.pos = None, [], seq.pos
            follower.cached = seq.cached
        seq.followers = [f for f in seq.followers if f in self.active and not f.pending]

    def prefill_budget(self, n_decoding: int) -> int:
        """How many prompt tokens ride along with `n_decoding` decode rows in this step.

        Nobody decoding: a full chunk. Otherwise a chunk steered by what the steps cost: it starts at
        as many tokens as there are decode rows, grows by a quarter (at least one) while a step stays
        within (1 + PREFILL_SHARE) decode-only steps of this many rows, and shrinks by a third when a
        step goes over. (Growing by one token a step, short prompts joining running streams took many
        steps to get in, and the streams ended that many steps apart: docs/performance.md.) No prompt
        rides along until decode-only steps of this size have been timed (the first steps after the
        number of streams changes).
        """
        # Beyond the model's matvec_rows BLAS takes over, with a fixed cost per forward that a small
        # chunk does not repay, and (fast path) float activations where the kernels quantize them: a
        # prompt that fits the kernels is read as `Llama.generate` reads it alone.
        rows = self.model.matvec_rows
        if n_decoding == 0:
            return rows if rows > MATVEC_ROWS else PREFILL_CHUNK
        if len(self.decode_seconds.get(n_decoding, ())) < MIN_TIMING_SAMPLES:
            return 0
        room = rows - n_decoding if n_decoding < rows else PREFILL_CHUNK
        return max(1, min(room, self.chunk.get(n_decoding, n_decoding)))

    def record_time(self, n_decoding: int, n_prefill: int, seconds: float) -> None:
        """Time a step: decode-only steps set the pace, mixed steps steer the prefill chunk."""
        if n_prefill == 0:
            times = self.decode_seconds.setdefault(n_decoding, [])
            times.append(seconds)
            del times[:-8]                                  # the recent ones: the machine's load changes
        elif n_decoding:
            target = (1 + PREFILL_SHARE) * float(np.median(self.decode_seconds[n_decoding]))
            chunk = self.chunk.get(n_decoding, n_decoding)
            if seconds <= target:       # a prompt's last piece may be shorter than the chunk: keep the chunk
                self.chunk[n_decoding] = max(chunk, n_prefill + max(1, n_prefill // 4))
            else:
                self.chunk[n_decoding] = max(1, n_prefill * 2 // 3)

    def make_drafts(self, decoding: list[Sequence], prefill: int) -> None:
        """Each speculating sequence's draft for this step, within its context and max_tokens, and
        within the batch sizes whose rows are computed independently of each other (with the
        `prefill` tokens that ride along), so that each row's draw is what it is without drafts."""
        room = self.model.matvec_rows - prefill - sum(len(s.next_tokens) for s in decoding)
        for seq in decoding:
            seq.draft = []
            if seq.request.speculation is None or seq.decoder.done:
                continue
            fits = min(room, self.ctx - seq.pos - len(seq.next_tokens), seq.request.max_tokens - seq.generated - 1)
            if fits >= 1:
                seq.draft = seq.request.speculation.draft(seq.decoder.history, fits, seq.decoder.end,
                                                           ahead=len(seq.next_tokens))
                room -= len(seq.draft)

    def advance(self, seq: Sequence, rows: np.ndarray) -> None:
        """Hand the sequence's logits rows (its last token's, then its draft's) to its decoder and
        report the tokens it takes (the draft's agreeing part, then one drawn), then the tokens its
        grammar forces after them (taken without drawing, run with the last in the next step); end
        the sequence if one of them was its last."""
        events, kept = verify(seq.decoder, rows, seq.draft, seq.request.speculation)
        # the kept draft tokens have run (their keys and values are in the slot; the rejected ones' are
        # written over from here): the tokens taken after them run next
        seq.pos += kept
        if not seq.decoder.done:
            events += seq.decoder.take_forced(seq.decoder.forced())
        seq.next_tokens = [e.token for e in events[kept:] if e.token is not None]
        self.report(seq, events)

    def report(self, seq: Sequence, events: list[TokenEvent]) -> None:
        """Emit the events of the tokens a sequence took; the last may end it."""
        for event in events:
            if event.finish_reason:
                self.finish(seq, event.finish_reason, event.text, event.logprob)
                return
            seq.request.emit(Event(event.text, event.logprob))

    def finish(self, seq: Sequence, reason: str, text: str = "", logprob: TokenLogprob | None = None) -> None:
        completion = seq.decoder.completion
        seq.request.emit(Event(text, logprob, reason, len(seq.request.prompt), seq.generated, seq.cached,
                               completion.drafted, completion.accepted))
        self.release(seq, keep=reason != "error")     # a failed step may have left its cache half written
