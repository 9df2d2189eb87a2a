"""The backend table, the KernelWeight every backend prepares, and the thread count.

A backend turns a layer's canonical stored codes and its :class:`QuantizationParams`
into a :class:`KernelWeight` (:meth:`Backend.prepare`): a frozen object that owns every
kernel-side fact once (bits, the normalised group size, scales and *effective* zero
points in the backend's code domain, the packed codes) and runs the forward pass, one
method per activation mode, with one NaN/overflow policy (:meth:`KernelWeight.forward`).

Canonical stored codes (what ``prepare`` receives and :meth:`KernelWeight.stored`
returns): INT8, ``int8 (out, in)``; INT4, ``uint8 (out, ceil(in/2))`` packed as
:mod:`qlinear.packing` documents.

The backend is chosen once, at first use: ``QLINEAR_BACKEND`` if set, else the fastest
registered backend the CPU supports. A layer keeps the KernelWeight it was built with,
so choosing another backend later never changes a layer already built.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Protocol

import numpy as np

from .._checks import check_finite
from ..errors import InvalidInputError, InvalidParamsError
from ..params import QuantizationParams
from ..qtypes import QuantizationGranularity, QuantizationType, storage_offset

__all__ = [
    "ACTIVATION_MODES",
    "Backend",
    "KernelWeight",
    "available_backends",
    "get_backend",
    "get_num_threads",
    "kernel_params",
    "register_backend",
    "set_num_threads",
]

ENV_VAR = "QLINEAR_BACKEND"
ACTIVATION_MODES = ("float", "int8")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def kernel_params(
    params: QuantizationParams, out_features: int, in_features: int, code_offset: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Every layer seen as per-group: ``(scales float64 (out, g), zp int32 (out, g),
    group_size)``, with ``zp`` the *effective* zero point in the kernel's code domain
    (zero point + storage offset + ``code_offset``) and ``group_size == in_features``
    for one group per row. Arrays are C-contiguous and read-only."""
    offset = storage_offset(params.qtype, params.scheme) + code_offset
    gran = params.granularity
    if gran is QuantizationGranularity.PER_GROUP:
        scales, zp = params.scale, params.zero_point
        group_size = int(params.group_size)  # type: ignore[arg-type]
        if scales.shape[1] == 1:
            group_size = in_features  # one group spans the row: same as per channel
    elif gran is QuantizationGranularity.PER_CHANNEL:
        scales, zp = params.scale.reshape(-1, 1), params.zero_point.reshape(-1, 1)
        group_size = in_features
    else:
        scales = np.full((out_features, 1), params.scale[0])
        zp = np.full((out_features, 1), params.zero_point[0], dtype=np.int32)
        group_size = in_features
    scales = np.ascontiguousarray(scales, dtype=np.float64)
    zp = np.ascontiguousarray(zp, dtype=np.int32)
    if offset:
        zp = zp + np.int32(offset)
    if scales.flags.writeable:
        scales = _readonly(scales)
    if zp.flags.writeable:
        zp = _readonly(zp)
    return scales, zp, min(group_size, in_features)


@dataclasses.dataclass(frozen=True, eq=False)
class KernelWeight:
    """A weight matrix as one backend's kernels see it. Built by :meth:`Backend.prepare`.

    ``scales`` float64 and ``zero_points`` int32 are ``(out_features, n_groups)``, the
    zero points in the backend's code domain, so that
    ``W[o, k] = (u[o, k] - zero_points[o, g]) * scales[o, g]``, ``g = k // group_size``,
    with ``u`` the code as the backend stores it. Subclasses implement ``_float``,
    ``_int8`` and ``stored``.
    """

    backend: str
    qtype: QuantizationType
    bits: int
    out_features: int
    in_features: int
    group_size: int
    scales: np.ndarray
    zero_points: np.ndarray
    nbytes: int  # bytes of the codes in the backend's layout

    @property
    def n_groups(self) -> int:
        return self.scales.shape[1]

    def arrays(self) -> tuple[np.ndarray, ...]:
        """The parameter arrays this weight holds besides its codes (for ``nbytes``)."""
        return (self.scales, self.zero_points)

    def checks_output(self) -> bool:
        """Whether :meth:`_float` / :meth:`_int8` return None for a non-finite result
        themselves (the native kernels check each output block as they write it), so that
        :meth:`forward` need not scan y again."""
        return False

    def prefetch_arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays :meth:`forward` streams through, for
        :func:`qlinear.kernels.native.prefetch` to bring into cache ahead of the call;
        none by default (the NumPy backend has no thread of its own to do it)."""
        return ()

    def stored(self) -> np.ndarray:
        """Canonical stored codes, read-only (see the module docstring)."""
        raise NotImplementedError

    def _float(self, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray | None:
        raise NotImplementedError

    def _int8(self, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray | None:
        raise NotImplementedError

    def forward(
        self, x: np.ndarray, bias: np.ndarray | None, activations: str = "float"
    ) -> np.ndarray:
        """``y = x @ W.T + bias``: x float32/float64 ``(n, in_features)`` (not checked),
        bias float64 ``(out_features,)`` or None; ``y (n, out_features)`` in x's dtype.

        The one NaN/overflow policy: kernels never check x up front. A NaN/Inf in x always
        reaches the output (every x element meets every weight, and Inf * 0 is NaN) or
        makes the kernel return None (int8 mode finds it while quantizing); either way x
        is then checked and the error names its first bad element. A non-finite result
        from finite x is an overflow of x's dtype, also an error. The output is scanned
        here unless the backend's kernels report a non-finite one as None themselves
        (:meth:`checks_output`).
        """
        y = self._int8(x, bias) if activations == "int8" else self._float(x, bias)
        if y is None or (not self.checks_output() and not np.isfinite(y).all()):
            check_finite("x", x)
            raise InvalidInputError(
                f"the output overflowed {x.dtype} to Inf/NaN (largest |x| is "
                f"{float(np.abs(x).max()):.3g}, largest weight scale "
                f"{float(self.scales.max()):.3g}); expected inputs and weights whose "
                "product fits the dtype (pass float64 x for a wider range)"
            )
        return y


class Backend(Protocol):
    """What a kernel backend provides."""

    name: str
    priority: int

    def supported(self) -> bool: ...

    def prepare(
        self,
        stored: np.ndarray,
        params: QuantizationParams,
        in_features: int,
        *,
        lazy: bool = False,
    ) -> KernelWeight:
        """``stored``: canonical codes, already checked against ``params``. ``lazy``: the
        backend may keep ``stored`` (not copied) and build its own layout at the first
        forward, thread-safely."""
        ...

    def info(self) -> dict[str, Any]: ...


_BACKENDS: dict[str, Backend] = {}
_lock = threading.Lock()
_active: list[str] = []  # the chosen backend's name, once chosen
_threads = [max(1, os.cpu_count() or 1)]


def register_backend(backend: Backend) -> Backend:
    """Add a backend to the table; returns it."""
    _BACKENDS[backend.name] = backend
    return backend


def available_backends() -> list[str]:
    """Names of the registered backends this CPU supports, fastest first."""
    ok = [b for b in _BACKENDS.values() if b.supported()]
    return [b.name for b in sorted(ok, key=lambda b: -b.priority)]


def _choose() -> str:
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    avail = available_backends()
    if forced:
        if forced not in _BACKENDS:
            raise InvalidParamsError(
                f"{ENV_VAR}={forced!r} names no backend; expected one of {sorted(_BACKENDS)}"
            )
        if forced not in avail:
            raise InvalidParamsError(
                f"{ENV_VAR}={forced!r} is not supported on this CPU; available: {avail}"
            )
        return forced
    return avail[0]


def get_backend(name: str | None = None) -> Backend:
    """The backend called ``name``, or the active one (chosen once, at first use)."""
    if name is None:
        with _lock:
            if not _active:
                _active.append(_choose())
            name = _active[0]
    backend = _BACKENDS.get(name) if isinstance(name, str) else None
    if backend is None:
        raise InvalidParamsError(f"unknown backend {name!r}; expected one of {sorted(_BACKENDS)}")
    if not backend.supported():
        raise InvalidParamsError(f"backend {name!r} is not supported on this CPU")
    return backend


def set_num_threads(n: int) -> None:
    """Threads the native kernels may use (results do not depend on it)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InvalidParamsError(f"set_num_threads needs an integer >= 1; got {n!r}")
    _threads[0] = int(n)


def get_num_threads() -> int:
    """Threads the native kernels may use."""
    return _threads[0]
