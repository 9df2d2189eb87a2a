"""Validation shared by the public entry points (qlinear._checks)."""

import numpy as np
import pytest

import qlinear
from qlinear import QuantizationError, QuantizationParams, QuantizedLinear, calibrate_linear
from qlinear.moe import LinearExpert, MoELayer

RAGGED = [[1.0, 2.0], [1.0]]


def _layer():
    w = np.array([[1.0, -2.0], [0.5, 0.25]])
    return QuantizedLinear.from_fp(w, calibrate_linear(w))


ENTRY_POINTS = {
    "calibrate_linear": lambda: calibrate_linear(RAGGED),
    "forward": lambda: _layer()(RAGGED),
    "from_codes": lambda: QuantizedLinear.from_codes([[1, 2], [1]], _layer().params),
    "with_bias": lambda: _layer().with_bias([1.0, [2.0]]),
    "gptq x_calib": lambda: qlinear.gptq_quantize(np.ones((2, 2)), RAGGED, "int8", "per_channel"),
    "moe forward": lambda: MoELayer(np.ones((2, 2)), [LinearExpert.zeros(2, 2)] * 2)(RAGGED),
    "moe router": lambda: MoELayer(RAGGED, [LinearExpert.zeros(2, 2)] * 2),
    "LinearExpert": lambda: LinearExpert.from_arrays(RAGGED),
    "params zero_point": lambda: QuantizationParams(
        "int8", "asymmetric", "per_channel", [1.0, 1.0], [[0], [0, 1]], [0.0, 0.0], [0.0, 0.0]
    ),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_ragged_lists_raise_a_quantization_error(entry):
    # NumPy's own ValueError used to escape, so `except QuantizationError` missed it
    with pytest.raises(QuantizationError, match="nested lists of equal lengths"):
        ENTRY_POINTS[entry]()
