"""The GGUF block grids Q8_0, Q4_0 and Q4_1, as data, and the two ways qlinear puts a
float weight on them: round to nearest (:func:`quantize_weight`) and GPTQ
(:func:`gptq_quantize_gguf`).

Every grid is blocks of 32 columns with a float16 step ``d`` and, for Q4_1, a float16
offset ``m``; a weight is held as signed codes ``q`` with ``w = d * q + m``:

======  ==========  ======================  ============================================
type    codes ``q``  ``d`` (llama.cpp rule)   ``m``
======  ==========  ======================  ============================================
Q8_0    -128..127   ``amax / 127``           0
Q4_0    -8..7       ``max / -8``, ``max``    0 (stored nibble ``q + 8``)
                    the signed value of
                    largest magnitude
Q4_1    0..15       ``(max - min) / 15``     ``min``
======  ==========  ======================  ============================================

``d`` and ``m`` are rounded to float16 *before* the codes are chosen, so the codes are
the nearest grid points of the grid as stored (llama.cpp's reference rounds against the
float32 step, then stores it as float16). With the llama.cpp rule Q4_0 uses its whole
range: the value of largest magnitude gets code -8 and the other side reaches +7 at most.
``method="mse"`` instead picks, per block, the step ``c * d`` (Q4_1: the range
``c * (min, max)``) over qlinear's shrink grid ``c`` in ``1.0, 0.99, ..., 0.5`` with the
least squared error of the block's rounding.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .._fp16 import to_float16_scales
from .._ranges import DEFAULT_GRID
from ..errors import InvalidParamsError
from ..linear import QuantizedLinear
from ..offset_linear import OffsetLinear
from ..params import QuantizationParams

__all__ = [
    "BLOCK",
    "CODE_RANGES",
    "GGUF_TYPES",
    "GRID_METHODS",
    "block_params",
    "gptq_quantize_gguf",
    "grid_codes",
    "layer_from_grid",
    "quantize_weight",
]

BLOCK = 32
GGUF_TYPES = ("q8_0", "q4_0", "q4_1")
CODE_RANGES = {"q8_0": (-128, 127), "q4_0": (-8, 7), "q4_1": (0, 15)}
GRID_METHODS = ("minmax", "mse")
TINY = float(np.float16(2.0**-24))  # smallest positive float16: the scale of all-zero blocks


def _check_kind(kind: object) -> str:
    if kind not in GGUF_TYPES:
        raise InvalidParamsError(f"gguf type must be one of {GGUF_TYPES}; got {kind!r}")
    return kind  # type: ignore[return-value]


def _f16(a: np.ndarray, kind: str) -> np.ndarray:
    """float16-rounded ``a`` as float64, checked: a weight too large (or too small) for
    float16 is a clear error, never an Inf scale on disk (qlinear._fp16)."""
    h = to_float16_scales(np.abs(a.astype(np.float32)), f"{kind.upper()} block scales")
    return np.copysign(h.astype(np.float64), a)


def _rule(b: np.ndarray, kind: str, c: float) -> tuple[np.ndarray, np.ndarray]:
    if kind == "q8_0":
        return _f16(c * np.abs(b).max(-1) / 127, kind), np.zeros(b.shape[:-1])
    if kind == "q4_0":
        i = np.abs(b).argmax(-1)[..., None]
        return _f16(c * np.take_along_axis(b, i, -1)[..., 0] / -8, kind), np.zeros(b.shape[:-1])
    lo, hi = c * b.min(-1), c * b.max(-1)
    return _f16((hi - lo) / 15, kind), _f16(lo, kind)


def block_params(b: np.ndarray, kind: str, method: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """``(d, m)`` float64 ``(...,)``, float16-exact, of float blocks ``b (..., 32)`` (see
    the module docstring; ``d`` is signed for Q4_0, ``m`` is 0 but for Q4_1)."""
    kind = _check_kind(kind)
    if method not in GRID_METHODS:
        raise InvalidParamsError(
            f"a GGUF grid is chosen by one of {GRID_METHODS}; got method {method!r}"
        )
    b = np.asarray(b, dtype=np.float64)
    d, m = _rule(b, kind, 1.0)
    if method == "minmax":
        return d, m
    best = _sq_error(b, d, m, kind)
    for c in DEFAULT_GRID[1:]:
        dc, mc = _rule(b, kind, float(c))
        err = _sq_error(b, dc, mc, kind)
        better = err < best
        d, m, best = np.where(better, dc, d), np.where(better, mc, m), np.where(better, err, best)
    return d, m


def _sq_error(b: np.ndarray, d: np.ndarray, m: np.ndarray, kind: str) -> np.ndarray:
    q = grid_codes(b, d, m, kind)
    e = d[..., None] * q + m[..., None] - b
    return np.einsum("...k,...k->...", e, e)


def grid_codes(b: np.ndarray, d: np.ndarray, m: np.ndarray, kind: str) -> np.ndarray:
    """Codes float64 ``(..., 32)``: ``clip(rint((b - m) / d))`` to the code range of
    ``kind``, 0 in blocks with ``d == 0`` (their weight is ``m``)."""
    lo, hi = CODE_RANGES[kind]
    ds = np.where(d == 0, 1.0, d)[..., None]
    q = np.clip(np.rint((b - m[..., None]) / ds), lo, hi)
    return np.where((d == 0)[..., None], 0.0, q)


def _params(scale: np.ndarray, zp: np.ndarray, qtype: str) -> QuantizationParams:
    lo = np.zeros_like(scale)
    return QuantizationParams(qtype, "asymmetric", "per_group", scale, zp, lo, lo, BLOCK)


def layer_from_grid(
    q: np.ndarray,
    d: np.ndarray,
    m: np.ndarray,
    kind: str,
    *,
    bias: np.ndarray | None = None,
    backend: str | None = None,
) -> QuantizedLinear | OffsetLinear:
    """The layer holding ``W[o, k] = d[o, g] * q[o, k] + m[o, g]`` (``g = k // 32``) exactly:
    ``q`` integer-valued ``(out, in)`` in the code range of ``kind``; ``d``, ``m``
    float16-exact ``(out, in // 32)``.

    Q8_0: int8 asymmetric per-group(32), codes ``q``, zero point 0 (``d < 0``: codes
    ``-q - 1``, zero point -1). Q4_0: int4, codes ``q + 8``, zero point 8 (``d < 0``: codes
    ``7 - q``, zero point 7). Q4_1: :class:`OffsetLinear` of int4 codes ``q``, zero point 0,
    plus offsets ``m``. Scales are ``|d|`` (``d == 0``: the smallest float16, codes at the
    zero point)."""
    kind = _check_kind(kind)
    q = np.asarray(q, dtype=np.float64)
    out_f, in_f = q.shape
    nb = in_f // BLOCK
    qb = q.reshape(out_f, nb, BLOCK)
    d, m = np.asarray(d, np.float64), np.asarray(m, np.float64)
    zero, neg = d == 0, d < 0
    scale = np.where(zero, TINY, np.abs(d))

    def build(codes: np.ndarray, zp: np.ndarray, qtype: str) -> QuantizedLinear:
        return QuantizedLinear.from_codes(
            codes.reshape(out_f, in_f).astype(np.int16),
            _params(scale, zp.astype(np.int32), qtype),
            bias=bias,
            backend=backend,
        )

    if kind == "q8_0":
        codes = np.where(neg[..., None], -qb - 1, qb)
        return build(np.where(zero[..., None], 0, codes), np.where(neg, -1, 0), "int8")
    if kind == "q4_0":
        n = qb + 8
        codes = np.where(neg[..., None], 15 - n, n)
        return build(np.where(zero[..., None], 8, codes), np.where(neg, 7, 8), "int4")
    if np.any(neg):
        raise InvalidParamsError("Q4_1 steps d must be >= 0 (codes 0..15 from the minimum up)")
    inner = build(np.where(zero[..., None], 0, qb), np.zeros(d.shape), "int4")
    return OffsetLinear(inner, m)


def quantize_weight(
    w: np.ndarray,
    kind: str,
    backend: str | None = None,
    *,
    method: str = "minmax",
    bias: np.ndarray | None = None,
) -> QuantizedLinear | OffsetLinear:
    """qlinear's rounding of a float ``(out, in)`` weight (``in`` a multiple of 32) onto
    the ``kind`` grid: float16 block parameters by :func:`block_params` (default
    llama.cpp's rule), then the nearest codes against the *stored* parameters."""
    kind = _check_kind(kind)
    w = np.asarray(w, dtype=np.float64)
    out_f, in_f = w.shape
    if in_f % BLOCK:
        raise InvalidParamsError(
            f"{kind.upper()} needs in_features divisible by {BLOCK}; got {in_f}"
        )
    b = w.reshape(out_f, in_f // BLOCK, BLOCK)
    d, m = block_params(b, kind, method)
    q = grid_codes(b, d, m, kind).reshape(out_f, in_f)
    return layer_from_grid(q, d, m, kind, bias=bias, backend=backend)


def gptq_quantize_gguf(
    w: np.ndarray,
    hessian: Any,
    kind: str,
    *,
    method: str = "minmax",
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    bias: np.ndarray | None = None,
    backend: str | None = None,
) -> QuantizedLinear | OffsetLinear:
    """GPTQ of a float ``(out, in)`` weight (``in`` a multiple of 32) onto the ``kind``
    grid as stored: each block's float16 ``(d, m)`` is chosen by :func:`block_params` on
    the block's error-updated weights when GPTQ reaches its first column, and every
    column is quantized against those stored values
    (:func:`qlinear.gptq.gptq_grid_codes`). ``hessian``: ``2/n X^T X`` float
    ``(in, in)`` or a :class:`qlinear.gptq.PreparedHessian` (same ``damp`` and
    ``act_order``). The layer's ``dequantize()`` is what gguf-py reads from the file."""
    from ..gptq import gptq_grid_codes

    kind = _check_kind(kind)
    if method not in GRID_METHODS:
        raise InvalidParamsError(
            f"a GGUF grid is chosen by one of {GRID_METHODS}; got method {method!r}"
        )
    in_f = np.shape(w)[-1] if np.ndim(w) == 2 else 0
    if in_f % BLOCK:
        raise InvalidParamsError(
            f"{kind.upper()} needs in_features divisible by {BLOCK}; got {in_f}"
        )

    def params(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return block_params(g, kind, method)

    lo, hi = CODE_RANGES[kind]
    q, d, m = gptq_grid_codes(
        w, hessian, BLOCK, params, lo, hi, damp=damp, act_order=act_order, block_size=block_size
    )
    return layer_from_grid(q, d, m, kind, bias=bias, backend=backend)
