"""Clipping-range search behind :func:`qlinear.calibrate_linear` and :func:`qlinear.gptq_quantize`.

Every method works on *blocks*: float64 arrays of shape ``(R, G, S)`` holding ``R`` rows
of ``G`` groups of ``S`` weights each, and returns ``(lo, hi)`` of shape ``(R, G)``, one
clipping range per (row, group). :func:`blocks` cuts a weight matrix into such arrays for
each granularity (a partial last group becomes its own block).

* ``minmax``: ``lo = min(w)``, ``hi = max(w)``.
* ``percentile``: symmetric, ``hi = -lo = percentile(|w|, p)``; asymmetric,
  ``lo = percentile(w, 100 - p)``, ``hi = percentile(w, p)``.
* ``mse``: the min-max range, widened to contain 0 (and made symmetric for the symmetric
  scheme), times the shrink factor ``c`` from a grid that minimises the squared
  reconstruction error ``sum((dequant(quant(w)) - w) ** 2)`` of each (row, group). The
  factor 1.0 is evaluated first and only a strictly smaller error replaces it, so the
  result is never worse than min-max on the data searched.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InvalidParamsError
from .qtypes import QuantizationGranularity, QuantizationScheme, QuantizationType, code_range

__all__ = [
    "DEFAULT_GRID",
    "DEFAULT_PERCENTILE",
    "METHODS",
    "blocks",
    "check_grid",
    "check_method",
    "check_percentile",
    "choose_range",
    "scale_zero",
]

METHODS = ("minmax", "percentile", "mse")
DEFAULT_PERCENTILE = 99.9
# Shrink factors 1.00, 0.99, ..., 0.50: AWQ's clip search stops at 0.5, GPTQ's at 0.2 with
# 1/100 steps; at 4 bits the best factor is nearly always above 0.6.
DEFAULT_GRID = np.round(1.0 - 0.01 * np.arange(51), 2)
# Each factor costs one pass over the weight: a typo such as grid=10**9 would run for
# days (or fail to allocate), so the grid is bounded.
MAX_GRID = 10_000

# Elements per chunk of the mse search (bounds its temporaries to a few tens of MiB).
_CHUNK = 1 << 20


def check_method(method: object) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise InvalidParamsError(
            f"unknown calibration method {method!r}; expected one of {METHODS}"
        )
    return method


def check_percentile(percentile: object) -> float:
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float, np.number)):
        raise InvalidParamsError(f"percentile must be a number in [50, 100]; got {percentile!r}")
    p = float(percentile)
    if not (50.0 <= p <= 100.0):
        raise InvalidParamsError(f"percentile must lie in [50, 100]; got {p}")
    return p


def check_grid(grid: object) -> np.ndarray:
    """Shrink factors, 1.0 first: None (the default grid), an int ``n >= 1`` (``n`` factors
    evenly spaced from 1.0 down to 0.5) or a sequence of factors in ``(0, 1]``."""
    if grid is None:
        g = DEFAULT_GRID
    elif isinstance(grid, (int, np.integer)) and not isinstance(grid, bool):
        if not 1 <= grid <= MAX_GRID:
            raise InvalidParamsError(
                f"grid as an int is a number of shrink factors in [1, {MAX_GRID}]; got {grid}"
            )
        g = np.linspace(1.0, 0.5, int(grid)) if grid > 1 else np.array([1.0])
    elif isinstance(grid, (Sequence, np.ndarray)) and not isinstance(grid, str):
        try:
            g = np.asarray(grid, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise InvalidParamsError(f"grid must hold numbers; got {grid!r}") from exc
        if g.size > MAX_GRID:
            raise InvalidParamsError(
                f"grid holds {g.size} shrink factors; expected at most {MAX_GRID}"
            )
        if g.size == 0 or not np.all(np.isfinite(g)) or np.any(g <= 0) or np.any(g > 1):
            raise InvalidParamsError(
                f"grid must be a non-empty sequence of shrink factors in (0, 1]; got {grid!r}"
            )
    else:
        raise InvalidParamsError(
            f"grid must be None, an int or a sequence of shrink factors; got {grid!r}"
        )
    rest = g[g != 1.0]
    return np.concatenate([[1.0], rest[np.sort(np.unique(rest, return_index=True)[1])]])


def blocks(
    w: np.ndarray, granularity: QuantizationGranularity, group_size: int | None
) -> list[np.ndarray]:
    """Views of ``w (out, in)`` as ``(R, G, S)`` blocks; concatenating the methods' ``(R, G)``
    results along axis 1 gives the param layout (per-tensor: one ``(1, 1, out * in)``
    block)."""
    out_f, in_f = w.shape
    if granularity is QuantizationGranularity.PER_TENSOR:
        return [w.reshape(1, 1, -1)]
    if granularity is QuantizationGranularity.PER_CHANNEL:
        return [w.reshape(out_f, 1, in_f)]
    assert group_size is not None  # checked by the caller
    full = in_f // group_size
    out = []
    if full:
        out.append(w[:, : full * group_size].reshape(out_f, full, group_size))
    if in_f % group_size:
        out.append(w[:, full * group_size :].reshape(out_f, 1, -1))
    return out


def scale_zero(
    lo: np.ndarray, hi: np.ndarray, qtype: QuantizationType, scheme: QuantizationScheme
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(scale, zero_point, lo, hi)`` mapping ``[lo, hi]`` onto the code range; the
    returned range is the one actually covered (widened to contain 0, symmetric for the
    symmetric scheme). Elementwise, any shape."""
    qmin, qmax = code_range(qtype, scheme)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    tiny = np.finfo(np.float64).tiny
    if scheme is QuantizationScheme.SYMMETRIC:
        amax = np.maximum(-lo, hi)
        scale = np.where(amax > 0, np.maximum(amax / qmax, tiny), 1.0)
        zp = np.zeros(scale.shape, dtype=np.int32)
        return scale, zp, -amax, amax
    # Divide before subtracting: hi - lo can overflow for ranges near float64's max.
    span = hi / (qmax - qmin) - lo / (qmax - qmin)
    scale = np.where(span > 0, np.maximum(span, tiny), 1.0)
    zp = np.clip(qmin - np.rint(lo / scale), qmin, qmax).astype(np.int32)
    return scale, zp, lo, hi


def _percentile(b: np.ndarray, p: float, scheme: QuantizationScheme):
    if scheme is QuantizationScheme.SYMMETRIC:
        amax = np.percentile(np.abs(b), p, axis=-1)
        return -amax, amax
    return np.percentile(b, 100.0 - p, axis=-1), np.percentile(b, p, axis=-1)


def _sq_error(b, scale, zp, qmin, qmax) -> np.ndarray:
    """``sum((dequant(quant(b)) - b) ** 2, axis=-1)`` for ``b (R, G, S)``, params ``(R, G)``,
    in row chunks (or column chunks when R == 1) to bound the temporaries."""
    r, g, s = b.shape
    err = np.empty((r, g))
    if r == 1 and s > _CHUNK:
        err[:] = 0.0
        for k in range(0, s, _CHUNK):
            err += _sq_error(b[:, :, k : k + _CHUNK], scale, zp, qmin, qmax)
        return err
    step = max(1, _CHUNK // max(1, g * s))
    for i in range(0, r, step):
        sc = scale[i : i + step, :, None]
        z = zp[i : i + step, :, None].astype(np.float64)
        x = b[i : i + step]
        q = np.clip(np.rint(x / sc) + z, qmin, qmax)
        d = (q - z) * sc - x
        err[i : i + step] = np.einsum("rgs,rgs->rg", d, d)
    return err


def _mse(b, qtype, scheme, grid):
    lo0 = np.minimum(b.min(axis=-1), 0.0)
    hi0 = np.maximum(b.max(axis=-1), 0.0)
    if scheme is QuantizationScheme.SYMMETRIC:
        hi0 = np.maximum(-lo0, hi0)
        lo0 = -hi0
    qmin, qmax = code_range(qtype, scheme)
    best_lo, best_hi = lo0.copy(), hi0.copy()
    best_err = np.full(lo0.shape, np.inf)
    for c in grid:  # grid[0] == 1.0: the min-max range itself
        lo, hi = c * lo0, c * hi0
        scale, zp, _, _ = scale_zero(lo, hi, qtype, scheme)
        err = _sq_error(b, scale, zp, qmin, qmax)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_lo = np.where(better, lo, best_lo)
        best_hi = np.where(better, hi, best_hi)
    return best_lo, best_hi


def choose_range(
    b: np.ndarray,
    qtype: QuantizationType,
    scheme: QuantizationScheme,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    grid: np.ndarray = DEFAULT_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """``(lo, hi)`` of shape ``(R, G)`` for a float64 block ``(R, G, S)`` (arguments
    already validated: see :func:`check_method`, :func:`check_percentile`,
    :func:`check_grid`)."""
    if method == "minmax":
        return b.min(axis=-1), b.max(axis=-1)
    if method == "percentile":
        return _percentile(b, percentile, scheme)
    return _mse(b, qtype, scheme, grid)
