"""What attention recording and emphasis cost the decode step when they are off.

    python benchmarks/bench_attention_overhead.py [-m MODEL] [--runs 7] [--gen 32] [--depth 512]

The kernels take two extra arguments for these tools (`record`, and the emphasis `bias`); off, the
kernel skips the copy of the weights and the bias loop (one branch per (token, head)), and the model
allocates no bias. To see what that costs, this compares against the attention kernels as they were
before emphasis existed: kernels/attention.py from the most recent git commit whose version has no
`bias`, compiled from that source in this process.

1. kernel: one decode step's attention (SmolLM2's shapes: 9 heads, 3 kv heads, head_dim 64, one
   token attending to --depth cached positions), `attention_parallel` (and the serial `attention`,
   free of thread wake-ups) now (record off, no bias) vs before; median microseconds per call of
   --runs interleaved rounds of 2000 calls.
2. decode: tok/s of --gen greedy steps after a short prompt (benchmarks/common.py's decode_rate),
   interleaved rounds: before (the old kernel, called through a wrapper that drops the bias
   argument: ~0.1 us per layer, which if anything favours "off"), off, recording on (a hook that
   keeps nothing), emphasis on (a bias in every layer). Medians of --runs; the slowdown is the
   median of each round's off/before ratio (the two run back to back, so a machine that is busier
   for a while slows both alike).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

KERNEL = "llamarun/kernels/attention.py"


def kernels_before_emphasis():
    """The attention kernel module of the latest commit whose attention.py has no bias, or None."""
    try:
        revs = subprocess.run(["git", "log", "--format=%H", "--", KERNEL], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.split()
        for rev in revs:
            source = subprocess.run(["git", "show", f"{rev}:{KERNEL}"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout
            if "bias" not in source:
                folder = Path(tempfile.mkdtemp(prefix="llamarun-attention-"))
                (folder / "attention_before.py").write_text(source)
                spec = importlib.util.spec_from_file_location("attention_before", folder / "attention_before.py")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return rev[:10], module
    except (OSError, subprocess.CalledProcessError):
        pass
    return None, None


def kernel_inputs(depth: int, H=9, KV=3, D=64):
    from llamarun.kernels.attention import BLOCK, key_blocks
    rng = np.random.default_rng(0)
    S = depth + 1
    q = rng.standard_normal((1, H, D), np.float32)
    k = rng.standard_normal((1, KV, D), np.float32)
    v = rng.standard_normal((1, KV, D), np.float32)
    cos, sin = np.ones((1, D // 2), np.float32), np.zeros((1, D // 2), np.float32)
    k_cache = rng.standard_normal((1, KV, key_blocks(S), D, BLOCK), np.float32)
    v_cache = rng.standard_normal((1, KV, S, D), np.float32)
    seq_ids, pos = np.zeros(1, np.int64), np.array([depth], np.int64)
    out, probs = np.empty((1, H, D), np.float32), np.zeros((1, 1, 1), np.float32)
    return q, k, v, cos, sin, k_cache, v_cache, seq_ids, pos, out, probs


def per_call_us(fn, calls=2000) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", help="model file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--depth", type=int, default=512, help="cached positions in the kernel measurement")
    args = p.parse_args()

    import llamarun
    import llamarun.model as model_module
    from common import decode_rate
    from llamarun.kernels.attention import attention, attention_parallel
    from llamarun.inspect.emphasis import emphasis_bias
    from llamarun.model import Probe

    rev, before = kernels_before_emphasis()
    if before is None:
        print("no commit of kernels/attention.py without the bias found: only the current kernels are measured")

    # 1. the kernel alone
    inputs = kernel_inputs(args.depth)
    empty = np.zeros(0, np.float32)
    calls = {"off (now)": lambda: attention_parallel(*inputs, False, empty),
             "serial, off (now)": lambda: attention(*inputs, False, empty)}
    if before is not None:
        calls[f"before ({rev})"] = lambda: before.attention_parallel(*inputs, False)
        calls[f"serial, before ({rev})"] = lambda: before.attention(*inputs, False)
    for fn in calls.values():
        per_call_us(fn, 10)                           # compile, warm
    times = {name: [] for name in calls}
    for _ in range(args.runs):
        for name, fn in calls.items():
            times[name].append(per_call_us(fn))
    print(f"attention_parallel, one decode token at depth {args.depth} (us per call, median of {args.runs}):")
    for name, t in times.items():
        print(f"  {name:24s} {np.median(t):8.2f}   (min {min(t):.2f}, max {max(t):.2f})")
    if before is not None:
        for kind in ("", "serial, "):
            paired = np.array(times[f"{kind}off (now)"]) / np.array(times[f"{kind}before ({rev})"])
            print(f"  {kind}off / before, time per call: median of the rounds' ratios {np.median(paired):.4f}")

    # 2. whole decode steps
    llama = llamarun.load(args.model)
    model, config = llama.model, llama.config
    all_layers = emphasis_bias(config, [([1, 2, 3], 5.0, None)])
    plain_kernels = (model_module.attention_kernel, model_module.attention_parallel)

    probe = None

    def use(kernels=plain_kernels, hook=None, bias=None):
        nonlocal probe
        model_module.attention_kernel, model_module.attention_parallel = kernels
        probe = Probe(attention=hook, bias=bias)

    modes = {}
    if before is not None:
        old = (lambda *a: before.attention(*a[:-1]), lambda *a: before.attention_parallel(*a[:-1]))
        modes[f"before ({rev})"] = lambda: use(kernels=old)
    modes["off (now)"] = lambda: use()
    modes["recording on"] = lambda: use(hook=lambda layer, batch, probs: None)
    modes["emphasis on"] = lambda: use(bias=all_layers)
    for setup in modes.values():                    # compile and warm every path
        setup()
        decode_rate(model, 2, probe)
    rates = {name: [] for name in modes}
    for _ in range(args.runs):
        for name, setup in modes.items():
            setup()
            rates[name].append(decode_rate(model, args.gen, probe))
    use()
    print(f"decode, {args.gen} tokens after a short prompt, {Path(str(llama.checkpoint.path)).name} "
          f"(tok/s, median of {args.runs} interleaved runs):")
    for name, r in rates.items():
        print(f"  {name:24s} {np.median(r):8.2f}   (min {min(r):.2f}, max {max(r):.2f})")
    if before is not None:
        paired = np.array(rates["off (now)"]) / np.array(rates[f"before ({rev})"])
        ratio = np.median(paired)
        print(f"  off / before, tok/s: median of the rounds' ratios {ratio:.4f} (slowdown {100 * (1 - ratio):+.2f}%); "
              f"ratio of the medians {np.median(rates['off (now)']) / np.median(rates[f'before ({rev})']):.4f}")


if __name__ == "__main__":
    main()
