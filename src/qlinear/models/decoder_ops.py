"""Building blocks of the NumPy decoders: RMSNorm, SwiGLU, fused linear layers and
reading a layer's tensors by Hugging Face name. float32 in, float32 out."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..errors import FormatError
from ..kernels import native
from ..linear import QuantizedLinear
from ..moe._pieces import silu
from ..offset_linear import OffsetLinear
from ..params import QuantizationParams
from ..qtypes import QuantizationGranularity
from .ops import FloatLinear, LinearLike

__all__ = [
    "Capture",
    "Getter",
    "PrefetchPlan",
    "fuse_linears",
    "linear_dims",
    "offer",
    "rms_norm",
    "rms_norm_numpy",
    "run_linear",
    "silu",
    "softmax_rows",
    "softmax_rows_numpy",
    "swiglu",
]

# get(name) -> ndarray | LinearLike for a Hugging Face tensor name; KeyError (or None)
# when the checkpoint has no such tensor.
Getter = Callable[[str], Any]
# capture(name, x) -> a replacement LinearLike for this call, or None (see DecoderLayer).
Capture = Callable[[str, np.ndarray], "LinearLike | None"]


def run_linear(lin: LinearLike, x: np.ndarray) -> np.ndarray:
    """``lin(x)`` as float32 for a float32 ``(tokens, in)`` x the model already checked:
    QuantizedLinear (alone or inside an OffsetLinear) through its unchecked path (the
    model checks its logits once)."""
    kind = type(lin)
    if kind is QuantizedLinear and x.shape[0]:
        y = lin._forward_2d(x)  # type: ignore[attr-defined]
    elif kind is FloatLinear:
        y = x @ lin.weight.T  # type: ignore[attr-defined]
        if lin.bias is not None:  # type: ignore[attr-defined]
            y += lin.bias  # type: ignore[attr-defined]
    elif kind is Int8ActivationLinear and x.shape[0]:
        y = lin.layer._forward_2d(x, "int8")  # type: ignore[attr-defined]
    elif kind is OffsetLinear and x.shape[0]:
        # OffsetLinear.forward's formula without its checks of x
        y = lin.inner._forward_2d(x)  # type: ignore[attr-defined]
        sums = x.reshape(x.shape[0], -1, lin.group_size).sum(axis=-1)  # type: ignore[attr-defined]
        y = y + sums @ lin.offsets.T.astype(y.dtype)  # type: ignore[attr-defined]
    else:
        y = lin.forward(x)
    return y if y.dtype == np.float32 else np.asarray(y, dtype=np.float32)


def _prefetch_arrays(lins: Sequence[LinearLike | None]) -> tuple[list[np.ndarray], bool]:
    """What native forwards of ``lins`` stream through, in order, and whether every
    quantized one among them has its codes packed already (else it gives nothing yet)."""
    arrays: list[np.ndarray] = []
    ready = True
    for lin in lins:
        kind = type(lin)
        if kind is Int8ActivationLinear:
            lin = lin.layer  # type: ignore[union-attr]
        elif kind is OffsetLinear:
            lin = lin.inner  # type: ignore[union-attr]
        if type(lin) is QuantizedLinear:
            got = lin._prefetch_arrays()  # type: ignore[union-attr]
            if not got and lin._weight.backend != "numpy":  # type: ignore[union-attr]
                ready = False  # packed at its first forward: ask again next time
            arrays += got
    return arrays, ready


class PrefetchPlan:
    """Calling it has the kernels' pool worker bring what native forwards of a fixed
    sequence of linears stream through (packed codes, scale panels), in order, into cache
    while this thread runs the NumPy steps and the calls before them (decode is
    memory-bound; one request, which replaces the previous one; nothing for float layers,
    None, or codes not packed yet). The list of arrays is gathered once, as soon as every
    quantized linear in it is packed: a decode step sends four requests a layer, and
    gathering them each time cost about 0.5 ms a token."""

    __slots__ = ("_arrays", "_lins")

    def __init__(self, *lins: LinearLike | None) -> None:
        self._lins = lins
        self._arrays: list[np.ndarray] | None = None

    def __call__(self) -> None:
        arrays = self._arrays
        if arrays is None:
            arrays, ready = _prefetch_arrays(self._lins)
            if ready:
                self._arrays = arrays
        native.prefetch(arrays)


class Int8ActivationLinear:
    """A :class:`QuantizedLinear` run with dynamic per-token int8 activations, as a W8A8
    checkpoint (compressed-tensors int-quantized with dynamic input activations) asks:
    ``forward(x) = layer.forward(x, activations="int8")``."""

    __slots__ = ("layer",)

    def __init__(self, layer: QuantizedLinear) -> None:
        self.layer = layer

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.out_features

    @property
    def nbytes(self) -> int:
        return self.layer.nbytes

    @property
    def bias(self) -> np.ndarray | None:
        return self.layer.bias

    def forward(self, x: np.ndarray) -> np.ndarray:
        return self.layer.forward(x, activations="int8")

    __call__ = forward

    def dequantize(self, dtype: Any = np.float64) -> np.ndarray:
        return self.layer.dequantize(dtype)


def offer(capture: Capture, name: str, x: np.ndarray, lin: LinearLike) -> LinearLike:
    """``capture(name, x)``'s replacement for ``lin``, or ``lin`` when it returns None."""
    r = capture(name, x)
    return lin if r is None else r


@functools.cache
def native_ops_backend() -> str | None:
    """The kernel backend that runs the runner's float steps (RMSNorm, attention softmax,
    SwiGLU, RoPE) natively: the active one when the extension is built, unless it is the
    NumPy reference (``QLINEAR_BACKEND=numpy``), then None. Decided once, like the
    backend."""
    from ..kernels import get_backend

    name = get_backend().name
    return name if native.STATUS == "ok" and name != "numpy" else None


def use_native_ops() -> bool:
    """Whether :func:`native_ops_backend` names a backend."""
    return native_ops_backend() is not None


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``(..., d)`` -> float32 ``(..., d)``: :func:`rms_norm_numpy`, on the native
    extension for C-contiguous float32 x and weight (one call instead of eight small
    NumPy ones; the same float32 products, the sum of squares in float64)."""
    d = x.shape[-1]
    if (
        d
        and x.dtype == np.float32
        and weight.dtype == np.float32
        and x.flags.c_contiguous
        and use_native_ops()
    ):
        return native.rms_norm(x.reshape(-1, d), weight, eps).reshape(x.shape)
    return rms_norm_numpy(x, weight, eps)


def rms_norm_numpy(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``(..., d)`` -> float32 ``(..., d)``: ``weight * x / sqrt(mean(x^2) + eps)``
    (mean over the last axis, in float32 as transformers' LlamaRMSNorm computes it); the
    specification of the native version."""
    # x * rsqrt(var + eps), as transformers multiplies; the few-element var is where the
    # square root and the division happen, the (tokens, d) array sees two products only
    var = np.einsum("...i,...i->...", x, x)[..., None]
    var *= np.float32(1.0 / x.shape[-1])
    var += np.float32(eps)
    np.sqrt(var, out=var)
    np.divide(np.float32(1.0), var, out=var)
    out = x * var
    out *= weight
    return out


def softmax_rows(scores: np.ndarray, scale: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The attention softmax: float32 ``scores (..., per, cols)`` -> the same shape, each
    row ``i`` of the last two axes scaled by ``scale`` and normalised over its visible
    keys ``lo[i] .. hi[i]`` (int64 ``(per,)``; 0 elsewhere). In place on the native
    kernels for a C-contiguous array (one pass per row instead of six NumPy passes over
    the whole score block); :func:`softmax_rows_numpy` otherwise, and its specification."""
    backend = native_ops_backend()
    if backend and scores.dtype == np.float32 and scores.flags.c_contiguous:
        lo, hi = np.ascontiguousarray(lo, np.int64), np.ascontiguousarray(hi, np.int64)
        native.softmax_rows(backend, scores.reshape(-1, scores.shape[-1]), scale, lo, hi)
        return scores
    return softmax_rows_numpy(scores, scale, lo, hi)


def softmax_rows_numpy(
    scores: np.ndarray, scale: float, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """:func:`softmax_rows` in NumPy float32: ``scores * scale``, keys outside ``lo[i] ..
    hi[i]`` set to -inf, minus the row maximum, exp, divided by the row sum (in place
    where NumPy allows)."""
    scores *= np.float32(scale)
    cols = np.arange(scores.shape[-1])
    mask = (cols >= np.asarray(lo)[:, None]) & (cols <= np.asarray(hi)[:, None])
    if not mask.all():
        scores = np.where(mask, scores, np.float32(-np.inf))
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


def swiglu(gu: np.ndarray, d_ff: int) -> np.ndarray:
    """``gu`` float32 ``(tokens, 2 d_ff)`` (gate then up) -> ``silu(gate) * up`` with
    ``silu(g) = g / (1 + exp(-g))``: one new array, the rest in place. A gate below about
    -88 makes ``exp(-g)`` Inf and the quotient 0 (silu's limit); callers run it under
    ``np.errstate(over="ignore")``. On the native kernels (C-contiguous float32 gu) one
    pass with an exp of their own, within a few float32 ulps of this."""
    backend = native_ops_backend()
    if backend and gu.dtype == np.float32 and gu.flags.c_contiguous and gu.shape[1] == 2 * d_ff:
        return native.swiglu_rows(backend, gu)
    g = gu[:, :d_ff]
    h = np.negative(g)
    np.exp(h, out=h)
    h += np.float32(1.0)
    np.divide(g, h, out=h)
    h *= gu[:, d_ff:]
    return h


def linear_dims(lin: Any) -> tuple[int, int]:
    """``(out_features, in_features)`` of a LinearLike (or a 2-D weight array)."""
    if isinstance(lin, np.ndarray):
        return int(lin.shape[0]), int(lin.shape[1])
    return int(lin.out_features), int(lin.in_features)


def _quantized_fusable(parts: Sequence[QuantizedLinear]) -> bool:
    p0 = parts[0]
    if p0.granularity is QuantizationGranularity.PER_TENSOR:
        return False  # one scale per matrix: rows of different matrices cannot share it
    return all(
        (p.qtype, p.scheme, p.granularity, p.group_size, p.backend, p.in_features)
        == (p0.qtype, p0.scheme, p0.granularity, p0.group_size, p0.backend, p0.in_features)
        and (p.bias is None) == (p0.bias is None)
        for p in parts
    )


def fuse_linears(parts: Sequence[LinearLike]) -> LinearLike | None:
    """One layer computing ``concat([p(x) for p in parts], axis=-1)`` in one call, or None
    when the parts cannot be stacked (mixed kinds, different quantization settings).

    FloatLinear parts: their weights concatenated (a copy). QuantizedLinear parts with the
    same qtype, scheme, per-channel or per-group granularity and group size: one layer
    from the concatenated codes, scales and zero points (the same codes, so the same
    results row for row). Int8ActivationLinear parts: their layers fused so, still run
    with int8 activations (x is quantized per token, so each row of the fused result is
    the one its part gives)."""
    if all(type(p) is FloatLinear for p in parts):
        fl: list[FloatLinear] = list(parts)  # type: ignore[arg-type]
        has_b = [p.bias is not None for p in fl]
        w = np.concatenate([p.weight for p in fl], axis=0)
        b = None
        if any(has_b):
            b = np.concatenate(
                [p.bias if p.bias is not None else np.zeros(p.out_features, np.float32) for p in fl]
            )
        return FloatLinear(w, b)
    if all(type(p) is Int8ActivationLinear for p in parts):
        inner = fuse_linears([p.layer for p in parts])  # type: ignore[attr-defined]
        return None if inner is None else Int8ActivationLinear(inner)  # type: ignore[arg-type]
    if all(isinstance(p, QuantizedLinear) for p in parts):
        ql: list[QuantizedLinear] = list(parts)  # type: ignore[arg-type]
        if not _quantized_fusable(ql):
            return None
        p0 = ql[0].params
        cat = np.concatenate
        params = QuantizationParams(
            p0.qtype,
            p0.scheme,
            p0.granularity,
            cat([p.params.scale for p in ql]),
            cat([p.params.zero_point for p in ql]),
            cat([p.params.min_val for p in ql]),
            cat([p.params.max_val for p in ql]),
            p0.group_size,
        )
        bias = None if ql[0].bias is None else cat([p.bias for p in ql])
        return QuantizedLinear.from_codes(
            cat([p.qweight for p in ql]), params, bias=bias, backend=ql[0].backend
        )
    return None


def fetch(get: Getter, name: str) -> Any:
    """``get(name)``, or None when the checkpoint has no such tensor."""
    try:
        return get(name)
    except KeyError:
        return None


def need_array(get: Getter, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float tensor ``name`` as float32 of exactly ``shape``; FormatError otherwise."""
    a = fetch(get, name)
    if a is None:
        raise FormatError(f"tensor {name!r} is missing; expected shape {shape}")
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        raise FormatError(f"tensor {name!r} must be a float array of shape {shape}; got {a!r:.80}")
    if a.shape != shape:
        raise FormatError(f"tensor {name!r} has shape {a.shape}; expected {shape}")
    return a if a.dtype == np.float32 else a.astype(np.float32)


def need_linear(get: Getter, name: str, out_f: int, in_f: int, bias: bool) -> LinearLike:
    """The linear layer ``name`` (``name.weight`` and, with ``bias``, ``name.bias``):
    a FloatLinear for float tensors, or the LinearLike the getter holds (for example a
    QuantizedLinear, whose bias is its own). FormatError names a missing or misshaped one."""
    w = fetch(get, name + ".weight")
    if w is None:
        raise FormatError(f"tensor {name + '.weight'!r} is missing; expected shape {(out_f, in_f)}")
    if not isinstance(w, np.ndarray):
        dims = linear_dims(w)
        if dims != (out_f, in_f):
            raise FormatError(
                f"layer {name!r} has shape {dims}; expected (out, in) = {(out_f, in_f)}"
            )
        if bias and getattr(w, "bias", None) is None and isinstance(w, QuantizedLinear):
            b = fetch(get, name + ".bias")
            if b is not None:
                w = w.with_bias(need_array(get, name + ".bias", (out_f,)))
        return w
    weight = need_array(get, name + ".weight", (out_f, in_f))
    b = need_array(get, name + ".bias", (out_f,)) if bias else None
    return FloatLinear(weight, b)
