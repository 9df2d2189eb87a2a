"""Kernel registry: each backend packs weights its own way and runs the forward pass.

A backend turns the canonical stored codes of a layer into a :class:`PackedWeight` (its
own layout, chosen once at ``from_fp`` time) and runs the forward kernels on it. The
NumPy backend (``"numpy"``) keeps the canonical layout and calls :mod:`qlinear.ref`, the
specification; native backends register themselves beside it.

The backend is chosen once, at import: ``QLINEAR_BACKEND`` if set, else the fastest
registered backend the CPU supports. A layer remembers the backend that packed it, so
choosing another backend later never changes a layer already built. Integer results are
bit-exact across backends; float results agree within the documented tolerance.

Canonical stored codes (what :meth:`Backend.pack` receives and :meth:`Backend.unpack`
returns): INT8, ``int8 (out, in)``; INT4, ``uint8 (out, ceil(in/2))`` packed as
:mod:`qlinear.packing` documents.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any, Protocol

import numpy as np

from . import ref
from ._mapped import check_mapped
from .errors import InvalidParamsError
from .packing import unpack_int4
from .qtypes import QuantizationType

__all__ = [
    "Backend",
    "PackedWeight",
    "available_backends",
    "backend_info",
    "get_backend",
    "get_num_threads",
    "register_backend",
    "set_num_threads",
]

ENV_VAR = "QLINEAR_BACKEND"


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
    """A weight matrix in one backend's layout. Opaque outside that backend."""

    backend: str
    qtype: QuantizationType
    out_features: int
    in_features: int
    data: Any
    nbytes: int


class Backend(Protocol):
    """What a kernel backend provides. ``x`` is 2-D float32/float64; ``scales`` float64
    and ``zp`` (effective zero points, int32) are ``(out, n_groups)``; ``bias`` float64
    ``(out,)`` or None. Results are ``(n, out)`` in x's dtype."""

    name: str
    priority: int

    def supported(self) -> bool: ...

    def pack(
        self, stored: np.ndarray, qtype: QuantizationType, in_features: int, *, lazy: bool = False
    ) -> PackedWeight:
        """``lazy``: the backend may keep ``stored`` (not copied) and build its own layout
        at the first forward, thread-safely."""
        ...

    def unpack(self, pw: PackedWeight) -> np.ndarray: ...

    def linear(
        self,
        pw: PackedWeight,
        x: np.ndarray,
        scales: np.ndarray,
        zp: np.ndarray,
        group_size: int,
        bias: np.ndarray | None,
        activations: str,
    ) -> np.ndarray: ...

    def info(self) -> dict[str, Any]: ...


class NumpyBackend:
    """The reference backend: canonical layout, NumPy kernels from :mod:`qlinear.ref`."""

    name = "numpy"
    priority = 0

    def supported(self) -> bool:
        return True

    def pack(
        self, stored: np.ndarray, qtype: QuantizationType, in_features: int, *, lazy: bool = False
    ) -> PackedWeight:
        data = np.ascontiguousarray(stored)  # the canonical layout: nothing to defer
        data.setflags(write=False)
        return PackedWeight(self.name, qtype, data.shape[0], in_features, data, data.nbytes)

    def unpack(self, pw: PackedWeight) -> np.ndarray:
        check_mapped(pw.data)  # codes of a loaded file are a view of its mapping
        return pw.data

    @staticmethod
    def rows_fn(pw: PackedWeight):
        """Codes as integers, one element per weight: the array, or a row-slice callable
        that unpacks int4 one tile at a time."""
        if pw.qtype is QuantizationType.INT4:
            return lambda a, b: unpack_int4(pw.data[a:b], pw.in_features)
        return pw.data

    def linear(self, pw, x, scales, zp, group_size, bias, activations):
        fn = ref.linear_int8act if activations == "int8" else ref.linear_float
        check_mapped(pw.data)
        return fn(self.rows_fn(pw), pw.out_features, scales, zp, group_size, x, bias)

    def info(self) -> dict[str, Any]:
        return {"kernels": "numpy reference (row-tiled dequantize + BLAS matmul)"}


_BACKENDS: dict[str, Backend] = {}
_lock = threading.Lock()
_state: dict[str, Any] = {
    "active": None,
    "threads": max(1, os.cpu_count() or 1),
    "native": "not loaded",
}


def register_backend(backend: Backend) -> None:
    """Add a backend to the table (native modules call this at import)."""
    _BACKENDS[backend.name] = backend


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
            if _state["active"] is None:
                _state["active"] = _choose()
            name = _state["active"]
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
    _state["threads"] = int(n)


def get_num_threads() -> int:
    """Threads the native kernels may use."""
    return int(_state["threads"])


def backend_info() -> dict[str, Any]:
    """Which backend is active, what it runs, the thread count, and what else is available."""
    backend = get_backend()
    return {
        "backend": backend.name,
        "available": available_backends(),
        "threads": get_num_threads(),
        "native": _state["native"],
        **backend.info(),
    }


register_backend(NumpyBackend())

# Native backends register themselves (or record why they cannot) on import.
from . import _native_backend  # noqa: E402, F401
