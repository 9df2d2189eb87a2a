"""Kernel backends: each prepares a layer's weight its own way and runs the forward pass.

:mod:`.registry` holds the backend table, :class:`KernelWeight` (what a backend's
``prepare`` returns: every kernel-side fact of one weight, and its forward pass) and the
thread count; :mod:`.numpy` is the reference backend (:mod:`qlinear.ref`, the
specification); :mod:`.native` the compiled ones. Integer results are bit-exact across
backends; float results agree within the documented tolerance.
"""

from __future__ import annotations

from typing import Any

from . import native as _native_backends
from .numpy import NumpyBackend
from .registry import (
    ACTIVATION_MODES,
    Backend,
    KernelWeight,
    available_backends,
    get_backend,
    get_num_threads,
    kernel_params,
    register_backend,
    set_num_threads,
)

__all__ = [
    "ACTIVATION_MODES",
    "Backend",
    "KernelWeight",
    "available_backends",
    "backend_info",
    "get_backend",
    "get_num_threads",
    "kernel_params",
    "register_backend",
    "set_num_threads",
]

for _b in (NumpyBackend(), *_native_backends.backends()):
    register_backend(_b)
del _b


def backend_info() -> dict[str, Any]:
    """Which backend is active, what it runs, the thread count, and what else is available;
    ``native``: ``"ok"`` or ``"unavailable: <why>"``."""
    backend = get_backend()
    return {
        "backend": backend.name,
        "available": available_backends(),
        "threads": get_num_threads(),
        "native": _native_backends.STATUS,
        **backend.info(),
    }
