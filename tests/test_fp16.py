"""qlinear._fp16.to_float16_scales: never an Inf or silently zeroed float16 scale."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear import InvalidParamsError
from qlinear._fp16 import to_float16_scales


def test_every_float16_value_round_trips():
    # exhaustive over the non-negative finite float16 values
    h = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16)
    got = to_float16_scales(h.astype(np.float64), "s")
    np.testing.assert_array_equal(got.view(np.uint16), h.view(np.uint16))


def test_rounds_to_nearest_even():
    # 1 + 2**-11 is halfway between 1 and 1 + 2**-10: even is 1
    got = to_float16_scales(np.array([1 + 2**-11, 1 + 3 * 2**-11]), "s")
    np.testing.assert_array_equal(got, np.array([1.0, 1 + 2**-9], np.float16))


@pytest.mark.parametrize("big", [65520.0, 1e5, 1e300])
def test_overflow_raises_naming_the_tensor(big):
    s = np.array([[1.0, 2.0], [big, 3.0]])
    with pytest.raises(InvalidParamsError, match=r"blk\.0\.attn_q.*\(1, 0\).*overflows float16"):
        to_float16_scales(s, "blk.0.attn_q")


def test_largest_that_rounds_to_65504_is_kept():
    assert to_float16_scales(np.array([65519.0]), "s")[0] == np.float16(65504)


@pytest.mark.parametrize("tiny", [2.0**-26, 1e-300, 5e-324])
def test_underflow_to_zero_raises(tiny):
    with pytest.raises(InvalidParamsError, match="underflows float16 to 0"):
        to_float16_scales(np.array([1.0, tiny]), "w")


def test_zero_stays_zero_and_subnormals_are_allowed_or_refused():
    s = np.array([0.0, 2.0**-24, 2.0**-20])
    got = to_float16_scales(s, "w")
    np.testing.assert_array_equal(got.astype(np.float64), s)
    with pytest.raises(InvalidParamsError, match="subnormal"):
        to_float16_scales(s, "w", subnormal="raise")
    assert np.isfinite(to_float16_scales(np.array([2.0**-14]), "w", subnormal="raise")).all()


@pytest.mark.parametrize("v", [np.nan, np.inf, -1.0])
def test_non_finite_or_negative_raises(v):
    with pytest.raises(InvalidParamsError, match="finite number >= 0"):
        to_float16_scales(np.array([1.0, v]), "w")
