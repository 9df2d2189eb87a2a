"""Numeric building blocks of the NumPy encoders: the linear-layer protocol, the float32
linear layer, erf GELU and LayerNorm. float32 in, float32 out."""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from ..errors import ShapeMismatchError

__all__ = ["FloatLinear", "LinearLike", "gelu", "layer_norm"]


@runtime_checkable
class LinearLike(Protocol):
    """Anything with ``forward(x)``: ``x`` float32 ``(tokens, in)`` -> ``(tokens, out)``
    (bias included). :class:`FloatLinear` and ``qlinear.QuantizedLinear`` both fit."""

    def forward(self, x: np.ndarray) -> np.ndarray: ...


class FloatLinear:
    """The float32 linear layer ``y = x @ W.T + b``; ``W`` is ``(out, in)``, ``b`` ``(out,)``."""

    __slots__ = ("bias", "weight")

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
        w = np.asarray(weight, dtype=np.float32)
        if w.ndim != 2:
            raise ShapeMismatchError(f"weight must be 2-D (out, in); got shape {w.shape}")
        b = None if bias is None else np.asarray(bias, dtype=np.float32)
        if b is not None and b.shape != (w.shape[0],):
            raise ShapeMismatchError(f"bias must have shape ({w.shape[0]},); got {b.shape}")
        self.weight = w
        self.bias = b

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: np.ndarray) -> np.ndarray:
        """``x`` float32 ``(tokens, in)`` -> float32 ``(tokens, out)``: ``x @ W.T + b``."""
        y = np.asarray(x, dtype=np.float32) @ self.weight.T
        if self.bias is not None:
            y += self.bias
        return y

    __call__ = forward


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


def gelu(x: np.ndarray) -> np.ndarray:
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


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``(tokens, h)``: ``(x - mean) / sqrt(var + eps) * w + b`` over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    y = xc / np.sqrt(var + np.float32(eps))
    y *= w
    y += b
    return y
