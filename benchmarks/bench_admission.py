"""A long prompt admitted beside a running stream (the scheduler's chunked prefill): how the stream's
gaps between tokens grow while the prompt goes in, against its gaps before. One stream decodes
greedily (ignore_eos); after its first tokens a prompt of --prompt tokens is submitted; printed per
run: the stream's median gap before the submission (decode-only steps), its median and longest gap
until the prompt's first token, the longest against the median before, and how many tokens it drew
meanwhile. tests/test_server_batching.py
checks the counts (a token per step); the times are this script's.

    python benchmarks/bench_admission.py                 # SmolLM2 fast path, 2000 tokens, 3 runs
    python benchmarks/bench_admission.py --runs 5 --exact
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

import llamarun
from llamarun.sampling import Sampler
from llamarun.server.scheduler import Request, Scheduler

WARM = 40           # stream tokens before the submission: past the decode-only steps the scheduler times


def one_run(llama, n_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (the stream's token times before the submission, those from it to the prompt's first token)"""
    scheduler = Scheduler(llama, parallel=2, ctx=n_prompt + 100)
    stamps, warm, first = [], threading.Event(), threading.Event()

    def stream_event(ev):
        stamps.append(time.perf_counter())
        if len(stamps) >= WARM:
            warm.set()
    scheduler.submit(Request([1, 500, 600], n_prompt + 90, Sampler(temperature=0), stream_event, ignore_eos=True))
    scheduler.start()
    try:
        if not warm.wait(300):
            raise SystemExit("the stream did not start within 300 s")
        submitted = time.perf_counter()
        ends = []
        scheduler.submit(Request(list(range(1000, 1000 + n_prompt)), 1, Sampler(temperature=0),
                                 lambda ev: (ends.append(time.perf_counter()), first.set())))
        if not first.wait(300):
            raise SystemExit("the long prompt got no token within 300 s")
    finally:
        scheduler.stop()
    t = np.array(stamps)
    return t[(t >= t[10]) & (t < submitted)], t[(t >= submitted) & (t <= ends[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=2000, help="tokens in the admitted prompt")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--exact", action="store_true", help="float32 activations (the exact path)")
    args = ap.parse_args()
    llama = llamarun.load(exact=args.exact)
    print(f"SmolLM2, {'exact' if args.exact else 'fast'} path, a {args.prompt}-token prompt beside one stream")
    print("| run | gap before, median ms | gap during, median ms | longest ms | longest / median before | "
          "stream tokens during |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in range(args.runs):
        before, during = one_run(llama, args.prompt)
        gaps, base = np.diff(during), float(np.median(np.diff(before)))
        print(f"| {run + 1} | {base * 1e3:.1f} | {np.median(gaps) * 1e3:.1f} | {gaps.max() * 1e3:.1f} | "
              f"{gaps.max() / base:.2f} | {len(during)} |")


if __name__ == "__main__":
    main()
