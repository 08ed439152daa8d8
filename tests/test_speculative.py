"""Speculative decoding (llamarun/speculative.py, driven by llamarun/generation.py): greedy output is
token for token what plain decoding gives, whatever the drafts; the counters count what was drafted
and kept; a rejected draft's cache positions are written over; sampled output keeps the target's
distribution; bad input is refused in one line."""
import numpy as np
import pytest

import llamarun
from llamarun.errors import LlamarunError
from llamarun.generation import generate_stream
from llamarun.sampling import make_sampler
from llamarun.speculative import NgramDraft, Schedule, Speculation

from conftest import MODELS, require

PARAGRAPH = ("The lighthouse stood on a rocky point at the edge of the bay. Every night its keeper climbed "
             "the ninety steps, trimmed the wick and wound the clockwork that turned the great lens.")


@pytest.fixture(scope="module")
def smol(smol_path):
    return llamarun.load(smol_path)


@pytest.fixture(scope="module")
def copy_prompt(smol):
    from llamarun.chat import chat_format_for
    message = {"role": "user", "content": f"Copy this text exactly:\n{PARAGRAPH}"}
    return chat_format_for(smol).encode([message], smol.tokenizer, add_generation_prompt=True)


@pytest.fixture(scope="module")
def plain(smol, copy_prompt):
    return smol.generate(copy_prompt, 48, temperature=0)


def test_ngram_drafts_give_plain_greedy_output_token_for_token(smol, copy_prompt, plain):
    fast = smol.generate(copy_prompt, 48, temperature=0, draft="ngram")
    assert fast.tokens == plain.tokens and fast.text == plain.text
    assert fast.finish_reason == plain.finish_reason
    # the copy is found in the prompt: most drafted tokens hold
    assert fast.drafted > 10 and fast.accepted > fast.drafted // 2
    assert plain.drafted == plain.accepted == 0


def test_a_draft_model_gives_plain_greedy_output_and_its_own_drafts_all_hold(smol, copy_prompt, plain):
    # the model as its own draft: its greedy one-row decode is what the verify rows compute (each row is
    # independent of its batch), so every drafted token is kept; its cache follows the sequence by position
    fast = smol.generate(copy_prompt, 48, temperature=0, draft=smol, draft_max=5)
    assert fast.tokens == plain.tokens
    assert fast.drafted > 20 and fast.accepted == fast.drafted


def test_seeded_sampling_draws_the_same_tokens_with_drafts(smol, copy_prompt):
    # one draw per row, in order, as plain decoding makes them: the seed's coins fall alike
    for seed in (1, 3):
        a = smol.generate(copy_prompt, 32, temperature=0.8, seed=seed)
        b = smol.generate(copy_prompt, 32, temperature=0.8, seed=seed, draft="ngram")
        assert a.tokens == b.tokens and b.accepted > 0


class Spoiled:
    """Drafts that are the plain greedy continuation with one token of each draft changed: every
    draft is rejected there, after `good` agreeing tokens, its later positions written to the cache."""
    kind = "spoiled"

    def __init__(self, prompt, continuation, good=2):
        self.truth, self.good, self.expected = list(prompt) + list(continuation), good, 0

    def propose(self, tokens, n):
        draft = self.truth[len(tokens):len(tokens) + n]
        if len(draft) > self.good:
            draft[self.good] = (draft[self.good] + 1) % 49152
        self.expected += next((i for i, (a, b) in enumerate(zip(draft, self.truth[len(tokens):])) if a != b),
                              len(draft))
        return draft


def test_rejected_drafts_are_rolled_back_and_counted(smol, copy_prompt, plain):
    source = Spoiled(copy_prompt, plain.tokens)
    speculation = Speculation(source, draft_max=6)
    speculation.verified = lambda drafted, accepted: None      # keep drafting at full length
    result = llamarun.decoding.Completion("", [])
    for _ in generate_stream(smol.model, smol.tokenizer, copy_prompt, make_sampler(temperature=0), max_tokens=48,
                             result=result, speculation=speculation):
        pass
    # the keys and values the spoiled tokens wrote were overwritten: the continuation is plain decoding's
    assert result.tokens == plain.tokens
    assert result.accepted == source.expected > 0
    assert result.drafted > result.accepted


def test_draft_length_adapts_and_drafting_pauses_when_drafts_fail():
    class Wrong:
        kind = "wrong"

        def propose(self, tokens, n):
            return [0] * n
    speculation = Speculation(Wrong(), draft_max=8)
    drafted = []
    for _ in range(200):
        draft = speculation.draft([1, 2, 3], room=8)
        drafted.append(len(draft))
        speculation.verified(len(draft), 0)
    # pauses of 4, 8, ... 64 drafts: a handful of probes in 200 steps, each short after the first (the
    # first 7 long, not 8: a forward of 8 rows costs less than one of 9)
    assert drafted[0] == 7 and sum(1 for d in drafted if d) <= 7 and max(drafted[1:]) <= 3
    schedule = Schedule(8)
    schedule.verified(8, 8)
    assert schedule.length == 8
    schedule.verified(8, 3)                        # 4 tokens for a forward of 9 rows: paid, no pause
    assert schedule.length == 4 and schedule.pause == 0
    schedule.verified(4, 4)
    assert schedule.length == 8


def test_drafts_fill_whole_blocks_of_forward_rows():
    """The int8 kernels take rows in blocks of 4 (then one at a time): a draft is fitted so that the
    forward's rows (the `ahead` rows before it, and its own) are 2, or a multiple of 4."""
    class Long:
        kind = "long"

        def propose(self, tokens, n):
            return list(range(n))
    speculation = Speculation(Long(), draft_max=16)
    rows = {}
    for length in range(1, 17):
        for ahead in (1, 2):
            speculation.schedule("long").length = length
            rows[length, ahead] = ahead + len(speculation.draft([1, 2, 3], room=16, ahead=ahead))
    assert rows[1, 1] == 2 and rows[2, 1] == 4 and rows[3, 1] == 4 and rows[4, 1] == 4 and rows[7, 1] == 8
    assert rows[8, 1] == 8 and rows[9, 1] == 8 and rows[1, 2] == 4 and rows[2, 2] == 4 and rows[6, 2] == 8
    assert all(r == 2 or r % 4 == 0 for r in rows.values())
    # a draft_max or a room of 2 stays 2; a proposal shorter than asked is cut back to a block
    assert len(Speculation(Long(), draft_max=2).draft([1], room=8)) == 2
    assert len(speculation.draft([1], room=2)) == 2

    class Short(Long):
        def propose(self, tokens, n):
            return list(range(min(n, 5)))
    assert len(Speculation(Short(), draft_max=8).draft([1], room=8)) == 3


def test_each_ngram_length_has_its_own_schedule():
    # open-ended text: 1-gram matches everywhere, rarely right; they pause while longer ones draft on
    speculation = Speculation(NgramDraft(), draft_max=8)
    assert speculation.draft([7, 1, 2, 9, 5, 1], room=8) == [2]        # a 1-gram match: a short first draft
    speculation.verified(1, 0)
    assert speculation.draft([7, 1, 2, 9, 5, 1], room=8) == []
    assert speculation.draft([7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], room=8) == [4, 5, 6]      # a 3-gram: longer
    long = [7, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 1, 2, 3, 4]
    assert speculation.draft(long, room=8) == [5, 6, 7, 8, 9, 10, 11]   # a 4-gram: longer still


def test_ngram_lookup_takes_the_longest_most_recent_match():
    ngram = NgramDraft()
    assert ngram.propose([5, 6, 7, 8, 9, 1, 6, 7], 3) == [8, 9, 1]        # 2-gram [6, 7]
    assert ngram.propose([1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3], 2) == [4, 9]  # 3-gram [1, 2, 3] beats [2, 3]
    assert ngram.propose([1, 2, 3, 4, 8, 9, 2, 3, 4, 5, 1, 2, 3, 4], 2) == [8, 9]   # the 4-gram beats [2, 3, 4]
    assert ngram.propose([4, 1, 5, 4, 2, 4], 1) == [2]                    # the most recent [4]
    assert ngram.propose([1, 2, 3], 4) == []


def wilson_hilferty_chi2(df: int, z: float = 3.09) -> float:
    """The chi-square distribution's 0.999 quantile (z: the normal's), Wilson and Hilferty's approximation."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def chi_square(counts: np.ndarray, expected_p: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the bins expecting 5 or more, the others pooled into one."""
    n = counts.sum()
    big = expected_p * n >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected_p[big] * n, expected_p[~big].sum() * n)
    keep = expected > 0
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


def test_sampled_output_keeps_the_target_distribution():
    # stories260K drafts for itself, greedily: the second token is drawn from a verify row, and kept
    # when it agrees with the draft. Its distribution must be the target's: sum over the first token
    # t of p(t) p(. | t), computed exactly here from the sampler's own distribution.
    # Speculative sampling accepts a draft token x with probability min(1, p(x)/q(x)) and otherwise
    # draws from max(0, p - q) normalized; for a greedy draft q is one-hot at x, so that is "keep x
    # with probability p(x), else draw from p without x": the same as drawing y ~ p and keeping the
    # draft while y == x, which is what Decoder.accept does.
    tiny = llamarun.load(require(MODELS / "stories260K.bin"))
    prompt, options = [1, 403], dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    sampler = make_sampler(**options)
    first = sampler.distribution(tiny.logits(prompt)[-1], prompt)
    second = np.zeros_like(first)
    for t in np.flatnonzero(first):
        second += first[t] * sampler.distribution(tiny.logits(prompt + [int(t)])[-1], prompt + [int(t)])
    for draft in (None, tiny):
        counts, drafted, accepted = np.zeros(len(first)), 0, 0
        for seed in range(400):
            c = tiny.generate(prompt, 3, seed=seed, draft=draft, draft_max=1, **options)
            counts[c.tokens[1]] += 1
            drafted, accepted = drafted + c.drafted, accepted + c.accepted
        statistic, df = chi_square(counts, second)
        assert statistic < wilson_hilferty_chi2(df), (draft is not None, statistic, df)
    assert drafted == 400 and 50 < accepted < 400     # the draft was verified every time, and often kept


def test_bad_draft_input_is_refused_in_one_line(smol):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(LlamarunError, match="draft_max") as e:
            smol.generate("Hi", 4, draft="ngram", draft_max=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(LlamarunError, match="vocabulary") as e:
        smol.generate("Hi", 4, draft=str(require(MODELS / "stories260K.bin")))
    assert "\n" not in str(e.value)
    with pytest.raises(LlamarunError, match="draft must be"):
        smol.generate("Hi", 4, draft=3)


def test_cli_draft_flags_give_the_same_text_and_count_drafts(capsys):
    from llamarun.cli import main
    args = ["generate", "One day, Lily met a cat. One day, Lily met a", "-m", str(require(MODELS / "tiny_gqa.bin")),
            "-n", "24", "--temperature", "0"]
    assert main(args) == 0
    plain = capsys.readouterr()
    assert main(args + ["--draft", "ngram", "--draft-max", "4"]) == 0
    fast = capsys.readouterr()
    assert fast.out == plain.out
    assert "drafted: " in fast.err and "accepted: " in fast.err and "drafted" not in plain.err
    assert main(args + ["--draft", "ngram", "--draft-max", "0"]) == 1
    assert "draft_max" in capsys.readouterr().err


def test_the_server_scheduler_verifies_drafts_and_keeps_greedy_output(smol, copy_prompt, plain):
    # several sequences in one forward, each with its own drafts: each draws what it draws alone
    import threading
    from llamarun.server.scheduler import Request, Scheduler
    prompts = [copy_prompt, copy_prompt[:-9] + copy_prompt[-8:], smol.encode("Once upon a time")]
    alone = [plain.tokens] + [smol.generate(ids, 48, temperature=0).tokens for ids in prompts[1:]]
    scheduler = Scheduler(smol, parallel=4, ctx=256)
    drawn, ends, done = [[] for _ in range(4)], [None] * 4, [threading.Event() for _ in range(4)]

    def emitter(i):
        def emit(event):
            if event.logprob is not None:
                drawn[i].append(event.logprob.token)
            if event.finish_reason:
                ends[i] = event
                done[i].set()
        return emit
    scheduler.start()
    try:
        for i, ids in enumerate(prompts):
            scheduler.submit(Request(ids, 48, make_sampler(temperature=0), emitter(i), logprobs=0,
                                     speculation=Speculation(NgramDraft(), 6) if i < 2 else None))
        # and one whose drafts are rejected after two tokens each time, their positions written over
        scheduler.submit(Request(prompts[2], 48, make_sampler(temperature=0), emitter(3), logprobs=0,
                                 speculation=Speculation(Spoiled(prompts[2], alone[2]), 6)))
        assert all(d.wait(60) for d in done)
    finally:
        scheduler.stop()
    assert drawn == alone + [alone[2]]
    assert ends[0].accepted > 10 and ends[0].drafted >= ends[0].accepted and ends[2].drafted == 0
    assert ends[3].accepted > 10 and ends[3].drafted > ends[3].accepted


def test_the_server_reports_drafts_in_usage_and_a_request_turns_them_off(smol):
    from starlette.testclient import TestClient
    from llamarun.server import create_app
    body = {"prompt": f"Copy this text exactly:\n{PARAGRAPH}\n\n{PARAGRAPH[:40]}", "max_tokens": 24, "temperature": 0}
    with TestClient(create_app(smol, "smollm2", parallel=1, ctx=256, draft="ngram")) as client:
        on = client.post("/v1/completions", json=body).json()
        off = client.post("/v1/completions", json={**body, "speculative": False}).json()
    assert on["choices"][0]["text"] == off["choices"][0]["text"]
    details = on["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 5 and details["rejected_prediction_tokens"] >= 0
    assert "completion_tokens_details" not in off["usage"]
