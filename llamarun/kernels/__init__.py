"""Hand-written CPU kernels (numba), where numpy alone cannot do the job well.

Compiled kernels are kept in numba's on-disk cache, so that compiling is paid once per machine. numba
checks a cached function against its own source file only, not against the files of the functions it
inlined: step.py's one-call forward inlines ggml.py's group kernels, so after an edit of ggml.py alone
(or a `git pull` under an editable install that changes only ggml.py) the cache would go on serving the
old forward. The kernels' cache therefore lives in a folder named for a hash of every source file of
this package: `__pycache__/llamarun-<hash>` here, or below NUMBA_CACHE_DIR when that is set. A change
to any kernel starts a fresh folder. (A folder of an older version stays until removed, a few MB.)
"""
import hashlib
import os
from pathlib import Path

import numba


def _cache_dir(here: Path = Path(__file__).parent) -> str:
    """The folder for the compiled code of the kernels in `here`, named for the sources it comes from."""
    digest = hashlib.sha256()
    for source in sorted(here.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return os.path.join(numba.config.CACHE_DIR or here / "__pycache__", f"llamarun-{digest.hexdigest()[:16]}")


# numba picks a function's cache folder when its decorator runs (the module's import), from
# config.CACHE_DIR: set for the kernel modules' imports only, so other numba code keeps its own
_user_cache_dir = numba.config.CACHE_DIR
numba.config.CACHE_DIR = _cache_dir()
try:
    from . import attention, ggml, int8, matvec, norm, step  # noqa: E402,F401
finally:
    numba.config.CACHE_DIR = _user_cache_dir
