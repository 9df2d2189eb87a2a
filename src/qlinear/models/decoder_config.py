"""DecoderConfig and RopeConfig: the sizes and options of a decoder LLM, read from Hugging
Face's ``config.json`` (transformers 5.x ``rope_parameters`` and older ``rope_theta`` /
``rope_scaling`` both), validated once so that the model code never re-checks them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError

__all__ = ["MOE_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "DecoderConfig", "RopeConfig"]

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
SUPPORTED_MODEL_TYPES = DENSE_MODEL_TYPES + MOE_MODEL_TYPES
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# What transformers' config classes fall back to when config.json has no rope theta.
_DEFAULT_THETA = {"mixtral": 1e6}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding: ``theta`` and the scaling of its inverse frequencies.

    ``rope_type``: ``"default"`` (none), ``"linear"`` (``inv_freq / factor``) or
    ``"llama3"`` (Llama 3.1's banded scaling with ``low_freq_factor``, ``high_freq_factor``
    and ``original_max_position_embeddings``).
    """

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def _where(source: str, field: str) -> str:
    return f"{source}: {field}"


# Sizes above these are no model this runner can hold; checking them here keeps a hostile
# config.json from allocating per-layer tables of 10^18 entries (found by fuzz_config_json).
_MAX_SIZE = 2**31 - 1
_MAX_COUNTS = {
    "num_hidden_layers": 100_000,
    "num_experts": 1_000_000,
    "num_local_experts": 1_000_000,
}


def _pos_int(d: Mapping[str, Any], field: str, source: str, default: Any = None) -> int:
    v = d.get(field, default)
    hi = _MAX_COUNTS.get(field, _MAX_SIZE)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
        raise FormatError(
            f"{_where(source, field)} must be a positive integer of at most {hi}; got {v!r:.60}"
        )
    return v


def _pos_float(d: Mapping[str, Any], field: str, source: str, default: Any = None) -> float:
    v = d.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise FormatError(f"{_where(source, field)} must be a positive number; got {v!r}")
    return float(v)


def _bool(d: Mapping[str, Any], field: str, source: str, default: bool) -> bool:
    v = d.get(field, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise FormatError(f"{_where(source, field)} must be true or false; got {v!r}")
    return v


def _token_ids(v: Any, field: str, source: str) -> tuple[int, ...]:
    if v is None:
        return ()
    vals = v if isinstance(v, list) else [v]
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in vals):
        raise FormatError(
            f"{_where(source, field)} must be a token id or a list of them; got {v!r}"
        )
    return tuple(vals)


def _rope(d: Mapping[str, Any], model_type: str, source: str, max_pos: int) -> RopeConfig:
    params = d.get("rope_parameters")
    if params is not None:
        field = "rope_parameters"
        if not isinstance(params, Mapping):
            raise FormatError(f"{source}: rope_parameters must be an object; got {params!r}")
        if all(isinstance(v, Mapping) for v in params.values()) and params:
            raise FormatError(
                f"{source}: rope_parameters per layer type ({sorted(params)}) are not "
                "supported; expected one set of rope parameters"
            )
        scaling: Mapping[str, Any] = params
        theta_src: Mapping[str, Any] = params
    else:
        field = "rope_scaling"
        scaling = d.get("rope_scaling") or {}
        if not isinstance(scaling, Mapping):
            raise FormatError(f"{source}: rope_scaling must be an object or null; got {scaling!r}")
        theta_src = d
    theta = _pos_float(
        theta_src,
        "rope_theta",
        f"{source}: {field}" if params else source,
        _DEFAULT_THETA.get(model_type, 10000.0),
    )
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise FormatError(
            f"{source}: {field} rope_type {rope_type!r} is not supported; expected one of "
            f"{list(ROPE_TYPES)}"
        )
    prf = scaling.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1, 1.0):
        raise FormatError(f"{source}: partial_rotary_factor {prf!r} is not supported; expected 1.0")
    where = f"{source}: {field}"
    if rope_type == "default":
        return RopeConfig(theta)
    factor = _pos_float(scaling, "factor", where)
    if rope_type == "linear":
        return RopeConfig(theta, "linear", factor)
    low = _pos_float(scaling, "low_freq_factor", where)
    high = _pos_float(scaling, "high_freq_factor", where)
    if not high > low:
        raise FormatError(
            f"{where}: high_freq_factor ({high}) must be larger than low_freq_factor ({low})"
        )
    orig = _pos_int(scaling, "original_max_position_embeddings", where, max_pos)
    return RopeConfig(theta, "llama3", factor, low, high, orig)


def _layer_types(
    d: Mapping[str, Any], mt: str, n_layers: int, source: str
) -> tuple[int | None, tuple[str, ...]]:
    """``(sliding_window, layer_types)`` as transformers' config classes derive them."""
    window = d.get("sliding_window")
    if mt.startswith("qwen") and not d.get("use_sliding_window", False):
        window = None
    if mt in ("llama", "olmoe"):
        window = None
    if window in (None, 0):
        return None, ("full_attention",) * n_layers
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise FormatError(
            f"{source}: sliding_window must be a positive integer or null; got {window!r}"
        )
    types = d.get("layer_types")
    if types is None:
        if mt in ("qwen2", "qwen3"):
            mwl = d.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
        elif mt == "qwen2_moe":
            mwl = d.get("max_window_layers", 28)
            types = [
                "sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention"
                for i in range(n_layers)
            ]
        else:
            types = ["sliding_attention"] * n_layers
    if (
        not isinstance(types, list)
        or len(types) != n_layers
        or not all(t in LAYER_TYPES for t in types)
    ):
        raise FormatError(
            f"{source}: layer_types must list {n_layers} entries from {list(LAYER_TYPES)}; "
            f"got {types!r:.120}"
        )
    return window, tuple(types)


@dataclass(frozen=True)
class DecoderConfig:
    """The sizes and options of a decoder-only LLM (llama-family, dense or MoE).

    Attention: ``num_attention_heads`` query heads and ``num_key_value_heads`` key/value
    heads of ``head_dim`` each (GQA), scaled by ``head_dim ** -0.5``; ``qkv_bias`` /
    ``o_bias`` add biases to the projections; ``qk_norm`` is ``None``, ``"head"`` (Qwen3:
    RMSNorm over each head's ``head_dim``) or ``"full"`` (OLMoE: RMSNorm over the whole q
    and k projections); ``clip_qkv`` clamps q, k, v (OLMoE). ``layer_types[i]`` is
    ``"full_attention"`` or ``"sliding_attention"`` (keys within ``sliding_window``).

    MLP: SwiGLU of ``intermediate_size``; MoE layers (``moe_layers[i]``) route each token
    to ``top_k`` of ``num_experts`` experts of ``moe_intermediate_size``; ``norm_topk_prob``
    renormalises the top-k softmax probabilities to sum to 1 (Mixtral always does);
    ``shared_expert_intermediate_size > 0`` adds Qwen2-MoE's sigmoid-gated shared expert.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str | None = None
    clip_qkv: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    num_experts: int = 0
    top_k: int = 0
    norm_topk_prob: bool = False
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def attention_bias(self) -> bool:
        """True when q/k/v projections carry a bias (``qkv_bias``)."""
        return self.qkv_bias

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def is_moe(self) -> bool:
        return any(self.moe_layers)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "config.json") -> DecoderConfig:
        """Read and validate a ``config.json`` dictionary.

        Raises FormatError naming ``source`` and the field: an unknown ``model_type`` (the
        supported ones listed), a missing or non-positive size, an unsupported rope scaling
        or activation, heads that do not divide evenly.
        """
        if not isinstance(d, Mapping):
            raise FormatError(f"{source}: expected a JSON object; got {type(d).__name__}")
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise FormatError(
                f"{source}: model_type {mt!r} is not supported; expected one of "
                f"{list(SUPPORTED_MODEL_TYPES)}"
            )
        ints = {
            f: _pos_int(d, f, source)
            for f in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
            )
        }
        n_heads = ints["num_attention_heads"]
        n_kv = _pos_int(d, "num_key_value_heads", source, d.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise FormatError(
                f"{source}: num_attention_heads {n_heads} is not a multiple of "
                f"num_key_value_heads {n_kv}"
            )
        hd = d.get("head_dim")
        if hd is None:
            if ints["hidden_size"] % n_heads:
                raise FormatError(
                    f"{source}: hidden_size {ints['hidden_size']} is not a multiple of "
                    f"num_attention_heads {n_heads} and head_dim is not given"
                )
            hd = ints["hidden_size"] // n_heads
        head_dim = _pos_int({"head_dim": hd}, "head_dim", source)
        if head_dim % 2:
            raise FormatError(f"{source}: head_dim must be even for RoPE; got {head_dim}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise FormatError(f"{source}: hidden_act {act!r} is not supported; expected 'silu'")
        eps = _pos_float(d, "rms_norm_eps", source, 1e-6)
        rope = _rope(d, mt, source, ints["max_position_embeddings"])
        n_layers = ints["num_hidden_layers"]
        window, types = _layer_types(d, mt, n_layers, source)
        # transformers honours attention_bias (q/k/v/o) only in these families; Mistral and
        # Mixtral have no biases, Qwen2 always has q/k/v biases, Qwen2-MoE per qkv_bias.
        attn_bias = mt in ("llama", "qwen3", "qwen3_moe", "olmoe") and _bool(
            d, "attention_bias", source, False
        )
        qkv_bias = mt == "qwen2" or attn_bias
        if mt == "qwen2_moe":
            qkv_bias = _bool(d, "qkv_bias", source, True)
        o_bias = attn_bias
        qk_norm = {"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(mt)
        clip = d.get("clip_qkv") if mt == "olmoe" else None
        if clip is not None:
            clip = _pos_float(d, "clip_qkv", source)
        moe: dict[str, Any] = {}
        if mt in MOE_MODEL_TYPES:
            moe = _moe_fields(d, mt, n_layers, ints["intermediate_size"], source)
        tie = _bool(d, "tie_word_embeddings", source, False)
        if not moe:
            moe = {"moe_layers": (False,) * n_layers}
        return cls(
            model_type=mt,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=eps,
            rope=rope,
            tie_word_embeddings=tie,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=_bool(d, "mlp_bias", source, False) if mt == "llama" else False,
            qk_norm=qk_norm,
            clip_qkv=clip,
            sliding_window=window,
            layer_types=types,
            bos_token_id=(_token_ids(d.get("bos_token_id"), "bos_token_id", source) or (None,))[0],
            eos_token_ids=_token_ids(d.get("eos_token_id"), "eos_token_id", source),
            **moe,
            **ints,
        )


def _moe_fields(
    d: Mapping[str, Any], mt: str, n_layers: int, inter: int, source: str
) -> dict[str, Any]:
    ne_field = "num_local_experts" if "num_local_experts" in d else "num_experts"
    num_experts = _pos_int(d, ne_field, source)
    top_k = _pos_int(d, "num_experts_per_tok", source)
    if top_k > num_experts:
        raise FormatError(
            f"{source}: num_experts_per_tok {top_k} is larger than {ne_field} {num_experts}"
        )
    if mt == "mixtral":
        norm, moe_inter, shared = True, inter, 0
        layers = (True,) * n_layers
    else:
        norm = _bool(d, "norm_topk_prob", source, False)
        moe_inter = inter if mt == "olmoe" else _pos_int(d, "moe_intermediate_size", source)
        shared = 0
        if mt == "qwen2_moe":
            shared = d.get("shared_expert_intermediate_size", 0) or 0
            if isinstance(shared, bool) or not isinstance(shared, int) or shared < 0:
                raise FormatError(
                    f"{source}: shared_expert_intermediate_size must be an integer >= 0; "
                    f"got {shared!r}"
                )
        if mt == "olmoe":
            layers = (True,) * n_layers
        else:
            only = d.get("mlp_only_layers") or []
            step = _pos_int(d, "decoder_sparse_step", source, 1)
            if not isinstance(only, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in only
            ):
                raise FormatError(
                    f"{source}: mlp_only_layers must be a list of layer indices; got {only!r}"
                )
            layers = tuple(i not in only and (i + 1) % step == 0 for i in range(n_layers))
    return {
        "num_experts": num_experts,
        "top_k": top_k,
        "norm_topk_prob": norm,
        "moe_intermediate_size": moe_inter,
        "shared_expert_intermediate_size": shared,
        "moe_layers": layers,
    }
