"""GPTQ: quantize a weight matrix with second-order error feedback (Frantar et al., 2022).

GPTQ quantizes the columns of ``W (out, in)`` one at a time and spreads each column's
rounding error over the columns not yet quantized so that the layer's output on the
calibration inputs ``X (n, in)`` changes as little as possible:

1. ``H = 2 / n * X^T X`` (float64). Dead inputs (``H[i, i] == 0``: column ``i`` of ``X``
   is all zero) get ``H[i, i] = 1`` and ``W[:, i] = 0``, as the reference code does.
2. With ``act_order``, columns are processed by decreasing ``H[i, i]``.
3. ``H += damp * mean(diag(H)) * I``; ``U`` is the upper Cholesky factor of ``H^-1``
   (``H^-1 = U^T U``).
4. For each column ``j`` (in processing order):
   ``q = clip(rint(w_j / s) + z, qmin, qmax)``, ``e = (w_j - (q - z) * s) / U[j, j]``, and
   ``W[:, k] -= e * U[j, k]`` for the later columns ``k``. The update is applied at once
   inside a block of ``block_size`` columns and lazily (one matrix product) to the
   columns after the block; this changes the order of float operations only.

Scales and zero points: per-tensor and per-channel parameters are calibrated once on the
original weight (before dead columns are zeroed, as the reference does). Per-group
parameters belong to the *original, contiguous* column groups, so the stored layer is a
plain per-group layer whatever the processing order. Each group's parameters are
calibrated (min-max, percentile or the mse grid) on the group's *error-updated* weights
when the first of its columns is reached in processing order; without ``act_order``
that is exactly GPTQ's reference behaviour, and with it this is the reference's dynamic
grouping, but over contiguous groups (no ``g_idx`` permutation needs to be stored).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._checks import as_float_matrix, check_finite
from ._ranges import (
    DEFAULT_PERCENTILE,
    blocks,
    check_grid,
    check_method,
    check_percentile,
    choose_range,
    scale_zero,
)
from .calibrate import check_group_size, params_from_range
from .errors import InvalidInputError, InvalidParamsError, ShapeMismatchError
from .linear import QuantizedLinear
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    as_granularity,
    as_qtype,
    as_scheme,
    code_range,
)

__all__ = ["gptq_quantize", "hessian"]

# Rows of X multiplied at once when accumulating X^T X (bounds the float64 copy).
_ROWS = 4096


def _check_x(x_calib: object, in_features: int) -> np.ndarray:
    x = np.asarray(x_calib)
    if x.dtype.kind != "f":
        raise InvalidInputError(
            f"x_calib must be a floating-point array (float16/32/64); got dtype {x.dtype}"
        )
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ShapeMismatchError(
            f"x_calib must have shape (..., {in_features}) to match the weight's in_features; "
            f"got {x.shape}"
        )
    x2 = x.reshape(-1, in_features)
    if x2.shape[0] == 0:
        raise ShapeMismatchError(
            f"x_calib holds no samples (shape {x.shape}); expected at least one row"
        )
    check_finite("x_calib", x2)
    return x2


def hessian(x: np.ndarray) -> np.ndarray:
    """``H = 2 / n * X^T X`` in float64 for ``x (n, in)``, accumulated in row chunks."""
    n, k = x.shape
    h = np.zeros((k, k))
    for i in range(0, n, _ROWS):
        xc = x[i : i + _ROWS].astype(np.float64)
        h += xc.T @ xc
    h *= 2.0 / n
    return h


def _check_options(damp: object, block_size: object, act_order: object) -> None:
    if isinstance(damp, bool) or not isinstance(damp, (int, float, np.number)):
        raise InvalidParamsError(f"damp must be a number >= 0 (e.g. 0.01); got {damp!r}")
    if not (np.isfinite(damp) and damp >= 0):
        raise InvalidParamsError(f"damp must be finite and >= 0 (e.g. 0.01); got {damp}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise InvalidParamsError(f"block_size must be an integer >= 1; got {block_size!r}")
    if block_size < 1:
        raise InvalidParamsError(f"block_size must be >= 1; got {block_size}")
    if not isinstance(act_order, (bool, np.bool_)):
        raise InvalidParamsError(f"act_order must be True or False; got {act_order!r}")


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """``U`` upper triangular with ``U^T U = (H + damp * mean(diag H) * I)^-1``."""
    h = h.copy()
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    try:
        lower = np.linalg.cholesky(h)
        lower_inv = np.linalg.solve(lower, np.eye(h.shape[0]))
        return np.linalg.cholesky(lower_inv.T @ lower_inv).T
    except np.linalg.LinAlgError:
        raise InvalidInputError(
            f"the calibration Hessian is not positive definite with damp={damp}; "
            "expected damp > 0 (e.g. 0.01) or more varied calibration inputs"
        ) from None


def gptq_quantize(
    weight: np.ndarray,
    x_calib: np.ndarray,
    qtype: QuantizationType | str,
    granularity: QuantizationGranularity | str,
    scheme: QuantizationScheme | str = "symmetric",
    *,
    group_size: int | None = None,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    method: str = "minmax",
    percentile: float = DEFAULT_PERCENTILE,
    grid: int | Sequence[float] | None = None,
    bias: np.ndarray | None = None,
    backend: str | None = None,
) -> QuantizedLinear:
    """Quantize ``weight`` with GPTQ on calibration inputs ``x_calib``.

    Args:
        weight: float ``(out_features, in_features)``, finite, non-empty.
        x_calib: float ``(..., in_features)``, finite, at least one row: inputs of this
            layer on calibration data (rows are samples/tokens).
        qtype, granularity, scheme, group_size: the format, as for
            :func:`qlinear.calibrate_linear` (int8/int4; per-tensor, per-channel or
            per-group; symmetric or asymmetric).
        damp: dampening, as a fraction of ``mean(diag(H))`` added to the diagonal.
        act_order: process columns by decreasing ``H[i, i]`` (activation order); the
            stored layer is in the original column order.
        block_size: columns per block of the lazy batch update (results do not depend
            on it beyond float rounding).
        method, percentile, grid: how each clipping range is chosen
            (``"minmax"``, ``"percentile"``, ``"mse"``), as for ``calibrate_linear``.
        bias: optional float ``(out_features,)`` stored with the layer as is.
        backend: kernel backend of the returned layer (default: the active one).

    Returns:
        A :class:`QuantizedLinear` whose codes minimise, column by column,
        ``||X W^T - X Q^T||`` (``Q`` the dequantized weight).

    Raises:
        ShapeMismatchError: ``x_calib`` of the wrong width or with no rows; a weight
            that is not 2-D or is empty.
        InvalidInputError: NaN/Inf or non-float weight or inputs; a Hessian that is not
            positive definite (``damp=0`` and degenerate inputs).
        InvalidParamsError: an invalid format, method or option.
    """
    qt, sc, gran = as_qtype(qtype), as_scheme(scheme), as_granularity(granularity)
    if not qt.is_integer:
        raise InvalidParamsError(
            f"gptq_quantize quantizes to integer codes; got qtype {qt.value!r}, "
            "expected 'int8' or 'int4'"
        )
    gs = check_group_size(group_size, gran)
    meth = check_method(method)
    pct = check_percentile(percentile)
    shrink = check_grid(grid)
    _check_options(damp, block_size, act_order)
    w = as_float_matrix("weight", weight).copy()
    x = _check_x(x_calib, w.shape[1])
    out_f, in_f = w.shape
    qmin, qmax = code_range(qt, sc)

    def choose(b: np.ndarray):
        return choose_range(b, qt, sc, meth, pct, shrink)

    h = hessian(x)
    per_group = gran is QuantizationGranularity.PER_GROUP
    if not per_group:
        (b,) = blocks(w, gran, gs)
        lo, hi = choose(b)
        params = params_from_range(lo.reshape(-1), hi.reshape(-1), qt, gran, sc)
        col_scale = np.broadcast_to(params.scale.astype(np.float64), (out_f,))
        col_zero = np.broadcast_to(params.zero_point.astype(np.float64), (out_f,))

    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(in_f)
    inv_perm = np.argsort(perm)
    w = w[:, perm]
    u = _upper_cholesky_of_inverse(h[perm][:, perm], float(damp))

    codes = np.empty((out_f, in_f), dtype=np.int16)
    if per_group:
        ng = -(-in_f // gs)
        g_lo, g_hi = np.empty((out_f, ng)), np.empty((out_f, ng))
        g_scale, g_zero = np.empty((out_f, ng)), np.empty((out_f, ng))
        seen = np.zeros(ng, dtype=bool)
        group_of = perm // gs  # group of the column processed at each position
    for i1 in range(0, in_f, block_size):
        i2 = min(in_f, i1 + block_size)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros((out_f, i2 - i1))
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if per_group:
                g = group_of[i1 + i]
                if not seen[g]:
                    # The group's current weights: columns in this block are up to date
                    # in w1; later ones still owe this block's pending update.
                    pos = inv_perm[g * gs : min(in_f, (g + 1) * gs)]
                    cur = np.empty((out_f, pos.size))
                    inside = pos < i2
                    cur[:, inside] = w1[:, pos[inside] - i1]
                    later = pos[~inside]
                    cur[:, ~inside] = w[:, later] - err1 @ u[i1:i2, later]
                    lo, hi = choose(cur[:, None, :])
                    s, z, lo, hi = scale_zero(lo[:, 0], hi[:, 0], qt, sc)
                    g_lo[:, g], g_hi[:, g], g_scale[:, g], g_zero[:, g] = lo, hi, s, z
                    seen[g] = True
                col_scale, col_zero = g_scale[:, g], g_zero[:, g]
            col = w1[:, i]
            q = np.clip(np.rint(col / col_scale) + col_zero, qmin, qmax)
            codes[:, i1 + i] = q
            e = (col - (q - col_zero) * col_scale) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if per_group:
        params = params_from_range(g_lo, g_hi, qt, gran, sc, gs)
    return QuantizedLinear.from_codes(codes[:, inv_perm], params, bias=bias, backend=backend)
