"""`llamarun bench` and `--threads`: the llama-bench table, depth, llama.cpp beside it (a stand-in module),
one-line errors, and thread counts that reach numba and BLAS."""
import json
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numba
import pytest

from llamarun import bench
from llamarun.cli import build_parser, main

from conftest import MODELS, require


@pytest.fixture
def tiny():
    return str(require(MODELS / "tiny_gqa.bin"))


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    """Short pauses between runs, and no llama_cpp unless a test puts one in (None in sys.modules makes
    `import llama_cpp` raise ImportError, whether or not the package is installed here)."""
    monkeypatch.setattr(bench, "SETTLE", 0.01)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def rows(out: str) -> dict:
    """test name -> {backend: median t/s} from the table's rows."""
    found = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and re.fullmatch(r"(pp|tg)\d+( @ d\d+)?", cells[5]):
            found.setdefault(cells[5], {})[cells[3]] = float(cells[6])
    return found


@pytest.mark.slow          # timed runs
def test_table_rows_with_positive_speeds(tiny, capsys):
    assert main(["bench", "-m", tiny, "-p", "16", "-n", "8", "-r", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| model | size | params | backend | threads | test | t/s | min - max |")
    table = rows(out)
    assert set(table) == {"pp16", "tg8"}
    assert all(t["numpy+numba"] > 0 for t in table.values())
    assert "| tiny_gqa.bin | 8.35 MiB | 2.19 M | numpy+numba |" in out
    assert re.search(r"peak memory: \d+\.\d MiB", out)
    assert bench.LLAMA_CPP_MISSING in out.splitlines()
    # the CPU as the kernel reports it, and the vector features the kernels are compiled with
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    cpu_line = next(line for line in out.splitlines() if line.startswith("cpu: "))
    if name:
        assert cpu_line.startswith(f"cpu: {' '.join(name.group(1).split())} (")
    features = next(line for line in out.splitlines() if line.startswith("vector features in use: "))
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo, re.M).group(1).split()) if name else set()
    if "avx2" in flags and not numba.config.CPU_NAME:
        assert "AVX2" in features.split(";")[0]


def test_depth_and_skipped_test(tiny, capsys):
    assert main(["bench", "-m", tiny, "-p", "0", "-n", "8", "-d", "100", "-r", "1"]) == 0   # 100 + 8 <= 128
    table = rows(capsys.readouterr().out)
    assert set(table) == {"tg8 @ d100"} and table["tg8 @ d100"]["numpy+numba"] > 0


def test_runs_measure_the_tokens_after_the_depth(tiny):
    """The API: each run's tokens follow the depth prefix; min <= median <= max."""
    import llamarun
    report = bench.run_bench(llamarun.load(tiny), n_prompt=12, n_gen=4, depth=20, repetitions=3, compare=False)
    assert [m.test.name for m in report.results] == ["pp12 @ d20", "tg4 @ d20"]
    for m in report.results:
        assert len(m.seconds) == 3 and 0 < m.low <= m.median <= m.high
    assert report.reference == [] and report.reference_note is None and report.peak_rss_mib > 0


@pytest.mark.parametrize("args, words", [
    (["-p", "-1"], "-p must be >= 0"),
    (["-n", "-2"], "-n must be >= 0"),
    (["-d", "-1"], "-d must be >= 0"),
    (["-r", "0"], "-r must be >= 1"),
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-p", "16", "-d", "120"], "context of 128"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--threads", "100000"], "NUMBA_NUM_THREADS"),
])
def test_bad_values_are_one_line_errors(tiny, args, words, capsys):
    assert main(["bench", "-m", tiny, "-p", "16", "-n", "8", "-r", "1", *args]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and err.startswith("llamarun: error:") and words in err, err
    assert captured.out == ""


class FakeLlama:
    """llama_cpp.Llama as run_bench uses it: records its settings and every eval, with n_tokens as
    llama-cpp-python keeps it (eval continues after n_tokens)."""
    made = []

    def __init__(self, model_path, **settings):
        self.model_path, self.settings, self.n_tokens, self.evals = model_path, settings, 0, []
        self.closed = False
        FakeLlama.made.append(self)

    def reset(self):
        self.n_tokens = 0

    def eval(self, tokens):
        assert all(type(t) is int for t in tokens)
        self.evals.append((self.n_tokens, len(tokens)))
        self.n_tokens += len(tokens)
        # slower than llamarun on this tiny model, so that the ratio is > 1: 2 ms a call
        import time
        time.sleep(0.002)

    def close(self):
        self.closed = True


def test_beside_llama_cpp(tmp_path, monkeypatch, capsys):
    from test_gguf_format import write_model
    path = tmp_path / "tiny.gguf"
    write_model(path)                       # float32, 2 layers, vocab 64, context 128
    FakeLlama.made.clear()
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, __version__="9.9.9"))
    assert main(["bench", "-m", str(path), "-p", "16", "-n", "4", "-d", "8", "-r", "2"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert set(table) == {"pp16 @ d8", "tg4 @ d8"}
    assert all(set(t) == {"numpy+numba", "llama.cpp"} and min(t.values()) > 0 for t in table.values())
    assert "| test | llamarun t/s | llama.cpp t/s | llamarun / llama.cpp |" in out
    assert re.search(r"\| pp16 @ d8 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out)
    assert "llama-cpp-python 9.9.9" in out and bench.LLAMA_CPP_MISSING not in out

    (llm,) = FakeLlama.made
    assert llm.model_path == str(path) and llm.closed
    threads = bench.current_threads()
    assert llm.settings["n_threads"] == llm.settings["n_threads_batch"] == threads
    assert llm.settings["n_ctx"] >= 8 + 16
    # the depth once, then: warm-up pp16, warm-up tg (1 token), 2 x (pp16 as one eval, tg4 as 4 evals), all after it
    assert llm.evals[0] == (0, 8)
    after = llm.evals[1:]
    assert after[:2] == [(8, 16), (8, 1)]
    assert after[2:] == 2 * [(8, 16), (8, 1), (9, 1), (10, 1), (11, 1)]


def test_llama2c_files_are_not_compared(tiny, monkeypatch, capsys):
    FakeLlama.made.clear()
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    assert main(["bench", "-m", tiny, "-p", "4", "-n", "2", "-r", "1"]) == 0
    assert "GGUF files only" in capsys.readouterr().out and FakeLlama.made == []


@pytest.mark.parametrize("command", [["generate", "Hi"], ["run", "model.bin"], ["chat"], ["bench"]])
def test_every_model_command_takes_threads(command):
    assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3


def test_threads_reach_numba_and_blas(tiny):
    """--threads 1 in a fresh process (numpy and numba already imported by llamarun, as always from the
    command line): numba's pool and every BLAS (and OpenMP) pool are limited to one thread, those loaded
    after --threads took effect (scipy's OpenBLAS, sentencepiece's OpenMP) too."""
    script = textwrap.dedent(f"""
        import json, sys
        import numba, threadpoolctl
        from llamarun.cli import main
        code = main(["bench", "-m", {tiny!r}, "-p", "4", "-n", "2", "-r", "1", "--threads", "1"])
        pools = {{p["filepath"]: (p["user_api"], p["num_threads"]) for p in threadpoolctl.threadpool_info()}}
        print(json.dumps({{"code": code, "numba": numba.get_num_threads(), "pools": pools}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["numba"] == 1
    pools = result["pools"].values()
    assert "blas" in {api for api, _ in pools}, pools
    assert all(n == 1 for _, n in pools), result["pools"]      # numpy's OpenBLAS, and any loaded after it
    assert "| numpy+numba | 1 | pp4 |" in r.stdout


def test_a_file_llama_cpp_refuses_is_a_note(tmp_path, monkeypatch, capsys):
    from test_gguf_format import write_model
    path = tmp_path / "tiny.gguf"
    write_model(path)

    def refuse(model_path, **settings):
        raise ValueError("Failed to load model from file")
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=refuse))
    assert main(["bench", "-m", str(path), "-p", "4", "-n", "2", "-r", "1"]) == 0
    out = capsys.readouterr().out
    assert set(rows(out)) == {"pp4", "tg2"} and "llama.cpp could not load tiny.gguf (ValueError" in out
