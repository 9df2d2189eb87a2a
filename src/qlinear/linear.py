"""QuantizedLinear: an immutable quantized weight matrix with a forward pass.

A layer holds integer codes ``q`` of shape ``(out_features, in_features)`` (int8, or int4
packed two to a byte), float64 scales and int32 zero points (per tensor, per output
channel, or per output channel and input group) and an optional float bias. It computes
``y = x @ W.T + bias`` with ``W = (q - zero_point) * scale`` without ever building the
whole float ``W``: kernels dequantize one tile of rows at a time, or multiply integers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import kernels
from ._checks import as_array, as_float_matrix, check_finite
from .errors import InvalidInputError, InvalidParamsError, ShapeMismatchError
from .kernels import ACTIVATION_MODES, KernelWeight
from .packing import pack_int4, packed_cols, unpack_int4
from .params import QuantizationParams
from .qtypes import (
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
    storage_offset,
)
from .ref import dequantize_rows, quantize_codes

__all__ = ["QuantizedLinear"]

SUPPORTED_QTYPES = (QuantizationType.INT8, QuantizationType.INT4)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


class QuantizedLinear:
    """A linear layer ``y = x @ W.T + b`` whose weight ``W`` is stored as integer codes.

    Build one with :meth:`from_fp` (quantize a float matrix) or :meth:`from_codes`
    (integer codes you already have); the constructor is private. Layers are immutable
    (every array they expose is read-only) and safe to call from several threads.

    Dequantization: ``W[o, k] = (q[o, k] - zero_point[o, g]) * scale[o, g]`` where ``g``
    is ``k // group_size`` for per-group layers and 0 otherwise, and the row index is 0
    for per-tensor layers.
    """

    __slots__ = ("_bias", "_params", "_weight")

    def __init__(
        self,
        _weight: KernelWeight,
        _params: QuantizationParams,
        _bias: np.ndarray | None,
        *,
        _token: object = None,
    ) -> None:
        if _token is not _PRIVATE:
            raise TypeError(
                "QuantizedLinear is built with QuantizedLinear.from_fp(weight, params) or "
                "QuantizedLinear.from_codes(codes, params)"
            )
        self._weight = _weight  # every kernel-side fact (zero point domain, groups, layout)
        self._params = _params
        self._bias = _bias

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_fp(
        cls,
        weight: np.ndarray,
        params: QuantizationParams,
        *,
        bias: np.ndarray | None = None,
        backend: str | None = None,
    ) -> QuantizedLinear:
        """Quantize a float weight with the given parameters.

        Args:
            weight: float ``(out_features, in_features)``, finite, non-empty.
            params: from :func:`qlinear.calibrate_linear` (or built by hand); its scale
                shape must fit the weight's shape and granularity.
            bias: optional float ``(out_features,)``; same as ``.with_bias(bias)``.
            backend: kernel backend to pack for (default: the active one); mostly for tests.

        Codes are ``clip(rint(w / scale) + zero_point, qmin, qmax)``: round half to even,
        then clamp to the code range of (qtype, scheme).

        Raises:
            InvalidParamsError: params is not QuantizationParams, or a qtype this layer
                cannot hold.
            ShapeMismatchError: weight not 2-D, or params that do not fit its shape.
            InvalidInputError: NaN/Inf or non-float weights.
        """
        params = cls._check_params(params)
        w = as_float_matrix("weight", weight, dtype=None)
        params.check_weight_shape(*w.shape)
        qmin, qmax = params.code_range
        codes = quantize_codes(w, params.scale, params.zero_point, qmin, qmax, params.group_size)
        return cls._from_checked_codes(codes, params, bias, backend)

    @classmethod
    def from_codes(
        cls,
        codes: np.ndarray,
        params: QuantizationParams,
        *,
        bias: np.ndarray | None = None,
        backend: str | None = None,
    ) -> QuantizedLinear:
        """A layer from integer codes ``(out_features, in_features)`` that already lie in
        the code range of ``params`` (as GPTQ or a checkpoint loader produce them)."""
        params = cls._check_params(params)
        q = as_array("codes", codes)
        if q.dtype.kind not in "iu":
            raise InvalidInputError(f"codes must be integers; got dtype {q.dtype}")
        if q.ndim != 2 or q.size == 0:
            raise ShapeMismatchError(
                f"codes must be a non-empty 2-D array (out_features, in_features); got shape "
                f"{q.shape}"
            )
        params.check_weight_shape(*q.shape)
        qmin, qmax = params.code_range
        if q.min() < qmin or q.max() > qmax:
            raise InvalidInputError(
                f"codes must lie in [{qmin}, {qmax}] for {params.qtype.value} "
                f"{params.scheme.value}; got values from {q.min()} to {q.max()}"
            )
        return cls._from_checked_codes(q, params, bias, backend)

    @classmethod
    def _from_stored(
        cls,
        stored: np.ndarray,
        params: QuantizationParams,
        in_features: int,
        bias: np.ndarray | None = None,
        backend: str | None = None,
        *,
        lazy: bool = False,
    ) -> QuantizedLinear:
        """A layer from canonical stored codes (int8 ``(out, in)`` or packed int4
        ``uint8 (out, ceil(in/2))``), used by loaders; the array is not copied when the
        backend can use it as is. ``lazy``: a backend with its own layout may defer
        repacking to the first forward (loaders of memory-mapped files ask for this)."""
        params = cls._check_params(params)
        stored = np.asarray(stored)
        int4 = params.qtype is QuantizationType.INT4
        dtype, cols = (np.uint8, packed_cols(in_features)) if int4 else (np.int8, in_features)
        if stored.dtype != dtype or stored.ndim != 2 or stored.shape[1] != cols:
            # Caught here, not at the first forward (where int8 would fail deep in matmul
            # and uint8 int8 codes would be read as 0..255).
            raise ShapeMismatchError(
                f"stored {params.qtype.value} codes for in_features={in_features} must be "
                f"{np.dtype(dtype).name} of shape (out_features, {cols}); got "
                f"{stored.dtype} {stored.shape}"
            )
        params.check_weight_shape(stored.shape[0], in_features)
        weight = kernels.get_backend(backend).prepare(stored, params, in_features, lazy=lazy)
        return cls(weight, params, cls._check_bias(bias, stored.shape[0]), _token=_PRIVATE)

    @classmethod
    def _from_checked_codes(cls, codes, params, bias, backend) -> QuantizedLinear:
        offset = storage_offset(params.qtype, params.scheme)
        if params.qtype is QuantizationType.INT4:
            stored = pack_int4((codes.astype(np.int16) + offset).astype(np.uint8))
        else:
            # A copy, always: an int8 array given to from_codes would otherwise be shared
            # (and flipped read-only), so writes through its base would change the layer.
            stored = np.array(codes, dtype=np.int8, order="C", copy=True)
        return cls._from_stored(stored, params, codes.shape[1], bias, backend)

    @staticmethod
    def _check_params(params: Any) -> QuantizationParams:
        if not isinstance(params, QuantizationParams):
            raise InvalidParamsError(
                f"params must be a QuantizationParams (see calibrate_linear); got "
                f"{type(params).__name__}"
            )
        if params.qtype not in SUPPORTED_QTYPES:
            raise InvalidParamsError(
                f"QuantizedLinear holds int8 or int4 codes; got qtype {params.qtype.value!r}"
            )
        return params

    @staticmethod
    def _check_bias(bias: Any, out_features: int) -> np.ndarray | None:
        if bias is None:
            return None
        b = as_array("bias", bias)
        if b.dtype.kind != "f":
            raise InvalidInputError(f"bias must be floating point; got dtype {b.dtype}")
        if b.ndim != 1 or b.shape[0] != out_features:
            raise ShapeMismatchError(
                f"bias must have shape ({out_features},) to match out_features; got {b.shape}"
            )
        b = np.array(b, dtype=np.float64)
        check_finite("bias", b)
        return _readonly(b)

    def with_bias(self, bias: np.ndarray | None) -> QuantizedLinear:
        """A new layer with the same weight (shared, not copied) and this bias.

        bias: float ``(out_features,)``, or None to drop the bias.
        Raises ShapeMismatchError if ``len(bias) != out_features``.
        """
        b = self._check_bias(bias, self.out_features)
        return QuantizedLinear(self._weight, self._params, b, _token=_PRIVATE)

    # ---------------------------------------------------------------- properties
    @property
    def out_features(self) -> int:
        return self._weight.out_features

    @property
    def in_features(self) -> int:
        return self._weight.in_features

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``."""
        return (self.out_features, self.in_features)

    @property
    def qtype(self) -> QuantizationType:
        return self._params.qtype

    @property
    def scheme(self) -> QuantizationScheme:
        return self._params.scheme

    @property
    def granularity(self) -> QuantizationGranularity:
        return self._params.granularity

    @property
    def group_size(self) -> int | None:
        return self._params.group_size

    @property
    def params(self) -> QuantizationParams:
        """The (immutable) parameters the layer was built with."""
        return self._params

    @property
    def scales(self) -> np.ndarray:
        """float64, read-only: ``(1,)``, ``(out_features,)`` or ``(out_features, n_groups)``."""
        return self._params.scale

    @property
    def zero_points(self) -> np.ndarray:
        """int32, read-only, the shape of :attr:`scales`."""
        return self._params.zero_point

    @property
    def bias(self) -> np.ndarray | None:
        """float64 ``(out_features,)`` read-only, or None."""
        return self._bias

    @property
    def backend(self) -> str:
        """Name of the kernel backend that packed this layer."""
        return self._weight.backend

    @property
    def qweight(self) -> np.ndarray:
        """The codes as a read-only int8 ``(out_features, in_features)`` array (int4 codes
        unpacked, one per element; symmetric -7..7, asymmetric 0..15)."""
        stored = self._weight.stored()
        if self.qtype is QuantizationType.INT4:
            offset = storage_offset(self.qtype, self.scheme)
            stored = (unpack_int4(stored, self.in_features).astype(np.int16) - offset).astype(
                np.int8
            )
        elif stored.flags.writeable:
            stored = stored.copy()
        return _readonly(stored) if stored.flags.writeable else stored

    @property
    def stored_weight(self) -> np.ndarray:
        """Canonical stored codes: int8 ``(out, in)``, or int4 packed ``uint8 (out, ceil(in/2))``
        (see :mod:`qlinear.packing`)."""
        return self._weight.stored()

    @property
    def nbytes(self) -> int:
        """Bytes held by the layer: packed codes, scales, zero points and bias."""
        w = self._weight
        arrays = [self._params.scale, self._params.zero_point, *w.arrays()]
        if self._bias is not None:
            arrays.append(self._bias)
        seen: set[int] = set()
        total = w.nbytes
        for a in arrays:
            base = a if a.base is None else a.base
            if id(base) not in seen and isinstance(base, np.ndarray):
                seen.add(id(base))
                total += base.nbytes
        return total

    # ---------------------------------------------------------------- compute
    def dequantize(self, dtype: Any = np.float64) -> np.ndarray:
        """The float weight ``(q - zero_point) * scale``, shape ``(out, in)``, in ``dtype``.

        This builds the whole matrix; :meth:`forward` never does.
        """
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise InvalidParamsError(
                f"dequantize needs a float dtype such as np.float32; got {dtype!r}"
            ) from None
        if dt.kind != "f":
            raise InvalidParamsError(f"dequantize needs a float dtype; got {dt}")
        codes = self.stored_weight
        if self.qtype is QuantizationType.INT4:
            codes = unpack_int4(codes, self.in_features)
        # Canonical codes with the zero points of the canonical domain.
        kw = kernels.kernel_params(self._params, self.out_features, self.in_features, 0)
        with np.errstate(over="ignore", invalid="ignore"):
            w = dequantize_rows(codes, kw[0], kw[1], kw[2], dt)
        if not np.isfinite(w).all():  # a scale beyond dt's range: Inf, and 0 * Inf = NaN
            raise InvalidParamsError(
                f"the weight (scales up to {float(self.scales.max()):.3g}) does not fit in "
                f"{dt}; expected a wider float dtype such as float64"
            )
        return w

    def forward(self, x: np.ndarray, *, activations: str = "float") -> np.ndarray:
        """``y = x @ W.T + bias``.

        Args:
            x: float ``(..., in_features)`` (1-D, 2-D or N-D), finite. float32 and float64
                compute and return in their own dtype; float16 computes and returns float32,
                wider floats (longdouble) float64.
            activations: ``"float"`` (default): weight-only, float activations. ``"int8"``:
                dynamic W8A8, each row of x quantized to int8 with its own scale
                (``max|row| / 127``), integer products, then rescaled; faster on native
                backends. Rounding the activations moves each by at most half a step, so
                ``|y - y_float| <= max|row| / 254 * sum_k |W[o, k]|``; about 0.8% relative
                error on Gaussian activations (see docs/kernels.md).

        Returns:
            ``(..., out_features)``.

        Raises:
            ShapeMismatchError: the last dimension is not in_features, or x is 0-D.
            InvalidInputError: non-float dtype or NaN/Inf values, or a result that
                overflows x's dtype (inputs or weights too large for it).
            InvalidParamsError: an unknown ``activations`` mode.
        """
        if activations not in ACTIVATION_MODES:
            raise InvalidParamsError(
                f"activations must be one of {ACTIVATION_MODES}; got {activations!r}"
            )
        a = as_array("x", x)
        if a.dtype.kind != "f":
            raise InvalidInputError(
                f"x must be a floating-point array (float16/32/64); got dtype {a.dtype}"
            )
        if a.ndim == 0 or a.shape[-1] != self.in_features:
            raise ShapeMismatchError(f"x must have shape (..., {self.in_features}); got {a.shape}")
        if a.dtype not in (np.float32, np.float64):
            # float16 -> float32; longdouble -> float64; byte-swapped floats keep their size
            a = a.astype(np.float64 if a.dtype.itemsize > 4 else np.float32)
        lead = a.shape[:-1]
        x2 = a.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return np.zeros((*lead, self.out_features), dtype=a.dtype)
        return self._weight.forward(x2, self._bias, activations).reshape(*lead, self.out_features)

    def _forward_2d(self, x: np.ndarray, activations: str = "float") -> np.ndarray:
        """The unchecked path for qlinear's own modules (gptq, moe, models), whose public
        entry points already checked x: ``x`` float32/float64 ``(n, in_features)``,
        ``n >= 1``, ``activations`` in ``("float", "int8")``; returns ``(n, out_features)``
        in x's dtype. NaN/Inf in x and overflow still raise InvalidInputError."""
        return self._weight.forward(x, self._bias, activations)

    def _prefetch_arrays(self) -> tuple[np.ndarray, ...]:
        """For qlinear's model runners: what this layer's forward streams through, to
        prefetch ahead of it (:func:`qlinear.kernels.native.prefetch`)."""
        return self._weight.prefetch_arrays()

    __call__ = forward

    def __reduce__(self):
        # Pickle / copy the canonical codes and rebuild: the copy is packed for the active
        # backend and read-only like the original.
        return (
            _rebuild,
            (np.array(self.stored_weight), self._params, self.in_features, self._bias),
        )

    def __repr__(self) -> str:
        gs = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"QuantizedLinear(out_features={self.out_features}, in_features={self.in_features}, "
            f"{self.qtype.value}, {self.scheme.value}, {self.granularity.value}{gs}, "
            f"bias={self._bias is not None}, backend={self.backend!r})"
        )


_PRIVATE = object()


def _rebuild(stored: np.ndarray, params: Any, in_features: int, bias: Any) -> QuantizedLinear:
    """Unpickle a :class:`QuantizedLinear` (a module-level function, so that pickle and
    cloudpickle (Ray) both refer to it by name rather than copying it by value)."""
    return QuantizedLinear._from_stored(stored, params, in_features, bias)
