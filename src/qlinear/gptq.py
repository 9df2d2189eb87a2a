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

from collections.abc import Callable, Sequence

import numpy as np

from ._checks import as_float_matrix, check_x
from ._ranges import (
    DEFAULT_PERCENTILE,
    blocks,
    check_grid,
    check_method,
    check_percentile,
    choose_range,
    scale_zero,
)
from .calibrate import _check_group_size, params_from_range
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

__all__ = [
    "HessianAccumulator",
    "PreparedHessian",
    "gptq_grid_codes",
    "gptq_quantize",
    "hessian",
]

# Rows of X multiplied at once when accumulating X^T X (bounds the float64 copy).
_ROWS = 4096
# Columns updated one by one inside a block before a matrix product catches the block up.
_SUB = 16


def _check_x(x_calib: object, in_features: int) -> np.ndarray:
    x2 = check_x("x_calib", x_calib, in_features).reshape(-1, in_features)
    if x2.shape[0] == 0:
        raise ShapeMismatchError(
            f"x_calib holds no samples (shape {np.shape(x_calib)}); expected at least one row"
        )
    return x2


def hessian(x: np.ndarray) -> np.ndarray:
    """``H = 2 / n * X^T X`` in float64 for ``x (n, in)``, accumulated in row chunks.

    When ``max|X|`` lies outside ``[1e-100, 1e100]``, ``H`` is computed for ``X * 2^-e``
    (``2^e`` near ``max|X|``) instead, so that it neither overflows nor underflows to zero
    (which would mark live inputs as dead). GPTQ depends on ``H`` only up to a positive
    factor, except through the unit diagonal given to dead inputs; inside that range
    nothing is rescaled and the result is the reference's exactly."""
    n, k = x.shape
    m = float(np.max(np.abs(x)))
    # ldexp on the data, not a factor 2^-e: for subnormal inputs 2^-e itself overflows.
    shift = 0 if (m == 0 or 1e-100 <= m <= 1e100) else -int(np.frexp(m)[1])
    h = np.zeros((k, k))
    for i in range(0, n, _ROWS):
        xc = x[i : i + _ROWS].astype(np.float64)
        if shift:
            xc = np.ldexp(xc, shift)
        h += xc.T @ xc
    h *= 2.0 / n
    return h


class HessianAccumulator:
    """``H = 2 / n * X^T X`` (float64 ``(in, in)``) accumulated over batches of rows, for
    inputs too large to hold at once (layer-sequential GPTQ over a whole model).

    ``add(x)`` takes float ``(..., in)``; float32 batches are multiplied in float32 (BLAS
    sgemm, ``_ROWS`` rows at a time) and summed in float64, which is about twice as fast
    as float64 products and keeps a relative error near ``1e-7``; float64 batches are
    multiplied in float64. No rescaling is applied: inputs must be finite with
    ``max|x|`` well inside float32's range (hidden states of a model are). ``value()``
    returns ``H`` (a new array) and raises when no row was added."""

    def __init__(self, in_features: int) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)):
            raise InvalidParamsError(f"in_features must be an integer >= 1; got {in_features!r}")
        if in_features < 1:
            raise InvalidParamsError(f"in_features must be >= 1; got {in_features}")
        self.in_features = int(in_features)
        self.rows = 0
        self._sum = np.zeros((self.in_features, self.in_features))

    def add(self, x: np.ndarray) -> None:
        x2 = check_x("x", x, self.in_features).reshape(-1, self.in_features)
        for i in range(0, x2.shape[0], _ROWS):
            xc = x2[i : i + _ROWS]
            self._sum += xc.T @ xc
        self.rows += x2.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add the rows of ``other`` (a partial Hessian of other calibration rows, e.g.
        from another worker): afterwards ``self`` is as if it had seen both."""
        if not isinstance(other, HessianAccumulator) or other.in_features != self.in_features:
            raise ShapeMismatchError(
                f"cannot merge a Hessian of {getattr(other, 'in_features', other)!r} features "
                f"into one of {self.in_features}; expected the same in_features"
            )
        self._sum += other._sum
        self.rows += other.rows

    def value(self) -> np.ndarray:
        if self.rows == 0:
            raise ShapeMismatchError("no calibration rows were added; expected at least one")
        h = self._sum * (2.0 / self.rows)
        if not np.all(np.isfinite(h)):
            raise InvalidInputError(
                "the calibration Hessian overflowed to Inf; expected inputs well inside "
                "float32's range"
            )
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


def _inv_upper(r: np.ndarray) -> np.ndarray:
    """Inverse of an upper triangular matrix by halves, with matrix products only:
    ``inv([[A, B], [0, C]]) = [[inv(A), -inv(A) B inv(C)], [0, inv(C)]]`` (about ``n^3 / 3``
    flops, against ``8 n^3 / 3`` for a general solve)."""
    n = r.shape[0]
    if n <= 64:
        return np.triu(np.linalg.inv(r))
    k = n // 2
    a_inv, c_inv = _inv_upper(r[:k, :k]), _inv_upper(r[k:, k:])
    out = np.zeros_like(r)
    out[:k, :k], out[k:, k:] = a_inv, c_inv
    out[:k, k:] = -(a_inv @ r[:k, k:]) @ c_inv
    return out


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> np.ndarray:
    """``U`` upper triangular with ``U^T U = (H + damp * mean(diag H) * I)^-1``.

    With ``J`` the order reversal, ``J H J = M M^T`` (Cholesky) gives ``H = R R^T`` with
    ``R = J M J`` upper triangular, so ``H^-1 = R^-T R^-1`` and ``U = R^-1``: one Cholesky
    and one triangular inverse instead of inverting ``H`` and factoring again."""
    h = h.copy()
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    try:
        r = np.linalg.cholesky(h[::-1, ::-1])[::-1, ::-1]
    except np.linalg.LinAlgError:
        raise InvalidInputError(
            f"the calibration Hessian is not positive definite with damp={damp}; "
            "expected damp > 0 (e.g. 0.01) or more varied calibration inputs"
        ) from None
    return _inv_upper(np.ascontiguousarray(r))


def _prepared(h: np.ndarray | PreparedHessian, damp: float, act_order: bool) -> PreparedHessian:
    """``h`` as a :class:`PreparedHessian` for these options (made here from a raw
    Hessian; a prepared one must have been made with the same options)."""
    if isinstance(h, PreparedHessian):
        if h.damp != float(damp) or h.act_order != bool(act_order):
            raise InvalidParamsError(
                f"the PreparedHessian was made with damp={h.damp}, act_order={h.act_order}; "
                f"got damp={damp}, act_order={act_order}"
            )
        return h
    return PreparedHessian(h, damp=float(damp), act_order=bool(act_order), _checked=True)


def gptq_quantize(
    weight: np.ndarray,
    x_calib: np.ndarray | None,
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
    hessian: np.ndarray | None = None,
) -> QuantizedLinear:
    """Quantize ``weight`` with GPTQ on calibration inputs ``x_calib`` (or their Hessian).

    Args:
        weight: float ``(out_features, in_features)``, finite, non-empty.
        x_calib: float ``(..., in_features)``, finite, at least one row: inputs of this
            layer on calibration data (rows are samples/tokens). None when ``hessian``
            is given instead.
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
        hessian: float ``(in_features, in_features)``, symmetric positive semi-definite:
            ``2 / n * X^T X`` of the inputs, as :func:`hessian` or
            :class:`HessianAccumulator` compute it, passed instead of ``x_calib`` (not
            modified); or a :class:`PreparedHessian` made with the same ``damp`` and
            ``act_order``, so that layers sharing one input (q/k/v) factor it once.

    Returns:
        A :class:`QuantizedLinear` whose codes are chosen greedily, column by column, to
        keep ``||X W^T - X Q^T||`` small (``Q`` the dequantized weight), in the original
        column order, with ``bias`` attached.

    Raises:
        ShapeMismatchError: ``x_calib`` of the wrong width or with no rows, or a
            ``hessian`` not ``(in_features, in_features)``; a weight that is not 2-D or is
            empty.
        InvalidInputError: NaN/Inf or non-float weight or inputs; a Hessian that is not
            positive definite (``damp=0`` and degenerate inputs).
        InvalidParamsError: an invalid format, method or option; both or neither of
            ``x_calib`` and ``hessian``.
    """
    qt, sc, gran = as_qtype(qtype), as_scheme(scheme), as_granularity(granularity)
    if not qt.is_integer:
        raise InvalidParamsError(
            f"gptq_quantize quantizes to integer codes; got qtype {qt.value!r}, "
            "expected 'int8' or 'int4'"
        )
    gs = _check_group_size(group_size, gran)
    meth = check_method(method)
    pct = check_percentile(percentile)
    shrink = check_grid(grid)
    _check_options(damp, block_size, act_order)
    w = as_float_matrix("weight", weight).copy()
    out_f, in_f = w.shape
    h = _calibration_hessian(x_calib, hessian, in_f)
    qmin, qmax = code_range(qt, sc)

    def choose(b: np.ndarray):
        return choose_range(b, qt, sc, meth, pct, shrink)

    per_group = gran is QuantizationGranularity.PER_GROUP
    if not per_group:
        (b,) = blocks(w, gran, gs)
        lo, hi = choose(b)
        params = params_from_range(lo.reshape(-1), hi.reshape(-1), qt, gran, sc)
        col_scale = np.broadcast_to(params.scale.astype(np.float64), (out_f,))
        col_zero = np.broadcast_to(params.zero_point.astype(np.float64), (out_f,))

    prep = _prepared(h, damp, act_order)
    dead, perm, u = prep.dead, prep.perm, prep.u
    w[:, dead] = 0.0
    inv_perm = np.argsort(perm)
    wt = np.ascontiguousarray(w[:, perm].T)  # (in, out): a column is a contiguous row

    if per_group:
        ng = -(-in_f // gs)
        g_lo, g_hi = np.empty((ng, out_f)), np.empty((ng, out_f))
        g_scale, g_zero = np.empty((ng, out_f)), np.empty((ng, out_f))
        group_of = perm // gs  # group of the column processed at each position
        seen = np.zeros(ng, dtype=bool)

    def col_params(j: int, current) -> tuple[np.ndarray, np.ndarray]:
        if not per_group:
            return col_scale, col_zero
        g = group_of[j]
        if not seen[g]:
            cur = current(inv_perm[g * gs : min(in_f, (g + 1) * gs)])  # (size, out)
            lo, hi = choose(cur.T[:, None, :])
            g_scale[g], g_zero[g], g_lo[g], g_hi[g] = scale_zero(lo[:, 0], hi[:, 0], qt, sc)
            seen[g] = True
        return g_scale[g], g_zero[g]

    def quantize(j: int, col: np.ndarray, current) -> tuple[np.ndarray, np.ndarray]:
        scale, zero = col_params(j, current)
        q = np.clip(np.rint(col / scale) + zero, qmin, qmax)
        return q, (q - zero) * scale

    with np.errstate(over="ignore", invalid="ignore"):
        codes = _quantize_columns(wt, u, int(block_size), quantize)
    if not np.all(np.isfinite(wt)):
        raise InvalidInputError(
            f"the error feedback overflowed float64 for weights up to {np.abs(w).max():.3g} "
            "in magnitude; expected weights well inside float64's range (below ~1e300)"
        )
    if per_group:
        params = params_from_range(g_lo.T, g_hi.T, qt, gran, sc, gs)
    return QuantizedLinear.from_codes(codes.T[:, inv_perm], params, bias=bias, backend=backend)


def gptq_grid_codes(
    weight: np.ndarray,
    hessian: np.ndarray | PreparedHessian,
    group_size: int,
    block_params: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    code_min: int,
    code_max: int,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ onto a per-group grid with float steps and offsets, as stored in a file.

    ``weight`` float ``(out, in)`` with ``in`` a multiple of ``group_size``; ``hessian``
    as for :func:`gptq_quantize` (an array or a :class:`PreparedHessian`).
    ``block_params(g)`` takes a group's error-updated weights float64 ``(out,
    group_size)`` (when the first of its columns is reached in processing order) and
    returns ``(d, m)`` float64 ``(out,)``: the step and the offset exactly as the file
    will store them (already rounded, e.g. to float16). Each column is then quantized
    against them, ``q = clip(rint((w - m) / d), code_min, code_max)`` (``q = 0`` where
    ``d == 0``), and the error fed back is ``w - (d * q + m)``: the weight the file
    dequantizes is the one GPTQ optimised.

    Returns ``(codes int16 (out, in), d (out, n_groups), m (out, n_groups))`` in the
    original column order, ``W_q[o, k] = d[o, k // gs] * codes[o, k] + m[o, k // gs]``.
    """
    _check_options(damp, block_size, act_order)
    w = as_float_matrix("weight", weight).copy()
    out_f, in_f = w.shape
    gs = _check_group_size(group_size, QuantizationGranularity.PER_GROUP)
    if in_f % gs:
        raise ShapeMismatchError(
            f"in_features {in_f} must be a multiple of group_size {gs} for a stored grid"
        )
    h = _calibration_hessian(None, hessian, in_f)
    prep = _prepared(h, damp, act_order)
    w[:, prep.dead] = 0.0
    perm = prep.perm
    inv_perm = np.argsort(perm)
    wt = np.ascontiguousarray(w[:, perm].T)
    ng = in_f // gs
    d_all, m_all = np.empty((ng, out_f)), np.empty((ng, out_f))
    safe = np.empty((ng, out_f))
    group_of = perm // gs
    seen = np.zeros(ng, dtype=bool)

    def quantize(j: int, col: np.ndarray, current) -> tuple[np.ndarray, np.ndarray]:
        g = group_of[j]
        if not seen[g]:
            cur = current(inv_perm[g * gs : (g + 1) * gs])  # (gs, out)
            d_all[g], m_all[g] = block_params(np.ascontiguousarray(cur.T))
            safe[g] = np.where(d_all[g] == 0, 1.0, d_all[g])
            seen[g] = True
        d, m = d_all[g], m_all[g]
        q = np.clip(np.rint((col - m) / safe[g]), code_min, code_max)
        q = np.where(d == 0, 0.0, q)
        return q, d * q + m

    with np.errstate(over="ignore", invalid="ignore"):
        codes = _quantize_columns(wt, prep.u, int(block_size), quantize)
    if not np.all(np.isfinite(wt)):
        raise InvalidInputError(
            f"the error feedback overflowed float64 for weights up to {np.abs(w).max():.3g} "
            "in magnitude; expected weights well inside float64's range"
        )
    return codes.T[:, inv_perm], d_all.T.copy(), m_all.T.copy()


class PreparedHessian:
    """The part of GPTQ that depends on the Hessian alone, computed once and shared by
    every weight with the same inputs (q, k and v of an attention layer): dead inputs
    (``H[i, i] == 0``), the processing order (by decreasing ``H[i, i]`` with
    ``act_order``) and ``U``, the upper Cholesky factor of ``(H_perm + damp *
    mean(diag H) I)^-1``. Pass it as ``gptq_quantize(..., hessian=prepared)`` with the same
    ``damp`` and ``act_order``. Read-only after construction."""

    __slots__ = ("act_order", "damp", "dead", "in_features", "perm", "u")

    def __init__(
        self,
        hessian: np.ndarray,
        *,
        damp: float = 0.01,
        act_order: bool = False,
        _checked: bool = False,
    ) -> None:
        if not _checked:
            _check_options(damp, 1, act_order)
            hessian = _checked_hessian(hessian, np.shape(hessian)[0] if np.ndim(hessian) else 0)
        h = hessian
        in_f = h.shape[0]
        dead = np.diag(h) == 0
        h[dead, dead] = 1.0
        perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(in_f)
        self.u = _upper_cholesky_of_inverse(h[perm][:, perm], float(damp))
        self.dead, self.perm = dead, perm
        for a in (self.u, self.dead, self.perm):
            a.setflags(write=False)
        self.in_features, self.damp, self.act_order = in_f, float(damp), bool(act_order)


def _calibration_hessian(x_calib: object, h: object, in_f: int) -> np.ndarray | PreparedHessian:
    """A float64 copy of the Hessian given, the Hessian of ``x_calib``, or the
    PreparedHessian given."""
    if (x_calib is None) == (h is None):
        raise InvalidParamsError(
            "pass exactly one of x_calib (calibration inputs) and hessian (their 2/n X^T X); "
            f"got {'neither' if h is None else 'both'}"
        )
    if h is None:
        return hessian(_check_x(x_calib, in_f))
    if isinstance(h, PreparedHessian):
        if h.in_features != in_f:
            raise ShapeMismatchError(
                f"the PreparedHessian is for in_features {h.in_features}; the weight has {in_f}"
            )
        return h
    return _checked_hessian(h, in_f)


def _checked_hessian(h: object, in_f: int) -> np.ndarray:
    a = as_float_matrix("hessian", h).copy()
    if a.shape != (in_f, in_f):
        raise ShapeMismatchError(
            f"hessian must have shape ({in_f}, {in_f}) to match the weight's in_features; "
            f"got {a.shape}"
        )
    if np.any(np.diag(a) < 0):
        i = int(np.flatnonzero(np.diag(a) < 0)[0])
        raise InvalidInputError(
            f"hessian[{i}, {i}] is {a[i, i]}; expected a positive semi-definite matrix "
            "(2/n X^T X) with a non-negative diagonal"
        )
    return a


def _quantize_columns(wt, u, block_size, quantize) -> np.ndarray:
    """The GPTQ column loop on ``wt (in, out)`` (columns in processing order, updated in
    place) with ``U (in, in)``; returns the codes ``(in, out)`` as int16.

    ``quantize(j, col, current)`` gives the codes and the dequantized values, both
    ``(out,)``, of column ``j`` (processing position) whose error-updated weights are
    ``col``; ``current(positions)`` returns the up-to-date weights ``(len, out)`` of
    columns not yet quantized, pending lazy updates included (for parameters chosen when
    a group's first column is reached).

    Errors are pushed at three levels: inside a sub-block of ``_SUB`` columns after every
    column, to the rest of the block after each sub-block, and to the columns after the
    block once per block (one matrix product each), which keeps the per-column work at
    ``_SUB`` rows instead of ``block_size``.
    """
    n_in, out_f = wt.shape
    codes = np.empty((n_in, out_f), dtype=np.int16)
    for i1 in range(0, n_in, block_size):
        i2 = min(n_in, i1 + block_size)
        wb = wt[i1:i2].copy()
        errb = np.zeros((i2 - i1, out_f))
        ub = u[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, _SUB):
            j2 = min(i2 - i1, j1 + _SUB)

            def current(pos, j1=j1, j2=j2, i1=i1, i2=i2, wb=wb, errb=errb, ub=ub):
                out = np.empty((pos.size, out_f))
                sub = pos < i1 + j2  # in this sub-block: up to date
                blk = ~sub & (pos < i2)  # later in the block: owes this sub-block's errors
                aft = pos >= i2  # after the block: owes the block's errors so far
                out[sub] = wb[pos[sub] - i1]
                out[blk] = wb[pos[blk] - i1] - ub[j1:j2, pos[blk] - i1].T @ errb[j1:j2]
                out[aft] = wt[pos[aft]] - u[i1:i2, pos[aft]].T @ errb
                return out

            for i in range(j1, j2):
                col = wb[i]
                q, deq = quantize(i1 + i, col, current)
                codes[i1 + i] = q
                e = (col - deq) / ub[i, i]
                wb[i:j2] -= np.outer(ub[i, i:j2], e)
                errb[i] = e
            wb[j2:] -= ub[j1:j2, j2:].T @ errb[j1:j2]
        wt[i2:] -= u[i1:i2, i2:].T @ errb
    return codes
