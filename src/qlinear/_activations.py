"""The one GELU of qlinear (the BERT encoder and GELU experts both use it).

``gelu(x) = 0.5 x (1 + erf(x / sqrt 2))``, the exact erf form (not the tanh
approximation). NumPy has no erf, so float64 inputs take :mod:`math`'s erf elementwise
(exact, slow) and float32 inputs the Abramowitz & Stegun 7.1.26 formula in float32
arithmetic (absolute error about ``3e-7 |x|``, below float32's resolution of the result).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gelu"]

# Abramowitz & Stegun 7.1.26: erf(x) = 1 - t*(a1 + t*(a2 + ...)) * exp(-x^2),
# t = 1 / (1 + p x), x >= 0; absolute error <= 1.5e-7, below float32 resolution near 1.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _erf(x: np.ndarray) -> np.ndarray:
    """float64 ``erf(x)`` elementwise, absolute error <= 1.5e-7 (NumPy has no erf)."""
    ax = np.abs(x)
    t = 1.0 / (1.0 + _AS_P * ax)
    a1, a2, a3, a4, a5 = _AS_A
    poly = t * (a1 + t * (a2 + t * (a3 + t * (a4 + t * a5))))
    return np.copysign(1.0 - poly * np.exp(-ax * ax), x)


def _gelu_f32(x: np.ndarray) -> np.ndarray:
    """float32 ``(...)`` -> float32 ``(...)``: ``gelu(x) = 0.5 x (1 + erf(x / sqrt(2)))``
    (the exact, erf form BERT uses, not the tanh approximation).

    With ``z = |x| / sqrt(2)`` and ``h = 0.5 (1 - erf(z))`` (the upper tail, from the same
    A&S 7.1.26 formula as :func:`_erf`): ``gelu(x) = x (1 - h)`` for ``x >= 0`` and
    ``x h`` for ``x < 0``. Computing the tail directly keeps its precision for negative
    ``x`` where ``1 + erf`` would cancel. float32 arithmetic, in place: absolute error
    about ``3e-7 |x|``.
    """
    x = np.asarray(x, dtype=np.float32)
    f32 = np.float32
    z = np.abs(x)
    z *= f32(1.0 / math.sqrt(2.0))
    t = z * f32(_AS_P)
    t += f32(1.0)
    np.reciprocal(t, out=t)
    a1, a2, a3, a4, a5 = (f32(a) for a in _AS_A)
    poly = t * a5
    for a in (a4, a3, a2, a1):
        poly += a
        poly *= t
    np.square(z, out=z)
    np.negative(z, out=z)
    np.exp(z, out=z)
    poly *= z
    poly *= f32(0.5)  # h = 0.5 * erfc(|x| / sqrt(2))
    # x >= 0: x * (1 - h) = x - x*h;  x < 0: x * h
    poly *= x
    return np.where(x >= 0, x - poly, poly)


_erf_exact = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """``(...)`` -> ``(...)`` in x's dtype: float32 through the fast float32 formula,
    anything else through math.erf in float64 (see the module docstring)."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        return _gelu_f32(x)
    e = _erf_exact(x.astype(np.float64) / math.sqrt(2.0)).astype(np.float64)
    return (0.5 * x * (1.0 + e)).astype(x.dtype, copy=False)
