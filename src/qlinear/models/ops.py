"""Numeric building blocks of the NumPy encoders: the linear-layer protocol, the float32
linear layer, erf GELU and LayerNorm. float32 in, float32 out."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from .._activations import gelu
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


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``(tokens, h)``: ``(x - mean) / sqrt(var + eps) * w + b`` over the last axis."""
    mu = x.mean(axis=-1, keepdims=True)
    xc = x - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    y = xc / np.sqrt(var + np.float32(eps))
    y *= w
    y += b
    return y
