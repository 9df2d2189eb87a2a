import threading
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_close
from qlinear import (
    InvalidInputError,
    InvalidParamsError,
    QuantizationParams,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
)
from qlinear.params import n_groups

SCHEMES = ["symmetric", "asymmetric"]
GRANS = ["per_tensor", "per_channel"]


def layer_for(
    w, qtype="int8", granularity="per_channel", scheme="symmetric", group_size=None, bias=None
):
    p = calibrate_linear(w, qtype, granularity, scheme, group_size=group_size)
    return QuantizedLinear.from_fp(w, p, bias=bias)


def forward_bound(x, w, rtol):
    """Elementwise error bound for a dot product: rtol * (|x| @ |w|.T)."""
    return rtol * (np.abs(x) @ np.abs(w).T)


def expanded_scale(layer):
    s = layer.scales
    if s.ndim == 2:
        return s[:, np.arange(layer.in_features) // layer.group_size]
    return np.broadcast_to(s.reshape(-1, 1), layer.shape)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity", GRANS)
def test_round_trip_error_at_most_half_a_step_per_element(rng, scheme, granularity):
    w = rng.standard_normal((17, 33)) * rng.uniform(0.01, 10, size=(17, 1))
    layer = layer_for(w, granularity=granularity, scheme=scheme)
    err = np.abs(layer.dequantize() - w)
    half = expanded_scale(layer) / 2
    assert np.all(err <= half * (1 + 1e-12))


def test_per_channel_scales_really_differ_per_row(rng):
    w = rng.standard_normal((4, 64)) * np.array([[1e-3], [1.0], [10.0], [1e3]])
    layer = layer_for(w)
    assert layer.scales.shape == (4,)
    assert len(np.unique(layer.scales)) == 4
    # the smallest row keeps its relative precision: per-tensor would flatten it to zero
    rel = np.abs(layer.dequantize()[0] - w[0]).max() / np.abs(w[0]).max()
    assert rel <= 0.5 / 127 + 1e-12
    flat = layer_for(w, granularity="per_tensor")
    assert np.abs(flat.dequantize()[0]).max() == 0.0


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("granularity", GRANS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_float64_matches_dequantized_reference(rng, scheme, granularity, with_bias):
    w = rng.standard_normal((37, 29))
    bias = rng.standard_normal(37) if with_bias else None
    layer = layer_for(w, granularity=granularity, scheme=scheme, bias=bias)
    x = rng.standard_normal((5, 29))
    wd = layer.dequantize()
    ref = x @ wd.T + (0 if bias is None else bias)
    y = layer.forward(x)
    assert y.dtype == np.float64 and y.shape == (5, 37)
    assert np.all(np.abs(y - ref) <= forward_bound(x, wd, 1e-12) + 1e-12 * np.abs(ref))


def test_forward_float32_computes_in_float32(rng):
    w = rng.standard_normal((20, 48))
    layer = layer_for(w, scheme="asymmetric", bias=rng.standard_normal(20))
    x = rng.standard_normal((3, 48)).astype(np.float32)
    y = layer(x)
    assert y.dtype == np.float32
    wd = layer.dequantize()
    ref = x.astype(np.float64) @ wd.T + layer.bias
    assert np.all(np.abs(y - ref) <= forward_bound(x, wd, 1e-5) + 1e-5 * np.abs(ref))


def test_float16_input_computes_in_float32(rng):
    layer = layer_for(rng.standard_normal((4, 8)))
    y = layer(rng.standard_normal((2, 8)).astype(np.float16))
    assert y.dtype == np.float32


def test_bias_is_added_per_channel(rng):
    w = rng.standard_normal((6, 10))
    bias = np.arange(6.0) * 10
    plain = layer_for(w)
    biased = plain.with_bias(bias)
    x = rng.standard_normal((4, 10))
    assert_close(biased(x) - plain(x), np.broadcast_to(bias, (4, 6)), atol=1e-12)
    assert plain.bias is None  # with_bias returned a new layer
    assert biased.with_bias(None).bias is None


@pytest.mark.parametrize("bad", [np.ones(5), np.ones(7), np.ones((6, 1))])
def test_wrong_bias_shape_rejected(rng, bad):
    layer = layer_for(rng.standard_normal((6, 3)))
    with pytest.raises(ShapeMismatchError, match=r"\(6,\)"):
        layer.with_bias(bad)


def test_bad_bias_values_rejected(rng):
    layer = layer_for(rng.standard_normal((2, 3)))
    with pytest.raises(InvalidInputError):
        layer.with_bias(np.array([1.0, np.nan]))
    with pytest.raises(InvalidInputError):
        layer.with_bias(np.array([1, 2]))


def test_input_shapes_1d_nd_and_empty(rng):
    w = rng.standard_normal((5, 7))
    layer = layer_for(w, bias=rng.standard_normal(5))
    x = rng.standard_normal((2, 3, 7))
    y = layer(x)
    assert y.shape == (2, 3, 5)
    assert_close(y[1, 2], layer(x[1, 2]), rtol=1e-14, atol=1e-14)
    assert layer(x[0, 0]).shape == (5,)
    assert layer(np.zeros((0, 7))).shape == (0, 5)


def test_non_contiguous_input(rng):
    layer = layer_for(rng.standard_normal((9, 16)))
    x = rng.standard_normal((6, 32))[:, ::2]  # every other column: strided
    assert not x.flags.c_contiguous
    assert_close(layer(x), layer(np.ascontiguousarray(x)), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (np.ones((2, 6)), ShapeMismatchError, r"\(\.\.\., 7\)"),
        (np.float64(1.0), ShapeMismatchError, r"\(\.\.\., 7\)"),
        (np.ones((2, 7), dtype=np.int64), InvalidInputError, "floating-point"),
        (np.full((1, 7), np.nan), InvalidInputError, "nan"),
        (np.full((1, 7), -np.inf), InvalidInputError, "inf"),
    ],
)
def test_bad_inputs_raise(rng, x, error, match):
    layer = layer_for(rng.standard_normal((3, 7)))
    with pytest.raises(error, match=match):
        layer(x)


def test_unknown_activation_mode(rng):
    layer = layer_for(rng.standard_normal((3, 7)))
    with pytest.raises(InvalidParamsError, match="activations"):
        layer(np.ones(7), activations="int4")


def test_params_must_fit_the_weight(rng):
    w = rng.standard_normal((4, 5))
    p = calibrate_linear(w)
    with pytest.raises(ShapeMismatchError, match=r"needs \(3,\)"):
        QuantizedLinear.from_fp(w[:3], p)
    with pytest.raises(ShapeMismatchError, match="2-D"):
        QuantizedLinear.from_fp(w[0], p)
    with pytest.raises(InvalidParamsError, match="QuantizationParams"):
        QuantizedLinear.from_fp(w, {"scale": 1.0})
    with pytest.raises(InvalidInputError):
        QuantizedLinear.from_fp(np.where(w > 0, np.nan, w), p)
    with pytest.raises(TypeError):
        QuantizedLinear()


def test_all_zero_rows_dequantize_to_exact_zeros(rng):
    w = rng.standard_normal((4, 6))
    w[2] = 0.0
    for scheme in SCHEMES:
        for gran in GRANS:
            layer = layer_for(w, granularity=gran, scheme=scheme)
            np.testing.assert_array_equal(layer.dequantize()[2], 0.0)
    zero = layer_for(np.zeros((3, 3)), scheme="asymmetric", granularity="per_tensor")
    np.testing.assert_array_equal(zero.dequantize(), 0.0)
    np.testing.assert_array_equal(zero(np.ones((2, 3))), 0.0)


def test_every_int8_code_round_trips_through_from_codes():
    codes = np.arange(-128, 128, dtype=np.int16).reshape(2, 128)
    scale = np.array([0.5, 0.25])
    zp = np.array([-3, 100])
    p = QuantizationParams("int8", "asymmetric", "per_channel", scale, zp, scale, scale)
    layer = QuantizedLinear.from_codes(codes, p)
    np.testing.assert_array_equal(layer.qweight, codes)
    expected = (codes - zp[:, None]) * scale[:, None]  # exact in binary
    np.testing.assert_array_equal(layer.dequantize(), expected)
    with pytest.raises(InvalidInputError, match=r"\[-127, 127\]"):
        sym = QuantizationParams("int8", "symmetric", "per_channel", scale, [0, 0], scale, scale)
        QuantizedLinear.from_codes(codes, sym)


def test_layer_is_read_only(rng):
    layer = layer_for(rng.standard_normal((3, 4)), bias=np.ones(3))
    for arr in (layer.qweight, layer.scales, layer.zero_points, layer.bias):
        with pytest.raises(ValueError):
            arr[0] = 0
    with pytest.raises(AttributeError):
        layer.scales = np.ones(3)
    with pytest.raises(AttributeError):
        layer.extra = 1


def test_properties(rng):
    layer = layer_for(rng.standard_normal((6, 10)), scheme="asymmetric", granularity="per_tensor")
    assert (layer.out_features, layer.in_features) == (6, 10)
    assert layer.granularity.value == "per_tensor" and layer.scheme.value == "asymmetric"
    assert layer.qtype.value == "int8"
    assert layer.scales.dtype == np.float64 and layer.scales.shape == (1,)
    assert layer.zero_points.dtype == np.int32
    assert layer.qweight.dtype == np.int8 and layer.qweight.shape == (6, 10)
    assert "QuantizedLinear" in repr(layer)


def test_nbytes_counts_codes_scales_and_bias(rng):
    out_f, in_f = 64, 100
    layer = layer_for(rng.standard_normal((out_f, in_f)), bias=np.ones(out_f))
    # int8 codes within 5%, plus float64 scale, int32 zero point (and the kernels'
    # normalised copy of it) and float64 bias per row
    assert out_f * in_f < layer.nbytes <= out_f * in_f * 1.05 + out_f * (8 + 4 + 4 + 8)
    int4 = layer_for(rng.standard_normal((out_f, in_f)), "int4", "per_group", group_size=32)
    groups = n_groups(in_f, 32)
    assert int4.nbytes <= out_f * in_f // 2 + out_f * groups * (8 + 4) * 2


def test_forward_is_thread_safe(rng):
    layer = layer_for(rng.standard_normal((64, 96)), scheme="asymmetric", bias=np.ones(64))
    xs = [rng.standard_normal((8, 96)) for _ in range(8)]
    expected = [layer(x) for x in xs]
    results: dict[int, np.ndarray] = {}

    def run(i):
        for _ in range(20):
            results[i] = layer(xs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_array_equal(results[i], expected[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_never_materialises_the_float_weight(rng, dtype):
    out_f = in_f = 1024
    layer = layer_for(rng.standard_normal((out_f, in_f)).astype(np.float32))
    x = rng.standard_normal((1, in_f)).astype(dtype)
    layer(x)  # warm up lazy imports and caches
    tracemalloc.start()
    try:
        layer(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = out_f * in_f * np.dtype(dtype).itemsize
    assert peak < full / 4, f"forward peak {peak} bytes vs full float weight {full} bytes"


@settings(max_examples=60, deadline=None)
@given(
    out_f=st.integers(1, 40),
    in_f=st.integers(1, 40),
    batch=st.integers(1, 5),
    qtype=st.sampled_from(["int8", "int4"]),
    scheme=st.sampled_from(SCHEMES),
    gran=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
    group_size=st.integers(1, 16),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**31),
)
def test_property_round_trip_and_forward(
    out_f, in_f, batch, qtype, scheme, gran, group_size, dtype, seed
):
    r = np.random.default_rng(seed)
    w = (r.standard_normal((out_f, in_f)) * 10 ** r.uniform(-3, 3)).astype(dtype)
    gs = group_size if gran == "per_group" else None
    layer = layer_for(w, qtype, gran, scheme, gs)
    qmin, qmax = layer.params.code_range
    assert layer.qweight.min() >= qmin and layer.qweight.max() <= qmax
    wd = layer.dequantize()
    err = np.abs(wd - w.astype(np.float64))
    assert np.all(err <= expanded_scale(layer) / 2 * (1 + 1e-9))
    x = r.standard_normal((batch, in_f)).astype(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (batch, out_f)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    ref = x.astype(np.float64) @ wd.T
    assert np.all(np.abs(y - ref) <= forward_bound(x, wd, rtol) + 1e-300)


@pytest.mark.parametrize("activations", ["float", "int8"])
def test_output_overflow_raises_instead_of_inf(rng, activations):
    # finite float32 x whose product with W exceeds float32's range: a clear error, not
    # Inf with a RuntimeWarning (an exception under -W error)
    w = rng.uniform(1.0, 2.0, (4, 6))
    layer = layer_for(w)
    x = np.full((2, 6), 3e38, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="overflowed float32"):
        layer(x, activations=activations)
    # the same input in float64 fits
    y = layer(x.astype(np.float64), activations=activations)
    assert np.all(np.isfinite(y))


def test_weights_beyond_float32_range_raise_for_float32_input():
    # scales above float32's max become Inf in a float32 tile: 0 * Inf gave silent NaN
    w = np.array([[1e300, 0.0, -1e300]])
    layer = layer_for(w)
    with pytest.raises(InvalidInputError, match="overflowed"):
        layer(np.ones(3, dtype=np.float32))
    assert_close(layer(np.ones(3)), w @ np.ones(3), rtol=1e-12)


def test_longdouble_input_computes_in_float64(rng):
    w = rng.standard_normal((4, 6))
    layer = layer_for(w)
    x = rng.standard_normal((2, 6))
    y = layer(x.astype(np.longdouble))
    assert y.dtype == np.float64
    assert_close(y, x @ layer.dequantize().T, rtol=1e-12)


def test_dequantize_rejects_unknown_dtype_names(rng):
    layer = layer_for(rng.standard_normal((2, 3)))
    with pytest.raises(InvalidParamsError, match="banana"):
        layer.dequantize("banana")


def test_from_fp_with_a_subnormal_scale_clamps_without_warnings():
    # w / 1e-320 overflows to Inf; the code must clamp to qmax (pytest turns the
    # RuntimeWarning this used to emit into an error)
    p = QuantizationParams("int8", "symmetric", "per_channel", [1e-320], [0], [0.0], [0.0])
    layer = QuantizedLinear.from_fp(np.array([[1.0, -1.0, 0.0]]), p)
    np.testing.assert_array_equal(layer.qweight, [[127, -127, 0]])


def test_from_codes_does_not_share_or_freeze_the_callers_array(rng):
    w = rng.standard_normal((2, 3))
    base = np.zeros((2, 3), dtype=np.int8)
    codes = base[:]  # a view: freezing it would not freeze base
    layer = QuantizedLinear.from_codes(codes, calibrate_linear(w))
    assert codes.flags.writeable and base.flags.writeable
    base[0, 0] = 100
    np.testing.assert_array_equal(layer.qweight, np.zeros((2, 3)))
    np.testing.assert_array_equal(layer(np.ones(3)), [0.0, 0.0])


@pytest.mark.parametrize("dtype", [">f4", ">f8"])
def test_byte_swapped_input_keeps_its_precision(rng, dtype):
    w = rng.standard_normal((4, 6))
    layer = layer_for(w)
    x = rng.standard_normal((3, 6)).astype(dtype)
    y = layer(x)
    assert y.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(y, layer(x.astype(y.dtype)))


@pytest.mark.parametrize("dtype,big", [(np.float16, 1e7), (np.float32, 1e300)])
def test_dequantize_to_a_dtype_too_narrow_for_the_weight_raises(dtype, big):
    # the scale overflowed to Inf in the narrow dtype: Inf weights, and 0 * Inf = NaN
    w = np.array([[big, 0.0, -1.0]])
    layer = layer_for(w)
    with pytest.raises(InvalidParamsError, match="does not fit"):
        layer.dequantize(dtype)
    assert_close(layer.dequantize(), w, atol=big / 254)


@pytest.mark.parametrize("qtype,gs", [("int8", None), ("int4", 8)])
def test_pickle_and_copy_give_equal_read_only_layers(rng, qtype, gs):
    import copy
    import pickle

    w = rng.standard_normal((5, 19))
    gran = "per_group" if gs else "per_channel"
    layer = layer_for(w, qtype, gran, "asymmetric", gs, bias=rng.standard_normal(5))
    x = rng.standard_normal((3, 19))
    clones = [pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer), copy.copy(layer)]
    try:  # Ray's serializer (installed with ray): pickles what it cannot name by value
        import cloudpickle
    except ImportError:
        pass
    else:
        clones.append(cloudpickle.loads(cloudpickle.dumps(layer)))
    for clone in clones:
        np.testing.assert_array_equal(clone.qweight, layer.qweight)
        np.testing.assert_array_equal(clone.scales, layer.scales)
        np.testing.assert_array_equal(clone(x), layer(x))
        for arr in (clone.qweight, clone.scales, clone.zero_points, clone.bias):
            with pytest.raises(ValueError):
                arr[0] = 0


@pytest.mark.parametrize("backend", __import__("qlinear").kernels.available_backends())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unpickled_and_byte_swapped_inputs_give_the_same_output(rng, backend, dtype):
    """x whose dtype is not NumPy's canonical object (unpickled, as from multiprocessing or
    Ray) or is big-endian: the same result as the plain array, in both activation modes."""
    import pickle

    w = rng.standard_normal((7, 33))
    layer = QuantizedLinear.from_fp(w, calibrate_linear(w, "int8"), backend=backend)
    x = rng.standard_normal((5, 33)).astype(dtype)
    unpickled = pickle.loads(pickle.dumps(x))
    swapped = x.astype(x.dtype.newbyteorder(">"))
    for mode in ("float", "int8"):
        want = layer.forward(x, activations=mode)
        for other in (unpickled, swapped):
            np.testing.assert_array_equal(layer.forward(other, activations=mode), want)


def test_unknown_or_unhashable_backend_is_a_clear_error(rng):
    w = rng.standard_normal((2, 3))
    for bad in ("nope", [], None.__class__):
        with pytest.raises(InvalidParamsError, match="backend"):
            QuantizedLinear.from_fp(w, calibrate_linear(w), backend=bad)
