"""load_causal_lm: a decoder LLM from a Hugging Face checkpoint directory (float or
quantized), read with qlinear's own safetensors reader."""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InvalidParamsError
from ..io import load_with_info
from ..kernels import ACTIVATION_MODES
from ..linear import QuantizedLinear
from .causal_lm import CausalLM
from .decoder_config import DecoderConfig
from .decoder_ops import Int8ActivationLinear

__all__ = ["load_causal_lm", "read_config"]


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"cannot read {str(path)!r}: {e}") from None


def read_config(model_dir: str | os.PathLike[str]) -> DecoderConfig:
    """The :class:`DecoderConfig` of ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FormatError(f"model directory {str(model_dir)!r} has no config.json")
    return DecoderConfig.from_dict(_read_json(path), source=str(path))


def _tokenizer(d: Path, cfg: DecoderConfig) -> Any:
    path = d / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from .tokenizer import Tokenizer, import_tokenizers

        import_tokenizers()
    except ImportError:
        return None  # logits need no tokenizer; encode/decode need `tokenizers`
    special: dict[str, Any] = {}
    tc = d / "tokenizer_config.json"
    if tc.is_file():
        data = _read_json(tc)
        special = data if isinstance(data, dict) else {}
    return Tokenizer(
        path, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, special_tokens=special
    )


def _with_activations(item: Any, activations: str | None, stored: str = "float") -> Any:
    """``item`` as it runs with ``activations`` (None: as ``stored`` says): a
    QuantizedLinear in int8 mode wrapped in :class:`Int8ActivationLinear`; anything else
    unchanged."""
    mode = stored if activations is None else activations
    if mode == "int8" and isinstance(item, QuantizedLinear):
        return Int8ActivationLinear(item)
    return item


def load_causal_lm(
    path: str | os.PathLike[str], *, backend: str | None = None, activations: str | None = None
) -> CausalLM:
    """A :class:`CausalLM` from a Hugging Face checkpoint directory or a GGUF file.

    The directory holds ``config.json`` (a supported ``model_type``: llama, mistral,
    qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe), ``model.safetensors`` or
    ``model.safetensors.index.json`` and its shards, and optionally ``tokenizer.json``
    (+ ``tokenizer_config.json``) for ``model.tokenizer``. Float tensors (F32, F16, BF16)
    are read with :func:`qlinear.load`: F32 weights stay read-only views of the
    memory-mapped file (F16 and BF16 are widened to float32 copies); layers quantized by
    ``qlinear quantize`` come back as ``QuantizedLinear`` (packed for ``backend``).
    A ``.gguf`` file of a llama-family model (llama.cpp's layout) is read through
    :mod:`qlinear.formats.gguf`: Q8_0 / Q4_0 / Q4_1 tensors stay quantized (Q4_1 as
    :class:`qlinear.offset_linear.OffsetLinear`), other types are dequantized by gguf-py,
    and the tokenizer is built from the GGUF tokenizer metadata.

    ``activations``: how the quantized layers treat x. None (the default) runs each as
    it was stored: int8 for a W8A8 checkpoint (compressed-tensors with dynamic input
    activations), float otherwise. ``"float"`` runs every quantized layer on float x;
    ``"int8"`` quantizes x per token to int8 for every QuantizedLinear (VNNI integer dot
    products, as llama.cpp's CPU path quantizes x for Q8_0 / Q4_0 weights; several times
    faster at batch 1, see docs/models.md for the perplexity it costs). Q4_1 layers
    (OffsetLinear) and float layers stay on float x.

    Raises:
        FormatError: no config.json, an unsupported model_type or rope scaling (named,
            with what is supported), a missing or misshaped tensor (named, with the shape
            expected).
        FileNotFoundError: the directory, or a shard it names, does not exist.
        InvalidParamsError: ``activations`` is not None, "float" or "int8".
    """
    if activations is not None and activations not in ACTIVATION_MODES:
        raise InvalidParamsError(
            f"activations must be None, 'float' or 'int8'; got {activations!r}"
        )
    d = Path(path)
    if d.is_file() and d.suffix.lower() == ".gguf":
        return _load_gguf(d, backend, activations)
    if not d.is_dir():
        raise FileNotFoundError(f"no such model directory: {d}")
    cfg = read_config(d)
    items, info = load_with_info(d, backend=backend)
    for n, item in items.items():  # W8A8 checkpoints run as they were quantized to run
        items[n] = _with_activations(item, activations, info.activations.get(n, "float"))

    def get(name: str) -> Any:
        item = items.get(name)
        if item is None and name.endswith(".weight"):
            layer = items.get(name[: -len(".weight")])
            if layer is not None and not isinstance(layer, np.ndarray):
                return layer
        if item is None:
            raise KeyError(name)
        return item

    model = CausalLM.from_tensors(cfg, get, tokenizer=_tokenizer(d, cfg), source=str(d))
    _release_pages(items.values())
    return model


def _load_gguf(path: Path, backend: str | None, activations: str | None) -> CausalLM:
    """A llama-family GGUF file through :func:`qlinear.formats.gguf.read_causal_lm`:
    Q8_0 / Q4_0 / Q4_1 tensors run as quantized layers, other types dequantized."""
    from ..formats.gguf import read_causal_lm

    raw, tensors, tok_json = read_causal_lm(path, backend=backend)
    tensors = {n: _with_activations(t, activations) for n, t in tensors.items()}
    cfg = DecoderConfig.from_dict(raw, source=f"{path} (GGUF metadata)")
    emb = tensors.get("model.embed_tokens")
    if emb is not None and not isinstance(emb, np.ndarray):
        # a quantized token embedding is a lookup table here: held dequantized (float32)
        # for the rows the ids pick, and kept quantized below as the tied lm_head
        tensors = {**tensors, "model.embed_tokens.weight": emb.dequantize(np.float32)}
        del tensors["model.embed_tokens"]
    else:
        emb = None

    def get(name: str) -> Any:
        item = tensors.get(name)
        if item is None and name.endswith(".weight"):
            item = tensors.get(name[: -len(".weight")])
        if item is None:
            raise KeyError(name)
        return item

    tokenizer = None
    if tok_json is not None:
        try:
            from .tokenizer import Tokenizer

            tokenizer = Tokenizer(
                None, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                json_text=tok_json,
            )  # fmt: skip
        except ImportError:
            tokenizer = None
    model = CausalLM.from_tensors(cfg, get, tokenizer=tokenizer, source=str(path))
    if emb is not None and cfg.tie_word_embeddings:
        # as llama.cpp does: the tied output matrix is the file's quantized table, the
        # same values as the float lookup table, a quarter (Q8_0) to an eighth of the
        # bytes read per decoded token
        model = model.with_linears({"lm_head": emb})
    return model


def _release_pages(arrays: Any) -> None:
    """Drop this process's resident pages of the files the arrays view. Building the
    model read the q/k/v and gate/up weights once to concatenate them; their pages would
    otherwise stay counted in RSS next to the fused copies. Pages the model still uses
    come back from the page cache on first access."""
    advise = getattr(mmap, "MADV_DONTNEED", None)
    seen: set[int] = set()
    for a in arrays:
        base = a
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        mm = base.obj if isinstance(base, memoryview) else base
        if isinstance(mm, mmap.mmap) and id(mm) not in seen and advise is not None:
            seen.add(id(mm))
            mm.madvise(advise)
