"""Validation shared by the public entry points (the C side validates nothing)."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InvalidInputError, ShapeMismatchError

__all__ = ["as_float_matrix", "check_finite"]


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
    a = np.asarray(value)
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
