"""Reference quantized linear kernels (NumPy).

Common arguments, after :class:`qlinear.QuantizedLinear` has normalised them:

* ``codes``: the stored codes as integers of shape ``(out, in)`` (int4 already unpacked
  to one nibble per element), or a callable ``rows(start, stop)`` returning that slice.
* ``scales``: float64 ``(out, n_groups)``; per-tensor and per-channel layers pass
  ``n_groups == 1`` and ``group_size == in``.
* ``zp``: int32 ``(out, n_groups)``: the *effective* zero point, i.e. the zero point plus
  the storage offset, so that ``w[o, k] = (codes[o, k] - zp[o, k // gs]) * scales[o, k // gs]``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["dequantize_rows", "linear_float", "linear_int8act", "quantize_rows_int8"]

RowsFn = Callable[[int, int], np.ndarray]

# Rows dequantized at once by the float path: at most 2**18 elements (2 MiB in float64)
# and at most 1/8 of the rows, so the float tile stays a small fraction of the float
# weight the layer never builds.
TILE_ELEMENTS = 1 << 18


def tile_rows(out_features: int, in_features: int) -> int:
    """Rows per dequantized tile (see TILE_ELEMENTS)."""
    return max(1, min(TILE_ELEMENTS // max(1, in_features), -(-out_features // 8)))


def _group_index(in_features: int, group_size: int) -> np.ndarray:
    return np.arange(in_features) // group_size


def dequantize_rows(
    codes: np.ndarray, scales: np.ndarray, zp: np.ndarray, group_size: int, dtype=np.float64
) -> np.ndarray:
    """``(codes - zp) * scale`` for a block of rows, with each element's group's params.

    codes: integer ``(r, in)``; scales float64 ``(r, g)``; zp int ``(r, g)``.
    Returns ``(r, in)`` of ``dtype``. The subtraction is exact (integers); the product is
    rounded once, in ``dtype``.
    """
    in_features = codes.shape[1]
    if scales.shape[1] == 1:
        s = scales.astype(dtype)
        z = zp.astype(dtype)
    else:
        gi = _group_index(in_features, group_size)
        s = scales[:, gi].astype(dtype)
        z = zp[:, gi].astype(dtype)
    w = codes.astype(dtype)
    w -= z  # exact: small integers
    w *= s
    return w


def _rows(codes: np.ndarray | RowsFn, start: int, stop: int) -> np.ndarray:
    return codes(start, stop) if callable(codes) else codes[start:stop]


def linear_float(
    codes: np.ndarray | RowsFn,
    out_features: int,
    scales: np.ndarray,
    zp: np.ndarray,
    group_size: int,
    x: np.ndarray,
    bias: np.ndarray | None,
) -> np.ndarray:
    """Weight-only forward: ``x @ W.T + bias`` with ``W`` dequantized one row tile at a time.

    x: float32 or float64 ``(n, in)``; the computation and the result use x's dtype.
    Never holds more than one tile of ``W`` in float.
    """
    dtype = x.dtype
    n, in_features = x.shape
    y = np.empty((n, out_features), dtype=dtype)
    tile = tile_rows(out_features, in_features)
    for start in range(0, out_features, tile):
        stop = min(out_features, start + tile)
        w = dequantize_rows(
            _rows(codes, start, stop), scales[start:stop], zp[start:stop], group_size, dtype
        )
        np.matmul(x, w.T, out=y[:, start:stop])
        del w  # free this tile before the next one is built
    if bias is not None:
        y += bias.astype(dtype)
    return y


def quantize_rows_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row (per-token) symmetric int8 quantization of activations.

    x: float ``(n, k)`` -> (codes int8 ``(n, k)`` in -127..127, scales float64 ``(n,)``)
    with ``scale = max(max|x_row| / 127, tiny)`` (1.0 for an all-zero row; ``tiny`` the
    smallest normal float64, so a row of subnormals never gets a zero scale) and
    ``code = clip(rint(x / scale), -127, 127)``, computed in float64.
    """
    x64 = x.astype(np.float64)
    amax = np.abs(x64).max(axis=1) if x64.shape[1] else np.zeros(x64.shape[0])
    tiny = np.finfo(np.float64).tiny
    scale = np.where(amax > 0, np.maximum(amax / 127.0, tiny), 1.0)
    q = np.clip(np.rint(x64 / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def linear_int8act(
    codes: np.ndarray | RowsFn,
    out_features: int,
    scales: np.ndarray,
    zp: np.ndarray,
    group_size: int,
    x: np.ndarray,
    bias: np.ndarray | None,
) -> np.ndarray:
    """Dynamic W8A8 forward: activations quantized per row to int8, integer products.

    ``y[t, o] = sx[t] * sum_g sw[o, g] * dot[t, o, g] + bias[o]``, cast to x's dtype, with
    ``dot[t, o, g] = sum_{k in g} xq[t, k] * (codes[o, k] - zp[o, g])`` exact integers.

    One group per row (per tensor, per channel): ``(dot * sw) * sx + bias`` in float64.
    Several groups: the group sum is accumulated in float32, group by group in order,
    ``acc = acc + float32(dot_g) * float32(sw_g)`` (each product and each sum rounded to
    float32, ``acc`` starting at +0.0), then ``float64(acc) * sx + bias`` in float64. The
    float32 group sum adds a relative error of at most about ``n_groups * 2**-24`` (1e-5
    for 128 groups): far below the activations' rounding (about 1%), and it is what lets
    the kernels spend as little per group of 32 as per group of 128.
    """
    n, in_features = x.shape
    xq, sx = quantize_rows_int8(x)
    # Integer products summed in float64 are exact: every partial sum is an integer below
    # 127 * 255 * in_features < 2**53, so BLAS gives the int64 result in any order.
    xqf = xq.astype(np.float64)
    ng = scales.shape[1]
    y = np.empty((n, out_features), dtype=np.float64)
    tile = tile_rows(out_features, in_features)
    scales32 = scales.astype(np.float32) if ng > 1 else None
    for start in range(0, out_features, tile):
        stop = min(out_features, start + tile)
        c = _rows(codes, start, stop).astype(np.float64)
        if ng == 1:
            w = c - zp[start:stop]
            y[:, start:stop] = ((xqf @ w.T) * scales[start:stop, 0]) * sx[:, None]
            continue
        acc = np.zeros((n, stop - start), dtype=np.float32)
        for g in range(ng):
            k0, k1 = g * group_size, min(in_features, (g + 1) * group_size)
            w = c[:, k0:k1] - zp[start:stop, g : g + 1]
            acc += (xqf[:, k0:k1] @ w.T).astype(np.float32) * scales32[start:stop, g]
        y[:, start:stop] = acc.astype(np.float64) * sx[:, None]
    if bias is not None:
        y += bias
    return y.astype(x.dtype, copy=False)
