"""Ctrl-C that is never lost, and a second Ctrl-C that always ends the process at once.

Python turns SIGINT into a KeyboardInterrupt raised at whatever Python code the main thread runs
next. Two kinds of code lose it there:
- numba's dispatcher, which calls back into Python (`typeof_pyval`) to type a typed-list argument
  (the one-call forward's per-layer matrices) and clears any error that comes back: the
  KeyboardInterrupt vanishes and the call goes on;
- llvmlite's ctypes callbacks, which LLVM runs while numba compiles: ctypes prints "Exception
  ignored on calling ctypes callback function" and the compile goes on.
`raise_where_safe` is Python's handler but for that: when the signal lands in such code it puts the
interrupt off to the first function call or return outside it (a profile function watches for it),
and raises there.

A native call (a numba kernel, a compile step) holds the main thread for as long as it runs, a few
seconds for one layer's attention over a long exact prompt, and Python runs no handler meanwhile:
two presses there arrive as one. `second_press_kills` asks the OS to reset SIGINT to its default
action as it delivers one (SA_RESETHAND): the first press goes to Python as above, and a second
ends the process at once whatever runs, as Ctrl-C ends a C program (killed by SIGINT: a shell
reports exit status 130). The CLI asks for that; the API leaves the process's signals alone.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

# the Python that native code calls back and that loses an exception raised in it (see above):
# whole modules, and single functions
CALLED_BACK_MODULES = ("numba.typed.", "numba.core.serialize", "llvmlite.")
CALLED_BACK_FUNCTIONS = ("numba.core.dispatcher.typeof_pyval",)


def lands_where_lost(frame) -> bool:
    """Whether a KeyboardInterrupt raised in `frame` (a signal handler's) would be lost: the frame or
    one of its callers is code that native code calls back."""
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.startswith(CALLED_BACK_MODULES) or f"{module}.{frame.f_code.co_name}" in CALLED_BACK_FUNCTIONS:
            return True
        frame = frame.f_back
    return False


def raise_where_safe(signum, frame) -> None:
    """A SIGINT handler: KeyboardInterrupt, as Python's own, but never inside code that would lose it."""
    if lands_where_lost(frame):
        sys.setprofile(raise_once_out)
        return
    raise KeyboardInterrupt


def raise_once_out(frame, event, arg) -> None:
    """A profile function (called at each function call and return): KeyboardInterrupt at the first
    one outside the code that would lose it, raised into the frame that makes it."""
    if not lands_where_lost(frame):
        sys.setprofile(None)
        raise KeyboardInterrupt


@contextmanager
def ctrl_c_never_lost():
    """Around a forward pass run for API code: where Python's own handler is in place (a plain script
    looping over `Llama.stream`), a Ctrl-C during the pass raises only where it cannot be lost."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield               # another thread (signals reach only the main one), or a handler of the caller's
        return
    signal.signal(signal.SIGINT, raise_where_safe)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# SA_RESETHAND's value, and the offset of sa_flags in struct sigaction after the handler's pointer:
# Linux's sigset_t is 1024 bits, macOS's 32
RESET_ON_DELIVERY = {"linux": (0x80000000, 128), "darwin": (0x0004, 4)}


def second_press_kills() -> bool:
    """Make the next SIGINT the OS delivers reset SIGINT to its default action (SA_RESETHAND on the
    Python handler in place), so that a second one ends the process at once. Call it again after each
    signal.signal(SIGINT, ...), which installs the handler afresh. False where it cannot (another
    platform, SIGINT ignored or at its default): a second press then waits for Python, as the first."""
    import ctypes
    if sys.platform not in RESET_ON_DELIVERY:
        return False
    flag, mask_bytes = RESET_ON_DELIVERY[sys.platform]
    libc = ctypes.CDLL(None, use_errno=True)
    pointer = ctypes.sizeof(ctypes.c_void_p)
    at = pointer + mask_bytes                               # sa_flags, an int
    action = ctypes.create_string_buffer(256)               # struct sigaction (152 bytes on 64-bit Linux)
    if libc.sigaction(signal.SIGINT, None, action) != 0:
        return False
    if int.from_bytes(action.raw[:pointer], sys.byteorder) in (0, 1):     # SIG_DFL, SIG_IGN
        return False
    flags = int.from_bytes(action.raw[at:at + 4], sys.byteorder) | flag
    action[at:at + 4] = flags.to_bytes(4, sys.byteorder)
    return libc.sigaction(signal.SIGINT, action, None) == 0
