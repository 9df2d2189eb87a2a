"""SmolLM2-135M (the real model) against transformers, and checkpoints quantized by
``qlinear quantize`` loaded as decoders."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from _decoder_models import VARIANTS, build, max_rel_diff

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from qlinear import QuantizedLinear  # noqa: E402
from qlinear.cli import main  # noqa: E402
from qlinear.models import FloatLinear, load_causal_lm  # noqa: E402

PROMPT = (
    "The quick brown fox jumps over the lazy dog. In Python, a list comprehension "
    "such as [x * x for x in range(10)] builds a list; it is"
)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the oracle's speed is not under test; spare the shared CPUs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(smollm2_dir)
    yield load_causal_lm(smollm2_dir), ref, tok
    torch.set_num_threads(threads)


def test_smollm2_tokenizer_and_logits(smollm2):
    model, ref, tok = smollm2
    ids = model.tokenizer.encode(PROMPT)
    assert ids == tok(PROMPT)["input_ids"]  # SmolLM2's tokenizer adds no special tokens
    assert model.tokenizer.decode(ids) == tok.decode(ids) == PROMPT
    assert model.tokenizer.eos_token_id == tok.eos_token_id == 2
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert max_rel_diff(model(np.array(ids)), expected) <= 1e-4


def test_smollm2_greedy_generation_matches(smollm2):
    model, ref, _ = smollm2
    ids = model.tokenizer.encode(PROMPT)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = ref.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )[0, len(ids) :].tolist()
    cache = model.new_cache()
    logits = model.forward(np.array(ids), cache=cache, last_only=True)
    got: list[int] = []
    for _ in range(16):
        got.append(int(np.argmax(logits[-1])))
        logits = model.forward(np.array(got[-1:]), cache=cache)
    assert got == want


@pytest.mark.parametrize(
    ("name", "args", "bound"),
    [
        ("qwen2", ["--bits", "8"], 0.08),
        ("llama_tied", ["--bits", "4", "--group-size", "32"], 0.4),
        ("qwen2_moe", ["--bits", "8"], 0.08),
    ],
)
def test_quantized_checkpoint_loads_as_quantized_layers(tmp_path, name, args, bound):
    mt, extra = VARIANTS[name]
    src = build(mt, extra, tmp_path / "float")
    dst = tmp_path / "q"
    assert main(["quantize", str(src), "-o", str(dst), "--no-progress", *args]) == 0
    fp, q = load_causal_lm(src), load_causal_lm(dst)
    names = q.linear_names()
    assert all(isinstance(q.linear(n), QuantizedLinear) for n in names)
    assert isinstance(fp.linear(names[0]), FloatLinear)
    ids = np.random.default_rng(7).integers(0, 128, size=(2, 10))
    err = max_rel_diff(q(ids), fp(ids))
    assert 0 < err <= bound  # close to float (a loose bound), and not the float model
    # the fused q/k/v and gate/up layers compute what the separate layers compute (a
    # capture that returns None runs every linear on its own)
    h = q.embed(ids)
    fused, separate = q.layers[0].forward(h), q.layers[0].forward(h, capture=lambda n, x: None)
    assert max_rel_diff(fused, separate) <= 1e-6
    cache_out = q.forward(ids[:, :6], cache=(c := q.new_cache(batch=2)))
    cache_out = np.concatenate([cache_out, q.forward(ids[:, 6:], cache=c)], axis=1)
    assert max_rel_diff(cache_out, q(ids)) <= 1e-5
    w = q.linear_weight(names[0])
    assert w.dtype == np.float32 and w.shape == q.linear(names[0]).shape


def test_smollm2_gguf_file_runs_quantized_and_matches_transformers(smollm2):
    """The packaged Q4_1 GGUF itself, read by load_causal_lm: its Q4_1 layers run as
    OffsetLinear (not dequantized), its tokenizer comes from the GGUF metadata, and the
    logits equal transformers' on the checkpoint transformers dequantized from the same
    file."""
    pytest.importorskip("gguf")
    from conftest import smollm2_gguf_path
    from qlinear.offset_linear import OffsetLinear

    _, ref, tok = smollm2
    model = load_causal_lm(smollm2_gguf_path())
    assert isinstance(model.linear("model.layers.0.mlp.down_proj"), (OffsetLinear, QuantizedLinear))
    ids = model.tokenizer.encode(PROMPT)
    assert ids == tok(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0].numpy()
    assert max_rel_diff(model(np.array(ids)), expected) <= 1e-4


def test_gguf_tied_head_runs_on_the_quantized_table():
    """The packaged GGUF's token embedding is Q8_0 and doubles as the output matrix: the
    loaded model's tied lm_head is that quantized table (as llama.cpp runs it), and its
    logits equal those of a float head over the dequantized embedding (the same values),
    prefill and cached decode alike."""
    pytest.importorskip("gguf")
    from conftest import smollm2_gguf_path

    model = load_causal_lm(smollm2_gguf_path())
    head = model.linear("lm_head")
    assert isinstance(head, QuantizedLinear) and head.group_size == 32
    table = model._embed  # the float32 lookup table the embedding step reads
    assert np.array_equal(head.dequantize(np.float32), table)
    floaty = model.with_linears({"lm_head": FloatLinear(table)})
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, size=12)
    assert max_rel_diff(model(ids), floaty(ids)) <= 1e-5
    cache = model.new_cache(capacity=4)  # grows past its first capacity while decoding
    steps = [model.forward(ids[:5], cache=cache, last_only=True)]
    steps += [model.forward(ids[i : i + 1], cache=cache) for i in range(5, 12)]
    assert cache.length == 12 and cache.capacity >= 12
    assert max_rel_diff(np.concatenate(steps)[-8:], floaty(ids)[4:]) <= 1e-5


def test_w8a8_checkpoint_runs_with_int8_activations(tmp_path):
    """A W8A8 checkpoint (compressed-tensors int-quantized, dynamic per-token input
    activations) runs its linears in int8-activation mode when loaded; the same codes
    run weight-only give other logits, and both stay near float."""
    from qlinear.models.decoder_ops import Int8ActivationLinear

    mt, extra = VARIANTS["llama"]
    src = build(mt, extra, tmp_path / "float")
    dst = tmp_path / "w8a8"
    args = ["--bits", "8", "--activations", "int8", "--no-progress"]
    assert main(["quantize", str(src), "-o", str(dst), *args]) == 0
    fp, q = load_causal_lm(src), load_causal_lm(dst)
    names = q.linear_names()
    wrapped = [n for n in names if isinstance(q.linear(n), Int8ActivationLinear)]
    assert wrapped and all(n != "lm_head" or n in wrapped for n in wrapped)
    weight_only = q.with_linears({n: q.linear(n).layer for n in wrapped})
    ids = np.random.default_rng(3).integers(0, 128, size=(2, 10))
    y8, yw, yf = q(ids), weight_only(ids), fp(ids)
    assert max_rel_diff(y8, yw) > 0  # the activation mode is really in use
    assert max_rel_diff(y8, yf) <= 0.3  # a loose bound: tiny random models amplify errors


def test_activations_choose_the_mode_over_what_was_stored(tmp_path):
    """``load_causal_lm(..., activations=)``: "int8" on a weight-only int8 checkpoint runs
    as the W8A8 checkpoint of the same codes runs (logits bit for bit), "float" on the
    W8A8 one runs as the weight-only one; float layers stay float; a bad mode is named."""
    from qlinear.errors import InvalidParamsError
    from qlinear.models.decoder_ops import Int8ActivationLinear

    mt, extra = VARIANTS["llama"]
    src = build(mt, extra, tmp_path / "float")
    w8a8, w8 = tmp_path / "w8a8", tmp_path / "w8"
    base = ["--bits", "8", "--no-progress"]
    assert main(["quantize", str(src), "-o", str(w8a8), *base, "--activations", "int8"]) == 0
    assert main(["quantize", str(src), "-o", str(w8), *base]) == 0
    ids = np.random.default_rng(4).integers(0, 128, size=(2, 9))
    as_w8a8 = load_causal_lm(w8, activations="int8")
    assert any(isinstance(as_w8a8.linear(n), Int8ActivationLinear) for n in as_w8a8.linear_names())
    np.testing.assert_array_equal(as_w8a8(ids), load_causal_lm(w8a8)(ids))
    as_w8 = load_causal_lm(w8a8, activations="float")
    assert not any(isinstance(as_w8.linear(n), Int8ActivationLinear) for n in as_w8.linear_names())
    np.testing.assert_array_equal(as_w8(ids), load_causal_lm(w8)(ids))
    fp = load_causal_lm(src, activations="int8")  # nothing quantized: nothing changes
    assert all(isinstance(fp.linear(n), FloatLinear) for n in fp.linear_names())
    np.testing.assert_array_equal(fp(ids), load_causal_lm(src)(ids))
    with pytest.raises(InvalidParamsError, match=r"activations.*'int4'"):
        load_causal_lm(w8, activations="int4")
