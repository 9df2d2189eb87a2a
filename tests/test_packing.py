"""int4 packing: nibble order pinned on hand-written bytes, round trips, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qlinear.errors import InvalidInputError, ShapeMismatchError
from qlinear.packing import pack_int4, packed_cols, unpack_int4


def test_codes_0_to_7_pack_to_known_bytes():
    packed = pack_int4(np.arange(8, dtype=np.uint8).reshape(1, 8))
    assert packed.dtype == np.uint8
    assert packed.tolist() == [[0x10, 0x32, 0x54, 0x76]]


def test_codes_8_to_15_pack_to_known_bytes():
    packed = pack_int4(np.arange(8, 16).reshape(1, 8))
    assert packed.tolist() == [[0x98, 0xBA, 0xDC, 0xFE]]


def test_every_pair_of_the_16_nibbles():
    lo, hi = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    pairs = np.stack([lo.ravel(), hi.ravel()], axis=1)  # (256, 2): every (even, odd) pair
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1)
    assert packed[:, 0].tolist() == [a + 16 * b for a, b in pairs.tolist()]
    assert sorted(packed[:, 0].tolist()) == list(range(256))
    np.testing.assert_array_equal(unpack_int4(packed, 2), pairs)


def test_odd_width_pads_the_last_high_nibble_with_zero():
    packed = pack_int4(np.array([[1, 2, 3], [15, 15, 15]]))
    assert packed.tolist() == [[0x21, 0x03], [0xFF, 0x0F]]
    np.testing.assert_array_equal(unpack_int4(packed, 3), [[1, 2, 3], [15, 15, 15]])


@pytest.mark.parametrize("cols", [1, 2, 3, 7, 8, 33, 128, 129])
def test_packed_cols_is_ceil_half(cols):
    assert packed_cols(cols) == -(-cols // 2)
    assert pack_int4(np.zeros((2, cols), dtype=np.uint8)).shape == (2, -(-cols // 2))


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.uint8,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=41),
        elements=st.integers(0, 15),
    )
)
def test_round_trip(nibbles):
    packed = pack_int4(nibbles)
    assert packed.shape == (nibbles.shape[0], (nibbles.shape[1] + 1) // 2)
    np.testing.assert_array_equal(unpack_int4(packed, nibbles.shape[1]), nibbles)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint16])
def test_any_integer_dtype_packs_alike(dtype):
    a = np.array([[3, 12, 0, 15, 7]])
    np.testing.assert_array_equal(pack_int4(a.astype(dtype)), pack_int4(a.astype(np.uint8)))


@pytest.mark.parametrize("bad", [[[16]], [[-1, 0]], [[0, 255]]])
def test_out_of_range_nibbles_rejected(bad):
    with pytest.raises(InvalidInputError, match=r"\[0, 15\]"):
        pack_int4(np.array(bad))


def test_pack_rejects_floats_and_wrong_rank():
    with pytest.raises(InvalidInputError, match="integer"):
        pack_int4(np.zeros((2, 2)))
    with pytest.raises(ShapeMismatchError, match="2-D"):
        pack_int4(np.zeros(4, dtype=np.uint8))


@pytest.mark.parametrize(
    "packed, cols",
    [
        (np.zeros((2, 3), dtype=np.uint8), 4),  # 4 columns need 2 bytes
        (np.zeros((2, 2), dtype=np.uint8), 5),  # 5 columns need 3 bytes
        (np.zeros((2, 2), dtype=np.int8), 4),  # not uint8
        (np.zeros(2, dtype=np.uint8), 4),  # not 2-D
    ],
)
def test_unpack_rejects_mismatched_data(packed, cols):
    with pytest.raises(ShapeMismatchError, match="uint8"):
        unpack_int4(packed, cols)
