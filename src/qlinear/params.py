"""QuantizationParams: the scales and zero points of one weight matrix.

A :class:`QuantizationParams` is validated when it is built and immutable afterwards
(its arrays are read-only copies). Shapes, for a weight of shape
``(out_features, in_features)``:

* per-tensor: ``scale``, ``zero_point``, ``min_val``, ``max_val`` of shape ``(1,)``
* per-channel: ``(out_features,)``
* per-group: ``(out_features, n_groups)`` with
  ``n_groups = ceil(in_features / group_size)``; the last group may be partial.

Dequantization is ``fp = (q - zero_point) * scale`` with the scale and zero point of the
element's row (and group).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ._checks import as_array
from .errors import InvalidParamsError, ShapeMismatchError
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    as_granularity,
    as_qtype,
    as_scheme,
    code_range,
)

__all__ = ["QuantizationParams", "n_groups", "param_shape"]


def n_groups(in_features: int, group_size: int) -> int:
    """Number of column groups in a row: ``ceil(in_features / group_size)``."""
    return -(-in_features // group_size)


def param_shape(
    granularity: QuantizationGranularity | str,
    out_features: int,
    in_features: int,
    group_size: int | None = None,
) -> tuple[int, ...]:
    """The shape that scale and zero_point must have for this granularity and weight."""
    gran = as_granularity(granularity)
    if gran is QuantizationGranularity.PER_TENSOR:
        return (1,)
    if gran is QuantizationGranularity.PER_CHANNEL:
        return (out_features,)
    if group_size is None:
        raise InvalidParamsError("per_group granularity needs a group_size; got None")
    return (out_features, n_groups(in_features, group_size))


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


def _float_array(name: str, value: Any) -> np.ndarray:
    try:
        raw = np.asarray(value)
        # complex, bool, strings and objects are mistakes, not numbers to cast quietly
        if raw.dtype.kind not in "fiu":
            raise TypeError(f"dtype {raw.dtype}")
        arr = raw.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidParamsError(
            f"{name} must be an array of real numbers; got {value!r:.80} ({exc})"
        ) from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizationParams:
    """Scales and zero points for one weight matrix, validated on construction.

    Attributes:
        qtype: INT8 or INT4.
        scheme: SYMMETRIC (all zero points 0) or ASYMMETRIC.
        granularity: PER_TENSOR, PER_CHANNEL or PER_GROUP.
        scale: float64, strictly positive and finite; shape ``(1,)``, ``(out,)`` or
            ``(out, n_groups)``.
        zero_point: int32, same shape, inside the code range of (qtype, scheme).
        min_val, max_val: float64, same shape: the clipping range that was calibrated
            (informational; dequantization uses only scale and zero_point).
        group_size: a positive int for PER_GROUP, None otherwise.

    Strings are accepted for qtype, scheme and granularity (``"int8"``, ...).
    """

    qtype: QuantizationType
    scheme: QuantizationScheme
    granularity: QuantizationGranularity
    scale: np.ndarray
    zero_point: np.ndarray
    min_val: np.ndarray
    max_val: np.ndarray
    group_size: int | None = None

    def __post_init__(self) -> None:
        qtype = as_qtype(self.qtype)
        scheme = as_scheme(self.scheme)
        gran = as_granularity(self.granularity)
        if not qtype.is_integer:
            raise InvalidParamsError(
                f"QuantizationParams needs an integer qtype; got {qtype.value!r}, "
                "expected 'int8' or 'int4'"
            )
        scale = _float_array("scale", self.scale)
        zp_in = as_array("zero_point", self.zero_point, InvalidParamsError)
        if zp_in.ndim == 0:
            zp_in = zp_in.reshape(1)
        if zp_in.dtype.kind == "f":
            if not np.all(np.isfinite(zp_in)) or np.any(zp_in != np.rint(zp_in)):
                raise InvalidParamsError(
                    f"zero_point must hold integers; got non-integer values such as "
                    f"{zp_in[zp_in != np.rint(zp_in)][:3].tolist()}"
                )
        elif zp_in.dtype.kind not in "iub":
            raise InvalidParamsError(f"zero_point must be integers; got dtype {zp_in.dtype}")
        min_val = _float_array("min_val", self.min_val)
        max_val = _float_array("max_val", self.max_val)

        if gran is QuantizationGranularity.PER_GROUP:
            gs = self.group_size
            big = np.iinfo(np.int64).max  # NumPy indexes with int64
            if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)) or not 0 < gs <= big:
                raise InvalidParamsError(
                    f"per_group granularity needs a positive integer group_size <= {big}; "
                    f"got {gs!r}"
                )
            group_size: int | None = int(gs)
            if scale.ndim != 2:
                raise ShapeMismatchError(
                    f"per_group scale must be 2-D (out_features, n_groups); got shape {scale.shape}"
                )
        else:
            if self.group_size is not None:
                raise InvalidParamsError(
                    f"group_size is only meaningful for per_group granularity; got "
                    f"group_size={self.group_size!r} with {gran.value}"
                )
            group_size = None
            if scale.ndim != 1:
                raise ShapeMismatchError(f"{gran.value} scale must be 1-D; got shape {scale.shape}")
            if gran is QuantizationGranularity.PER_TENSOR and scale.shape != (1,):
                raise ShapeMismatchError(
                    f"per_tensor scale must have shape (1,); got {scale.shape}"
                )
        if scale.size == 0:
            raise ShapeMismatchError("scale is empty; expected at least one element")
        for name, arr in (("zero_point", zp_in), ("min_val", min_val), ("max_val", max_val)):
            if arr.shape != scale.shape:
                raise ShapeMismatchError(
                    f"{name} has shape {arr.shape} but scale has shape {scale.shape}; "
                    "they must match"
                )
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            bad = scale[~(np.isfinite(scale) & (scale > 0))][:3].tolist()
            raise InvalidParamsError(
                f"scale must be finite and > 0 everywhere; got values such as {bad}"
            )
        for name, arr in (("min_val", min_val), ("max_val", max_val)):
            if not np.all(np.isfinite(arr)):
                raise InvalidParamsError(
                    f"{name} must be finite; got values such as "
                    f"{arr[~np.isfinite(arr)][:3].tolist()}"
                )
        qmin, qmax = code_range(qtype, scheme)
        # Checked before the cast to int64: 2**64 - 1 (uint64) or 1e30 (float) would wrap
        # or overflow there and could land inside the range.
        if scheme is QuantizationScheme.SYMMETRIC and np.any(zp_in != 0):
            raise InvalidParamsError(
                "symmetric quantization needs zero_point 0 everywhere; got nonzero values "
                f"such as {zp_in[zp_in != 0][:3].tolist()}"
            )
        if np.any((zp_in < qmin) | (zp_in > qmax)):
            raise InvalidParamsError(
                f"zero_point must lie in [{qmin}, {qmax}] for {qtype.value} {scheme.value}; "
                f"got values from {zp_in.min()} to {zp_in.max()}"
            )
        zp64 = zp_in.astype(np.int64)
        set_ = object.__setattr__
        set_(self, "qtype", qtype)
        set_(self, "scheme", scheme)
        set_(self, "granularity", gran)
        set_(self, "group_size", group_size)
        set_(self, "scale", _readonly(scale))
        set_(self, "zero_point", _readonly(zp64.astype(np.int32)))
        set_(self, "min_val", _readonly(min_val))
        set_(self, "max_val", _readonly(max_val))

    @property
    def code_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` for this qtype and scheme."""
        return code_range(self.qtype, self.scheme)

    def check_weight_shape(self, out_features: int, in_features: int) -> None:
        """Raise ShapeMismatchError unless these params fit a weight of this shape."""
        expected = param_shape(self.granularity, out_features, in_features, self.group_size)
        if self.scale.shape != expected:
            raise ShapeMismatchError(
                f"{self.granularity.value} params have scale shape {self.scale.shape}, but a "
                f"weight of shape ({out_features}, {in_features}) needs {expected}"
            )

    def __reduce__(self):
        # Rebuild through __init__ so a copy is validated and read-only like the original.
        return (
            QuantizationParams,
            (
                self.qtype,
                self.scheme,
                self.granularity,
                self.scale,
                self.zero_point,
                self.min_val,
                self.max_val,
                self.group_size,
            ),
        )

    def __repr__(self) -> str:
        gs = f", group_size={self.group_size}" if self.group_size is not None else ""
        return (
            f"QuantizationParams({self.qtype.value}, {self.scheme.value}, "
            f"{self.granularity.value}, scale.shape={self.scale.shape}{gs})"
        )
