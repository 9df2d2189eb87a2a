"""Regression tests for the inputs the fuzzers in fuzz/ found (reduced by hand), and a
short run of each harness's input function over its seed corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlinear import FormatError

FINDINGS = Path(__file__).parent / "fuzz_findings"


def test_tokenizer_that_loads_but_cannot_encode(tmp_path):
    # fuzz_tokenizer: a Unigram model whose "unk_id" key is misspelled loads, then
    # encoding raised the Rust side's bare Exception ("unk_id is missing").
    pytest.importorskip("tokenizers")
    from qlinear.models.tokenizer import HFTokenizer

    tok = HFTokenizer(FINDINGS / "tokenizer-unigram-without-unk-id.json", max_length=16)
    with pytest.raises(FormatError, match="cannot encode"):
        tok.encode_batch(["Hello world"])


def test_tokenizer_whose_normalizer_makes_rust_panic(tmp_path):
    # fuzz_tokenizer (structured mutation): "normalizer": [""] loads, then encoding
    # panicked in Rust (pyo3 PanicException, a BaseException that `except Exception`
    # misses): "index out of bounds" in normalizer.rs.
    pytest.importorskip("tokenizers")
    from qlinear.models.tokenizer import HFTokenizer

    tok = HFTokenizer(FINDINGS / "tokenizer-normalizer-list-panics.json", max_length=16)
    with pytest.raises(FormatError, match="cannot encode"):
        tok.encode_batch(["Hello world"])


@pytest.mark.parametrize(
    "text",
    [
        b"[" * 100_000,  # RecursionError
        b'{"hidden_size": ' + b"9" * 5000 + b"}",  # ValueError: over 4300 digits
        b'{"a": "\xff"}',  # UnicodeDecodeError
    ],
)
def test_config_json_that_json_cannot_read(tmp_path, text):
    from qlinear.models.loading import _read_json

    p = tmp_path / "config.json"
    p.write_bytes(text)
    with pytest.raises(FormatError, match="cannot read"):
        _read_json(p)


def test_gguf_whose_metadata_string_is_not_utf8():
    # fuzz_gguf: a metadata string of invalid UTF-8; gguf-py decodes it lazily and raised
    # UnicodeDecodeError from qlinear.io.inspect.
    pytest.importorskip("gguf")
    from qlinear.io import inspect

    with pytest.raises(FormatError, match="GGUF"):
        inspect(FINDINGS / "gguf-metadata-string-not-utf8.gguf")


@pytest.mark.parametrize(
    "header",
    [
        # 2^60 metadata entries: gguf-py allocated from the count (fuzz_gguf: out of memory)
        b"GGUF"
        + (3).to_bytes(4, "little")
        + (0).to_bytes(8, "little")
        + (1 << 60).to_bytes(8, "little"),
        # one key whose string length claims 2^50 bytes
        b"GGUF"
        + (3).to_bytes(4, "little")
        + (0).to_bytes(8, "little")
        + (1).to_bytes(8, "little")
        + (1 << 50).to_bytes(8, "little")
        + b"k" * 16,
        # an array of 2^40 uint32 values
        b"GGUF"
        + (3).to_bytes(4, "little")
        + (0).to_bytes(8, "little")
        + (1).to_bytes(8, "little")
        + (1).to_bytes(8, "little")
        + b"k"
        + (9).to_bytes(4, "little")
        + (4).to_bytes(4, "little")
        + (1 << 40).to_bytes(8, "little"),
    ],
)
def test_gguf_header_sizes_checked_before_any_allocation(tmp_path, header):
    pytest.importorskip("gguf")
    import qlinear

    p = tmp_path / "hostile.gguf"
    p.write_bytes(header + b"\0" * 64)
    with pytest.raises(FormatError, match="GGUF"):
        qlinear.load(p)


def test_decoder_config_with_a_huge_layer_count():
    # fuzz_config_json: num_hidden_layers of 10^20 reached a per-layer tuple
    # ("full_attention",) * n and raised OverflowError (a smaller huge count would have
    # taken all memory instead).
    from qlinear.models import DecoderConfig
    from qlinear.models.loading import _read_json

    d = _read_json(FINDINGS / "config-huge-num-hidden-layers.json")
    with pytest.raises(FormatError, match="at most"):
        DecoderConfig.from_dict(d)
