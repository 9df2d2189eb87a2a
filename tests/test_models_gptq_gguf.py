"""qlinear.models.gptq_gguf and ``qlinear quantize --gptq --format gguf``: on a tiny random
llama, gguf-py reads every GPTQ tensor back to qlinear's weights, the file beats
llama.cpp's reference rounding (gguf-py ``quants.quantize``) of the same float weights on
held-out text, a GGUF source keeps its metadata, and bad flag combinations are errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from qlinear.cli import main
from qlinear.errors import FormatError, InvalidParamsError

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

from _tiny_lm import build_tiny  # noqa: E402
from qlinear.formats import gguf as qg  # noqa: E402
from qlinear.formats.gguf_llama import _unpermute, gguf_layers  # noqa: E402
from qlinear.models import load_causal_lm  # noqa: E402
from qlinear.models.corpus import corpus_text  # noqa: E402
from qlinear.models.gptq_checkpoint import GPTQOptions, _Source  # noqa: E402
from qlinear.models.gptq_gguf import gptq_quantize_to_gguf  # noqa: E402

KINDS = ("q8_0", "q4_0", "q4_1")
CALIB = ["--calib-samples", "16", "--calib-seqlen", "32", "--no-progress"]
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("gptq_gguf") / "llama", "llama")


def _log_softmax(z):
    z = z.astype(np.float64) - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _heldout_kl(src, path):
    """Mean KL(float || quantized) of the next-token distributions on held-out text."""
    fp, q = load_causal_lm(src), load_causal_lm(path)
    ids = np.array(fp.tokenizer.encode(corpus_text("eval"))[:512]).reshape(8, 64)
    p, lq = _log_softmax(fp(ids)), _log_softmax(q(ids))
    return float((np.exp(p) * (p - lq)).sum(-1).mean())


def _rounded_by_gguf_py(src, dst, kind):
    """The same checkpoint with every 2-D linear rounded by gguf-py (llama.cpp's reference
    rounding), written by the same writer."""
    qt = qg._qtype(gguf, kind)
    cfg = json.loads((src / "config.json").read_text())
    source = _Source(src)
    layers = {}
    for n in source.where:
        if n.endswith("_proj.weight") or n == "lm_head.weight":
            w = np.asarray(source.get(n), np.float32)
            raw = gguf.quants.quantize(w, qt)
            layers[n[: -len(".weight")]] = qg.decode_layer(raw, kind, w.shape[1], n)
    qg.quantize_to_gguf(src, dst, kind, layers=gguf_layers(layers, cfg))


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_file_reads_exactly_and_beats_llama_cpp_rounding(tiny, tmp_path, capsys, kind):
    out = tmp_path / f"gptq.{kind}.gguf"
    argv = ["quantize", str(tiny), "-o", str(out), "--format", "gguf", "--gguf-type", kind]
    assert main([*argv, "--gptq", *CALIB]) == 0
    printed = capsys.readouterr().out
    assert "14 linears calibrated on 512 tokens" in printed and f"GGUF {kind.upper()}" in printed
    qt = qg._qtype(gguf, kind)
    reader = gguf.GGUFReader(str(out))
    items, _ = qg.read(out)
    lm = load_causal_lm(out)
    names = {t.name for t in reader.tensors if t.tensor_type == qt}
    assert names == {f"blk.{i}.{n}.weight" for i in range(2) for n in LINEARS} | {"output.weight"}
    for t in reader.tensors:
        if t.tensor_type != qt:
            continue
        w = gguf.quants.dequantize(np.asarray(t.data), qt)
        np.testing.assert_array_equal(items[t.name].dequantize(np.float32), w)
        if t.name == "blk.1.attn_k.weight":  # the runner holds it in Hugging Face row order
            got = lm.linear("model.layers.1.self_attn.k_proj").dequantize(np.float32)
            np.testing.assert_array_equal(got, _unpermute(w, 4, 2))
    rtn = tmp_path / f"rtn.{kind}.gguf"
    _rounded_by_gguf_py(tiny, rtn, kind)
    kl_gptq, kl_rtn = _heldout_kl(tiny, out), _heldout_kl(tiny, rtn)
    assert 0 < kl_gptq < 0.95 * kl_rtn, (kl_gptq, kl_rtn)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left


def test_gguf_source_keeps_metadata_names_and_tokenizer(tiny, tmp_path):
    src = tmp_path / "src.q8_0.gguf"
    qg.quantize_to_gguf(tiny, src, "q8_0")
    out = tmp_path / "out.q4_0.gguf"
    opts = GPTQOptions(samples=8, seqlen=32)
    report = gptq_quantize_to_gguf(src, out, "q4_0", options=opts, progress=False)
    assert len(report.gptq) == 14 and report.config == {"gguf_type": "q4_0", "method": "minmax"}
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert list(a.fields) == list(b.fields)
    for key in a.fields:
        if key != "general.file_type" and not key.startswith("GGUF."):
            assert a.fields[key].contents() == b.fields[key].contents(), key
    assert b.fields["general.file_type"].contents() == qg.FILE_TYPES["q4_0"]
    types = {t.name: t.tensor_type for t in b.tensors}
    assert list(types) == [t.name for t in a.tensors]
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16  # float in the source
    items, _ = qg.read(out)
    for t in b.tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            np.testing.assert_array_equal(items[t.name].dequantize(np.float32), w)
    lm_src, lm_out = load_causal_lm(src), load_causal_lm(out)
    text = "def f(x):\n    return x"
    assert lm_src.tokenizer.encode(text) == lm_out.tokenizer.encode(text)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--gguf-type", "q4_0", "--bits", "8"], "--bits 8 conflicts with --gguf-type q4_0"),
        (["--gguf-type", "q8_0", "--bits", "4"], "--bits 4 conflicts"),
        (["--gguf-type", "q4_0", "--scheme", "asymmetric"], "--scheme asymmetric conflicts"),
        (["--gguf-type", "q4_1", "--scheme", "symmetric"], "--scheme symmetric conflicts"),
        (["--gguf-type", "q4_1", "--group-size", "64"], "--group-size 64 conflicts"),
        (["--granularity", "channel"], "--granularity channel conflicts"),
        (["--method", "percentile"], "minmax .* or mse"),
        (["--activations", "int8"], "compressed-tensors"),
        (["--strict-group-size"], "not GGUF"),
    ],
)
@pytest.mark.parametrize("gptq", [True, False])
def test_flags_that_conflict_with_the_gguf_grid_are_usage_errors(
    tiny, tmp_path, capsys, flags, match, gptq
):
    argv = ["quantize", str(tiny), "-o", str(tmp_path / "x.gguf"), "--format", "gguf", *flags]
    assert main([*argv, *(["--gptq", *CALIB] if gptq else ["--no-progress"])]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x.gguf").exists()


def test_agreeing_flags_are_accepted(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    flags = ["--bits", "4", "--scheme", "asymmetric", "--group-size", "32", "--method", "mse"]
    argv = ["quantize", str(tiny), "-o", str(out), "--format", "gguf", "--gguf-type", "q4_1"]
    assert main([*argv, *flags, "--gptq", *CALIB]) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} >= {"Q4_1"}


def test_api_errors(tiny, tmp_path, capsys):
    argv = ["quantize", str(tiny), "-o", str(tmp_path / "x.gguf"), "--format", "gguf"]
    assert main([*argv, "--gptq", "--include", "*q_proj*", *CALIB]) == 2
    assert "--include/--exclude do not apply" in capsys.readouterr().err
    opts = GPTQOptions(samples=2, seqlen=16)
    with pytest.raises(InvalidParamsError, match=r"\.gguf file"):
        gptq_quantize_to_gguf(tiny, tmp_path / "x.safetensors", "q4_0", options=opts)
    with pytest.raises(InvalidParamsError, match="gguf type"):
        gptq_quantize_to_gguf(tiny, tmp_path / "x.gguf", "q4_k", options=opts)
    with pytest.raises(InvalidParamsError, match="minmax"):
        gptq_quantize_to_gguf(tiny, tmp_path / "x.gguf", "q4_0", method="percentile")
    other = tmp_path / "qwen"
    shutil.copytree(tiny, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(FormatError, match="model_type 'qwen2'"):
        gptq_quantize_to_gguf(other, tmp_path / "x.gguf", "q4_0", options=opts)
    with pytest.raises(FileNotFoundError):
        gptq_quantize_to_gguf(tmp_path / "missing", tmp_path / "x.gguf", "q4_0", options=opts)
    with pytest.raises(InvalidParamsError, match="calibrated by GPTQ"):
        gptq_quantize_to_gguf(
            tiny,
            tmp_path / "x.gguf",
            "q8_0",
            options=opts,
            progress=False,
            layers={"blk.0.attn_q.weight": None},
        )
    assert not (tmp_path / "x.gguf").exists()
