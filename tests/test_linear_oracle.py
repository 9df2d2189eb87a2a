"""Codes against PyTorch's quantize_per_channel / quantize_per_tensor (an outside oracle).

PyTorch's observers pick scale = amax / 127.5 over -128..127; qlinear's symmetric scale
is amax / 127 over -127..127. So the codes are compared given the *same* scales, never by
expecting the same scales. PyTorch multiplies by a float32 reciprocal of the scale where
qlinear divides in float64: the two agree exactly wherever the quotient is not within a
float32 rounding of a .5 boundary. The adversarial cases put values exactly on .5
boundaries with power-of-two scales, where both computations are exact and both must
round half to even.
"""

import warnings

import numpy as np
import pytest

from qlinear import QuantizationParams, QuantizedLinear, calibrate_linear

torch = pytest.importorskip("torch")


def torch_per_channel(w, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_per_* print a deprecation notice
        q = torch.quantize_per_channel(
            torch.from_numpy(w.astype(np.float32)),
            torch.from_numpy(scale.astype(np.float64)),
            torch.zeros(len(scale), dtype=torch.long),
            0,
            torch.qint8,
        )
    return q.int_repr().numpy()


def torch_per_tensor(w, scale):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_tensor(
            torch.from_numpy(w.astype(np.float32)), float(scale), 0, torch.qint8
        )
    return q.int_repr().numpy()


def random_matrices(rng):
    for magnitude in (1e-20, 1e-6, 1.0, 1e6, 1e20):
        yield rng.standard_normal((33, 65)).astype(np.float32) * np.float32(magnitude)
    heavy = rng.standard_t(2, size=(16, 127)).astype(np.float32)  # heavy tails
    yield heavy
    mixed = rng.standard_normal((8, 31)).astype(np.float32)
    mixed *= np.float32(10.0) ** rng.integers(-8, 8, size=(8, 1)).astype(np.float32)
    yield mixed


def test_per_channel_codes_equal_torch_on_random_matrices(rng):
    for w in random_matrices(rng):
        layer = QuantizedLinear.from_fp(w, calibrate_linear(w))
        np.testing.assert_array_equal(layer.qweight, torch_per_channel(w, layer.scales))


def test_per_tensor_codes_equal_torch_on_random_matrices(rng):
    for w in random_matrices(rng):
        layer = QuantizedLinear.from_fp(w, calibrate_linear(w, granularity="per_tensor"))
        np.testing.assert_array_equal(layer.qweight, torch_per_tensor(w, layer.scales[0]))


@pytest.mark.parametrize("exponent", [-30, -5, 0, 7, 30])
def test_exact_half_boundaries_round_half_to_even_like_torch(exponent):
    scale = 2.0**exponent
    halves = np.arange(-127, 127) + 0.5  # every .5 boundary inside the code range
    w = np.stack([halves, -halves, np.round(halves)]) * scale
    w = w.astype(np.float32)
    p = QuantizationParams(
        "int8", "symmetric", "per_channel", np.full(3, scale), np.zeros(3), -w.max(1), w.max(1)
    )
    layer = QuantizedLinear.from_fp(w, p)
    expected_even = np.rint(halves)  # independent statement of half-to-even
    np.testing.assert_array_equal(layer.qweight[0], np.clip(expected_even, -127, 127))
    np.testing.assert_array_equal(layer.qweight, torch_per_channel(w, p.scale).clip(-127, 127))
    pt = QuantizationParams("int8", "symmetric", "per_tensor", [scale], [0], [-w.max()], [w.max()])
    layer_t = QuantizedLinear.from_fp(w, pt)
    np.testing.assert_array_equal(layer_t.qweight, torch_per_tensor(w, scale).clip(-127, 127))


def test_dequantize_matches_torch_dequantize(rng):
    w = rng.standard_normal((12, 40)).astype(np.float32)
    layer = QuantizedLinear.from_fp(w, calibrate_linear(w))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(
            torch.from_numpy(w),
            torch.from_numpy(layer.scales),
            torch.zeros(12, dtype=torch.long),
            0,
            torch.qint8,
        )
        ref = q.dequantize().numpy()
    np.testing.assert_allclose(layer.dequantize(np.float32), ref, rtol=1e-6, atol=0)
