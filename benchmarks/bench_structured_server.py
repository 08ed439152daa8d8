"""8 constrained streams against 8 free ones in `llamarun serve`: aggregate tok/s (issue 21, point 5).

Starts `python -m llamarun serve --parallel 8` on a free loopback port and sends 8 streaming chat
requests at once, greedy, each a fixed number of tokens, in two ways taken in turn: free text
(`ignore_eos`, as bench_server.py) and under a JSON schema (`response_format` json_schema) that
cannot end before max_tokens (a string of at least MIN_LENGTH characters), so both take the same
number of tokens. The figure is tokens drawn / wall time of the round; the median of the rounds is
printed per way, and their ratio (the target is 0.85 or more).

    python benchmarks/bench_structured_server.py            # 64 tokens a request, 5 rounds each
    python benchmarks/bench_structured_server.py --quick    # 32 tokens, 2 rounds
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from bench_server import free_port, one_stream, request_prompt

STREAMS = 8
MIN_LENGTH = 1000
# One long string: after the forced opening '{"story": "' every token is drawn under the mask, so the
# figure is the masks' cost (a schema of many short fields would force its keys and punctuation, and
# run faster than free text: forced tokens take no forward of their own).
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": MIN_LENGTH}},
          "required": ["story"], "additionalProperties": False}


def round_tok_s(client: httpx.Client, url: str, max_tokens: int, first: int, constrained: bool) -> float:
    extra = {"response_format": {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA}}} \
        if constrained else {}
    prompts = [request_prompt(first + i) + " Answer in JSON." for i in range(STREAMS)]
    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(lambda p: one_stream(client, url, p, max_tokens, extra), prompts))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = [r["tokens"] for r in results]
    assert all(t == max_tokens for t in tokens), f"a stream ended early: {tokens}"
    return sum(tokens) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="32 tokens, 2 rounds")
    ap.add_argument("-n", type=int, help="tokens per request (default 64; 32 with --quick)")
    ap.add_argument("--rounds", type=int, help="rounds per way (default 5; 2 with --quick)")
    args = ap.parse_args()
    max_tokens = args.n or (32 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 5)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "llamarun", "serve", "--port", str(port), "--parallel",
                               str(STREAMS), "--ctx", "512"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
    free, constrained = [], []
    try:
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                if server.poll() is not None:
                    sys.exit("the server did not start")
            time.sleep(0.2)
        n = 0
        for way in (False, True):                     # warm up: batch shapes, the schema's compile
            round_tok_s(client, url, 8, n, way)
            n += STREAMS
        for _ in range(rounds):                       # in turn, so that the machine's load hits both alike
            for way, out in ((False, free), (True, constrained)):
                out.append(round_tok_s(client, url, max_tokens, n, way))
                n += STREAMS
    finally:
        client.close()
        server.terminate()
        server.wait(30)
    f, c = float(np.median(free)), float(np.median(constrained))
    print(f"SmolLM2-135M-Instruct Q4_1, {STREAMS} concurrent streams of {max_tokens} tokens, greedy, "
          f"median of {rounds} rounds")
    print(f"free text:             {f:.1f} tok/s aggregate  (rounds: {', '.join(f'{x:.1f}' for x in free)})")
    print(f"json_schema, enforced: {c:.1f} tok/s aggregate  (rounds: {', '.join(f'{x:.1f}' for x in constrained)})")
    print(f"constrained / free: {c / f:.2f}x")


if __name__ == "__main__":
    main()
