"""The scheduler under the server: batched output equals solo output, and chunked prefill keeps streams going.

References are independent of the scheduler: `Llama.generate` (generation.py's one-sequence loop) for
greedy text, `Llama.logits` (one teacher-forced pass) to judge whether a difference is a near-tie.
"""
import importlib.util
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow          # a server, several streams


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"


def bench_prompts():
    spec = importlib.util.spec_from_file_location("bench_server", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROMPTS


def run_together(scheduler, prompts, max_tokens, sampler):
    """Submit every prompt at once; -> the drawn tokens of each (the event texts are checked elsewhere)."""
    from llamarun.server.scheduler import Request
    done = [threading.Event() for _ in prompts]
    texts = [[] for _ in prompts]

    def emitter(i):
        def emit(ev):
            texts[i].append(ev.text)
            if ev.finish_reason:
                done[i].set()
        return emit
    for i, ids in enumerate(prompts):
        scheduler.submit(Request(ids, max_tokens, sampler(), emitter(i), logprobs=0))
    for d in done:
        assert d.wait(300)
    return ["".join(t) for t in texts]


def test_greedy_batched_equals_alone_up_to_near_ties(smol_path):
    import llamarun
    from llamarun.chat import chat_format_for
    from llamarun.sampling import Sampler
    from llamarun.server.scheduler import Scheduler

    llama = llamarun.load(smol_path)
    fmt = chat_format_for(llama)
    prompts = [fmt.encode([{"role": "user", "content": p}], llama.tokenizer) for p in bench_prompts()]
    scheduler = Scheduler(llama, parallel=len(prompts), ctx=256)
    scheduler.start()
    try:
        together = run_together(scheduler, prompts, 12, lambda: Sampler(temperature=0))
    finally:
        scheduler.stop()
    same = sum(same_as_alone(llama, ids, text, 12) for ids, text in zip(prompts, together))
    assert same >= len(prompts) // 2


def same_as_alone(llama, ids, text, max_tokens) -> bool:
    """Whether `text` is the greedy continuation `Llama.generate` gives alone; where it is not, the solo
    run's two best logits at the first difference must be a near-tie (else the test fails)."""
    alone = llama.generate(ids, max_tokens, temperature=0)
    if text == alone.text:
        return True
    batched = llama.tokenizer.encode(text, bos=False)
    k = next(i for i, (a, b) in enumerate(zip(alone.tokens, batched + [-1])) if a != b)
    row = llama.logits(ids + alone.tokens[:k])[-1]
    top2 = np.sort(row)[-2:]
    assert top2[1] - top2[0] < 0.1, f"the served output parted from solo at a margin of {top2[1] - top2[0]}"
    return False


def test_prompt_cache_reuses_the_slots_tokens(smol_path):
    """A request runs only what its slot's cache does not hold: a chat's next turn resends the
    conversation (the first turn and the reply are cached), and another user's chat shares the system
    prompt. Their greedy replies are the ones `Llama.generate` gives from an empty cache."""
    import llamarun
    from llamarun.chat import chat_format_for
    from llamarun.sampling import Sampler
    from llamarun.server.scheduler import Request, Scheduler

    llama = llamarun.load(smol_path)
    fmt = chat_format_for(llama)
    encode = lambda messages: fmt.encode(messages, llama.tokenizer)     # noqa: E731
    scheduler = Scheduler(llama, parallel=2, ctx=512)
    scheduler.start()

    def ask(ids):
        events, done = [], threading.Event()
        scheduler.submit(Request(ids, 16, Sampler(temperature=0), lambda ev: (events.append(ev),
                                 ev.finish_reason and done.set())))
        assert done.wait(300)
        return "".join(ev.text for ev in events), events[-1]

    try:
        first = [{"role": "user", "content": "What is the capital of France?"}]
        first_ids = encode(first)
        reply, end = ask(first_ids)
        assert end.finish_reason in ("stop", "length") and end.cached_tokens == 0
        turn = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Italy?"}]
        turn_ids = encode(turn)
        shared = len(os.path.commonprefix([first_ids, turn_ids]))
        turn_reply, end = ask(turn_ids)
        assert end.prompt_tokens == len(turn_ids)
        assert end.cached_tokens >= shared >= len(first_ids) - 1      # the whole first turn, at least
        other_ids = encode([{"role": "user", "content": "Name a fruit."}])
        system = len(os.path.commonprefix([first_ids, other_ids]))
        other_reply, end = ask(other_ids)
        assert end.cached_tokens == system > 10                       # the system prompt and the user tag
    finally:
        scheduler.stop()
    assert same_as_alone(llama, turn_ids, turn_reply, 16)
    assert same_as_alone(llama, other_ids, other_reply, 16)


def admit_long_prompt(llama) -> tuple[np.ndarray, int]:
    """One stream decoding, then a 2000-token prompt submitted: (the stream's gaps from past its
    warm-up to the prompt's first token, how many of the stream's tokens came after the submission)."""
    from llamarun.sampling import Sampler
    from llamarun.server.scheduler import Request, Scheduler

    scheduler = Scheduler(llama, parallel=2, ctx=2100)
    stamps, first = [], []
    # ignore_eos: the stream must outlast the admission, wherever the model would draw its end token
    scheduler.submit(Request([1, 500, 600], 2000, Sampler(temperature=0), lambda ev: stamps.append(time.perf_counter()),
                             ignore_eos=True))
    scheduler.start()
    try:
        while len(stamps) < 40:
            time.sleep(0.005)
        submitted = time.perf_counter()
        scheduler.submit(Request(list(range(1000, 3000)), 1, Sampler(temperature=0),
                                 lambda ev: first.append(time.perf_counter())))
        deadline = time.time() + 120
        while not first:
            assert time.time() < deadline
            time.sleep(0.01)
    finally:
        scheduler.stop()
    t = np.array(stamps)
    return np.diff(t[(t >= t[10]) & (t <= first[0])]), int(np.sum(t > submitted))


def test_long_prompt_admission_keeps_streams_going(smol_path):
    """While a 2000-token prompt is admitted, a running stream's longest gap stays under 3x its median.

    On SmolLM2 (a step ~10-20 ms: measured ratios 1.5-2.1, ~13 s per run). The machine is shared: one
    time slice lost to another process can make a lone long gap, so the scenario runs up to three times
    and must hold in one (a prompt that stalled the stream, e.g. prefilled in one piece, stalls it every
    time). Twice was not enough: a fresh-clone CI run on 2026-12-02 measured 3.03 and 3.42, where four
    runs a few minutes later measured 1.66-2.10.
    """
    import llamarun

    llama = llamarun.load(smol_path)
    ratios = []
    for attempt in range(3):
        gaps, during = admit_long_prompt(llama)
        assert during > 20, "the long prompt went in without overlapping the stream"
        ratios.append(gaps.max() / np.median(gaps))
        if ratios[-1] < 3:
            break
    assert min(ratios) < 3, f"longest gap / median gap in each attempt: {ratios}"
