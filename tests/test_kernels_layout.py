"""The packed layout of the native backends (``_src/layout.h``), pinned on known bytes.

Hand-written examples first, then a plain restatement of the layout in Python against
``_native.pack`` (and ``_native.unpack`` back) on awkward shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

from qlinear.packing import pack_int4

native = pytest.importorskip("qlinear._native")


def test_int8_one_row_five_columns():
    # One step of 4 codes (stored + 128), then the tail column.
    canon = np.array([[0, 1, 2, 3, 4]], dtype=np.int8).view(np.uint8)
    assert native.pack(canon, 8, 1, 5).tobytes() == bytes([0x80, 0x81, 0x82, 0x83, 0x84])


def test_int4_two_rows_five_columns():
    # Step 0 holds 8 nibbles e = r*4 + kk in bytes e % 4, high half for e >= 4: row 0's
    # codes low, row 1's high. The tail (column 4 of both rows) is one byte.
    nib = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], dtype=np.uint8)
    got = native.pack(pack_int4(nib), 4, 2, 5).tobytes()
    assert got == bytes([0x61, 0x72, 0x83, 0x94, 0xA5])


def test_int4_full_step_low_nibbles_then_high():
    # A full block of 16 rows x 4 columns: codes 0..31 of the step (rows 0..7) in the
    # low nibbles of the 32 bytes, 32..63 (rows 8..15) in the high ones.
    nib = (np.arange(64, dtype=np.uint8) % 16).reshape(16, 4)
    got = np.frombuffer(native.pack(pack_int4(nib), 4, 16, 4).tobytes(), np.uint8)
    e = np.arange(32)
    np.testing.assert_array_equal(got, (e % 16) | ((e + 32) % 16) << 4)


def spec_pack(u: np.ndarray, bits: int) -> bytes:
    """The layout of layout.h restated: u (out, in) unsigned codes -> packed bytes."""
    out, in_f = u.shape
    k4, t = divmod(in_f, 4)
    res = bytearray()
    for o0 in range(0, out, 16):
        blk = u[o0 : o0 + 16]
        rb = blk.shape[0]
        runs = [blk[:, 4 * s : 4 * s + 4].reshape(-1) for s in range(k4)]
        if t:
            runs.append(blk[:, 4 * k4 :].reshape(-1))  # element r*t + j
        for run in runs:
            if bits == 8:
                res += bytes(run.astype(np.uint8))
            else:
                h = (len(run) + 1) // 2
                b = np.zeros(h, np.uint8)
                b |= run[:h].astype(np.uint8)
                b[: len(run) - h] |= run[h:].astype(np.uint8) << 4
                res += bytes(b)
        assert rb <= 16
    return bytes(res)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (16, 4), (17, 9), (33, 64), (40, 131)])
def test_pack_matches_the_layout_spec(bits, shape, rng):
    out, in_f = shape
    hi = 256 if bits == 8 else 16
    u = rng.integers(0, hi, size=shape).astype(np.uint8)
    canon = (u ^ 0x80) if bits == 8 else pack_int4(u)  # int8 stored signed: u = code + 128
    got = native.pack(np.ascontiguousarray(canon), bits, out, in_f)
    assert got.tobytes() == spec_pack(u, bits)
    assert got.nbytes == native.packed_nbytes(bits, out, in_f)
    np.testing.assert_array_equal(native.unpack(got, bits, out, in_f), canon)


def test_parameter_panels_are_block_major():
    # 17 rows, 2 groups: block 0 holds rows 0..15 of group 0, then of group 1; block 1
    # holds row 16 of each group and 15 zero rows. Scales float32; zero points int32, or
    # none at all when every zero point is the same.
    from qlinear.kernels.native import make_panels

    o = np.arange(17, dtype=np.float64)[:, None]
    scales = np.hstack([o + 1.0, o + 101.0])  # scale of row o, group g: o + 1 + 100 g
    zp = np.hstack([o, o + 50]).astype(np.int32)
    p = make_panels(scales, zp)
    assert p.scales.dtype == np.float32 and p.scales.shape == (2, 2, 16)
    assert p.scales[0, 0].tolist() == list(range(1, 17))
    assert p.scales[0, 1].tolist() == list(range(101, 117))
    assert p.scales[1, 0].tolist() == [17] + [0] * 15
    assert p.scales[1, 1].tolist() == [117] + [0] * 15
    assert p.zp.dtype == np.int32 and p.zp[1, 1].tolist() == [66] + [0] * 15
    uniform = make_panels(scales, np.full((17, 2), 136, np.int32))
    assert uniform.zp is None and uniform.zp_uniform == 136
    one = make_panels(scales[:, :1], zp[:, :1])  # one group: the plain (out,) arrays
    assert one.scales.tolist() == list(range(1, 18)) and one.zp.tolist() == list(range(17))
