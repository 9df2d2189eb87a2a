"""QuantizedLinear with int4 codes and per-group params: every code, partial last groups,
odd widths, stored bytes, checked against dequantization written out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_close
from qlinear import (
    InvalidInputError,
    QuantizationParams,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
)


def by_hand(codes, scale, zero, group_size):
    """``(q - z) * s`` element by element, with plain loops."""
    out_f, in_f = codes.shape
    w = np.empty((out_f, in_f))
    for o in range(out_f):
        for k in range(in_f):
            g = k // group_size
            w[o, k] = (int(codes[o, k]) - int(zero[o, g])) * float(scale[o, g])
    return w


def group_params(rng, qtype, scheme, out_f, n_groups, group_size):
    scale = rng.uniform(0.01, 2.0, (out_f, n_groups))
    if scheme == "symmetric":
        zero = np.zeros((out_f, n_groups), dtype=np.int32)
    else:
        lo, hi = (0, 15) if qtype == "int4" else (-128, 127)
        zero = rng.integers(lo, hi + 1, (out_f, n_groups))
    return QuantizationParams(
        qtype, scheme, "per_group", scale, zero, -scale, scale, group_size=group_size
    )


@pytest.mark.parametrize("scheme, lo, hi", [("symmetric", -7, 7), ("asymmetric", 0, 15)])
def test_every_int4_code_round_trips(scheme, lo, hi):
    codes = np.arange(lo, hi + 1).reshape(1, -1).repeat(3, axis=0)
    zero = [0, 0, 0] if scheme == "symmetric" else [0, 7, 15]
    params = QuantizationParams(
        "int4", scheme, "per_channel", [0.5, 1.0, 0.25], zero, [-1] * 3, [1] * 3
    )
    layer = QuantizedLinear.from_codes(codes, params)
    np.testing.assert_array_equal(layer.qweight, codes)
    assert layer.qweight.dtype == np.int8
    expected = (codes - np.array(zero)[:, None]) * np.array([0.5, 1.0, 0.25])[:, None]
    np.testing.assert_array_equal(layer.dequantize(), expected)
    x = np.eye(codes.shape[1])
    assert_close(layer.forward(x), expected.T, atol=1e-15, what="forward on unit vectors")


def test_symmetric_int4_stored_nibbles_are_code_plus_8():
    params = QuantizationParams("int4", "symmetric", "per_channel", [1.0], [0], [-7], [7])
    layer = QuantizedLinear.from_codes(np.array([[-7, 7, 0, 1, -1]]), params)
    # nibbles 1, 15, 8, 9, 7 (+ padding 0): bytes 0xF1, 0x98, 0x07
    assert layer.stored_weight.tolist() == [[0xF1, 0x98, 0x07]]


def test_asymmetric_int4_stored_nibbles_are_the_codes():
    params = QuantizationParams("int4", "asymmetric", "per_channel", [1.0], [3], [-3], [12])
    layer = QuantizedLinear.from_codes(np.array([[0, 15, 3, 4]]), params)
    assert layer.stored_weight.tolist() == [[0xF0, 0x43]]


@pytest.mark.parametrize("qtype", ["int4", "int8"])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("in_f, group_size", [(37, 16), (33, 8), (5, 2), (20, 7), (9, 128)])
def test_partial_last_group_dequantize_and_forward(rng, qtype, scheme, in_f, group_size):
    out_f = 6
    ng = -(-in_f // group_size)
    params = group_params(rng, qtype, scheme, out_f, ng, group_size)
    qmin, qmax = params.code_range
    codes = rng.integers(qmin, qmax + 1, (out_f, in_f))
    layer = QuantizedLinear.from_codes(codes, params)
    assert layer.scales.shape == (out_f, ng)
    w = by_hand(codes, params.scale, params.zero_point, group_size)
    np.testing.assert_array_equal(layer.qweight, codes)
    assert_close(layer.dequantize(), w, rtol=1e-15, what="dequantize")
    x = rng.standard_normal((4, in_f))
    assert_close(layer.forward(x), x @ w.T, rtol=1e-12, atol=1e-12, what="float forward")
    y8 = layer.forward(x, activations="int8")
    ref = x @ w.T
    assert np.linalg.norm(y8 - ref) <= 0.02 * np.linalg.norm(ref)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("in_f", [1, 3, 31, 129])
def test_int4_from_fp_odd_widths(rng, scheme, in_f):
    w = rng.standard_normal((5, in_f))
    params = calibrate_linear(w, "int4", "per_group", scheme, group_size=16)
    layer = QuantizedLinear.from_fp(w, params)
    assert layer.stored_weight.shape == (5, (in_f + 1) // 2)
    q = layer.qweight
    lo, hi = params.code_range
    assert q.min() >= lo and q.max() <= hi
    # each element within half a step of its group's scale (nothing clipped by min-max)
    step = params.scale[:, np.arange(in_f) // 16]
    assert np.all(np.abs(layer.dequantize() - w) <= 0.5 * step * (1 + 1e-12))


@pytest.mark.parametrize("scheme, bad", [("symmetric", 8), ("symmetric", -8), ("asymmetric", 16)])
def test_int4_codes_out_of_range_rejected(scheme, bad):
    zero = 0 if scheme == "symmetric" else 8
    params = QuantizationParams("int4", scheme, "per_channel", [1.0], [zero], [-1], [1])
    with pytest.raises(InvalidInputError, match="codes must lie in"):
        QuantizedLinear.from_codes(np.array([[0, bad]]), params)


def test_int4_layer_is_about_half_a_byte_per_weight(rng):
    w = rng.standard_normal((64, 256))
    layer = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int4", "per_group", "symmetric", group_size=128)
    )
    assert layer.stored_weight.nbytes == 64 * 128


@pytest.mark.parametrize(
    "qtype, stored",
    [
        ("int4", np.zeros((2, 2), dtype=np.uint8)),  # 5 columns need 3 bytes
        ("int4", np.zeros((2, 3), dtype=np.int8)),  # packed int4 is uint8
        ("int4", np.zeros((2, 5), dtype=np.uint8)),  # unpacked
        ("int8", np.zeros((2, 4), dtype=np.int8)),  # too narrow
        ("int8", np.zeros((2, 5), dtype=np.uint8)),  # 200 would be read as 200, not -56
        ("int8", np.zeros((2, 5), dtype=np.float32)),
        ("int8", np.zeros(5, dtype=np.int8)),
    ],
)
def test_loader_entry_rejects_malformed_stored_codes(qtype, stored):
    params = calibrate_linear(np.ones((2, 5)), qtype, "per_channel", "asymmetric")
    with pytest.raises(ShapeMismatchError, match="stored"):
        QuantizedLinear._from_stored(stored, params, 5)


def test_loader_entry_accepts_canonical_stored_codes(rng):
    w = rng.standard_normal((3, 5))
    for qtype in ("int4", "int8"):
        layer = QuantizedLinear.from_fp(w, calibrate_linear(w, qtype, "per_channel", "symmetric"))
        again = QuantizedLinear._from_stored(layer.stored_weight, layer.params, 5)
        np.testing.assert_array_equal(again.dequantize(), layer.dequantize())
