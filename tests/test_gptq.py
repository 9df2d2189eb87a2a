"""gptq_quantize: against a slow independent reference, against round-to-nearest, errors."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear import (
    InvalidInputError,
    InvalidParamsError,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
    gptq_quantize,
)

RANGES = {
    ("int8", "symmetric"): (-127, 127),
    ("int8", "asymmetric"): (-128, 127),
    ("int4", "symmetric"): (-7, 7),
    ("int4", "asymmetric"): (0, 15),
}


def range_params(values, qmin, qmax, symmetric):
    """(scale, zero) of a list of floats by min-max, written out independently."""
    lo = min(0.0, min(values))
    hi = max(0.0, max(values))
    if symmetric:
        amax = max(-lo, hi)
        return (amax / qmax if amax > 0 else 1.0), 0
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    return scale, int(min(max(qmin - np.rint(lo / scale), qmin), qmax))


def mse_params(values, qmin, qmax, symmetric, grid):
    """(scale, zero) of the shrunk min-max range with the smallest squared error, plain
    loops; the first of equal errors wins (1.0 comes first)."""
    lo, hi = min(0.0, min(values)), max(0.0, max(values))
    if symmetric:
        hi = max(-lo, hi)
        lo = -hi
    best, best_err = None, np.inf
    for c in grid:
        s, z = range_params([c * lo, c * hi], qmin, qmax, symmetric)
        err = 0.0
        for v in values:
            q = min(max(np.rint(v / s) + z, qmin), qmax)
            err += ((q - z) * s - v) ** 2
        if err < best_err:
            best, best_err = (s, z), err
    return best


def slow_gptq(w, x, qtype, gran, scheme, group_size=None, act_order=False, damp=0.01, grid=None):
    """Column-by-column optimal brain quantization with plain loops.

    No Cholesky and no blocks: before quantizing each column the inverse Hessian of the
    columns still to quantize is taken directly, ``inv(H[rest, rest])``, and the rounding
    error ``e`` of weight ``w[r, j]`` moves every remaining weight of row ``r`` by
    ``-e * Hinv[j, k] / Hinv[j, j]``. Group params come from min-max over the group's
    current weights when the first of its columns is reached.
    """
    qmin, qmax = RANGES[(qtype, scheme)]
    sym = scheme == "symmetric"
    w = np.array(w, dtype=np.float64)
    out_f, in_f = w.shape
    h = 2.0 / x.shape[0] * (x.T.astype(np.float64) @ x.astype(np.float64))
    params = {}  # (row, group) -> (scale, zero)
    if gran == "per_tensor":
        s, z = range_params(list(w.ravel()), qmin, qmax, sym)
        params = {(r, 0): (s, z) for r in range(out_f)}
    elif gran == "per_channel":
        params = {(r, 0): range_params(list(w[r]), qmin, qmax, sym) for r in range(out_f)}
    for i in range(in_f):
        if h[i, i] == 0:
            h[i, i] = 1.0
            w[:, i] = 0.0
    diag = [h[i, i] for i in range(in_f)]
    order = sorted(range(in_f), key=lambda i: -diag[i]) if act_order else list(range(in_f))
    mean_diag = sum(diag) / in_f
    for i in range(in_f):
        h[i, i] += damp * mean_diag
    codes = np.zeros((out_f, in_f), dtype=np.int64)
    for step, j in enumerate(order):
        rest = order[step:]
        hinv = np.linalg.inv(h[np.ix_(rest, rest)])
        g = j // group_size if gran == "per_group" else 0
        if (0, g) not in params:
            cols = range(g * group_size, min(in_f, (g + 1) * group_size))
            for r in range(out_f):
                vals = [w[r, c] for c in cols]
                params[(r, g)] = (
                    range_params(vals, qmin, qmax, sym)
                    if grid is None
                    else mse_params(vals, qmin, qmax, sym, grid)
                )
        for r in range(out_f):
            s, z = params[(r, g)]
            q = min(max(np.rint(w[r, j] / s) + z, qmin), qmax)
            codes[r, j] = q
            e = (w[r, j] - (q - z) * s) / hinv[0, 0]
            for t, k in enumerate(rest):
                w[r, k] -= e * hinv[0, t]
    ng = 1 if gran != "per_group" else -(-in_f // group_size)
    scales = np.array([[params[(r, g)][0] for g in range(ng)] for r in range(out_f)])
    return codes, scales


def correlated_inputs(rng, n, k):
    """Inputs whose features are correlated and of very different scales (as real
    activations are): where GPTQ's error feedback has something to exploit."""
    mix = np.eye(k) + 0.4 * rng.standard_normal((k, k))
    return (rng.standard_normal((n, k)) @ mix) * rng.uniform(0.2, 3.0, k)


CASES = [
    ("int4", "per_channel", "symmetric", None),
    ("int4", "per_channel", "asymmetric", None),
    ("int4", "per_group", "symmetric", 4),
    ("int4", "per_group", "asymmetric", 4),
    ("int4", "per_group", "asymmetric", 3),
    ("int8", "per_tensor", "symmetric", None),
    ("int8", "per_group", "asymmetric", 5),
]


@pytest.mark.parametrize("qtype, gran, scheme, gs", CASES)
@pytest.mark.parametrize("act_order", [False, True])
def test_matches_slow_reference(rng, qtype, gran, scheme, gs, act_order):
    out_f, in_f = 5, 10
    w = rng.standard_normal((out_f, in_f))
    x = correlated_inputs(rng, 40, in_f)
    x[:, 6] = 0.0  # a dead input
    ref_codes, ref_scales = slow_gptq(w, x, qtype, gran, scheme, gs, act_order)
    # block_size 3: groups straddle blocks, so the lazy updates across blocks matter
    layer = gptq_quantize(
        w, x, qtype, gran, scheme, group_size=gs, act_order=act_order, block_size=3
    )
    np.testing.assert_array_equal(layer.qweight, ref_codes)
    scales = np.broadcast_to(
        layer.scales.reshape(-1, 1 if gs is None else ref_scales.shape[1]), ref_scales.shape
    )
    np.testing.assert_allclose(scales, ref_scales, rtol=1e-12)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("act_order", [False, True])
def test_mse_groups_match_slow_reference(rng, scheme, act_order):
    w = rng.standard_t(3, (5, 11))
    x = correlated_inputs(rng, 40, 11)
    grid = [1.0, 0.95, 0.9, 0.8, 0.7, 0.6]
    ref_codes, ref_scales = slow_gptq(
        w, x, "int4", "per_group", scheme, 4, act_order=act_order, grid=grid
    )
    layer = gptq_quantize(
        w,
        x,
        "int4",
        "per_group",
        scheme,
        group_size=4,
        act_order=act_order,
        block_size=3,
        method="mse",
        grid=grid,
    )
    np.testing.assert_array_equal(layer.qweight, ref_codes)
    np.testing.assert_allclose(layer.scales, ref_scales, rtol=1e-12)


def test_act_order_really_reorders_and_stays_contiguous(rng):
    w = rng.standard_normal((6, 12))
    x = correlated_inputs(rng, 50, 12)
    plain = gptq_quantize(w, x, "int4", "per_group", "asymmetric", group_size=4)
    ordered = gptq_quantize(w, x, "int4", "per_group", "asymmetric", group_size=4, act_order=True)
    assert not np.array_equal(plain.qweight, ordered.qweight)
    assert ordered.scales.shape == (6, 3) and ordered.group_size == 4
    ref_codes, _ = slow_gptq(w, x, "int4", "per_group", "asymmetric", 4, act_order=True)
    np.testing.assert_array_equal(ordered.qweight, ref_codes)


@pytest.mark.parametrize(
    "qtype, gran, scheme, gs",
    [
        ("int4", "per_channel", "symmetric", None),
        ("int4", "per_group", "asymmetric", 32),
        ("int4", "per_group", "symmetric", 24),
        ("int8", "per_channel", "symmetric", None),
        ("int4", "per_tensor", "asymmetric", None),
    ],
)
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_lower_output_error_than_round_to_nearest(rng, qtype, gran, scheme, gs, act_order, method):
    w = rng.standard_normal((48, 96))
    x = correlated_inputs(rng, 400, 96)
    y = x @ w.T

    def err(layer):
        return np.linalg.norm(y - x @ layer.dequantize().T)

    rtn = QuantizedLinear.from_fp(
        w, calibrate_linear(w, qtype, gran, scheme, group_size=gs, method=method)
    )
    gptq = gptq_quantize(
        w, x, qtype, gran, scheme, group_size=gs, act_order=act_order, method=method
    )
    assert err(gptq) < 0.9 * err(rtn)


def test_block_size_changes_nothing_but_rounding(rng):
    w = rng.standard_normal((8, 40))
    x = correlated_inputs(rng, 100, 40)
    layers = [
        gptq_quantize(
            w, x, "int4", "per_group", "asymmetric", group_size=8, act_order=True, block_size=bs
        )
        for bs in (1, 7, 16, 128)
    ]
    for other in layers[1:]:
        np.testing.assert_array_equal(other.qweight, layers[0].qweight)


@pytest.mark.parametrize("method", ["minmax", "percentile", "mse"])
@pytest.mark.parametrize("qtype, scheme", list(RANGES))
def test_codes_in_range_and_finite(rng, method, qtype, scheme):
    w = rng.standard_t(2, (16, 37))
    x = correlated_inputs(rng, 60, 37)
    layer = gptq_quantize(
        w, x, qtype, "per_group", scheme, group_size=8, act_order=True, method=method
    )
    qmin, qmax = RANGES[(qtype, scheme)]
    assert layer.qweight.min() >= qmin and layer.qweight.max() <= qmax
    assert np.all(np.isfinite(layer.scales)) and np.all(layer.scales > 0)
    assert np.all(np.isfinite(layer.dequantize()))


def test_dead_inputs_get_zero_weight(rng):
    w = rng.standard_normal((4, 9))
    x = correlated_inputs(rng, 30, 9)
    x[:, [0, 5]] = 0.0
    layer = gptq_quantize(w, x, "int4", "per_group", "asymmetric", group_size=3)
    np.testing.assert_array_equal(layer.dequantize()[:, [0, 5]], 0.0)


def test_bias_and_nd_inputs(rng):
    w = rng.standard_normal((3, 8))
    x = correlated_inputs(rng, 24, 8)
    b = rng.standard_normal(3)
    flat = gptq_quantize(w, x, "int8", "per_channel", "symmetric")
    nd = gptq_quantize(w, x.reshape(2, 12, 8), "int8", "per_channel", "symmetric", bias=b)
    np.testing.assert_array_equal(flat.qweight, nd.qweight)
    np.testing.assert_array_equal(nd.bias, b)
    f32 = gptq_quantize(w, x.astype(np.float32), "int8", "per_channel", "symmetric")
    assert f32.qweight.shape == (3, 8)


def test_default_scheme_is_symmetric(rng):
    w = rng.standard_normal((3, 8))
    layer = gptq_quantize(w, correlated_inputs(rng, 20, 8), "int4", "per_channel")
    assert layer.scheme.value == "symmetric"


@pytest.mark.parametrize(
    "x, error, match",
    [
        (np.ones((5, 7)), ShapeMismatchError, r"\(\.\.\., 8\)"),
        (np.ones(7), ShapeMismatchError, r"\(\.\.\., 8\)"),
        (np.ones((0, 8)), ShapeMismatchError, "no samples"),
        (np.array(1.0), ShapeMismatchError, r"\(\.\.\., 8\)"),
        (np.ones((5, 8), dtype=np.int32), InvalidInputError, "floating-point"),
        (np.where(np.eye(5, 8) > 0, np.nan, 1.0), InvalidInputError, "nan"),
        (np.where(np.eye(5, 8) > 0, np.inf, 1.0), InvalidInputError, "inf"),
    ],
)
def test_bad_calibration_inputs(rng, x, error, match):
    with pytest.raises(error, match=match):
        gptq_quantize(rng.standard_normal((3, 8)), x, "int4", "per_channel")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"damp": -0.1}, "damp"),
        ({"damp": float("nan")}, "damp"),
        ({"damp": "0.01"}, "damp"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.0}, "block_size"),
        ({"act_order": "yes"}, "act_order"),
        ({"method": "hqq"}, "method"),
        ({"group_size": 8}, "group_size"),
        ({"granularity": "per_group"}, "group_size"),
        ({"qtype": "fp16"}, "integer codes"),
        ({"scheme": "skewed"}, "scheme"),
    ],
)
def test_bad_options(rng, kwargs, match):
    args = {"qtype": "int4", "granularity": "per_channel", "scheme": "symmetric"} | kwargs
    w, x = rng.standard_normal((3, 8)), rng.standard_normal((10, 8))
    with pytest.raises(InvalidParamsError, match=match):
        gptq_quantize(w, x, **args)


def test_bad_weight(rng):
    x = rng.standard_normal((10, 8))
    with pytest.raises(InvalidInputError, match="nan"):
        gptq_quantize(np.full((3, 8), np.nan), x, "int4", "per_channel")
    with pytest.raises(ShapeMismatchError, match="2-D"):
        gptq_quantize(np.ones(8), x, "int4", "per_channel")


def test_singular_hessian_without_damping_is_a_clear_error(rng):
    # Two identical inputs; exact in floating point, so the factorisation must fail.
    x = np.array([[2.0, 2.0], [0.0, 0.0]])
    w = rng.standard_normal((3, 2))
    with pytest.raises(InvalidInputError, match="positive definite"):
        gptq_quantize(w, x, "int4", "per_channel", damp=0.0)
    layer = gptq_quantize(w, x, "int4", "per_channel")
    assert np.all(np.isfinite(layer.dequantize()))


@pytest.mark.parametrize("factor", [1e-170, 1e-30, 1e30, 1e200])
def test_codes_do_not_depend_on_the_scale_of_the_inputs(rng, factor):
    # H underflowing to 0 would mark every input dead and zero the weight; overflowing
    # would give NaN. GPTQ is invariant to a positive factor of H.
    w = rng.standard_normal((4, 12))
    x = correlated_inputs(rng, 30, 12)
    ref = gptq_quantize(w, x, "int4", "per_group", "asymmetric", group_size=4, act_order=True)
    got = gptq_quantize(
        w, x * factor, "int4", "per_group", "asymmetric", group_size=4, act_order=True
    )
    np.testing.assert_array_equal(got.qweight, ref.qweight)


@pytest.mark.parametrize("big", [1e300, 1.7e308])
def test_huge_weights_stay_finite(rng, big):
    w = rng.uniform(-1.0, 1.0, (3, 8)) * big
    layer = gptq_quantize(
        w, correlated_inputs(rng, 30, 8), "int4", "per_group", "asym", group_size=4
    )
    assert np.all(np.isfinite(layer.scales))
    assert np.all(np.isfinite(layer.dequantize()))


def test_subnormal_inputs_are_not_marked_dead(rng):
    # max|X| ~ 1e-312: the rescaling factor 2^1036 overflowed to Inf, H became NaN/Inf and
    # the weight came out (almost) all zeros. Inputs with few mantissa bits stay exact
    # when scaled into the subnormal range, so the codes must equal the unscaled ones.
    w = rng.standard_normal((4, 12))
    x = np.round(correlated_inputs(rng, 30, 12) * 2**10) / 2**10
    ref = gptq_quantize(w, x, "int4", "per_group", "asymmetric", group_size=4, act_order=True)
    tiny = np.ldexp(x, -1040)
    assert np.all(np.ldexp(tiny, 1040) == x)  # exact: the test's premise
    got = gptq_quantize(w, tiny, "int4", "per_group", "asymmetric", group_size=4, act_order=True)
    np.testing.assert_array_equal(got.qweight, ref.qweight)


def test_grid_codes_without_correlation_are_plain_rounding(rng):
    # H = I: no error is fed to other columns, so every code is the nearest grid point
    # of the block's own (d, m) (a grid with float offsets, as GGUF's Q4_1)
    from qlinear.gptq import gptq_grid_codes

    w = rng.standard_normal((6, 24))

    def rule(g):
        return (g.max(1) - g.min(1)) / 15, g.min(1) + 0.1

    codes, d, m = gptq_grid_codes(w, np.eye(24), 8, rule, 0, 15, damp=0.0)
    b = w.reshape(6, 3, 8)
    d_ref, m_ref = rule(b.reshape(18, 8))
    d_ref, m_ref = d_ref.reshape(6, 3), m_ref.reshape(6, 3)
    want = np.clip(np.rint((b - m_ref[..., None]) / d_ref[..., None]), 0, 15).reshape(6, 24)
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(d, d_ref)
    np.testing.assert_array_equal(m, m_ref)
    with pytest.raises(ShapeMismatchError, match="multiple of group_size 5"):
        gptq_grid_codes(w, np.eye(24), 5, rule, 0, 15)
