"""load_causal_lm: a decoder LLM from a Hugging Face checkpoint directory (float or
quantized), read with qlinear's own safetensors reader."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError
from ..io import load as load_tensors
from .causal_lm import CausalLM
from .decoder_config import DecoderConfig

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


def load_causal_lm(path: str | os.PathLike[str], *, backend: str | None = None) -> CausalLM:
    """A :class:`CausalLM` from a Hugging Face checkpoint directory.

    The directory holds ``config.json`` (a supported ``model_type``: llama, mistral,
    qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe, olmoe), ``model.safetensors`` or
    ``model.safetensors.index.json`` and its shards, and optionally ``tokenizer.json``
    (+ ``tokenizer_config.json``) for ``model.tokenizer``. Float tensors (F32, F16, BF16)
    are read with :func:`qlinear.load`: F32 weights stay read-only views of the
    memory-mapped file (F16 and BF16 are widened to float32 copies); layers quantized by
    ``qlinear quantize`` come back as ``QuantizedLinear`` (packed for ``backend``).

    Raises:
        FormatError: no config.json, an unsupported model_type or rope scaling (named,
            with what is supported), a missing or misshaped tensor (named, with the shape
            expected).
        FileNotFoundError: the directory, or a shard it names, does not exist.
    """
    d = Path(path)
    if d.suffix == ".gguf":
        raise FormatError(f"{str(d)!r}: GGUF files are not read by load_causal_lm yet")
    if not d.is_dir():
        raise FileNotFoundError(f"no such model directory: {d}")
    cfg = read_config(d)
    items = load_tensors(d, backend=backend)

    def get(name: str) -> Any:
        item = items.get(name)
        if item is None and name.endswith(".weight"):
            layer = items.get(name[: -len(".weight")])
            if layer is not None and not isinstance(layer, np.ndarray):
                return layer
        if item is None:
            raise KeyError(name)
        return item

    return CausalLM.from_tensors(cfg, get, tokenizer=_tokenizer(d, cfg), source=str(d))
