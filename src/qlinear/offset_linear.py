"""OffsetLinear: a QuantizedLinear plus a float offset per output row and column group.

GGUF's Q4_1 blocks store ``w = d * q + m`` with codes ``q`` 0..15 and a float16 minimum
``m`` per block of 32 columns: ``m`` is not ``-zero_point * d`` for any integer zero point,
so a QuantizedLinear cannot hold it exactly. OffsetLinear composes one that holds
``d * q`` (int4, per group of 32, zero point 0) with ``M`` float64 ``(out, n_groups)``:

    W[o, k] = inner.dequantize()[o, k] + M[o, k // group_size]
    y = inner(x) + groupsum(x) @ M.T,   groupsum(x)[..., g] = sum of x over group g's columns
"""

from __future__ import annotations

import numpy as np

from ._checks import as_array
from .errors import InvalidParamsError, ShapeMismatchError
from .linear import QuantizedLinear
from .qtypes import QuantizationGranularity

__all__ = ["OffsetLinear"]


class OffsetLinear:
    """``inner`` (a per-group QuantizedLinear) plus per-group float offsets ``offsets``
    float64 ``(out_features, n_groups)``. Immutable."""

    __slots__ = ("_inner", "_offsets")

    def __init__(self, inner: QuantizedLinear, offsets: np.ndarray) -> None:
        if not isinstance(inner, QuantizedLinear):
            raise InvalidParamsError(f"inner must be a QuantizedLinear; got {type(inner).__name__}")
        if inner.granularity is not QuantizationGranularity.PER_GROUP:
            raise InvalidParamsError("OffsetLinear needs a per-group inner layer")
        m = np.array(as_array("offsets", offsets), dtype=np.float64)
        shape = inner.scales.shape
        if m.shape != shape:
            raise ShapeMismatchError(f"offsets must have shape {shape}; got {m.shape}")
        if inner.in_features % inner.group_size:  # type: ignore[operator]
            raise ShapeMismatchError("OffsetLinear needs in_features divisible by group_size")
        if not np.all(np.isfinite(m)):
            raise InvalidParamsError("offsets must be finite")
        m.setflags(write=False)
        self._inner = inner
        self._offsets = m

    @property
    def inner(self) -> QuantizedLinear:
        return self._inner

    @property
    def offsets(self) -> np.ndarray:
        return self._offsets

    @property
    def shape(self) -> tuple[int, int]:
        return self._inner.shape

    @property
    def out_features(self) -> int:
        return self._inner.out_features

    @property
    def in_features(self) -> int:
        return self._inner.in_features

    @property
    def group_size(self) -> int:
        return self._inner.group_size  # type: ignore[return-value]

    @property
    def bias(self) -> np.ndarray | None:
        return self._inner.bias

    @property
    def nbytes(self) -> int:
        return self._inner.nbytes + self._offsets.nbytes

    def dequantize(self, dtype: np.dtype | type = np.float64) -> np.ndarray:
        """float ``(out, in)``: ``inner.dequantize() + repeat(offsets, group_size)``,
        computed in float64 and then cast (one rounding, as GGUF readers do in float32)."""
        w = self._inner.dequantize(np.float64) + np.repeat(self._offsets, self.group_size, axis=1)
        return w.astype(dtype, copy=False)

    def forward(self, x: np.ndarray, *, activations: str = "float") -> np.ndarray:
        """``y = x @ W.T (+ bias)`` = ``inner(x) + groupsum(x) @ offsets.T``; x float
        ``(..., in_features)``."""
        y = self._inner.forward(x, activations=activations)
        a = np.asarray(x, dtype=y.dtype)
        sums = a.reshape(*a.shape[:-1], -1, self.group_size).sum(axis=-1)
        return y + sums @ self._offsets.T.astype(y.dtype)

    __call__ = forward

    def __repr__(self) -> str:
        return f"OffsetLinear({self._inner!r}, offsets {self._offsets.shape})"
