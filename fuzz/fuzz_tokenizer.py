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


_SEEDS: list = []


def _value(fdp) -> object:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeInt(8)  # any 64-bit integer, negative ones included
    if kind == 1:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 12))
    if kind == 2:
        return None
    if kind == 3:
        return fdp.ConsumeBool()
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    if kind == 5:
        return [fdp.ConsumeUnicodeNoSurrogates(4) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 6:
        return {}
    return 10 ** fdp.ConsumeIntInRange(19, 40)  # beyond 64 bits


def _mutated(data: bytes) -> bytes:
    """A seed tokenizer.json with a few values replaced by fuzzed ones of other types:
    the Rust side is not coverage-instrumented, so raw byte mutation alone rarely gets
    past its JSON parser; this keeps the files structurally close to real ones."""
    import json

    import atheris

    if not _SEEDS:
        _SEEDS.extend(json.loads(v) for v in seeds().values())
    fdp = atheris.FuzzedDataProvider(data)
    doc = json.loads(json.dumps(_SEEDS[fdp.ConsumeIntInRange(0, len(_SEEDS) - 1)]))
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        parent, key, node = None, None, doc
        for _depth in range(fdp.ConsumeIntInRange(1, 5)):
            kids = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
            if not kids:
                break
            k, child = kids[fdp.ConsumeIntInRange(0, len(kids) - 1)]
            parent, key, node = node, k, child
            if not isinstance(child, (dict, list)) or fdp.ConsumeBool():
                break
        if parent is not None:
            parent[key] = _value(fdp)
    return json.dumps(doc).encode()


def one(data: bytes) -> None:
    if data[:1] and data[0] & 1:  # half the inputs: structured mutations of a seed
        data = _mutated(data[1:])
    path = _common.scratch_file("tokenizer.json", data)
    tok = HFTokenizer(path, max_length=16)
    ids = tok.encode_batch(["Hello world", "", "a\u00e9\U0001f600"])
    if not all(len(r) <= 16 for r in ids):
        raise RuntimeError("truncation to max_length was not applied")


if __name__ == "__main__":
    _common.main(__file__, one, seeds)
