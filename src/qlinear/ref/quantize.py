"""Reference weight quantization: floats and params -> integer codes."""

from __future__ import annotations

import numpy as np

__all__ = ["expand_groups", "quantize_codes"]


def expand_groups(p: np.ndarray, out_features: int, in_features: int, group_size: int | None):
    """Broadcast per-tensor ``(1,)``, per-channel ``(out,)`` or per-group ``(out, g)``
    params to something that broadcasts against ``(out, in)``."""
    if p.ndim == 2:
        return p[:, np.arange(in_features) // group_size]
    if p.shape == (1,) and out_features != 1:
        return p.reshape(1, 1)
    return p.reshape(-1, 1)


def quantize_codes(
    weight: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    qmin: int,
    qmax: int,
    group_size: int | None = None,
) -> np.ndarray:
    """``clip(rint(w / scale) + zero_point, qmin, qmax)`` in float64, as int16 ``(out, in)``.

    Rounding is half to even (``np.rint``) before the zero point is added, as PyTorch's
    ``quantize_per_channel`` does.
    """
    out_f, in_f = weight.shape
    s = expand_groups(scale, out_f, in_f, group_size)
    z = expand_groups(zero_point, out_f, in_f, group_size).astype(np.float64)
    q = np.rint(weight.astype(np.float64) / s) + z
    return np.clip(q, qmin, qmax).astype(np.int16)
