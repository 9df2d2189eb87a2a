"""calibrate_linear(method="minmax" | "percentile" | "mse"): ranges, codes and errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlinear import (
    InvalidParamsError,
    QuantizedLinear,
    calibrate_linear,
)

FORMATS = [
    ("int8", "symmetric"),
    ("int8", "asymmetric"),
    ("int4", "symmetric"),
    ("int4", "asymmetric"),
]
GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_group", 16), ("per_group", 7)]


def weights(rng, kind, shape=(12, 45)):
    if kind == "normal":
        return rng.standard_normal(shape)
    if kind == "heavy":  # Student t with 2 degrees of freedom: outliers in most groups
        return rng.standard_t(2, shape)
    if kind == "outliers":
        w = rng.standard_normal(shape) * 0.1
        w[rng.random(shape) < 0.02] = 5.0
        return w
    if kind == "positive":
        return rng.uniform(0.5, 2.0, shape)
    raise AssertionError(kind)


def group_sq_errors(w, layer):
    """Squared reconstruction error of every (row, group), summed with plain loops over
    the group's columns; ``(out, n_groups)`` (one column for per-channel, a 1x1 for
    per-tensor)."""
    d = layer.dequantize() - w
    out_f, in_f = w.shape
    if layer.granularity.value == "per_tensor":
        return np.array([[float(np.sum(d * d))]])
    gs = layer.group_size or in_f
    ng = -(-in_f // gs)
    err = np.zeros((out_f, ng))
    for o in range(out_f):
        for k in range(in_f):
            err[o, k // gs] += d[o, k] ** 2
    return err


@pytest.mark.parametrize("qtype, scheme", FORMATS)
@pytest.mark.parametrize("gran, gs", GRANULARITIES)
@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("kind", ["normal", "heavy", "positive"])
def test_codes_in_range_and_params_finite(rng, qtype, scheme, gran, gs, method, kind):
    w = weights(rng, kind)
    params = calibrate_linear(w, qtype, gran, scheme, group_size=gs, method=method)
    assert np.all(np.isfinite(params.scale)) and np.all(params.scale > 0)
    assert np.all(np.isfinite(params.min_val)) and np.all(np.isfinite(params.max_val))
    layer = QuantizedLinear.from_fp(w, params)
    q = layer.qweight
    qmin, qmax = params.code_range
    assert q.min() >= qmin and q.max() <= qmax
    assert np.all(np.isfinite(layer.dequantize()))


@pytest.mark.parametrize("qtype, scheme", FORMATS)
@pytest.mark.parametrize("gran, gs", GRANULARITIES)
@pytest.mark.parametrize("kind", ["normal", "heavy", "outliers", "positive"])
def test_mse_is_never_worse_than_minmax_in_any_group(rng, qtype, scheme, gran, gs, kind):
    w = weights(rng, kind)
    layers = {
        m: QuantizedLinear.from_fp(
            w, calibrate_linear(w, qtype, gran, scheme, group_size=gs, method=m)
        )
        for m in ("minmax", "mse")
    }
    e_minmax = group_sq_errors(w, layers["minmax"])
    e_mse = group_sq_errors(w, layers["mse"])
    assert np.all(e_mse <= e_minmax * (1 + 1e-9) + 1e-300)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("gran, gs", [("per_channel", None), ("per_group", 32)])
def test_mse_clearly_beats_minmax_on_gaussian_int4(rng, scheme, gran, gs):
    w = weights(rng, "normal", (64, 256))
    err = {}
    for m in ("minmax", "mse"):
        p = calibrate_linear(w, "int4", gran, scheme, group_size=gs, method=m)
        err[m] = np.sum((QuantizedLinear.from_fp(w, p).dequantize() - w) ** 2)
    assert err["mse"] < 0.97 * err["minmax"]


@pytest.mark.parametrize("qtype, scheme", FORMATS)
@pytest.mark.parametrize("gran, gs", GRANULARITIES)
def test_grid_of_one_and_percentile_100_are_minmax(rng, qtype, scheme, gran, gs):
    w = weights(rng, "heavy")
    ref = calibrate_linear(w, qtype, gran, scheme, group_size=gs)
    for kw in ({"method": "mse", "grid": [1.0]}, {"method": "mse", "grid": 1}):
        p = calibrate_linear(w, qtype, gran, scheme, group_size=gs, **kw)
        np.testing.assert_array_equal(p.scale, ref.scale)
        np.testing.assert_array_equal(p.zero_point, ref.zero_point)
    p = calibrate_linear(w, qtype, gran, scheme, group_size=gs, method="percentile", percentile=100)
    np.testing.assert_array_equal(p.scale, ref.scale)
    np.testing.assert_array_equal(p.zero_point, ref.zero_point)


def test_percentile_symmetric_clips_at_the_percentile_of_abs(rng):
    w = rng.standard_normal((3, 1000))
    p = calibrate_linear(w, "int8", "per_channel", "symmetric", method="percentile", percentile=99)
    for o in range(3):
        amax = np.percentile(np.abs(w[o]), 99)
        assert p.scale[o] == pytest.approx(amax / 127, rel=1e-12)
        assert p.max_val[o] == pytest.approx(amax, rel=1e-12)


def test_percentile_asymmetric_uses_both_tails(rng):
    w = rng.normal(0.3, 1.0, (2, 500))
    p = calibrate_linear(w, "int4", "per_channel", "asymmetric", method="percentile", percentile=95)
    for o in range(2):
        lo, hi = np.percentile(w[o], 5), np.percentile(w[o], 95)
        assert p.min_val[o] == pytest.approx(lo, rel=1e-12)
        assert p.max_val[o] == pytest.approx(hi, rel=1e-12)
        assert p.scale[o] == pytest.approx((hi - lo) / 15, rel=1e-12)


def test_percentile_per_group_partial_last_group(rng):
    w = rng.standard_normal((2, 10))
    p = calibrate_linear(
        w, "int4", "per_group", "symmetric", group_size=4, method="percentile", percentile=90
    )
    assert p.scale.shape == (2, 3)
    for o in range(2):
        for g, cols in enumerate([slice(0, 4), slice(4, 8), slice(8, 10)]):
            amax = np.percentile(np.abs(w[o, cols]), 90)
            assert p.scale[o, g] == pytest.approx(amax / 7, rel=1e-12)


def test_percentile_ignores_a_single_outlier(rng):
    w = rng.standard_normal((1, 10_000)) * 0.01
    w[0, 17] = 100.0
    mm = calibrate_linear(w, "int8", "per_channel", "symmetric")
    pc = calibrate_linear(w, "int8", "per_channel", "symmetric", method="percentile")
    assert pc.scale[0] < mm.scale[0] / 1000


def test_mse_range_is_a_shrunk_minmax_range(rng):
    w = weights(rng, "normal", (32, 64))
    grid = [1.0, 0.9, 0.8, 0.7, 0.6]
    mm = calibrate_linear(w, "int4", "per_channel", "asymmetric")
    p = calibrate_linear(w, "int4", "per_channel", "asymmetric", method="mse", grid=grid)
    ratio = p.max_val / mm.max_val
    assert np.all(np.isclose(ratio[:, None], grid).any(axis=1))
    assert np.allclose(p.min_val / mm.min_val, ratio)
    assert np.any(ratio < 1)


def test_all_zero_weight_with_every_method():
    w = np.zeros((3, 8))
    for method in ("minmax", "percentile", "mse"):
        p = calibrate_linear(w, "int4", "per_group", "asymmetric", group_size=4, method=method)
        np.testing.assert_array_equal(p.scale, 1.0)
        np.testing.assert_array_equal(QuantizedLinear.from_fp(w, p).dequantize(), w)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "kmeans"}, "calibration method"),
        ({"method": None}, "calibration method"),
        ({"method": "percentile", "percentile": 49.0}, r"\[50, 100\]"),
        ({"method": "percentile", "percentile": 100.5}, r"\[50, 100\]"),
        ({"method": "percentile", "percentile": float("nan")}, r"\[50, 100\]"),
        ({"method": "percentile", "percentile": True}, "percentile"),
        ({"method": "mse", "grid": 0}, "grid"),
        ({"method": "mse", "grid": []}, "grid"),
        ({"method": "mse", "grid": [1.0, 0.0]}, "grid"),
        ({"method": "mse", "grid": [1.5]}, "grid"),
        ({"method": "mse", "grid": [float("nan")]}, "grid"),
        ({"method": "mse", "grid": "fine"}, "grid"),
        ({"method": "mse", "grid": 2.5}, "grid"),
    ],
)
def test_bad_method_options_raise(rng, kwargs, match):
    with pytest.raises(InvalidParamsError, match=match):
        calibrate_linear(rng.standard_normal((2, 8)), "int4", "per_channel", "symmetric", **kwargs)


@settings(max_examples=40, deadline=None)
@given(
    out_f=st.integers(1, 6),
    in_f=st.integers(1, 70),
    group_size=st.integers(1, 80),
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e6]),
)
def test_property_methods_valid_and_mse_not_worse(out_f, in_f, group_size, fmt, seed, scale):
    w = np.random.default_rng(seed).standard_t(3, (out_f, in_f)) * scale
    qtype, scheme = fmt
    errs = {}
    for method in ("minmax", "percentile", "mse"):
        p = calibrate_linear(w, qtype, "per_group", scheme, group_size=group_size, method=method)
        assert p.scale.shape == (out_f, -(-in_f // group_size))
        layer = QuantizedLinear.from_fp(w, p)
        d = layer.dequantize()
        assert np.all(np.isfinite(d))
        errs[method] = group_sq_errors(w, layer)
    assert np.all(errs["mse"] <= errs["minmax"] * (1 + 1e-9))


@pytest.mark.parametrize("grid", [10**12, list(np.linspace(1.0, 0.5, 10_001))])
def test_oversized_grid_is_rejected_not_run(rng, grid):
    # grid=10**12 tried to allocate 7 TiB; 10**9 would have run for days
    with pytest.raises(InvalidParamsError, match="10000"):
        calibrate_linear(rng.standard_normal((2, 8)), "int4", method="mse", grid=grid)
