"""Time spent compiling kernels, and the notice the command line gives while it happens.

numba compiles a kernel the first time it is called with new argument types, unless its on-disk cache
(llamarun/kernels/__init__.py) already holds it: on a new machine, or after an upgrade that changed
the kernels, the first run of a command waits for that compile, tens of seconds on 2 cores. Two
things follow:

- the user is told, as soon as a compile starts, what is happening, that it happens once, how long
  it usually takes and how long it has taken so far (`announce`, which the command line turns on);
- rates (prompt tok/s, ...) leave compile time out: `seconds()` is the time spent compiling so far in
  this process, which the generation loop subtracts from what it measured around the same calls.

Both come from numba's "numba:compile" events, which fire for a compile and not for a load from the
cache. Compiles nest (a kernel's callees compile inside it): only the outermost one is timed.
"""
from __future__ import annotations

import sys
import threading
import time

from numba.core import event

EXPECTED = "about half a minute on 2 cores, longer for K-quant models"   # measured: docs/performance.md
TICK = 5.0          # seconds between progress lines
NOTICE_AFTER = 0.5  # seconds a compile runs before the notice starts
SETTLE = 0.5        # seconds without a compile before the notice stops watching


class _CompileWatch(event.Listener):
    """Counts the seconds of outermost compiles; tells `stream` about them when one is set."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.started = 0.0
        self.total = 0.0
        self.started_count = 0      # outermost compiles started (read without the lock: see started())
        self.stream = None          # where the notice goes (None: no notice)
        self.announced = False
        self.ticker: threading.Thread | None = None

    def on_start(self, ev):
        with self.lock:
            self.depth += 1
            if self.depth > 1:
                return
            self.started = time.perf_counter()
            self.started_count += 1
            if self.stream is not None and (self.ticker is None or not self.ticker.is_alive()):
                self._notice()

    def on_end(self, ev):
        with self.lock:
            self.depth -= 1
            if self.depth == 0:
                self.total += time.perf_counter() - self.started

    def busy(self) -> bool:
        with self.lock:
            return self.depth > 0

    def seconds(self) -> float:
        with self.lock:
            return self.total + (time.perf_counter() - self.started if self.depth > 0 else 0.0)

    def _notice(self):
        self.ticker = threading.Thread(target=self._progress, args=(self.total,), name="compile-progress",
                                       daemon=True)
        self.ticker.start()

    def _progress(self, before: float):
        """Once compiles have gone on for NOTICE_AFTER seconds (a short one, such as numba's typed lists'
        methods in every process, says nothing): a line saying what is happening (in full the first
        time), then one every TICK seconds while compiles go on, in whole lines, as generated text may
        follow on the same terminal. Ends when none has run for SETTLE seconds; the rates' line of
        `generate` and `chat` gives the total."""
        time.sleep(NOTICE_AFTER)
        shown = 0.0
        while True:
            if not self.busy():
                time.sleep(SETTLE)          # compiles come in series: the forward, then a kernel it calls
                if not self.busy():
                    return
            spent = self.seconds() - before
            if not self.announced:
                self.announced = True
                self._say(f"llamarun: compiling the kernels for this CPU, once per machine and llamarun version "
                          f"({EXPECTED})")
            elif spent - shown >= TICK:
                shown = spent
                self._say(f"llamarun: compiling... {spent:.0f} s")
            time.sleep(SETTLE)


    def _say(self, line: str):
        stream = self.stream
        if stream is None:
            return
        try:
            print(line, file=stream, flush=True)
        except (ValueError, OSError):       # the stream was closed (a command that ended, a test's capture)
            self.stream = None


_watch = _CompileWatch()
event.register("numba:compile", _watch)


def seconds() -> float:
    """Seconds this process has spent compiling kernels so far (including a compile under way)."""
    return _watch.seconds()


def started() -> int:
    """How many compiles have started in this process so far: a number that changes if any starts
    between two reads. Without the lock (an int attribute reads whole): it is read around every
    one-call forward (threads.py), where a lock taken with cold caches costs microseconds."""
    return _watch.started_count


def announce(stream=sys.stderr) -> None:
    """Tell `stream` when kernels start compiling, and how long they take (the command line's notice);
    None: stop telling."""
    _watch.stream = stream
