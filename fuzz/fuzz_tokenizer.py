"""Fuzz tokenizer.json loading (``qlinear.models.tokenizer.HFTokenizer`` over the
``tokenizers`` package) and encoding with it. Contract: a QuantizationError
(FormatError), never another exception (a Rust panic arrives as
``pyo3_runtime.PanicException``, a BaseException), a crash or a hang. The Rust side is
not coverage-instrumented: coverage counts qlinear's Python only."""

from __future__ import annotations

import _common

with _common.instrumented():
    from qlinear.models.tokenizer import HFTokenizer


def seeds() -> dict[str, bytes]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {
        t: i
        for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "wor", "##ld", "a"])
    }
    wp = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )  # fmt: skip
    bpe_vocab = {"h": 0, "e": 1, "l": 2, "o": 3, "he": 4, "ll": 5, "<unk>": 6}
    bpe = Tokenizer(models.BPE(bpe_vocab, [("h", "e"), ("l", "l")], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    uni = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0))
    return {
        "wordpiece": wp.to_str().encode(),
        "bpe-bytelevel": bpe.to_str().encode(),
        "unigram": uni.to_str().encode(),
    }


def one(data: bytes) -> None:
    path = _common.scratch_file("tokenizer.json", data)
    tok = HFTokenizer(path, max_length=16)
    ids = tok.encode_batch(["Hello world", "", "a\u00e9\U0001f600"])
    if not all(len(r) <= 16 for r in ids):
        raise RuntimeError("truncation to max_length was not applied")


if __name__ == "__main__":
    _common.main(__file__, one, seeds)
