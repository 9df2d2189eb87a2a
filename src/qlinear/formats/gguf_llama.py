"""GGUF for llama-family models: Hugging Face checkpoints to GGUF (llama.cpp's names,
metadata, q/k row order and a gpt2-style tokenizer), and GGUF back to what a decoder
runner needs (:func:`read_causal_lm`). Tensor encoding is :mod:`qlinear.formats.gguf`'s."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..linear import QuantizedLinear
from ..offset_linear import OffsetLinear
from ..params import QuantizationParams
from .gguf import BLOCK, FILE_TYPES, _atomic_gguf, _gguf, _gguf_errors, _reader, _selected, read

__all__ = ["gguf_layers", "read_causal_lm", "write_from_hf"]


def _permute(w: np.ndarray, n_head: int, n_kv: int | None = None) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf's ``permute``)."""
    if n_kv is not None and n_kv != n_head:
        n_head = n_kv
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _unpermute(w: np.ndarray, n_head: int, n_kv: int | None = None) -> np.ndarray:
    """The inverse of :func:`_permute` (transformers' ``_reverse_permute_weights``)."""
    if n_kv is not None and n_kv != n_head:
        n_head = n_kv
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


LLAMA_FAMILY = ("llama", "mistral", "smollm", "smollm2")


def write_from_hf(gguf: Any, src: Path, dst: Path, kind: str, emit: Any, include, exclude) -> None:
    from ._files import TensorSet, read_json, resolve_shards

    shards = resolve_shards(src)
    cfg_path = shards.directory / "config.json"
    if not cfg_path.is_file():
        raise FormatError(f"{src}: a Hugging Face source needs config.json beside its weights")
    cfg = read_json(cfg_path)
    mt = cfg.get("model_type")
    if mt not in LLAMA_FAMILY:
        raise FormatError(
            f"{cfg_path}: model_type {mt!r}; GGUF conversion supports {list(LLAMA_FAMILY)}"
        )
    t = TensorSet.open(shards)
    n_layers = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads", n_head))
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    rope = cfg.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(cfg.get("_name_or_path") or src.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layers)
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_freq_base(theta)
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(int(cfg["vocab_size"]))
        w.add_file_type(FILE_TYPES[kind])
        _add_tokenizer(gguf, w, shards.directory, cfg)
        for name in sorted(t.where):
            gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise FormatError(f"tensor {name!r} has no GGUF name for the llama architecture")
            if name.endswith(("q_proj.bias", "k_proj.bias")):
                # llama.cpp's q/k row order would have to apply to these too; not verified
                raise FormatError(
                    f"tensor {name!r}: q/k biases (attention_bias) are not converted to "
                    "GGUF; expected a llama checkpoint without attention bias"
                )
            arr = np.asarray(t.array(name))
            if name.endswith("q_proj.weight"):
                arr = _permute(arr, n_head, n_head)
            elif name.endswith("k_proj.weight"):
                arr = _permute(arr, n_head, n_kv)
            dtype = t.info(name).dtype  # type: ignore[union-attr]
            quant = (
                arr.ndim == 2
                and name.endswith(".weight")
                and "norm" not in name
                and "embed" not in name
                and arr.shape[1] % BLOCK == 0
                and _selected(gname, include, exclude)
            )
            if quant:
                emit(w, gname, arr.astype(np.float64), None, None, True, dtype)
            else:
                keep = arr.astype(np.float32) if arr.ndim == 1 else arr.astype(np.float16)
                emit(w, gname, None, keep, None, False, dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic_gguf(dst, write)


def _add_tokenizer(gguf: Any, w: Any, directory: Path, cfg: dict) -> None:
    """tokenizer.ggml.* from a byte-level BPE tokenizer.json (gpt2 style)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise FormatError(f"{path}: only byte-level BPE tokenizers are converted to GGUF")
    vocab = dict(model["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for a in added.values():
        vocab.setdefault(a["content"], a["id"])
    size = max(int(cfg["vocab_size"]), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for s, i in vocab.items():
        tokens[i] = s
        a = added.get(s)
        types[i] = (
            gguf.TokenType.CONTROL
            if a and a.get("special")
            else (gguf.TokenType.USER_DEFINED if a else gguf.TokenType.NORMAL)
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    w.add_tokenizer_model("gpt2")
    # llama.cpp names its pre-tokenizers (its converter hashes a test string to pick one);
    # a plain byte-level split with the GPT-2 regex is its "gpt-2"
    pre = tok.get("pre_tokenizer") or {}
    gpt2 = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    w.add_tokenizer_pre("gpt-2" if gpt2 else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        v = cfg.get(key)
        if isinstance(v, int):
            add(v)


# --------------------------------------------------------------------------- decoder runner
@_gguf_errors
def read_causal_lm(path: str | os.PathLike[str], *, backend: str | None = None):
    """A GGUF llama-family model as ``(config, tensors, tokenizer_json)``: a Hugging Face
    style config dict, tensors under Hugging Face names (q/k rows un-permuted; layers for
    Q8_0/Q4_0/Q4_1, float32 arrays otherwise) and a ``tokenizer.json`` string built from
    the GGUF tokenizer metadata (None when the file has none or it is not gpt2-style BPE).
    """
    gguf = _gguf()
    p = Path(path)
    r = _reader(p)
    arch = str(r.fields["general.architecture"].contents())
    if arch != "llama":
        raise FormatError(f"{p}: architecture {arch!r}; read_causal_lm supports 'llama'")

    def get(key: str, default: Any = None) -> Any:
        f = r.fields.get(key)
        return default if f is None else f.contents()

    n_layers = int(get("llama.block_count"))
    n_head = int(get("llama.attention.head_count"))
    n_kv = int(get("llama.attention.head_count_kv", n_head))
    hidden = int(get("llama.embedding_length"))
    items, _ = read(p, backend=backend)
    vocab = get("llama.vocab_size") or len(get("tokenizer.ggml.tokens", []))
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    hf_names = _hf_names(tmap, n_layers)
    tensors: dict[str, Any] = {}
    for gname, v in items.items():
        base, _, suffix = gname.rpartition(".")
        hf = hf_names.get(base)
        if hf is None:
            raise FormatError(f"tensor {gname!r} has no Hugging Face name for llama")
        name = f"{hf}.{suffix}"
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            kv = n_head if "q_proj" in name else n_kv
            v = _unpermute_item(v, n_head, kv)
        tensors[name if not isinstance(v, (QuantizedLinear, OffsetLinear)) else hf] = v
    tied = "lm_head" not in tensors and "lm_head.weight" not in tensors
    rope_theta = float(get("llama.rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("llama.feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": int(get("llama.rope.dimension_count", hidden // n_head)),
        "max_position_embeddings": int(get("llama.context_length", 2048)),
        "rms_norm_eps": float(get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"},
        "tie_word_embeddings": tied,
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "attention_bias": False,
    }
    return config, tensors, _tokenizer_json(get)


def _hf_names(tmap: Any, n_layers: int) -> dict[str, str]:
    out = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    parts = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(n_layers):
        for g, h in parts.items():
            out[f"blk.{i}.{g}"] = f"model.layers.{i}.{h}"
    return out


def _unpermute_item(v: Any, n_head: int, n_kv: int) -> Any:
    if isinstance(v, np.ndarray):
        return _unpermute(v, n_head, n_kv)
    return _reorder_rows(v, _unpermute(np.arange(v.out_features), n_head, n_kv))


def gguf_layers(
    layers: dict[str, QuantizedLinear | OffsetLinear], config: dict[str, Any]
) -> dict[str, QuantizedLinear | OffsetLinear]:
    """Layers under Hugging Face linear names (``model.layers.0.self_attn.q_proj``, rows in
    Hugging Face order) -> the same layers under their GGUF tensor names
    (``blk.0.attn_q.weight``) with q/k rows in llama.cpp's order, as
    :func:`write_from_hf` writes float weights; for ``quantize_to_gguf(..., layers=)``.
    ``config``: the model's config dict (heads, layers)."""
    gguf = _gguf()
    n_layers = int(config["num_hidden_layers"])
    n_head = int(config["num_attention_heads"])
    n_kv = int(config.get("num_key_value_heads") or n_head)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    out = {}
    for name, v in layers.items():
        gname = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
        if gname is None:
            raise FormatError(f"layer {name!r} has no GGUF name for the llama architecture")
        if name.endswith(("q_proj", "k_proj")):
            kv = n_head if name.endswith("q_proj") else n_kv
            v = _reorder_rows(v, _permute(np.arange(v.out_features), n_head, kv))
        out[gname] = v
    return out


def _reorder_rows(v: Any, perm: np.ndarray) -> Any:
    """``v`` with output rows ``perm`` (row ``i`` of the result is row ``perm[i]``): rows
    move with their codes, scales, zero points, offsets and bias."""
    inner = v.inner if isinstance(v, OffsetLinear) else v
    p = inner.params
    params = QuantizationParams(
        p.qtype,
        p.scheme,
        p.granularity,
        p.scale[perm],
        p.zero_point[perm],
        p.min_val[perm],
        p.max_val[perm],
        p.group_size,
    )
    new = QuantizedLinear._from_stored(
        np.ascontiguousarray(inner.stored_weight[perm]),
        params,
        inner.in_features,
        bias=None if inner.bias is None else inner.bias[perm],
        backend=inner.backend,
    )
    return OffsetLinear(new, v.offsets[perm]) if isinstance(v, OffsetLinear) else new


def _tokenizer_json(get: Any) -> str | None:
    if get("tokenizer.ggml.model") != "gpt2":
        return None
    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = get("tokenizer.ggml.merges") or []
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, (s, ty) in enumerate(zip(tokens, types, strict=False))
        if ty == 3
    ]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {s: i for i, s in enumerate(tokens)},
            "merges": [m.split(" ", 1) for m in merges],
        },
    }
    return json.dumps(tok, ensure_ascii=False)
