"""Speculative decoding with n-gram (prompt lookup) drafts against plain decoding: SmolLM2, greedy.

Input-grounded prompts (copy a paragraph, edit it, summarise it or answer with quotes), where the output
repeats its input and drafts hold, and one open-ended prompt, where they rarely do and drafting must
pause rather than slow decoding down. Per prompt: the median decode rate of --runs runs of each,
interleaved, and their ratio; the drafted and accepted counts of the last run. Both decode the same
tokens (greedy output is identical with speculation on or off; checked here too).

    python benchmarks/bench_speculative.py              # 5 runs of up to 160 tokens per prompt
    python benchmarks/bench_speculative.py --runs 3 --tokens 96 --draft-max 12
"""
from __future__ import annotations

import argparse
import statistics

import llamarun
from llamarun.chat import chat_format_for

PARAGRAPH = ("The old lighthouse stood on a rocky point at the northern edge of the bay. Every night for forty "
             "years its keeper, Thomas Hale, climbed the ninety-two steps to the lamp room, trimmed the wick, "
             "polished the brass and wound the clockwork that turned the great lens, so that the fishing boats "
             "could find their way home through the fog. When the lamp was finally electrified in 1961, Hale "
             "refused to leave, and he kept a logbook of every ship that passed until the day he died.")
MISSPELT = (PARAGRAPH.replace("lighthouse", "lighthuose").replace("polished", "polised")
            .replace("refused", "refussed"))
# What SmolLM2-135M answers from its input (a request to summarise "in three sentences, quoting its key
# phrases" it mostly paraphrases: then drafts hold for a few words at a time, ~1.0x)
PROMPTS = {
    "copy": f"Copy this text exactly, word for word:\n\n{PARAGRAPH}",
    "edit: spelling": f"Correct the spelling mistakes in this text and repeat it:\n\n{MISSPELT}",
    "edit: tense": f"Repeat this text, but in the present tense:\n\n{PARAGRAPH}",
    "summarise with quotes": f"Summarize the following text in a few sentences, using direct quotes from it."
                             f"\n\n{PARAGRAPH}",
    "answer with a quote": f"Which sentence of this text mentions the year 1961? Quote it, then explain it."
                           f"\n\n{PARAGRAPH}",
    "open-ended": "Write a short story about a dragon who learns to bake bread.",
}
GROUNDED = tuple(name for name in PROMPTS if name != "open-ended")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model path (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=160, help="at most this many new tokens per run")
    ap.add_argument("--draft-max", type=int, default=8)
    args = ap.parse_args()
    llama = llamarun.load(args.model)
    fmt = chat_format_for(llama)
    print(f"{'prompt':24} {'tokens':>6} {'plain tok/s':>11} {'ngram tok/s':>11} {'ratio':>6} {'drafted':>7} {'accepted':>8}")
    ratios = {}
    for name, text in PROMPTS.items():
        ids = fmt.encode([{"role": "user", "content": text}], llama.tokenizer, add_generation_prompt=True)
        llama.generate(ids, 8, temperature=0)                     # warm-up
        plain, fast = [], []
        for _ in range(args.runs):
            a = llama.generate(ids, args.tokens, temperature=0)
            b = llama.generate(ids, args.tokens, temperature=0, draft="ngram", draft_max=args.draft_max)
            if a.tokens != b.tokens:
                raise SystemExit(f"{name}: speculative output differs from plain decoding")
            plain.append(a.decode_tok_s)
            fast.append(b.decode_tok_s)
        p, f = statistics.median(plain), statistics.median(fast)
        ratios[name] = f / p
        print(f"{name:24} {len(a.tokens):6d} {p:11.1f} {f:11.1f} {f / p:5.2f}x {b.drafted:7d} {b.accepted:8d}")
    grounded = statistics.median(ratios[n] for n in GROUNDED)
    print(f"grounded prompts: median ratio {grounded:.2f}x (goal 1.8x), lowest {min(ratios[n] for n in GROUNDED):.2f}x "
          f"(goal 1.2x); open-ended {ratios['open-ended']:.2f}x (goal >= 0.95x)")


if __name__ == "__main__":
    main()
