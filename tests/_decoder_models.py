"""Tiny random-initialised decoder checkpoints built by transformers (no download), for the
decoder oracle tests."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

SIZES = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (model_type, extra config); every architecture and the variants that matter.
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama_mha": ("llama", dict(num_key_value_heads=4, head_dim=24)),
    "llama_rope_linear": (
        "llama",
        dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 500.0}),
    ),
    "llama_rope_llama3": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
                "rope_theta": 500000.0,
            }
        ),
    ),
    "mistral": ("mistral", dict(head_dim=24)),
    "mistral_window": ("mistral", dict(sliding_window=5)),
    "qwen2": ("qwen2", {}),
    "qwen2_window": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "qwen3": ("qwen3", dict(head_dim=16, tie_word_embeddings=True)),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(num_experts=4, shared_expert_intermediate_size=48, mlp_only_layers=[1], **MOE),
    ),
    "qwen2_moe_norm": (
        "qwen2_moe",
        dict(num_experts=4, shared_expert_intermediate_size=40, norm_topk_prob=True, **MOE),
    ),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=4, head_dim=16, norm_topk_prob=True, **MOE)),
    "qwen3_moe_sparse_step": (
        "qwen3_moe",
        dict(num_experts=4, head_dim=16, decoder_sparse_step=2, **MOE),
    ),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2, eos_token_id=2)),
    "olmoe_clip": (
        "olmoe",
        dict(
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=0.5, eos_token_id=2
        ),
    ),
}


def build(model_type: str, extra: dict, out: Path, *, dtype=None, max_shard_size=None) -> Path:
    """Save a random model of ``model_type`` to ``out``: every weight drawn from a seeded
    normal (norms around 1, biases nonzero), so nothing is trivially zero or one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, **{**SIZES, **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                else:
                    p.copy_(0.15 * torch.randn_like(p))
        if dtype is not None:
            model = model.to(dtype)
        kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(out, **kw)
    return out


def reference_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    """transformers' float32 logits for ``ids`` (B, T)."""
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            return ref(torch.tensor(ids)).logits.float().numpy()


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max|b|``: the logits error relative to the largest reference logit."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def rewrite_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
