"""qlinear: int8/int4 quantized linear layers for NumPy, with native CPU kernels."""

from .calibrate import calibrate_linear
from .checkpoint import quantize_checkpoint
from .errors import (
    FormatError,
    InvalidInputError,
    InvalidParamsError,
    QuantizationError,
    ShapeMismatchError,
)
from .gptq import gptq_quantize
from .io import load, save
from .kernels import backend_info, get_num_threads, set_num_threads
from .linear import QuantizedLinear
from .moe import MoELayer, quantize_moe
from .params import QuantizationParams
from .qtypes import QuantizationGranularity, QuantizationScheme, QuantizationType

__version__ = "0.1.0"

__all__ = [
    "FormatError",
    "InvalidInputError",
    "InvalidParamsError",
    "MoELayer",
    "QuantizationError",
    "QuantizationGranularity",
    "QuantizationParams",
    "QuantizationScheme",
    "QuantizationType",
    "QuantizedLinear",
    "ShapeMismatchError",
    "__version__",
    "backend_info",
    "calibrate_linear",
    "get_num_threads",
    "gptq_quantize",
    "load",
    "quantize_checkpoint",
    "quantize_moe",
    "save",
    "set_num_threads",
]
