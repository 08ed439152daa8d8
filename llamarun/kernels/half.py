"""Half-precision numbers (IEEE binary16) in the kernels' LLVM code: ggml's f16 scales, a half KV cache.

numba has no float16 type, so a half travels as its 16 bits (an i16 or uint16) and the kernels convert
it in LLVM IR. Where the target converts halves in one instruction (x86 with F16C: vcvtph2ps and
vcvtps2ph; aarch64: fcvt) that is LLVM's `fpext`/`fptrunc` of a `half`. Elsewhere LLVM lowers those
to calls of compiler-rt's __extendhfsf2 / __truncsfhf2, which numba's JIT does not link: the process
aborts ("LLVM ERROR: Symbol not found"). There the same conversions are written as integer and
float32 arithmetic (Fabian Giesen's branch-free forms, as selects so that loops still vectorize),
bit for bit the instructions' results for every finite value and infinity, rounding to nearest even
as numpy's astype(np.float16) does. Both functions take a scalar or a vector.
"""
from llvmlite import ir

from .cpu import NATIVE_HALF

_I16, _I32, _F32 = ir.IntType(16), ir.IntType(32), ir.FloatType()


def _like(value_type, element, constant):
    """A constant of `element` type, splat to a vector if value_type is one (else a scalar)."""
    if isinstance(value_type, ir.VectorType):
        return ir.Constant(ir.VectorType(element, value_type.count), [constant] * value_type.count)
    return ir.Constant(element, constant)


def _retyped(value_type, element):
    return ir.VectorType(element, value_type.count) if isinstance(value_type, ir.VectorType) else element


def half_to_float(builder, bits):
    """i16 (or <n x i16>) half bits -> float (or <n x float>), exact."""
    if NATIVE_HALF:
        return builder.fpext(builder.bitcast(bits, _retyped(bits.type, ir.HalfType())), _retyped(bits.type, _F32))
    i32, f32 = _retyped(bits.type, _I32), _retyped(bits.type, _F32)
    c = lambda element, v: _like(bits.type, element, v)                          # noqa: E731
    word = builder.zext(bits, i32)
    # exponent and mantissa moved to a float's places; times 2^112 rebiases the exponent (15 -> 127)
    # and makes a subnormal half a normal float, both exactly
    magnitude = builder.shl(builder.and_(word, c(_I32, 0x7FFF)), c(_I32, 13))
    value = builder.fmul(builder.bitcast(magnitude, f32), c(_F32, 2.0 ** 112))
    # a half with every exponent bit set (infinity, NaN) lands at >= 2^16: give it the float's
    infinite = builder.fcmp_ordered(">=", value, c(_F32, 2.0 ** 16))
    value_bits = builder.bitcast(value, i32)
    value_bits = builder.select(infinite, builder.or_(value_bits, c(_I32, 0xFF << 23)), value_bits)
    sign = builder.shl(builder.and_(word, c(_I32, 0x8000)), c(_I32, 16))
    return builder.bitcast(builder.or_(value_bits, sign), f32)


def float_to_half(builder, value):
    """float (or <n x float>) -> i16 (or <n x i16>) bits of the nearest half (ties to even; beyond
    the largest half, infinity; NaN stays NaN)."""
    if NATIVE_HALF:
        return builder.bitcast(builder.fptrunc(value, _retyped(value.type, ir.HalfType())), _retyped(value.type, _I16))
    i32, f32 = _retyped(value.type, _I32), _retyped(value.type, _F32)
    c = lambda element, v: _like(value.type, element, v)                         # noqa: E731
    word = builder.bitcast(value, i32)
    sign = builder.and_(word, c(_I32, -2 ** 31))
    u = builder.xor(word, sign)                                                  # |value|'s bits
    # 2^16 and beyond (or infinity): infinity; NaN: a quiet NaN. (65520 up to 2^16 reach infinity
    # through the rounding below.)
    too_large = builder.icmp_unsigned(">=", u, c(_I32, (127 + 16) << 23))
    special = builder.select(builder.icmp_unsigned(">", u, c(_I32, 255 << 23)), c(_I32, 0x7E00), c(_I32, 0x7C00))
    # below 2^-14, a subnormal half (or zero): adding 0.5 puts the 10 wanted bits at the bottom of
    # the mantissa, rounded to nearest even by the float addition itself
    half_bits = 126 << 23                                                       # 0.5's bits
    sum_ = builder.fadd(builder.bitcast(u, f32), c(_F32, 0.5))
    subnormal = builder.sub(builder.bitcast(sum_, i32), c(_I32, half_bits))
    # otherwise a normal half: rebias the exponent, round the 13 bits dropped to nearest even
    odd = builder.and_(builder.lshr(u, c(_I32, 13)), c(_I32, 1))
    rounded = builder.add(builder.add(u, c(_I32, ((15 - 127) << 23) + 0xFFF)), odd)
    normal = builder.lshr(rounded, c(_I32, 13))
    finite = builder.select(builder.icmp_unsigned("<", u, c(_I32, 113 << 23)), subnormal, normal)
    half = builder.or_(builder.select(too_large, special, finite), builder.lshr(sign, c(_I32, 16)))
    return builder.trunc(half, _retyped(value.type, _I16))
