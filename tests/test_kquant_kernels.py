"""The K-quants' group kernels (Q4_K, Q6_K: 8 weight rows per call, kernels/ggml.py) on the fast path.

tests/test_kernels.py holds every type to the int8-rounding bound with 1, 3 and 8 rows of x, and
checks that an adversarial x reaches the bound. Here: every batch shape the group kernels split a
batch into (8, 4 and 1 rows of x at a time, and weight row counts that leave a short last group),
and the integer paths against each other, for every type of the fast kernels (Q8_0, Q4_0, Q4_1 and the
K-quants): the integer sums are exact, so vpdpbusd (VNNI, on 512- or 256-bit vectors) and pmaddubsw
(AVX2) must give the same float32 results bit for bit, and the plain-IR path (no FMA) stays within rounding.
"""
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from llamarun.kernels import cpu, ggml
from llamarun.tensors import GGMLTensor
from test_kernels import fast_bound, reference, random_blocks
from test_portability import run_generic

ROOT = Path(__file__).resolve().parents[1]
K_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
INTEGER_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_1, *K_TYPES]     # the fast kernels' types: int8 products throughout


@pytest.mark.parametrize("rows", [8, 13, 64])
@pytest.mark.parametrize("n", [2, 4, 5, 9, 13])
@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda t: t.name)
def test_group_kernels_within_activation_rounding(qtype, n, rows):
    rng = np.random.default_rng(int(qtype) * 10000 + 100 * n + rows)
    raw = random_blocks(qtype, rows, 768, rng)
    x = rng.standard_normal((n, 768)).astype(np.float32)
    ref, magnitudes, w = reference(qtype, raw, x)
    out = GGMLTensor("w", qtype, (rows, 768), raw, exact=False).linear(x)
    assert np.all(np.abs(out - ref) <= fast_bound(x, w, magnitudes))


@pytest.mark.parametrize("qtype", INTEGER_TYPES, ids=lambda t: t.name)
def test_a_row_does_not_depend_on_its_batch(qtype):
    """Each activation row gets the same arithmetic whether it is decoded alone or in a batch of 2 to 9
    rows: every way the kernels take a batch (8, 4 and 1 rows at a time, and the last 3 rows by the
    4-row kernel, the last 6 or 7 by the 8-row one, its rows past the last read as the last: ggml.FEWEST)."""
    rng = np.random.default_rng(3)
    raw = random_blocks(qtype, 21, 512, rng)
    x = rng.standard_normal((9, 512)).astype(np.float32)
    tensor = GGMLTensor("w", qtype, (21, 512), raw, exact=False)
    alone = [tensor.linear(x[j:j + 1])[0] for j in range(9)]
    for n in range(2, 10):
        together = tensor.linear(x[:n])
        for j in range(n):
            assert np.array_equal(alone[j], together[j]), (n, j)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("qtype", INTEGER_TYPES, ids=lambda t: t.name)
def test_a_weight_row_does_not_depend_on_where_its_matrix_ends(qtype, n):
    """The last group of a matrix whose rows do not fill it is packed with copies of its last row
    (ggml.pack_groups, packed_rows), which the kernels compute and no one keeps. Rows 0..36 of a 48-row matrix
    (three whole groups of 16, six of 8) and the same 37 rows as a matrix of their own (its last group
    short: 5 rows, or 5 of 8) give the same results, bit for bit; so do 5 rows alone (one short group)."""
    rng = np.random.default_rng(int(qtype) * 10 + n)
    raw = random_blocks(qtype, 48, 512, rng)
    x = rng.standard_normal((n, 512)).astype(np.float32)
    whole = GGMLTensor("w", qtype, (48, 512), raw, exact=False).linear(x)
    for rows in (37, 5):
        part = GGMLTensor("w", qtype, (rows, 512), np.ascontiguousarray(raw[:rows]), exact=False).linear(x)
        assert np.array_equal(part, whole[:, :rows]), rows


@pytest.mark.parametrize("qtype", [*K_TYPES, T.Q4_1, T.Q8_0], ids=lambda t: t.name)
def test_a_long_batch_in_tiles_computes_each_row_as_alone(qtype):
    """A batch longer than a tile of activation rows (ggml.TILE_X_BYTES: 8 rows of 4096 inputs) goes
    through the weights tile by tile, the last one short: every row as if decoded alone. 1100 weight
    rows: more groups of 8 than the kernel has tasks, so that a task's groups share its scratch."""
    rng = np.random.default_rng(11)
    n_in, rows = 4096, 1100
    assert ggml.TILE_X_BYTES // n_in == 8 and rows > ggml.TASKS * ggml.ROW_GROUP
    raw = random_blocks(qtype, rows, n_in, rng)
    x = rng.standard_normal((29, n_in)).astype(np.float32)
    tensor = GGMLTensor("w", qtype, (rows, n_in), raw, exact=False)
    together = tensor.linear(x)
    for j in range(29):
        assert np.array_equal(tensor.linear(x[j:j + 1])[0], together[j]), j


def fast_kernel_outputs() -> str:
    """Code printing (as JSON) the fast products of fixed random matrices of each of INTEGER_TYPES, as
    float32 bits."""
    return f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        import numpy as np
        from gguf import GGMLQuantizationType as T
        from llamarun.kernels import cpu, ggml
        from llamarun.tensors import GGMLTensor
        from test_kernels import random_blocks
        out = {{"vnni": ggml.VNNI, "vnni512": ggml.VNNI512, "avx2": ggml.AVX2}}
        for qtype in ({", ".join(f"T.{t.name}" for t in INTEGER_TYPES)}):
            rng = np.random.default_rng(5)
            raw = random_blocks(qtype, 19, 512, rng)
            x = rng.standard_normal((9, 512)).astype(np.float32)
            y = GGMLTensor("w", qtype, (19, 512), raw, exact=False).linear(x)
            out[qtype.name] = y.view(np.uint32).tolist()
        print(json.dumps(out))
    """


VNNI_256 = ("alderlake", "+avx2,+fma,+f16c,+avxvnni,-avx512f,-avx512vnni")


@pytest.mark.slow          # compiles the fast kernels afresh, for another CPU
@pytest.mark.parametrize("target", [("generic", ""), ("haswell", "+avx2,+fma,+f16c"), VNNI_256],
                         ids=["generic", "avx2", "vnni256"])
def test_integer_paths_agree_bit_for_bit(tmp_path, target):
    """The host's integer path (vpdpbusd on 512-bit vectors where it has AVX512-VNNI, 256-bit where
    it has AVX-VNNI only), vpdpbusd on 256-bit vectors, and pmaddubsw (AVX2 without VNNI) give the
    same bits; the plain-IR path (no AVX2, no FMA: a multiply and an add) stays within rounding."""
    if target == VNNI_256 and not cpu.host_flags()["avxvnni"]:
        pytest.skip("this CPU has no AVX-VNNI to run 256-bit vpdpbusd code")
    sys.path.insert(0, str(ROOT / "tests"))
    other = run_generic(tmp_path, fast_kernel_outputs(), cpu=target)
    assert other["vnni"] == (target == VNNI_256) and not other["vnni512"] and other["avx2"] == bool(target[1])
    for qtype in INTEGER_TYPES:
        rng = np.random.default_rng(5)
        raw = random_blocks(qtype, 19, 512, rng)
        x = rng.standard_normal((9, 512)).astype(np.float32)
        ours = GGMLTensor("w", qtype, (19, 512), raw, exact=False).linear(x)
        theirs = np.array(other[qtype.name], np.uint32).view(np.float32)
        if other["avx2"] and ggml.AVX2:
            assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), qtype.name
        else:
            assert np.allclose(ours, theirs, rtol=1e-5, atol=1e-5), qtype.name
