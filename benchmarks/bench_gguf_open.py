"""Opening a GGUF file: llamarun's reader against the `gguf` package's GGUFReader; and dequantizing.

    python benchmarks/bench_gguf_open.py [--model PATH] [--runs 5]

Opening, per reader: the median (min and max beside) of `--runs` opens, each in a fresh Python
process (so no run finds the previous one's objects or imports), of
- llamarun: `llamarun.formats.gguf.load` (header, metadata as Python values, config, tensor views);
- GGUFReader: `gguf.GGUFReader(path)`, which parses the header into numpy views, one or more per
  metadata value and per string;
- GGUFReader + contents(): the same, then `field.contents()` of every field: the metadata as
  Python values, which is what llamarun's reader returns.
Time is the open call alone (imports done before); RSS is the growth of the process's resident
memory across it (/proc/self/status VmRSS), which counts the pages of the file that were read
as well as the Python objects made.

Dequantizing: a (576, 1536) matrix (SmolLM2's ffn_down shape) of random values quantized by gguf,
our numpy dequantizer against gguf's `gguf.quants.dequantize`, median of 20 after a warm-up.
The model defaults to SmolLM2-135M-Instruct.Q4_1.gguf in $LLAMARUN_HOME/models, then /tmp/smol.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
READERS = ("llamarun", "GGUFReader", "GGUFReader + contents()")


def default_model() -> Path | None:
    home = Path(os.environ.get("LLAMARUN_HOME", "~/.cache/llamarun")).expanduser()
    for folder in (home / "models", Path("/tmp/smol")):
        if (folder / SMOL_FILE).is_file():
            return folder / SMOL_FILE
    return None


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(reader: str, path: str) -> None:
    """One open in this (fresh) process; prints {"seconds": ..., "rss_mb": ...} as JSON."""
    import gguf
    from llamarun.formats import gguf as ours

    before = rss_mb()
    start = time.perf_counter()
    if reader == "llamarun":
        opened = ours.load(path)
    else:
        opened = gguf.GGUFReader(path)
        if reader == "GGUFReader + contents()":       # the reader stays alive, as it would in use
            opened = opened, {key: field.contents() for key, field in opened.fields.items()}
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_mb": rss_mb() - before}))
    del opened


def measure_open(reader: str, path: Path, runs: int) -> tuple[list[float], list[float]]:
    seconds, rss = [], []
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for _ in range(runs):
        result = subprocess.run([sys.executable, __file__, "--child", reader, str(path)], env=env,
                                capture_output=True, text=True, check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        seconds.append(figures["seconds"])
        rss.append(figures["rss_mb"])
    return seconds, rss


def spread(values: list[float], scale: float, digits: int) -> str:
    med, lo, hi = (scale * v for v in (statistics.median(values), min(values), max(values)))
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def measure_dequantize(repeats: int = 20) -> list[tuple[str, float, float]]:
    import numpy as np
    import gguf
    from llamarun.tensors import DEQUANTIZERS

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    values = np.random.default_rng(0).standard_normal((576, 1536)).astype(np.float32)
    rows = []
    for qtype in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        raw = gguf.quants.quantize(values, qtype)                 # (576, bytes per row) uint8
        ours, theirs = DEQUANTIZERS[qtype], lambda r, q=qtype: gguf.quants.dequantize(r, q)
        assert np.array_equal(ours(raw), theirs(raw))
        rows.append((qtype.name, median_ms(lambda: ours(raw)), median_ms(lambda: theirs(raw))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2 Q4_1)")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per reader")
    parser.add_argument("--child", nargs=2, metavar=("READER", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    path = args.model or default_model()
    if path is None:
        sys.exit(f"{SMOL_FILE} not found in $LLAMARUN_HOME/models or /tmp/smol: pass --model PATH")

    print(f"opening {path.name} ({path.stat().st_size / 2**20:.0f} MiB), median (min-max) of {args.runs} "
          "fresh processes")
    print(f"{'reader':<26} {'open ms':>24} {'RSS growth MiB':>24}")
    for reader in READERS:
        seconds, rss = measure_open(reader, path, args.runs)
        print(f"{reader:<26} {spread(seconds, 1e3, 1):>24} {spread(rss, 1, 1):>24}")

    print("\ndequantize a (576, 1536) matrix, ms (median of 20)")
    print(f"{'type':<8} {'llamarun':>10} {'gguf':>10} {'speed-up':>10}")
    for name, ours, theirs in measure_dequantize():
        print(f"{name:<8} {ours:>10.2f} {theirs:>10.2f} {theirs / ours:>9.1f}x")


if __name__ == "__main__":
    main()
