"""OffsetLinear: a per-group QuantizedLinear plus float per-group offsets (GGUF Q4_1)."""

from __future__ import annotations

import numpy as np
import pytest

import qlinear
from qlinear import InvalidParamsError, ShapeMismatchError
from qlinear.offset_linear import OffsetLinear


def _inner(rng, out_f=6, in_f=64, gs=32):
    w = rng.standard_normal((out_f, in_f))
    p = qlinear.calibrate_linear(w, "int4", "per_group", "asymmetric", group_size=gs)
    return qlinear.QuantizedLinear.from_fp(w, p)


def test_dequantize_and_forward_follow_the_formula(rng):
    inner = _inner(rng)
    m = rng.standard_normal((6, 2))
    layer = OffsetLinear(inner, m)
    w = inner.dequantize() + np.repeat(m, 32, axis=1)  # written out, not the code under test
    np.testing.assert_array_equal(layer.dequantize(), w)
    np.testing.assert_array_equal(layer.dequantize(np.float32), w.astype(np.float32))
    for x in (
        rng.standard_normal(64),
        rng.standard_normal((3, 64)),
        rng.standard_normal((2, 4, 64)),
    ):
        np.testing.assert_allclose(layer(x), x @ w.T, rtol=1e-12, atol=1e-12)
    x32 = rng.standard_normal((5, 64)).astype(np.float32)
    y = layer(x32)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x32.astype(np.float64) @ w.T, rtol=1e-5, atol=1e-5)
    assert layer.shape == (6, 64) and layer.nbytes == inner.nbytes + m.nbytes
    assert not layer.offsets.flags.writeable


def test_bad_arguments(rng):
    inner = _inner(rng)
    with pytest.raises(ShapeMismatchError, match=r"\(6, 2\)"):
        OffsetLinear(inner, np.zeros((6, 3)))
    with pytest.raises(InvalidParamsError, match="finite"):
        OffsetLinear(inner, np.full((6, 2), np.nan))
    w = rng.standard_normal((4, 8))
    per_channel = qlinear.QuantizedLinear.from_fp(w, qlinear.calibrate_linear(w, "int8"))
    with pytest.raises(InvalidParamsError, match="per-group"):
        OffsetLinear(per_channel, np.zeros((4, 1)))
    with pytest.raises(InvalidParamsError, match="QuantizedLinear"):
        OffsetLinear("layer", np.zeros((6, 2)))
