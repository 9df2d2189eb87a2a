"""WordPiece tokenization through the optional ``tokenizers`` package (imported lazily)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import FormatError

__all__ = ["HFTokenizer", "import_tokenizers"]

_INSTALL_HINT = "pip install 'qlinear[eval]' (or: pip install tokenizers)"


def import_tokenizers() -> Any:
    """The ``tokenizers`` module; ImportError with the install command when it is absent."""
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(
            "running a model needs the 'tokenizers' package to read tokenizer.json, and it is "
            f"not installed; install it with: {_INSTALL_HINT}"
        ) from e
    return tokenizers


def _reraise_unless_rust_error(e: BaseException) -> None:
    """Let KeyboardInterrupt and the like through; a Rust error (a bare Exception) or a
    Rust panic (pyo3's PanicException, a BaseException) becomes the caller's FormatError."""
    if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
        raise e


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer set up as sentence-transformers uses it.

    ``encode_batch(texts) -> list[list[int]]``: token ids with the post-processor's
    special tokens (``[CLS] ... [SEP]`` for BERT), truncated to ``max_length`` tokens,
    not padded (the model pads). The padding and truncation settings stored in the file
    are replaced, as sentence-transformers does at every call.
    """

    def __init__(self, path: str | os.PathLike[str], max_length: int) -> None:
        tokenizers = import_tokenizers()
        try:
            tok = tokenizers.Tokenizer.from_file(os.fspath(path))
        except BaseException as e:  # the Rust side raises a bare Exception on bad JSON
            _reraise_unless_rust_error(e)
            raise FormatError(f"cannot read tokenizer {os.fspath(path)!r}: {e}") from None
        tok.no_padding()
        tok.enable_truncation(max_length=max_length)
        self._tok = tok
        self.max_length = max_length

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        try:
            encs = self._tok.encode_batch(texts, add_special_tokens=True)
        except BaseException as e:  # a tokenizer.json the Rust side accepts but cannot run
            _reraise_unless_rust_error(e)
            raise FormatError(f"tokenizer cannot encode the texts: {e}") from None
        return [enc.ids for enc in encs]
