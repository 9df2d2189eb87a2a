"""Tokenizers read from ``tokenizer.json`` through the optional ``tokenizers`` package
(imported lazily): :class:`HFTokenizer` as sentence-transformers sets it up for BERT,
:class:`Tokenizer` for causal language models."""

from __future__ import annotations

import os
from typing import Any

from ..errors import FormatError, InvalidInputError

__all__ = ["HFTokenizer", "Tokenizer", "import_tokenizers"]

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


def _read_tokenizer(path: str | os.PathLike[str] | None, json_text: str | None = None) -> Any:
    """``tokenizers.Tokenizer.from_file(path)`` (or ``from_str(json_text)``); FormatError
    for a tokenizer it cannot read."""
    tokenizers = import_tokenizers()
    try:
        if json_text is not None:
            return tokenizers.Tokenizer.from_str(json_text)
        return tokenizers.Tokenizer.from_file(os.fspath(path))
    except BaseException as e:  # the Rust side raises a bare Exception on bad JSON
        _reraise_unless_rust_error(e)
        where = "tokenizer JSON" if path is None else repr(os.fspath(path))
        raise FormatError(f"cannot read tokenizer {where}: {e}") from None


def _run(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a tokenizer method; FormatError for a tokenizer.json the Rust side accepts but
    cannot run (found by fuzzing: an error or a panic at encode time)."""
    try:
        return fn(*args, **kwargs)
    except BaseException as e:
        _reraise_unless_rust_error(e)
        raise FormatError(f"the tokenizer cannot encode or decode the text: {e}") from None


class HFTokenizer:
    """A ``tokenizer.json`` tokenizer set up as sentence-transformers uses it.

    ``encode_batch(texts) -> list[list[int]]``: token ids with the post-processor's
    special tokens (``[CLS] ... [SEP]`` for BERT), truncated to ``max_length`` tokens,
    not padded (the model pads). The padding and truncation settings stored in the file
    are replaced, as sentence-transformers does at every call.
    """

    def __init__(self, path: str | os.PathLike[str], max_length: int) -> None:
        tok = _read_tokenizer(path)
        tok.no_padding()
        tok.enable_truncation(max_length=max_length)
        self._tok = tok
        self.max_length = max_length

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        encs = _run(self._tok.encode_batch, texts, add_special_tokens=True)
        return [enc.ids for enc in encs]


class Tokenizer:
    """A causal LM's ``tokenizer.json`` (byte-level BPE, SentencePiece, ...) through
    ``tokenizers``.

    ``encode(text) -> list[int]``: the tokens of ``text`` without special tokens (no BOS
    is added unless ``add_special_tokens=True``); ``decode(ids) -> str``.
    ``bos_token_id`` / ``eos_token_id``: from the model config when it names them, else
    from ``tokenizer_config.json``'s ``bos_token`` / ``eos_token`` strings; None if neither.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        *,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        special_tokens: dict[str, Any] | None = None,
        json_text: str | None = None,
    ) -> None:
        tok = _read_tokenizer(path, json_text)
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        special = special_tokens or {}
        self.bos_token_id = (
            bos_token_id if bos_token_id is not None else self._id(special, "bos_token")
        )
        self.eos_token_id = (
            eos_token_id if eos_token_id is not None else self._id(special, "eos_token")
        )

    def _id(self, special: dict[str, Any], key: str) -> int | None:
        v = special.get(key)
        if isinstance(v, dict):  # {"content": "<s>", ...} in older tokenizer_config.json
            v = v.get("content")
        return self._tok.token_to_id(v) if isinstance(v, str) else None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise InvalidInputError(f"text must be a str; got {type(text).__name__}")
        return list(_run(self._tok.encode, text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Any, *, skip_special_tokens: bool = False) -> str:
        return _run(
            self._tok.decode, [int(i) for i in ids], skip_special_tokens=skip_special_tokens
        )
