"""The scheduler under the server: batched output equals solo output, and chunked prefill keeps streams going.

References are independent of the scheduler: `Llama.generate` (generation.py's one-sequence loop) for
the greedy token ids. Those must be equal, not close: the kernels compute each row of a batch
independently of the others, bit for bit (tests/test_step.py, tests/test_decode_kernels.py).
"""
import importlib.util
import os
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow          # a server, several streams


BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_server.py"


def bench_prompts():
    spec = importlib.util.spec_from_file_location("bench_server", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROMPTS


def run_together(scheduler, prompts, max_tokens, sampler) -> list[list[int]]:
    """Submit every prompt at once; -> the token ids each drew (read from the events' logprobs; the
    end token, which ends a reply without an event of its own, is not among them, as in Completion.tokens)."""
    from llamarun.server.scheduler import Request
    done = [threading.Event() for _ in prompts]
    drawn = [[] for _ in prompts]

    def emitter(i):
        def emit(ev):
            if ev.logprob is not None:
                drawn[i].append(ev.logprob.token)
            if ev.finish_reason:
                done[i].set()
        return emit
    for i, ids in enumerate(prompts):
        scheduler.submit(Request(ids, max_tokens, sampler(), emitter(i), logprobs=0))
    for d in done:
        assert d.wait(300), "a request did not finish within 300 s"
    return drawn


def test_greedy_batched_equals_alone(smol_path):
    """Eight chat prompts decoded together draw, token for token, what each draws alone through
    `Llama.generate`: the kernels compute each row of a batch independently of the others (bit for
    bit, tests/test_step.py), so a batch cannot move a greedy choice, near-tie or not."""
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
    alone = [llama.generate(ids, 12, temperature=0).tokens for ids in prompts]
    differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
    assert not differ, "batched and alone differ for prompts " + "; ".join(
        f"{i}: alone {alone[i]}, batched {together[i]}" for i in differ)


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
        """-> (the reply's text, the token ids it drew, its last event)"""
        events, done = [], threading.Event()
        scheduler.submit(Request(ids, 16, Sampler(temperature=0), lambda ev: (events.append(ev),
                                 ev.finish_reason and done.set()), logprobs=0))
        assert done.wait(300), "the request did not finish within 300 s"
        drawn = [ev.logprob.token for ev in events if ev.logprob is not None]
        return "".join(ev.text for ev in events), drawn, events[-1]

    try:
        first = [{"role": "user", "content": "What is the capital of France?"}]
        first_ids = encode(first)
        reply, _, end = ask(first_ids)
        assert end.finish_reason in ("stop", "length") and end.cached_tokens == 0
        turn = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Italy?"}]
        turn_ids = encode(turn)
        shared = len(os.path.commonprefix([first_ids, turn_ids]))
        turn_drawn, end = ask(turn_ids)[1:]
        assert end.prompt_tokens == len(turn_ids)
        assert end.cached_tokens >= shared >= len(first_ids) - 1      # the whole first turn, at least
        other_ids = encode([{"role": "user", "content": "Name a fruit."}])
        system = len(os.path.commonprefix([first_ids, other_ids]))
        other_drawn, end = ask(other_ids)[1:]
        assert end.cached_tokens == system > 10                       # the system prompt and the user tag
    finally:
        scheduler.stop()
    assert turn_drawn == llama.generate(turn_ids, 16, temperature=0).tokens
    assert other_drawn == llama.generate(other_ids, 16, temperature=0).tokens


def test_long_prompt_admission_keeps_streams_going(smol_path):
    """While a 1000-token prompt is admitted, a running stream draws a token at every step: the prompt
    goes in chunks that ride along with the stream's decode row, at most the model's kernel-sized
    batch (`matvec_rows`) a step, so the stream draws at least one token per that many prompt tokens.
    (A prompt prefilled in one piece would let it draw one.) How long those steps take, against
    decode-only ones, is benchmarks/bench_admission.py's to measure."""
    import llamarun
    from llamarun.sampling import Sampler
    from llamarun.server.scheduler import Request, Scheduler

    llama = llamarun.load(smol_path)
    scheduler = Scheduler(llama, parallel=2, ctx=1100)
    prompt = list(range(1000, 2000))
    order, running, admitted = [], threading.Event(), threading.Event()

    def stream_event(ev):
        order.append("stream")
        if len(order) >= 10:            # past the decode-only steps the scheduler times before mixing
            running.set()
    # ignore_eos: the stream must outlast the admission, wherever the model would draw its end token
    scheduler.submit(Request([1, 500, 600], 1000, Sampler(temperature=0), stream_event, ignore_eos=True))
    scheduler.start()
    try:
        assert running.wait(300), "the stream did not start within 300 s"
        order.append("submitted")
        # "admitted" is written by the worker, in the step that drew the prompt's first token
        scheduler.submit(Request(prompt, 1, Sampler(temperature=0), lambda ev: (order.append("admitted"),
                                                                               admitted.set())))
        assert admitted.wait(300), "the long prompt got no token within 300 s"
    finally:
        scheduler.stop()
    during = order[order.index("submitted"):order.index("admitted")].count("stream")
    assert during >= len(prompt) / llama.model.matvec_rows, (
        f"the stream drew {during} tokens while {len(prompt)} prompt tokens went in")


def test_choices_of_one_prompt_each_draw_from_their_own_row(smol_path):
    """A request's choices (n > 1) share the prompt's logits row, and a decoder's processors change the
    row it draws from in place: each choice must see its logit bias once, as `Llama.generate` does."""
    import llamarun
    from llamarun.chat import chat_format_for
    from llamarun.decoding import LogitBias
    from llamarun.sampling import Sampler
    from llamarun.server.scheduler import Request, Scheduler

    llama = llamarun.load(smol_path)
    ids = chat_format_for(llama).encode([{"role": "user", "content": "Name a colour."}], llama.tokenizer)
    first = llama.generate(ids, 1, temperature=0).tokens[0]
    bias = {first: 2.5}                      # the greedy choice, made likelier: its logprob shows the bias
    alone = llama.generate(ids, 3, temperature=0, logit_bias=bias, logprobs=2).logprobs
    events = [[], []]
    done = [threading.Event(), threading.Event()]

    def request(i):
        return Request(ids, 3, Sampler(temperature=0), logprobs=2, processors=(LogitBias(bias),),
                       emit=lambda ev: (events[i].append(ev), ev.finish_reason and done[i].set()))
    leader = request(0)
    leader.followers = [request(1)]
    scheduler = Scheduler(llama, parallel=2, ctx=256)
    scheduler.start()
    try:
        scheduler.submit(leader)
        assert all(d.wait(300) for d in done), "a choice did not finish within 300 s"
    finally:
        scheduler.stop()
    for choice in events:
        drawn = [ev.logprob for ev in choice if ev.logprob is not None]
        assert [lp.token for lp in drawn] == [lp.token for lp in alone]
        assert [lp.logprob for lp in drawn] == pytest.approx([lp.logprob for lp in alone], abs=1e-4)
