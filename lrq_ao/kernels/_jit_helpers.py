"""``@triton.jit`` helpers shared by the kernel families: explicit rounding and reductions.

Every helper is written with Triton builtins only (no ``tl.max`` / ``tl.sum``, which are themselves jit functions
and would not run under the interpreter copy that ``_runtime.launchable`` builds).

Rounding follows ``lrq_ao.primitives`` bit for bit:

* ``rint_f32``: round half to even with the ``1.5 * 2**23`` trick: adding it leaves no fractional bits, so the
  FPU's own round-to-nearest-even does the rounding (valid for ``|x| < 2**22``; callers clamp first). Triton's
  float->int cast truncates, and ``libdevice.rint`` is unavailable in the interpreter, hence this form.
* ``round_to_e4m3``: round to the float8 e4m3fn grid (3 mantissa bits, exponent >= -6, subnormal step
  ``2**-9``) by scaling ``|x|`` with the power of two that makes the grid step 1, rounding, and scaling back.
  The result is exactly representable, so the final cast to ``float8e4nv`` is exact whatever its own rounding.
"""

from __future__ import annotations

import triton
import triton.language as tl

_RINT_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def add_combine(a, b):
    return a + b


@triton.jit
def rint_f32(x):
    return (x + _RINT_MAGIC) - _RINT_MAGIC


@triton.jit
def round_to_e4m3(x):
    """``x`` float32 already clamped to [-448, 448] -> the nearest e4m3fn value (ties to even), as float32."""
    bits = x.to(tl.int32, bitcast=True)
    biased_exp = (bits >> 23) & 0xFF
    step_exp = tl.maximum(biased_exp, 121) - 3  # 121 = 127 - 6: the smallest normal exponent of e4m3fn
    step = (step_exp << 23).to(tl.float32, bitcast=True)
    inv_step = ((254 - step_exp) << 23).to(tl.float32, bitcast=True)
    magnitude = rint_f32(tl.abs(x) * inv_step) * step
    # Copy the sign bit back (Triton's unary minus is ``0 - m``, which would turn -0.0 into +0.0).
    sign = (bits >> 31) << 31
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quantize_values(x, scale, QMAX: tl.constexpr, IS_FP8: tl.constexpr):
    """``x / scale`` (IEEE division) rounded to the int8 or e4m3fn grid, returned in the storage dtype."""
    y = tl.div_rn(x, scale)
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if IS_FP8:
        out = round_to_e4m3(y).to(tl.float8e4nv)
    else:
        out = rint_f32(y).to(tl.int8)
    return out


@triton.jit
def scale_from_amax(amax, QMAX: tl.constexpr):
    """``max(amax / qmax, 1e-8)`` in float32 with IEEE division, as ``primitives.compute_scale``."""
    return tl.maximum(tl.div_rn(amax, QMAX), 1e-8)
