"""Calibration: choose scales and zero points for a weight matrix.

:func:`calibrate_linear` reduces the weight to one clipping range ``[lo, hi]`` per
tensor, row or group, then :func:`params_from_range` turns ranges into
:class:`~qlinear.params.QuantizationParams`:

* symmetric: ``amax = max(|lo|, |hi|)``, ``scale = amax / qmax`` (127 for int8, 7 for
  int4), zero point 0;
* asymmetric: the range is widened to contain 0 (so 0.0 is exact),
  ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - rint(lo / scale)``.

A range of all zeros gets ``scale = 1.0`` (finite, positive) and dequantizes to exact zeros.
"""

from __future__ import annotations

import numpy as np

from ._checks import as_float_matrix
from .errors import InvalidParamsError
from .params import QuantizationParams
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    as_granularity,
    as_qtype,
    as_scheme,
    code_range,
)

__all__ = ["calibrate_linear", "group_ranges", "params_from_range"]


def _check_group_size(group_size: object, granularity: QuantizationGranularity) -> int | None:
    if granularity is not QuantizationGranularity.PER_GROUP:
        if group_size is not None:
            raise InvalidParamsError(
                f"group_size={group_size!r} needs granularity 'per_group'; got "
                f"{granularity.value!r}"
            )
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
        raise InvalidParamsError(
            f"per_group granularity needs an integer group_size (e.g. 32, 64, 128); got "
            f"{group_size!r}"
        )
    if group_size <= 0:
        raise InvalidParamsError(f"group_size must be > 0; got {group_size}")
    return int(group_size)


def group_ranges(
    weight: np.ndarray,
    granularity: QuantizationGranularity,
    group_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor ``(1,)``, per-row ``(out,)`` or per-group ``(out, g)`` minima and maxima."""
    if granularity is QuantizationGranularity.PER_TENSOR:
        return np.array([weight.min()]), np.array([weight.max()])
    if granularity is QuantizationGranularity.PER_CHANNEL:
        return weight.min(axis=1), weight.max(axis=1)
    assert group_size is not None  # checked by the caller
    starts = np.arange(0, weight.shape[1], group_size)
    return np.minimum.reduceat(weight, starts, axis=1), np.maximum.reduceat(weight, starts, axis=1)


def params_from_range(
    lo: np.ndarray,
    hi: np.ndarray,
    qtype: QuantizationType | str,
    granularity: QuantizationGranularity | str,
    scheme: QuantizationScheme | str,
    group_size: int | None = None,
) -> QuantizationParams:
    """Scales and zero points that map ``[lo, hi]`` (arrays of the param shape) onto the
    code range of (qtype, scheme). ``lo <= hi`` elementwise, both finite."""
    qt, sc, gran = as_qtype(qtype), as_scheme(scheme), as_granularity(granularity)
    qmin, qmax = code_range(qt, sc)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    tiny = np.finfo(np.float64).tiny
    if sc is QuantizationScheme.SYMMETRIC:
        amax = np.maximum(-lo, hi)
        scale = np.where(amax > 0, np.maximum(amax / qmax, tiny), 1.0)
        zp = np.zeros(scale.shape, dtype=np.int32)
        lo, hi = -amax, amax
    else:
        # Divide before subtracting: hi - lo can overflow for ranges near float64's max.
        span = hi / (qmax - qmin) - lo / (qmax - qmin)
        scale = np.where(span > 0, np.maximum(span, tiny), 1.0)
        zp = np.clip(qmin - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    return QuantizationParams(qt, sc, gran, scale, zp, lo, hi, group_size)


def calibrate_linear(
    weight: np.ndarray,
    qtype: QuantizationType | str = "int8",
    granularity: QuantizationGranularity | str = "per_channel",
    scheme: QuantizationScheme | str = "symmetric",
    *,
    group_size: int | None = None,
) -> QuantizationParams:
    """Min-max calibration of a weight matrix.

    Args:
        weight: float ``(out_features, in_features)``, finite, non-empty.
        qtype: ``"int8"`` or ``"int4"``.
        granularity: ``"per_tensor"``, ``"per_channel"`` (one scale per output row) or
            ``"per_group"`` (one per row and ``group_size`` input columns).
        scheme: ``"symmetric"`` or ``"asymmetric"``.
        group_size: required for per-group; the last group of a row may be shorter.

    Returns:
        :class:`QuantizationParams` with ``scale`` float64 and ``zero_point`` int32 of
        shape ``(1,)``, ``(out,)`` or ``(out, ceil(in / group_size))``.

    Raises:
        InvalidInputError: NaN/Inf or non-float weights.
        ShapeMismatchError: a weight that is not 2-D or is empty.
        InvalidParamsError: an unknown or unsupported qtype/scheme/granularity/group_size.
    """
    qt, sc, gran = as_qtype(qtype), as_scheme(scheme), as_granularity(granularity)
    if not qt.is_integer:
        raise InvalidParamsError(
            f"calibrate_linear quantizes to integer codes; got qtype {qt.value!r}, "
            "expected 'int8' or 'int4'"
        )
    gs = _check_group_size(group_size, gran)
    w = as_float_matrix("weight", weight, dtype=None)
    lo, hi = group_ranges(w, gran, gs)
    return params_from_range(lo, hi, qt, gran, sc, gs)
