"""Calibration: choose scales and zero points for a weight matrix.

:func:`calibrate_linear` reduces the weight to one clipping range ``[lo, hi]`` per
tensor, row or group with one of three methods (``"minmax"``, ``"percentile"``,
``"mse"``; see :mod:`qlinear._ranges`), then :func:`params_from_range` turns ranges into
:class:`~qlinear.params.QuantizationParams`:

* symmetric: ``amax = max(|lo|, |hi|)``, ``scale = amax / qmax`` (127 for int8, 7 for
  int4), zero point 0;
* asymmetric: the range is widened to contain 0 (so 0.0 is exact),
  ``scale = (hi - lo) / (qmax - qmin)``, ``zero_point = qmin - rint(lo / scale)``.

A range of all zeros gets ``scale = 1.0`` (finite, positive) and dequantizes to exact zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._checks import as_float_matrix
from ._ranges import (
    DEFAULT_PERCENTILE,
    blocks,
    check_grid,
    check_method,
    check_percentile,
    choose_range,
    scale_zero,
)
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


_MAX_GROUP = int(np.iinfo(np.int64).max)


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
    if not 0 < group_size <= _MAX_GROUP:
        # beyond int64 NumPy cannot index with it; any size >= in_features is one group
        raise InvalidParamsError(f"group_size must be > 0 and <= {_MAX_GROUP}; got {group_size}")
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
    gs = _check_group_size(group_size, granularity)  # public: no assert on user input
    starts = np.arange(0, weight.shape[1], gs)
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
    code_range(qt, sc)  # rejects float qtypes with a clear message
    scale, zp, lo, hi = scale_zero(lo, hi, qt, sc)
    return QuantizationParams(qt, sc, gran, scale, zp, lo, hi, group_size)


def calibrate_linear(
    weight: np.ndarray,
    qtype: QuantizationType | str = "int8",
    granularity: QuantizationGranularity | str = "per_channel",
    scheme: QuantizationScheme | str = "symmetric",
    *,
    group_size: int | None = None,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    grid: int | Sequence[float] | None = None,
) -> QuantizationParams:
    """Calibrate the scales and zero points of a weight matrix.

    Args:
        weight: float ``(out_features, in_features)``, finite, non-empty.
        qtype: ``"int8"`` or ``"int4"``.
        granularity: ``"per_tensor"``, ``"per_channel"`` (one scale per output row) or
            ``"per_group"`` (one per row and ``group_size`` input columns).
        scheme: ``"symmetric"`` or ``"asymmetric"``.
        group_size: required for per-group; the last group of a row may be shorter.
        method: how each tensor/row/group's clipping range ``[lo, hi]`` is chosen:

            * ``"minmax"``: ``[min(w), max(w)]``;
            * ``"percentile"``: symmetric, ``amax = percentile(|w|, percentile)``;
              asymmetric, ``[percentile(w, 100 - percentile), percentile(w, percentile)]``;
            * ``"mse"``: the min-max range times the shrink factor from ``grid`` that
              minimises ``sum((dequant(quant(w)) - w) ** 2)`` of the row/group; never a
              larger error than ``"minmax"`` on the same weight.
        percentile: for ``"percentile"``, in ``[50, 100]`` (100 is min-max); default 99.9.
        grid: for ``"mse"``, the shrink factors tried: None (1.00, 0.99, ..., 0.50), an int
            ``n`` (``n`` factors evenly spaced from 1.0 to 0.5) or a sequence of factors in
            ``(0, 1]``; 1.0 is always tried.

    Returns:
        :class:`QuantizationParams` with ``scale`` float64 and ``zero_point`` int32 of
        shape ``(1,)``, ``(out,)`` or ``(out, ceil(in / group_size))``.

    Raises:
        InvalidInputError: NaN/Inf or non-float weights.
        ShapeMismatchError: a weight that is not 2-D or is empty.
        InvalidParamsError: an unknown or unsupported qtype/scheme/granularity/group_size,
            method, percentile or grid.
    """
    qt, sc, gran = as_qtype(qtype), as_scheme(scheme), as_granularity(granularity)
    if not qt.is_integer:
        raise InvalidParamsError(
            f"calibrate_linear quantizes to integer codes; got qtype {qt.value!r}, "
            "expected 'int8' or 'int4'"
        )
    gs = _check_group_size(group_size, gran)
    meth = check_method(method)
    pct = check_percentile(percentile)
    shrink = check_grid(grid)
    # min-max needs no float64 copy of a large float32 weight; the searches do
    w = as_float_matrix("weight", weight, dtype=None if meth == "minmax" else np.float64)
    if meth == "minmax":
        lo, hi = group_ranges(w, gran, gs)
    else:
        parts = [choose_range(b, qt, sc, meth, pct, shrink) for b in blocks(w, gran, gs)]
        lo = np.concatenate([p[0] for p in parts], axis=1)
        hi = np.concatenate([p[1] for p in parts], axis=1)
        if gran is not QuantizationGranularity.PER_GROUP:
            lo, hi = lo.reshape(-1), hi.reshape(-1)
    return params_from_range(lo, hi, qt, gran, sc, gs)
