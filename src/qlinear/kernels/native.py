"""Native kernel backends (``portable``, ``avx2``, ``avx512``, ``amx``) over the ``_native``
extension.

All four share one packed layout (blocks of 16 output rows, 4 consecutive input columns
per output row side by side, int8 codes stored as ``code + 128``; see ``_src/layout.h``
and ``docs/kernels.md``) and differ only in the instructions their kernels use.
:func:`backends` returns them (none if the extension cannot be imported) and
:data:`STATUS` says ``"ok"`` or why not; importing this module warns once in that case.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import ref
from .._mapped import check_mapped
from ..packing import unpack_int4
from ..params import QuantizationParams
from ..qtypes import QuantizationType
from .registry import KernelWeight, get_num_threads, kernel_params

__all__ = [
    "STATUS",
    "NativeBackend",
    "NativeWeight",
    "Panels",
    "backends",
    "make_panels",
    "prefetch",
    "rms_norm",
    "rope_rows",
    "softmax_rows",
    "swiglu_rows",
]

try:
    from .. import _native  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover - depends on the build
    _native = None
    STATUS = f"unavailable: {exc}"
    warnings.warn(
        f"qlinear native kernels unavailable ({exc}); using the NumPy reference backend",
        RuntimeWarning,
        stacklevel=2,
    )
else:
    STATUS = "ok"

_FEATURES: dict[str, bool] = dict(_native.cpu_features()) if _native is not None else {}

# int8 codes are stored as code + 128 (the u8 operand of vpdpbusd): so is the zero point.
INT8_CODE_OFFSET = 128
NR = 16  # output rows per packed block (layout.h)


class _LazyCodes:
    """The packed codes, or the canonical codes (for a loaded file: memory-mapped, not
    copied) until the first forward packs them, once, under a lock."""

    __slots__ = ("_canon", "_lock", "codes")

    def __init__(self, codes: np.ndarray | None, canon: np.ndarray | None = None):
        self.codes = codes
        self._canon = canon
        self._lock = threading.Lock() if codes is None else None

    def get(self, bits: int, out: int, in_features: int) -> np.ndarray:
        if self.codes is None:
            with self._lock:  # type: ignore[union-attr]
                if self.codes is None:
                    check_mapped(self._canon)  # a truncated mapped file: FormatError, no SIGBUS
                    codes = _native.pack(self._canon, bits, out, in_features)
                    codes.setflags(write=False)
                    self.codes, self._canon = codes, None
        return self.codes

    def canonical(self) -> np.ndarray | None:
        """The canonical codes while still lazy, else None."""
        canon = self._canon  # read before codes: packing sets codes first, then clears it
        return canon if self.codes is None else None


@dataclasses.dataclass(frozen=True)
class Panels:
    """Scales and zero points as the kernels read them: per block of 16 output rows, every
    group's 16 values in a row, ``(n_blocks, n_groups, 16)`` C-contiguous (rows past
    ``out`` are 0), so one block's parameters are one contiguous run (a single group:
    the plain ``(out,)`` arrays, which are the same thing unpadded).

    ``scales`` is float32, each scale rounded once: what int8 mode with several groups and
    float mode on float32 x use (ref.linear_int8act, ref.dequantize_rows); float64 x and
    one-group int8 mode read the weight's float64 ``(out, n_groups)`` scales instead.
    ``zp`` is int32, or None when every effective zero point equals ``zp_uniform``
    (symmetric layers: no zero point bytes read at all)."""

    scales: np.ndarray
    zp: np.ndarray | None
    zp_uniform: int


def _panel(a: np.ndarray, dtype) -> np.ndarray:
    """``(out, n_groups)`` -> the panel layout of :class:`Panels` in ``dtype``."""
    out, ng = a.shape
    if ng == 1:
        p = np.ascontiguousarray(a[:, 0], dtype=dtype)
    else:
        nb = -(-out // NR)
        p = np.zeros((nb * NR, ng), dtype)
        p[:out] = a
        p = np.ascontiguousarray(p.reshape(nb, NR, ng).transpose(0, 2, 1))
    if p.flags.writeable:
        p.setflags(write=False)
    return p


def make_panels(scales: np.ndarray, zp: np.ndarray) -> Panels:
    """The kernels' copy of ``scales`` float64 and effective ``zp`` int32 ``(out, g)``."""
    with np.errstate(over="ignore"):  # scales beyond float32: Inf (x then overflows too)
        sp = _panel(scales, np.float32)
    z0 = int(zp.flat[0])
    if bool((zp == z0).all()):
        return Panels(sp, None, z0)
    return Panels(sp, _panel(zp, np.int32), 0)


@dataclasses.dataclass(frozen=True, eq=False)
class NativeWeight(KernelWeight):
    """Codes in the packed layout; zero points in the unsigned-code domain."""

    packed: _LazyCodes = dataclasses.field(default=None, repr=False)  # type: ignore[assignment]
    panels: Panels = dataclasses.field(default=None, repr=False)  # type: ignore[assignment]

    def arrays(self) -> tuple[np.ndarray, ...]:
        p = self.panels
        return (*super().arrays(), p.scales, *(() if p.zp is None else (p.zp,)))

    def checks_output(self) -> bool:
        # the compiled kernels return None for an Inf/NaN output (each task checks what
        # it wrote); the reference path for group sizes they do not take does not
        return self.native_groups

    def prefetch_arrays(self) -> tuple[np.ndarray, ...]:
        """The packed codes and the scale panels; none before the codes are packed."""
        codes = self.packed.codes
        return () if codes is None else (codes, self.panels.scales)

    def stored(self) -> np.ndarray:
        canon = self.packed.canonical()
        if canon is None:
            canon = _native.unpack(
                self.packed.codes, self.bits, self.out_features, self.in_features
            )
        else:
            check_mapped(canon)
            if canon.flags.writeable:
                canon = canon.copy()
        if self.bits == 8:
            canon = canon.view(np.int8)
        if canon.flags.writeable:
            canon.setflags(write=False)
        return canon

    @property
    def native_groups(self) -> bool:
        """Whether the compiled kernels take this grouping (groups start on a multiple
        of 4 columns); else the reference kernel runs on the unpacked codes."""
        return self.n_groups == 1 or self.group_size % 4 == 0

    def _reference(self, fn, x, bias):
        codes = self.stored()
        if self.bits == 4:
            codes = unpack_int4(codes, self.in_features)
        zp = self.zero_points - np.int32(INT8_CODE_OFFSET) if self.bits == 8 else self.zero_points
        with np.errstate(over="ignore", invalid="ignore"):  # reported by forward()
            return fn(codes, self.out_features, self.scales, zp, self.group_size, x, bias)

    def _call(self, x, bias, int8act: bool):
        if x.strides[1] != x.itemsize or x.strides[0] < 0:
            x = np.ascontiguousarray(x)
        return _native.linear(
            self.backend,
            self.packed.get(self.bits, self.out_features, self.in_features),
            self.bits,
            self.out_features,
            self.in_features,
            self.group_size,
            self.n_groups,
            self.panels.scales,
            self.scales,  # C-contiguous float64 (out, n_groups)
            self.panels.zp,
            self.panels.zp_uniform,
            bias,
            x,
            int8act,
            get_num_threads(),
        )

    def _float(self, x, bias):
        if not self.native_groups:
            return self._reference(ref.linear_float, x, bias)
        return self._call(x, bias, False)

    def _int8(self, x, bias):
        if not self.native_groups:
            if not np.isfinite(x).all():  # the reference would quantize a NaN: None
                return None
            return self._reference(ref.linear_int8act, x, bias)
        return self._call(x, bias, True)  # None: x holds a NaN or an infinity


class NativeBackend:
    """One ISA level of the native kernels."""

    def __init__(self, name: str, priority: int, feature: str | None, describe: str) -> None:
        self.name = name
        self.priority = priority
        self._feature = feature
        self._describe = describe

    def supported(self) -> bool:
        # CPUID traps to the hypervisor on virtual machines: asked once, at import.
        return _native is not None and (self._feature is None or _FEATURES[self._feature])

    def prepare(
        self, stored: np.ndarray, params: QuantizationParams, in_features: int, *, lazy=False
    ) -> NativeWeight:
        bits = 4 if params.qtype is QuantizationType.INT4 else 8
        canon = np.ascontiguousarray(stored).view(np.uint8)
        out = canon.shape[0]
        if lazy:
            packed, nbytes = _LazyCodes(None, canon), canon.nbytes
        else:
            codes = _native.pack(canon, bits, out, in_features)
            codes.setflags(write=False)
            packed, nbytes = _LazyCodes(codes), codes.nbytes
        offset = INT8_CODE_OFFSET if bits == 8 else 0
        scales, zp, gs = kernel_params(params, out, in_features, offset)
        panels = make_panels(scales, zp)
        return NativeWeight(
            self.name, params.qtype, bits, out, in_features, gs, scales, zp,
            nbytes, packed=packed, panels=panels,
        )  # fmt: skip

    def info(self) -> dict[str, Any]:
        return {"kernels": self._describe}


def prefetch(arrays: Sequence[np.ndarray]) -> None:
    """Ask the kernels' thread pool to bring ``arrays`` (C-contiguous), in order, into
    cache while its first worker waits for the next call (docs/kernels.md, "Prefetch
    between calls"); a later request replaces this one. Never changes a result; nothing
    without the extension, for an empty list, or with one thread."""
    if _native is not None and arrays:
        _native.prefetch(arrays)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """float32 ``x (n, d)``, ``weight (d,)`` -> ``(n, d)``: each row times
    ``1 / sqrt(mean(row^2) + eps)``, then times ``weight``, in float32 as
    :func:`qlinear.models.decoder_ops.rms_norm_numpy` (the specification) computes it;
    the sum of squares in float64. Needs the extension (callers check :data:`STATUS`)."""
    return _native.rms_norm(x, weight, eps)


def softmax_rows(
    backend: str, scores: np.ndarray, scale: float, lo: np.ndarray, hi: np.ndarray
) -> None:
    """In place, for float32 C-contiguous ``scores (rows, cols)``: row ``r`` becomes the
    softmax of ``scores[r] * scale`` over its visible columns ``lo[r % per] ..
    hi[r % per]`` (int64 ``(per,)``), 0 elsewhere, on ``backend``'s kernels and the
    kernels' threads; as :func:`qlinear.models.decoder_ops.softmax_rows_numpy` (the
    specification) computes it, with an exp of its own (tested within a few float32
    ulps). Needs the extension (callers check :data:`STATUS`)."""
    _native.softmax_rows(backend, scores, scale, lo, hi, get_num_threads())


def swiglu_rows(backend: str, gu: np.ndarray) -> np.ndarray:
    """float32 C-contiguous ``gu (rows, 2 d)`` (gate then up) -> ``silu(gate) * up``
    ``(rows, d)`` on ``backend``'s kernels, as
    :func:`qlinear.models.decoder_ops.swiglu` computes it in NumPy but with an exp of its
    own (tested within a few float32 ulps). Needs the extension."""
    return _native.swiglu_rows(backend, gu, get_num_threads())


def rope_rows(
    backend: str, x: np.ndarray, heads: int, cos: np.ndarray, sin: np.ndarray
) -> np.ndarray:
    """float32 ``x (rows, heads * d)`` (unit column stride, any row stride), ``cos``/``sin``
    float32 C-contiguous ``(t, d)`` with ``rows % t == 0`` -> ``(rows, heads, d)``: each
    head vector of row ``r`` rotated with table row ``r % t``, bit for bit as
    :func:`qlinear.models.rope.apply_rope`. Needs the extension."""
    return _native.rope_rows(backend, x, heads, cos, sin, get_num_threads())


def backends() -> tuple[NativeBackend, ...]:
    """The native backends, fastest last; none without the extension."""
    if _native is None:
        return ()
    return (
        NativeBackend("portable", 10, None, "native portable C++ (no ISA extensions)"),
        NativeBackend("avx2", 20, "avx2", "native AVX2+FMA (int8: vpmaddwd)"),
        NativeBackend("avx512", 30, "avx512vnni", "native AVX-512 (int8: VNNI vpdpbusd)"),
        NativeBackend(
            "amx", 40, "amx", "native AVX-512 + AMX (int8 mode from 16 rows, int4 32: AMX tiles)"
        ),
    )
