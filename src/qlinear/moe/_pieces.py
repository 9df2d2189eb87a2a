"""The linear pieces experts are made of, and their activations.

A *piece* is either a float weight matrix ``(out_features, in_features)`` (kept as given,
read-only, never copied unless it is float16) or any object with ``in_features``,
``out_features`` and ``forward(x)`` such as :class:`qlinear.QuantizedLinear`. One code
path therefore serves float and quantized experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .._activations import gelu
from .._checks import as_array, check_finite
from .._checks import check_x as _check_x
from ..errors import InvalidInputError, InvalidParamsError, ShapeMismatchError

__all__ = ["ACTIVATIONS", "Piece", "apply_piece", "as_piece", "check_x", "piece_dims"]

# A float ndarray (out, in) or a layer with forward(), e.g. QuantizedLinear.
Piece = Any


def as_piece(name: str, value: Any) -> Piece:
    """Validate a float matrix (returned as a read-only view) or a layer with forward."""
    if hasattr(value, "forward") and not isinstance(value, np.ndarray):
        for attr in ("in_features", "out_features"):
            n = getattr(value, attr, None)
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
                raise InvalidParamsError(
                    f"{name} has a forward() but its {attr} is {n!r}; expected a positive int "
                    "(as QuantizedLinear has)"
                )
        return value
    a = as_array(name, value)
    if a.dtype.kind != "f":
        raise InvalidInputError(
            f"{name} must be a float matrix (out_features, in_features) or a layer with "
            f"forward(); got an array of dtype {a.dtype}"
        )
    if a.ndim != 2:
        raise ShapeMismatchError(
            f"{name} must be 2-D (out_features, in_features); got {a.ndim}-D shape {a.shape}"
        )
    if 0 in a.shape:
        raise ShapeMismatchError(f"{name} has a zero dimension (shape {a.shape}); expected > 0")
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    check_finite(name, a)
    view = a.view()
    view.setflags(write=False)
    return view


def piece_dims(piece: Piece) -> tuple[int, int]:
    """``(out_features, in_features)`` of a piece."""
    if isinstance(piece, np.ndarray):
        return int(piece.shape[0]), int(piece.shape[1])
    return int(piece.out_features), int(piece.in_features)


def apply_piece(piece: Piece, x: np.ndarray) -> np.ndarray:
    """``x @ W.T`` for a 2-D float32/float64 ``x``, in x's dtype."""
    if isinstance(piece, np.ndarray):
        return x @ piece.astype(x.dtype, copy=False).T
    y = np.asarray(piece.forward(x))
    return y.astype(x.dtype, copy=False)


def check_x(x: Any, dim: int, what: str = "x") -> np.ndarray:
    """A float array whose last axis is ``dim``, finite (:func:`qlinear._checks.check_x`)."""
    return _check_x(what, x, dim)


# ------------------------------------------------------------------ activations
def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``, written so that exp never overflows."""
    e = np.exp(-np.abs(x))
    sig = np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return (x * sig).astype(x.dtype, copy=False)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """The tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    c = math.sqrt(2.0 / math.pi)
    return (0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))).astype(x.dtype, copy=False)


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "silu": silu,
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
}


def as_activation(activation: Any) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """``(name, function)`` for a name in :data:`ACTIVATIONS` or a callable."""
    if callable(activation):
        return getattr(activation, "__name__", "custom"), activation
    if isinstance(activation, str) and activation.lower() in ACTIVATIONS:
        key = activation.lower()
        return key, ACTIVATIONS[key]
    raise InvalidParamsError(
        f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)} or a callable"
    )
