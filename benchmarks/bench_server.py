"""Throughput and latency of `llamarun serve` on SmolLM2 at concurrency 1, 2, 4, 8, 16.

Starts `python -m llamarun serve` on a free loopback port, sends `concurrency` streaming chat requests
at a time (each a prompt from PROMPTS, greedy, a fixed number of tokens: `ignore_eos`, llama.cpp's
extension, as serving benchmarks fix the output length; else a request that drew its end-of-turn
token early would leave the others of its round to finish with fewer streams), and prints per level:
aggregate generated tok/s, p50/p95 time to first token, p50/p95 inter-token latency; and the
one stream's rates beside `llamarun generate`'s (the API's generation loop), like for like: the decode
rate (first token to last) and the whole rate (request to last token; generate: prefill and decode).

    python benchmarks/bench_server.py            # 64 tokens per request, 2 rounds per level
    python benchmarks/bench_server.py --quick    # 16 tokens, 1 round, concurrency 1, 4, 8
    python benchmarks/bench_server.py --llama-server PATH   # llama.cpp's server beside ours
    python benchmarks/bench_server.py --peer URL            # any OpenAI-style server beside ours

A peer server gets the same client and the same requests, its rounds alternated with ours level by
level, and the table gains its aggregate and our ratio to it. --llama-server starts llama.cpp's
`llama-server` on the same model file with as many slots as the highest level (`-np`, against our
`--parallel`), the same context per slot and the same threads; --peer takes a server already running.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "What is the capital of France?",
    "Give me three tips for learning to cook.",
    "Describe a sunset in two sentences.",
    "How do airplanes stay in the air?",
    "Tell me a fun fact about octopuses.",
    "What is photosynthesis?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_prompt(n: int) -> str:
    """Request n's user message: one of PROMPTS behind a number, so that no two requests are the same
    (a repeated prompt would be found whole in the server's prompt cache). What requests share, as
    they do in use, is the chat template's system prompt."""
    return f"Request {n}: {PROMPTS[n % len(PROMPTS)]}"


def _sent(client: httpx.Client, url: str, body: dict):
    """The streamed response to a POST, sent again (once) when the server closed the kept-alive
    connection it went out on before answering, as the OpenAI client retries: llama-server (cpp-httplib)
    closes a connection after 5 requests, and a request can leave on it just as it does."""
    try:
        response = client.send(client.build_request("POST", url, json=body), stream=True)
    except httpx.RemoteProtocolError:
        response = client.send(client.build_request("POST", url, json=body), stream=True)
    return contextlib.closing(response)


def one_stream(client: httpx.Client, url: str, prompt: str, max_tokens: int, extra: dict | None = None) -> dict:
    """One streamed request; extra: more body fields (bench_structured_server.py's response_format)."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    times, tokens, cached, prompt_tokens = [], 0, 0, 0
    with _sent(client, url + "/v1/chat/completions", body) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
    # rates count the tokens drawn (the usage the server reports, as `generate` counts them), not the
    # chunks: a token whose bytes end inside a UTF-8 character sends no text of its own
    return {"ttft": times[0] - t0 if times else float("nan"), "gaps": np.diff(times).tolist(), "tokens": tokens,
            "chunks": len(times), "cached": cached, "prompt_tokens": prompt_tokens, "start": t0, "end": time.perf_counter(),
            "decode": (tokens - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")}


def level(client: httpx.Client, url: str, concurrency: int, max_tokens: int, rounds: int, first: int) -> dict:
    jobs = [request_prompt(first + i) for i in range(concurrency * rounds)]
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_stream(client, url, p, max_tokens), jobs))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    ttft = [r["ttft"] for r in results]
    return {"concurrency": concurrency, "tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft50": np.percentile(ttft, 50), "ttft95": np.percentile(ttft, 95),
            "itl50": np.percentile(gaps, 50) if gaps else float("nan"),
            "itl95": np.percentile(gaps, 95) if gaps else float("nan"),
            "decode": float(np.median([r["decode"] for r in results])),
            "cached": sum(r["cached"] for r in results) / len(results),
            "prompt_tokens": sum(r["prompt_tokens"] for r in results) / len(results)}


def generate_rates(max_tokens: int) -> tuple[float, float]:
    """One stream through the API's generation loop (what `llamarun generate` runs), one request of each
    prompt of PROMPTS: the medians of (decode tok/s, tokens / whole time including the prompt's prefill,
    from an empty cache)."""
    import llamarun
    from llamarun.chat import chat_format_for
    llama = llamarun.load()
    encode = chat_format_for(llama).encode
    llama.generate(encode([{"role": "user", "content": PROMPTS[0]}], llama.tokenizer), 4, temperature=0)  # warm up
    decode, whole = [], []
    for prompt in map(request_prompt, range(len(PROMPTS))):
        c = llama.generate(encode([{"role": "user", "content": prompt}], llama.tokenizer), max_tokens, temperature=0,
                           ignore_eos=True)
        decode.append(c.decode_tok_s)
        whole.append(len(c.tokens) / (c.prefill_seconds + c.decode_seconds))
    return float(np.median(decode)), float(np.median(whole))


CONTEXT = 512           # tokens per sequence slot, both servers


def start_llamarun(port: int, slots: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llamarun", "serve", "--port", str(port), "--parallel", str(slots),
                             "--ctx", str(CONTEXT)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama_server(tool: str, port: int, slots: int) -> subprocess.Popen:
    """llama.cpp's server on the default model: `slots` slots of CONTEXT tokens each (its -c is the
    total), as many threads as this machine's cores (llamarun's default)."""
    from llamarun.hub import ensure_default_model
    threads = str(len(os.sched_getaffinity(0)))
    return subprocess.Popen([tool, "-m", str(ensure_default_model()), "--port", str(port), "-np", str(slots),
                             "-c", str(CONTEXT * slots), "-t", threads, "-tb", threads],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(url: str, server: subprocess.Popen | None) -> None:
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:    # 503 while the kernels (or model) load
                return
        except httpx.TransportError:
            if server is not None and server.poll() is not None:
                sys.exit(f"the server at {url} did not start")
        time.sleep(0.2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 tokens, one round, concurrency 1, 4, 8")
    ap.add_argument("-n", type=int, help="tokens per request (default 64; 16 with --quick)")
    ap.add_argument("--levels", help="comma-separated concurrency levels (default 1,2,4,8,16; --quick 1,4,8)")
    ap.add_argument("--rounds", type=int, help="rounds per level (default 2; --quick 1)")
    peer = ap.add_mutually_exclusive_group()
    peer.add_argument("--peer", metavar="URL", help="an OpenAI-style server to measure beside ours")
    peer.add_argument("--llama-server", metavar="PATH", help="llama.cpp's llama-server, started here as the peer")
    args = ap.parse_args()
    levels = [int(c) for c in args.levels.split(",")] if args.levels else [1, 4, 8] if args.quick else [1, 2, 4, 8, 16]
    max_tokens = args.n or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 2)
    servers, urls = {}, {}                                  # name -> the process we started, its URL
    port = free_port()
    servers["llamarun"], urls["llamarun"] = start_llamarun(port, max(levels)), f"http://127.0.0.1:{port}"
    # one client for all the requests of a level, as an application keeps its OpenAI client: its
    # connections are kept alive, and making an httpx client costs ~40 ms of CPU (its TLS context),
    # which would otherwise count in every request's time to first token and take the server's cores.
    # A new one for each level: both servers close a connection idle for 5 s (uvicorn's and
    # cpp-httplib's default), as they are while the other server's level runs, and a request sent on
    # one just as it closes fails ("Server disconnected without sending a response").
    def client() -> httpx.Client:
        return httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))

    try:           # (the peer starts in here: our server is stopped if it cannot start)
        if args.llama_server:
            port = free_port()
            servers["peer"], urls["peer"] = (start_llama_server(args.llama_server, port, max(levels)),
                                             f"http://127.0.0.1:{port}")
        elif args.peer:
            urls["peer"] = args.peer.rstrip("/")
        rows = {name: [] for name in urls}
        for name, url in urls.items():
            wait_healthy(url, servers.get(name))
        n = 0                                                               # requests sent so far
        for name, url in urls.items():                                      # compile every batch shape first
            with client() as c_:
                for c in levels:
                    level(c_, url, c, 4, 1, n)
                    n += c
        for c in levels:                                                    # the servers alternate, level by level
            for name, url in urls.items():
                with client() as c_:
                    rows[name].append(level(c_, url, c, max_tokens, rounds, n))
                n += c * rounds
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(30)
    decode, whole = generate_rates(max_tokens)
    ours, one = rows["llamarun"], rows["llamarun"][0]
    print(f"SmolLM2-135M-Instruct Q4_1, {max_tokens} tokens per request, greedy; prompts of "
          f"{ours[-1]['prompt_tokens']:.1f} tokens on average, of which {ours[-1]['cached']:.1f} found in the prompt cache.")
    print(f"One stream, like for like: decode {one['decode']:.1f} tok/s served vs {decode:.1f} by `llamarun generate` "
          f"({one['decode'] / decode:.0%}); prompt to last token {one['tok_s']:.1f} served vs {whole:.1f} "
          f"({one['tok_s'] / whole:.0%})")
    from llamarun.bench import cpu_summary
    print(cpu_summary())
    theirs = rows.get("peer")
    if theirs:
        print(f"peer: {args.llama_server or args.peer}, the same client and requests, its rounds alternated with ours")
    head = "| concurrency | aggregate tok/s | x one stream | per-stream decode tok/s | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) |"
    print(head + (" peer tok/s | peer x one stream | ours / peer |" if theirs else ""))
    print("| ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if theirs else ""))
    for i, r in enumerate(ours):
        line = (f"| {r['concurrency']} | {r['tok_s']:.1f} | {r['tok_s'] / one['tok_s']:.2f} | {r['decode']:.1f} | "
                f"{r['ttft50'] * 1e3:.0f} / {r['ttft95'] * 1e3:.0f} | {r['itl50'] * 1e3:.0f} / {r['itl95'] * 1e3:.0f} |")
        if theirs:
            p = theirs[i]
            line += f" {p['tok_s']:.1f} | {p['tok_s'] / theirs[0]['tok_s']:.2f} | {r['tok_s'] / p['tok_s']:.2f}x |"
        print(line)


if __name__ == "__main__":
    main()
