import numpy as np
import pytest

from qlinear import InvalidParamsError, QuantizationParams, ShapeMismatchError


def make(**kw):
    base = dict(
        qtype="int8",
        scheme="symmetric",
        granularity="per_channel",
        scale=np.array([0.1, 0.2]),
        zero_point=np.array([0, 0]),
        min_val=np.array([-1.0, -2.0]),
        max_val=np.array([1.0, 2.0]),
    )
    base.update(kw)
    return QuantizationParams(**base)


def test_valid_params_are_immutable_copies():
    scale = np.array([0.1, 0.2])
    p = make(scale=scale)
    scale[0] = 5.0
    assert p.scale[0] == 0.1
    assert p.scale.dtype == np.float64 and p.zero_point.dtype == np.int32
    with pytest.raises(ValueError):
        p.scale[0] = 1.0
    with pytest.raises(AttributeError):
        p.scale = np.array([1.0, 1.0])


@pytest.mark.parametrize("bad", [0.0, -1.0, np.nan, np.inf])
def test_scale_must_be_finite_positive(bad):
    with pytest.raises(InvalidParamsError, match="scale must be finite and > 0"):
        make(scale=np.array([0.1, bad]))


def test_symmetric_needs_zero_zero_point():
    with pytest.raises(InvalidParamsError, match="zero_point 0"):
        make(zero_point=np.array([0, 3]))


def test_zero_point_must_be_in_range():
    with pytest.raises(InvalidParamsError, match=r"\[-128, 127\]"):
        make(scheme="asymmetric", zero_point=np.array([0, 128]))
    with pytest.raises(InvalidParamsError, match=r"\[0, 15\]"):
        make(qtype="int4", scheme="asymmetric", zero_point=np.array([0, -1]))


def test_zero_point_must_be_integral():
    with pytest.raises(InvalidParamsError, match="non-integer"):
        make(scheme="asymmetric", zero_point=np.array([0.5, 1.0]))


def test_shapes_must_agree():
    with pytest.raises(ShapeMismatchError, match="zero_point has shape"):
        make(zero_point=np.array([0, 0, 0]))
    with pytest.raises(ShapeMismatchError, match=r"shape \(1,\)"):
        make(granularity="per_tensor")


def test_group_size_rules():
    with pytest.raises(InvalidParamsError, match="group_size"):
        make(group_size=4)
    with pytest.raises(InvalidParamsError, match="positive integer group_size"):
        make(
            granularity="per_group",
            scale=np.ones((2, 3)),
            zero_point=np.zeros((2, 3)),
            min_val=np.zeros((2, 3)),
            max_val=np.ones((2, 3)),
        )
    p = make(
        granularity="per_group",
        group_size=4,
        scale=np.ones((2, 3)),
        zero_point=np.zeros((2, 3)),
        min_val=np.zeros((2, 3)),
        max_val=np.ones((2, 3)),
    )
    p.check_weight_shape(2, 9)  # 3 groups of 4, last one partial
    with pytest.raises(ShapeMismatchError, match=r"needs \(2, 2\)"):
        p.check_weight_shape(2, 8)


def test_non_integer_qtype_rejected():
    with pytest.raises(InvalidParamsError, match="integer qtype"):
        make(qtype="fp16")


@pytest.mark.parametrize(
    "zp",
    [
        np.array([2**64 - 1, 0], dtype=np.uint64),  # wrapped to -1 in int64: accepted
        np.array([1e30, 0.0]),  # overflowed the int64 cast with a RuntimeWarning
        np.array([2**40, 0]),
    ],
)
def test_out_of_range_zero_point_never_wraps_into_range(zp):
    with pytest.raises(InvalidParamsError, match=r"zero_point must lie in \[-128, 127\]"):
        make(scheme="asymmetric", zero_point=zp)


@pytest.mark.parametrize(
    "field,value",
    [
        ("scale", np.array([0.1 + 1j, 0.2])),  # ComplexWarning, imaginary part dropped
        ("scale", np.array([True, True])),
        ("scale", np.array([0.1, 0.2], dtype=object)),
        ("min_val", np.array([-1.0 + 0j, -2.0])),
    ],
)
def test_non_real_arrays_rejected(field, value):
    with pytest.raises(InvalidParamsError, match=f"{field} must be an array of real numbers"):
        make(**{field: value})


@pytest.mark.parametrize("field", ["min_val", "max_val"])
def test_min_max_must_be_finite(field):
    with pytest.raises(InvalidParamsError, match=f"{field} must be finite"):
        make(**{field: np.array([np.nan, 1.0])})
