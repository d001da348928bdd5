"""Vectorizable exp / erf / tanh / sigmoid for CPU kernels.

LLVM lowers TVM's ``exp``, ``erf``, ``tanh`` and ``sigmoid`` to the libm scalar functions (``expf``, ``erff``)
even inside a vectorized loop: a 16-lane AVX-512 loop makes 16 scalar calls per vector, so softmax, GELU and
SiLU run at scalar speed. While :func:`fast_math` is active (edgediff's build turns it on for CPU targets),
TVM's intrinsic lowering for LLVM turns those float32 calls into plain arithmetic that stays vectorized:

* ``exp``: Cody-Waite range reduction ``x = n ln2 + r`` (|r| <= ln2/2), the Cephes degree-6 polynomial for
  ``e^r`` and ``2^n`` built in the exponent bits; relative error about 1e-7 (1-2 ulp) for float32. Inputs
  below ``ln(FLT_MIN)`` (including ``-inf``) give exactly 0, inputs above ``ln(FLT_MAX) - 0.35`` give ``inf``
  (the 0.35 keeps ``2^n`` a normal float; no value in that sliver is finite in softmax after the max is
  subtracted). NaN is not propagated (TVM compiles with LLVM fast-math flags, which drop NaN checks).
* ``erf``: the rational approximation Eigen and TVM's ``fast_erf`` use (|x| clamped to 4, where erf is 1 to
  float precision); absolute error below 1e-6.
* ``sigmoid(x) = 1 / (1 + exp(-x))`` and ``tanh(x) = 1 - 2 / (exp(2x) + 1)`` with the exp above; for
  |x| < 1/16 tanh is its Taylor polynomial (the formula cancels there).

Other dtypes (float16 is computed in float32 by the legalized kernels anyway, float64) keep TVM's lowering.

Why intrinsic lowering and not a TIR rewrite before scheduling: TVM 0.27 exposes no expression mutator to
Python; the lowering hook sees every call after vectorization, in every kernel, whichever rule scheduled it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

LOG2E = 1.4426950408889634
LN2_HI = 0.693359375  # ln 2 split so that n * LN2_HI is exact for |n| <= 128 (Cody-Waite)
LN2_LO = -2.12194440e-4
EXP_HI = 88.3762626647949  # above: 2^n would need exponent 128
EXP_LO = -87.3365447505531  # ln(FLT_MIN): below, the result is subnormal; it is flushed to 0
EXP_POLY = (  # Cephes expf: e^r = 1 + r + r^2 * P(r)
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
ERF_CLAMP = 4.0
ERF_ALPHA = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
ERF_BETA = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)

TANH_SMALL = 0.0625
TANH_TAYLOR = (-17.0 / 315.0, 2.0 / 15.0, -1.0 / 3.0, 1.0)

_FUNCTIONS = ("exp", "erf", "tanh", "sigmoid")
_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("edgediff_fast_math", default=False)
_DEFAULT_LOWERING: dict[str, Any] = {}


class _Lanes:
    """Constants and casts of the vector width of the expression being lowered."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes

    def dtype(self, scalar: str) -> str:
        return scalar if self.lanes == 1 else f"{scalar}x{self.lanes}"

    def const(self, value: float, scalar: str = "float32") -> Any:
        from tvm import tirx

        c = tirx.const(value, scalar)
        return c if self.lanes == 1 else tirx.Broadcast(c, self.lanes)


def fast_exp(x: Any, lanes: int = 1) -> Any:
    """``e^x`` for a float32 TIR expression of ``lanes`` lanes (see the module docstring)."""
    from tvm import tirx

    v = _Lanes(lanes)
    clamped = tirx.max(tirx.min(x, v.const(EXP_HI)), v.const(EXP_LO))
    n = tirx.floor(clamped * v.const(LOG2E) + v.const(0.5))
    r = clamped - n * v.const(LN2_HI) - n * v.const(LN2_LO)
    y = _horner(v, r, EXP_POLY) * r * r + r + v.const(1.0)
    bits = (tirx.Cast(v.dtype("int32"), n) + v.const(127, "int32")) << v.const(23, "int32")
    scaled = y * tirx.reinterpret(v.dtype("float32"), bits)
    inf = tirx.reinterpret(v.dtype("float32"), v.const(0x7F800000, "int32"))
    return tirx.Select(x < v.const(EXP_LO), v.const(0.0), tirx.Select(x > v.const(EXP_HI), inf, scaled))


def fast_erf(x: Any, lanes: int = 1) -> Any:
    """``erf(x)`` for a float32 TIR expression (rational approximation, |x| clamped to 4)."""
    from tvm import tirx

    v = _Lanes(lanes)
    xc = tirx.max(tirx.min(x, v.const(ERF_CLAMP)), v.const(-ERF_CLAMP))
    x2 = xc * xc
    return xc * _horner(v, x2, ERF_ALPHA) / _horner(v, x2, ERF_BETA)


def _horner(v: _Lanes, x: Any, coefficients: tuple[float, ...]) -> Any:
    acc = v.const(coefficients[0])
    for c in coefficients[1:]:
        acc = acc * x + v.const(c)
    return acc


def _fast(name: str, x: Any, lanes: int) -> Any:
    v = _Lanes(lanes)
    one = v.const(1.0)
    if name == "exp":
        return fast_exp(x, lanes)
    if name == "erf":
        return fast_erf(x, lanes)
    if name == "sigmoid":
        return one / (one + fast_exp(v.const(0.0) - x, lanes))
    # tanh: 1 - 2 / (e^2x + 1) is exact at both ends (e^2x = inf gives 1, 0 gives -1) but cancels near 0,
    # where the Taylor polynomial to x^7 is exact to float precision
    from tvm import tirx

    x2 = x * x
    small = x * _horner(v, x2, TANH_TAYLOR)
    large = one - v.const(2.0) / (fast_exp(x + x, lanes) + one)
    return tirx.Select(tirx.abs(x) < v.const(TANH_SMALL), small, large)


def _lower(name: str, call: Any) -> Any:
    dtype = call.ty.dtype
    if _ENABLED.get() and dtype.bits == 32 and str(dtype).startswith("float") and len(call.args) == 1:
        return _fast(name, call.args[0], dtype.lanes)
    default = _DEFAULT_LOWERING[name]
    return default(call) if default is not None else call


def install() -> None:
    """Put edgediff's lowering in front of TVM's LLVM lowering of exp/erf/tanh/sigmoid (once per process).

    Outside :func:`fast_math` it defers to TVM's own lowering, so other TVM users in the process see no
    change."""
    if _DEFAULT_LOWERING:
        return
    import tvm
    from tvm.tirx.op import register_intrin_lowering

    for name in _FUNCTIONS:
        op = tvm.ir.Op.get(f"tirx.{name}")
        _DEFAULT_LOWERING[name] = op.get_attr("llvm.FLowerIntrinsic")
        register_intrin_lowering(f"tirx.{name}", "llvm", f=functools.partial(_lower, name), level=100)


@contextlib.contextmanager
def fast_math(enabled: bool = True) -> Iterator[None]:
    """Lower exp/erf/tanh/sigmoid to the vectorizable forms inside this block (LLVM targets)."""
    install()
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)
