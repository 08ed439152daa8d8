"""What the CPU offers, and which of it the kernels use: the one place that decides.

The kernels are compiled by numba for a target CPU: the host, unless NUMBA_CPU_NAME and
NUMBA_CPU_FEATURES name another (NUMBA_CPU_NAME=generic: the architecture's baseline, on x86-64
SSE2 only). Their hand-written LLVM code picks its instructions from the *target's* features, never
the host's, so that code compiled for a generic CPU never holds an instruction the target lacks:

    AVX2 (with FMA)              byte dot products by pmaddubsw/pmaddwd, psignb, fused multiply-adds
    AVX512-VNNI + AVX512-VL,     byte dot products by vpdpbusd (256-bit)
      or AVX-VNNI
    AVX512-VNNI + AVX512-BW      the K-quant group kernels' vpdpbusd on 512-bit vectors
    F16C                         half <-> float conversion by vcvtph2ps / vcvtps2ph (x86)
    x86                          the spin-wait hint `pause` in the one-call forward's barrier

and where a feature is missing, plain LLVM vector code that computes the same numbers (the integer
sums are exact either way; the multiply-adds round twice instead of once, see ggml._multiply_add).
aarch64 converts halves natively (every ARMv8 CPU has fcvt for halves) and has none of the x86
paths, so it takes the plain code.
"""
from __future__ import annotations

import platform

import numba
from llvmlite import binding as llvm_binding

# LLVM's names of the features the kernels look at -> the names people know them by
KERNEL_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "f16c": "F16C",
    "avx512f": "AVX-512F",
    "avx512bw": "AVX-512BW",
    "avx512vl": "AVX-512VL",
    "avx512vnni": "AVX512-VNNI",
    "avxvnni": "AVX-VNNI",
}
KNOWN_ARCHES = ("x86_64", "aarch64")     # where the kernels' code paths are meant to compile


def arch() -> str:
    """The machine architecture, as Linux names it (x86_64, aarch64, ...)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def model_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo, where there is one (Linux on x86; most ARM kernels
    print none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return None


def _parse_features(text: str) -> set[str]:
    """The features switched on in an LLVM feature string such as '+avx2,+fma,-avx512f'."""
    return {f[1:] for f in text.split(",") if f.startswith("+")}


def host_flags() -> dict[str, bool]:
    """Which of the kernels' features the host CPU has."""
    host = llvm_binding.get_host_cpu_features()
    return {name: bool(host.get(name, False)) for name in KERNEL_FLAGS}


def target_name() -> str:
    """The CPU numba compiles for: NUMBA_CPU_NAME, or the host's name as LLVM knows it."""
    return numba.config.CPU_NAME or llvm_binding.get_host_cpu_name()


def target_flags() -> dict[str, bool]:
    """Which of the kernels' features the CPU numba compiles for has: NUMBA_CPU_FEATURES when set
    (numba sets it to none for NUMBA_CPU_NAME=generic), else the host's (numba's own rule)."""
    if numba.config.CPU_FEATURES is None:
        return host_flags()
    on = _parse_features(numba.config.CPU_FEATURES)
    return {name: name in on for name in KERNEL_FLAGS}


# What the kernels' code generation reads (at import: a kernel compiled later in the process sees
# the same values as one compiled first)
X86 = arch() == "x86_64"
_TARGET = target_flags()
AVX2 = X86 and _TARGET["avx2"] and _TARGET["fma"]          # every AVX2 CPU has FMA; a target string might not
VNNI = AVX2 and ((_TARGET["avx512vnni"] and _TARGET["avx512vl"]) or _TARGET["avxvnni"])
VNNI512 = VNNI and _TARGET["avx512vnni"] and _TARGET["avx512f"] and _TARGET["avx512bw"]
F16C = X86 and _TARGET["f16c"]
AVX512 = X86 and _TARGET["avx512f"]                        # 32 vector registers of 512 bits
NATIVE_HALF = F16C or arch() == "aarch64"                     # half <-> float in one instruction


def dot_products() -> str:
    """Which instructions the int8 kernels' byte dot products use here."""
    if VNNI:
        if VNNI512:
            return "vpdpbusd (AVX512-VNNI, 512-bit: 16 weight rows a vector)"
        return "vpdpbusd (AVX512-VNNI)" if _TARGET["avx512vnni"] else "vpdpbusd (AVX-VNNI)"
    if AVX2:
        return "pmaddubsw + pmaddwd (AVX2)"
    return "portable vector code (no AVX2)"


def half_conversion() -> str:
    """How the kernels convert half-precision numbers (ggml scales, a half KV cache) here."""
    if F16C:
        return "vcvtph2ps / vcvtps2ph (F16C)"
    if NATIVE_HALF:
        return "fcvt (ARMv8)"
    return "integer arithmetic (no F16C)"


def features() -> dict:
    """What the host offers and what the kernels are compiled for, as data:
    arch, model (or None), target (the CPU numba compiles for), host_flags and target_flags
    ({llvm name: bool} for KERNEL_FLAGS), dot_products, half_conversion."""
    return {
        "arch": arch(),
        "model": model_name(),
        "target": target_name(),
        "host_flags": host_flags(),
        "target_flags": dict(_TARGET),
        "dot_products": dot_products(),
        "half_conversion": half_conversion(),
    }


def fast_kernels_available() -> tuple[bool, str]:
    """Whether the one-call forward and the int8 fast kernels can run here, and why (or why not).
    They have a portable path for every x86 instruction they use, so they compile wherever numba
    does on a known architecture; elsewhere the plan keeps to the layer-by-layer path."""
    if arch() not in KNOWN_ARCHES:
        return False, f"the fast kernels are untested on {arch()} (known: {', '.join(KNOWN_ARCHES)})"
    if AVX2:
        return True, f"int8 dot products by {dot_products()}"
    return True, f"int8 dot products by {dot_products()}: slower than with AVX2"


def describe() -> str:
    """A few lines for `llamarun info`: the CPU, its features the kernels use, and what they use."""
    f = features()
    host, target = f["host_flags"], f["target_flags"]
    has = [label for name, label in KERNEL_FLAGS.items() if host[name]]
    lines = [f"cpu: {f['model'] or 'unknown model'} ({f['arch']})",
             f"cpu features: {' '.join(has) or 'none of ' + ' '.join(KERNEL_FLAGS.values())}"]
    if target != host or numba.config.CPU_NAME:
        used = [label for name, label in KERNEL_FLAGS.items() if target[name]]
        lines.append(f"kernels compiled for: {f['target']} ({' '.join(used) or 'baseline features only'})")
    ok, why = fast_kernels_available()
    lines += [f"dot products: {f['dot_products']}",
              f"half floats: {f['half_conversion']}",
              f"fast kernels: {'yes' if ok else 'no'}: {why}"]
    return "\n".join(lines)
