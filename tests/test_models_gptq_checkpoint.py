"""qlinear.models.gptq_checkpoint and ``qlinear quantize --gptq``: layer-sequential GPTQ
over tiny random checkpoints (dense and MoE), against round to nearest, in bounded memory."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from qlinear import QuantizedLinear
from qlinear.cli import main
from qlinear.errors import InvalidInputError, InvalidParamsError

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from _tiny_lm import build_tiny
from qlinear.models import load_causal_lm
from qlinear.models.corpus import corpus_text
from qlinear.models.gptq_checkpoint import (
    GPTQOptions,
    _Source,
    calibrate_layer,
    gptq_quantize_checkpoint,
)

INT4 = ["--bits", "4", "--group-size", "32", "--scheme", "asymmetric", "--no-progress"]
CALIB = ["--calib-samples", "16", "--calib-seqlen", "32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    return {mt: build_tiny(root / mt, mt) for mt in ("llama", "qwen2_moe")}


def _heldout_error(src, dst):
    fp, q = load_causal_lm(src), load_causal_lm(dst)
    ids = np.array(fp.tokenizer.encode(corpus_text("eval"))[:256]).reshape(4, 64)
    ref = fp(ids)
    return float(np.linalg.norm(q(ids) - ref) / np.linalg.norm(ref)), q


@pytest.mark.parametrize("mt", ["llama", "qwen2_moe"])
def test_gptq_beats_round_to_nearest_on_heldout_tokens(tiny, tmp_path, capsys, mt):
    src = tiny[mt]
    assert main(["quantize", str(src), "-o", str(tmp_path / "rtn"), *INT4]) == 0
    report = tmp_path / "r.json"
    argv = ["quantize", str(src), "-o", str(tmp_path / "gptq"), "--gptq", *INT4, *CALIB]
    assert main([*argv, "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "calibrated on 512 tokens" in out
    err_rtn, _ = _heldout_error(src, tmp_path / "rtn")
    err_gptq, q = _heldout_error(src, tmp_path / "gptq")
    names = q.linear_names()
    assert all(isinstance(q.linear(n), QuantizedLinear) for n in names if n != "lm_head")
    assert 0 < err_gptq < err_rtn
    rep = json.loads(report.read_text())
    assert rep["calibration_tokens"] == 512 and len(rep["gptq"]) > 0
    assert (tmp_path / "gptq" / "tokenizer.json").is_file()
    assert (tmp_path / "gptq" / "config.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left


def test_moe_experts_with_too_few_tokens_fall_back_and_are_named(tiny, tmp_path):
    opts = GPTQOptions(samples=2, seqlen=16, min_tokens=20)
    cfg = dict(qtype="int8", granularity="per_channel")
    r = gptq_quantize_checkpoint(
        tiny["qwen2_moe"], tmp_path / "q", cfg, options=opts, progress=False
    )
    fb = dict(r.weight_only_fallback)
    assert fb and all(".experts." in n for n in fb)  # dense and shared linears: all tokens
    assert all(rows < 20 for rows in fb.values())
    assert any(".experts." in n for n in r.gptq)  # experts that got enough tokens: GPTQ
    assert not set(fb) & set(r.gptq)
    q = load_causal_lm(tmp_path / "q")
    assert all(isinstance(q.linear(n), QuantizedLinear) for n in fb)


def test_dense_shortcut_for_down_equals_a_full_pass(tiny):
    from qlinear.models.decoder_layer import DecoderLayer
    from qlinear.models.decoder_loading import read_config
    from qlinear.quantconfig import QuantConfig

    src = _Source(tiny["llama"])
    cfg = read_config(tiny["llama"])
    layer = DecoderLayer.from_tensors(cfg, 0, src.get)
    h = np.random.default_rng(0).standard_normal((5, 16, cfg.hidden_size)).astype(np.float32)
    qc = QuantConfig("int4", "per_group", "asymmetric", 32)
    done, h_next = calibrate_layer(layer, h, qc, GPTQOptions(), batch_size=2, dense=True)
    done2, h_full = calibrate_layer(layer, h, qc, GPTQOptions(), batch_size=2, dense=False)
    assert set(done) == set(layer.linears)
    for n in done:
        assert np.array_equal(done[n].stored_weight, done2[n].stored_weight)
    np.testing.assert_allclose(h_next, layer.with_linears(done).forward(h), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h_next, h_full, rtol=1e-5, atol=1e-5)


def _peak(src, dst):
    tracemalloc.start()
    try:
        gptq_quantize_checkpoint(
            src,
            dst,
            dict(qtype="int4", granularity="per_group", group_size=64),
            options=GPTQOptions(samples=2, seqlen=16),
            progress=False,
        )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_peak_memory_is_bounded_by_one_layer_not_the_depth(tmp_path):
    # layers of ~1.6 MB of float32 weights, tiny calibration: a pipeline that held the
    # model (or every float layer) would grow by ~10 MB from 2 to 8 layers
    sizes = dict(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    shallow = build_tiny(tmp_path / "d2", "llama", layers=2, **sizes)
    deep = build_tiny(tmp_path / "d8", "llama", layers=8, **sizes)
    layer_bytes = 4 * (2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 512)
    p2 = _peak(shallow, tmp_path / "q2")
    p8 = _peak(deep, tmp_path / "q8")
    assert p8 < p2 + layer_bytes / 2, (p2, p8, layer_bytes)


def test_errors(tiny, tmp_path):
    cfg = dict(qtype="int8", granularity="per_channel")
    with pytest.raises(InvalidInputError, match=r"has \d+ tokens; 4 samples x 32 tokens need 128"):
        gptq_quantize_checkpoint(
            tiny["llama"], tmp_path / "a", cfg, calib_text="short text", options=GPTQOptions(4, 32)
        )
    with pytest.raises(InvalidInputError, match="max_position_embeddings 64"):
        gptq_quantize_checkpoint(tiny["llama"], tmp_path / "b", cfg, options=GPTQOptions(2, 65))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(InvalidParamsError, match="not a qlinear output"):
        gptq_quantize_checkpoint(tiny["llama"], tmp_path / "full", cfg)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert (
        main(
            [
                "quantize",
                str(tiny["llama"]),
                "-o",
                str(tmp_path / "c"),
                "--gptq",
                "--calib-samples",
                "0",
            ]
        )
        == 2
    )
