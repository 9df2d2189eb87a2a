"""The NumPy reference kernels against independent, plainer statements of the same math."""

import numpy as np
import pytest

from conftest import assert_close, rel_error
from qlinear import QuantizedLinear, calibrate_linear
from qlinear.ref import quantize_rows_int8


def test_quantize_rows_int8_codes_and_scales(rng):
    x = rng.standard_normal((5, 13)) * np.array([[1e-8], [1.0], [1e8], [0.0], [3.0]])
    q, s = quantize_rows_int8(x)
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    assert s[3] == 1.0 and np.all(q[3] == 0)  # all-zero row
    for t in (0, 1, 2, 4):
        assert s[t] == np.abs(x[t]).max() / 127
        assert np.abs(q[t]).max() == 127
        assert np.all(np.abs(q[t] * s[t] - x[t]) <= s[t] / 2 * (1 + 1e-12))


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("gran,gs", [("per_tensor", None), ("per_channel", None), ("per_group", 4)])
def test_int8_activations_integer_accumulation_is_exact(rng, scheme, gran, gs):
    w = rng.standard_normal((7, 11))
    layer = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int8", gran, scheme, group_size=gs), backend="numpy"
    )
    x = rng.standard_normal((3, 11))
    y = layer(x, activations="int8")
    # independent statement: exact int64 sums per group, then the two scales
    xq, sx = quantize_rows_int8(x)
    q = layer.qweight.astype(np.int64)
    zp = layer.zero_points.astype(np.int64)
    sw = layer.scales
    expected = np.zeros((3, 7))
    for t in range(3):
        for o in range(7):
            for k in range(11):
                g = k // gs if gs else 0
                z = zp[o, g] if zp.ndim == 2 else zp[o if zp.size > 1 else 0]
                s = sw[o, g] if sw.ndim == 2 else sw[o if sw.size > 1 else 0]
                expected[t, o] += sx[t] * s * float(int(xq[t, k]) * (int(q[o, k]) - int(z)))
    if gran != "per_group":
        assert_close(y, expected, rtol=1e-12, atol=1e-12)
        return
    # Several groups: the documented float32 group sum (product and sum each rounded to
    # float32, in group order), then float64 for sx and the bias; stated element by element.
    ng = sw.shape[1]
    exact32 = np.zeros((3, 7))
    for t in range(3):
        for o in range(7):
            acc = np.float32(0.0)
            for g in range(ng):
                dot = sum(
                    int(xq[t, k]) * (int(q[o, k]) - int(zp[o, g]))
                    for k in range(g * gs, min(11, (g + 1) * gs))
                )
                acc = np.float32(acc + np.float32(np.float32(dot) * np.float32(sw[o, g])))
            exact32[t, o] = float(acc) * sx[t]
    np.testing.assert_array_equal(y, exact32)
    # ... which is within n_groups * 2**-23 (relative to the sum of |terms|) of the exact sum
    terms = np.zeros((3, 7))
    for t in range(3):
        for o in range(7):
            for g in range(ng):
                dot = sum(
                    int(xq[t, k]) * (int(q[o, k]) - int(zp[o, g]))
                    for k in range(g * gs, min(11, (g + 1) * gs))
                )
                terms[t, o] += abs(sx[t] * sw[o, g] * dot)
    assert (np.abs(y - expected) <= ng * 2.0**-23 * terms + 1e-300).all()


def test_int8_activations_error_is_small_on_large_layers(rng):
    w = rng.standard_normal((256, 1024))
    layer = QuantizedLinear.from_fp(w, calibrate_linear(w), backend="numpy")
    x = rng.standard_normal((16, 1024))
    err = rel_error(layer(x, activations="int8"), layer(x))
    assert err < 0.02, err


def test_quantize_rows_int8_subnormal_row_gets_a_positive_scale():
    # amax / 127 of a row of subnormals rounds to 0.0; dividing by it gave Inf codes.
    x = np.array([[5e-324, -5e-324, 0.0], [1e-310, 0.0, -1e-310]])
    with np.errstate(divide="raise", over="raise", invalid="raise"):
        q, s = quantize_rows_int8(x)
    assert np.all(s > 0) and np.all(np.isfinite(s))
    assert np.all(np.abs(q.astype(np.float64) * s[:, None] - x) <= s[:, None] / 2)


def test_int8_activations_on_subnormal_input_give_finite_tiny_output(rng):
    w = rng.standard_normal((4, 6))
    layer = QuantizedLinear.from_fp(w, calibrate_linear(w), backend="numpy")
    y = layer(np.full((2, 6), 5e-324), activations="int8")
    assert np.all(np.isfinite(y)) and np.all(np.abs(y) < 1e-300)
