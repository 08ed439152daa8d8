"""How many threads a one-call forward runs on: every thread numba has, unless fewer are faster now.

Why: the one-call forward (kernels/step.py) has its threads meet at a barrier four times a layer.
When another process keeps one of two cores busy, one of our two threads is often off its core, and
the other waits for it at every barrier, and now and then for a whole time slice: SmolLM2's decode
fell to under half of what one thread does under the same competition (docs/performance.md).
Neither count is right everywhere, so it is measured as the run goes: each batch size keeps the recent times of
its forwards at the count in use and, now and then, runs a few at the other count (all threads, or
half of them), stopping at the first that is slower than ours; it switches when the other is clearly
faster. On all threads it tries fewer only when its times are well above their best (near it:
nothing competes), so a quiet machine seldom pays for a trial. While a choice keeps winning, its
trials come less often (the interval doubles up to MAX_INTERVAL); after a switch they come often
again, to notice when the competition ends.

LLAMARUN_ADAPT_THREADS=0 turns this off (every forward on all of numba's threads), for benchmarks
that measure a fixed count.
"""
from __future__ import annotations

import os
import statistics
import time
from collections import deque

import numba

from . import compiling

ADAPT = os.environ.get("LLAMARUN_ADAPT_THREADS", "1") != "0"
SETTLE_CALLS = 2       # a trial's first forwards, not counted: the OS moves threads between cores after a switch
TRIAL_CALLS = 5        # forwards at the other count in one trial, at most (see record)
FIRST_INTERVAL = 16    # forwards before the first trial, and after a switch
MAX_INTERVAL = 1024    # the longest stretch between trials while the choice keeps winning
MARGIN = 0.85          # fewer threads win when their mean time is under this share of all threads'
MARGIN_UP = 0.7        # all threads win back under this share of fewer threads' time: a short trial on a busy
                       # machine often misses the long stalls of two threads, and would bring them back too soon
CALM = 1.3             # all threads' mean time within this factor of their best: nothing competes, no trial yet
HISTORY = 16           # recent times kept per count


class ThreadChoice:
    """The thread count for forwards of one batch size, chosen between `most` and half of it by their
    mean measured times (see the module's doc)."""

    def __init__(self, most: int, others_running=lambda: None):
        self.counts = (most, max(1, most // 2))
        self.others_running = others_running            # () -> runnable threads not ours, or None: unknown
        self.current = 0                                # index into counts
        self.times = (deque(maxlen=HISTORY), deque(maxlen=HISTORY))
        self.interval = FIRST_INTERVAL
        self.since_trial = 0
        self.trial_left = 0
        self.best = float("inf")                        # the fastest forward on all threads so far
        self.calls = 0                                  # forwards recorded

    @property
    def experienced(self) -> bool:
        """Whether this batch size has run enough forwards to choose for itself."""
        return self.calls >= FIRST_INTERVAL

    def follow(self, threads: int) -> None:
        """Run at `threads` (what the machine's experienced batch sizes chose last), until experienced."""
        current = self.counts.index(threads) if threads in self.counts else 0
        if current != self.current:
            self.current = current
            self.times[current].clear()

    def next(self) -> int:
        """The thread count for the next forward."""
        return self.counts[1 - self.current] if self.trial_left else self.counts[self.current]

    def record(self, threads: int, seconds: float) -> None:
        """The time the forward took with `threads` threads (the count next() gave)."""
        if self.trial_left:
            counted = self.trial_left <= TRIAL_CALLS - SETTLE_CALLS
            if counted:
                self.times[1 - self.current].append(seconds)
            self.trial_left -= 1
            # a counted call slower than our mean: the other count will not win this time, stop trying
            if counted and seconds > statistics.fmean(self.times[self.current]):
                self.trial_left = 0
            if not self.trial_left:
                self._decide()
            return
        ours = self.times[self.current]
        ours.append(seconds)
        self.calls += 1
        self.since_trial += 1
        if self.since_trial < self.interval or len(ours) < HISTORY // 2:
            return
        self.since_trial = 0
        if self.current == 0:
            self.best = min(self.best, min(ours))
        # on all threads, recent times near their best say nothing takes our cores: a trial would only cost (a
        # busy machine's forwards take longer on average, with now and then one as fast as ever: the
        # waits at the barriers come and go); trials still come, ever more rarely
        if self.current == 0 and statistics.fmean(list(ours)[-HISTORY // 2:]) <= CALM * self.best:
            self.interval = min(2 * self.interval, MAX_INTERVAL)
            return
        # on fewer threads, a trial of all of them on a busy machine is costly (the idle thread waits
        # for a core: its first forwards took 20-100 times a normal one): not while the OS still
        # counts as many other runnable threads as we would add
        others = self.others_running()
        if self.current == 1 and others is not None and others >= self.counts[0] - self.counts[1]:
            self.interval = min(2 * self.interval, MAX_INTERVAL)
            return
        self.trial_left = TRIAL_CALLS
        self.times[1 - self.current].clear()

    def _decide(self) -> None:
        # means, not medians: a busy machine's few long stalls are much of its time
        ours = statistics.fmean(self.times[self.current])
        theirs = statistics.fmean(self.times[1 - self.current])
        if theirs < (MARGIN if self.current == 0 else MARGIN_UP) * ours:
            self.current = 1 - self.current
            self.interval = FIRST_INTERVAL
            self.times[1 - self.current].clear()        # the loser's history is of another time
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)


def others_running() -> int | None:
    """Threads runnable on the machine now, less the one asking (Linux's /proc/loadavg; None elsewhere)."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


class AdaptiveThreads:
    """The thread counts of one model's one-call forwards, a ThreadChoice per batch size. A batch size
    seen only a few times (a prompt before each reply) runs at the count that the experienced ones (the
    decode steps) chose last: a busy machine is busy for every size, and a prompt on all threads after
    a stretch on fewer woke the idle thread at the cost of tens of forwards."""

    def __init__(self):
        self.choices: dict[tuple[int, int], ThreadChoice] = {}
        self.chosen: dict[int, int] = {}          # numba's thread count -> the count experienced sizes chose last

    def count(self, rows: int) -> _Forward:
        """A block (`with`) that runs one forward of `rows` tokens: yields its thread count, with numba's
        count (per calling thread) set to it meanwhile, and records the time it took. A forward during
        which a kernel compiled is not recorded."""
        return _Forward(self, rows)

    def choice_for(self, rows: int, most: int) -> ThreadChoice:
        """The ThreadChoice of `rows`-token forwards with numba's `most` threads, made at the first."""
        choice = self.choices.get((rows, most))
        if choice is None:
            choice = self.choices[rows, most] = ThreadChoice(most, others_running)
        if not choice.experienced:
            choice.follow(self.chosen.get(most, most))
        return choice


class _Forward:
    """AdaptiveThreads.count's block. A class rather than a generator under contextlib: it runs around every
    decode step, right after the step has streamed the weights through the caches, and each object and
    call it makes then costs a cache miss or several (docs/performance.md, 2026-12-06 19:40)."""
    __slots__ = ("adaptive", "rows", "most", "threads", "choice", "compiles", "start", "steps")

    def __init__(self, adaptive: AdaptiveThreads, rows: int):
        self.adaptive, self.rows = adaptive, rows
        self.steps = 1          # forwards the block ran (greedy steps: kernels/step.py), set before it ends

    def __enter__(self) -> int:
        self.most = most = numba.get_num_threads()
        if not ADAPT or most == 1:
            self.choice = None
            self.threads = most
            return most
        self.choice = choice = self.adaptive.choice_for(self.rows, most)
        self.threads = threads = choice.next()
        if threads != most:
            numba.set_num_threads(threads)
        self.compiles, self.start = compiling.started(), time.perf_counter()
        return threads

    def __exit__(self, *exception) -> None:
        choice = self.choice
        if choice is None:
            return
        seconds = (time.perf_counter() - self.start) / max(self.steps, 1)
        if self.threads != self.most:
            numba.set_num_threads(self.most)
        if exception[0] is None and compiling.started() == self.compiles:
            choice.record(self.threads, seconds)
            if choice.experienced:
                self.adaptive.chosen[self.most] = choice.counts[choice.current]
