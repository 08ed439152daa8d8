"""The thread count of the one-call forward on a busy machine (llamarun/threads.py), and the notice
of a first run's compile (llamarun/compiling.py)."""
import io
import time

import numba
import pytest

from llamarun import compiling, threads
from llamarun.threads import AdaptiveThreads, ThreadChoice


def run(choice: ThreadChoice, seconds_of, calls: int) -> list[int]:
    """`calls` forwards whose time is seconds_of(thread count, call number): the counts used."""
    used = []
    for i in range(calls):
        n = choice.next()
        used.append(n)
        choice.record(n, seconds_of(n, i))
    return used


def quiet(n, i):
    """Two threads 1.7x as fast as one, steady."""
    return 1.0 if n == 2 else 1.7


BUSY_TWO = (1.1, 2.8, 2.9, 1.0, 2.8, 25.0, 2.8, 2.7)   # two threads beside a busy process: barrier waits come and go


def busy(n, i):
    """One core taken by another process: two threads wait for each other, one thread runs steadily
    (after the OS has moved it: a switch's first two forwards are slower)."""
    return BUSY_TWO[i % len(BUSY_TWO)] if n == 2 else 1.8


def test_a_quiet_machine_keeps_every_thread_and_never_pays_for_a_trial():
    choice = ThreadChoice(2)
    assert run(choice, quiet, 5000).count(1) == 0
    jittery = ThreadChoice(2)                                  # small noise is not competition
    import random
    rng = random.Random(0)
    assert run(jittery, lambda n, i: quiet(n, i) * rng.uniform(0.9, 1.1), 5000).count(1) == 0


def test_a_competing_process_moves_the_forward_to_fewer_threads_and_back_when_it_ends():
    choice = ThreadChoice(2)
    run(choice, quiet, 200)
    contended = run(choice, busy, 2000)
    assert contended[-1000:].count(1) > 0.98 * 1000
    ended = run(choice, quiet, 2000)                          # the competitor is gone
    assert ended[-1000:].count(2) > 0.98 * 1000


def test_trials_against_a_slower_count_are_short_and_come_ever_more_rarely():
    choice = ThreadChoice(2)
    used = run(choice, busy, 5000)                            # on one thread from the first trial on
    two = [i for i, n in enumerate(used) if n == 2 and i > 64]
    trials = [i for i in two if i - 1 not in two]
    assert all(len([t for t in two if s <= t < s + 10]) <= threads.TRIAL_CALLS for s in trials)
    gaps = [b - a for a, b in zip(trials, trials[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > 8 * gaps[0]


def test_a_forward_runs_on_the_chosen_count_and_numbas_count_comes_back(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    monkeypatch.setattr(threads, "ADAPT", True)
    adaptive = AdaptiveThreads()
    numba.set_num_threads(2)
    seen = []
    for i in range(200):
        with adaptive.count(1) as n:
            seen.append((n, numba.get_num_threads()))
            time.sleep(0.0005 if n == 1 else BUSY_TWO[i % len(BUSY_TWO)] / 1000)
        assert numba.get_num_threads() == 2
    assert all(n == got for n, got in seen)
    assert seen[0][0] == 2 and seen[-1][0] == 1               # it tried one thread, and kept it


def test_the_first_compile_says_so_at_once_and_is_left_out_of_the_rates(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(compiling, "NOTICE_AFTER", 0.01)
    monkeypatch.setattr(compiling, "_watch", compiling._CompileWatch())
    numba.core.event.register("numba:compile", compiling._watch)
    try:
        compiling.announce(out)
        before = compiling.seconds()

        @numba.njit
        def many_branches(x):         # a fresh function: its compile takes a while
            s = 0.0
            for i in range(x.shape[0]):
                for j in range(4):
                    s += x[i] * j if i % 3 else x[i] / (j + 1)
            return s

        import numpy as np
        start = time.perf_counter()
        many_branches(np.ones(8))
        wall = time.perf_counter() - start
        spent = compiling.seconds() - before
        time.sleep(0.1)
    finally:
        numba.core.event.unregister("numba:compile", compiling._watch)
    assert 0.5 * wall < spent <= wall
    assert "compiling the kernels for this CPU, once per machine" in out.getvalue()


def test_generation_rates_leave_the_compile_out(monkeypatch, smol_path):
    """A forward that spends its time compiling: prefill tok/s counts only the rest."""
    import llamarun
    llm = llamarun.load(smol_path)
    llm.generate("Once upon a time", 2, temperature=0)       # its kernels compiled (or loaded) here
    clock = {"compiled": 0.0}
    monkeypatch.setattr(compiling, "seconds", lambda: clock["compiled"])
    forward = llm.model.forward

    def compiling_forward(*args, **kwargs):
        if clock["compiled"] == 0.0:
            time.sleep(1.0)
            clock["compiled"] = 1.0
        return forward(*args, **kwargs)

    monkeypatch.setattr(llm.model, "forward", compiling_forward)
    result = llm.generate("Once upon a time", 4, temperature=0)
    assert result.compile_seconds == pytest.approx(1.0)
    assert result.prefill_seconds < 0.6                       # 1 s more if the compile were counted
