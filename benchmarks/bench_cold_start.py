"""Cold start: a new process, from its start to the first generated token, and its peak memory.

    python benchmarks/bench_cold_start.py [-m MODEL] [--runs 5]

Each run is a fresh `python` process that imports llamarun, loads the model (default: SmolLM2-135M-
Instruct Q4_1), reads a short prompt and draws one token; the time is the wall clock from before the
process starts to that token, as a user waits for it. Two cases:
- warm: numba's on-disk cache of compiled kernels is filled (the normal case after the first run on a
  machine); median of --runs runs, min and max beside;
- first ever: the same with an empty cache directory (NUMBA_CACHE_DIR pointed at a new folder), so
  every kernel compiles: what the first run on a new machine pays, once.
Beside each: the process's peak resident memory (VmHWM) against the model file's size.

Then the README's first command as a new user runs it, `llamarun generate "Once upon a time"` (256
tokens), with an empty kernel cache and the model downloaded: the times from the process's start to
its first line on stderr saying kernels compile, to the first generated text, and to its end (the
last token). Issue 19's goal for that last one: 45 s or less on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time
import llamarun
llm = llamarun.load(sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None)
stream = llm.stream("Once upon a time", 1, temperature=0)
next(iter(stream))
print("FIRST_TOKEN", time.time())
for line in open("/proc/self/status"):
    if line.startswith("VmHWM"):
        print("PEAK_KB", line.split()[1])
"""


def run_once(model: str | None, env: dict) -> tuple[float, float]:
    """(seconds from process start to first token, peak RSS MiB) of one fresh process."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, model or ""], env=env, capture_output=True, text=True,
                         check=True).stdout
    fields = dict(line.split(" ", 1) for line in out.splitlines() if line.startswith(("FIRST_TOKEN", "PEAK_KB")))
    return float(fields["FIRST_TOKEN"]) - start, int(fields["PEAK_KB"]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default=None, help="model file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from llamarun.hub import ensure_default_model
    model = args.model or str(ensure_default_model())
    size = os.path.getsize(model) / 2**20

    env = dict(os.environ)
    run_once(model, env)                                  # fills the kernel cache if it is empty
    warm = [run_once(model, env) for _ in range(args.runs)]
    with tempfile.TemporaryDirectory() as cache:
        first, first_peak = run_once(model, {**env, "NUMBA_CACHE_DIR": cache})

    with tempfile.TemporaryDirectory() as cache:
        timeline = readme_command({**env, "NUMBA_CACHE_DIR": cache})

    seconds = [s for s, _ in warm]
    print(f"model {os.path.basename(model)} ({size:.0f} MiB)")
    print(f"cold start, kernel cache warm: {statistics.median(seconds):.2f} s median "
          f"[{min(seconds):.2f} - {max(seconds):.2f}] over {args.runs} runs; "
          f"peak RSS {statistics.median(p for _, p in warm):.0f} MiB")
    print(f"first ever (kernels compiling): {first:.1f} s; peak RSS {first_peak:.0f} MiB")
    print("the README's first command, first ever: compile notice at {notice}, first text at {text}, last token at "
          "{end} (exit {rc}); its stats line: {stats}".format(**timeline))


def readme_command(env: dict) -> dict:
    """Run `llamarun generate "Once upon a time"` (as python -m llamarun), timing its first compile
    notice on stderr, its first generated text on stdout (after the echoed prompt) and its exit."""
    import selectors
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "llamarun", "generate", "Once upon a time"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marks, out, err = {}, b"", b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    while open_streams:
        for key, _ in sel.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                open_streams -= 1
                continue
            now = time.time() - start
            if key.data == "out":
                out += chunk
                if "text" not in marks and len(out) > len("Once upon a time"):
                    marks["text"] = now
            else:
                err += chunk
                if "notice" not in marks and b"compiling" in err:
                    marks["notice"] = now
    rc = proc.wait()
    end = time.time() - start
    stats = next((line for line in err.decode(errors="replace").splitlines() if line.startswith("prompt:")), "-")
    fmt = lambda key: f"{marks[key]:.1f} s" if key in marks else "never"   # noqa: E731
    return {"notice": fmt("notice"), "text": fmt("text"), "end": f"{end:.1f} s", "rc": rc, "stats": stats}


if __name__ == "__main__":
    main()
