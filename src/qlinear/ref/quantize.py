"""Reference weight quantization: floats and params -> integer codes."""

from __future__ import annotations

import numpy as np

__all__ = ["quantize_codes"]

BLOCK_ELEMENTS = 1 << 16


def _round_clip(w, s, z, qmin, qmax) -> np.ndarray:
    # w / s overflows to +-Inf only for a scale far below |w| (a subnormal scale given by
    # hand); the clamp below then gives the same code as for any value past the range.
    with np.errstate(over="ignore"):
        q = np.rint(w / s)
    q += z
    return np.clip(q, qmin, qmax, out=q).astype(np.int16)


def quantize_codes(
    weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qmin: int,
    qmax: int,
    group_size: int | None = None,
) -> np.ndarray:
    """``clip(rint(w / scale) + zero_point, qmin, qmax)`` in float64, as int16 ``(out, in)``.

    scale/zero_point: ``(1,)`` per tensor, ``(out,)`` per channel, ``(out, n_groups)`` per
    group of ``group_size`` columns (the last group may be partial). Rounding is half to
    even (``np.rint``) before the zero point is added, as PyTorch's ``quantize_per_channel``
    does.
    """
    out_f, in_f = weight.shape
    q = np.empty((out_f, in_f), dtype=np.int16)
    # Row blocks keep the float temporaries small and reused: fresh full-size temporaries
    # cost more in page faults than the arithmetic itself.
    rows = max(1, BLOCK_ELEMENTS // max(1, in_f))
    for a in range(0, out_f, rows):
        b = min(out_f, a + rows)
        pa, pb = (0, 1) if scale.shape[0] == 1 else (a, b)
        q[a:b] = _quantize_block(
            weight[a:b].astype(np.float64, copy=False),
            scale[pa:pb],
            zero_point[pa:pb].astype(np.float64),
            qmin,
            qmax,
            group_size,
        )
    return q


def _quantize_block(w, scale, z, qmin, qmax, group_size):
    if scale.ndim == 1:
        return _round_clip(w, scale.reshape(-1, 1), z.reshape(-1, 1), qmin, qmax)
    assert group_size is not None  # params validated per-group shapes
    rows, in_f = w.shape
    q = np.empty((rows, in_f), dtype=np.int16)
    n_full = in_f // group_size
    full = n_full * group_size
    if n_full:  # whole groups as (rows, groups, group_size): no per-element param copies
        wg = w[:, :full].reshape(rows, n_full, group_size)
        qg = _round_clip(wg, scale[:, :n_full, None], z[:, :n_full, None], qmin, qmax)
        q[:, :full] = qg.reshape(rows, full)
    if full < in_f:  # the partial last group
        q[:, full:] = _round_clip(w[:, full:], scale[:, -1:], z[:, -1:], qmin, qmax)
    return q
