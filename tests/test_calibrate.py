import numpy as np
import pytest

from qlinear import (
    InvalidInputError,
    InvalidParamsError,
    QuantizationGranularity,
    QuantizationParams,
    QuantizedLinear,
    ShapeMismatchError,
    calibrate_linear,
    gptq_quantize,
)


def test_symmetric_per_channel_scale_is_row_amax_over_127(rng):
    w = rng.standard_normal((6, 11)) * rng.uniform(0.01, 100, size=(6, 1))
    p = calibrate_linear(w)
    assert p.granularity is QuantizationGranularity.PER_CHANNEL
    np.testing.assert_array_equal(p.scale, np.abs(w).max(axis=1) / 127)
    np.testing.assert_array_equal(p.zero_point, 0)
    assert len(set(p.scale.tolist())) == 6  # really one scale per row


def test_symmetric_per_tensor_uses_global_amax(rng):
    w = rng.standard_normal((4, 5))
    p = calibrate_linear(w, granularity="per_tensor")
    assert p.scale.shape == (1,)
    assert p.scale[0] == np.abs(w).max() / 127


def test_asymmetric_range_contains_zero_and_zero_is_exact(rng):
    w = np.abs(rng.standard_normal((5, 9))) + 3.0  # all positive: range must widen to 0
    w[1] *= -1  # all negative row
    p = calibrate_linear(w, scheme="asymmetric")
    assert np.all(p.min_val <= 0) and np.all(p.max_val >= 0)
    assert np.all((p.zero_point >= -128) & (p.zero_point <= 127))
    # 0.0 maps to code == zero_point, which dequantizes to exactly 0.
    code0 = np.clip(np.rint(0.0 / p.scale) + p.zero_point, -128, 127)
    np.testing.assert_array_equal((code0 - p.zero_point) * p.scale, 0.0)
    assert p.zero_point[0] == -128 and p.zero_point[1] == 127


def test_asymmetric_scale_spans_the_range(rng):
    w = rng.uniform(-1.0, 3.0, size=(3, 50))
    p = calibrate_linear(w, scheme="asymmetric")
    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    np.testing.assert_allclose(p.scale, (hi - lo) / 255, rtol=1e-15)


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_all_zero_rows_get_a_finite_positive_scale(scheme, granularity):
    w = np.zeros((3, 4))
    p = calibrate_linear(w, scheme=scheme, granularity=granularity)
    assert np.all(np.isfinite(p.scale)) and np.all(p.scale > 0)


def test_extreme_magnitudes_stay_finite():
    w = np.array([[1e308, -1e308, 0.0], [1e-310, -1e-300, 0.0]])
    for scheme in ("symmetric", "asymmetric"):
        p = calibrate_linear(w, scheme=scheme)
        assert np.all(np.isfinite(p.scale)) and np.all(p.scale > 0)


def test_per_group_shapes_with_partial_last_group(rng):
    w = rng.standard_normal((3, 10))
    p = calibrate_linear(w, "int4", "per_group", "asymmetric", group_size=4)
    assert p.scale.shape == (3, 3) and p.group_size == 4
    np.testing.assert_array_equal(p.max_val[:, 2], np.maximum(w[:, 8:].max(1), 0))


@pytest.mark.parametrize(
    ("weight", "error", "match"),
    [
        (np.array([[1.0, np.nan]]), InvalidInputError, "nan"),
        (np.array([[1.0], [np.inf]]), InvalidInputError, "inf"),
        (np.zeros((0, 3)), ShapeMismatchError, "empty"),
        (np.ones(3), ShapeMismatchError, "2-D"),
        (np.ones((2, 2, 2)), ShapeMismatchError, "2-D"),
        (np.ones((2, 2), dtype=np.int32), InvalidInputError, "floating-point"),
        ([[1, 2]], InvalidInputError, "floating-point"),
    ],
)
def test_bad_weights_raise_clear_errors(weight, error, match):
    with pytest.raises(error, match=match):
        calibrate_linear(weight)


def test_bad_options():
    w = np.ones((2, 2))
    with pytest.raises(InvalidParamsError, match="'int8' or 'int4'"):
        calibrate_linear(w, qtype="fp16")
    with pytest.raises(InvalidParamsError, match="unknown quantization type"):
        calibrate_linear(w, qtype="int3")
    with pytest.raises(InvalidParamsError, match="per_group"):
        calibrate_linear(w, group_size=2)
    with pytest.raises(InvalidParamsError, match="group_size"):
        calibrate_linear(w, granularity="per_group")
    with pytest.raises(InvalidParamsError, match="> 0"):
        calibrate_linear(w, granularity="per_group", group_size=0)


def test_float16_and_float32_weights_accepted(rng):
    w = rng.standard_normal((3, 4))
    p16 = calibrate_linear(w.astype(np.float16))
    p64 = calibrate_linear(w.astype(np.float16).astype(np.float64))
    np.testing.assert_array_equal(p16.scale, p64.scale)


@pytest.mark.parametrize("gs", [2**63, 10**30, np.uint64(2**64 - 1)])
def test_group_size_beyond_int64_is_a_clear_error(rng, gs):
    # used to escape as TypeError / OverflowError from NumPy indexing
    w = rng.standard_normal((3, 5))
    with pytest.raises(InvalidParamsError, match="group_size"):
        calibrate_linear(w, "int4", "per_group", group_size=gs)
    with pytest.raises(InvalidParamsError, match="group_size"):
        gptq_quantize(w, rng.standard_normal((8, 5)), "int4", "per_group", group_size=gs)
    with pytest.raises(InvalidParamsError, match="group_size"):
        QuantizationParams("int8", "symmetric", "per_group", [[1.0]], [[0]], [[0.0]], [[0.0]], gs)
    # the largest int64 is one group per row, as any size >= in_features is
    layer = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int4", "per_group", group_size=2**63 - 1)
    )
    assert layer.scales.shape == (3, 1)


def test_group_ranges_without_group_size_is_a_clear_error(rng):
    from qlinear.calibrate import group_ranges

    with pytest.raises(InvalidParamsError, match="group_size"):
        group_ranges(rng.standard_normal((2, 4)), QuantizationGranularity.PER_GROUP, None)
