"""Real models through compressed-tensors: transformers loads qlinear's MiniLM and
SmolLM2 checkpoints and computes what torch computes with qlinear's dequantized weights."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import qlinear
from qlinear import QuantizedLinear

CONFIGS = {
    "int4-g128-sym": {"qtype": "int4", "granularity": "per_group", "group_size": 128},
    "int8-channel": {"qtype": "int8", "granularity": "per_channel"},
}


def _reference_state(model, q, torch):
    sd = dict(model.state_dict())
    n = 0
    for k in sd:
        base = k.removesuffix(".weight")
        if base in q and isinstance(q[base], QuantizedLinear):
            sd[k] = torch.from_numpy(q[base].dequantize()).to(sd[k].dtype)
            n += 1
    return sd, n


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_transformers_automodel_loads_qlinear_minilm(tmp_path, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    try:
        from qlinear.models.loading import default_model_dir

        src = default_model_dir()
    except ImportError as exc:
        pytest.skip(str(exc))
    qlinear.quantize_checkpoint(src, tmp_path / "q", CONFIGS[name], progress=False)
    q = qlinear.load(tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_q = transformers.AutoModel.from_pretrained(tmp_path / "q").eval()
        m_f = transformers.AutoModel.from_pretrained(src).eval()
    sd, n = _reference_state(m_f, q, torch)
    assert n == 6 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    m_f.load_state_dict(sd)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    batch = tok(["A quantized sentence encoder.", "Checkpoints others can load."],
                padding=True, return_tensors="pt")  # fmt: skip
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = m_q(**batch).last_hidden_state
        yr = m_f(**batch).last_hidden_state
    # same weights, float32: equal up to summation order
    assert float((y - yr).abs().max()) <= 1e-4


def test_transformers_causal_lm_loads_qlinear_smollm2(tmp_path, smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors")
    # two decoder layers keep it quick; 576 input features with group 128 -> group 64,
    # the MLP's 1536 keep 128
    rep = qlinear.quantize_checkpoint(
        smollm2_dir, tmp_path / "q", CONFIGS["int4-g128-sym"], progress=False,
        include=["model.layers.0.*", "model.layers.1.*"],
    )  # fmt: skip
    groups = {t.name: t.format for t in rep.tensors if t.quantized}
    assert groups["model.layers.0.self_attn.q_proj.weight"] == "int4 per_group(64) symmetric"
    assert groups["model.layers.0.mlp.down_proj.weight"] == "int4 per_group(128) symmetric"
    q = qlinear.load(tmp_path / "q")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m_q = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
        m_f = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    sd, n = _reference_state(m_f, q, torch)
    assert n == 14
    m_f.load_state_dict(sd, strict=False)
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 30]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = m_q(ids).logits
        yr = m_f(ids).logits
    assert float((y - yr).abs().max()) <= 1e-3 * max(1.0, float(yr.abs().max()))
    assert np.isfinite(y.numpy()).all()
