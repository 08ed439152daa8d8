"""A long prompt on SmolLM2's fast path two ways, interleaved run by run: in parts of 128 tokens
through the one-call forward (kernels/step.py; int8 activations, the group kernels share each weight
block among the rows) and whole through the layer-by-layer path (weight tiles dequantized for BLAS),
with numpy's sgemm rate on the same shapes beside them as the compute bound of the BLAS path.

    python benchmarks/bench_prompt_parts.py                 # 512 tokens, 5 runs
    python benchmarks/bench_prompt_parts.py --tokens 2048 --runs 3

The model takes the parts way by default where every matrix has a group kernel
(CompiledForward.takes_prompts); this script switches it off for the other runs.
"""
from __future__ import annotations

import argparse
import statistics

import llamarun

from common import SgemmBound, prefill_rate, settled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="prompt length")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    model = llamarun.load().model
    compiled = model.compiled_forward()
    if compiled is None or not compiled.takes_prompts:
        raise SystemExit("the model's matrices are not all Q8_0 / Q4_0 / Q4_1 on the fast path: no parts to compare")
    bound = SgemmBound(model.w, args.tokens)
    rates = {True: [], False: []}
    for _ in range(args.runs + 1):                  # the first of each: warm-up, dropped
        for parts in (True, False):
            compiled.takes_prompts = parts
            rates[parts].append(settled(lambda: prefill_rate(model, args.tokens)))
    compiled.takes_prompts = True
    gflops = settled(bound.measure)
    parts, whole = statistics.median(rates[True][1:]), statistics.median(rates[False][1:])
    print(f"SmolLM2 Q4_1, fast path, a {args.tokens}-token prompt, medians of {args.runs} interleaved runs")
    print(f"parts of {compiled.rows} (one-call forward): {parts:.1f} tok/s")
    print(f"whole (BLAS tiles):               {whole:.1f} tok/s   (sgemm at these shapes: {gflops:.0f} GFLOP/s)")
    print(f"parts / whole: {parts / whole:.2f}")


if __name__ == "__main__":
    main()
