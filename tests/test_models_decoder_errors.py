"""DecoderConfig parsing and the decoder's clear errors (no oracle needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qlinear.errors import FormatError, InvalidInputError, InvalidParamsError
from qlinear.models import DecoderConfig, RopeConfig, load_causal_lm
from qlinear.models.rope import inverse_frequencies

BASE = {
    "model_type": "llama",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 8,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}


def _cfg(**changes):
    d = {**BASE, **changes}
    return DecoderConfig.from_dict({k: v for k, v in d.items() if v is not None})


def test_config_fields_and_defaults():
    c = _cfg(eos_token_id=[2, 7], bos_token_id=1)
    assert (c.head_dim, c.num_key_value_heads, c.rope) == (4, 2, RopeConfig(10000.0))
    assert c.eos_token_ids == (2, 7) and c.eos_token_id == 2 and c.bos_token_id == 1
    assert c.moe_layers == (False,) and not c.is_moe
    assert _cfg(num_key_value_heads=None).num_key_value_heads == 4
    assert _cfg(model_type="qwen2").qkv_bias and not _cfg(model_type="qwen2").o_bias
    assert _cfg(attention_bias=True).o_bias
    assert (
        _cfg(model_type="qwen3").qk_norm == "head"
        and _cfg(model_type="olmoe", num_experts=2, num_experts_per_tok=1).qk_norm == "full"
    )


def test_rope_new_and_old_style_agree():
    new = _cfg(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})
    old = _cfg(rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert new.rope == old.rope == RopeConfig(500.0, "linear", 2.0)
    assert _cfg(rope_theta=123.0).rope == RopeConfig(123.0)
    # linear scaling divides every frequency by the factor
    plain = inverse_frequencies(RopeConfig(500.0), 8)
    assert np.allclose(inverse_frequencies(new.rope, 8), plain / 2.0, rtol=1e-15)


def test_llama3_rope_bands():
    # theta 10000, head_dim 8: wavelengths 2pi * 10000^(j/4) = 6.3, 63, 628, 6283
    rope = RopeConfig(10000.0, "llama3", 8.0, 1.0, 4.0, 1000)
    inv = inverse_frequencies(rope, 8)
    plain = inverse_frequencies(RopeConfig(10000.0), 8)
    assert inv[0] == plain[0] and inv[1] == plain[1]  # wavelen < 1000 / 4: kept
    assert inv[3] == plain[3] / 8.0  # wavelen > 1000: divided by the factor
    s = (1000 / (2 * np.pi / plain[2]) - 1.0) / 3.0  # 628 is between 250 and 1000
    assert np.isclose(inv[2], (1 - s) * plain[2] / 8 + s * plain[2], rtol=1e-14)


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"model_type": "gpt2"}, ["'gpt2'", "llama", "olmoe"]),
        ({"model_type": None}, ["model_type", "llama"]),
        ({"hidden_size": 0}, ["hidden_size", "positive"]),
        ({"num_key_value_heads": 3}, ["num_attention_heads 4", "num_key_value_heads 3"]),
        ({"hidden_act": "gelu"}, ["hidden_act", "'gelu'", "silu"]),
        ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, ["rope_type 'yarn'", "llama3"]),
        ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1.0}}, ["'dynamic'", "linear"]),
        ({"rope_scaling": {"type": "linear"}}, ["factor"]),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, ["low_freq_factor"]),
        ({"partial_rotary_factor": 0.5}, ["partial_rotary_factor", "1.0"]),
        ({"rope_theta": -1.0}, ["rope_theta", "positive"]),
        ({"eos_token_id": "x"}, ["eos_token_id"]),
        ({"model_type": "mistral", "sliding_window": -2}, ["sliding_window"]),
        ({"model_type": "mixtral"}, ["num_experts", "positive"]),
        (
            {"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3},
            ["num_experts_per_tok 3"],
        ),
        (
            {"model_type": "qwen2_moe", "num_experts": 2, "num_experts_per_tok": 1},
            ["moe_intermediate_size"],
        ),
        (
            {
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 4,
                "layer_types": ["x"],
            },
            ["layer_types"],
        ),
    ],
)
def test_config_errors_name_the_field(changes, words):
    with pytest.raises(FormatError) as e:
        _cfg(**changes)
    for w in words:
        assert w in str(e.value)
    with pytest.raises(FormatError, match="JSON object"):
        DecoderConfig.from_dict([1, 2])


@pytest.fixture
def tiny_dir(tmp_path, rng):
    """A llama checkpoint written with qlinear's own writer (no transformers needed)."""
    import qlinear

    c = _cfg()
    h, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    p = "model.layers.0."
    shapes = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (h, h),
        p + "self_attn.k_proj.weight": (8, h),
        p + "self_attn.v_proj.weight": (8, h),
        p + "self_attn.o_proj.weight": (h, h),
        p + "mlp.gate_proj.weight": (f, h),
        p + "mlp.up_proj.weight": (f, h),
        p + "mlp.down_proj.weight": (h, f),
    }
    tensors = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(BASE))
    qlinear.save(d / "model.safetensors", tensors)
    return d, tensors


def test_token_and_context_errors(tiny_dir):
    model = load_causal_lm(tiny_dir[0])
    assert model(np.arange(8)).shape == (8, 32)
    with pytest.raises(InvalidInputError, match=r"\[0, 31\].*from 0 to 32"):
        model(np.array([0, 32]))
    with pytest.raises(InvalidInputError, match="from -1"):
        model([-1, 3])
    with pytest.raises(InvalidInputError, match="integer"):
        model(np.array([1.0, 2.0]))
    with pytest.raises(InvalidInputError, match="1-D"):
        model(np.zeros((1, 1, 2), dtype=np.int64))
    with pytest.raises(InvalidInputError, match="non-empty"):
        model(np.array([], dtype=np.int64))
    with pytest.raises(InvalidInputError, match=r"9 tokens.*max_position_embeddings 8"):
        model(np.arange(9) % 32)
    cache = model.new_cache()
    model.forward(np.arange(6), cache=cache)
    with pytest.raises(InvalidInputError, match=r"9 tokens \(6 cached \+ 3 new\)"):
        model.forward(np.arange(3), cache=cache)
    with pytest.raises(InvalidInputError, match="batch 1"):
        model.forward(np.zeros((2, 1), dtype=np.int64), cache=cache)
    with pytest.raises(InvalidParamsError, match="batch"):
        model.new_cache(batch=0)
    with pytest.raises(InvalidParamsError, match="no linear layer"):
        model.linear("model.layers.0.mlp.nope")
    with pytest.raises(InvalidParamsError, match="no linear layers"):
        model.with_linears({"lm_headz": None})


def _rewrite(d, tensors):
    import qlinear

    (d / "model.safetensors").unlink()
    qlinear.save(d / "model.safetensors", tensors)


def test_missing_and_misshaped_tensors(tiny_dir):
    d, tensors = tiny_dir
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite(d, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(
        FormatError, match=r"'model.layers.0.self_attn.k_proj.weight' is missing.*\(8, 16\)"
    ):
        load_causal_lm(d)
    _rewrite(d, {**tensors, name: tensors[name][:7]})
    with pytest.raises(
        FormatError, match=r"k_proj.weight' has shape \(7, 16\); expected \(8, 16\)"
    ):
        load_causal_lm(d)
    _rewrite(d, {**tensors, "model.norm.weight": tensors["model.norm.weight"][:3]})
    with pytest.raises(FormatError, match=r"model.norm.weight' has shape \(3,\)"):
        load_causal_lm(d)
    cfg = {**BASE, "tie_word_embeddings": False}
    (d / "config.json").write_text(json.dumps(cfg))
    _rewrite(d, tensors)
    with pytest.raises(FormatError, match=r"'lm_head.weight' is missing"):
        load_causal_lm(d)
    (d / "config.json").write_text(json.dumps({**BASE, "model_type": "bert"}))
    with pytest.raises(FormatError, match=r"model_type 'bert' is not supported.*qwen3_moe"):
        load_causal_lm(d)
    (d / "config.json").unlink()
    with pytest.raises(FormatError, match=r"no config\.json"):
        load_causal_lm(d)
    with pytest.raises(FileNotFoundError):
        load_causal_lm(d / "nowhere")


def test_numpy_reference_of_one_layer(tiny_dir):
    """The tiny model against a plain NumPy transcription of the llama equations (float64)."""
    d, t = tiny_dir
    model = load_causal_lm(d)
    ids = np.array([3, 1, 4, 1, 5])
    p = "model.layers.0."

    def norm(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5)

    x = t["model.embed_tokens.weight"][ids].astype(np.float64)
    a = norm(x, t[p + "input_layernorm.weight"])
    q = (a @ t[p + "self_attn.q_proj.weight"].T).reshape(5, 4, 4)
    k = (a @ t[p + "self_attn.k_proj.weight"].T).reshape(5, 2, 4)
    v = (a @ t[p + "self_attn.v_proj.weight"].T).reshape(5, 2, 4)
    inv = 1.0 / 10000.0 ** (np.arange(0, 4, 2) / 4)
    ang = np.arange(5)[:, None] * inv
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rot(z):  # rotate pairs (z[i], z[i + 2])
        z1, z2 = z[..., :2], z[..., 2:]
        return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], axis=-1)

    q, k = rot(q), rot(k)
    out = np.zeros((5, 4, 4))
    for hh in range(4):
        kv = hh // 2
        s = q[:, hh] @ k[:, kv].T / 2.0
        s[np.triu_indices(5, 1)] = -np.inf
        w = np.exp(s - s.max(1, keepdims=True))
        out[:, hh] = (w / w.sum(1, keepdims=True)) @ v[:, kv]
    x = x + out.reshape(5, 16) @ t[p + "self_attn.o_proj.weight"].T
    m = norm(x, t[p + "post_attention_layernorm.weight"])
    g, u = m @ t[p + "mlp.gate_proj.weight"].T, m @ t[p + "mlp.up_proj.weight"].T
    x = x + (g / (1 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
    logits = norm(x, t["model.norm.weight"]) @ t["model.embed_tokens.weight"].T
    got = model(ids)
    assert np.abs(got - logits).max() <= 1e-4 * np.abs(logits).max()
