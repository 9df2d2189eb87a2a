"""Native kernel backends (``portable``, ``avx2``, ``avx512``) over the ``_native`` extension.

All three share one packed layout (blocks of 16 output rows, 4 consecutive input columns
per output row side by side, int8 codes stored as ``code + 128``; see ``docs/kernels.md``)
and differ only in the instructions their kernels use. Imported by :mod:`qlinear.kernels`
at the end of its import; if the extension cannot be imported, qlinear keeps the NumPy
backend, warns once and :func:`qlinear.backend_info` says why.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any

import numpy as np

from . import kernels, ref
from ._checks import check_finite
from ._mapped import check_mapped
from .packing import unpack_int4
from .qtypes import QuantizationType

try:
    from . import _native  # type: ignore[attr-defined]

    if not hasattr(_native, "linear"):
        # Without the compiled module, the C++ source folder qlinear/_native/ imports
        # as an empty namespace package.
        raise ImportError("the compiled extension qlinear._native is not built")
except ImportError as exc:  # pragma: no cover - depends on the build
    _native = None
    kernels._state["native"] = f"unavailable: {exc}"
    warnings.warn(
        f"qlinear native kernels unavailable ({exc}); using the NumPy reference backend",
        RuntimeWarning,
        stacklevel=2,
    )

__all__: list[str] = []

_FEATURES: dict[str, bool] = dict(_native.cpu_features()) if _native is not None else {}


class _Packed:
    """Packed codes plus a cache of the kernel zero points derived from a layer's.

    A lazy instance holds the canonical codes (for a loaded file: memory-mapped, not
    copied) until the first forward packs them, once, under a lock.
    """

    __slots__ = ("_canon", "_lock", "bits", "codes", "zpu_cache")

    def __init__(self, codes: np.ndarray | None, bits: int, canon: np.ndarray | None = None):
        self.codes = codes
        self.bits = bits
        self.zpu_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._canon = canon
        self._lock = threading.Lock() if codes is None else None

    def packed(self, out: int, in_features: int) -> np.ndarray:
        if self.codes is None:
            with self._lock:  # type: ignore[union-attr]
                if self.codes is None:
                    check_mapped(self._canon)  # a truncated mapped file: FormatError, no SIGBUS
                    codes = _native.pack(self._canon, self.bits, out, in_features)
                    codes.setflags(write=False)
                    self.codes, self._canon = codes, None
        return self.codes


def _readonly_copy(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.setflags(write=False)
    return a


class NativeBackend:
    """One ISA level of the native kernels."""

    # int8 mode: the kernels find NaN/Inf in x while quantizing it (the caller skips
    # its own pass over x).
    checks_int8_input = True
    # float mode: a NaN/Inf in x always reaches the output (no x element is skipped), so
    # the caller checks x only when the output is not all finite.
    checks_float_input_via_output = True
    # The caller needs no np.errstate: the compiled kernels raise no NumPy warnings and
    # the reference fallback below sets its own.
    fp_warnings_silenced = True

    def __init__(self, name: str, priority: int, feature: str | None, describe: str) -> None:
        self.name = name
        self.priority = priority
        self._feature = feature
        self._describe = describe

    def supported(self) -> bool:
        # CPUID traps to the hypervisor on virtual machines: ask once.
        return _native is not None and (self._feature is None or _FEATURES[self._feature])

    def pack(self, stored: np.ndarray, qtype: QuantizationType, in_features: int, *, lazy=False):
        bits = 4 if qtype is QuantizationType.INT4 else 8
        canon = np.ascontiguousarray(stored).view(np.uint8)
        out = canon.shape[0]
        if lazy:
            return kernels.PackedWeight(
                self.name, qtype, out, in_features, _Packed(None, bits, canon), canon.nbytes
            )
        codes = _native.pack(canon, bits, out, in_features)
        codes.setflags(write=False)
        return kernels.PackedWeight(
            self.name, qtype, out, in_features, _Packed(codes, bits), codes.nbytes
        )

    def unpack(self, pw) -> np.ndarray:
        d: _Packed = pw.data
        lazy_canon = d._canon  # read before codes: packing sets codes first, then clears it
        codes = d.codes
        if codes is None:  # still lazy: the canonical codes are at hand
            check_mapped(lazy_canon)
            canon = lazy_canon.view(np.int8) if d.bits == 8 else lazy_canon
            return canon if not canon.flags.writeable else _readonly_copy(canon)
        canon = _native.unpack(codes, d.bits, pw.out_features, pw.in_features)
        if d.bits == 8:
            canon = canon.view(np.int8)
        canon.setflags(write=False)
        return canon

    @staticmethod
    def _zpu(d: _Packed, zp: np.ndarray) -> np.ndarray:
        # Kernels read unsigned codes: int8 codes are stored + 128, so is the zero point.
        cache = d.zpu_cache
        if cache is not None and cache[0] is zp:
            return cache[1]
        zpu = np.ascontiguousarray(zp, dtype=np.int32)
        if d.bits == 8:
            zpu = zpu + np.int32(128)
        d.zpu_cache = (zp, zpu)
        return zpu

    def linear(self, pw, x, scales, zp, group_size, bias, activations):
        d: _Packed = pw.data
        n_groups = scales.shape[1]
        if n_groups > 1 and group_size % 4:
            # Groups that do not start on a multiple of 4 columns: reference kernel.
            codes = self.unpack(pw)
            if d.bits == 4:
                codes = unpack_int4(codes, pw.in_features)
            check_finite("x", x)  # the reference path: checked up front in both modes
            fn = ref.linear_int8act if activations == "int8" else ref.linear_float
            with np.errstate(over="ignore", invalid="ignore"):
                return fn(codes, pw.out_features, scales, zp, group_size, x, bias)
        if x.strides[1] != x.itemsize or x.strides[0] < 0:
            x = np.ascontiguousarray(x)
        y = _native.linear(
            self.name,
            d.packed(pw.out_features, pw.in_features),
            d.bits,
            pw.out_features,
            pw.in_features,
            group_size,
            np.ascontiguousarray(scales, dtype=np.float64),
            self._zpu(d, zp),
            bias,
            x,
            activations == "int8",
            kernels.get_num_threads(),
        )
        if y is None:  # int8 mode found a NaN or an infinity in x: name the first one
            check_finite("x", x)
        return y

    def info(self) -> dict[str, Any]:
        return {"kernels": self._describe}


if _native is not None:
    kernels._state["native"] = "ok"
    for _b in (
        NativeBackend("portable", 10, None, "native portable C++ (no ISA extensions)"),
        NativeBackend("avx2", 20, "avx2", "native AVX2+FMA (int8: vpmaddwd)"),
        NativeBackend("avx512", 30, "avx512vnni", "native AVX-512 (int8: VNNI vpdpbusd)"),
    ):
        kernels.register_backend(_b)
