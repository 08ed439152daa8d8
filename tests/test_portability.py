"""The kernels on the most generic CPU numba compiles for (NUMBA_CPU_NAME=generic: on x86-64, SSE2 and
nothing after it), as on an x86 CPU without AVX2 or F16C, or a CPU that is not x86 at all: every
x86-only instruction has a portable path (kernels/cpu.py says which), and it must compute the same
numbers. Each test runs in a subprocess (a target is chosen once per process) with a numba cache of
its own (targets_cache: the cached code of the host's target must not answer for it) that the other-CPU
runs share, so a kernel compiles once per target: the checks use the fewest, smallest kernels that reach
each portable path.
"""
import contextlib
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, load_golden, logits_tolerance, require

ROOT = Path(__file__).resolve().parents[1]


def targets_cache() -> str:
    """The numba cache of the other-CPU runs: beside the host's kernels ($LLAMARUN_HOME/kernels), in a
    folder of its own, kept as the host's are: a second session (a warm CI run) loads what the first
    compiled for the same kernel sources (kernels/__init__.py names the folder for them) and target
    (numba keys its cache by the target CPU and features too, so targets never share machine code)."""
    from llamarun.hub import home
    folder = home() / "kernels" / "other-cpus"
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder)


@contextlib.contextmanager
def one_run_at_a_time():
    """Hold the other-CPU cache's lock for one run. Why: two test sessions at once (.ci/run warms this
    cache in a session beside the suite's) would otherwise compile the same kernels for the same target
    side by side, each on a core; with the lock, the second run waits and loads what the first
    compiled."""
    with open(Path(targets_cache()) / "runs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run_generic(tmp_path, code: str, cpu=("generic", "")) -> dict:
    """Run `code` (which prints one JSON object last) compiled for the CPU named (NUMBA_CPU_NAME, with
    the features NUMBA_CPU_FEATURES; generic with none: the baseline), with the other CPUs' numba cache
    (targets_cache), never the host's kernels."""
    env = {**os.environ, "NUMBA_CPU_NAME": cpu[0], "NUMBA_CPU_FEATURES": cpu[1],
           "NUMBA_CACHE_DIR": targets_cache(),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with one_run_at_a_time():
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_generic_target_takes_the_portable_paths(tmp_path):
    out = run_generic(tmp_path, """
        import json
        from llamarun.kernels import cpu, ggml
        print(json.dumps({"avx2": ggml.AVX2, "vnni": ggml.VNNI, "f16c": cpu.F16C, "native_half": cpu.NATIVE_HALF,
                          "target": cpu.target_name(), "fast": cpu.fast_kernels_available()}))
    """)
    assert out["target"] == "generic"
    assert not out["avx2"] and not out["vnni"] and not out["f16c"]
    assert out["native_half"] == (os.uname().machine in ("aarch64", "arm64"))
    assert out["fast"][0], out["fast"][1]


def test_half_conversions_without_f16c_are_numpys(tmp_path):
    """Every half widens to numpy's float32 (NaNs to NaNs), scalars and 8-lane vectors (as ggml's group
    kernels read scales); floats around every half, halfway points, subnormals, overflow narrow to
    numpy's astype(np.float16) (round to nearest even), through the cache's own `_narrow`."""
    bits = np.arange(1 << 16, dtype=np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    finite = ref[np.isfinite(ref)]
    rng = np.random.default_rng(0)
    values = np.concatenate([finite, np.nextafter(finite, np.float32(np.inf)), np.nextafter(finite, np.float32(-np.inf)),
                             (finite[:-1] + finite[1:]) / 2,                  # halfway points (and more)
                             rng.standard_normal(20000).astype(np.float32) * np.float32(1e-6),
                             np.array([65504, 65519.99, 65520, 65536, 1e9, np.inf, -np.inf], np.float32)])
    values = values[~np.isnan(values)].astype(np.float32)
    np.save(tmp_path / "values.npy", values)
    run_generic(tmp_path, """
        import json
        import numba
        import numpy as np
        from llvmlite import ir
        from numba import types
        from numba.extending import intrinsic
        from llamarun.kernels.attention import _narrow, _widen
        from llamarun.kernels.half import half_to_float

        @intrinsic
        def widen8(typingctx, bits, at, lane):     # <8 x i16> bits[at:at + 8] -> <8 x float>, one lane of it
            def codegen(context, builder, sig, args):
                array = context.make_array(sig.args[0])(context, builder, value=args[0])
                vector = ir.VectorType(ir.IntType(16), 8)
                halves = builder.load(builder.bitcast(builder.gep(array.data, [args[1]]), vector.as_pointer()))
                return builder.extract_element(half_to_float(builder, halves), args[2])
            return types.float32(bits, at, lane), codegen

        @numba.njit
        def widen(bits, out, lanes):
            for i in range(bits.shape[0]):
                out[i] = _widen(bits[i])
            for i in range(0, bits.shape[0], 8):
                for lane in range(8):
                    lanes[i + lane] = widen8(bits, i, lane)

        @numba.njit
        def narrow(values, cache):
            for i in range(values.shape[0]):
                cache[i] = _narrow(cache, values[i])

        bits = np.arange(1 << 16, dtype=np.uint16)
        out, lanes = np.empty(len(bits), np.float32), np.empty(len(bits), np.float32)
        widen(bits, out, lanes)
        np.save("widened.npy", out)
        np.save("lanes.npy", lanes)
        values = np.load("values.npy")
        cache = np.empty(len(values), np.uint16)
        narrow(values, cache)
        np.save("narrowed.npy", cache)
        print(json.dumps({}))
    """)
    widened, lanes = np.load(tmp_path / "widened.npy"), np.load(tmp_path / "lanes.npy")
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(widened), nan)
    assert np.array_equal(widened[~nan].view(np.uint32), ref[~nan].view(np.uint32))     # -0.0 too
    assert np.array_equal(np.isnan(lanes), nan)
    assert np.array_equal(lanes[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    narrowed = np.load(tmp_path / "narrowed.npy")
    wrong = np.flatnonzero(narrowed != expected)
    assert len(wrong) == 0, f"{len(wrong)} values, e.g. {values[wrong[:5]]} -> {narrowed[wrong[:5]]} not {expected[wrong[:5]]}"


@pytest.mark.slow          # compiles the one-call forward afresh
def test_one_call_forward_on_a_generic_cpu_gives_run_c_logits(tmp_path):
    """The one-call forward of a float32 model (its barrier's spin loop without x86's `pause` where the
    target is not x86) on llama2.c's run.c logits, as tests/test_golden.py holds the host's."""
    case = load_golden("tiny_gqa_greedy")
    require(MODELS / "tiny_gqa.bin")
    ids = case["tokens"][:case["logit_rows"]]
    out = run_generic(tmp_path, f"""
        import json
        import llamarun
        from llamarun.kernels import step
        llama = llamarun.load({case["model_path"]!r})
        logits = llama.logits({ids!r})
        print(json.dumps({{"logits": logits.tolist(), "one_call": len(step.forward_f32.signatures)}}))
    """)
    assert out["one_call"] > 0                                  # the batch did take the one-call forward
    ours, ref = np.array(out["logits"], np.float32), case["logits"]
    assert ours.shape == ref.shape
    assert (np.abs(ours - ref).max(axis=-1) <= logits_tolerance(ref, 2e-5)).all()


@pytest.mark.slow          # compiles the group kernels afresh, twice
@pytest.mark.parametrize("target", [("generic", ""), ("haswell", "+avx2,+fma,+f16c")], ids=["generic", "avx2"])
def test_fast_kernels_on_a_generic_cpu(tmp_path, target):
    """tests/test_kernels.py's checks of the fast group kernels (Q8_0, Q4_0, Q4_1: int8 dot products),
    and tests/test_decode_kernels.py's that a row's result does not depend on its batch, compiled with
    no vector extension (the plain LLVM path) and for an AVX2 CPU without VNNI (pmaddubsw), whichever
    the host has."""
    name, features = target
    run_generic(tmp_path, f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from gguf import GGMLQuantizationType as T
        from llamarun.kernels import ggml
        import test_decode_kernels, test_kernels
        assert not ggml.VNNI and ggml.AVX2 == {bool(features)}
        for qtype in (T.Q8_0, T.Q4_0, T.Q4_1):
            for n in (1, 3, 8):
                test_kernels.test_fast_within_activation_rounding(qtype, n)
            test_decode_kernels.test_fast_rows_do_not_depend_on_the_batch(qtype)
        print(json.dumps({{}}))
    """, cpu=(name, features))
