"""Hand-written CPU kernels (numba), where numpy alone cannot do the job well.

Compiled kernels are kept in numba's on-disk cache, so that compiling is paid once per machine, not
per checkout: in `$LLAMARUN_HOME/kernels/` (~/.cache/llamarun/kernels, beside the models), or below
NUMBA_CACHE_DIR when that is set. `python -m llamarun.kernels` compiles them ahead of use.

The cache folder is named for a hash of every source file of this package, `llamarun-<hash>`, and
every kernel of the package is cached in it whatever the checkout's path. Why the hash: numba checks
a cached function against its own source file only, not against the files of the functions it
inlined: step.py's one-call forward inlines ggml.py's group kernels, so after an edit of ggml.py
alone (or a `git pull` that changes only ggml.py) the cache would go on serving the old forward. A
change to any kernel starts a fresh folder; a `git pull` that leaves the kernels alone, or a fresh
clone elsewhere, finds the compiled code of the same sources. (A folder of an older version stays
until removed, a few MB.) numba's own key of each entry still holds the function's signature and
the CPU it was compiled for (NUMBA_CPU_NAME), so targets do not mix.
"""
import contextlib
import hashlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:             # not POSIX: no lock (numba's own behaviour)
    fcntl = None

import numba
from numba.core import caching

from ..hub import home

HERE = Path(__file__).parent


def _sources_digest(here: Path = HERE) -> str:
    """A hash of every source file of the kernels in `here` (but the compile step's, __main__.py and
    compile.py, which compile nothing of their own)."""
    digest = hashlib.sha256()
    for source in sorted(p for p in here.glob("*.py") if p.name not in ("__main__.py", "compile.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


def _cache_dir(here: Path = HERE) -> str:
    """The folder for the compiled code of the kernels in `here`, named for the sources it comes from."""
    base = numba.config.CACHE_DIR or home() / "kernels"
    return os.path.join(base, f"llamarun-{_sources_digest(here)}")


CACHE_DIR = _cache_dir()


class _KernelCacheLocator(caching._SourceFileBackedLocatorMixin, caching._CacheLocator):
    """numba's cache locator for this package's functions: a folder per source file in CACHE_DIR,
    whatever the checkout's path (numba's own locators file a function under a hash of its folder's
    absolute path), fresh as long as the kernels' sources are the same (the stamp numba compares with
    the index's)."""

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self):
        return os.path.join(CACHE_DIR, Path(self._py_file).stem)

    def get_source_stamp(self):
        return os.path.basename(CACHE_DIR)

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != HERE.resolve():
            return None
        return super().from_function(py_func, py_file)     # None if CACHE_DIR cannot be written: numba's own then


_numba_save = caching.IndexDataCacheFile.save


def _save_one_process_at_a_time(self, key, data):
    """numba's cache save, holding a lock on the function's cache folder when it is ours. Why: numba
    reads a function's index, picks the next free data file name, writes the index, then the data;
    two processes compiling kernels at once (the compile step's workers, two first runs side by side)
    can pick the same name, and one index entry then points at the other's code."""
    if fcntl is None or not self._cache_path.startswith(CACHE_DIR):
        return _numba_save(self, key, data)
    with open(os.path.join(self._cache_path, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _numba_save(self, key, data)


caching.IndexDataCacheFile.save = _save_one_process_at_a_time

@contextlib.contextmanager
def kernel_cache():
    """numba picks a function's cache locator when its decorator runs: ours goes first while the kernel
    modules are imported and while step.py makes a forward for a model's types, so that other numba
    code keeps numba's own."""
    caching.CacheImpl._locator_classes.insert(0, _KernelCacheLocator)
    try:
        yield
    finally:
        caching.CacheImpl._locator_classes.remove(_KernelCacheLocator)


with kernel_cache():
    from . import attention, ggml, int8, matvec, norm, step  # noqa: E402,F401
