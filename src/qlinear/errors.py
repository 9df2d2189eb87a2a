"""Exceptions raised by qlinear.

Every error that qlinear raises on bad input is a :class:`QuantizationError`, itself a
:class:`ValueError`, so ``except ValueError`` keeps working for callers that do not care
about the finer classes. Messages say what was wrong, the value seen, and what was
expected.
"""

from __future__ import annotations

__all__ = [
    "FormatError",
    "InvalidInputError",
    "InvalidParamsError",
    "QuantizationError",
    "ShapeMismatchError",
]


class QuantizationError(ValueError):
    """Base class of every error qlinear raises for bad input."""


class ShapeMismatchError(QuantizationError):
    """An array has the wrong number of dimensions or a size that does not fit."""


class InvalidParamsError(QuantizationError):
    """Quantization parameters or options are invalid or unsupported."""


class InvalidInputError(QuantizationError):
    """An array holds values or a dtype that cannot be quantized or multiplied:
    NaN or Inf, integers where floats are expected, an empty array."""


class FormatError(QuantizationError):
    """A file on disk is malformed, truncated or of an unsupported format version."""
