"""How many threads a one-call forward runs on: every thread numba has, unless fewer are faster now.

Why: the one-call forward (kernels/step.py) has its threads meet at a barrier four times a layer.
When another process keeps one of two cores busy, one of our two threads is often off its core, and
the other waits for it at every barrier: SmolLM2's decode fell to about half of what one thread
does under the same competition (docs/performance.md, issue 19's contention table). Neither count
is right everywhere, so it is measured as the run goes: each batch size keeps the recent times of
its forwards at the count in use and, now and then, runs a few at the other count (all threads, or
half of them); it switches when the other is clearly faster. While a choice keeps winning, its
trials come less often (the interval doubles up to MAX_INTERVAL), so on a quiet machine they cost a
fraction of a percent; after a switch they come often again, to notice when the competition ends.

LLAMARUN_ADAPT_THREADS=0 turns this off (every forward on all of numba's threads), for benchmarks
that measure a fixed count.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections import deque

import numba

from . import compiling

ADAPT = os.environ.get("LLAMARUN_ADAPT_THREADS", "1") != "0"
TRIAL_CALLS = 3        # forwards at the other count in one trial
FIRST_INTERVAL = 16    # forwards before the first trial, and after a switch
MAX_INTERVAL = 1024    # the longest stretch between trials while the choice keeps winning
MARGIN = 0.85          # the other count wins when its median time is under this share of ours
HISTORY = 8            # recent times kept per count


class ThreadChoice:
    """The thread count for forwards of one batch size, chosen between `most` and half of it by their
    measured times (see the module's doc)."""

    def __init__(self, most: int):
        self.counts = (most, max(1, most // 2))
        self.current = 0                                # index into counts
        self.times = (deque(maxlen=HISTORY), deque(maxlen=HISTORY))
        self.interval = FIRST_INTERVAL
        self.since_trial = 0
        self.trial_left = 0

    def next(self) -> int:
        """The thread count for the next forward."""
        return self.counts[1 - self.current] if self.trial_left else self.counts[self.current]

    def record(self, threads: int, seconds: float) -> None:
        """The time the forward took with `threads` threads (the count next() gave)."""
        self.times[self.counts.index(threads)].append(seconds)
        if self.trial_left:
            self.trial_left -= 1
            if not self.trial_left:
                self._decide()
            return
        self.since_trial += 1
        if self.since_trial >= self.interval and len(self.times[self.current]) >= TRIAL_CALLS:
            self.trial_left, self.since_trial = TRIAL_CALLS, 0
            self.times[1 - self.current].clear()

    def _decide(self) -> None:
        ours = statistics.median(self.times[self.current])
        theirs = statistics.median(self.times[1 - self.current])
        if theirs < MARGIN * ours:
            self.current = 1 - self.current
            self.interval = FIRST_INTERVAL
            self.times[1 - self.current].clear()        # the loser's history is of another time
        else:
            self.interval = min(2 * self.interval, MAX_INTERVAL)


class AdaptiveThreads:
    """The thread counts of one model's one-call forwards, a ThreadChoice per batch size."""

    def __init__(self):
        self.choices: dict[tuple[int, int], ThreadChoice] = {}

    @contextlib.contextmanager
    def count(self, rows: int):
        """A block that runs one forward of `rows` tokens: yields its thread count, with numba's count
        (per calling thread) set to it meanwhile, and records the time it took. A forward that compiled
        a kernel is not recorded."""
        most = numba.get_num_threads()
        if not ADAPT or most == 1:
            yield most
            return
        choice = self.choices.setdefault((rows, most), ThreadChoice(most))
        threads = choice.next()
        if threads != most:
            numba.set_num_threads(threads)
        compiled, start = compiling.seconds(), time.perf_counter()
        try:
            yield threads
        finally:
            seconds = time.perf_counter() - start
            if threads != most:
                numba.set_num_threads(most)
        if compiling.seconds() == compiled:
            choice.record(threads, seconds)
