import pytest

from qlinear import (
    InvalidParamsError,
    QuantizationGranularity,
    QuantizationScheme,
    QuantizationType,
)
from qlinear.qtypes import as_granularity, as_qtype, as_scheme, code_range, storage_offset


@pytest.mark.parametrize(
    ("fn", "text", "member"),
    [
        (as_qtype, "int8", QuantizationType.INT8),
        (as_qtype, "INT4", QuantizationType.INT4),
        (as_scheme, "symmetric", QuantizationScheme.SYMMETRIC),
        (as_scheme, "asym", QuantizationScheme.ASYMMETRIC),
        (as_granularity, "per_channel", QuantizationGranularity.PER_CHANNEL),
        (as_granularity, "tensor", QuantizationGranularity.PER_TENSOR),
        (as_granularity, "per_group", QuantizationGranularity.PER_GROUP),
    ],
)
def test_string_coercion(fn, text, member):
    assert fn(text) is member
    assert fn(member) is member


@pytest.mark.parametrize("fn", [as_qtype, as_scheme, as_granularity])
def test_unknown_strings_name_the_choices(fn):
    with pytest.raises(InvalidParamsError, match="expected one of"):
        fn("int3")
    with pytest.raises(InvalidParamsError):
        fn(8)


def test_code_ranges_hold_the_documented_number_of_codes():
    # Symmetric ranges drop the most negative code so both signs map alike.
    assert code_range("int8", "symmetric") == (-127, 127)
    assert code_range("int8", "asymmetric") == (-128, 127)
    assert code_range("int4", "symmetric") == (-7, 7)
    assert code_range("int4", "asymmetric") == (0, 15)
    with pytest.raises(InvalidParamsError):
        code_range("fp16", "symmetric")


def test_int4_storage_offsets_map_codes_onto_nibbles():
    for scheme in ("symmetric", "asymmetric"):
        lo, hi = code_range("int4", scheme)
        off = storage_offset("int4", scheme)
        assert 0 <= lo + off and hi + off <= 15
    assert storage_offset("int8", "asymmetric") == 0


def test_bits():
    assert [QuantizationType(t).bits for t in ("int8", "int4", "fp16")] == [8, 4, 16]
