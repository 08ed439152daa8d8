"""Ctrl-C (llamarun/interrupts.py): a press is never lost, in the CLI or in an API user's loop, and a
second press ends any command at once, even inside a long native call.

Each SIGINT is sent at a known point: from inside the code that used to lose it (numba's typed-list
typing, an LLVM callback), or after the process says on stderr that it is inside a native call."""
import os
import signal
import subprocess
import sys
import time
import types

import pytest

from llamarun.cli import main

from conftest import MODELS, require


def model(name):
    return str(require(MODELS / name))


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler, as an interactive run has it (a test run started in the background
    by a non-interactive shell inherits SIGINT ignored)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def sigint_in_numba(monkeypatch):
    """Arm it (armed["now"] = True) and the next forward's SIGINT lands in numba's typed-list code: the
    property numba's dispatcher calls back to type the one-call forward's lists of layer matrices
    (the first time per call it clears any error that comes back, so a KeyboardInterrupt raised
    there was lost). The stand-in runs with that module's globals, so its frames are numba's."""
    from numba.typed import typedlist
    real = typedlist.List._numba_type_.fget
    armed = {"now": False, "fired": 0}

    def numba_type(self):
        if armed["now"]:
            armed["now"] = False
            armed["fired"] += 1
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(3):           # Python runs the handler at its next instruction: here
                pass
        return real(self)

    in_numba = types.FunctionType(numba_type.__code__, dict(vars(typedlist), os=os, signal=signal),
                                  "_numba_type_", None, numba_type.__closure__)
    monkeypatch.setattr(typedlist.List, "_numba_type_", property(in_numba))
    return armed


def test_ctrl_c_in_an_api_stream_loop_is_never_lost(python_ctrl_c, sigint_in_numba):
    import llamarun
    llama = llamarun.load(model("tiny_gqa.bin"), model("tokenizer.bin"))
    drawn = []
    with pytest.raises(KeyboardInterrupt):
        for event in llama.stream("Once upon a time", 60, temperature=0, ignore_eos=True):
            drawn.append(event.token)
            if len(drawn) == 3:
                sigint_in_numba["now"] = True         # during the forward of the 3rd token
    assert sigint_in_numba["fired"] == 1 and len(drawn) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_first_ctrl_c_cuts_the_prefill_short(python_ctrl_c, sigint_in_numba, capsysbinary):
    sigint_in_numba["now"] = True                     # during the prompt's forward
    code = main(["generate", "Once upon a time", "-m", model("tiny_gqa.bin"), "-z", model("tokenizer.bin"),
                 "-n", "20", "--temperature", "0"])
    captured = capsysbinary.readouterr()
    assert code == 130 and sigint_in_numba["fired"] == 1
    assert captured.out == b"Once upon a time\n"      # the prompt, and no token drawn
    assert b"generated: 0 tokens" in captured.err and b"finish: interrupted" in captured.err, captured.err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def run_script(script: str, *args: str) -> subprocess.Popen:
    # SIGINT back to its default in the child: a test run started in the background by a non-interactive
    # shell ignores SIGINT, a child inherits that, and Python then installs no Ctrl-C handler
    return subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


# The first ever `quantize` compiles kernels; a Ctrl-C that landed in one of the callbacks LLVM makes
# into Python (through ctypes) printed "Exception ignored ... KeyboardInterrupt" and the compile, and
# the command, went on to exit 0. Here a command compiles a small function, and the callback LLVM
# makes when the module is compiled sends the SIGINT.
COMPILING_COMMAND = """
import os, signal, sys
from numba.core import codegen            # patched before llamarun starts numba's JIT, which binds it
compiled = codegen.JITCodeLibrary._object_compiled_hook.__func__
armed = False
def hook(cls, module, buffer):
    global armed
    if armed:
        armed = False
        os.kill(os.getpid(), signal.SIGINT)
    return compiled(cls, module, buffer)
codegen.JITCodeLibrary._object_compiled_hook = classmethod(hook)
import numba
from llamarun import cli
def compile_a_kernel(args):
    global armed
    armed = True
    numba.njit(lambda x: x + 1)(1)
    print("finished")
    return 0
cli.cmd_models = compile_a_kernel
sys.exit(cli.main(["models"]))
"""


def test_ctrl_c_during_a_compile_stops_the_command():
    proc = run_script(COMPILING_COMMAND)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "finished" not in out and "Exception ignored" not in err and "Traceback" not in err, err


# A command inside one long native call (a numba kernel holds the main thread and Python runs no
# handler until it returns: one layer's attention over a 7001-token exact prompt takes seconds), as
# `models` (main's handler) and inside `generate`'s token loop (CtrlC's handler), during the prefill.
LONG_NATIVE_CALL = """
import ctypes, sys
import numba, numpy as np
import llamarun.model
from llamarun import cli
write = ctypes.CDLL(None).write
write.argtypes, write.restype = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t), ctypes.c_ssize_t
@numba.njit
def spin(n, message):
    write(2, message.ctypes.data, message.size)      # said from inside: the signals land in here
    total = 0.0
    for i in range(n):
        total += (i % 7) * 0.5
    return total
def long_native_call(*args):
    spin(10 ** 12, np.frombuffer(b"in the native call\\n", np.uint8))    # 20 minutes
    print("finished")
    return 0
spin(0, np.frombuffer(b"", np.uint8))           # compiled before main: its compile notice would come first
cli.cmd_models = long_native_call
llamarun.model.Transformer.forward = long_native_call
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["models"], ["generate", "Hi", "-m", "{tiny}", "-z", "{tok}"]])
def test_a_second_ctrl_c_ends_the_command_at_once(command):
    names = {"{tiny}": model("tiny_gqa.bin"), "{tok}": model("tokenizer.bin")}
    proc = run_script(LONG_NATIVE_CALL, *[names.get(a, a) for a in command])
    try:                                              # killed whatever fails: it would spin for 20 minutes
        line = proc.stderr.readline()
        while line.startswith("llamarun: compiling"):    # a slow machine's notice for a compile on the way
            line = proc.stderr.readline()
        assert line == "in the native call\n"
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)                              # two presses, as a user makes them
        proc.send_signal(signal.SIGINT)
        second = time.perf_counter()
        out, err = proc.communicate(timeout=5)
    finally:
        proc.kill()
    # killed by SIGINT, as Ctrl-C ends a C program: a shell reports exit status 130
    assert proc.returncode == -signal.SIGINT and time.perf_counter() - second < 1.0
    assert "finished" not in out and "Traceback" not in err, err
