"""Checked conversion of quantization scales to float16 (GGUF blocks, compressed-tensors
float16 checkpoints), so that no Inf, NaN or silently zeroed scale is ever written.

float16 holds finite values up to 65504; normal values down to 2**-14 (6.1e-5) with 11
significant bits; subnormal values down to 2**-24 (6.0e-8) with fewer bits. A weight
group whose scale (``amax / 127`` or ``amax / 7`` ...) exceeds 65504 has weights beyond
about 8.3e6 (int8) or 4.6e5 (int4): its float16 scale would be Inf. A group whose scale is
below 2**-25 would round to 0 and dequantize to all zeros.

:func:`to_float16_scales` raises :class:`~qlinear.errors.InvalidParamsError` for both,
naming ``what`` (the tensor), the first offending index and value, and the range; it
never clamps, because the codes were computed with the unrounded scale and a clamped
scale would change every weight of the group. Zero scales (GGUF writes ``d = 0`` for an
all-zero block) stay 0. Subnormal results are allowed (their relative rounding error,
up to 2**-11 for normals, grows to at most 50% at 2**-24) unless ``subnormal="raise"``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import InvalidParamsError

__all__ = ["FLOAT16_MAX", "FLOAT16_MIN_NORMAL", "FLOAT16_MIN_SUBNORMAL", "to_float16_scales"]

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
FLOAT16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2**-14
FLOAT16_MIN_SUBNORMAL = 2.0**-24


def _first(mask: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argwhere(mask)[0])


def to_float16_scales(
    scales: np.ndarray,
    what: str,
    *,
    subnormal: Literal["allow", "raise"] = "allow",
) -> np.ndarray:
    """float ``(...)`` scales >= 0 -> float16 ``(...)``, rounded to nearest even.

    Raises:
        InvalidParamsError: a scale that is negative, NaN or Inf; one that rounds to
            Inf (> 65504, weights too large for float16 scales) or to 0 (< 2**-25,
            weights too small); a subnormal result when ``subnormal="raise"``. The
            message names ``what``, the index and the value.
    """
    s = np.asarray(scales, dtype=np.float64)
    bad = ~np.isfinite(s) | (s < 0)
    if bad.any():
        i = _first(bad)
        raise InvalidParamsError(f"{what}: scale {s[i]!r} at {i} is not a finite number >= 0")
    with np.errstate(over="ignore", under="ignore"):
        h = s.astype(np.float16)
    over = np.isinf(h)
    if over.any():
        i = _first(over)
        raise InvalidParamsError(
            f"{what}: scale {s[i]:.6g} at {i} overflows float16 (largest {FLOAT16_MAX:g}); "
            "the weights are too large for float16 scales: store float32 scales or "
            "rescale the weights"
        )
    under = (h == 0) & (s > 0)
    if under.any():
        i = _first(under)
        raise InvalidParamsError(
            f"{what}: scale {s[i]:.6g} at {i} underflows float16 to 0 (smallest "
            f"{FLOAT16_MIN_SUBNORMAL:.3g}); the weights are too small for float16 scales: "
            "store float32 scales or rescale the weights"
        )
    if subnormal == "raise":
        sub = (h != 0) & (np.abs(h) < FLOAT16_MIN_NORMAL)
        if sub.any():
            i = _first(sub)
            raise InvalidParamsError(
                f"{what}: scale {s[i]:.6g} at {i} is subnormal in float16 (below "
                f"{FLOAT16_MIN_NORMAL:.3g}); it would lose precision"
            )
    elif subnormal != "allow":
        raise InvalidParamsError(f"subnormal must be 'allow' or 'raise'; got {subnormal!r}")
    return h
