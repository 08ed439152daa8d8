"""Decode speed when another process keeps a core busy, against a quiet machine.

    python benchmarks/bench_contention.py [-m MODEL] [--rounds 3] [-n 64]

Each measurement is a fresh `llamarun bench -p 0 -n N -r 3` (SmolLM2 by default), its median tok/s.
Three thread settings: `--threads 1`; `--threads 2` held fixed (LLAMARUN_ADAPT_THREADS=0: every
forward on both threads, as before llamarun/threads.py); and the default (both threads, or one when
one is faster now). Each runs on a quiet machine and beside one competing busy process (a Python
loop that never sleeps, as a second program would be). The settings alternate, --rounds rounds, and
the table gives the median of the rounds with their range. Issue 19's goal: contended, the default
is at least the one-thread rate; quiet, it is the two-thread rate.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys

SETTINGS = {                       # name -> (extra arguments, extra environment)
    "1 thread": (["--threads", "1"], {}),
    "2 threads, fixed": (["--threads", "2"], {"LLAMARUN_ADAPT_THREADS": "0"}),
    "default": ([], {}),
}


def bench(model: str | None, n: int, extra: list[str], env: dict) -> float:
    cmd = [sys.executable, "-m", "llamarun", "bench", "-p", "0", "-n", str(n), "-r", "3", *extra]
    if model:
        cmd += ["-m", model]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True).stdout
    row = next(line for line in out.splitlines() if f"| tg{n} |" in line)
    return float(re.split(r"\s*\|\s*", row.strip(" |"))[-2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=None, help="model file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("-n", type=int, default=64, help="tokens per decode run (default 64)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"{cpu}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at the start", flush=True)

    results = {(name, busy): [] for name in SETTINGS for busy in (False, True)}
    for r in range(args.rounds):
        for busy in (False, True):
            competitor = (subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None)
            try:
                for name, (extra, env) in SETTINGS.items():
                    rate = bench(args.model, args.n, extra, env)
                    results[name, busy].append(rate)
                    print(f"  round {r + 1}, {'contended' if busy else 'quiet'}, {name}: {rate:.1f} tok/s", flush=True)
            finally:
                if competitor:
                    competitor.kill()
                    competitor.wait()

    print(f"\ndecode tok/s (`llamarun bench -p 0 -n {args.n} -r 3`), median [min-max] of {args.rounds} rounds\n")
    print("| threads | quiet | one busy process |")
    print("| --- | ---: | ---: |")
    for name in SETTINGS:
        cells = []
        for busy in (False, True):
            xs = results[name, busy]
            cells.append(f"{statistics.median(xs):.1f} [{min(xs):.1f}-{max(xs):.1f}]")
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
