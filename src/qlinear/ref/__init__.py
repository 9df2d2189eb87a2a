"""NumPy reference implementations of every kernel: the specification.

These functions are written to be read. The native kernels in ``qlinear._native`` are
faster implementations of the same functions and are tested against them.
"""

from .linear import dequantize_rows, linear_float, linear_int8act, quantize_rows_int8
from .quantize import quantize_codes

__all__ = [
    "dequantize_rows",
    "linear_float",
    "linear_int8act",
    "quantize_codes",
    "quantize_rows_int8",
]
