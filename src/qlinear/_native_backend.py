"""Moved to :mod:`qlinear.kernels.native` (kept so older imports keep working)."""

from .kernels.native import STATUS, NativeBackend, NativeWeight, backends

__all__ = ["STATUS", "NativeBackend", "NativeWeight", "backends"]
