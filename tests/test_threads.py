"""The thread count of the one-call forward on a busy machine (llamarun/threads.py), and the notice
of a first run's compile (llamarun/compiling.py)."""
import io
import time

import numba
import pytest

from llamarun import compiling, threads
from llamarun.threads import AdaptiveThreads, ThreadChoice


def run(choice: ThreadChoice, seconds_of, calls: int) -> list[int]:
    """`calls` forwards whose time is seconds_of(thread count): the counts used."""
    used = []
    for _ in range(calls):
        n = choice.next()
        used.append(n)
        choice.record(n, seconds_of(n))
    return used


def test_a_quiet_machine_keeps_every_thread_and_tries_fewer_ever_more_rarely():
    choice = ThreadChoice(2)
    used = run(choice, {2: 1.0, 1: 1.8}.get, 5000)
    half = [i for i, n in enumerate(used) if n == 1]
    assert len(half) / len(used) < 0.01                      # the trials' cost
    trials = [i for i in half if i - 1 not in half]
    gaps = [b - a for a, b in zip(trials, trials[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > 8 * gaps[0]     # they come less and less often


def test_a_competing_process_moves_the_forward_to_fewer_threads_and_back_when_it_ends():
    choice = ThreadChoice(2)
    run(choice, {2: 1.0, 1: 1.8}.get, 200)                   # quiet: trials spaced out
    busy = run(choice, {2: 6.0, 1: 2.5}.get, 2000)           # one core taken: two threads wait at barriers
    assert busy[-1000:].count(1) > 0.97 * 1000
    quiet = run(choice, {2: 1.0, 1: 1.8}.get, 2000)          # the competitor is gone
    assert quiet[-1000:].count(2) > 0.97 * 1000


def test_noisy_times_do_not_flip_the_choice_back_and_forth():
    import random
    rng = random.Random(0)
    choice = ThreadChoice(2)
    used = run(choice, lambda n: (1.0 if n == 2 else 1.8) * rng.uniform(0.8, 1.25), 3000)
    assert used[-1000:].count(2) > 0.99 * 1000


def test_a_forward_runs_on_the_chosen_count_and_numbas_count_comes_back(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread only")
    monkeypatch.setattr(threads, "ADAPT", True)
    adaptive = AdaptiveThreads()
    numba.set_num_threads(2)
    seen = []
    for _ in range(200):
        with adaptive.count(1) as n:
            seen.append((n, numba.get_num_threads()))
            time.sleep(0.0002 if n == 2 else 0.002)
        assert numba.get_num_threads() == 2
    assert all(n == got for n, got in seen)
    assert {n for n, _ in seen} == {1, 2}                    # it tried one thread, and kept two


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
