"""The one module that knows how int4 codes are laid out in bytes.

In memory, an int4 weight of shape ``(out_features, in_features)`` is a ``uint8`` array of
shape ``(out_features, ceil(in_features / 2))``. Each byte holds two *stored* nibbles
(unsigned, 0..15): column ``2j`` in the low nibble (bits 0-3) and column ``2j + 1`` in the
high nibble (bits 4-7). Rows are packed independently, so when ``in_features`` is odd the
high nibble of each row's last byte is padding and is always 0.

A stored nibble is the code plus :func:`qlinear.qtypes.storage_offset`: symmetric codes
-7..7 are stored as 1..15 (code + 8), asymmetric codes 0..15 as they are.

Example: the codes 0, 1, 2, ..., 7 of one row (stored as is) pack to the bytes
``0x10, 0x32, 0x54, 0x76``.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError, ShapeMismatchError

__all__ = ["pack_int4", "packed_cols", "unpack_int4"]


def packed_cols(in_features: int) -> int:
    """Bytes per row of a packed int4 matrix: ``ceil(in_features / 2)``."""
    return (in_features + 1) // 2


def pack_int4(nibbles: np.ndarray) -> np.ndarray:
    """Pack nibbles ``(rows, cols)`` with values 0..15 into ``uint8 (rows, ceil(cols/2))``."""
    a = np.asarray(nibbles)
    if a.ndim != 2:
        raise ShapeMismatchError(f"pack_int4 expects a 2-D array; got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise InvalidInputError(f"pack_int4 expects integer nibbles; got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() > 15):
        raise InvalidInputError(
            f"int4 nibbles must lie in [0, 15]; got values from {a.min()} to {a.max()}"
        )
    rows, cols = a.shape
    padded = np.zeros((rows, 2 * packed_cols(cols)), dtype=np.uint8)
    padded[:, :cols] = a
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``uint8 (rows, ceil(cols/2))`` -> ``uint8 (rows, cols)``."""
    p = np.asarray(packed)
    if p.ndim != 2 or p.dtype != np.uint8 or p.shape[1] != packed_cols(cols):
        raise ShapeMismatchError(
            f"packed int4 data must be uint8 of shape (rows, {packed_cols(cols)}); got "
            f"{p.dtype} {p.shape}"
        )
    out = np.empty((p.shape[0], 2 * p.shape[1]), dtype=np.uint8)
    out[:, 0::2] = p & 0x0F
    out[:, 1::2] = p >> 4
    return out[:, :cols]
