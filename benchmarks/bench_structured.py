"""Structured output on one stream: SmolLM2's decode rate under a JSON schema against the same
number of tokens unconstrained, and what the grammar costs per token.

Three runs of `--tokens` tokens each, from the same chat prompt, seeded at temperature 0.8 (or
--temperature):
- unconstrained (end tokens ignored, so every run draws all of them);
- constrained: under an array-of-records schema too long to finish (minItems) -- the rate a user
  sees, the tokens the grammar forces included (they run in the forward of the token before them);
- constrained, every token drawn: the grammar's forced tokens drawn one forward each like the others,
  which leaves the mask's own cost.
Each is the median of --runs runs, interleaved; the grammar's share of a token (the mask, applying
it, the forced-token query, the token's consumption) is timed inside the decoder.

    python benchmarks/bench_structured.py                 # 5 runs of 128 tokens
    python benchmarks/bench_structured.py --temperature 0 # greedy
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import llamarun
from llamarun import structured
from llamarun.decoding import Completion
from llamarun.generation import generate_stream
from llamarun.sampling import make_sampler

SCHEMA = {"type": "array", "minItems": 100, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "city", "pets"],
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 24},
                   "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog", "fish", "bird"]}}}}}
PROMPT = "<|im_start|>user\nList some people as JSON.<|im_end|>\n<|im_start|>assistant\n"


class TimedMatcher(structured.Matcher):
    """A Matcher that adds up the seconds its calls take (the mask is applied inside allowed's caller,
    so apply_mask is timed separately), and optionally forces nothing."""
    seconds = 0.0

    def __init__(self, inner: structured.Matcher, forcing: bool):
        super().__init__(inner.llg, inner.vocab_size)
        self.forcing = forcing

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            TimedMatcher.seconds += time.perf_counter() - t0

    def allowed(self, out=None):
        return self._timed(super().allowed, out)

    def forced(self):
        return self._timed(super().forced) if self.forcing else []

    def consume(self, token):
        return self._timed(super().consume, token)


def timed_apply_mask(row, allowed, _apply=structured.apply_mask):
    t0 = time.perf_counter()
    try:
        return _apply(row, allowed)
    finally:
        TimedMatcher.seconds += time.perf_counter() - t0


def run(llama, ids, tokens: int, seed: int, temperature: float, grammar=None, forcing: bool = True) -> tuple[float, float, int]:
    """(decode tok/s, grammar seconds per token, tokens) of one generation."""
    TimedMatcher.seconds = 0.0
    matcher = TimedMatcher(grammar.matcher(), forcing) if grammar is not None else None
    result = Completion("", [])
    sampler = make_sampler("default", temperature=temperature, seed=seed)
    for _ in generate_stream(llama.model, llama.tokenizer, ids, sampler, max_tokens=tokens, ignore_eos=grammar is None,
                             grammar=matcher, result=result):
        pass
    return result.decode_tok_s, TimedMatcher.seconds / max(len(result.tokens), 1), len(result.tokens)


def cpu_name() -> str:
    try:
        return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy (default 0.8, seeded per run)")
    ap.add_argument("-m", "--model", help="model (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    import llamarun.decoding
    llamarun.decoding.apply_mask = timed_apply_mask        # the decoder's name for it
    llama = llamarun.load(args.model)
    ids = llama.encode(PROMPT)
    t0 = time.perf_counter()
    grammar = structured.Grammar.from_json_schema(SCHEMA, llama.tokenizer)
    compile_ms = (time.perf_counter() - t0) * 1e3
    kinds = {"unconstrained": dict(), "JSON schema": dict(grammar=grammar),
             "JSON schema, every token drawn": dict(grammar=grammar, forcing=False)}
    for kind in kinds.values():                             # warm-up: kernels, the grammar's caches
        run(llama, ids, 16, 0, args.temperature, **kind)
    figures = {name: [] for name in kinds}
    for r in range(args.runs):
        for name, kind in kinds.items():
            time.sleep(0.25)                                # let idle thread pools stop spinning
            figures[name].append(run(llama, ids, args.tokens, r, args.temperature, **kind))
    base = np.median([f[0] for f in figures["unconstrained"]])
    print(f"{cpu_name()} | {llama.checkpoint.description} | {args.tokens} tokens, temperature {args.temperature}, "
          f"median of {args.runs} runs | schema compiled in {compile_ms:.0f} ms")
    print("| decoding | tok/s | x unconstrained | tokens | grammar us/token | grammar share of a step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, runs in figures.items():
        rate = np.median([f[0] for f in runs])
        cost = np.median([f[1] for f in runs]) * 1e6
        count = int(np.median([f[2] for f in runs]))
        share = cost * 1e-6 * rate if name != "unconstrained" else 0.0
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} | {count} | {cost:.0f} | {share:.1%} |")


if __name__ == "__main__":
    main()
