"""Validation shared by the public entry points (the C side validates nothing)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError, QuantizationError, ShapeMismatchError

__all__ = ["as_array", "as_float_matrix", "check_finite", "check_x"]


def as_array(
    name: str, value: Any, error: type[QuantizationError] = InvalidInputError
) -> np.ndarray:
    """``np.asarray(value)``, with ragged nested lists (NumPy's ValueError) reported as a
    QuantizationError naming the argument."""
    try:
        return np.asarray(value)
    except ValueError as exc:
        raise error(
            f"{name} must be an array or nested lists of equal lengths; got a "
            f"{type(value).__name__} NumPy cannot convert ({exc})"
        ) from None


def check_finite(name: str, a: np.ndarray) -> None:
    """Raise InvalidInputError naming the first NaN/Inf of ``a``."""
    finite = np.isfinite(a)
    if not finite.all():
        idx = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInputError(
            f"{name} contains {a[idx]} at index {idx}; expected only finite values"
        )


def as_float_matrix(name: str, value: Any, dtype: Any = np.float64) -> np.ndarray:
    """A non-empty, finite, 2-D floating array converted to ``dtype`` (None: kept as it is,
    so callers that work block by block need not copy a large weight first).

    Integer, boolean, complex and object arrays are rejected rather than silently cast:
    a weight given as integers is almost always a mistake (codes passed as weights).
    """
    a = as_array(name, value)
    if a.dtype.kind != "f":
        raise InvalidInputError(
            f"{name} must be a floating-point array (float16/32/64); got dtype {a.dtype}"
        )
    if a.ndim != 2:
        raise ShapeMismatchError(
            f"{name} must be 2-D (out_features, in_features); got {a.ndim}-D shape {a.shape}"
        )
    if a.size == 0:
        raise ShapeMismatchError(f"{name} is empty (shape {a.shape}); expected both sizes > 0")
    out = a if dtype is None else a.astype(dtype, copy=False)
    check_finite(name, out)
    return out


def check_x(name: str, value: Any, dim: int) -> np.ndarray:
    """The one input check for activations: a floating array of shape ``(..., dim)``,
    finite. float32/float64 are returned as they are (no copy), float16 as float32 and
    wider floats (longdouble) as float64.

    Raises InvalidInputError for a non-float dtype or NaN/Inf, ShapeMismatchError for a
    0-D array or a last dimension other than ``dim``."""
    a = as_array(name, value)
    if a.dtype.kind != "f":
        raise InvalidInputError(
            f"{name} must be a floating-point array (float16/32/64); got dtype {a.dtype}"
        )
    if a.ndim == 0 or a.shape[-1] != dim:
        raise ShapeMismatchError(f"{name} must have shape (..., {dim}); got {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        # float16 -> float32; longdouble and byte-swapped float64 must not lose precision
        a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
    check_finite(name, a)
    return a
